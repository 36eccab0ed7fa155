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


def test_all_of_any_part_not_supported_sinks_the_claim():
    assert S.all_of(S.SUPPORTED, S.NOT_SUPPORTED) == S.NOT_SUPPORTED
    assert S.all_of(S.SUPPORTED, S.SUPPORTED, S.NOT_SUPPORTED) == S.NOT_SUPPORTED
    assert S.all_of() == S.INCONCLUSIVE


# ------------------------------------------------------------------------- compare (issue 18)

A_SEEDS = {0: 0.90, 1: 0.91, 2: 0.92, 3: 0.905}
B_SEEDS = {0: 0.80, 1: 0.81, 2: 0.79, 3: 0.80}


def shifted(d, by):
    return {s: v + by for s, v in d.items()}


@pytest.mark.parametrize("a,b,kw,expected", [
    (A_SEEDS, B_SEEDS, dict(min_effect=0.01), S.SUPPORTED),
    (B_SEEDS, A_SEEDS, dict(min_effect=0.01), S.NOT_SUPPORTED),  # the other direction
    ({0: 0.5, 1: 0.9, 2: 0.1}, {0: 0.5, 1: 0.1, 2: 0.9}, dict(min_effect=0.01), S.INCONCLUSIVE),  # straddles
    ({0: 0.9}, {0: 0.8}, dict(min_effect=0.01), S.INCONCLUSIVE),  # one seed
    # real (lo > 0) but 0.2 points where the claim needs 1 point, and 1 point not ruled out
    (shifted(B_SEEDS, 0.002), {0: 0.80, 1: 0.8104, 2: 0.7898, 3: 0.7997}, dict(min_effect=0.01, margin=0.0),
     S.INCONCLUSIVE),
    # the same small effect, tightly measured: an effect of 1 point is ruled out
    ({s: v + 0.002 for s, v in B_SEEDS.items()}, {0: 0.8001, 1: 0.8099, 2: 0.7901, 3: 0.7999},
     dict(min_effect=0.01), S.NOT_SUPPORTED),
], ids=["supported", "opposite-direction", "straddles", "one-seed", "real-but-below-min-effect",
        "ruled-out-by-margin"])
def test_compare_verdicts(a, b, kw, expected):
    e = S.compare(a, b, **kw)
    assert e.verdict == expected, e
    assert e.paired and e.n == len(set(a) & set(b))


def test_paired_and_unpaired_verdicts_differ_on_a_shared_seed_effect():
    # each seed's data order moves both configs by the same large amount; a beats b by 2 points on every seed
    seed_effect = {0: 0.60, 1: 0.75, 2: 0.90, 3: 0.70, 4: 0.82}
    a = {s: v + 0.02 + 0.001 * (s % 2) for s, v in seed_effect.items()}
    b = dict(seed_effect)
    paired = S.compare(a, b, min_effect=0.01)
    welch = S.compare(list(a.values()), list(b.values()), min_effect=0.01)
    assert paired.paired and not welch.paired
    assert paired.verdict == S.SUPPORTED and welch.verdict == S.INCONCLUSIVE
    assert welch.estimate == pytest.approx(paired.estimate)
    assert S.compare(a, b, min_effect=0.01, paired=False).verdict == S.INCONCLUSIVE  # dicts, Welch on request


def test_compare_intervals_and_p_values_are_scipys():
    from scipy import stats

    a, b = {0: 1.0, 1: 2.5, 2: 2.0, 3: 4.0}, {0: 0.4, 1: 2.0, 2: 1.9, 3: 2.8}
    e = S.compare(a, b, min_effect=0.1, margin=0.05)
    r = stats.ttest_rel(list(a.values()), list(b.values()), alternative="greater")
    ci = stats.ttest_rel(list(a.values()), list(b.values())).confidence_interval(0.95)
    assert (e.lo, e.hi) == (pytest.approx(ci.low, rel=1e-9), pytest.approx(ci.high, rel=1e-9))
    assert e.p_positive == pytest.approx(r.pvalue, rel=1e-9)
    d = [x - y - 0.05 for x, y in zip(a.values(), b.values(), strict=True)]
    assert e.p_equivalent == pytest.approx(stats.ttest_1samp(d, 0.0, alternative="less").pvalue, rel=1e-9)
    w = S.compare([1.0, 2.0, 4.0, 8.0], [0.5, 0.6], min_effect=0.1)
    ci = stats.ttest_ind([1.0, 2.0, 4.0, 8.0], [0.5, 0.6], equal_var=False).confidence_interval(0.95)
    assert (w.lo, w.hi) == (pytest.approx(ci.low, rel=1e-9), pytest.approx(ci.high, rel=1e-9))


