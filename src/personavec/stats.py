"""Statistics used across the measures and experiments: mean with standard error, a paired bootstrap
interval over items, and Pearson's r with a Fisher-z interval. scipy does the distribution work."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats as sps


def mean_se(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """(mean, standard error, n) over the values that are not None."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None, None, 0
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None, len(xs)
    var = sum((x - m) ** 2 for x in xs) / (len(xs) - 1)
    return m, math.sqrt(var / len(xs)), len(xs)


def centre(values: Sequence[float], groups: Sequence[object]) -> list[float]:
    """Each value minus the mean of its group: what is left once the group (a prompt level, a question)
    is accounted for."""
    sums: dict[object, list[float]] = {}
    for v, g in zip(values, groups, strict=True):
        sums.setdefault(g, []).append(v)
    return [v - sum(sums[g]) / len(sums[g]) for v, g in zip(values, groups, strict=True)]


def bootstrap_ci(values: Sequence[float], *, level: float = 0.95, n_boot: int = 10_000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the mean, resampling items (questions) with replacement."""
    xs = np.asarray(values, dtype=float)
    if xs.size < 2:
        return (float("nan"), float("nan"))
    res = sps.bootstrap((xs,), np.mean, n_resamples=n_boot, confidence_level=level, method="percentile",
                        random_state=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def pearson_ci(x: Sequence[float], y: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(r, low, high): Pearson's r with its Fisher-z interval; NaN where undefined."""
    if len(x) < 4 or np.std(x) == 0 or np.std(y) == 0:
        return (float("nan"),) * 3
    res = sps.pearsonr(x, y)
    ci = res.confidence_interval(confidence_level=level)
    return float(res.statistic), float(ci.low), float(ci.high)


def pearson_bootstrap_ci(x: Sequence[float], y: Sequence[float], *, level: float = 0.95, n_boot: int = 10_000,
                         seed: int = 0) -> tuple[float, float, float]:
    """(r, low, high): Pearson's r with a percentile interval from resampling (x, y) pairs, for a handful of
    runs where Fisher's z (which assumes bivariate normal data) is hard to defend; NaN where undefined."""
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if xs.size < 4 or np.std(xs) == 0 or np.std(ys) == 0:
        return (float("nan"),) * 3

    def r(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.corrcoef(a, b)[0, 1]) if np.std(a) > 0 and np.std(b) > 0 else 0.0

    res = sps.bootstrap((xs, ys), r, paired=True, vectorized=False, n_resamples=n_boot, confidence_level=level,
                        method="percentile", random_state=np.random.default_rng(seed))
    return r(xs, ys), float(res.confidence_interval.low), float(res.confidence_interval.high)
