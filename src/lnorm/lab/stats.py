"""The lab's decision rules: effect sizes with 95% intervals, and the three-way verdict.

A claim is decided from the seeds of each configuration, never by eye. :func:`compare` measures
the effect ``a - b``, oriented so the claim predicts a positive effect, and decides:

* ``supported``: the 95% interval excludes 0 on the predicted side (``lo > 0``, a one-sided test
  at 0.025) and the estimate is at least ``min_effect``, the smallest effect the claim cares about;
* ``not supported``: the interval rules out an effect of ``margin`` or more (``hi < margin``:
  equivalence to zero within ``margin``, or the opposite direction); ``margin <= min_effect``;
* ``inconclusive``: anything else, with the reason (too few seeds, an interval that straddles,
  no spread and no resolution, a censored side, a failed run without a score).

Runs of the same seed share data order (and initialisation where shapes match), so seeds are
compared paired (a t interval of the per-seed differences) whenever both sides have them; lists
are compared unpaired (Welch). A diverged run is scored (``fail_score``), never dropped.
:func:`holm` adjusts a family of p-values; the report applies it to each claim's secondary rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace

SUPPORTED = "supported"
NOT_SUPPORTED = "not supported"
INCONCLUSIVE = "inconclusive"
ALPHA = 0.025  # one-sided; the two one-sided tests at 0.025 are the two ends of the 95% interval


def _t975(df: float) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def _clean(xs: Sequence[float]) -> list[float]:
    return [float(x) for x in xs if x is not None and math.isfinite(float(x))]


# ------------------------------------------------------------------------------- comparisons


class Scored(dict):
    """``{seed: value}`` whose ``failed`` seeds (diverged, cannot train) were already given a
    fail score (:func:`lnorm.lab.analysis.scored`); :func:`compare` counts them as failed runs.

    ``fail_score`` is the score a failed run was given, and ``fail_note`` (optional) what it
    stands for (``"chance"``). They are kept apart from the values because a value may be derived
    from the score (an accuracy drop: the score at one batch size minus a finished run's accuracy
    at another), and the note on a comparison must name the score the failed run got, not the
    derived value it was compared with. Without ``fail_score`` the failed seed's value is taken
    to be its score (true of a :class:`Scored` that holds the scores themselves)."""

    def __init__(self, *args, failed: Iterable = (), fail_score: float | None = None, fail_note: str = "",
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.failed: set = set(failed)
        self.fail_score = fail_score
        self.fail_note = fail_note


@dataclass(frozen=True)
class Effect:
    """The effect ``a - b`` of one comparison, oriented so the claim predicts a positive value.

    ``lo``/``hi`` bound the 95% interval (NaN when it cannot be computed, infinite on a side a
    censored value leaves open); ``n`` counts seed pairs when ``paired`` and runs otherwise;
    ``p_positive`` is the one-sided p of "effect <= 0", ``p_equivalent`` that of "effect >=
    margin"; ``reason`` says why a verdict is inconclusive and what was scored or censored.
    """

    estimate: float
    lo: float
    hi: float
    n: int
    paired: bool
    unit: str
    min_effect: float
    margin: float
    p_positive: float
    p_equivalent: float
    verdict: str
    reason: str = ""
    n_failed: int = 0  # non-finite values replaced by fail_score
    n_censored_a: int = 0  # values of a at or above cap (true value >= cap)
    n_censored_b: int = 0
    # a non-inferiority test's margin (its verdict: the interval against -margin), where the row
    # is one; min_effect and margin then stay 0 and the report shows this instead
    non_inferiority: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    def text(self, digits: int = 3) -> str:
        """``+0.031 acc points [95% CI +0.012, +0.050], paired n=5; <reason>`` for evidence strings."""
        return effect_text(self.as_dict(), digits)


def effect_text(e: Mapping, digits: int = 3) -> str:
    """:meth:`Effect.text` of an effect dict (the ``effect`` of a claim row)."""
    est = e["estimate"]
    if est is None or math.isnan(est):
        return f"no effect ({e.get('reason') or 'no values'})"
    unit = f" {e['unit']}" if e.get("unit") else ""
    bound = "≥ " if e.get("n_censored_a") and not e.get("n_censored_b") else ""
    if math.isnan(e["lo"]) or math.isnan(e["hi"]):
        ci = " (no interval)"
    else:
        ci = f" [95% CI {e['lo']:+.{digits}g}, {e['hi']:+.{digits}g}]"
    kind = f"paired n={e['n']}" if e["paired"] else f"unpaired (Welch) n={e['n']}"
    return f"{bound}{est:+.{digits}g}{unit}{ci}, {kind}" + (f"; {e['reason']}" if e.get("reason") else "")


def verdict_of(estimate: float, p_positive: float, p_equivalent: float, min_effect: float,
               alpha: float = ALPHA) -> str:
    """The three-way verdict from the two one-sided p-values (``p < alpha`` is the interval's
    end clearing 0, or the margin); the report re-decides with Holm-adjusted p-values."""
    if p_positive < alpha and estimate >= min_effect:
        return SUPPORTED
    if p_equivalent < alpha:
        return NOT_SUPPORTED
    return INCONCLUSIVE


def _scored(xs: Sequence, fail_score: float | None) -> tuple[list, int]:
    """Non-finite values (diverged runs) replaced by ``fail_score``; None stays when it is None."""
    out, failed = [], 0
    for x in xs:
        if x is None or not math.isfinite(float(x)):
            failed += 1
            out.append(fail_score)
        else:
            out.append(float(x))
    return out, failed


def _sides(a, b, paired: bool | None) -> tuple[list, list, bool, str]:
    """The two samples, as aligned per-seed lists when paired; a note on unpaired seeds."""
    dicts = isinstance(a, Mapping), isinstance(b, Mapping)
    if paired is None:
        paired = all(dicts)
    if not paired:
        return (list(a.values()) if dicts[0] else list(a)), (list(b.values()) if dicts[1] else list(b)), False, ""
    if not all(dicts):
        raise TypeError(f"compare(paired=True) needs {{seed: value}} dicts for a and b, got "
                        f"{type(a).__name__} and {type(b).__name__}")
    seeds = sorted(set(a) & set(b))
    left = sorted(set(a) ^ set(b))
    note = f"seeds {left} ran on one side only and are left out of the pairs" if left else ""
    return [a[s] for s in seeds], [b[s] for s in seeds], True, note


def _prescored(a, b, paired: bool) -> tuple[int, str]:
    """How many failed runs a :class:`Scored` side already gave a (non-None) fail score, on the
    seeds compared, and that score in words: the side's ``fail_score`` (with its ``fail_note``),
    which is what the failed run was given, not the value compared when that value was derived
    from it (an accuracy drop); several scores are each named with their count."""
    used = set(a) & set(b) if paired else None
    hits = []
    for side in (a, b):
        for s in sorted(getattr(side, "failed", ()), key=str):
            if (used is None or s in used) and side[s] is not None:
                score, note = getattr(side, "fail_score", None), getattr(side, "fail_note", "")
                hits.append(f"{side[s] if score is None else score:g}" + (f" ({note})" if note else ""))
    kinds = list(dict.fromkeys(hits))  # distinct, in order
    if len(kinds) <= 1:
        return len(hits), (kinds[0] if kinds else "")
    return len(hits), ", ".join(f"{k} for {hits.count(k)}" for k in kinds)


def _interval(va: list[float], vb: list[float], paired: bool, resolution: float | None):
    """Estimate, standard error and degrees of freedom (paired t or Welch); a known resolution
    adds the variance of rounding to it (``k**2 / 12`` per value), so ties never give se = 0."""
    q = (resolution or 0.0) ** 2 / 12

    def var(v):
        m = sum(v) / len(v)
        return sum((x - m) ** 2 for x in v) / (len(v) - 1)

    if paired:
        d = [x - y for x, y in zip(va, vb, strict=True)]
        return sum(d) / len(d), math.sqrt((var(d) + 2 * q) / len(d)), len(d) - 1.0
    sa, sb = (var(va) + q) / len(va), (var(vb) + q) / len(vb)
    est = sum(va) / len(va) - sum(vb) / len(vb)
    se2 = sa + sb
    if se2 == 0:
        return est, 0.0, float(len(va) + len(vb) - 2)
    df = se2**2 / ((sa**2 / (len(va) - 1) if sa else 0) + (sb**2 / (len(vb) - 1) if sb else 0))
    return est, math.sqrt(se2), df


def difference_resolution(resolution: float, terms: int = 2) -> float:
    """The ``resolution`` to pass to :func:`compare` for values that are each the sum or difference of
    ``terms`` quantities rounded at ``resolution`` (an accuracy drop: accuracy at one setting minus at
    another, each a whole number of test examples).

    :func:`_interval` treats each value as its true value plus one rounding error, uniform over one
    step ``k`` and independent of the others: variance ``q = k**2 / 12`` per value, so ``q`` per
    value of a Welch interval and ``2q`` per paired difference ``a - b``. A value made of ``terms``
    rounded quantities carries ``terms`` such errors, variance ``terms * k**2 / 12 = (k *
    sqrt(terms))**2 / 12``: exactly the rounding variance of one value at step ``k * sqrt(terms)``
    (only the variance enters the interval, so that the summed error is no longer uniform does not
    matter). With it, a paired comparison of two drops adds ``2 * terms * q`` (``4q``), one term per
    rounded accuracy it is built from, instead of the ``2q`` of two plain accuracies."""
    return resolution * math.sqrt(terms)


def _check_thresholds(min_effect: float, margin: float | None) -> float:
    for name, v in (("min_effect", min_effect), ("margin", margin)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0):
            raise ValueError(f"compare: {name} must be a finite number >= 0, got {v!r}")
    margin = min_effect if margin is None else margin
    if margin > min_effect:
        raise ValueError(f"compare: margin ({margin!r}) must not exceed min_effect ({min_effect!r}): an effect "
                         "could then be both ruled out and large enough to matter")
    return float(margin)


def compare(a, b, *, min_effect: float, margin: float | None = None, paired: bool | None = None,
            unit: str = "", fail_score: float | None = None, resolution: float | None = None,
            cap: float | None = None) -> Effect:
    """The effect ``a - b`` (the claim predicts ``a > b``) with its 95% interval and verdict.

    ``a``, ``b``: lists (unpaired, Welch) or ``{seed: value}`` dicts (paired on the seeds both
    have; ``paired=None`` pairs whenever both are dicts). For "lower is better" pass ``b, a``.
    ``min_effect``: the smallest effect worth "supported"; ``margin`` (default ``min_effect``):
    "not supported" when the interval rules out an effect this large. ``fail_score`` replaces
    None/NaN/inf values (a diverged run); without it such a value makes the result inconclusive.
    ``resolution``: the step of a quantised metric (an evaluation every k steps, one test example
    of accuracy); for values that are themselves differences of such metrics (an accuracy drop) pass
    :func:`difference_resolution`, or the interval counts half their rounding. ``cap``: values at
    or above it are censored (a run that hit the step cap).
    """
    margin = _check_thresholds(min_effect, margin)
    xa, xb, paired, note = _sides(a, b, paired)
    (va, fa), (vb, fb) = _scored(xa, fail_score), _scored(xb, fail_score)
    pre, pre_score = _prescored(a, b, paired)
    failed = fa + fb + pre
    n = len(va) if paired else len(va) + len(vb)
    notes = [note] if note else []
    if pre:
        notes.append(f"{pre} failed run(s) scored {pre_score}")
    if fa + fb:
        notes.append(f"{fa + fb} failed run(s) (None/NaN/inf) scored {fail_score:g}" if fail_score is not None
                     else f"{fa + fb} failed run(s) and no fail_score to score them")
    cens_a = sum(1 for v in va if cap is not None and v is not None and v >= cap)
    cens_b = sum(1 for v in vb if cap is not None and v is not None and v >= cap)
    if cens_a or cens_b:
        notes.append(f"censored at the cap {cap:g} (true value ≥ {cap:g}): {cens_a} of a, {cens_b} of b")
    base = dict(n=n, paired=paired, unit=unit, min_effect=float(min_effect), margin=margin, n_failed=failed,
                n_censored_a=cens_a, n_censored_b=cens_b)

    def undecided(why: str, est: float = math.nan) -> Effect:
        return Effect(estimate=est, lo=math.nan, hi=math.nan, p_positive=math.nan, p_equivalent=math.nan,
                      verdict=INCONCLUSIVE, reason="; ".join([why, *notes]), **base)

    if fa + fb and fail_score is None:
        return undecided("a run failed (None/NaN/inf) and no fail_score says how bad that is")
    if not va or not vb:
        return undecided("no values on one side")
    if min(len(va), len(vb)) < 2:
        est = sum(va) / len(va) - sum(vb) / len(vb)
        return undecided("fewer than two seeds: no interval", est)
    est, se, df = _interval(va, vb, paired, resolution)
    if se == 0:
        return undecided("no spread between seeds and no resolution given: a zero-width interval would claim "
                         "infinite precision", est)
    return _decided(est, se, df, base, notes)


_BELOW_MIN = "the effect is real but below the minimum effect"
_UNDECIDED = "the interval neither excludes 0 nor rules out the minimum effect"


def as_non_inferiority(eff: Effect, margin: float) -> Effect:
    """``eff`` (an effect ``a - b`` from :func:`compare`) read as a non-inferiority test: supported
    when its interval lies above ``-margin``, not supported when it lies below, inconclusive
    otherwise (or without an interval). The result carries the margin, that verdict, and a reason
    about the margin in place of the plain comparison's (which is about a test the rule does not
    make); the notes on scored or censored runs are kept."""
    if eff.lo != eff.lo:
        verdict = INCONCLUSIVE
    else:
        verdict = SUPPORTED if eff.lo > -margin else NOT_SUPPORTED if eff.hi < -margin else INCONCLUSIVE
    notes = [r for r in eff.reason.split("; ") if r and not r.startswith((_BELOW_MIN, _UNDECIDED))]
    if eff.lo == eff.lo:  # an interval: say where it lies against -margin
        why = {NOT_SUPPORTED: [f"the interval lies below -{margin:g}"],
               INCONCLUSIVE: [f"the interval reaches below -{margin:g}"]}.get(verdict, [])
        notes = why + notes
    return replace(eff, non_inferiority=margin, verdict=verdict, reason="; ".join(notes))


def _decided(est: float, se: float, df: float, base: dict, notes: list[str]) -> Effect:
    from scipy.stats import t

    h = float(t.ppf(0.975, df)) * se
    lo, hi = est - h, est + h
    p_pos, p_eq = float(t.sf(est / se, df)), float(t.cdf((est - base["margin"]) / se, df))
    if base["n_censored_a"]:  # a's true values may be larger: no upper bound on the effect
        hi, p_eq = math.inf, 1.0
    if base["n_censored_b"]:
        lo, p_pos = -math.inf, 1.0
    verdict = verdict_of(est, p_pos, p_eq, base["min_effect"])
    why = []
    if verdict == INCONCLUSIVE:
        why.append(f"{_BELOW_MIN} {base['min_effect']:g}" if p_pos < ALPHA else _UNDECIDED)
    return Effect(estimate=est, lo=lo, hi=hi, p_positive=p_pos, p_equivalent=p_eq, verdict=verdict,
                  reason="; ".join(why + notes), **base)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (same order; NaN counts as 1)."""
    p = [1.0 if (v is None or math.isnan(v)) else float(v) for v in pvalues]
    order = sorted(range(len(p)), key=p.__getitem__)
    out, running = [1.0] * len(p), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        out[i] = running
    return out


