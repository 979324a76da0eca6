"""lm-evaluation-harness multiple-choice tasks on the loaded model, in-process (`personavec.capability.lm_eval_tasks`)
and in the reproduce capability stage: a tiny task (a task YAML over a JSONL file written here; nothing
downloaded) whose per-item log-likelihoods and accuracy are the project's own likelihood of the same tokens,
steered at every position or not; the stage's per-item records, intervals and rerun; and the one-line skip
reasons (unknown task, data not cached offline, no lm-eval) with perplexity and quiz still measured."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from lm_eval_task import ITEMS as TINY_ITEMS
from lm_eval_task import write_task as write_tiny_task

import personavec as pv
from personavec.capability import lm_eval_tasks
from personavec.capability.lm_eval_tasks import LmEvalUnavailable, load_tasks, run_tasks
from personavec.capture import Sample
from personavec.likelihood import response_logprobs
from personavec.report.reproduce_page import capability_section
from personavec.reproduce import capability as stage
from personavec.reproduce import preset, with_overrides
from personavec.reproduce.context import Context
from personavec.reproduce.extraction import ExtractedVector, ExtractionResult
from personavec.reproduce.records import from_json, interval, to_json
from personavec.reproduce.steering import SteeringResult, SteeringTrait, heldout
from personavec.reproduce.targets import capability_targets

pytest.importorskip("lm_eval")

COEF = 8.0  # at every position of the vector's layer: enough to move the embedded model's likelihoods
TASK = "personavec_tiny_mc_cap"
ITEMS = TINY_ITEMS[:5] + TINY_ITEMS[6:7]  # six items: the tests size batches and limits on them


def write_task(folder: Path, name: str = TASK, dataset: str = "json") -> Path:
    return write_tiny_task(folder, name, ITEMS, dataset)


def own_loglikelihoods(model: pv.Model) -> list[list[float]]:
    """Per item, each choice's summed log p(" choice" | "Question: …\\nAnswer:") by `response_logprobs`, with
    the tokens lm-eval's Hugging Face model scores (the whole string encoded, the context's tokens cut off)."""
    tok = model.tokenizer
    samples = []
    for q, *choices in ITEMS:
        context = f"Question: {q}\nAnswer:"
        ctx = tok(context).input_ids
        for choice in choices:
            whole = tok(context + " " + choice).input_ids
            assert whole[:len(ctx)] == ctx
            samples.append(Sample(ctx, whole[len(ctx):]))
    means = response_logprobs(model, samples, batch_size=1)
    sums = [float(m or 0.0) * len(s.response) for m, s in zip(means, samples, strict=True)]
    return [sums[2 * i:2 * i + 2] for i in range(len(ITEMS))]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_task(tmp_path_factory.mktemp("lm_eval_task"))


@pytest.fixture(scope="module")
def loaded(task_dir: Path) -> lm_eval_tasks.LoadedTasks:
    return load_tasks([TASK], include_path=task_dir, include_defaults=False)


def test_per_item_accuracy_is_the_projects_own_likelihood(model32: pv.Model, loaded: lm_eval_tasks.LoadedTasks
                                                          ) -> None:
    """lm-eval's per-item acc is the argmax of the summed log-likelihoods personavec computes for the same
    tokens; the result is typed, per item, in task order. In float32: two code paths agree to rounding there
    (in bfloat16 the sums differed by up to 0.34 nats: benchmarks/results/test_bf16_failures_a4689b0.log)."""
    model = model32
    res = run_tasks(model, loaded, batch_size=2)
    items = res.tasks[TASK]
    assert items.subtasks == [TASK] and items.item_ids == [f"{TASK}/{i}" for i in range(len(ITEMS))]
    own = own_loglikelihoods(model)
    assert [x for item in items.loglikelihoods for x in item] == pytest.approx([x for item in own for x in item],
                                                                              abs=1e-3)
    expected = [float(good > evil) for good, evil in own]  # label 0 (the kind answer) is right
    assert all(abs(good - evil) > 0.1 for good, evil in own)  # no near-tie for the tolerance above to flip
    assert items.correct == expected and items.accuracy == pytest.approx(sum(expected) / len(ITEMS))
    assert res.limit is None and res.lm_eval_version

    limited = run_tasks(model, loaded, limit=3, batch_size=2).tasks[TASK]  # the same loaded tasks, reused
    assert limited.item_ids == items.item_ids[:3] and limited.correct == items.correct[:3]


def test_steering_every_position_moves_the_items(model32: pv.Model, loaded: lm_eval_tasks.LoadedTasks,
                                                 evil_vector: pv.PersonaVector) -> None:
    """Under `vec.steer(..., positions="all")` lm-eval scores the steered model: the same numbers as the
    project's likelihood under the same hooks, and far from the unsteered ones (float32, as above)."""
    vec, model = evil_vector, model32
    plain = run_tasks(model, loaded, batch_size=2).tasks[TASK].loglikelihoods
    with vec.steer(model, coef=COEF, positions="all"):
        steered = run_tasks(model, loaded, batch_size=2).tasks[TASK].loglikelihoods
        own = own_loglikelihoods(model)
    flat, flat_steered = [x for i in plain for x in i], [x for i in steered for x in i]
    assert flat_steered == pytest.approx([x for i in own for x in i], abs=1e-3)
    assert max(abs(a - b) for a, b in zip(flat, flat_steered, strict=True)) > 0.5


