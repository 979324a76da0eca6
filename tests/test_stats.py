"""The statistics every figure's interval comes from, checked against values computed by hand."""

from __future__ import annotations

import math

import numpy as np

from personavec.stats import (
    auc,
    auc_ci,
    bootstrap_ci,
    centre,
    mean,
    mean_se,
    pearson,
    pearson_bootstrap_ci,
    pearson_ci,
    spearman,
)


def test_mean_se_by_hand() -> None:
    m, se, n = mean_se([1.0, 2.0, None, 3.0, 6.0])
    assert n == 4 and m == 3.0
    assert se is not None and math.isclose(se, math.sqrt(14 / 3) / 2)  # sd (ddof 1) / sqrt(n)
    assert mean_se([None]) == (None, None, 0)


def test_centre_subtracts_group_means() -> None:
    assert centre([1.0, 3.0, 10.0, 20.0], ["a", "a", "b", "b"]) == [-1.0, 1.0, -5.0, 5.0]


def test_bootstrap_interval_brackets_the_mean() -> None:
    xs = np.random.default_rng(1).normal(2.0, 1.0, 40)
    lo, hi = bootstrap_ci(xs)
    assert lo < xs.mean() < hi and hi - lo < 1.5
    assert all(math.isnan(v) for v in bootstrap_ci([1.0]))


def test_pearson_intervals() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=30)
    r, lo, hi = pearson_bootstrap_ci(x, 2 * x + 1)
    assert r == 1.0 and math.isclose(lo, 1.0) and math.isclose(hi, 1.0)
    y = x + rng.normal(size=30)
    r_b, lo_b, hi_b = pearson_bootstrap_ci(x, y)
    r_f, lo_f, hi_f = pearson_ci(x, y)
    assert math.isclose(r_b, r_f) and lo_b < r_b < hi_b and lo_b > 0
    assert abs(lo_b - lo_f) < 0.2 and abs(hi_b - hi_f) < 0.2  # the two intervals agree on well-behaved data
    _, lo_0, hi_0 = pearson_bootstrap_ci(x, rng.normal(size=30))
    assert lo_0 < 0 < hi_0
    assert all(math.isnan(v) for v in pearson_bootstrap_ci([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]))


def test_mean_skips_missing_and_non_finite() -> None:
    assert mean([1.0, None, float("nan"), 3.0]) == 2.0
    assert mean([None, float("inf")]) is None


def test_pearson_over_finite_pairs() -> None:
    xs = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert pearson(xs, [1.0, 3.0, 2.0, 5.0, 4.0]) == 0.8  # by hand: sxy 8, sxx = syy 10
    assert pearson(xs, [1.0] * 5) is None and pearson([1.0, 2.0], [1.0, 2.0]) is None


def test_spearman_gives_ties_their_average_rank() -> None:
    # x ranks 1, 2.5, 2.5, 4; y ranks 1, 2, 3, 4: Pearson of the ranks is 4.5 / sqrt(4.5 * 5) = 0.9487
    assert math.isclose(spearman([1.0, 2.0, 2.0, 3.0], [10.0, 20.0, 30.0, 40.0]), 4.5 / math.sqrt(4.5 * 5))
    # ranking ties by position instead (1, 2, 3, 4) would give exactly 1.0
    assert spearman([1.0, 2.0, 3.0, 4.0], [1.0, 8.0, 27.0, 64.0]) == 1.0
    assert spearman([3.0, 2.0, 1.0], [1.0, 2.0, 3.0]) == -1.0
    assert math.isnan(spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])) and math.isnan(spearman([1.0], [2.0]))


def test_auc_counts_ties_half_and_its_clustered_interval() -> None:
    assert auc([2.0, 3.0], [1.0, 0.0]) == 1.0 and auc([0.0], [1.0]) == 0.0
    assert auc([1.0, 2.0], [1.0, 0.0]) == 0.875  # pairs: tie 0.5, win, win, win over 4
    rng = np.random.default_rng(0)
    y = np.tile([0, 1], 40)
    score = y + rng.normal(scale=1.0, size=y.size)
    cluster = np.repeat(np.arange(40), 2)
    lo, hi = auc_ci(score, y, cluster, reps=500)
    assert lo < auc(score[y == 1], score[y == 0]) < hi and lo > 0.5 and hi <= 1.0
