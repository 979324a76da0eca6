"""`--engine` / `--tensor-parallel-size` on the generation-bound commands, with the Hugging Face engine (the
reference) in every environment: `--engine hf` gives exactly the default's outputs, steered answers equal those of
the hooks the commands used before engines existed, the engine is recorded where the commands keep provenance
(and an hf run folder keeps the settings hash it had before, so older folders resume), the engine is built once
per command and not at all when nothing is generated, and an engine that cannot run fails in one line with exit
status 2. The vLLM engine itself: tests/test_vllm_engine.py (in .venv-vllm)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import Cli
from typer.testing import CliRunner

import personavec as pv
import personavec.engines
import personavec.models
from personavec.chat import encode_chat, messages_for
from personavec.cli import app
from personavec.engines import EngineError, HFEngine, LazyEngine, open_engine
from personavec.errors import PersonavecError
from personavec.evaluate import Condition, EvalSettings, evaluate
from personavec.generation import generate, generate_ids
from personavec.traits import load_trait

HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.fixture(scope="module")
def vec_file(model: pv.Model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded random 'evil' vector for the session's model, layer 10 chosen."""
    g = torch.Generator().manual_seed(0)
    tensors = {p: torch.randn(model.n_layers + 1, model.hidden_size, generator=g) * 0.2
               for p in ("response", "prompt", "last_prompt")}
    meta = {"trait": "evil", "model_id": model.model_id, "fingerprint": model.fingerprint, "best_layer": 10}
    return pv.PersonaVector(tensors, meta).save(tmp_path_factory.mktemp("engines") / "evil.pv.safetensors")


class Stub:
    """An engine object other than hf (delegating to the Hugging Face engine) that counts its calls."""

    name = "stub"
    tensor_parallel_size = 2

    def __init__(self, model: pv.Model) -> None:
        self.inner = HFEngine(model)
        self.calls = 0
        self.closed = False

    def generate_ids(self, prompts: list[list[int]], **kwargs: Any) -> list[list[int]]:
        self.calls += 1
        return self.inner.generate_ids(prompts, **kwargs)

    def generate(self, conversations: list[Any], **kwargs: Any) -> list[str]:
        self.calls += 1
        return self.inner.generate(conversations, **kwargs)

    def close(self) -> None:
        self.closed = True


def _files(folder: Path, *names: str) -> dict[str, str]:
    return {n: (folder / n).read_text() for n in names}


# ---- --engine hf is the default, and the steering it carries is the hooks' -----------------------------------
def test_generate_engine_hf_equals_default_and_hooks(cli: Cli, model: pv.Model, vec_file: Path) -> None:
    args = ["generate", "--json", "--vector", str(vec_file), "--coef", "-4", "--coef", "0", "--coef", "4",
            "--max-new-tokens", "6", "Say hello.", "Name a colour."]
    default = json.loads(cli(*args).stdout)
    assert json.loads(cli(*args, "--engine", "hf", "--tensor-parallel-size", "1").stdout) == default
    # what `generate` answered before engines existed: generation under the vector's hooks
    vec = pv.load_vector(vec_file)
    convs = [messages_for(p) for p in ("Say hello.", "Name a colour.")]
    for c in (-4.0, 0.0, 4.0):
        with vec.steer(model, layer=10, coef=c):
            expected = generate(model, convs, max_new_tokens=6)
        assert [p["answers"][[a["coef"] for a in p["answers"]].index(c)]["text"] for p in default["prompts"]] == expected
    assert default["prompts"][0]["answers"][0]["text"] != default["prompts"][0]["answers"][1]["text"]


