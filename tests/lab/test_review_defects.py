"""Regressions of four defects a review confirmed in the lab: a NaN read as exact in the C1/C2
checks, tables and figures that silently averaged only the finished runs, C7's second part
Holm-adjusted after the primary had used its unadjusted verdict, and a failed-run note that named
a derived value instead of the score the failed run was given."""

from __future__ import annotations

import math

import pytest

from lnorm.lab import analysis as A
from lnorm.lab import claims as CL
from lnorm.lab import report as R
from lnorm.lab import stats as S
from lnorm.lab.experiments import ddp
from lnorm.lab.experiments import e1_batch_size as e1
from lnorm.lab.experiments import e2_train_eval as e2
from lnorm.lab.experiments import e5_cnn as e5
from lnorm.lab.experiments import e9_recurrent_bn as e9

NAN, INF = math.nan, math.inf
SUP, NOT, INC = S.SUPPORTED, S.NOT_SUPPORTED, S.INCONCLUSIVE


# 1. a non-finite value in the exact checks (C1, C2) -------------------------------------------

@pytest.mark.parametrize("ln,bn,expected", [
    ([NAN, 1e-6], [0.5, 0.6], INC),  # max() kept the NaN first: nan >= tol is False -> "supported"
    ([1e-6, NAN], [0.5, 0.6], INC),  # max() skipped the NaN
    ([INF, 1e-6], [0.5, 0.6], INC),
    ([1e-6], [NAN, 0.5], INC),  # min() kept the NaN: the probe's sight of BN is unknown
    ([1e-6], [0.5, NAN], INC),
    ([NAN, 1e-2], [0.5], NOT),  # a finite LN value past tol refutes exactness whatever the NaN is
    ([1e-6, 2e-6], [0.5, 0.6], SUP),  # unchanged when every value is finite
], ids=["ln-nan-first", "ln-nan-last", "ln-inf", "bn-nan-first", "bn-nan-last", "finite-failure",
        "finite"])
def test_exact_vs_batch_norm_never_reads_a_non_finite_value_as_exact(ln, bn, expected):
    assert S.exact_vs_batch_norm(ln, bn, 1e-4) == expected


def test_exact_vs_batch_norm_still_raises_on_a_damaged_record():
    # a None is no measurement but a damaged record (runs write NaN as "nan"): TypeError, which the
    # report turns into an error naming the runs, as max() raised before
    with pytest.raises(TypeError):
        S.exact_vs_batch_norm([None, 1e-6], [0.5], 1e-4)


@pytest.mark.parametrize("row", [
    lambda ln, bn: dict(zip(("verdict", "evidence"), e1.verdict_c1(ln, bn), strict=True)),
    e2.row_c1,
    e2.row_c2_ln_exact,
    lambda ln, bn: ddp.row_c1(ln, bn, 1e-4, 2),
], ids=["e1-c1", "e2-c1", "e2-c2-ln-exact", "ddp-c1"])
def test_exact_rows_say_a_value_was_not_finite(row):
    r = row([NAN, 1e-7], [0.3, 0.4])
    assert r["verdict"] == INC
    assert "1 of 2 LN values not finite" in r["evidence"] and "nan" not in r["evidence"], r["evidence"]
    assert "1e-07 (+1 non-finite)" in r["evidence"]  # the finite maximum, marked as fmt_ci marks them
    r = row([1e-7], [NAN, 0.4])
    assert r["verdict"] == INC and "1 of 2 BN values not finite" in r["evidence"], r["evidence"]
    assert row([1e-7], [0.3])["verdict"] == SUP


# 2. tables and figures say how many runs failed ------------------------------------------------

def _e1_records():
    acc = {("batch", 128): [.90, .91, .92], ("batch", 4): [.80, .82, None], ("layer", 128): [.90, .91, .90],
           ("layer", 4): [.89, .90, .90], ("none", 1): [.85, .86, .85], ("layer", 1): [.86, .87, .86]}
    recs = []
    for (n, b), vals in acc.items():
        for s, v in enumerate(vals):
            ok = v is not None
            recs.append({"params": {"norm": n, "batch_size": b}, "seed": s, "status": "ok" if ok else "diverged",
                         "result": {"test_acc": v, "final_loss": 0.3, "ms_per_step": 1.0, "curve_acc": [v, v]}
                         if ok else {}})
    recs += [{"params": {"norm": "batch", "batch_size": 1}, "seed": s, "status": "cannot_train", "result": {}}
             for s in range(3)]
    return e1.Config(norms=("none", "batch", "layer"), batch_sizes=(1, 4, 128), examples=128 * 4), recs


