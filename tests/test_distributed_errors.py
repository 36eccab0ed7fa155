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
