"""benchmarks/gpu_check.sh's orchestration, with a stand-in for python (no GPU, a few seconds):
the test shards, the summary and exit status, and a hanging step cut off within the budget."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"

FAKE_PYTHON = r"""#!/usr/bin/env bash
# stands in for python3: the collection lists three tests, pytest and the bench obey FAKE_MODE
case "$*" in
  *--collect-only*)
    printf 'tests/gpu/test_a.py::test_one[cuda-f32]\ntests/gpu/test_a.py::test_two[cpu]\n'
    printf 'tests/gpu/test_b.py::test_three\n\n3 tests collected in 0.1s\n' ;;
  *"-m pytest"*)
    echo "$*" >> "$FAKE_LOG"
    if [ "$FAKE_MODE" = fail_tests ]; then echo "FAILED tests/gpu/test_a.py::test_two[cpu] - boom"; echo "1 failed"; exit 1; fi
    echo "1 passed" ;;
  *"-m lnorm bench ops"*)
    if [ "$FAKE_MODE" = hang ]; then sleep 600; fi
    for last; do :; done
    echo '{"rows": []}' > "$last"; echo "bench table" ;;
  *"-m lnorm bench rnn"*)
    echo "bench rnn with backend ${LNORM_BACKEND:-auto}: $*" ;;
  *triton_launch_sweep*)
    if [ "$FAKE_MODE" = fail_sweep ]; then echo "sweep broke"; exit 1; fi
    echo "sweep rows" ;;
  *) echo "environment ok" ;;
esac
"""


@pytest.fixture
def fake(tmp_path):
    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("needs bash and coreutils' timeout")
    py = tmp_path / "python"
    py.write_text(FAKE_PYTHON)
    py.chmod(0o755)

    def run(mode: str, budget: int = 100):
        env = dict(os.environ, PYTHON=str(py), OUT=str(tmp_path / "out"), FAKE_MODE=mode,
                   FAKE_LOG=str(tmp_path / "pytest_calls.log"), GPU_CHECK_SHARDS="2",
                   GPU_CHECK_BUDGET_S=str(budget))
        proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
        return proc, tmp_path / "out"

    return run


def test_all_steps_pass(fake, tmp_path):
    proc, out = fake("ok")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = (out / "summary.txt").read_text()
    assert [line.split(":")[0] for line in summary.splitlines()] == [
        "env", "tests", "bench_ops", "bench_rnn", "bench_rnn_torch_path", "launch_sweep"]
    assert all(": exit 0," in line for line in summary.splitlines())
    # three test ids over two shards, round robin, passed as arguments (brackets unglobbed)
    calls = (tmp_path / "pytest_calls.log").read_text().splitlines()
    assert len(calls) == 2
    assert sum(c.count("tests/gpu/") for c in calls) == 3
    assert any("test_one[cuda-f32]" in c and "test_three" in c for c in calls)
    assert (out / "bench_ops.json").read_text().strip() == '{"rows": []}'
    assert "bench table" in proc.stdout
    # the recurrent bench: the fused path (backend auto), then the main case on the pure-torch path
    assert (out / "bench_rnn.log").read_text().startswith("bench rnn with backend auto: ")
    assert (out / "bench_rnn_torch_path.log").read_text().startswith("bench rnn with backend torch: ")
    assert "--cases main" in (out / "bench_rnn_torch_path.log").read_text()


def test_a_failing_test_fails_the_run_and_is_shown(fake):
    proc, out = fake("fail_tests")
    assert proc.returncode == 1
    assert "FAILED tests/gpu/test_a.py::test_two[cpu] - boom" in proc.stdout
    assert "tests: exit 1" in (out / "summary.txt").read_text()
    assert "bench_ops: exit 0" in (out / "summary.txt").read_text()  # the bench still runs


def test_a_hanging_step_is_cut_off_within_the_budget(fake):
    proc, out = fake("hang", budget=8)
    assert proc.returncode == 1
    summary = (out / "summary.txt").read_text()
    assert "bench_ops: exit 124" in summary and "(timed out after" in summary
    assert "launch_sweep: not run (budget of 8s spent)" in summary  # optional: not the cause of rc 1


def test_the_optional_sweep_does_not_fail_the_run(fake):
    proc, out = fake("fail_sweep")
    assert proc.returncode == 0, proc.stdout
    assert "launch_sweep: exit 1" in (out / "summary.txt").read_text()
    assert "(optional)" in (out / "summary.txt").read_text()