def test_tables_and_figures_count_the_failed_runs_they_leave_out_of_the_mean():
    cfg, recs = _e1_records()
    out = e1.analyze(cfg, {"e1": recs})
    rows = {(r[0], r[1]): r for r in out["tables"][0]["rows"]}
    assert rows["batch", 4][3] == "0.81 ± 0.13 (+1 diverged)"
    assert rows["batch", 4][4].endswith("(+1 diverged)") and rows["batch", 4][5].endswith("(+1 diverged)")
    assert rows["batch", 128][3] == "0.91 ± 0.025"  # no failed run: nothing added
    assert rows["batch", 1][3:] == ["cannot train"] * 3  # no finished run: the status, as before
    bn = next(s for s in out["figures"][0]["series"] if s["label"].startswith("batch"))
    assert bn["label"] == "batch (+3 cannot train at batch_size=1; +1 diverged at batch_size=4)"
    assert bn["failed"] == {"batch_size=1": {"cannot_train": 3}, "batch_size=4": {"diverged": 1}}
    assert bn["x"] == [4, 128] and bn["y"][0] == pytest.approx(0.81)  # the mean is still of the finished runs
    ln = next(s for s in out["figures"][0]["series"] if s["label"].startswith("layer"))
    assert ln["label"] == "layer" and ln["failed"] == {}
    # a mixed cell and a curve say the same; the verdicts still score the failed run (chance)
    mixed = recs + [{"params": {"norm": "layer", "batch_size": 4}, "seed": 3, "status": "cannot_train", "result": {}}]
    assert A.cell(mixed, "test_acc", norm="layer", batch_size=4).endswith("(+1 cannot train)")
    curve = A.curve_series(recs, "curve_acc", "batch@4", "curve_acc", norm="batch", batch_size=4)
    assert curve["label"] == "batch@4 (+1 diverged)" and curve["failed"] == {"all": {"diverged": 1}}
    c3 = next(c for c in out["claims"] if c["key"] == "C3-small-batch-drop")
    assert c3["effect"]["n_failed"] == 1 and c3["effect"]["n"] == 3


# 3. C7's second part shows the verdict the primary used -----------------------------------------

def test_c7_second_part_is_a_component_outside_the_holm_family():
    # LN beats no norm at p = 0.015 unadjusted ("supported"), 0.03 after Holm over two rows
    # ("inconclusive"): the report showed the primary supported on that part while showing the
    # part inconclusive
    vals = {"layer": [0.90, 0.92, 0.91, 0.93], "none": [0.88, 0.885, 0.89, 0.875],
            "batch": [0.94, 0.955, 0.95, 0.97]}
    loss = {"layer": [0.50, 0.52, 0.51, 0.55], "batch": [0.36, 0.50, 0.46, 0.41], "none": [0.6] * 4}
    recs = [{"params": {"data": "cluttered", "norm": n, "lr": 0.01}, "seed": s, "status": "ok",
             "result": {"test_acc": vals[n][s], "mean_train_loss": loss[n][s]}} for n in vals for s in range(4)]
    chosen = {n: {"lr": 0.01, "edge": [], "improving": [], "test_seeds": list(range(4)), "split": []} for n in vals}
    rows = [{**r, "experiment": "e5", "text": ""} for r in e5._claims(recs, chosen)]
    adj = {r["key"]: r for r in CL.adjust_secondary(rows)}
    primary, part2 = adj["C7-bn-vs-ln"], adj["C7-ln-vs-none"]
    assert primary["verdict"] == SUP
    assert part2["verdict"] == SUP and "holm" not in part2  # what the primary used, unadjusted
    assert part2["role"] == "component"
    assert adj["C7-ln-slower-than-bn"]["holm"]["family"] == 1  # the secondary family without it
    assert R.row_verdict(part2) == "supported (part of the primary; not Holm-corrected)"
    assert "component" in R.SUMMARY_NOTE and "intersection-union" in R.SUMMARY_NOTE
    assert "component" in CL.ROLES


# 4. the failed-run note names the score the failed run got --------------------------------------

def test_failed_run_note_names_the_score_not_the_derived_value():
    cfg, recs = _e1_records()
    row = e1._c3_row(cfg, recs, [1, 4, 128])
    # BN's seed 2 diverged at batch 4: scored 0.1 (chance), its drop 0.92 - 0.1 = 0.82
    assert "1 failed run(s) scored 0.1 (chance)" in row["effect"]["reason"], row["effect"]["reason"]
    assert "0.82" not in row["effect"]["reason"]
    # e9: a failed run scores chance at both lengths; the change compared is 0, the score 0.1
    ln_L, ln_T = {0: 0.9, 1: 0.91, 2: 0.92}, {0: 0.85, 1: 0.86, 2: 0.88}
    bn_L, bn_T = {0: 0.9, 1: 0.9, 2: None}, {0: 0.5, 1: 0.55, 2: None}
    r = e9.row_c14_extrapolation(ln_L, ln_T, bn_L, bn_T, 0.2)
    assert "1 failed run(s) scored 0.1 (chance)" in r["effect"]["reason"], r["effect"]["reason"]
    # a Scored that holds the scores themselves still names them; two scores are each named
    a = S.Scored({0: 0.9, 1: 0.1, 2: 0.8}, failed={1})
    b = S.Scored({0: 0.5, 1: 0.6, 2: 2.3}, failed={2}, fail_score=2.3, fail_note="uniform")
    assert "2 failed run(s) scored 0.1 for 1, 2.3 (uniform) for 1" in S.compare(a, b, min_effect=0.1).reason
