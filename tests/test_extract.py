"""The extraction pipeline on the real embedded model: shapes, provenance, resume, and that the vector
steers the trait on evaluation questions it never saw."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import personavec as pv
from personavec.chat import messages_for
from personavec.errors import PersonavecError, RunError
from personavec.io import read_jsonl
from personavec.judges import ContrastJudge, JudgeItem


def test_vector_shape_and_provenance(model: pv.Model, evil_run) -> None:
    vec, run = evil_run
    assert set(vec.tensors) == {"response", "prompt", "last_prompt"}
    for t in vec.tensors.values():
        assert tuple(t.shape) == (model.n_layers + 1, model.hidden_size)
    meta = vec.meta
    assert meta["fingerprint"] == model.fingerprint and meta["trait"] == "evil"
    assert meta["trait_sha256"] == pv.load_trait("evil").sha256
    assert meta["judge"] == "contrast" and meta["threshold"] == 0.0
    c = meta["counts"]
    assert c["positive_total"] == c["negative_total"] == 25
    assert 0 < c["positive_kept"] <= 25 and 0 < c["negative_kept"] <= 25
    # the run folder holds every rollout and score, keyed, plus a manifest
    rows = read_jsonl(run / "rollouts.jsonl")
    scores = {r["key"]: r["score"] for r in read_jsonl(run / "scores.jsonl")}
    assert len(rows) == 50 and set(scores) == {r["key"] for r in rows}
    assert json.loads((run / "manifest.json").read_text())["kind"] == "extract"
    assert (run / "vector.pv.safetensors").exists()


def _mean_contrast(model: pv.Model, judge: ContrastJudge, questions: list[str]) -> float:
    answers = pv.generate(model, [messages_for(q) for q in questions], max_new_tokens=40)
    scores = judge.score_batch([JudgeItem(q, a) for q, a in zip(questions, answers, strict=True)], rubric="")
    assert all(s is not None for s in scores)
    return sum(scores) / len(scores)  # type: ignore[arg-type]


@pytest.mark.slow
def test_steering_moves_the_trait_on_evaluation_questions(model: pv.Model, evil_run) -> None:
    vec, _ = evil_run
    trait = pv.load_trait("evil").trait
    questions = trait.evaluation_questions[:10]  # never used for extraction
    judge = ContrastJudge(model, trait.pairs)
    scores = {}
    for coef in (-2.0, 0.0, 2.0):
        with vec.steer(model, coef=coef):
            scores[coef] = _mean_contrast(model, judge, questions)
    assert scores[-2.0] < scores[0.0] < scores[2.0], scores


def test_interrupted_run_resumes_without_redoing_work(model: pv.Model, tmp_path: Path) -> None:
    run = tmp_path / "run"
    kwargs = dict(run_dir=run, n_questions=2, max_new_tokens=8, batch_size=4)

    def stop_in_second_chunk(task: str, done: int, total: int) -> None:
        if task == "rollouts" and done >= 12:  # inside the second chunk of 8
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pv.extract(model, "evil", progress=stop_in_second_chunk, **kwargs)
    first = read_jsonl(run / "rollouts.jsonl")
    assert len(first) == 8 and not (run / "scores.jsonl").exists()
    seen: list[tuple[str, int, int]] = []
    vec = pv.extract(model, "evil", progress=lambda t, d, n: seen.append((t, d, n)), **kwargs)
    rows = read_jsonl(run / "rollouts.jsonl")
    assert len(rows) == 20 and len({r["key"] for r in rows}) == 20
    assert rows[:8] == first  # finished work kept as it was
    assert min(d for t, d, _ in seen if t == "rollouts") >= 8  # progress restarted from the checkpoint
    assert vec.meta["counts"]["positive_total"] == 10
    # a third call finds everything done: no new rows at all
    pv.extract(model, "evil", **kwargs)
    assert len(read_jsonl(run / "rollouts.jsonl")) == 20 and len(read_jsonl(run / "scores.jsonl")) == 20
    with pytest.raises(RunError, match="max_new_tokens"):
        pv.extract(model, "evil", run_dir=run, n_questions=2, max_new_tokens=9, batch_size=4)


def test_bad_settings(model: pv.Model) -> None:
    for kwargs in ({"n_questions": 0}, {"rollouts": 0}, {"temperature": float("nan")}, {"threshold": float("inf")}):
        with pytest.raises(PersonavecError):
            pv.extract(model, "evil", **kwargs)
