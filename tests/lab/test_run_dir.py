"""The run directory under abuse: kill -9, two runs at once, runs with other settings, damaged files,
bad --out and --set values. Every failure is one line with exit status 2, never a traceback."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from interruptible import interruptible
from lnorm.cli import main
from lnorm.lab import runner

TINY = ["--suite", "smoke", "--no-progress", "--jobs", "1", "--set", "e1.norms=layer", "--set", "e1.batch_sizes=32"]
TINY_E2 = ["--suite", "smoke", "--no-progress", "--jobs", "1", "--set", "e2.norms=layer", "--set", "e2.steps=3"]


def run_cli(capsys, *argv):
    code = main(["lab", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(err: str, command: str = "run") -> bool:
    return err.startswith(f"lnorm lab {command}: error: ") and err.count("\n") == 1 and "Traceback" not in err


def _results(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("runs/*/*/result.json"))


# --out and --set


@pytest.mark.parametrize("where", ["file", "under-file"])
def test_out_that_is_a_file_is_a_usage_error(tmp_path, capsys, where):
    f = tmp_path / "f"
    f.write_text("not a directory")
    out = f if where == "file" else f / "run"
    code, _, err = run_cli(capsys, "run", "e1", *TINY, "--out", out)
    assert code == 2 and one_line_error(err), err
    assert str(out) in err and f.read_text() == "not a directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_out_is_a_usage_error(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    code, _, err = run_cli(capsys, "run", "e1", *TINY, "--out", locked / "run")
    assert code == 2 and one_line_error(err), err


@pytest.mark.parametrize("setting, needle", [
    ("e2.steps=-5", "> 0, got -5"), ("e2.steps=0", "> 0, got 0"), ("hidden=0", "> 0, got 0"),
    ("batch_size=0", "> 0, got 0"), ("lr=nan", "finite number, got nan"), ("e2.lr=inf", "finite number, got inf"),
    ("e1.batch_sizes=32,0", "> 0, got 0"), ("e1.max_steps=-1", ">= 0, got -1"),
], ids=["steps-negative", "steps-zero", "hidden-zero", "batch-zero", "lr-nan", "lr-inf", "tuple-zero", "max-steps"])
def test_out_of_range_set_values_are_usage_errors(tmp_path, capsys, setting, needle):
    code, out, err = run_cli(capsys, "run", "e1", "e2", "--suite", "smoke", "--no-progress", "--set", setting,
                             "--out", tmp_path / "r")
    assert code == 2 and one_line_error(err), err
    assert needle in err and out == ""
    assert not (tmp_path / "r" / "runs").exists()


def test_zero_where_zero_has_a_meaning_is_accepted():
    cfgs = runner.resolve_all(["e1", "retrieval"], "smoke", ["e1.max_steps=0", "retrieval.train_images=0"])
    assert cfgs["e1"].max_steps == 0 and cfgs["retrieval"].train_images == 0


# runs with other settings into the same --out


def test_another_experiment_into_the_same_out_keeps_the_finished_one(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(capsys, "run", "e1", *TINY, "--out", out)[0] == 0
    assert run_cli(capsys, "run", "e2", *TINY_E2, "--out", out)[0] == 0
    conf = json.loads((out / "config.json").read_text())
    assert conf["experiments"] == ["e1", "e2"] and conf["configs"]["e1"]["norms"] == ["layer"]
    md = (out / "report.md").read_text()
    assert "## e1" in md and "## e2" in md
    sections = json.loads((out / "results.json").read_text())["sections"]
    assert [s["name"] for s in sections] == ["e1", "e2"] and sections[0]["status"] == {"ok": 1}
    assert run_cli(capsys, "report", out)[0] == 0  # rebuilt from disk: still both
    assert "## e1" in (out / "report.md").read_text()


@pytest.mark.parametrize("first, second, needle", [
    (["e1", *TINY], ["e1", *TINY, "--set", "e1.hidden=8"], "e1: hidden 64 -> 8"),
    (["e1", *TINY, "--seeds", "2"], ["e1", *TINY], "e1: seeds 2 -> 1"),
    (["e1", *TINY], ["e1", *TINY, "--suite", "quick"], "e1: "),
    (["e1", *TINY], ["e2", *TINY_E2, "--seeds", "2"], "seeds 1 -> 2"),
    (["e1", *TINY], ["e2", *TINY_E2, "--suite", "quick"], "suite 'smoke' -> 'quick'"),
], ids=["set", "fewer-seeds", "suite", "seeds-of-kept", "suite-of-kept"])
def test_other_settings_for_finished_runs_are_refused(tmp_path, capsys, first, second, needle):
    out = tmp_path / "run"
    assert run_cli(capsys, "run", *first, "--out", out)[0] == 0
    conf, done = (out / "config.json").read_text(), _results(out)
    code, _, err = run_cli(capsys, "run", *second, "--out", out)
    assert code == 2 and one_line_error(err), err
    assert "finished runs made with other settings" in err and "another --out" in err and needle in err
    assert (out / "config.json").read_text() == conf and _results(out) == done


def test_more_seeds_for_the_same_experiment_add_runs(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(capsys, "run", "e1", *TINY, "--out", out)[0] == 0
    (first,) = _results(out)
    mtime = first.stat().st_mtime_ns
    code, text, _ = run_cli(capsys, "run", "e1", *TINY, "--seeds", "2", "--out", out)
    assert code == 0 and "1 of 2 runs already done" in text
    assert len(_results(out)) == 2 and first.stat().st_mtime_ns == mtime


# damaged run files


def test_damaged_runs_are_named_and_redone(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["run", "e1", "--suite", "smoke", "--no-progress", "--jobs", "1", "--set", "e1.norms=layer,rms,none",
            "--set", "e1.batch_sizes=32", "--out", out]
    assert run_cli(capsys, *argv)[0] == 0
    truncated, wrong_shape, no_metrics = _results(out)
    truncated.write_text(truncated.read_text()[:20])
    wrong_shape.write_text(json.dumps(["ok"]))
    (no_metrics.parent / "metrics.jsonl").unlink()

    code, _, err = run_cli(capsys, "report", out)
    assert code == 2 and one_line_error(err, "report"), err
    assert str(truncated) in err or str(wrong_shape) in err

    code, text, err = run_cli(capsys, *argv)
    assert code == 0, err
    for path in (truncated, wrong_shape, no_metrics.parent):
        assert f"{path}" in text and "running it again" in text
    assert "3 ok" in text
    for p in _results(out):
        assert runner.finished_record(p.parent)["status"] == "ok"


@pytest.mark.parametrize("result", [{"test_acc": None, "batch_dependence": None},
                                    {"test_acc": "high", "batch_dependence": "low", "final_loss": "none"}],
                         ids=["nulls", "strings"])
def test_wrong_fields_in_a_result_name_the_runs(tmp_path, capsys, result):
    out = tmp_path / "run"
    assert run_cli(capsys, "run", "e1", *TINY, "--out", out)[0] == 0
    (p,) = _results(out)
    p.write_text(json.dumps({"status": "ok", "result": result}))  # a run record, but not e1's numbers
    code, _, err = run_cli(capsys, "report", out)
    assert code == 2 and one_line_error(err, "report"), err
    assert str(out / "runs" / "e1") in err


def test_damaged_config_is_named(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(capsys, "run", "e1", *TINY, "--out", out)[0] == 0
    (out / "config.json").write_text("{\"suite\": ")
    for argv in (["report", out], ["run", "e1", *TINY, "--out", out]):
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and one_line_error(err, argv[0]), err
        assert str(out / "config.json") in err


# kill -9 and two runs at once


def _children(pid: int) -> set[int]:
    kids = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids |= {int(c) for c in (task / "children").read_text().split()}
    return kids


def _is_pool_worker(pid: int) -> bool:
    """A spawned multiprocessing worker, not multiprocessing's resource tracker (also a child of the
    run: it ends when the run's end of its pipe closes, that is just after the run exits)."""
    try:
        return b"multiprocessing.spawn" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killed_run_takes_its_workers_along_and_locks_out_a_second_run(tmp_path, capsys):
    """kill -9 of `lnorm lab run --jobs 2` (the parent only): its workers end, and the next run works.
    While it runs, a second run on the same --out is refused with one line."""
    out = tmp_path / "run"
    slow = ["run", "e1", "--suite", "smoke", "--no-progress", "--jobs", "2", "--out", str(out),
            "--set", "e1.norms=layer,rms", "--set", "e1.batch_sizes=32", "--set", "e1.examples=32000000"]
    proc = subprocess.Popen([sys.executable, "-m", "lnorm", "lab", *slow], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    workers: set[int] = set()
    try:
        try:
            for _ in range(6000):  # both workers are training: each has its metrics file open
                if len(list(out.glob("runs/e1/*/metrics.jsonl.tmp"))) == 2 or proc.poll() is not None:
                    break
                time.sleep(0.05)
            assert proc.poll() is None, proc.stderr.read().decode()
            workers = _children(proc.pid)
            assert len(workers) >= 2

            code, _, err = run_cli(capsys, "run", "e1", *TINY, "--out", out)  # refused before it runs anything
            assert code == 2 and one_line_error(err), err
            assert f"in use by another `lnorm lab run` (pid {proc.pid})" in err
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        for _ in range(600):
            if not any(map(_alive, workers)):
                break
            time.sleep(0.05)
        left = [p for p in workers if _alive(p)]
        assert not left, f"workers {left} outlived the killed run"
    finally:
        for p in workers:  # never leave them behind, whatever failed
            if _alive(p):
                os.kill(p, signal.SIGKILL)
    code, _, err = run_cli(capsys, "run", "e1", *TINY, "--out", out)
    assert code == 0, err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_stops_a_pool_run_at_once_and_frees_the_directory_only_after_its_workers(tmp_path, capsys):
    """Ctrl-C (SIGINT to the process group) on `lnorm lab run --jobs 2`: it ran on, released the lock
    while queued units still wrote into the directory, and a second Ctrl-C hung it. Now it stops
    within seconds with one line and exit 130, no worker outlives it, and the rerun resumes."""
    out = tmp_path / "run"
    slow = ["run", "e1", "--suite", "smoke", "--no-progress", "--jobs", "2", "--out", str(out),
            "--set", "e1.norms=layer,rms,none", "--set", "e1.batch_sizes=32", "--set", "e1.examples=32000000"]
    proc = subprocess.Popen(interruptible([sys.executable, "-m", "lnorm", "lab", *slow]), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    workers: set[int] = set()
    try:
        for _ in range(6000):  # both workers are training
            if len(list(out.glob("runs/e1/*/metrics.jsonl.tmp"))) == 2 or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()
        workers = _children(proc.pid)
        pool = {p for p in workers if _is_pool_worker(p)}
        assert len(pool) == 2, workers
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("lnorm lab run --jobs 2 was still running 30 s after Ctrl-C")
        err = proc.stderr.read().decode()
        assert code == 130, err
        assert "interrupted; the finished runs are kept" in err and "Traceback" not in err, err
        left = [p for p in pool if _alive(p)]
        assert not left, f"workers {left} outlived the interrupted run"
        # the resource tracker ends after the run, on its own (seen still alive just after the
        # run's exit on a loaded machine, gone 0.5 s later; it writes nothing in the run directory)
        for _ in range(200):
            if not any(_alive(p) for p in workers - pool):
                break
            time.sleep(0.05)
        assert not [p for p in workers - pool if _alive(p)], "multiprocessing's resource tracker outlived the run by 10 s"
        assert not _results(out)  # the three units were cut short; none was run to its end after Ctrl-C
    finally:
        for p in [proc.pid, *workers]:
            if _alive(p):
                os.kill(p, signal.SIGKILL)
    code, _, err = run_cli(capsys, "run", "e1", *TINY, "--out", out)  # the directory is free again
    assert code == 0, err


def test_a_resume_on_another_backend_is_refused(tmp_path, capsys):
    # from a review: the resume exited 0 and the report named the new backend for runs made with
    # the old one
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "run", "e1", *TINY, "--out", out)
    assert code == 0, err
    before = [(p, p.read_bytes()) for p in (out / "config.json", out / "env.json")]
    code, _, err = run_cli(capsys, "run", "e1", *TINY, "--backend", "torch", "--out", out)
    assert code == 2 and one_line_error(err), err
    assert "--backend 'auto' -> 'torch'" in err
    assert all(p.read_bytes() == b for p, b in before)
    code, _, err = run_cli(capsys, "run", "e1", *TINY, "--backend", "auto", "--out", out)  # the same: resumes
    assert code == 0, err


def test_publish_on_a_run_in_progress_names_the_run_dir_not_out(tmp_path, capsys):
    # the lock's message told publish to "use another --out", where --out is the page's folder
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "run", "e1", *TINY, "--out", out)
    assert code == 0, err
    with runner.lock_run_dir(out):
        code, _, err = run_cli(capsys, "publish", out, "--allow-dirty", "--out", tmp_path / "pages")
    assert code == 2 and one_line_error(err, "publish"), err
    assert f"RUN_DIR {out} is in use by another" in err and "--out" not in err