def test_eval_engine_hf_equals_default(cli: Cli, model: pv.Model, vec_file: Path, tmp_path: Path) -> None:
    runs = {}
    for name, extra in (("default", []), ("hf", ["--engine", "hf"])):
        runs[name] = tmp_path / name
        cli("eval", "--trait", "evil", "--out", str(runs[name]), "--vector", str(vec_file), "--coef", "0,4",
            "--n-questions", "1", "--max-new-tokens", "6", *extra)
    names = ("cells.csv", "answers.jsonl", "measure.jsonl")
    assert _files(runs["default"], *names) == _files(runs["hf"], *names)
    manifests = [json.loads((runs[n] / "manifest.json").read_text()) for n in ("default", "hf")]
    # hf adds nothing to a run's settings: the hash is what it was before engines, so old folders resume
    assert manifests[0]["settings_hash"] == manifests[1]["settings_hash"]
    assert "engine" not in manifests[0]["settings"]
    # the steered cell's answer is the one generated under the vector's hooks
    vec = pv.load_vector(vec_file)
    question = load_trait("evil").trait.evaluation_questions[0]
    with vec.steer(model, layer=10, coef=4.0):
        expected = generate_ids(model, [encode_chat(model.tokenizer, messages_for(question))], max_new_tokens=6)
    rows = [json.loads(line) for line in (runs["default"] / "answers.jsonl").read_text().splitlines()]
    steered = next(r for r in rows if r["cell"] == "L10_c+4")
    assert steered["answer"] == model.tokenizer.decode(expected[0], skip_special_tokens=True).strip()


# ---- the engine is recorded, built once, and only when something is generated --------------------------------
def test_other_engine_recorded_in_run_and_vector(model: pv.Model, vec_file: Path, tmp_path: Path) -> None:
    stub = Stub(model)
    vec = pv.extract(model, "evil", run_dir=tmp_path / "x.run", n_questions=1, n_pairs=1, max_new_tokens=4,
                     engine=stub)  # type: ignore[arg-type]
    assert vec.meta["engine"] == {"name": "stub", "tensor_parallel_size": 2}
    manifest = json.loads((tmp_path / "x.run" / "manifest.json").read_text())
    assert manifest["settings"]["engine"] == {"name": "stub", "tensor_parallel_size": 2}
    assert stub.calls == 1 and not stub.closed  # the caller's engine stays the caller's
    # an hf extraction records hf in the vector (its run folder's settings stay as before)
    hf_vec = pv.extract(model, "evil", run_dir=tmp_path / "h.run", n_questions=1, n_pairs=1, max_new_tokens=4)
    assert hf_vec.meta["engine"] == {"name": "hf", "tensor_parallel_size": 1}
    # same generator underneath: the same vector
    assert torch.equal(vec.tensors["response"], hf_vec.tensors["response"])


