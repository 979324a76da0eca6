"""Issue 12's steering experiment replayed without a model: the committed per-question values
(experiments/out/steering_reference/measure.jsonl) and perplexities (perplexity.jsonl), put through the library's
choice rule and held-out statistics (`choose_by_rise`, `heldout` in personavec.reproduce.steering), give back the
committed results.json: so the script and the library compute the same thing (issue 17)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

import personavec as pv
from personavec.io import read_jsonl
from personavec.reproduce.records import interval
from personavec.reproduce.steering import GridCell, choose_by_rise, grid_cell, heldout, paired_rise

OUT = Path(__file__).resolve().parents[1] / "experiments" / "out" / "steering_reference"
FILES = ("measure.jsonl", "perplexity.jsonl", "results.json")
COMMITTED = all((OUT / f).exists() for f in FILES)
TRAITS = sorted(json.loads((OUT / "results.json").read_text())["traits"]) if COMMITTED else []
Gaps = dict[tuple[Any, ...], dict[int, float]]


def close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=0.0, abs_tol=1e-9)


@pytest.fixture(scope="module")
def committed() -> tuple[dict[str, Any], Gaps, dict[tuple[str, int, float], float]]:
    if not COMMITTED:
        pytest.skip(f"the committed outputs of experiments/steering_reference.py are absent from {OUT}")
    gaps: Gaps = {}
    for r in read_jsonl(OUT / "measure.jsonl"):  # keyed as the script's Cells: a later row wins, as there
        gaps.setdefault((r["trait"], r["vector"], r["layer"], r["coef"], r["half"]), {})[r["question_idx"]] = r["gap"]
    ppl = {(r["trait"], r["layer"], r["coef"]): r["perplexity"] for r in read_jsonl(OUT / "perplexity.jsonl")}
    return json.loads((OUT / "results.json").read_text()), gaps, ppl


def rise(gaps: Gaps, trait: str, vector: str, layer: int, c: float, half: str) -> list[float]:
    return paired_rise(gaps[(trait, vector, layer, c, half)], gaps[(trait, vector, layer, -c, half)])


def assert_interval(got: Any, want: dict[str, Any]) -> None:
    assert got.n == want["n"]
    assert close(got.mean, want["mean"]) and close(got.se, want["se"])
    assert close(got.low, want["ci95"][0]) and close(got.high, want["ci95"][1])


@pytest.mark.skipif(not COMMITTED, reason="the committed experiments/out/steering_reference outputs are absent")
@pytest.mark.parametrize("trait", TRAITS)
def test_library_replays_the_committed_choice_and_heldout(trait: str, committed: Any) -> None:
    results, gaps, ppl = committed
    s, want = results["settings"], results["traits"][trait]
    grid = [grid_cell(layer, c, rise(gaps, trait, "own", layer, c, "first"), ppl[(trait, layer, c)],
                      ppl[(trait, layer, -c)], s["base_perplexity"], s["ppl_max"])
            for layer in s["layers"] for c in s["coefs"]]
    pick = choose_by_rise(grid)
    assert (pick.layer, pick.coef) == (want["layer"], want["coef"])
    assert close(pick.selection_rise, want["selection_rise"])
    assert len(pick.grid) == len(want["grid"])
    for got, cell in zip(pick.grid, want["grid"], strict=True):
        assert (got.layer, got.coef, got.kept) == (cell["layer"], cell["coef"], cell["kept"])
        assert close(got.rise, cell["rise"]) and close(got.ppl_ratio, cell["ppl_ratio"])

    layer, c = pick.layer, pick.coef
    own = rise(gaps, trait, "own", layer, c, "second")
    randoms = {f"random{seed}": rise(gaps, trait, f"random{seed}", layer, c, "second") for seed in s["random_seeds"]}
    others = {o: rise(gaps, trait, o, layer, c, "second") for o in want["others"]}
    h = heldout(own, randoms, others, k=3.0)
    assert_interval(h.own, want["own"])
    assert_interval(interval([a - b for a, b in zip(own, randoms["random0"], strict=True)]),
                    want["own_minus_random0"])
    assert list(h.random) == list(want["random"]) and list(h.others) == list(want["others"])
    for n, i in h.random.items():
        assert_interval(i, want["random"][n])
    for n, i in h.others.items():
        assert_interval(i, want["others"][n])
    assert close(h.max_abs_random, want["max_abs_random_rise"])
    assert close(h.ratio_to_random, want["ratio_to_random"])
    assert h.best_other == want["best_other"] and close(h.best_other_rise, want["best_other_rise"])
    assert (h.interval_above_zero and h.beats_random) == want["target_interval_and_3x_random"]
    assert h.beats_others == want["target_own_beats_others"]
    base = gaps[(trait, "none", None, 0.0, "second")]
    assert close(sum(base.values()) / len(base), want["base_mean"])


def test_choice_rule_keeps_fluent_cells_only_and_refuses_an_empty_grid() -> None:
    grid = [GridCell(6, 2.0, 0.9, 1.6, False), GridCell(10, 2.0, 0.4, 1.1, True), GridCell(14, 2.0, 0.4, 1.2, True)]
    pick = choose_by_rise(grid)
    assert (pick.layer, pick.coef, pick.selection_rise) == (10, 2.0, 0.4)  # the unfluent 0.9 loses; a tie: first
    assert grid_cell(6, 2.0, [0.1, 0.3], 30.0, 40.0, 20.0, 1.5) == GridCell(6, 2.0, 0.2, 2.0, False)
    with pytest.raises(pv.PersonavecError, match=r"smallest ratio to the unsteered perplexity: 1\.60"):
        choose_by_rise(grid[:1])