def test_a_diverged_run_is_scored_not_dropped():
    # lower is better (bpc): pass base, LN. LN's seed 3 diverged; dropping it would read "supported"
    base = {0: 3.0, 1: 3.1, 2: 3.05, 3: 3.02}
    ln = {0: 2.0, 1: 2.12, 2: 2.03, 3: float("nan")}
    dropped = S.compare({s: base[s] for s in range(3)}, {s: ln[s] for s in range(3)}, min_effect=0.05)
    assert dropped.verdict == S.SUPPORTED
    e = S.compare(base, ln, min_effect=0.05, fail_score=8.0)  # log2(256): a uniform guess over bytes
    assert e.n == 4 and e.n_failed == 1 and e.verdict == S.INCONCLUSIVE
    assert "scored 8" in e.reason
    e = S.compare(base, ln, min_effect=0.05)  # no fail_score: undecidable, and it says why
    assert e.verdict == S.INCONCLUSIVE and "fail_score" in e.reason and math.isnan(e.lo)
    e = S.compare(base, {**ln, 3: None}, min_effect=0.05, fail_score=8.0)
    assert e.n_failed == 1 and e.estimate == pytest.approx((3.0 + 3.1 + 3.05 + 3.02 - 8.0 - 6.15) / 4)


def test_scored_gives_every_run_of_a_config():
    from lnorm.lab import analysis as A

    recs = [{"params": {"norm": "layer"}, "seed": 0, "status": "ok", "result": {"acc": 0.9}},
            {"params": {"norm": "layer"}, "seed": 1, "status": "diverged", "result": {"diverged_step": 4}},
            {"params": {"norm": "layer"}, "seed": 2, "status": "cannot_train", "result": {}},
            {"params": {"norm": "layer"}, "seed": 3, "status": "error", "result": {}},
            {"params": {"norm": "batch"}, "seed": 0, "status": "ok", "result": {"acc": 0.5}}]
    got = A.scored(recs, "acc", 0.1, norm="layer")
    assert got == {0: 0.9, 1: 0.1, 2: 0.1} and got.failed == {1, 2}
    assert A.scored(recs, "acc", None, norm="layer") == {0: 0.9, 1: None, 2: None}
    # compare counts the runs scored upstream once, and says so
    other = A.scored([{**r, "status": "ok", "result": {"acc": 0.5 + 0.01 * r["seed"]}} for r in recs[:3]], "acc", 0.1)
    e = S.compare(got, other, min_effect=0.01)
    assert e.n_failed == 2 and "2 failed run(s) scored 0.1" in e.reason
    assert S.compare(A.scored(recs, "acc", None, norm="layer"), other, min_effect=0.01).n_failed == 2


def test_holm_matches_the_step_down_rule_and_changes_a_verdict():
    assert S.holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert S.holm([0.001, float("nan")]) == pytest.approx([0.002, 1.0])
    assert S.holm([]) == []
    # three secondary rows: each alone is supported, corrected only the strongest stays so
    rows = [S.compare(shifted(B_SEEDS, d), {0: 0.8, 1: 0.805, 2: 0.795, 3: 0.801}, min_effect=0.001)
            for d in (0.02, 0.008, 0.0075)]  # p = 0.001, 0.016, 0.019
    assert [r.verdict for r in rows] == [S.SUPPORTED] * 3
    adj = S.holm([r.p_positive for r in rows])
    adj_eq = S.holm([r.p_equivalent for r in rows])
    after = [S.verdict_of(r.estimate, p, q, r.min_effect) for r, p, q in zip(rows, adj, adj_eq, strict=True)]
    assert after == [S.SUPPORTED, S.INCONCLUSIVE, S.INCONCLUSIVE]


def test_equivalence_margin_decides_not_supported():
    a, b = {0: 0.801, 1: 0.812, 2: 0.790, 3: 0.803}, dict(B_SEEDS)  # effect ~ +0.0015 ± 0.003
    assert S.compare(a, b, min_effect=0.02, margin=0.01).verdict == S.NOT_SUPPORTED
    assert S.compare(a, b, min_effect=0.02, margin=0.0).verdict == S.INCONCLUSIVE  # 0 itself not ruled out


def test_min_effect_and_margin_are_checked():
    with pytest.raises(ValueError, match="margin"):
        S.compare([1.0, 2.0], [1.0, 2.0], min_effect=0.01, margin=0.02)
    with pytest.raises(ValueError, match="min_effect"):
        S.compare([1.0, 2.0], [1.0, 2.0], min_effect=-0.1)
    with pytest.raises(TypeError, match="paired=True"):
        S.compare([1.0, 2.0], [1.0, 2.0], min_effect=0.1, paired=True)