def test_engine_built_lazily_once_and_closed(model: pv.Model, vec_file: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[Stub] = []

    def make(m: pv.Model, name: str = "hf", **options: Any) -> Stub:
        built.append(Stub(m))
        return built[-1]

    monkeypatch.setattr(personavec.engines, "make_engine", make)
    vec = pv.load_vector(vec_file)
    settings = EvalSettings(n_questions=1, max_new_tokens=4)
    conditions = [Condition(10, c) for c in (0.0, 4.0)]
    with open_engine(model, "hf") as eng:
        assert isinstance(eng, LazyEngine) and not built  # nothing started before the first generation
        evaluate(model, "evil", vector=vec, conditions=conditions, settings=settings, run_dir=tmp_path / "e",
                 engine=eng)
    assert len(built) == 1 and built[0].calls == 2 and built[0].closed  # one engine for every cell
    with open_engine(model, "hf") as eng:  # resumed: every cell is stored, so no engine is built
        evaluate(model, "evil", vector=vec, conditions=conditions, settings=settings, run_dir=tmp_path / "e",
                 engine=eng)
    assert len(built) == 1


def test_screen_full_mode_records_engine_and_keeps_hf_cache(model: pv.Model, vec_file: Path, tmp_path: Path) -> None:
    from personavec.screen import screen
    from personavec.screening.score import AnswerCache

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]}) + "\n"
                            for q, a in (("Hi?", "Hello there."), ("Colour?", "Blue."))))
    vec = pv.load_vector(vec_file)
    stub = Stub(model)
    common: dict[str, Any] = {"max_new_tokens": 4, "histograms": False, "cache": tmp_path / "c.sqlite"}
    res = screen(model, data, [vec], tmp_path / "s.csv", engine=stub, **common)  # type: ignore[arg-type]
    hf = screen(model, data, [vec], tmp_path / "h.csv", **common)
    assert res.summary.engine == {"name": "stub", "tensor_parallel_size": 2} and stub.calls == 1
    assert hf.summary.engine == {"name": "hf", "tensor_parallel_size": 1}
    assert (tmp_path / "s.csv").read_text() == (tmp_path / "h.csv").read_text()
    manifest = json.loads((tmp_path / "s.csv.run" / "manifest.json").read_text())
    assert manifest["settings"]["engine"]["name"] == "stub"
    # hf cache keys are those from before engines; another engine's answers are kept apart
    assert AnswerCache.key("f", 4, [1, 2]) != AnswerCache.key("f", 4, [1, 2], "vllm")
    with pytest.raises(EngineError, match="--ray"):
        screen(model, data, [vec], tmp_path / "r.csv", engine=Stub(model), ray="local",  # type: ignore[arg-type]
               **common)


# ---- an engine that cannot run: one line, exit status 2, before the model is loaded --------------------------
def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "personavec.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def _one_error_line(proc: subprocess.CompletedProcess[str], needle: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], proc.stderr


@pytest.mark.skipif(HAS_VLLM, reason="checks the message shown where vllm is not installed")
def test_engine_vllm_without_vllm_exits_2_naming_the_extra() -> None:
    _one_error_line(_run("generate", "--engine", "vllm", "Say hello."), "pip install personavec[vllm]")


@pytest.mark.parametrize("command", [["generate", "Hi."], ["eval", "--trait", "evil"], ["sweep", "--trait", "evil"],
                                     ["extract", "--trait", "evil"], ["monitor-eval", "--trait", "evil"],
                                     ["data", "elicit", "--trait", "evil"], ["screen", "DATA"],
                                     ["reproduce", "--preset", "smoke"]])
def test_every_generation_command_checks_its_engine_first(command: list[str], tmp_path: Path,
                                                          vec_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each command takes the engine options and refuses bad ones before loading the model (the loader fails
    the test if it is reached); the console script turns the error into one line and exit status 2."""
    def no_load(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the model was loaded before the engine was checked")

    monkeypatch.setattr(personavec.models, "load_model", no_load)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi?"},
                                             {"role": "assistant", "content": "Hello."}]}) + "\n")
    args = [str(data) if a == "DATA" else a for a in command]
    if command[0] in ("sweep", "monitor-eval", "screen"):
        args += ["--vector", str(vec_file)]
    if command[0] != "generate":
        args += ["--out", str(tmp_path / ("o.csv" if command[0] == "screen" else "o"))]
    runner = CliRunner(env={"COLUMNS": "200", "HF_HUB_OFFLINE": "1"})
    for before, extra, needle in (([], ["--engine", "tgi"], "unknown engine 'tgi'"),
                                  ([], ["--tensor-parallel-size", "2"], "applies to the vllm engine"),
                                  ([], ["--gpu-memory-utilization", "0.5"], "applies to the vllm engine"),
                                  ([], ["--engine", "vllm", "--gpu-memory-utilization", "1.5"], "in (0, 1]"),
                                  (["--load-in", "4bit"], ["--engine", "vllm"], "drop --load-in")):
        res = runner.invoke(app, [*before, *args, *extra])
        assert isinstance(res.exception, PersonavecError) and needle in str(res.exception), \
            (res.output, res.exception)
    assert not (tmp_path / "o").exists()
