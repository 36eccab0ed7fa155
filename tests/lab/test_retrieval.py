"""The retrieval experiment (C12): its criterion on synthetic numbers and its smoke config via the CLI."""

import json
import math

import pytest

from lnorm.cli import main
from lnorm.lab import stats as S
from lnorm.lab.experiments import retrieval as R

SUP, NOT, INC = S.SUPPORTED, S.NOT_SUPPORTED, S.INCONCLUSIVE
high = [560.0, 562.0, 561.0]
low = [540.0, 541.0, 539.0]
noisy_a, noisy_b = [500.0, 560.0, 530.0], [530.0, 500.0, 560.0]
same = [550.0, 550.2, 549.8]


@pytest.mark.parametrize(
    "rsum_ln, rsum_base, auc_ln, auc_base, want",
    [
        (high, low, high, low, SUP),  # better recall and faster convergence
        (same, same, high, low, SUP),  # faster only: the recall interval straddles 0, not below it
        (high, low, same, same, SUP),  # better recall only
        (low, high, high, low, NOT),  # faster, but the baseline's test recall is better
        (same, same, same, same, NOT),  # both intervals rule out a 1-point gain
        (noisy_a, noisy_b, noisy_a, noisy_b, INC),
        ([560.0], [540.0], [560.0], [540.0], INC),  # one seed: no intervals, no verdict
    ],
    ids=["both", "faster-only", "better-only", "baseline-better", "no-effect", "noisy", "one-seed"],
)
def test_c12_criterion(rsum_ln, rsum_base, auc_ln, auc_base, want):
    verdict, evidence = R.verdict_c12(rsum_ln, rsum_base, auc_ln, auc_base)
    assert verdict == want
    assert "test R-sum" in evidence and "mean val R-sum" in evidence


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