def test_unloadable_tasks_are_one_line_errors(task_dir: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(LmEvalUnavailable, match=r"^lm-eval has no task named 'no_such_task_xyz'") as info:
        load_tasks(["no_such_task_xyz"], include_path=task_dir, include_defaults=False)
    assert "\n" not in str(info.value)
    # a task over a hub data set that is not in the cache, offline (HF_HUB_OFFLINE=1 as the libraries read it at
    # import): fails at once, saying what to do
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    hub = write_task(tmp_path / "hub", name="personavec_hub_mc", dataset="personavec-test/no-such-dataset")
    with pytest.raises(LmEvalUnavailable, match=r"could not load its data .*download the data once") as info:
        load_tasks(["personavec_hub_mc"], include_path=hub, include_defaults=False)
    assert "\n" not in str(info.value)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm-eval were not installed
    with pytest.raises(LmEvalUnavailable, match=r"pip install 'personavec\[capability\]'"):
        load_tasks([TASK], include_path=task_dir)


# ---- the reproduce capability stage -------------------------------------------------------------------------
def stage_context(model: pv.Model, vec: pv.PersonaVector, folder: Path, tasks: str, include: Path) -> Context:
    """What run_capability reads: the settings, a saved vector (the extract stage's result) and a chosen layer and
    coefficient (the sweep stage's), made by hand."""
    folder.mkdir(parents=True, exist_ok=True)
    vec.save(folder / "evil.pv.safetensors")
    settings = with_overrides(preset("smoke"), ["capability.n_texts=2", "capability.n_quiz=2",
                                                f"capability.lm_eval_tasks={tasks}",
                                                f"capability.lm_eval_include={include}"])
    extracted = ExtractionResult({"evil": ExtractedVector(
        trait="evil", path="evil.pv.safetensors", digest=vec.digest(), judge="contrast", threshold=50.0,
        positive_kept=1, positive_total=1, negative_kept=1, negative_total=1)})
    chosen = SteeringResult({"evil": SteeringTrait(
        trait="evil", layer=vec.layer, coef=COEF, criterion="by hand", selection_change=0.0, selection_questions=[0],
        report_questions=[1], heldout=heldout([1.0, 1.0], {}, {}), rises={}, select_dir="", report_dir="")})
    return Context(model=model, settings=settings, folder=folder, traits={},
                   results={"extract": extracted, "sweep": chosen})


def test_stage_records_lm_eval_items_and_intervals(model: pv.Model, evil_vector: pv.PersonaVector,
                                                   task_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    vec = evil_vector
    ctx = stage_context(model, vec, tmp_path / "run", TASK, task_dir)
    res = stage.run_capability(ctx)
    assert res.lm_eval_skipped == "" and res.lm_eval_tasks == (TASK,)
    rows = {r["key"]: r for r in map(json.loads, (ctx.folder / "capability.lm_eval.jsonl").read_text().splitlines())}
    key = f"evil:L{vec.layer}_c{COEF:+g}"
    assert set(rows) == {f"unsteered|{TASK}", f"{key}|{TASK}"}
    base, steered = rows[f"unsteered|{TASK}"]["correct"], rows[f"{key}|{TASK}"]["correct"]
    assert len(base) == len(steered) == len(ITEMS)
    assert rows[f"unsteered|{TASK}"]["items"] == [f"{TASK}/{i}" for i in range(len(ITEMS))]
    m = res.traits["evil"].lm_eval[TASK]
    assert m.base == interval(base) == res.lm_eval_base[TASK] and m.steered == interval(steered)
    assert m.change == interval([s - b for s, b in zip(steered, base, strict=True)])
    # the unsteered items are what the library gives for the unsteered model
    assert base == run_tasks(model, load_tasks([TASK], include_path=task_dir, include_defaults=False),
                             batch_size=2).tasks[TASK].correct
    # perplexity and quiz as before
    assert len(res.base.perplexity) == 2 and len(res.traits["evil"].steered.quiz) == 2

    # a rerun reuses every stored item (lm-eval is not run again) and gives the same result
    def no_run(*_: object, **__: object) -> None:
        raise AssertionError("lm-eval ran again")

    monkeypatch.setattr(stage, "run_tasks", no_run)
    assert stage.run_capability(ctx) == res
    # the result round-trips through JSON; a capability.json written before lm-eval (no such fields) still loads
    assert from_json(stage.CapabilityResult, to_json(res)) == res
    old = to_json(res)
    for f in ("lm_eval_tasks", "lm_eval_base", "lm_eval_skipped"):
        del old[f]
    del old["traits"]["evil"]["lm_eval"]
    legacy = from_json(stage.CapabilityResult, old)
    assert legacy.lm_eval_tasks == () and legacy.traits["evil"].lm_eval == {} and legacy.lm_eval_skipped == ""

    # report and targets: the accuracies with intervals, one drop target per trait and task
    html = capability_section(res)
    assert TASK in html and "every position" in html and m.change.text(3) in html
    lines = [t for t in capability_targets(res, 1.5, 0.05) if TASK in t.name]
    assert len(lines) == 1 and lines[0].met == (-(m.change.mean or 0.0) <= 0.05)
    assert not [t for t in capability_targets(replace(res, lm_eval_skipped="x"), 1.5) if t.name.startswith("acc")
                if t.value != "skipped: x"]


def test_stage_skips_missing_tasks_in_one_line(model: pv.Model, evil_vector: pv.PersonaVector,
                                               task_dir: Path, tmp_path: Path) -> None:
    """An unknown task (the same path as data that cannot be loaded): skipped with the reason, measured once
    (not again per trait), while perplexity and the quiz are measured as always."""
    ctx = stage_context(model, evil_vector, tmp_path / "run", "no_such_task_xyz", task_dir)
    res = stage.run_capability(ctx)
    assert res.lm_eval_skipped.startswith("lm-eval has no task named 'no_such_task_xyz'")
    assert "\n" not in res.lm_eval_skipped
    assert res.lm_eval_base == {} and res.traits["evil"].lm_eval == {}
    assert not (ctx.folder / "capability.lm_eval.jsonl").exists() or \
        not (ctx.folder / "capability.lm_eval.jsonl").read_text().strip()
    assert len(res.base.perplexity) == 2 and len(res.base.quiz) == 2
    assert res.traits["evil"].log_ppl_change.n == 2 and res.traits["evil"].quiz_change.n == 2
    html = capability_section(res)
    assert "skipped: lm-eval has no task named" in html
    skipped = [t for t in capability_targets(res, 1.5) if "no_such_task_xyz" in t.name]
    assert len(skipped) == 1 and skipped[0].met is None and skipped[0].value.startswith("skipped: ")
