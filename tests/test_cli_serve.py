"""`personavec serve --steered-model`: a bad spec ends the command with one error line and status 2 before
any model loads; good specs reach `ServeSettings.steered_models` as parsed steering terms. In-process,
with small vectors made here (no model): the model loader, `create_app` and `uvicorn.run` are replaced,
so nothing is served and nothing blocks. (The steered names served for real: test_serve.py and
test_serve_lm_eval.py.)"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import uvicorn
from typer.testing import CliRunner

import personavec as pv
import personavec.serve
import personavec.serve.preflight
from personavec import cli
from personavec.cli import app
from personavec.cli import serve as cli_serve
from personavec.vectors import LAYER_CONVENTION

MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def vector_file(folder: Path, trait: str, n_layers: int = 30, hidden: int = 8) -> Path:
    g = torch.Generator().manual_seed(0)
    tensors = {p: torch.randn(n_layers + 1, hidden, generator=g) for p in ("response", "prompt", "last_prompt")}
    meta = {"trait": trait, "model_id": MODEL_ID, "fingerprint": "0123456789abcdef", "n_layers": n_layers,
            "hidden_size": hidden, "layer_convention": LAYER_CONVENTION,
            "positions": ["response", "prompt", "last_prompt"], "judge": "contrast", "threshold": 0.0,
            "coherence_min": 50.0, "trait_sha256": "f" * 64, "trait_source": f"/x/{trait}.yaml",
            "counts": {"positive_kept": 9, "positive_total": 10, "negative_kept": 8, "negative_total": 10},
            "version": "0.1.0", "created": "2025-08-01T00:00:00+00:00", "best_layer": 18}
    return pv.PersonaVector(tensors, meta).save(folder / f"{trait}.pv.safetensors")


@pytest.fixture
def no_server(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Stand-ins for the model loader, create_app and uvicorn.run; returns the (settings, ...) each
    create_app call received. The loader fails the test if a bad spec let the command reach it."""
    calls: list[dict[str, Any]] = []

    def load(*_args: Any) -> Any:
        calls.append({"loaded": True})
        return SimpleNamespace(model_id=MODEL_ID)

    def create_app(model: Any, vectors: Any, settings: Any) -> str:
        calls.append({"model": model, "vectors": dict(vectors), "settings": settings})
        return "app"

    monkeypatch.setattr(cli_serve, "load", load)
    monkeypatch.setattr(personavec.serve, "create_app", create_app)
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: calls.append({"run": (a, k)}))
    # nothing listens here, so whether the port is free on this machine is not these tests' business
    # (test_serve_hostile tests the listen check itself)
    monkeypatch.setattr(personavec.serve.preflight, "check_listen", lambda host, port: None)
    return calls


@pytest.mark.parametrize(("spec", "needle"), [
    ("evil", "'evil' is not NAME=VECTOR:COEF[:LAYER][:POSITIONS][,…]"),  # brackets survive rich markup
    ("x=evil", "'evil' is not VECTOR:COEF"),
    ("x=evil:strong", "coef"),
    ("x=evil:1:all:prompt", "names its positions twice"),
    ("x=evil:1:everywhere", "positions"),
    ("x=evil:1:2:3:4", "is not VECTOR:COEF"),
    ("x=kind:1", "uses vector 'kind', which --vector does not load (loaded: evil, humorous)"),
])
def test_bad_steered_model_exits_2_with_one_line(spec: str, needle: str, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                                 no_server: list[dict[str, Any]]) -> None:
    files = [vector_file(tmp_path, "evil"), vector_file(tmp_path, "humorous")]
    monkeypatch.setattr(sys, "argv", ["personavec", "serve", "--vector", str(files[0]), "--vector", str(files[1]),
                                      "--steered-model", "fine=evil:1", "--steered-model", spec])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --steered-model") and needle in lines[0], err
    assert no_server == []  # refused before the model loads


def test_steered_model_named_twice_exits_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str], no_server: list[dict[str, Any]]) -> None:
    path = vector_file(tmp_path, "evil")
    monkeypatch.setattr(sys, "argv", ["personavec", "serve", "--vector", str(path),
                                      "--steered-model", "a=evil:1", "--steered-model", " a = evil:2"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert exc.value.code == 2 and lines == ["error: --steered-model names 'a' twice"] and no_server == []


def test_good_steered_models_reach_serve_settings(tmp_path: Path, no_server: list[dict[str, Any]]) -> None:
    files = [vector_file(tmp_path, "evil"), vector_file(tmp_path, "humorous")]
    args = ["serve", "--vector", str(files[0]), "--vector", str(files[1]), "--port", "8123",
            "--steered-model", "evil-8=evil:8:all", "--steered-model", "mix=evil:4:18:all, humorous:-2.5",
            "--steered-model", "low=humorous:1:prompt:3"]
    res = CliRunner(env={"COLUMNS": "200"}).invoke(app, args)
    assert res.exit_code == 0, res.output
    loaded, created, ran = no_server
    assert loaded == {"loaded": True} and set(created["vectors"]) == {"evil", "humorous"}
    steered = {name: [t.model_dump() for t in terms] for name, terms in created["settings"].steered_models.items()}
    assert steered == {
        "evil-8": [{"vector": "evil", "coef": 8.0, "layer": None, "positions": "all"}],
        "mix": [{"vector": "evil", "coef": 4.0, "layer": 18, "positions": "all"},
                {"vector": "humorous", "coef": -2.5, "layer": None, "positions": "response"}],
        "low": [{"vector": "humorous", "coef": 1.0, "layer": 3, "positions": "prompt"}]}
    assert ran["run"] == (("app",), {"host": "127.0.0.1", "port": 8123, "log_level": "warning"})
    assert "steered models: evil-8, mix, low" in res.output

    # without the option: no steered names
    no_server.clear()
    res = CliRunner().invoke(app, ["serve", "--vector", str(files[0])])
    assert res.exit_code == 0, res.output
    assert no_server[1]["settings"].steered_models == {}
    # the parsing function the command uses, without vector names to check against
    assert list(cli_serve.steered_models(["s=nope:1"])) == ["s"]
