"""The lab through its command line: smoke suite, report rebuild, resume, bad flags."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lnorm.cli import main
from lnorm.lab import experiments, runner


def run_cli(*argv):
    return main(["lab", *argv])


def test_list(capsys):
    assert run_cli("list") == 0
    out = capsys.readouterr().out
    for name in experiments.names():
        assert name in out
    assert "C3" in out


@pytest.mark.parametrize("argv,needle", [
    (["run", "nope", "--suite", "smoke"], "unknown experiment 'nope'"),
    (["run", "e1", "--suite", "huge"], "unknown suite 'huge'"),
    (["run", "e1", "--suite", "smoke", "--set", "e1.bogus=3"], "unknown key 'bogus'"),
    (["run", "e1", "--suite", "smoke", "--set", "bogus=3"], "no selected experiment has this key"),
    (["run", "e1", "--suite", "smoke", "--set", "e1.hidden=abc"], "expected int"),
    (["run", "e1", "--suite", "smoke", "--set", "hidden"], "key=value"),
    (["run", "e1", "--suite", "smoke", "--jobs", "0"], "--jobs must be >= 1"),
], ids=["experiment", "suite", "set-key", "set-bare-key", "set-value", "set-format", "jobs"])
def test_bad_flags_are_rejected_with_valid_choices(argv, needle, tmp_path, capsys):
    assert run_cli(*argv, "--out", str(tmp_path / "r")) == 2
    err = capsys.readouterr().err
    assert needle in err
    if "unknown experiment" in needle:
        assert "e1" in err  # lists the valid ones
    if "unknown suite" in needle:
        assert "smoke, quick, full" in err
    if "unknown key" in needle:
        assert "batch_sizes" in err


def test_cuda_without_cuda_is_rejected(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert run_cli("run", "e1", "--suite", "smoke", "--device", "cuda", "--out", str(tmp_path / "r")) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_report_on_missing_dir(tmp_path, capsys):
    assert run_cli("report", str(tmp_path / "nothing")) == 2
    assert "not a lab run directory" in capsys.readouterr().err


def _results(run_dir):
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.glob("runs/*/*/result.json"))


def test_e1_smoke_rebuild_and_resume(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    argv = ["run", "e1", "--suite", "smoke", "--out", str(out), "--no-progress", "--set", "e1.norms=batch,layer",
            "--jobs", "1"]
    assert run_cli(*argv) == 0
    text = capsys.readouterr().out
    assert "C1" in text and "report:" in text
    done = _results(out)
    assert len(done) == 4
    rec = json.loads((out / "runs/e1").glob("batch_1-*/result.json").__next__().read_text())
    assert rec["status"] == "cannot_train" and "more than 1" in rec["reason"]
    for f in ("config.json", "env.json", "results.json", "results.csv", "report.md", "report.html",
              "plots/e1_accuracy_vs_batch.png"):
        assert (out / f).exists(), f
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and html.index("Claims") < html.index("e1: ")

    # rebuild from disk alone
    md_before = (out / "report.md").read_text()
    for f in ("report.md", "report.html", "results.json"):
        (out / f).unlink()
    assert run_cli("report", str(out)) == 0
    assert (out / "report.md").read_text() == md_before

    # resume after an interruption: lose two finished runs, and make any rerun of the others fail
    lost = [out / p for p in done[:2]]
    for p in lost:
        p.unlink()
    kept_mtime = {p: os.path.getmtime(out / p) for p in done[2:]}
    ran = []
    real = runner.execute

    def spy(unit, *a, **k):
        ran.append(unit.uid)
        return real(unit, *a, **k)

    monkeypatch.setattr(runner, "execute", spy)
    assert run_cli(*argv) == 0
    assert "resuming" in capsys.readouterr().out
    assert sorted(ran) == sorted(p.parent.name for p in lost)
    assert _results(out) == done
    assert all(os.path.getmtime(out / p) == t for p, t in kept_mtime.items())


def test_results_are_deterministic_per_seed(tmp_path):
    recs = []
    for d in ("a", "b"):
        runner.run(["e1"], suite="smoke", seeds=1, jobs=1, out=tmp_path / d, device="cpu",
                   sets=["e1.norms=layer", "e1.batch_sizes=32"], progress=False, log=lambda *a: None)
        (p,) = (tmp_path / d).glob("runs/e1/*/result.json")
        recs.append(json.loads(p.read_text())["result"])
    for k in ("test_acc", "final_loss", "batch_dependence"):
        assert recs[0][k] == recs[1][k], k


@pytest.mark.slow
def test_interrupted_run_resumes_without_losing_finished_runs(tmp_path, monkeypatch, capsys):
    """Kill a real `lnorm lab run` in the middle of a suite, then run the same command again."""
    out = tmp_path / "run"
    argv = ["run", "e1", "e2", "--suite", "smoke", "--out", str(out), "--no-progress", "--jobs", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "lnorm", "lab", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:  # kill it once 3 units have finished (an event; the run's own end bounds the wait)
        while len(_results(out)) < 3 and proc.poll() is None:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    before = _results(out)
    assert before, "the run was killed before finishing any unit"
    total = 6 + 2  # e1 smoke: 3 norms x 2 batch sizes; e2 smoke: 2 norms
    assert len(before) < total, "the run finished before it could be interrupted"
    # a unit is done when its result.json is there, written last (after metrics.jsonl is renamed
    # into place): a kill can land between the two, leaving metrics.jsonl alone, which the resume
    # below redoes; a result.json never stands without its metrics
    for d in out.glob("runs/*/*"):
        assert not (d / "result.json").exists() or (d / "metrics.jsonl").exists()
    mtimes = {p: os.path.getmtime(out / p) for p in before}
    ran = []
    real = runner.execute
    monkeypatch.setattr(runner, "execute", lambda unit, *a, **k: (ran.append(unit.uid), real(unit, *a, **k))[1])
    assert run_cli(*argv) == 0
    assert len(_results(out)) == total
    assert len(ran) == total - len(before)
    assert all(os.path.getmtime(out / p) == t for p, t in mtimes.items())


def test_full_smoke_suite_through_the_cli(tmp_path, capsys):
    """Every registered experiment end to end (what CI runs), in 2 worker processes, with the report."""
    out = tmp_path / "smoke"
    assert run_cli("run", "--suite", "smoke", "--out", str(out), "--no-progress", "--jobs", "2") == 0
    text = capsys.readouterr().out
    conf = json.loads((out / "config.json").read_text())
    assert conf["experiments"] == experiments.names()
    for name in experiments.names():
        mod = experiments.get(name)
        units = runner.plan(name, runner.resolve_all([name], "smoke", [])[name], 1)
        recs = [json.loads((u.dir(out) / "result.json").read_text()) for u in units]
        assert all(r["status"] in ("ok", "cannot_train", "diverged") for r in recs), name
        for claim in mod.CLAIMS:
            assert f"\n{claim} " in "\n" + text, (name, claim)
    md = (out / "report.md").read_text()
    assert md.index("## Claims") < md.index("## e1")
    assert "MNIST-1D" in md and "91%" in md


def test_nan_loss_is_recorded_as_diverged(tmp_path, capsys):
    out = tmp_path / "div"
    argv = ["run", "e7", "--suite", "smoke", "--out", str(out), "--no-progress", "--jobs", "1",
            "--set", "e7.gains=", "--set", "e7.norms=none", "--set", "e7.lrs=1e9"]
    assert run_cli(*argv) == 0
    (p,) = out.glob("runs/e7/*/result.json")
    rec = json.loads(p.read_text())
    assert rec["status"] == "diverged", rec
    assert "loss" in rec["reason"]


def test_progress_bars_with_worker_processes(tmp_path, capsys):
    """--jobs 2 with bars: workers report steps through a queue; runs that stop early close their bar."""
    out = tmp_path / "bars"
    assert run_cli("run", "e1", "--suite", "smoke", "--out", str(out), "--jobs", "2",
                   "--set", "e1.norms=batch", "--set", "e1.batch_sizes=1,32") == 0
    err = capsys.readouterr().err
    assert "step" in err and "e1" in err
    assert len(_results(out)) == 2
