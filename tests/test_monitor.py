"""The monitoring experiment on the real embedded model, tiny budget: graded and many-shot prompts, the
projection read before generation, both trait measures, Pearson r, a calibrated threshold stored in the
vector, resumable run folder, and the `monitor-eval` command."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import Cli, error_line

import personavec as pv
from personavec.capture import Sample
from personavec.chat import encode_chat, encode_response, messages_for
from personavec.errors import PersonavecError, RunError, TraitError, VectorError
from personavec.likelihood import response_logprobs
from personavec.monitor import (
    MonitorSettings,
    MonitorSummary,
    best_threshold,
    calibrate,
    monitor_eval,
    prompt_readings,
    store_calibration,
)
from personavec.projection import directions, project
from personavec.stats import pearson
from personavec.traits import LoadedTrait, load_trait

TINY = MonitorSettings(n_questions=1, max_new_tokens=4, shots=(0, 2), shot_tokens=6, temperature=0.0)


@pytest.fixture(scope="module")
def tiny_run(model: pv.Model, evil_vector: pv.PersonaVector,
             tmp_path_factory: pytest.TempPathFactory) -> tuple[MonitorSummary, Path, list[str]]:
    vec = evil_vector
    folder = tmp_path_factory.mktemp("monitor") / "evil.monitor"
    tasks: list[str] = []
    result = monitor_eval(model, "evil", vec, settings=TINY, run_dir=folder,
                          progress=lambda task, done, total: tasks.append(task))
    return result, folder, tasks


def test_points_measures_and_outputs(tiny_run: tuple[MonitorSummary, Path, list[str]], model: pv.Model) -> None:
    result, folder, tasks = tiny_run
    trait = load_trait("evil").trait
    points = [json.loads(line) for line in (folder / "points.jsonl").read_text().splitlines()]
    assert len(points) == result.n_points == len(trait.graded_prompts) + 2  # 8 graded + 0- and 2-shot
    layer = result.layer
    for p in points:
        assert p["question"] == trait.evaluation_questions[0]
        assert len(p["profile"]) == model.n_layers and p["projection"] == p["profile"][layer - 1]
        assert math.isfinite(p["projection"]) and p["trait_score"] is not None and math.isfinite(p["judge_free"])
        assert len(p["answers"]) == len(p["trait_scores"]) == len(p["response_projections"]) == 1
    many = {p["level"]: p for p in points if p["condition"] == "many_shot"}
    assert many[2]["prompt_tokens"] > many[0]["prompt_tokens"]
    # many-shot examples come from extraction questions under positive prompts, never evaluation questions
    shots = [json.loads(line) for line in (folder / "shots.jsonl").read_text().splitlines()]
    assert len(shots) == 2
    for s in shots:
        assert s["question"] in trait.extraction_questions and s["question"] not in trait.evaluation_questions
        assert s["system"] in [pair.positive for pair in trait.pairs]
    for measure in ("trait_score", "judge_free"):
        assert set(result.pearson[measure]) == {"overall", "graded", "many_shot"}
        r = result.pearson[measure]["graded"]
        assert r is None or -1.0 <= r <= 1.0
    assert len(result.levels) == 10 and len(result.layer_profile["trait_score"]["overall"]) == model.n_layers
    meta = result.monitor_meta
    assert meta["layer"] == layer and meta["position"] == "last_prompt" and meta["judge"] == "contrast"
    for name in ("results.json", "results.csv", "monitor.png", "manifest.json", "reference.jsonl"):
        assert (folder / name).stat().st_size > 0
    assert (folder / "monitor.png").read_bytes()[:4] == b"\x89PNG"
    assert len((folder / "results.csv").read_text().splitlines()) == len(points) + 1
    assert "answers" in tasks and "points" in tasks


def test_rerun_resumes_and_refuses_other_settings(tiny_run: tuple[MonitorSummary, Path, list[str]], model: pv.Model,
                                                  evil_vector: pv.PersonaVector) -> None:
    result, folder, _ = tiny_run
    vec = evil_vector
    lines = (folder / "points.jsonl").read_text()
    tasks: list[str] = []
    again = monitor_eval(model, "evil", vec, settings=TINY, run_dir=folder,
                         progress=lambda task, done, total: tasks.append(task))
    assert "answers" not in tasks and "shot examples" not in tasks and "references" not in tasks
    assert (folder / "points.jsonl").read_text() == lines
    assert again.pearson == result.pearson
    with pytest.raises(RunError, match="max_new_tokens"):
        monitor_eval(model, "evil", vec, settings=MonitorSettings(n_questions=1, max_new_tokens=5, shots=(0, 2),
                                                                  shot_tokens=6, temperature=0.0), run_dir=folder)


def test_readings_agree_with_projection_and_likelihood(model32: pv.Model) -> None:
    """The cached prompt-then-continuation readings equal the cache-free projection API and likelihood. In
    float32: there the two paths agree to rounding; in bfloat16 a padded prefill plus cached steps and one
    cache-free forward round differently (0.074 nats/token apart on this prompt:
    benchmarks/results/test_bf16_failures_a4689b0.log)."""
    model = model32
    g = torch.Generator().manual_seed(3)
    vec = pv.PersonaVector(tensors={"response": torch.randn(model.n_layers + 1, model.hidden_size, generator=g)},
                           meta={"best_layer": 15, "fingerprint": model.fingerprint})
    tok = model.tokenizer
    prompt = encode_chat(tok, messages_for("How should I treat my neighbours?", "You are a helpful assistant."))
    conts = [encode_response(tok, "Be kind to them and say hello."), [], encode_response(tok, "Ignore them.")]
    dirs = directions({f"L{ly}": vec for ly in (5, 15, 30)}, {"L5": 5, "L15": 15, "L30": 30})
    profile, lps, projs = prompt_readings(model, prompt, conts, dirs, "L15")
    ref = project(model, [Sample(prompt, c) for c in conts], {"v": vec})["v"]
    scale = float(ref["last_prompt"].abs().max())
    assert profile[1] == pytest.approx(float(ref["last_prompt"][0]), abs=1e-3 * scale)
    assert lps[1] is None and projs[1] is None
    full = response_logprobs(model, [Sample(prompt, c) for c in conts])
    for k in (0, 2):
        assert projs[k] == pytest.approx(float(ref["response"][k]), abs=1e-3 * scale)
        assert lps[k] == pytest.approx(full[k], abs=1e-3)
    # one continuation per batch reads the same as both in one padded batch
    together = prompt_readings(model32, prompt, conts, dirs, "L15")
    alone = prompt_readings(model32, prompt, conts, dirs, "L15", batch_size=1)
    assert alone[0] == pytest.approx(together[0], abs=1e-4)
    for k in (0, 2):
        assert alone[1][k] == pytest.approx(together[1][k], abs=1e-4)
        assert alone[2][k] == pytest.approx(together[2][k], abs=1e-3)


def test_statistics() -> None:
    xs = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert pearson(xs, [2 * x + 1 for x in xs]) == pytest.approx(1.0)
    assert pearson(xs, [-x for x in xs]) == pytest.approx(-1.0)
    assert pearson(xs, [1.0, 3.0, 2.0, 5.0, 4.0]) == pytest.approx(0.8)
    assert pearson(xs, [1.0] * 5) is None and pearson([1.0, 2.0], [1.0, 2.0]) is None
    assert pearson([1.0, 2.0, 3.0, None, float("nan")], [1.0, 2.0, 3.5, 4.0, 5.0]) == pytest.approx(
        pearson([1.0, 2.0, 3.0], [1.0, 2.0, 3.5]))
    t, acc = best_threshold([0.1, 0.2, 0.9, 1.0], [False, False, True, True])
    assert acc == 1.0 and t is not None and 0.2 < t < 0.9
    assert best_threshold([0.1, 0.2], [True, True]) == (None, None)
    rows = [{"question_idx": q, "trait_scores": [1.0 if v > 0 else -1.0], "v": [v]}
            for q, v in enumerate([-3.0, -2.0, 2.5, 3.0, -1.0, 1.5])]
    cal = calibrate(rows, lambda r: r["v"], 0.0)
    assert cal.balanced_accuracy == 1.0 and cal.heldout_balanced_accuracy == 1.0 and cal.n_expressing == 3


def test_store_calibration(tiny_run: tuple[MonitorSummary, Path, list[str]], evil_vector: pv.PersonaVector,
                           tmp_path: Path) -> None:
    result, _, _ = tiny_run
    vec = evil_vector
    src = vec.save(tmp_path / "evil.pv.safetensors")
    before = src.read_bytes()
    copy = store_calibration(src, result, tmp_path / "calibrated.pv.safetensors")
    assert src.read_bytes() == before  # the input is untouched when an output path is given
    meta = pv.load_vector(copy).meta["monitor"]
    assert meta["layer"] == result.layer and meta["threshold"] == result.monitor_meta["threshold"]
    store_calibration(src, result)  # in place, atomically
    assert pv.load_vector(src).meta["monitor"] == meta and not list(tmp_path.glob(".*.tmp"))
    other = vec.with_meta()
    other.tensors = {k: v + 1 for k, v in vec.tensors.items()}
    other.save(tmp_path / "other.pv.safetensors")
    with pytest.raises(VectorError, match="other directions"):
        store_calibration(tmp_path / "other.pv.safetensors", result)


def test_bad_inputs(model: pv.Model, evil_vector: pv.PersonaVector) -> None:
    vec = evil_vector
    loaded = load_trait("evil")
    bare = LoadedTrait(loaded.trait.model_copy(update={"graded_prompts": []}), loaded.source, loaded.sha256)
    with pytest.raises(TraitError, match="graded_prompts"):
        monitor_eval(model, bare, vec, settings=MonitorSettings(n_questions=1, shots=(0,)))
    with pytest.raises(PersonavecError, match="rollouts 1"):
        monitor_eval(model, "evil", vec, settings=MonitorSettings(rollouts=2, temperature=0.0))
    with pytest.raises(PersonavecError, match="shots"):
        monitor_eval(model, "evil", vec, settings=MonitorSettings(shots=(-1,)))
    with pytest.raises(VectorError, match="not 'impolite'"):
        monitor_eval(model, "impolite", vec, settings=TINY)


def test_cli_resumes_and_writes_threshold(cli: Cli, tiny_run: tuple[MonitorSummary, Path, list[str]],
                                          evil_vector: pv.PersonaVector, tmp_path: Path) -> None:
    result, folder, _ = tiny_run
    vec = evil_vector
    path = vec.save(tmp_path / "evil.pv.safetensors")
    run_dir = tmp_path / "run"
    shutil.copytree(folder, run_dir)  # a finished run: the command only reads, prints and writes the threshold
    args = ["monitor-eval", "--vector", str(path), "--trait", "evil", "--out", str(run_dir), "--n-questions", "1",
            "--max-new-tokens", "4", "--shots", "0,2", "--shot-tokens", "6", "--temperature", "0",
            "--write-threshold"]
    proc = cli(*args)
    assert "Pearson r" in proc.stdout and "flag threshold" in proc.stdout
    assert pv.load_vector(path).meta["monitor"]["threshold"] == result.monitor_meta["threshold"]
    assert "rollouts 1" in error_line(cli(*args[:-1], "--rollouts", "2", ok=False))
