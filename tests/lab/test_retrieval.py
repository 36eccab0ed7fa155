"""The retrieval experiment (C12): its criterion on synthetic numbers and its smoke config via the CLI."""

import json
import math

import pytest

from lnorm.cli import main
from lnorm.lab import stats as S
from lnorm.lab.experiments import retrieval as R

SUP, NOT, INC = S.SUPPORTED, S.NOT_SUPPORTED, S.INCONCLUSIVE
def seeds(*v):
    return dict(enumerate(v))


high = seeds(560.0, 562.5, 561.0)
low = seeds(540.0, 541.0, 539.0)
noisy_a, noisy_b = seeds(500.0, 560.0, 530.0), seeds(530.0, 500.0, 560.0)
same_a, same_b = seeds(550.0, 550.2, 549.8), seeds(550.1, 550.0, 549.9)
UNTRAINED = 300.0  # the R-sum a diverged run scores
STILL = ["order + GRU still improving at the end"]


@pytest.mark.parametrize(
    "rsum_ln, rsum_base, caveats, want",
    [
        (high, low, [], SUP),  # better recall
        (low, high, [], NOT),  # the baseline's test recall is better
        (same_a, same_b, [], NOT),  # the interval rules out a 1-point gain
        (noisy_a, noisy_b, [], INC),
        (seeds(560.0), seeds(540.0), [], INC),  # one seed: no interval, no verdict
        (high, low, STILL, INC),  # better so far, but the runs had not converged
        (high, seeds(math.nan, math.inf, math.nan), [], SUP),  # diverged baseline runs are scored, not dropped
        # a gain of 1.5 R-sum points on every seed: real, but below the 3 points the claim cares about
        (seeds(541.5, 542.6, 540.4), low, [], INC),
    ],
    ids=["better", "baseline-better", "no-effect", "noisy", "one-seed", "still-improving", "diverged-scored",
         "below-min-effect"],
)
def test_c12_primary_criterion(rsum_ln, rsum_base, caveats, want):
    verdict, evidence, eff = R.verdict_c12(rsum_ln, rsum_base, caveats, UNTRAINED)
    assert verdict == want, (evidence, eff)
    assert "test R-sum" in evidence and eff.paired


@pytest.mark.parametrize("auc_ln, auc_base, want", [(high, low, SUP), (low, high, NOT), (noisy_a, noisy_b, INC)],
                         ids=["faster", "slower", "noisy"])
def test_c12_convergence_criterion(auc_ln, auc_base, want):
    verdict, evidence, _ = R.verdict_c12_convergence(auc_ln, auc_base, UNTRAINED)
    assert verdict == want and "mean validation R-sum" in evidence


def test_improving_at_end():
    assert R.improving_at_end([[100.0, 500.0, 520.0], [100.0, 510.0, 515.0]])  # +12.5 on average
    assert not R.improving_at_end([[100.0, 500.0, 501.0], [100.0, 510.0, 510.0]])
    assert not R.improving_at_end([[100.0]])


def test_analyze_says_when_runs_are_still_improving():
    cfg = R.Config(models=(R.BASE, R.LN))
    recs = [{"params": {"model": m}, "seed": s, "status": "ok",
             "result": {"test_rsum": (560.0 if m == R.LN else 540.0) + s * (1 + (m == R.LN)), "mean_val_rsum": 500.0 + s,
                        "curve_val_rsum": [100.0, 450.0, 500.0], "curve_step": [0, 75, 150], "curve_time": [0, 1, 2],
                        "best_step": 150,
                        "best_time_s": 1.0}}
            for m in cfg.models for s in range(3)]
    rows = {c["key"]: c for c in R.analyze(cfg, {"retrieval": recs})["claims"]}
    primary = rows["C12-test-rsum"]
    assert primary["role"] == "primary" and primary["verdict"] == INC
    assert "still improving" in primary["caveats"][0] and primary["effect"]["lo"] > 0
    assert rows["C12-convergence"]["role"] == "secondary"


def test_first_reach():
    assert R.first_reach([0, 10, 20], [100.0, 550.0, 560.0], 540.0) == 10
    assert R.first_reach([0, 10], [100.0, 500.0], 540.0) == math.inf


def test_unknown_model_is_rejected():
    with pytest.raises(ValueError, match="unknown model 'order-lstm'"):
        R.units(R.Config(models=("order-gru", "order-lstm")))


def test_smoke_through_the_cli(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["lab", "run", "retrieval", "--suite", "smoke", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "C12" in text and "retrieval" in text
    results = sorted(out.glob("runs/retrieval/*/result.json"))
    assert len(results) == len(R.Config().models)
    for p in results:
        rec = json.loads(p.read_text())
        assert rec["status"] == "ok", rec.get("reason")
        r = rec["result"]
        for k in ("test_caption_r1", "test_image_r10", "test_caption_mean_rank", "test_rsum", "mean_val_rsum"):
            assert math.isfinite(r[k]), k
        assert 0 <= r["test_caption_r1"] <= r["test_caption_r5"] <= r["test_caption_r10"] <= 100
        assert r["test_image_mean_rank"] >= 1
        assert r["curve_step"] == [0, 2, 4]
        lines = (p.parent / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(x)["step"] for x in lines] == [0, 2, 4]
    md = (out / "report.md").read_text()
    section = md[md.index("## retrieval"):]
    # the recall table: the paper's MSCOCO rows beside ours, and the plain statement of the data
    assert "| OE + LN (paper, MSCOCO) | 48.5 | 80.6 | 89.8 | 5.1 | 38.9 | 74.3 | 86.3 | 7.6 |" in section
    assert "| order + LN-GRU |" in section and "| cosine + GRU |" in section
    assert "What this data is" in section and "How it differs from MSCOCO" in section
    for name in ("retrieval_val_rsum_steps", "retrieval_val_rsum_time"):
        assert (out / "plots" / f"{name}.png").exists()
