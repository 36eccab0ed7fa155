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
