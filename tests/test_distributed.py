"""lnorm.distributed: 2-process gloo on loopback.

Every process start costs a torch import (seconds on 2 cores), so the DDP gradient checks of all
models share one launch (a module-scoped fixture) and the failure paths take one launch each.
"""

from __future__ import annotations

import copy
import multiprocessing
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import lnorm.nn as lnn
from lnorm.distributed import (
    SyncBatchNorm,
    WorkerError,
    _GatherRows,
    collective_clock,
    convert_sync_batchnorm,
    gradient_gaps,
    launch,
)
from lnorm.nn import ChannelBatchNorm, MaskedBatchNorm, make_norm

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

NPROC = 2
B = 8  # global batch: 4 per rank


# ------------------------------------------------------------------------------------ models
# Module-level classes: the spawned workers unpickle them by name.


def mlp(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), make_norm(kind, 16), nn.ReLU(), nn.Linear(16, 3)).double()


def cnn(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), make_norm(kind, 4, layout="channels"), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 3 * 3, 3)).double()


class MaskedSeq(nn.Module):
    """(B, T, I) with a (B, T) padding mask -> class logits; the norm sees the mask."""

    def __init__(self, kind: str, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.proj = nn.Linear(6, 8)
        self.norm = make_norm(kind, 8)
        self.head = nn.Linear(8, 3)
        self.double()

    def forward(self, x, mask):
        h = torch.relu(self.norm(self.proj(x), mask=mask))  # (B, T, 8)
        h = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # (B, 8)
        return self.head(h)


class LSTMClassifier(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.rnn = lnn.LayerNormLSTM(6, 8, num_layers=2, batch_first=True)
        self.head = nn.Linear(8, 3)
        self.double()

    def forward(self, x):
        out, (h, c) = self.rnn(x)  # out (B, T, 8)
        return self.head(out[:, -1])


def _data(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (B,), generator=g)
    x_flat = torch.randn(B, 6, generator=g, dtype=torch.float64) * 2 + 1
    x_img = torch.randn(B, 1, 5, 5, generator=g, dtype=torch.float64)
    x_seq = torch.randn(B, 5, 6, generator=g, dtype=torch.float64)
    lengths = torch.tensor([5, 2, 4, 1, 3, 5, 1, 2])  # rank 1's slice has 11 valid positions
    mask = torch.arange(5)[None] < lengths[:, None]
    return x_flat, x_img, x_seq, mask, y


@pytest.fixture(scope="module")
def gaps():
    """Every model's DDP-vs-single-process gradient gap, all from one launch."""
    x_flat, x_img, x_seq, mask, y = _data()
    cases = {f"mlp-{k}": (mlp(k), x_flat, y) for k in ("layer", "batch", "none", "rms", "group")}
    cases["mlp-sync"] = (convert_sync_batchnorm(mlp("batch")), x_flat, y)
    for k in ("layer", "batch"):
        cases[f"cnn-{k}"] = (cnn(k), x_img, y)
    cases["cnn-sync"] = (convert_sync_batchnorm(cnn("batch")), x_img, y)
    torch_bn = nn.Sequential(*[nn.BatchNorm2d(4).double() if isinstance(m, ChannelBatchNorm) else m
                               for m in cnn("batch")])
    cases["cnn-torch-bn2d-sync"] = (convert_sync_batchnorm(torch_bn), x_img, y)
    for k in ("layer", "batch"):
        cases[f"seq-{k}"] = (MaskedSeq(k), (x_seq, mask), y)
    cases["seq-sync"] = (convert_sync_batchnorm(MaskedSeq("batch")), (x_seq, mask), y)
    if hasattr(lnn, "LayerNormLSTM"):
        cases["lstm-ln"] = (LSTMClassifier(), x_seq, y)
    t0 = time.perf_counter()
    out = gradient_gaps(cases, nproc=NPROC, timeout=240)
    print(f"gradient_gaps: {len(cases)} models, one {NPROC}-process launch, {time.perf_counter() - t0:.1f} s")
    return out


# ------------------------------------------------------------------------------------ DDP gradients

# per-sample norms (and none): 2 processes on halves == 1 process on the whole batch, to float64
# rounding; SyncBatchNorm restores batch norm's global statistics.
EQUAL = ["mlp-layer", "mlp-none", "mlp-rms", "mlp-group", "mlp-sync", "cnn-layer", "cnn-sync",
         "cnn-torch-bn2d-sync", "seq-layer", "seq-sync"]
DIFFERENT = ["mlp-batch", "cnn-batch", "seq-batch"]


@pytest.mark.parametrize("name", EQUAL)
def test_ddp_gradient_equals_single_process(gaps, name):
    gap = gaps[name]
    assert gap.max_rel < 1e-10, f"{name}: {gap}; per parameter {gap.per_param}"
    assert gap.rank_spread == 0.0, f"{name}: ranks disagree after all-reduce: {gap}"


@pytest.mark.parametrize("name", DIFFERENT)
def test_ddp_batch_norm_gradient_differs(gaps, name):
    """Per-process batch statistics change the gradient by a visible amount, not rounding."""
    gap = gaps[name]
    assert gap.max_rel > 1e-3, f"{name}: expected per-process statistics to change the gradient: {gap}"
    assert gap.rank_spread == 0.0


def test_ddp_layer_norm_lstm(gaps):
    if "lstm-ln" not in gaps:
        pytest.skip("lnorm.nn.LayerNormLSTM does not exist in this build")
    gap = gaps["lstm-ln"]
    assert gap.max_rel < 1e-10, f"LayerNormLSTM under DDP: {gap}"
    assert gap.rank_spread == 0.0
    assert any(p.startswith("rnn.ln_") for p in gap.per_param), sorted(gap.per_param)


# ------------------------------------------------------------------------------------ launch


def _report(rank, scale):
    import os

    t = torch.full((1,), float(rank + 1))
    dist.all_reduce(t)
    return {"rank": rank, "world": dist.get_world_size(), "sum": float(t) * scale,
            "threads": torch.get_num_threads(), "env_rank": os.environ["RANK"],
            "master": os.environ["MASTER_ADDR"], "backend": dist.get_backend()}


def _clocked_sync_bn(rank):
    torch.manual_seed(rank)
    net = convert_sync_batchnorm(nn.Sequential(MaskedBatchNorm(3), nn.Linear(3, 3), ChannelBatchNorm(3)))
    x = torch.randn(4, 3)
    net(x).sum().backward()  # unclocked
    with collective_clock() as clock:
        net(x).sum().backward()
        net.eval()
        net(x)  # eval: running statistics, no collective
    return clock.calls, clock.seconds


def _fail_on_rank1(rank):
    if rank == 1:
        raise ValueError("rank one fails on purpose")
    t = torch.ones(1)
    dist.all_reduce(t)  # rank 0 waits here for a peer that never comes
    time.sleep(600)


def _sleep(rank):
    time.sleep(600)


def _exit_on_rank0(rank):
    import os

    if rank == 0:
        os._exit(3)
    time.sleep(600)


def _add_in_place(rank, t, model):
    t += rank + 1
    with torch.no_grad():
        model.weight += rank + 1
    return t, model.weight.detach().clone()


def test_launch_gives_every_worker_its_own_copy_of_the_arguments():
    t, model = torch.zeros(3), nn.Linear(2, 2)
    w = model.weight.detach().clone()
    res = launch(_add_in_place, NPROC, (t, model), timeout=240)
    for rank, (t_r, w_r) in enumerate(res):
        assert torch.equal(t_r, torch.full((3,), rank + 1.0))
        assert torch.equal(w_r, w + rank + 1)
    assert torch.equal(t, torch.zeros(3)) and torch.equal(model.weight, w)
    assert not t.is_shared() and not model.weight.is_shared()


def _sgd_steps(rank, model, x, y, steps):
    from torch.nn.parallel import DistributedDataParallel as DDP

    world = dist.get_world_size() if dist.is_initialized() else 1
    net = DDP(model) if world > 1 else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(net(xs), ys).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", ["layer", "sync"])
def test_ddp_training_follows_single_process_training(kind):
    """Several optimizer steps, not just one gradient: 2 processes end where 1 process ends."""
    x, _, _, _, y = _data()
    model = convert_sync_batchnorm(mlp("batch")) if kind == "sync" else mlp(kind)
    one = _sgd_steps(0, copy.deepcopy(model), x, y, 5)
    for rank, two in enumerate(launch(_sgd_steps, NPROC, (model, x, y, 5), timeout=240)):
        for k in one:
            if k.endswith("num_batches_tracked"):
                continue
            torch.testing.assert_close(two[k], one[k], rtol=1e-9, atol=1e-11, msg=lambda m, k=k, r=rank: f"rank {r} {k}: {m}")


def test_launch_returns_results_in_rank_order():
    res = launch(_report, NPROC, (10.0,), timeout=240)
    assert [r["rank"] for r in res] == [0, 1]
    assert all(r["world"] == 2 and r["sum"] == 30.0 and r["threads"] == 1 for r in res)
    assert [r["env_rank"] for r in res] == ["0", "1"]
    assert {r["master"] for r in res} == {"127.0.0.1"} and {r["backend"] for r in res} == {"gloo"}


def test_collective_clock_counts_sync_batch_norm_collectives():
    for calls, seconds in launch(_clocked_sync_bn, NPROC, timeout=240):
        # two forward all_gathers and one backward all_reduce: the first norm's input needs no
        # gradient, so autograd skips its collective (on every rank alike); eval adds none
        assert calls == 3
        assert seconds > 0
    with collective_clock() as clock:  # one process: plain batch norm, nothing to time
        SyncBatchNorm(3)(torch.randn(4, 3)).sum().backward()
    assert clock.calls == 0 and clock.seconds == 0


def test_failing_worker_ends_job_with_its_error():
    # The job must end because the parent reacts to the failure: rank 0 waits in a collective
    # whose pg_timeout (300 s) is longer than launch's own timeout (240 s), so a parent that waited
    # for rank 0 would raise TimeoutError, and rank 0 timing out would be rank 0's error.
    with pytest.raises(WorkerError, match="rank one fails on purpose") as info:
        launch(_fail_on_rank1, NPROC, timeout=240, pg_timeout=300)
    assert info.value.rank == 1 and "ValueError" in str(info.value)
    assert not multiprocessing.active_children(), "workers left running"


def test_worker_that_dies_ends_job():
    with pytest.raises(WorkerError, match="exited with code 3") as info:
        launch(_exit_on_rank0, NPROC, timeout=240, pg_timeout=300)
    assert info.value.rank == 0
    assert not multiprocessing.active_children(), "workers left running"


def _write_pid_and_sleep(rank, folder):
    import os

    with open(os.path.join(folder, f"pid{rank}.tmp"), "w") as f:
        f.write(str(os.getpid()))
    os.replace(os.path.join(folder, f"pid{rank}.tmp"), os.path.join(folder, f"pid{rank}"))
    time.sleep(600)


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_killed_launcher_leaves_no_workers(tmp_path):
    """SIGKILL the process that called launch (as when a lab run is killed): its workers end."""
    import os
    import subprocess
    import sys

    code = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import test_distributed as T; "
            f"from lnorm.distributed import launch; launch(T._write_pid_and_sleep, 2, ({str(tmp_path)!r},))")
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:  # wait for the workers' pid files (events, not a deadline: the test's timeout bounds it)
        while not all((tmp_path / f"pid{r}").exists() for r in range(NPROC)):
            assert proc.poll() is None, "the launcher ended before its workers started"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    pids = [int((tmp_path / f"pid{r}").read_text()) for r in range(NPROC)]
    try:  # the workers end (each watches its launcher); wait for that, not for a fixed time
        for pid in pids:
            _wait_for_exit(pid)
    finally:
        for p in filter(_alive, pids):  # do not leave them behind if this fails or times out
            os.kill(p, 9)


def _wait_for_exit(pid: int) -> None:
    """Block until process ``pid`` (not our child) has ended: its pidfd turns readable then."""
    import os
    import select

    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except (AttributeError, OSError):  # no pidfd (not Linux >= 5.3): poll
        while _alive(pid):
            time.sleep(0.05)
        return
    try:
        select.select([fd], [], [])
    finally:
        os.close(fd)


def test_launch_timeout_kills_workers():
    with pytest.raises(TimeoutError, match="timeout"):
        launch(_sleep, NPROC, timeout=0.5)
    assert not multiprocessing.active_children(), "workers left running"


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"nproc": 0}, ValueError, "nproc"),
    ({"nproc": 2.0}, TypeError, "nproc"),
    ({"backend": "mpi"}, ValueError, "backend"),
    ({"timeout": -1}, ValueError, "timeout"),
    ({"threads": 0}, ValueError, "threads"),
], ids=["nproc-0", "nproc-float", "backend-mpi", "timeout-negative", "threads-0"])
def test_launch_rejects_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        launch(_sleep, **{"nproc": 2, **kwargs})