def fmt_values(xs: Sequence[float], digits: int = 3, resolution: float | None = None,
               cap: float | None = None) -> str:
    """A table cell for one configuration that never shows a silent ``± 0``: censored values as
    ``≥ cap (cap)``, and values without spread as equal (or ``± resolution/2``)."""
    v = _clean(xs)
    if cap is not None and v and any(x >= cap for x in v):
        k = sum(1 for x in v if x >= cap)
        if k == len(v):
            return f"≥ {cap:.{digits}g} (cap, n={k})"
        return f"≥ {sum(v) / len(v):.{digits}g} ({k} of {len(v)} at the cap {cap:.{digits}g})"
    m, lo, hi, n = mean_ci(v)
    if n >= 2 and hi == lo and resolution:
        return f"{m:.{digits}g} ± {resolution / 2:.{digits - 1}g} (all {n} equal; resolution {resolution:g})"
    return fmt_ci(v, digits)


# ---------------------------------------------- older helpers (experiments are moving to compare)


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


def all_of(*verdicts: str) -> str:
    """A claim made of several parts: supported if all are, not supported if any is not."""
    if any(v == NOT_SUPPORTED for v in verdicts):
        return NOT_SUPPORTED
    if verdicts and all(v == SUPPORTED for v in verdicts):
        return SUPPORTED
    return INCONCLUSIVE