def test_zero_spread_never_gives_a_zero_width_interval():
    a, b = {0: 150, 1: 150, 2: 150}, {0: 150, 1: 150, 2: 150}
    e = S.compare(a, b, min_effect=10)
    assert e.verdict == S.INCONCLUSIVE and math.isnan(e.lo) and "no spread" in e.reason
    # steps to a threshold measured every 10 steps: rounding alone allows a few steps either way
    e = S.compare({0: 40, 1: 40, 2: 40}, {0: 20, 1: 20, 2: 20}, min_effect=10, resolution=10)
    assert e.lo < 20 < e.hi and e.hi - e.lo > 5
    assert S.fmt_ci([150.0, 150.0, 150.0]) == "150 (all 3 equal)"
    # a run that never reached the target is not averaged away in silence
    assert S.fmt_ci([2.0, float("inf")]) == "2 (n=1) (+1 non-finite)"
    assert S.fmt_ci([float("inf")] * 3) == "non-finite (all 3)"
    assert "± 5" in S.fmt_values([40, 40, 40], resolution=10)


def test_censored_values_leave_their_side_of_the_interval_open():
    # base hit the 150-step cap on every seed, LN reached the target at ~25: steps saved >= 125
    base, ln = {0: 150, 1: 150, 2: 150}, {0: 20, 1: 30, 2: 25}
    e = S.compare(base, ln, min_effect=10, cap=150, resolution=10)
    assert e.verdict == S.SUPPORTED and e.hi == math.inf and e.n_censored_a == 3
    assert e.text().startswith("≥ ")
    # the other way round the censored side only makes the effect more negative: still ruled out
    e = S.compare(ln, base, min_effect=10, cap=150, resolution=10)
    assert e.verdict == S.NOT_SUPPORTED and e.lo == -math.inf and e.hi < 0
    # both sides at the cap: the steps saved could be anything from 0 up
    e = S.compare(base, {0: 140, 1: 150, 2: 150}, min_effect=10, cap=150, resolution=10)
    assert e.verdict == S.INCONCLUSIVE and e.lo == -math.inf and e.hi == math.inf
    assert S.fmt_values([150, 150, 150], cap=150) == "≥ 150 (cap, n=3)"
    assert "1 of 3 at the cap" in S.fmt_values([150, 100, 120], cap=150)


def test_effect_as_dict_and_text():
    e = S.compare(A_SEEDS, B_SEEDS, min_effect=0.01, unit="acc points")
    d = e.as_dict()
    assert set(d) >= {"estimate", "lo", "hi", "n", "paired", "unit", "min_effect", "margin", "p_positive",
                      "p_equivalent", "verdict"}
    assert "acc points [95% CI +" in e.text() and "paired n=4" in e.text()


def test_primary_registry_names_one_row_per_claim_of_experiments_that_test_it():
    from lnorm.lab import experiments
    from lnorm.lab.claims import CLAIMS, PRIMARY

    assert set(PRIMARY) == set(CLAIMS)
    for claim, (exp, key) in PRIMARY.items():
        assert claim in experiments.get(exp).CLAIMS, (claim, exp)
        assert key.startswith(claim + "-"), key
    assert len(set(PRIMARY.values())) == len(PRIMARY)


def test_claim_row_roles_follow_the_registry():
    from lnorm.lab import analysis as A

    e = S.compare(A_SEEDS, B_SEEDS, min_effect=0.01)
    assert A.claim_row("e3", "C4", "C4-lstm-convergence", e, "c")["role"] == "primary"
    assert A.claim_row("e3", "C4", "C4-gru-convergence", e, "c")["role"] == "secondary"
    with pytest.raises(ValueError, match="not the registered primary"):
        A.claim_row("e3", "C4", "C4-gru-convergence", e, "c", role="primary")
    row = A.claim_row("e2", "C1", "C1-batch-independence", None, "c", role="by construction",
                      verdict=S.SUPPORTED, evidence="LN max 1e-8")
    assert row["role"] == "by construction" and "effect" not in row
    with pytest.raises(ValueError, match="neither an effect nor a verdict"):
        A.claim_row("e2", "C1", "x", None, "c")


def test_difference_resolution_adds_one_rounding_term_per_rounded_quantity():
    from scipy.stats import t

    # values that are each a difference of two quantities rounded at k = 10: ties leave only the
    # rounding variance, 4 * k**2 / 12 per paired difference (two rounded terms on each side)
    k, n = 10, 3
    e = S.compare({0: 40, 1: 40, 2: 40}, {0: 20, 1: 20, 2: 20}, min_effect=10,
                  resolution=S.difference_resolution(k))
    assert (e.hi - e.lo) / 2 == pytest.approx(float(t.ppf(0.975, n - 1)) * math.sqrt(4 * k**2 / 12 / n))
    assert S.difference_resolution(k, 3) ** 2 == pytest.approx(3 * k**2)
