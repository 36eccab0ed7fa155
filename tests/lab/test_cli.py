"""The lab through its command line: smoke suite, report rebuild, resume, bad flags."""

import json
import os

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


def test_report_on_missing_dir(tmp_path, capsys):
    assert run_cli("report", str(tmp_path / "nothing")) == 2
    assert "not a lab run directory" in capsys.readouterr().err


def _results(run_dir):
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.glob("runs/*/*/result.json"))


def test_e1_smoke_rebuild_and_resume(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    argv = ["run", "e1", "--suite", "smoke", "--out", str(out), "--no-progress", "--set", "e1.norms=batch,layer"]
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
