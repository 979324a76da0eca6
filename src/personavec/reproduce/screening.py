"""Stage 6: does the projection difference ΔP, computed before any training, find trait-inducing data?

On the authored sets of `--data` (the ones the finetuning stage trains on), per trait, in fast mode
(`personavec.screen.screen`, last prompt token, at the sweep's layer): the sample-level ROC AUC of ΔP for the
II rows against the normal rows, with a 95% bootstrap interval that resamples whole questions (a question's
normal and II answers are not independent); and at dataset level the mean ΔP of each set with a known
contamination (normal, the 25/50/75% mixtures, II), which should rise with the share of trait rows. The share is
counted from the rows actually screened (their ids in the II set), not assumed from the file name. Real chat
logs are the next stage's (`sharegpt`).

The measures are small pure functions (`read_columns`, `separation`, `level`, `rises`) that
experiments/screening.py calls too, so its committed outputs and this stage compute the same thing."""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow.csv as pacsv

from ..screen import screen
from ..stats import auc, auc_ci
from ..vectors import PersonaVector
from .context import Context, NotRun
from .finetuning import missing_sets, rows_of, trait_inputs
from .manifest import SKIPPED
from .records import Interval, interval, t_interval

#: The authored sets in contamination order (files that are absent are left out).
SETS = ("normal", "mix025", "mix050", "mix075", "II")


@dataclass(frozen=True)
class Level:
    set: str
    contamination: float  # share of the screened rows that come from the II set
    delta_p: Interval  # mean ΔP over the set's rows (95% bootstrap over rows, or a t interval: `level`)
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


@dataclass(frozen=True)
class Separation:
    """How well a score tells trait rows from normal ones: ROC AUC with its 95% bootstrap interval over
    questions (a question's answers are not independent, so whole questions are resampled)."""

    auc: float
    low: float
    high: float


def read_columns(path: Path, *names: str) -> list[np.ndarray]:
    """Columns of a screen's scores file (`personavec.screen.screen`'s CSV), read once, in file order."""
    table = pacsv.read_csv(path)
    return [np.array(table.column(name).to_pylist()) for name in names]


def separation(score: np.ndarray, y: np.ndarray, questions: np.ndarray) -> Separation:
    """The AUC of `score` for the 0/1 labels `y` (1: trait rows), the interval resampling `questions`."""
    low, high = auc_ci(score, y, questions)
    return Separation(auc(score[y == 1], score[y == 0]), low, high)


def level(name: str, contamination: float, values: Sequence[float] | np.ndarray,
          ci: Literal["bootstrap", "t"] = "bootstrap") -> Level:
    """One set's mean ΔP with a 95% interval: a bootstrap over rows (this stage), or the t interval the
    screen's own summary reports (`ci="t"`, experiments/screening.py's mixtures)."""
    vals = [float(v) for v in values]
    return Level(name, contamination, interval(vals) if ci == "bootstrap" else t_interval(vals), vals)


def rises(levels: Sequence[Level]) -> bool:
    """Whether the mean ΔP rises with every step of `levels` (given in contamination order): the dataset-level
    test, since a screen is for ranking whole datasets as much as rows."""
    means = [lv.delta_p.mean or 0.0 for lv in levels]
    return all(a < b for a, b in itertools.pairwise(means))


def _rows(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def delta_p(ctx: Context, vec: PersonaVector, data: Path, out: Path, layer: int) -> dict[int, float]:
    """{row index: ΔP} of the rows of `data` the screen scored (fast mode); rejected rows are left out."""
    res = screen(ctx.model, data, [vec], out, fast=True, layer=layer, histograms=False,
                 cache=out.parent / "base-answers.sqlite", progress=ctx.progress)
    index, dp = read_columns(res.scores, "index", f"{vec.trait}_delta_p")
    return {int(i): float(v) for i, v in zip(index, dp, strict=True)}


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
            levels.append(level(s, share, [dp[i] for i in kept]))
            questions[s] = [str(rows[i]["messages"][0]["content"]) for i in kept]  # type: ignore[index]
        levels.sort(key=lambda lv: lv.contamination)
        normal, ii = (next(lv for lv in levels if lv.set == s) for s in ("normal", "II"))
        y = np.array([0] * len(normal.values) + [1] * len(ii.values))
        sep = separation(np.array(normal.values + ii.values), y, np.array(questions["normal"] + questions["II"]))
        out[name] = ScreenTrait(trait=name, layer=layer, levels=levels, ordered=rises(levels), auc=sep.auc,
                                auc_low=sep.low, auc_high=sep.high)
    return ScreenResult(out)
