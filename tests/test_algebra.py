"""Vector algebra and trait comparison: exact values, provenance that survives a save, refusal of vectors of
different models or shapes, cosine matrices, and the CLI (table, heatmap PNG, one-line errors, no output)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from personavec import algebra
from personavec.cli import app
from personavec.errors import VectorError
from personavec.vectors import PersonaVector

N_LAYERS, HIDDEN = 6, 16


def vec(trait: str, seed: int, *, fingerprint: str = "fp-a", n_layers: int = N_LAYERS, hidden: int = HIDDEN,
        best_layer: int | None = None) -> PersonaVector:
    g = torch.Generator().manual_seed(seed)
    tensors = {p: torch.randn(n_layers + 1, hidden, generator=g) for p in ("response", "prompt")}
    meta = {"trait": trait, "model_id": "toy", "fingerprint": fingerprint, "n_layers": n_layers,
            "hidden_size": hidden, "positions": ["response", "prompt"], "best_coef": 3.0}
    if best_layer is not None:
        meta["best_layer"] = best_layer
    return PersonaVector(tensors=tensors, meta=meta)


def test_add_subtract_scale_are_exact_and_record_provenance(tmp_path: Path) -> None:
    a, b, c = vec("evil", 0, best_layer=4), vec("humorous", 1, best_layer=4), vec("sycophantic", 2)
    total = algebra.add(a, b, c, sources=["a.pv", "b.pv", "c.pv"])
    for p in ("response", "prompt"):
        torch.testing.assert_close(total.tensors[p], a.tensors[p] + b.tensors[p] + c.tensors[p])
    diff = algebra.subtract(a, b, trait="evil-minus-humour")
    torch.testing.assert_close(diff.tensors["response"], a.tensors["response"] - b.tensors["response"])
    half = algebra.scale(a, -0.5)
    torch.testing.assert_close(half.tensors["response"], -0.5 * a.tensors["response"])

    assert total.trait == "evil+humorous+sycophantic" and diff.trait == "evil-minus-humour"
    assert [i["digest"] for i in total.meta["algebra"]["inputs"]] == [a.digest(), b.digest(), c.digest()]
    assert total.meta["algebra"]["inputs"][1]["source"] == "b.pv"
    assert diff.meta["algebra"]["op"] == "1*evil - 1*humorous" and half.meta["algebra"]["op"] == "-0.5*evil"
    assert diff.meta["best_layer"] == 4 and "best_layer" not in total.meta  # kept only where inputs agree
    assert "best_coef" not in diff.meta and diff.meta["fingerprint"] == "fp-a"

    path = diff.save(tmp_path / "d.pv.safetensors")
    back = PersonaVector.load(path)
    assert back.meta["algebra"] == diff.meta["algebra"] and back.digest() == diff.digest()


def test_normalize_gives_unit_rows_and_keeps_zero_rows() -> None:
    a = vec("evil", 0)
    a.tensors["response"][0] = 0.0
    unit = algebra.normalize(a, norm=2.0)
    norms = unit.tensors["response"].norm(dim=1)
    assert norms[0] == 0 and torch.allclose(norms[1:], torch.full((N_LAYERS,), 2.0))
    cos = torch.nn.functional.cosine_similarity(unit.tensors["prompt"], a.tensors["prompt"], dim=1)
    assert torch.allclose(cos, torch.ones_like(cos))
    with pytest.raises(VectorError, match="positive"):
        algebra.normalize(a, norm=0)


def test_vectors_of_other_models_or_shapes_are_refused() -> None:
    a = vec("evil", 0)
    with pytest.raises(VectorError, match=r"shape \[5, 16\].*one model"):
        algebra.add(a, vec("x", 1, n_layers=4))
    with pytest.raises(VectorError, match=r"shape \[7, 8\]"):
        algebra.cosine_by_layer([a, vec("x", 1, hidden=8)])
    other = vec("x", 1, fingerprint="fp-b")
    with pytest.raises(VectorError, match=r"weights fp-b.*--allow-model-mismatch"):
        algebra.subtract(a, other)
    assert algebra.subtract(a, other, allow_mismatch=True).n_layers == N_LAYERS
    only_prompt = PersonaVector({"prompt": a.tensors["prompt"]}, dict(a.meta))
    assert list(algebra.add(a, only_prompt).tensors) == ["prompt"]  # positions both have
    with pytest.raises(VectorError, match="common positions: prompt"):
        algebra.cosine_matrix([a, only_prompt], 3)


def test_cosine_matrix_per_layer() -> None:
    a = vec("evil", 0)
    b = algebra.scale(a, -3.0, trait="anti")
    c = PersonaVector({p: torch.zeros_like(t) for p, t in a.tensors.items()}, dict(a.meta, trait="ortho"))
    c.tensors["response"][:, 0] = a.tensors["response"][:, 1]  # c = (y, -x, 0...) is orthogonal to a2 = (x, y, 0...)
    c.tensors["response"][:, 1] = -a.tensors["response"][:, 0]
    c.tensors["response"][:, 2:] = 0
    a2 = PersonaVector({"response": a.tensors["response"].clone()}, dict(a.meta))
    a2.tensors["response"][:, 2:] = 0
    m = algebra.cosine_matrix([a2, b, c], layer=3)
    assert m.shape == (3, 3) and torch.allclose(m, m.T)
    assert torch.allclose(torch.diag(m), torch.ones(3), atol=1e-6)
    assert m[0, 2].abs() < 1e-6  # (x, y) · (y, -x) = 0
    full = algebra.cosine_by_layer([a, b])
    assert full.shape == (N_LAYERS + 1, 2, 2) and torch.allclose(full[:, 0, 1], -torch.ones(N_LAYERS + 1))
    with pytest.raises(VectorError, match="out of range"):
        algebra.cosine_matrix([a, b], layer=N_LAYERS + 1)


# ---- the command line ----------------------------------------------------------------------------------------
@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name, seed in (("evil", 0), ("humorous", 1), ("sycophantic", 2)):
        out[name] = vec(name, seed, best_layer=4).save(tmp_path / f"{name}.pv.safetensors")
    out["small"] = vec("small", 3, n_layers=4).save(tmp_path / "small.pv.safetensors")
    return out


def test_cli_algebra_and_compare_write_files(files: dict[str, Path], tmp_path: Path) -> None:
    runner = CliRunner(env={"COLUMNS": "200"})
    before = {p: p.read_bytes() for p in files.values()}
    res = runner.invoke(app, ["vector", "sub", str(files["evil"]), str(files["humorous"]), "--out",
                              str(tmp_path / "d.pv.safetensors")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["vector", "scale", str(tmp_path / "d.pv.safetensors"), "--by", "2", "--out",
                              str(tmp_path / "d2.pv.safetensors")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["vector", "normalize", str(files["evil"]), "--out", str(tmp_path / "n.pv.safetensors")])
    assert res.exit_code == 0, res.output
    d2 = PersonaVector.load(tmp_path / "d2.pv.safetensors")
    e, h = PersonaVector.load(files["evil"]), PersonaVector.load(files["humorous"])
    torch.testing.assert_close(d2.tensors["response"], 2 * (e.tensors["response"] - h.tensors["response"]))

    png = tmp_path / "heat.png"
    res = runner.invoke(app, ["vector", "compare", str(files["evil"]), str(files["humorous"]),
                              str(files["sycophantic"]), "--layer", "2,4", "--out", str(png), "--by-layer"])
    assert res.exit_code == 0, res.output
    assert "cosine similarity at layer 4" in res.output and "humorous" in res.output
    cos = algebra.cosine_matrix([e, h], 2)
    assert f"{float(cos[0, 1]):+.3f}" in res.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {p: p.read_bytes() for p in files.values()} == before  # inputs untouched


def test_cli_refuses_vectors_of_another_shape_with_one_line(files: dict[str, Path], tmp_path: Path) -> None:
    target = tmp_path / "sum.pv.safetensors"
    proc = subprocess.run([str(Path(sys.executable).with_name("personavec")), "vector", "add", str(files["evil"]),
                           str(files["small"]), "--out", str(target)], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"}, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "shape [5, 16]" in lines[0], proc.stderr
    assert not target.exists() and not list(tmp_path.glob(".sum*"))
