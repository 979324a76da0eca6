"""Statistics used across the measures and experiments, in one home: means (with standard error, with a t
interval), bootstrap intervals over items, Pearson's r (with Fisher-z or bootstrap intervals), Spearman's rho
with ties, the ROC AUC with a clustered bootstrap interval, and the balanced accuracy of a threshold rule (with
the best such threshold). scipy does the distribution work."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from types import ModuleType


def _sps() -> ModuleType:
    """scipy.stats, imported on first use: it is a second of every `import personavec` (and so of every
    command) otherwise, and most commands compute no interval."""
    from scipy import stats

    return stats


def finite(values: Sequence[float | None]) -> list[float]:
    """The values that are numbers: None and NaN / infinities dropped."""
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def mean(values: Sequence[float | None]) -> float | None:
    """Mean of the finite values (None and NaN skipped); None when there is none."""
    xs = finite(values)
    return sum(xs) / len(xs) if xs else None


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
    res = _sps().bootstrap((xs,), np.mean, n_resamples=n_boot, confidence_level=level, method="percentile",
                        random_state=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def pearson_ci(x: Sequence[float], y: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(r, low, high): Pearson's r with its Fisher-z interval; NaN where undefined."""
    if len(x) < 4 or np.std(x) == 0 or np.std(y) == 0:
        return (float("nan"),) * 3
    res = _sps().pearsonr(x, y)
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

    res = _sps().bootstrap((xs, ys), r, paired=True, vectorized=False, n_resamples=n_boot, confidence_level=level,
                        method="percentile", random_state=np.random.default_rng(seed))
    return r(xs, ys), float(res.confidence_interval.low), float(res.confidence_interval.high)


def t_quantile(p: float, dof: int) -> float:
    """Student-t quantile by the Cornish-Fisher expansion around the normal quantile (Hill 1970); within
    1% of the exact value from 2 degrees of freedom on, exact in the limit."""
    z = NormalDist().inv_cdf(p)
    if dof <= 0:
        return math.inf
    g = [(z**3 + z) / 4, (5 * z**5 + 16 * z**3 + 3 * z) / 96,
         (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384,
         (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160]
    return z + sum(gk / dof ** (k + 1) for k, gk in enumerate(g))


def mean_ci(values: np.ndarray, level: float = 0.95) -> dict[str, Any]:
    """Mean with a t confidence interval (a single value has none), as a JSON-able record."""
    n = len(values)
    m = float(np.mean(values)) if n else math.nan
    sd = float(np.std(values, ddof=1)) if n > 1 else math.nan
    if n > 1:
        half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
        lo, hi = m - half, m + half
    else:
        lo = hi = math.nan
    return {"n": n, "mean": m, "std": sd, "ci_level": level, "ci_low": lo, "ci_high": hi, "method": "t"}


def pearson(xs: Sequence[float | None], ys: Sequence[float | None]) -> float | None:
    """Pearson r over the pairs where both values are finite; None with fewer than 3 or no spread."""
    pairs = [(float(x), float(y)) for x, y in zip(xs, ys, strict=True)
             if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)]
    if len(pairs) < 3:
        return None
    mx = sum(x for x, _ in pairs) / len(pairs)
    my = sum(y for _, y in pairs) / len(pairs)
    sxy = sum((x - mx) * (y - my) for x, y in pairs)
    sxx = sum((x - mx) ** 2 for x, _ in pairs)
    syy = sum((y - my) ** 2 for _, y in pairs)
    if sxx <= 0 or syy <= 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho: Pearson's r of the ranks, tied values sharing their average rank; NaN with fewer than
    2 pairs or when either side is constant."""
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if xs.shape != ys.shape:
        raise ValueError(f"spearman needs paired values, got {xs.size} and {ys.size}")
    if xs.size < 2 or np.ptp(xs) == 0 or np.ptp(ys) == 0:
        return float("nan")
    return float(_sps().spearmanr(xs, ys).statistic)


def auc(pos: Sequence[float] | np.ndarray, neg: Sequence[float] | np.ndarray) -> float:
    """ROC AUC: P(score of a random positive > score of a random negative), ties counted half (Mann-Whitney
    U / (n_pos n_neg))."""
    diff = np.asarray(pos, dtype=float)[:, None] - np.asarray(neg, dtype=float)[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def auc_ci(score: np.ndarray, y: np.ndarray, cluster: np.ndarray, *, reps: int = 2000, level: float = 0.95,
           seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the ROC AUC of `score` for the 0/1 labels `y`, resampling whole
    clusters (rows that share a cluster, e.g. a question, are not independent); resamples with one class
    only are skipped."""
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(cluster == c) for c in np.unique(cluster)]
    stats = []
    for _ in range(reps):
        rows = np.concatenate([groups[k] for k in rng.integers(0, len(groups), len(groups))])
        if 0 < y[rows].sum() < len(rows):
            stats.append(auc(score[rows][y[rows] == 1], score[rows][y[rows] == 0]))
    tail = (100 - 100 * level) / 2  # 2.5 exactly for 0.95
    low, high = np.percentile(stats, [tail, 100 - tail])
    return float(low), float(high)


def balanced_accuracy(values: Sequence[float], labels: Sequence[bool], threshold: float) -> float | None:
    """Mean of the true-positive and true-negative rates of the rule `value ≥ threshold`."""
    pos = [v for v, lab in zip(values, labels, strict=True) if lab]
    neg = [v for v, lab in zip(values, labels, strict=True) if not lab]
    if not pos or not neg:
        return None
    return 0.5 * (sum(v >= threshold for v in pos) / len(pos) + sum(v < threshold for v in neg) / len(neg))


def best_threshold(values: Sequence[float], labels: Sequence[bool]) -> tuple[float | None, float | None]:
    """The cut `value ≥ t` with the best balanced accuracy (midpoints between sorted values; the middle
    one of equally good cuts), or (None, None) when only one class is present."""
    if len(set(labels)) < 2:
        return None, None
    xs = sorted(set(values))
    cuts = [xs[0] - 1.0] + [(a + b) / 2 for a, b in itertools.pairwise(xs)] + [xs[-1] + 1.0]
    scored = [(balanced_accuracy(values, labels, t) or 0.0, t) for t in cuts]
    top = max(s for s, _ in scored)
    best = [t for s, t in scored if s >= top - 1e-12]
    return best[len(best) // 2], top
