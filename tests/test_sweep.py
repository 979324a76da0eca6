"""Evaluation, a tiny sweep, the choice written into the vector, and the HTML report, on the real model."""

from __future__ import annotations

import base64
import csv
import re
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import largest_rise, visible_text

import personavec as pv
from personavec.errors import LayerError, PersonavecError
from personavec.evaluate import Cell, Condition, EvalSettings, evaluate
from personavec.io import read_jsonl
from personavec.report import write_report
from personavec.sweep import choose, default_layers, sweep

TINY = EvalSettings(n_questions=3, max_new_tokens=8, n_reference=4)  # nothing below reads what an answer says


def test_default_grid_is_sized_to_depth() -> None:
    assert default_layers(30) == [9, 14, 18, 22]
    assert default_layers(2) == [1, 2]
    assert all(1 <= x <= 80 for x in default_layers(80))


def cell(layer: int, coef: float, trait_mean: float, coherence_mean: float | None = None,
         judge_free_mean: float | None = None) -> Cell:
    return Cell(layer=layer, coef=coef, n=3, trait_mean=trait_mean, trait_se=None, coherence_mean=coherence_mean,
                coherence_se=None, judge_free_mean=judge_free_mean, judge_free_se=None, perplexity=None,
                quiz_accuracy=None, coherence_source="fluency", cell=Condition(layer, coef).cell, control=None,
                measure="contrast")


def test_choose_respects_coherence() -> None:
    cells = [cell(5, 0.0, 0.0, 80.0), cell(5, 2.0, 0.5, 70.0), cell(9, 2.0, 0.9, 20.0), cell(9, -2.0, -0.9, 80.0)]
    assert choose(cells, coherence_min=50).best_layer == 5
    assert choose(cells, coherence_min=10).best_layer == 9
    assert choose(cells, coherence_min=None).coherence_threshold == 40.0
    with pytest.raises(PersonavecError, match="no positive coefficient"):
        choose(cells, coherence_min=99)


def test_choose_weighs_the_judge_free_measure() -> None:
    """Layer 9 moves the judge score a little more, layer 14 moves both readings: 14 wins; without
    judge-free values the judge score alone decides."""
    cells = [cell(9, 0.0, 0.0, judge_free_mean=0.0), cell(9, 2.0, 0.6, judge_free_mean=-0.1),
             cell(14, 2.0, 0.5, judge_free_mean=0.4), cell(14, -2.0, -0.5, judge_free_mean=-0.4)]
    picked = choose(cells, coherence_min=None)
    assert picked.best_layer == 14 and picked.judge_free_change == pytest.approx(0.4)
    assert "judge-free" in picked.criterion
    judge_only = [replace(c, judge_free_mean=None) for c in cells]
    assert choose(judge_only, coherence_min=None).best_layer == 9


@pytest.mark.slow
def test_eval_sweep_report_and_default_layer(model: pv.Model, evil_vector, tmp_path: Path) -> None:
    vec = evil_vector
    vfile = vec.save(tmp_path / "evil.pv.safetensors")
    # eval with the default measure (the trait has authored references): one row per answer, one per
    # condition and question in measure.jsonl, a summary per condition that names its measure
    cells = evaluate(model, "evil", vector=vec, conditions=[Condition(18, -4.0), Condition(18, 0.0), Condition(18, 4.0)],
                     settings=TINY, run_dir=tmp_path / "eval")
    assert [c.coef for c in cells] == [-4.0, 0.0, 4.0]
    assert all(c.n == 3 and c.measure == "reference" and c.judge_free_mean is None for c in cells)
    assert cells[0].trait_mean < cells[1].trait_mean < cells[2].trait_mean
    assert len(read_jsonl(tmp_path / "eval" / "answers.jsonl")) == 9
    assert len(read_jsonl(tmp_path / "eval" / "measure.jsonl")) == 9
    assert not (tmp_path / "eval" / "reference.jsonl").exists()  # nothing generated under the trait's prompts
    # the contrast judge stays available (with the prompted judge-free measure), and controls run beside
    ctrl = evaluate(model, "evil", vector=vec, conditions=[Condition(18, 0.0), Condition(18, 4.0)],
                    judge="contrast", settings=TINY, run_dir=tmp_path / "eval_contrast",
                    controls={"random0": pv.random_like(vec, 0)})
    assert [(c.control, c.coef) for c in ctrl] == [(None, 0.0), (None, 4.0), ("random0", 4.0)]
    assert all(c.measure == "contrast" and c.judge_free_mean is not None for c in ctrl)
    assert len(read_jsonl(tmp_path / "eval_contrast" / "reference.jsonl")) == 8
    # sweep: tiny grid, choice written into the vector file, resumable without recomputation
    run = tmp_path / "sweep"
    choice = sweep(model, "evil", vec, layers=[9, 18], coefs=[-2.0, 2.0], settings=TINY, run_dir=run,
                   vector_path=vfile)
    with open(run / "cells.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6 and {r["layer"] for r in rows} == {"9", "18"}
    # which of the two layers wins, recomputed from cells.csv: the larger rise of the trait over coefficient 0
    best, rise = largest_rise(rows)
    assert choice.best_layer == int(best["layer"]) and choice.best_coef == float(best["coef"]) == 2.0
    assert choice.trait_change == pytest.approx(rise, abs=1e-5)
    reloaded = pv.load_vector(vfile)
    assert reloaded.layer == choice.best_layer and reloaded.meta["best_coef"] == 2.0
    assert reloaded.digest() == vec.digest()  # only the metadata changed
    before = (run / "answers.jsonl").read_text()
    sweep(model, "evil", vec, layers=[9, 18], coefs=[-2.0, 2.0], settings=TINY, run_dir=run)
    assert (run / "answers.jsonl").read_text() == before  # nothing recomputed
    # report: one self-contained page with its plots
    page = write_report(run).read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) >= 3 and all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert "http://" not in page and "https://" not in page
    text = visible_text(page)
    other = ({9, 18} - {choice.best_layer}).pop()
    assert f"layer {choice.best_layer}" in text and f"layer {choice.best_layer}, coef +2 — chosen" in text
    assert f"layer {other}, coef" not in text  # examples: the chosen layer only
    # bad grids
    with pytest.raises(LayerError):
        sweep(model, "evil", vec, layers=[0], coefs=[1.0], settings=TINY, run_dir=tmp_path / "bad")
    with pytest.raises(PersonavecError, match="empty"):
        sweep(model, "evil", vec, layers=[], coefs=[1.0], settings=TINY, run_dir=tmp_path / "bad")
    with pytest.raises(PersonavecError, match="finite"):
        sweep(model, "evil", vec, layers=[3], coefs=[float("nan")], settings=TINY, run_dir=tmp_path / "bad")
