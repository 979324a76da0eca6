"""Stage 6: does the projection difference ΔP, computed before any training, find trait-inducing data?

On the authored sets of `--data` (the ones the finetuning stage trains on), per trait, in fast mode
(`personavec.screen.screen`, last prompt token, at the sweep's layer): the sample-level ROC AUC of ΔP for the
II rows against the normal rows, with a 95% bootstrap interval that resamples whole questions (a question's
normal and II answers are not independent); and at dataset level the mean ΔP of each set with a known
contamination (normal, the 25/50/75% mixtures, II), which should rise with the share of trait rows. The share is
counted from the rows actually screened (their ids in the II set), not assumed from the file name. Real chat
logs are the next stage's (`sharegpt`)."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv

from ..screen import screen
from ..stats import auc, auc_ci
from ..vectors import PersonaVector
from .context import Context, NotRun
from .finetuning import missing_sets, rows_of, trait_inputs
from .manifest import SKIPPED
from .records import Interval, interval

#: The authored sets in contamination order (files that are absent are left out).
SETS = ("normal", "mix025", "mix050", "mix075", "II")


@dataclass(frozen=True)
class Level:
    set: str
    contamination: float  # share of the screened rows that come from the II set
    delta_p: Interval  # mean ΔP over the set's rows (95% bootstrap over rows)
    values: list[float]  # ΔP per row, in file order


@dataclass(frozen=True)
class ScreenTrait:
    trait: str
    layer: int
    levels: list[Level]
    ordered: bool  # the mean ΔP rises with every step of contamination
    auc: float  # II rows vs normal rows
    auc_low: float
    auc_high: float


@dataclass(frozen=True)
class ScreenResult:
    traits: dict[str, ScreenTrait]


def _rows(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def delta_p(ctx: Context, vec: PersonaVector, data: Path, out: Path, layer: int) -> dict[int, float]:
    """{row index: ΔP} of the rows of `data` the screen scored (fast mode); rejected rows are left out."""
    res = screen(ctx.model, data, [vec], out, fast=True, layer=layer, histograms=False,
                 cache=out.parent / "base-answers.sqlite", progress=ctx.progress)
    table = pacsv.read_csv(res.scores)
    return {int(i): float(v) for i, v in zip(table.column("index").to_pylist(),
                                             table.column(f"{vec.trait}_delta_p").to_pylist(), strict=True)}


def run_screening(ctx: Context) -> ScreenResult | NotRun:
    data = ctx.settings.data
    if data is None:
        return NotRun(SKIPPED, "no --data folder of authored sets (<trait>/normal.jsonl, II.jsonl and the "
                               "mixtures)")
    lacking = missing_sets(ctx, Path(data), ("normal", "II"))
    if lacking:
        return lacking
    out = {}
    for name, layer, vec, work in trait_inputs(ctx, "screen"):
        paths = {s: rows_of(Path(data) / name / f"{s}.jsonl", work, ctx.settings.finetune.max_rows)
                 for s in SETS if (Path(data) / name / f"{s}.jsonl").is_file()}
        trait_ids = {r["id"] for r in _rows(Path(data) / name / "II.jsonl")}
        levels, questions = [], {}
        for s, path in paths.items():
            rows = _rows(path)
            dp = delta_p(ctx, vec, path, work / f"{s}.dp.csv", layer)
            kept = sorted(dp)
            share = sum(rows[i]["id"] in trait_ids for i in kept) / len(kept)
            levels.append(Level(s, share, interval([dp[i] for i in kept]), [dp[i] for i in kept]))
            questions[s] = [str(rows[i]["messages"][0]["content"]) for i in kept]  # type: ignore[index]
        levels.sort(key=lambda lv: lv.contamination)
        normal, ii = (next(lv for lv in levels if lv.set == s) for s in ("normal", "II"))
        score = np.array(normal.values + ii.values)
        y = np.array([0] * len(normal.values) + [1] * len(ii.values))
        low, high = auc_ci(score, y, np.array(questions["normal"] + questions["II"]))
        means = [lv.delta_p.mean or 0.0 for lv in levels]
        out[name] = ScreenTrait(trait=name, layer=layer, levels=levels,
                                ordered=all(a < b for a, b in itertools.pairwise(means)),
                                auc=auc(ii.values, normal.values), auc_low=low, auc_high=high)
    return ScreenResult(out)
