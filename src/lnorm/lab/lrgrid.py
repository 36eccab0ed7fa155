"""Learning-rate grids: each method's best setting, whether it sits at the grid's edge, and the
comparison of best learning rates (C11) with an interval.

A best setting chosen and scored on the same numbers is biased in its own favour (the winner's
noise is in its score). So settings are *selected* on one set of numbers (a selection split of the
held-out data, and the first half of the seeds when there are at least ``MIN_SPLIT_SEEDS``) and
*tested* on another (a test split, the other seeds). Scores are "higher is better" and already
scored (a diverged run carries its experiment's fail score), so nothing is dropped here.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable

from lnorm.lab import stats as S

MIN_SPLIT_SEEDS = 4  # below this, selection and test share the seeds (only the data split differs)

Scores = dict[Hashable, dict[int, float]]  # setting -> {seed: score}


def split_seeds(seeds: Iterable[int]) -> tuple[list[int], list[int], list[str]]:
    """``(selection seeds, test seeds, caveats)``: the first half and the rest with at least
    ``MIN_SPLIT_SEEDS`` seeds; otherwise every seed for both, with a caveat that says so."""
    s = sorted(set(seeds))
    if len(s) >= MIN_SPLIT_SEEDS:
        return s[:len(s) // 2], s[len(s) // 2:], []
    return s, s, [f"{len(s)} seeds: settings selected and tested on the same seeds (a different data split), "
                  f"so seed noise is shared; {MIN_SPLIT_SEEDS}+ seeds split them"]


def mean_over(values: dict[int, float], seeds: Iterable[int]) -> float:
    v = [values[s] for s in seeds if s in values]
    return sum(v) / len(v) if v else float("nan")


def best(scores: Scores, seeds: Iterable[int]) -> Hashable | None:
    """The setting with the highest mean score over ``seeds`` (None when no setting has one)."""
    seeds = list(seeds)
    means = {k: mean_over(v, seeds) for k, v in scores.items()}
    means = {k: m for k, m in means.items() if m == m}
    return max(means, key=means.get) if means else None


def edge(lr: float, lrs: Iterable[float]) -> str | None:
    """``"bottom"`` / ``"top"`` when ``lr`` is the grid's smallest / largest, else None."""
    lrs = sorted(lrs)
    if len(lrs) < 3:  # two points bracket nothing
        return "bottom" if lr == lrs[0] else "top"
    return "bottom" if lr == lrs[0] else "top" if lr == lrs[-1] else None


def edge_caveat(name: str, lr: float, lrs: Iterable[float]) -> list[str]:
    e = edge(lr, lrs)
    return [f"{name}'s best lr {lr:g} at the grid's {e} edge (its optimum may lie outside)"] if e else []


def verdict_higher_lr(ln_sel: Scores, none_sel: Scores, ln_test: Scores, sel_seeds: Iterable[int],
                      test_seeds: Iterable[int], min_effect: float, margin: float, unit: str
                      ) -> tuple[str, str, S.Effect | None, list[str]]:
    """C11, "LN may want a higher learning rate than the unnormalized net", on one lr grid.

    ``lr_none`` = the unnormalized net's best lr (selection numbers). LN's best lr above it and
    LN's best lr at or below it are picked on the selection numbers too; the effect is LN's test
    score at the first minus at the second, paired by seed: supported when LN gains at least
    ``min_effect`` from going above ``lr_none`` (95% interval above 0), not supported when the
    interval rules out a gain of ``margin``. Inconclusive when either method's best lr is at the
    grid's edge (the grid did not bracket it) or there is no lr above ``lr_none``.
    Returns ``(verdict, evidence, effect or None, caveats)``."""
    lrs = sorted(set(ln_sel) | set(none_sel))
    sel_seeds, test_seeds = list(sel_seeds), list(test_seeds)
    lr_ln, lr_no = best(ln_sel, sel_seeds), best(none_sel, sel_seeds)
    if lr_ln is None or lr_no is None:
        return S.INCONCLUSIVE, "missing runs", None, []
    caveats = edge_caveat("LN", lr_ln, lrs) + edge_caveat("no norm", lr_no, lrs)
    ev = f"best lr on the selection numbers: LN {lr_ln:g}, none {lr_no:g}"
    above = {lr: v for lr, v in ln_sel.items() if lr > lr_no}
    below = {lr: v for lr, v in ln_sel.items() if lr <= lr_no}
    if not above:
        return S.INCONCLUSIVE, ev + "; no lr above none's best", None, caveats
    hi_lr, lo_lr = best(above, sel_seeds), best(below, sel_seeds)
    pick = lambda lr: {s: ln_test[lr][s] for s in test_seeds if s in ln_test.get(lr, {})}  # noqa: E731
    eff = S.compare(pick(hi_lr), pick(lo_lr), paired=True, min_effect=min_effect, margin=margin, unit=unit,
                    fail_score=None)
    ev += f"; the effect: LN's test score at {hi_lr:g} minus at {lo_lr:g}"
    return (S.INCONCLUSIVE if caveats else eff.verdict), ev, eff, caveats
