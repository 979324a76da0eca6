"""`EvalSettings.generate=False`: the reference measure without answers. Its per-question values are those of a
run that generates (the same steering hooks read it), no answers or coherence are written, old run folders
(without a `generate` key) stay resumable, a judge is refused, and `personavec reproduce`'s rise rule uses it."""

from __future__ import annotations

import importlib
import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import Cli, assert_user_error

import personavec as pv
import personavec.reproduce.steering as steering_mod
from personavec.errors import PersonavecError, RunError
from personavec.evaluate import Cell, Condition, EvalSettings, evaluate
from personavec.io import read_jsonl
from personavec.report import read_cells
from personavec.reproduce.steering import (
    GridCell,
    SteeringResult,
    SteeringTrait,
    heldout,
    select_by_rise,
)

TINY = EvalSettings(n_questions=2, max_new_tokens=4)
CONDITIONS = [Condition(None, 0.0), Condition(18, -1.0), Condition(18, 1.0)]


@pytest.fixture(scope="module")
def both(model: pv.Model, evil_vector: pv.PersonaVector,
         tmp_path_factory: pytest.TempPathFactory) -> dict[bool, tuple[list[Cell], Path]]:
    """The same evaluation (own vector and a random control, steered at layer 18) with and without answers."""
    vec = evil_vector
    root = tmp_path_factory.mktemp("generate")
    out = {}
    for generate in (True, False):
        run = root / f"gen{int(generate)}"
        cells = evaluate(model, "evil", vector=vec, conditions=CONDITIONS, judge="reference",
                         settings=replace(TINY, generate=generate), run_dir=run,
                         controls={"random0": pv.random_like(vec, 0)})
        out[generate] = (cells, run)
    return out


def _values(run: Path) -> dict[tuple[str, int], float]:
    return {(r["cell"], r["question_idx"]): r["value"] for r in read_jsonl(run / "measure.jsonl")}


def test_same_measure_without_answers(both: dict[bool, tuple[list[Cell], Path]]) -> None:
    (with_cells, with_run), (without_cells, without_run) = both[True], both[False]
    gen, nogen = _values(with_run), _values(without_run)
    assert set(gen) == {(c, q) for c in ("base", "L18_c-1", "L18_c+1", "random0:L18_c-1", "random0:L18_c+1")
                        for q in (0, 1)}
    assert nogen == gen  # identical per-question values, steered cells and the control's included
    assert gen[("L18_c+1", 0)] != gen[("base", 0)]  # the steering was on while the measure was read
    assert [(c.control, c.cell, c.trait_mean, c.trait_se, c.n) for c in without_cells] == \
        [(c.control, c.cell, c.trait_mean, c.trait_se, c.n) for c in with_cells]
    # without answers: no answer rows, no coherence
    assert len(read_jsonl(with_run / "answers.jsonl")) == 5 * 2
    assert read_jsonl(without_run / "answers.jsonl") == []
    assert all(c.coherence_source == "fluency" and c.coherence_mean is not None for c in with_cells)
    assert all(c.coherence_source == "none" and c.coherence_mean is None and c.coherence_se is None
               for c in without_cells)
    assert [Cell.from_json(r) for r in read_jsonl(without_run / "cells.jsonl")] == \
        [c for c in without_cells if c.layer is None or c.coef != 0]
    header, rows = read_cells(without_run / "cells.csv")
    assert "coherence_mean" in header and all(r["coherence_mean"] is None for r in rows)
    assert [r["trait_mean"] for r in rows] == pytest.approx([c.trait_mean for c in without_cells], rel=1e-5)


def test_run_identity(model: pv.Model, evil_vector: pv.PersonaVector,
                      both: dict[bool, tuple[list[Cell], Path]]) -> None:
    vec = evil_vector
    (_, with_run), (without_cells, without_run) = both[True], both[False]
    # generate=True keeps the identity of folders written before the setting existed: no key at all
    assert "generate" not in json.loads((with_run / "manifest.json").read_text())["settings"]
    assert json.loads((without_run / "manifest.json").read_text())["settings"]["generate"] is False
    # a rerun computes nothing (every cell is stored); the other setting is another run
    again = evaluate(model, "evil", vector=vec, conditions=CONDITIONS, judge="reference",
                     settings=replace(TINY, generate=False), run_dir=without_run,
                     controls={"random0": pv.random_like(vec, 0)},
                     progress=lambda task, *_: pytest.fail(f"recomputed: {task}") if task != "conditions" else None)
    assert again == without_cells
    with pytest.raises(RunError, match="generate"):
        evaluate(model, "evil", vector=vec, conditions=CONDITIONS, judge="reference",
                 settings=replace(TINY, generate=False), run_dir=with_run,
                 controls={"random0": pv.random_like(vec, 0)})


def test_a_judge_needs_answers(model: pv.Model, cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.import_module("personavec.evaluate"), "generate_ids",
                        lambda *_, **__: pytest.fail("generated answers with --no-generate"))
    with pytest.raises(PersonavecError, match=r"scores generated answers.*needs the reference measure"):
        evaluate(model, "evil", judge="contrast", settings=replace(TINY, generate=False))
    assert_user_error(cli("eval", "--trait", "evil", "--out", str(tmp_path / "c"), "--judge", "contrast",
                          "--no-generate", ok=False), "needs the reference measure")
    res = cli("eval", "--trait", "evil", "--out", str(tmp_path / "e"), "--no-generate", "--n-questions", "2",
              "--json")
    cells = json.loads(res.stdout)["cells"]
    assert [(c["measure"], c["coherence_source"], c["coherence_mean"], c["n"]) for c in cells] == \
        [("reference", "none", None, 2)]


def test_select_by_rise_generates_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    class Stop(Exception):
        pass

    def fake_evaluate(*_: Any, settings: EvalSettings, **__: Any) -> None:
        seen["settings"] = settings
        raise Stop

    monkeypatch.setattr(steering_mod, "evaluate", fake_evaluate)
    ctx: Any = SimpleNamespace(settings=SimpleNamespace(sweep=SimpleNamespace(layers=[18], coefs=[1.0])),
                               model=SimpleNamespace(n_layers=24), traits={"evil": None}, engine=None,
                               progress=None)
    asked = EvalSettings(n_questions=5, max_new_tokens=16, half="first")
    with pytest.raises(Stop):
        select_by_rise(ctx, "evil", None, asked, tmp_path, None)  # type: ignore[arg-type]
    assert seen["settings"] == replace(asked, generate=False)


def test_reproduce_page_plots_cells_without_coherence(both: dict[bool, tuple[list[Cell], Path]]) -> None:
    """The sweep section draws the select folder's trait_mean; a folder without answers has no coherence."""
    from personavec.report.reproduce_page import steering_section

    _, run = both[False]
    values = _values(run)
    rise = [values[("L18_c+1", q)] - values[("L18_c-1", q)] for q in (0, 1)]
    t = SteeringTrait(trait="evil", layer=18, coef=1.0, criterion="rise", selection_change=sum(rise) / 2,
                      selection_questions=[0, 1], report_questions=[2, 3], heldout=heldout(rise, {}, {}),
                      rises={"own": rise}, select_dir=run.name, report_dir=run.name, rule="rise",
                      grid=(GridCell(18, 1.0, sum(rise) / 2, 1.0, True),))
    page = steering_section(SteeringResult({"evil": t}), run.parent)
    assert '<img alt="evil sweep"' in page