def fmt_ci(xs: Sequence[float], digits: int = 3) -> str:
    """``mean ± half-width`` for tables; ``mean (n=1)`` with one value, ``mean (all n equal)``
    without spread, ``-`` with none. Non-finite values (inf: a target never reached) are not
    averaged in, and the cell says how many there were."""
    m, lo, hi, n = mean_ci(xs)
    bad = sum(1 for x in xs if x is None or not math.isfinite(float(x)))
    if n == 0:
        return f"non-finite (all {bad})" if bad else "-"
    extra = f" (+{bad} non-finite)" if bad else ""
    if n == 1:
        return f"{m:.{digits}g} (n=1){extra}"
    if hi == lo:  # a "± 0" would read as infinite precision; the seeds merely agree
        return f"{m:.{digits}g} (all {n} equal){extra}"
    return f"{m:.{digits}g} ± {(hi - lo) / 2:.{digits - 1}g}{extra}"


# ------------------------------------------------------------------- criteria shared by experiments


def not_finite(xs: Sequence[float]) -> int:
    """How many values of ``xs`` are NaN or infinite (a measurement that failed). A None is no
    measurement at all but a damaged record, and raises TypeError as ``max`` did (the report turns
    that into an error naming the runs, :class:`lnorm.lab.runner.DamagedRunError`)."""
    return sum(1 for x in xs if not math.isfinite(float(x)))


