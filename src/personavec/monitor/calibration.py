"""The threshold on a projection that flags answers the judge finds trait-expressing (fitted on even
questions, checked on odd ones, refitted on all), and storing it in a vector file for the server."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import VectorError
from ..stats import balanced_accuracy, best_threshold
from ..vectors import PersonaVector

if TYPE_CHECKING:
    from .results import MonitorSummary


@dataclass(frozen=True)
class Calibration:
    """A projection threshold and how well it separates the judge's labels (None with one class only)."""

    threshold: float | None  # fitted on every answer: the one stored
    balanced_accuracy: float | None  # of `threshold`, in sample
    heldout_balanced_accuracy: float | None  # of `heldout_threshold` on the odd questions
    heldout_threshold: float | None  # fitted on the even questions
    n_answers: int
    n_expressing: int


def calibrate(rows: Sequence[dict[str, Any]], values: Callable[[dict[str, Any]], list[float | None]],
              neutral: float) -> Calibration:
    """Threshold on a projection (`values(row)`: one per answer of the row) separating answers scored ≥
    `neutral` from the rest: fitted on even-indexed questions and checked on odd ones (held-out balanced
    accuracy), then refitted on every answer (the stored threshold)."""
    def answers(keep: Callable[[int], bool]) -> tuple[list[float], list[bool]]:
        vals, labs = [], []
        for r in rows:
            if not keep(r["question_idx"]):
                continue
            for v, s in zip(values(r), r["trait_scores"], strict=True):
                if v is not None and s is not None and math.isfinite(v):
                    vals.append(float(v))
                    labs.append(s >= neutral)
        return vals, labs

    vals, labs = answers(lambda q: True)
    threshold, acc = best_threshold(vals, labs)
    fit_v, fit_l = answers(lambda q: q % 2 == 0)
    test_v, test_l = answers(lambda q: q % 2 == 1)
    fit_t, _ = best_threshold(fit_v, fit_l)
    held = None if fit_t is None else balanced_accuracy(test_v, test_l, fit_t)
    return Calibration(threshold=threshold, balanced_accuracy=acc, heldout_balanced_accuracy=held,
                       heldout_threshold=fit_t, n_answers=len(vals), n_expressing=sum(labs))


def store_calibration(vector_path: str | Path, result: MonitorSummary, out_path: str | Path | None = None) -> Path:
    """Write the result's meta["monitor"] block into a vector file (atomically; in place unless `out_path`).
    Refused when the file's directions are not the ones the experiment measured."""
    vec = PersonaVector.load(vector_path)
    if vec.digest() != result.vector_digest:
        raise VectorError(f"{vector_path} holds other directions than the monitored vector "
                          f"({vec.digest()} ≠ {result.vector_digest}); rerun monitor-eval on it")
    return vec.with_meta(monitor=result.monitor_meta).save(out_path or vector_path)
