"""`lnorm lab run ddp --nproc 2`: the smoke config through the CLI, a failing worker, resume."""

import json

import pytest
import torch.distributed as dist

from lnorm.cli import main
from lnorm.lab import runner
from lnorm.lab.experiments import ddp

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def run_cli(*argv):
    return main(["lab", *argv])


_train = ddp.train


def _fail_on_rank1(rank, *args, **kwargs):
    """Stands in for ddp.train in the workers (they import it from this module by name)."""
    if rank == 1:
        raise RuntimeError("rank 1 breaks on purpose")
    return _train(rank, *args, **kwargs)


def test_ddp_smoke_through_cli_with_failing_worker_and_resume(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    # --jobs 1: the units run in this process, where the monkeypatch below applies
    argv = ["run", "ddp", "--suite", "smoke", "--nproc", "2", "--jobs", "1", "--out", str(out), "--no-progress"]

    # a worker that fails ends its unit with the worker's error (no hang); the command exits 1
    monkeypatch.setattr(ddp, "train", _fail_on_rank1)
    assert run_cli(*argv) == 1
    errors = [json.loads(p.read_text()) for p in out.glob("runs/ddp/*/error.json")]
    assert len(errors) == 3  # the three 2-process units; the 1-process ones finished
    assert all("rank 1 of 2 failed" in e["reason"] and "rank 1 breaks on purpose" in e["reason"] for e in errors)
    assert len(list(out.glob("runs/ddp/*/result.json"))) == 2
    monkeypatch.undo()
    capsys.readouterr()

    # the same command resumes: only the failed units run, and the report is complete
    assert run_cli(*argv) == 0
    text = capsys.readouterr().out
    assert "resuming" in text and "3 ok" in text
    conf, cfgs = runner.load_run_config(out)
    assert cfgs["ddp"].nproc == 2
    recs = {(r["params"]["norm"], r["params"]["procs"]): r for r in runner.load_results(out, conf, cfgs)["ddp"]}
    assert sorted(recs) == [("batch", 1), ("batch", 2), ("layer", 1), ("layer", 2), ("sync", 2)]
    assert all(r["status"] == "ok" for r in recs.values())
    gap = {k: r["result"]["grad_gap"] for k, r in recs.items()}
    assert gap[("layer", 2)] < 1e-4 and gap[("sync", 2)] < 1e-4, gap  # float32 rounding only
    assert gap[("batch", 2)] > 1e-2, gap  # per-process statistics
    assert recs[("sync", 2)]["result"]["comm_ms_per_step"] > 0
    assert recs[("layer", 2)]["result"]["comm_ms_per_step"] == 0  # no SyncBatchNorm, no collectives of its own
    assert "\nC1 " in "\n" + text and "\nC3 " in "\n" + text
    md = (out / "report.md").read_text()
    assert "## ddp" in md and "sync comm share" in md and (out / "plots/ddp_mlp_loss.png").exists()


@pytest.mark.parametrize("extra, needle", [
    (["--nproc", "1"], "ddp.nproc must be >= 2"),
    (["--nproc", "3", "--set", "ddp.batch_sizes=8"], "multiples of nproc=3"),
    (["--set", "ddp.norms=batch,weird"], "ddp.norms: unknown name 'weird'; valid: batch, sync, layer, none"),
], ids=["nproc-1", "batch-not-divisible", "unknown-norm"])
def test_ddp_rejects_bad_options(extra, needle, tmp_path, capsys):
    assert run_cli("run", "ddp", "--suite", "smoke", "--out", str(tmp_path / "r"), "--no-progress", *extra) == 2
    assert needle in capsys.readouterr().err