def fmt_extreme(xs: Sequence, largest: bool = True, digits: int = 2) -> str:
    """The largest (or smallest) finite value of ``xs`` for evidence text, marked as :func:`fmt_ci`
    marks non-finite values: ``3e-07 (+1 non-finite)``, ``non-finite (all 2)``; ``-`` for none.
    Python's ``max``/``min`` would skip a NaN or return it depending on where it sits."""
    v, bad = _clean(xs), not_finite(xs)
    if not v:
        return f"non-finite (all {bad})" if bad else "-"
    return f"{(max if largest else min)(v):.{digits}g}" + (f" (+{bad} non-finite)" if bad else "")


def exact_vs_batch_norm(ln: Sequence[float], bn: Sequence[float], tol: float) -> str:
    """The claims that layer norm is exact where batch norm is not (C1, C2): supported when every
    layer-norm value is below ``tol`` and every batch-norm value above ``100 * tol``; not supported
    when a (finite) layer-norm value reaches ``tol``; inconclusive without layer-norm values, when
    batch norm's do not clear ``100 * tol`` (the probe could not have seen a difference), or when
    any value is not finite (NaN/inf).

    A non-finite value is a failed measurement, not a small one: ``nan >= tol`` is False and
    ``max``/``min`` skip a NaN, so unchecked it read as "supported". A non-finite layer-norm value
    means what was measured (an output, a gradient) was not finite, so exactness cannot be claimed;
    it cannot refute it either (the probe, not layer norm, may have failed), so inconclusive, as
    :func:`compare` decides a failed run it has no score for. A non-finite batch-norm value leaves
    unknown whether the probe sees batch norm. :func:`exact_nonfinite_note` says so in the
    evidence. A None (a damaged record) raises TypeError (:func:`not_finite`)."""
    if not ln:
        return INCONCLUSIVE
    bad_ln, bad_bn = not_finite(ln), not_finite(bn)
    if any(x >= tol for x in _clean(ln)):  # a finite failure refutes whatever the others are
        return NOT_SUPPORTED
    if bad_ln or not bn or bad_bn:
        return INCONCLUSIVE
    if min(bn) <= 100 * tol:
        return INCONCLUSIVE
    return SUPPORTED


def exact_nonfinite_note(ln: Sequence[float], bn: Sequence[float]) -> str:
    """What made :func:`exact_vs_batch_norm` unable to read a value, for the evidence ("" when every
    value is finite): how many layer-norm and batch-norm values were not finite, and what that means."""
    parts = []
    if not_finite(ln):
        parts.append(f"{not_finite(ln)} of {len(ln)} LN values not finite (NaN/inf): a failed "
                     "measurement, so exactness cannot be claimed")
    if not_finite(bn):
        parts.append(f"{not_finite(bn)} of {len(bn)} BN values not finite (NaN/inf): whether the probe sees "
                     "BN is unknown")
    return "; ".join(parts)
