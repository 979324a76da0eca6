"""Dataset-level numbers from per-sample ΔP: ranks and thresholds. The mean with a t interval lives in
personavec.stats (re-exported here)."""

from __future__ import annotations

import numpy as np

from ..stats import mean_ci, t_quantile

__all__ = ["mean_ci", "percentile_threshold", "ranks", "t_quantile"]


def ranks(values: np.ndarray) -> np.ndarray:
    """1 = the largest ΔP (the sample that pushes hardest toward the trait); ties keep input order."""
    order = np.argsort(-values, kind="stable")
    out = np.empty(len(values), dtype=np.int64)
    out[order] = np.arange(1, len(values) + 1)
    return out


def percentile_threshold(values: np.ndarray, percentile: float) -> float:
    """The `percentile` (0-100) of ΔP on a reference dataset: samples above it are flagged."""
    return float(np.percentile(values, percentile))
