"""The extraction pipeline on the real embedded model: shapes, provenance and resume; and that steering with
an evil vector it extracted (the committed one the session shares) moves the answers to evaluation questions
it never saw along the vector."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import personavec as pv
from personavec.capture import Sample
from personavec.chat import encode_chat, messages_for
from personavec.errors import PersonavecError, RunError
from personavec.generation import generate_ids
from personavec.io import read_jsonl
from personavec.projection import project


def _answer_readings(model: pv.Model, vec: pv.PersonaVector, steer_with: pv.PersonaVector, coef: float,
                     prompts: list[list[int]], layer: int) -> torch.Tensor:
    """Answers generated under `steer_with` at `coef`, then read unsteered: their mean response activation at
    `layer`, projected on the evil vector's unit direction (one value per answer)."""
    with steer_with.steer(model, coef=coef, layer=layer):
        answers = generate_ids(model, prompts, max_new_tokens=40)
    samples = [Sample(prompt=p, response=a) for p, a in zip(prompts, answers, strict=True)]
    return project(model, samples, {"evil": vec}, layers=layer)["evil"]["response"]


@pytest.mark.slow
def test_steering_moves_the_answers_along_the_vector(model: pv.Model, evil_vector: pv.PersonaVector) -> None:
    """What steering writes, not what it does to the activations while it writes: answers to evaluation
    questions (never used for extraction) generated at −2 / 0 / +2 read, unsteered, in that order along the
    vector, and a random direction of the same per-layer norm moves them less than a third as far. (Judging
    these 40-token answers with the contrast judge was tried and is too noisy: with this vector its means
    were not ordered at ±2 on layers 18 and 22 or at ±4 on layers 14 and 18; `test_reference.py` checks the trait itself with
    the authored reference answers.) The reading is the vector's own, so this checks the steering path, not the
    trait. Its settings were seen before they were fixed: these 10 questions with 40-token answers were tried
    first and passed; 8 questions with 24-token answers, tried next to save time, failed the control check
    (the random direction moved the readings half as far as the vector), so the test keeps the first setting."""
    questions = pv.load_trait("evil").trait.evaluation_questions[:10]
    prompts = [encode_chat(model.tokenizer, messages_for(q)) for q in questions]
    own = {c: float(_answer_readings(model, evil_vector, evil_vector, c, prompts, 18).mean())
           for c in (-2.0, 0.0, 2.0)}
    rnd = pv.random_like(evil_vector, 0)
    ctrl = {c: float(_answer_readings(model, evil_vector, rnd, c, prompts, 18).mean()) for c in (-2.0, 2.0)}
    assert own[-2.0] < own[0.0] < own[2.0], own
    assert own[2.0] - own[-2.0] > 3 * abs(ctrl[2.0] - ctrl[-2.0]), (own, ctrl)


KWARGS: dict[str, Any] = dict(n_questions=2, max_new_tokens=8, batch_size=4)


@dataclass
class Resumed:
    run: Path
    first: list[dict[str, Any]]  # the rollouts stored before the interruption
    scored_before: bool  # whether scores.jsonl existed after the interruption
    seen: list[tuple[str, int, int]]  # the resumed call's progress reports
    vector: pv.PersonaVector


@pytest.fixture(scope="module")
def resumed(model: pv.Model, tmp_path_factory: pytest.TempPathFactory) -> Resumed:
    """A small extraction interrupted inside its second chunk of rollouts, then run again to the end."""
    run = tmp_path_factory.mktemp("extract") / "run"

    def stop_in_second_chunk(task: str, done: int, total: int) -> None:
        if task == "rollouts" and done >= 12:  # inside the second chunk of 8
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pv.extract(model, "evil", run_dir=run, progress=stop_in_second_chunk, **KWARGS)
    first, scored_before = read_jsonl(run / "rollouts.jsonl"), (run / "scores.jsonl").exists()
    seen: list[tuple[str, int, int]] = []
    vec = pv.extract(model, "evil", run_dir=run, progress=lambda t, d, n: seen.append((t, d, n)), **KWARGS)
    return Resumed(run, first, scored_before, seen, vec)


def test_vector_shape_and_provenance(model: pv.Model, resumed: Resumed) -> None:
    vec, run = resumed.vector, resumed.run
    assert set(vec.tensors) == {"response", "prompt", "last_prompt"}
    for t in vec.tensors.values():
        assert tuple(t.shape) == (model.n_layers + 1, model.hidden_size)
    meta = vec.meta
    assert meta["fingerprint"] == model.fingerprint and meta["trait"] == "evil"
    assert meta["trait_sha256"] == pv.load_trait("evil").sha256
    assert meta["judge"] == "contrast" and meta["threshold"] == 0.0
    c = meta["counts"]
    assert c["positive_total"] == c["negative_total"] == 10
    assert 0 < c["positive_kept"] <= 10 and 0 < c["negative_kept"] <= 10
    # the run folder holds every rollout and score, keyed, plus a manifest
    rows = read_jsonl(run / "rollouts.jsonl")
    scores = {r["key"]: r["score"] for r in read_jsonl(run / "scores.jsonl")}
    assert len(rows) == 20 and set(scores) == {r["key"] for r in rows}
    assert json.loads((run / "manifest.json").read_text())["kind"] == "extract"
    assert (run / "vector.pv.safetensors").exists()


def test_interrupted_run_resumes_without_redoing_work(model: pv.Model, resumed: Resumed) -> None:
    run, first, seen = resumed.run, resumed.first, resumed.seen
    assert len(first) == 8 and not resumed.scored_before
    rows = read_jsonl(run / "rollouts.jsonl")
    assert len(rows) == 20 and len({r["key"] for r in rows}) == 20
    assert rows[:8] == first  # finished work kept as it was
    assert min(d for t, d, _ in seen if t == "rollouts") >= 8  # progress restarted from the checkpoint
    # a third call finds everything done: no new rows at all
    pv.extract(model, "evil", run_dir=run, **KWARGS)
    assert len(read_jsonl(run / "rollouts.jsonl")) == 20 and len(read_jsonl(run / "scores.jsonl")) == 20
    with pytest.raises(RunError, match="max_new_tokens"):
        pv.extract(model, "evil", run_dir=run, n_questions=2, max_new_tokens=9, batch_size=4)


def test_bad_settings(model: pv.Model) -> None:
    for kwargs in ({"n_questions": 0}, {"rollouts": 0}, {"temperature": float("nan")}, {"threshold": float("inf")}):
        with pytest.raises(PersonavecError):
            pv.extract(model, "evil", **kwargs)
