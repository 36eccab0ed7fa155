import math

import pytest

from lnorm.lab import stats as S


def test_mean_ci_matches_t_interval():
    m, lo, hi, n = S.mean_ci([1.0, 2.0, 3.0])
    assert (m, n) == (2.0, 3)
    # t(0.975, 2) = 4.3027, sd = 1, sqrt(3)
    assert hi - m == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
    assert m - lo == pytest.approx(hi - m)


def test_mean_ci_one_value_has_no_interval_and_skips_nonfinite():
    m, lo, hi, n = S.mean_ci([0.5, float("nan"), float("inf")])
    assert (m, n) == (0.5, 1) and math.isnan(lo) and math.isnan(hi)


@pytest.mark.parametrize("a,b,margin,expected", [
    ([0.9, 0.91, 0.92], [0.80, 0.81, 0.79], 0.0, S.SUPPORTED),
    ([0.80, 0.81, 0.79], [0.9, 0.91, 0.92], 0.0, S.NOT_SUPPORTED),
    ([0.5, 0.9, 0.1], [0.5, 0.1, 0.9], 0.01, S.INCONCLUSIVE),
    ([0.5], [0.4], 0.0, S.INCONCLUSIVE),
], ids=["clearly-greater", "clearly-smaller", "noisy", "one-seed"])
def test_greater(a, b, margin, expected):
    assert S.greater(a, b, margin)[0] == expected


def test_all_of():
    assert S.all_of(S.SUPPORTED, S.SUPPORTED) == S.SUPPORTED
    assert S.all_of(S.SUPPORTED, S.INCONCLUSIVE) == S.INCONCLUSIVE
    assert S.all_of(S.INCONCLUSIVE, S.NOT_SUPPORTED) == S.NOT_SUPPORTED


# Welch intervals pinned to scipy's (a normal quantile, or pooled variances, would move them)
@pytest.mark.parametrize("a,b", [
    ([0.9, 0.91, 0.92], [0.80, 0.81, 0.79]),
    ([1.0, 2.0, 4.0, 8.0], [0.5, 0.6]),  # unequal sizes and spreads: df far from n - 2
    ([3.0, 3.0, 3.1], [1.0, 5.0, 9.0, 2.0, 4.0]),
    ([0.5, 0.9, 0.1], [0.5, 0.1, 0.9]),
], ids=["three-each", "unequal-sizes", "unequal-spreads", "noisy"])
def test_diff_ci_is_scipys_welch_interval(a, b):
    from scipy import stats

    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    d, lo, hi = S.diff_ci(a, b)
    assert d == pytest.approx(sum(a) / len(a) - sum(b) / len(b), rel=1e-12)
    assert (lo, hi) == (pytest.approx(ci.low, rel=1e-9), pytest.approx(ci.high, rel=1e-9))


def test_diff_ci_edge_cases():
    assert S.diff_ci([1.0, 1.0], [0.5, 0.5]) == (0.5, 0.5, 0.5)  # no spread: the interval collapses
    d, lo, hi = S.diff_ci([1.0], [0.5, 0.6])
    assert d == pytest.approx(0.45) and math.isnan(lo) and math.isnan(hi)
    assert all(math.isnan(v) for v in S.diff_ci([], [1.0, 2.0]))
    # one side without spread: Welch's df comes from the other side alone
    from scipy import stats

    a, b = [2.0, 2.0, 2.0], [1.0, 1.5, 0.7]
    d, lo, hi = S.diff_ci(a, b)
    h = stats.t.ppf(0.975, 2) * stats.sem(b)
    assert (lo, hi) == (pytest.approx(d - h, rel=1e-9), pytest.approx(d + h, rel=1e-9))


def test_mean_ci_is_scipys_t_interval():
    from scipy import stats

    xs = [0.3, 0.9, 0.4, 0.45, 1.2]
    m, lo, hi, n = S.mean_ci(xs)
    want = stats.t.interval(0.95, len(xs) - 1, loc=stats.tmean(xs), scale=stats.sem(xs))
    assert (lo, hi) == (pytest.approx(want[0], rel=1e-9), pytest.approx(want[1], rel=1e-9))


@pytest.mark.parametrize("lo,hi,margin,expected", [
    (0.01, 0.5, 0.0, S.SUPPORTED),
    (0.0, 0.5, 0.0, S.INCONCLUSIVE),  # touching 0 is not above it
    (-1e-9, 0.5, 0.0, S.INCONCLUSIVE),
    (-0.5, 0.0, 0.0, S.NOT_SUPPORTED),  # rules out any positive effect
    (-0.5, 0.01, 0.01, S.NOT_SUPPORTED),  # at the margin: no effect worth it
    (-0.5, 0.0101, 0.01, S.INCONCLUSIVE),  # just above the margin
    (-0.5, 0.02, 0.01, S.INCONCLUSIVE),
    (-0.5, 0.06, 0.05, S.INCONCLUSIVE),
    (-0.5, -0.2, 0.0, S.NOT_SUPPORTED),
    (math.nan, 0.5, 0.0, S.INCONCLUSIVE),
    (0.1, math.nan, 0.0, S.INCONCLUSIVE),
], ids=["above-0", "touching-0", "just-below-0", "hi-at-0", "hi-at-margin", "hi-just-above-margin",
        "hi-above-margin", "hi-above-margin-0.05", "below-0", "nan-lo", "nan-hi"])
def test_decide_thresholds(lo, hi, margin, expected):
    assert S.decide(lo, hi, margin) == expected


def test_all_of_any_part_not_supported_sinks_the_claim():
    assert S.all_of(S.SUPPORTED, S.NOT_SUPPORTED) == S.NOT_SUPPORTED
    assert S.all_of(S.SUPPORTED, S.SUPPORTED, S.NOT_SUPPORTED) == S.NOT_SUPPORTED
    assert S.all_of() == S.INCONCLUSIVE
