"""lnorm.distributed.launch names the rank at fault: one that exits without a result, one that hangs."""

from __future__ import annotations

import multiprocessing
import os
import sys
import time

import pytest
import torch
import torch.distributed as dist

from lnorm.distributed import WorkerError, launch

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _os_exit_0_on_rank1(rank):
    if rank == 1:
        os._exit(0)
    return rank


def _sys_exit_0_on_rank1(rank):
    if rank == 1:
        sys.exit(0)
    return rank


def _rank1_hangs_outside_the_collective(rank):
    if rank == 1:
        time.sleep(600)  # never reaches the all_reduce that rank 0 waits in
    dist.all_reduce(torch.ones(1))
    return rank


@pytest.mark.parametrize("fn", [_os_exit_0_on_rank1, _sys_exit_0_on_rank1], ids=["os._exit", "sys.exit"])
def test_worker_that_exits_0_without_a_result_is_named(fn):
    with pytest.raises(WorkerError, match="exited with code 0 without returning a result") as info:
        launch(fn, 2, timeout=240, pg_timeout=300)
    assert info.value.rank == 1
    assert not multiprocessing.active_children(), "workers left running"


def test_rank_that_hangs_outside_a_collective_is_named_not_the_one_waiting():
    with pytest.raises(WorkerError, match="hung") as info:
        launch(_rank1_hangs_outside_the_collective, 2, timeout=240, pg_timeout=2)
    assert info.value.rank == 1
    assert "rank 0 waited for" in str(info.value) and "Timed out" in str(info.value)
    assert not multiprocessing.active_children(), "workers left running"


def test_an_ordinary_error_that_mentions_a_timeout_is_not_a_collective_timeout():
    # regression: the whole traceback was searched for "timeout", so a quoted source line
    # (`timeout=timeout)`) or a message such as "read_timeout must be positive" made rank 0's own
    # error read as a collective that timed out, and a still-running peer was blamed
    from lnorm.distributed import _is_timeout

    tb = ('Traceback (most recent call last):\n  File "x.py", line 3, in fn\n    dist.init_process_group('
          '"gloo", timeout=timeout)\nValueError: read_timeout must be positive, got -1\n')
    assert not _is_timeout(tb)
    assert not _is_timeout('Traceback:\n  requests.get(url, timeout=5)\nKeyError: "x"\n')
    assert _is_timeout("Traceback:\n  dist.all_reduce(t)\nRuntimeError: [gloo] Timed out waiting 1000ms for recv\n")


class NoReply(TimeoutError):
    """A timeout whose name and message never say "timeout"."""


def _rank0_value_error_mentioning_a_timeout(rank):
    if rank == 0:
        raise ValueError("bad rendezvous settings\n  hint: raise the timeout")  # last line: "timeout"
    time.sleep(600)  # still running: not the one at fault
    return rank


def _rank0_times_out_waiting_for_rank1(rank):
    if rank == 0:
        raise NoReply("peer 1 never answered")
    time.sleep(600)  # hangs: the one at fault
    return rank


def test_an_error_is_told_a_timeout_by_its_type_not_its_text():
    # regression: only the traceback's last line was read, so a ValueError whose message ends
    # on a line mentioning a timeout blamed a peer that was still running, and a TimeoutError
    # whose text never says "timeout" was not one
    from lnorm.distributed import _is_timeout

    base = ["builtins.Exception", "builtins.BaseException", "builtins.object"]
    text = "Traceback:\n  fn()\nValueError: bad rendezvous settings\n  hint: raise the timeout\n"
    assert _is_timeout(text)  # the text alone is fooled; the type is not
    assert not _is_timeout(text, ["builtins.ValueError", *base], "bad rendezvous settings\n  hint: raise the timeout")
    assert _is_timeout("Traceback:\n  fn()\nm.NoReply: peer 1 never answered\n",
                       ["m.NoReply", "builtins.TimeoutError", "builtins.OSError", *base], "peer 1 never answered")
    backend = ["torch.distributed.DistBackendError", "torch.distributed.DistError", "builtins.RuntimeError", *base]
    gloo = "[../gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 2000ms for recv operation to complete"
    assert _is_timeout(f"Traceback:\n  dist.all_reduce(t)\ntorch.distributed.DistBackendError: {gloo}\n"
                       "Exception raised from recv at ...\nframe #0: c10::Error\n", backend, gloo)
    nccl = "Watchdog caught collective operation timeout: WorkNCCL(OpType=ALLREDUCE) ran for 60000 ms"
    assert _is_timeout("...", backend, nccl)
    assert not _is_timeout("...", ["builtins.RuntimeError", *base], "read_timeout must be positive, got -1")


def test_worker_error_mentioning_a_timeout_is_not_blamed_on_a_running_peer():
    with pytest.raises(WorkerError, match="ValueError: bad rendezvous settings") as info:
        launch(_rank0_value_error_mentioning_a_timeout, 2, timeout=240, pg_timeout=2)
    assert info.value.rank == 0 and "hung" not in str(info.value)
    assert not multiprocessing.active_children(), "workers left running"


def test_timeout_error_by_type_names_the_peer_that_hangs():
    with pytest.raises(WorkerError, match="hung") as info:
        launch(_rank0_times_out_waiting_for_rank1, 2, timeout=240, pg_timeout=2)
    assert info.value.rank == 1 and "NoReply: peer 1 never answered" in str(info.value)
    assert not multiprocessing.active_children(), "workers left running"


@pytest.mark.parametrize("eps", [0.0, -0.5, float("nan"), "a"])
def test_sync_batch_norm_checks_eps(eps):
    # regression: SyncBatchNorm computes rsqrt(var + eps) itself and accepted any eps: a negative
    # one gave finite, wrongly scaled outputs, 0 gave NaN on a constant feature
    from lnorm.distributed import SyncBatchNorm, convert_sync_batchnorm

    with pytest.raises((ValueError, TypeError), match="eps"):
        SyncBatchNorm(3, eps=eps)
    if not isinstance(eps, str):
        with pytest.raises((ValueError, TypeError), match="eps"):
            convert_sync_batchnorm(torch.nn.BatchNorm1d(3, eps=eps))


def test_sync_batch_norm_checks_num_features_and_mask():
    from lnorm.distributed import SyncBatchNorm

    with pytest.raises(ValueError, match="num_features"):
        SyncBatchNorm(0)
    with pytest.raises(TypeError, match="num_features"):
        SyncBatchNorm(2.5)
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        SyncBatchNorm(3, layout="last")(torch.randn(4, 3), mask=[True] * 4)