def test_gradient_gaps_rejects_uneven_batch():
    with pytest.raises(ValueError, match="equal slices"):
        gradient_gaps({"m": mlp("layer")}, torch.randn(5, 6, dtype=torch.float64), torch.zeros(5, dtype=torch.long))


# ------------------------------------------------------------------------------------ SyncBatchNorm, one process


def _assert_same_bn(a: nn.Module, b: nn.Module, x, mask=None, **kw):
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = a(xa, mask=mask) if mask is not None else a(xa)
    yb = b(xb, mask=mask) if mask is not None else b(xb)
    g = torch.randn_like(ya)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    torch.testing.assert_close(ya, yb, **kw)
    torch.testing.assert_close(xa.grad, xb.grad, **kw)
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, **kw, msg=lambda m, n=n: f"{n}: {m}")
    for (n, buf), other in zip(a.named_buffers(), b.buffers(), strict=True):
        torch.testing.assert_close(buf, other, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("shape", [(7, 5), (3, 4, 5), (1, 1, 5)], ids=["B7", "B3-T4", "B1-T1-T-is-1"])
def test_sync_batch_norm_alone_equals_masked_batch_norm(shape):
    ref = MaskedBatchNorm(5).double()
    with torch.no_grad():
        ref.weight.uniform_(0.5, 2), ref.bias.uniform_(-1, 1)
    sync = convert_sync_batchnorm(copy.deepcopy(ref))
    assert isinstance(sync, SyncBatchNorm) and sync.layout == "last"
    x = torch.randn(*shape, dtype=torch.float64) * 3 + 2
    if shape == (1, 1, 5):
        for m in (ref, sync):
            with pytest.raises(ValueError, match="more than 1"):
                m(x)
        return
    _assert_same_bn(sync, ref, x)
    sync.eval(), ref.eval()
    _assert_same_bn(sync, ref, x)


def test_sync_batch_norm_alone_equals_masked_batch_norm_with_mask():
    ref = MaskedBatchNorm(5, momentum=None).double()
    sync = convert_sync_batchnorm(copy.deepcopy(ref))
    x = torch.randn(5, 4, 3, dtype=torch.float64).transpose(0, 2)  # (3, 4, 5), non-contiguous
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    _assert_same_bn(sync, ref, x, mask)


@pytest.mark.parametrize("make", [lambda: ChannelBatchNorm(3), lambda: nn.BatchNorm1d(3), lambda: nn.BatchNorm2d(3),
                                  lambda: nn.BatchNorm3d(3, affine=False)],
                         ids=["ChannelBatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d-no-affine"])
def test_sync_batch_norm_alone_equals_channel_batch_norms(make):
    ref = make().double()
    sync = convert_sync_batchnorm(copy.deepcopy(ref))
    assert isinstance(sync, SyncBatchNorm) and sync.layout == "channels"
    dims = {"BatchNorm1d": (6, 3, 4), "BatchNorm3d": (2, 3, 2, 3, 2)}.get(type(ref).__name__, (4, 3, 5, 2))
    x = torch.randn(*dims, dtype=torch.float64) - 1
    _assert_same_bn(sync, ref, x)


def test_sync_batch_norm_half_input_keeps_dtype():
    sync = SyncBatchNorm(4, layout="last")
    x = torch.randn(6, 4).to(torch.bfloat16)
    y = sync(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), F.batch_norm(x.float(), None, None, training=True), atol=2e-2, rtol=2e-2)


