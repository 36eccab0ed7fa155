"""Confidence intervals and the three-way verdict used by every claim criterion.

A claim is decided from the seeds of each configuration, never by eye:

* ``supported``: the 95% interval of the effect lies entirely on the side the claim predicts;
* ``not supported``: the interval rules out an effect larger than ``margin`` in the predicted
  direction (the effect is absent, negligible, or the other way round);
* ``inconclusive``: anything else (too few seeds, or an interval that straddles the margin).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

SUPPORTED = "supported"
NOT_SUPPORTED = "not supported"
INCONCLUSIVE = "inconclusive"


def _t975(df: float) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def _clean(xs: Sequence[float]) -> list[float]:
    return [float(x) for x in xs if x is not None and math.isfinite(float(x))]


def mean_ci(xs: Sequence[float]) -> tuple[float, float, float, int]:
    """Mean and 95% interval ``mean ± t(0.975, n-1)·sd/√n`` of the finite values of ``xs``.

    Returns ``(mean, lo, hi, n)``; ``lo``/``hi`` are NaN for fewer than two values.
    """
    v = _clean(xs)
    n = len(v)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    m = sum(v) / n
    if n == 1:
        return m, math.nan, math.nan, 1
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (n - 1))
    h = _t975(n - 1) * sd / math.sqrt(n)
    return m, m - h, m + h, n


def diff_ci(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """Mean of ``a`` minus mean of ``b`` with a 95% Welch interval: ``(diff, lo, hi)``.

    NaN bounds when either side has fewer than two values. When both samples have zero spread the
    interval collapses onto the difference (the seeds agree exactly).
    """
    va, vb = _clean(a), _clean(b)
    if not va or not vb:
        return math.nan, math.nan, math.nan
    ma, mb = sum(va) / len(va), sum(vb) / len(vb)
    d = ma - mb
    if len(va) < 2 or len(vb) < 2:
        return d, math.nan, math.nan
    sa = sum((x - ma) ** 2 for x in va) / (len(va) - 1) / len(va)
    sb = sum((x - mb) ** 2 for x in vb) / (len(vb) - 1) / len(vb)
    se = math.sqrt(sa + sb)
    if se == 0:
        return d, d, d
    df = (sa + sb) ** 2 / ((sa**2 / (len(va) - 1) if sa else 0) + (sb**2 / (len(vb) - 1) if sb else 0))
    h = _t975(df) * se
    return d, d - h, d + h


def decide(lo: float, hi: float, margin: float = 0.0) -> str:
    """Verdict for "the effect is positive" from its 95% interval ``[lo, hi]``.

    Supported when ``lo > 0``; not supported when ``hi <= margin`` (no effect worth ``margin``);
    inconclusive otherwise, including NaN bounds.
    """
    if math.isnan(lo) or math.isnan(hi):
        return INCONCLUSIVE
    if lo > 0:
        return SUPPORTED
    if hi <= margin:
        return NOT_SUPPORTED
    return INCONCLUSIVE


def greater(a: Sequence[float], b: Sequence[float], margin: float = 0.0) -> tuple[str, tuple[float, float, float]]:
    """Is ``a`` larger than ``b``? Verdict of :func:`decide` on the Welch interval of ``a - b``."""
    d, lo, hi = diff_ci(a, b)
    return decide(lo, hi, margin), (d, lo, hi)


def all_of(*verdicts: str) -> str:
    """A claim made of several parts: supported if all are, not supported if any is not."""
    if any(v == NOT_SUPPORTED for v in verdicts):
        return NOT_SUPPORTED
    if verdicts and all(v == SUPPORTED for v in verdicts):
        return SUPPORTED
    return INCONCLUSIVE


def fmt_ci(xs: Sequence[float], digits: int = 3) -> str:
    """``mean ± half-width (n)`` for tables; ``mean (n=1)`` with one value; ``-`` with none."""
    m, lo, hi, n = mean_ci(xs)
    if n == 0:
        return "-"
    if n == 1:
        return f"{m:.{digits}g} (n=1)"
    return f"{m:.{digits}g} ± {(hi - lo) / 2:.{digits - 1}g}"


def fmt_diff(d: tuple[float, float, float], digits: int = 3) -> str:
    diff, lo, hi = d
    if math.isnan(diff):
        return "n/a"
    if math.isnan(lo):
        return f"{diff:+.{digits}g} (no interval: one seed)"
    return f"{diff:+.{digits}g} [95% CI {lo:+.{digits}g}, {hi:+.{digits}g}]"


# ------------------------------------------------------------------- criteria shared by experiments


def exact_vs_batch_norm(ln: Sequence[float], bn: Sequence[float], tol: float) -> str:
    """The claims that layer norm is exact where batch norm is not (C1, C2): supported when every
    layer-norm value is below ``tol`` and every batch-norm value above ``100 * tol``; not supported
    when a layer-norm value reaches ``tol``; inconclusive without layer-norm values, or when batch
    norm's do not clear ``100 * tol`` (the probe could not have seen a difference)."""
    if not ln:
        return INCONCLUSIVE
    if max(ln) >= tol:
        return NOT_SUPPORTED
    if not bn or min(bn) <= 100 * tol:
        return INCONCLUSIVE
    return SUPPORTED


def verdict_higher_lr(ln: dict[float, list[float]], none: dict[float, list[float]]) -> tuple[str, str]:
    """C11 (higher score is better): LN's best learning rate (by mean score) is higher than the
    unnormalized net's, and LN scores significantly better at its best lr than at the other's best
    lr. Not supported when LN's best lr is the same or lower."""
    def best(d):
        means = {lr: mean_ci(v)[0] for lr, v in d.items() if v}
        means = {lr: (m if m == m else -float("inf")) for lr, m in means.items()}
        return max(means, key=means.get) if means else None

    b_ln, b_no = best(ln), best(none)
    if b_ln is None or b_no is None:
        return INCONCLUSIVE, "missing runs"
    if min(len(v) for v in (*ln.values(), *none.values())) < 2:
        return INCONCLUSIVE, f"best lr: LN {b_ln:g}, none {b_no:g} (one seed decides nothing)"
    ev = f"best lr: LN {b_ln:g}, none {b_no:g}"
    if b_ln <= b_no:
        return NOT_SUPPORTED, ev
    v, d = greater(ln[b_ln], ln[b_no])
    return (SUPPORTED if v == SUPPORTED else INCONCLUSIVE), ev + f"; LN at {b_ln:g} minus at {b_no:g} {fmt_diff(d)}"