def test_convert_sync_batchnorm_shares_parameters_and_keeps_flags():
    model = nn.Sequential(nn.Linear(4, 4), MaskedBatchNorm(4), nn.Sequential(ChannelBatchNorm(4)), make_norm("layer", 4))
    model[1].weight.requires_grad_(False)
    model[2][0].eval()
    w, rm = model[1].weight, model[2][0].running_mean
    out = convert_sync_batchnorm(model)
    assert out is model  # converted in place when the root is not a batch norm
    assert isinstance(out[1], SyncBatchNorm) and out[1].layout == "last"
    assert isinstance(out[2][0], SyncBatchNorm) and out[2][0].layout == "channels"
    assert isinstance(out[3], lnn.LayerNorm)
    assert out[1].weight is w and not out[1].weight.requires_grad
    assert out[2][0].running_mean is rm and not out[2][0].training and out[1].training
    root = MaskedBatchNorm(3)
    assert isinstance(convert_sync_batchnorm(root), SyncBatchNorm)
    assert convert_sync_batchnorm(out) is out  # already converted: unchanged


def test_torch_convert_sync_batchnorm_is_wrong_for_masked_batch_norm():
    """Why lnorm has its own converter: torch's normalizes dim 1 of (B, T, C) and takes no mask."""
    conv = nn.SyncBatchNorm.convert_sync_batchnorm(MaskedBatchNorm(5))
    with pytest.raises(TypeError):
        conv(torch.randn(3, 4, 5), mask=torch.ones(3, 4, dtype=torch.bool))


@pytest.mark.parametrize("kwargs, x, mask, match", [
    ({"layout": "rows"}, None, None, "layout"),
    ({}, torch.randn(4, 3, 2), torch.ones(4, 2, dtype=torch.bool), "takes no mask"),
    ({}, torch.randn(4, 5), None, "expected input"),
    ({"layout": "last"}, torch.randn(4, 2, 5), None, "expected input"),
    ({"layout": "last"}, torch.randn(4, 2, 3), torch.ones(4, 3, dtype=torch.bool), "mask must be"),
], ids=["bad-layout", "mask-with-channels", "wrong-channels", "wrong-features", "mask-shape"])
def test_sync_batch_norm_rejects_bad_input(kwargs, x, mask, match):
    with pytest.raises(ValueError, match=match):
        m = SyncBatchNorm(3, **kwargs)
        m(x, mask=mask)


def test_gather_rows_gradcheck_in_a_world_of_one():
    """float64 gradcheck of the collective Function (a world of one: the identity with a stack)."""
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        x = torch.randn(5, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: _GatherRows.apply(t, dist.group.WORLD), (x,))
    finally:
        dist.destroy_process_group()
