"""Data-parallel training with ``torch.distributed``: launch, sync batch norm, gradient checks.

With data parallelism each of W processes sees B/W samples of a global batch of B. Layer norm's
statistics are per sample, so W processes on their slices compute exactly what one process
computes on the whole batch (the multi-process face of claims C1/C3). Plain batch norm takes its
statistics over the local slice only; :class:`SyncBatchNorm` restores the global statistics with
one collective per layer per forward (and one per backward).

Reads top to bottom:

* :func:`launch` runs ``fn(rank, *args)`` in ``nproc`` processes started by
  ``torch.multiprocessing`` (fork server, or spawn) with the default process group initialised
  (gloo on CPU, nccl on CUDA) on a loopback TCP store that the parent hosts on a port the OS
  picks. A worker that raises ends the job: the others are terminated and :class:`WorkerError`
  carries the first failing worker's traceback. A job that runs past ``timeout`` is killed and
  raises :class:`TimeoutError`. Collectives themselves time out after ``pg_timeout``. Each
  worker loads its own copy of ``args`` and returns its value through a file written atomically
  in a temporary directory.
* :class:`SyncBatchNorm` and :func:`convert_sync_batchnorm`: batch norm whose statistics are
  taken over every process's batch, for lnorm's :class:`~lnorm.nn.MaskedBatchNorm` (features last,
  padding mask) and :class:`~lnorm.nn.ChannelBatchNorm` / ``torch.nn.BatchNorm*d`` (channels at
  dim 1). It runs on gloo (CPU) and nccl: torch's own ``nn.SyncBatchNorm`` needs an accelerator,
  and ``nn.SyncBatchNorm.convert_sync_batchnorm`` would turn a ``MaskedBatchNorm`` on
  ``(B, T, C)`` input into a module that normalizes dim 1 and takes no mask.
* :func:`ddp_gradients` / :func:`gradient_gaps`: the gradient a ``DistributedDataParallel``
  model computes with each process on its slice of a batch, against the single-process gradient
  on the whole batch.

Example::

    >>> from lnorm.distributed import gradient_gaps
    >>> net = nn.Sequential(nn.Linear(8, 16), make_norm("layer", 16), nn.ReLU(), nn.Linear(16, 3))
    >>> gaps = gradient_gaps({"layer": net}, torch.randn(8, 8), torch.randint(0, 3, (8,)), nproc=2)
    >>> gaps["layer"].max_rel < 1e-5
    True
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import os
import re
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from lnorm import validation as V
from lnorm.nn import MaskedBatchNorm

__all__ = [
    "WorkerError",
    "launch",
    "default_backend",
    "device",
    "world",
    "SyncBatchNorm",
    "convert_sync_batchnorm",
    "CollectiveClock",
    "collective_clock",
    "GradientGap",
    "ddp_gradients",
    "gradients",
    "gradient_gaps",
]

HOST = "127.0.0.1"  # loopback only: the store and gloo's pairs never listen beyond this machine
BACKENDS = ("gloo", "nccl")


# ------------------------------------------------------------------------------------ launch


class WorkerError(RuntimeError):
    """A worker process raised or died; ``rank`` says which, the message holds its traceback."""

    def __init__(self, rank: int, detail: str, nproc: int) -> None:
        super().__init__(f"rank {rank} of {nproc} failed:\n{detail}")
        self.rank = rank
        self.nproc = nproc
        self.detail = detail


def default_backend(device_type: str = "cpu") -> str:
    """``nccl`` for CUDA, ``gloo`` otherwise."""
    return "nccl" if device_type == "cuda" else "gloo"


def device() -> torch.device:
    """This worker's device: ``cuda:LOCAL_RANK`` under nccl, else CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    return torch.device("cpu")


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _loopback_interface() -> str | None:
    import socket

    try:
        names = [name for _, name in socket.if_nameindex()]
    except (OSError, AttributeError):
        return None
    return next((n for n in ("lo", "lo0") if n in names), None)


def _exit_with_launcher(launcher: int) -> None:
    """End this worker when the process that called :func:`launch` dies (a killed ``lnorm lab
    run`` must not leave orphans training on, or waiting in a collective until ``pg_timeout``).
    Not the parent: under the fork server that is the server, which our workers keep alive."""
    import threading

    def watch() -> None:
        while True:
            try:
                os.kill(launcher, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:  # alive, or its pid reused by another user's process
                pass
            time.sleep(0.5)

    threading.Thread(target=watch, name="lnorm-exit-with-launcher", daemon=True).start()


def _worker(rank: int, nproc: int, backend: str, port: int, pg_timeout: float, threads: int,
            result_dir: str, launcher: int) -> None:
    _exit_with_launcher(launcher)
    torch.set_num_threads(threads)
    # the torchrun environment, so code written for torchrun finds its rank and world here too
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                      LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR=HOST, MASTER_PORT=str(port))
    loopback = _loopback_interface()
    if loopback:  # gloo's and nccl's own sockets too, not only the store, stay on this machine
        os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", loopback)
    timeout = datetime.timedelta(seconds=pg_timeout)
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    try:
        store = dist.TCPStore(HOST, port, nproc, is_master=False, timeout=timeout)
        dist.init_process_group(backend, store=store, rank=rank, world_size=nproc, timeout=timeout)
        fn, args = torch.load(os.path.join(result_dir, "call.pt"), weights_only=False)
        result = fn(rank, *args)
    except BaseException as exc:
        # when one rank fails its peers fail next (connection reset): the parent reports the
        # earliest failure, so it needs each failure's time, and whether it was a timeout, which
        # the exception's type tells better than the text of its traceback
        _save_atomic({"time": time.time(), "traceback": traceback.format_exc(), "types": _type_names(exc),
                      "message": _message(exc)}, os.path.join(result_dir, f"rank{rank}.error.pt"))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    _save_atomic(result, os.path.join(result_dir, f"rank{rank}.pt"))


def _type_names(exc: BaseException) -> list[str]:
    """The exception's type and its bases as ``module.QualifiedName``: plain strings, so the parent
    can read them without importing the module that defined the exception."""
    return [f"{c.__module__}.{c.__qualname__}" for c in type(exc).__mro__]


def _message(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # noqa: BLE001 - a broken __str__ must not hide the worker's error
        return ""


def _save_atomic(obj, path: str) -> None:
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def _failures(result_dir: str) -> dict[int, dict]:
    """``{rank: {"time", "traceback", "types", "message"}}`` of the workers that raised."""
    out = {}
    for name in os.listdir(result_dir):
        if name.endswith(".error.pt"):
            out[int(name[4:-9])] = torch.load(os.path.join(result_dir, name), weights_only=False)
    return out


def _failure_is_timeout(rec: dict) -> bool:
    return _is_timeout(rec["traceback"], rec.get("types"), rec.get("message"))


def _blame(result_dir: str, nproc: int, fallback: tuple[int, str]) -> tuple[int, str]:
    """The rank to report: the earliest failure, unless that is a collective timing out while
    other ranks were still running outside it; then the first of those, which never arrived."""
    failures = _failures(result_dir)
    if not failures:
        return fallback
    rank, rec = min(failures.items(), key=lambda kv: kv[1]["time"])
    tb = rec["traceback"]
    hung = _silent(result_dir, nproc)
    if _failure_is_timeout(rec) and hung:
        return hung[0], (f"hung: still running outside the collective that rank {rank} waited for until it "
                         f"timed out (ranks that never arrived: {', '.join(map(str, hung))}); rank {rank}'s "
                         f"error:\n{tb}")
    return rank, tb


START_METHODS = ("forkserver", "spawn")
# What the fork server imports once, so each worker forks with torch loaded instead of importing
# it (seconds per process on a busy 2-core machine; the second launch in a process costs ~0.2 s).
_FORKSERVER_PRELOAD = ["torch", "torch.distributed", "torch.nn.parallel", "torch._dynamo", "lnorm.distributed"]


def _default_start_method() -> str:
    import multiprocessing

    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def launch(fn: Callable, nproc: int = 2, args: tuple = (), *, backend: str | None = None,
           timeout: float = 600.0, pg_timeout: float = 60.0, threads: int = 1,
           start_method: str | None = None) -> list:
    """Run ``fn(rank, *args)`` in ``nproc`` processes with the default process group initialised.

    Workers import ``fn`` and the script that called ``launch`` by name, so in a script call it
    under ``if __name__ == "__main__":``, as with any ``multiprocessing`` start method but fork.

    Args:
        fn: a module-level function (workers import it by name; no lambdas).
        nproc: number of processes (the world size).
        args: extra arguments for ``fn``; every worker gets its own copy (tensors are not
            shared with the caller or between workers).
        backend: ``"gloo"`` (CPU) or ``"nccl"`` (one CUDA device per rank); default gloo.
        timeout: seconds the whole job may take before every worker is killed.
        pg_timeout: seconds a collective or the rendezvous may wait for the other ranks.
        threads: torch intra-op threads per worker (workers share the machine's cores).
        start_method: ``"forkserver"`` (default where available: a server process imports torch
            once and forks the workers; Python's fork server is process-wide, so this adds torch
            to its preload list) or ``"spawn"`` (a fresh interpreter per worker).

    Returns:
        ``fn``'s return value from each rank, in rank order (anything ``torch.save`` can store).

    Raises:
        WorkerError: a worker raised or exited abnormally (the other workers are terminated).
        TimeoutError: the job ran longer than ``timeout`` seconds.
    """
    import torch.multiprocessing as mp

    if not callable(fn):
        raise TypeError(f"fn must be callable, got {fn!r}")
    V.check_int(nproc, "nproc")
    V.check_positive(timeout, "timeout")
    V.check_positive(pg_timeout, "pg_timeout")
    V.check_int(threads, "threads")
    backend = backend or "gloo"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "nccl" and torch.cuda.device_count() < nproc:
        raise ValueError(f"backend 'nccl' needs one CUDA device per process: nproc={nproc}, "
                         f"devices={torch.cuda.device_count()}")
    start_method = start_method or _default_start_method()
    if start_method not in START_METHODS:
        raise ValueError(f"start_method must be one of {START_METHODS}, got {start_method!r}")
    if start_method == "forkserver":
        import multiprocessing

        multiprocessing.set_forkserver_preload(_FORKSERVER_PRELOAD)
    # The parent hosts the rendezvous store on a port the OS picks: no free-port race, and the
    # store outlives any worker that dies.
    store = dist.TCPStore(HOST, 0, nproc, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=pg_timeout))
    with tempfile.TemporaryDirectory(prefix="lnorm-ddp-") as result_dir:
        # Each worker loads its own copy of the call from a file. Passed through
        # torch.multiprocessing instead, CPU tensors would be moved to shared memory: every worker
        # (and the caller) would train one and the same parameters.
        torch.save((fn, tuple(args)), os.path.join(result_dir, "call.pt"))
        ctx = mp.start_processes(_worker, args=(int(nproc), backend, store.port, float(pg_timeout),
                                                int(threads), result_dir, os.getpid()),
                                 nprocs=int(nproc), join=False, start_method=start_method)
        try:
            _join(ctx, result_dir, nproc, time.monotonic() + timeout, timeout, pg_timeout)
        except mp.ProcessRaisedException as exc:
            raise WorkerError(*_blame(result_dir, nproc, (exc.error_index, str(exc))), nproc=nproc) from None
        except mp.ProcessExitedException as exc:
            raise WorkerError(exc.error_index, detail=f"exited with code {exc.exit_code}"
                              + (f" ({exc.signal_name})" if exc.signal_name else ""), nproc=nproc) from None
        finally:
            _kill(ctx.processes)
        results = []
        for rank in range(nproc):
            path = os.path.join(result_dir, f"rank{rank}.pt")
            if not os.path.exists(path):  # sys.exit(0) or os._exit(0) inside fn
                detail = _failures(result_dir).get(rank, {}).get("traceback", "")
                raise WorkerError(rank, "exited with code 0 without returning a result (sys.exit or os._exit "
                                        "in fn?)" + (f"\n{detail}" if detail else ""), nproc=nproc)
            results.append(torch.load(path, weights_only=False))
    del store
    return results


def _join(ctx, result_dir: str, nproc: int, deadline: float, timeout: float, pg_timeout: float) -> None:
    """Wait for the workers. When a rank's collective times out, the peers that waited in the
    same collective time out about as soon: give them a short grace before torch's join tears
    the job down, so that the ranks still silent after it are the ones that never got there."""
    grace_end = None
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError(f"distributed job ({nproc} processes) still running after "
                               f"{timeout:g} s (timeout); workers killed")
        if grace_end is None and any(map(_failure_is_timeout, _failures(result_dir).values())):
            grace_end = time.monotonic() + min(pg_timeout, 10.0)
        if grace_end is not None and time.monotonic() < grace_end and _silent(result_dir, nproc):
            time.sleep(0.1)
            continue
        if ctx.join(timeout=0.1):
            return


# a collective or the rendezvous timing out, in torch's words: gloo "Timed out waiting 1000ms for
# recv", NCCL's watchdog "collective operation timeout ... before timing out", the store "wait
# timeout after 30000ms"; whole words, so that "read_timeout must be positive" is not one
_TIMEOUT_WORDS = re.compile(r"\btim(?:ed|ing) out\b|\btimeout\b", re.IGNORECASE)


def _is_timeout(tb: str, types: Sequence[str] | None = None, message: str | None = None) -> bool:
    """Was the worker's error a timeout? By the exception's type where the worker recorded it
    (``types``: its class and bases as ``module.QualifiedName``; ``message``: ``str(exc)``):

    * a ``TimeoutError`` (``socket.timeout`` and asyncio's are one) is a timeout, whatever it says;
    * torch reports a collective or the rendezvous timing out as a ``RuntimeError``
      (``torch.distributed.DistBackendError``, ``DistStoreError``), told apart by its message;
    * anything else (a ``ValueError``, a ``KeyError``, a user's exception that is not a
      ``RuntimeError``) is not, even when its message mentions a timeout.

    Without the types, the traceback's text decides, as below.
    """
    if types:
        if "builtins.TimeoutError" in types:
            return True
        if "builtins.RuntimeError" not in types:
            return False
        return _TIMEOUT_WORDS.search(message if message is not None else tb) is not None
    # the exception's own line (the traceback's last non-empty line, "Type: message"), not the whole
    # text: a quoted source line such as `..., timeout=timeout)` or a user's message that mentions a
    # timeout must not make an ordinary error read as a collective that timed out
    lines = [ln for ln in tb.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    return re.search(r"timed out|timeout", last, re.IGNORECASE) is not None and not re.match(
        r"\s*(ValueError|TypeError|KeyError|IndexError|AttributeError|AssertionError|NameError)\b", last)


def _silent(result_dir: str, nproc: int) -> list[int]:
    """Ranks that have neither returned nor failed."""
    failed = _failures(result_dir)
    return [r for r in range(nproc) if r not in failed and not os.path.exists(os.path.join(result_dir, f"rank{r}.pt"))]


def _kill(processes) -> None:
    for p in processes:
        if p.is_alive():
            p.terminate()
    for p in processes:
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join()


# ------------------------------------------------------------------------------------ sync batch norm


class CollectiveClock:
    """Wall seconds and calls spent in :class:`SyncBatchNorm`'s collectives (see :func:`collective_clock`)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0

    def __repr__(self) -> str:
        return f"CollectiveClock(seconds={self.seconds:.6f}, calls={self.calls})"


_CLOCK: CollectiveClock | None = None


@contextlib.contextmanager
def collective_clock():
    """Time SyncBatchNorm's collectives (forward all_gather, backward all_reduce) in this block.

    Opt-in diagnostics: off, the collectives pay one ``is None`` test. The time includes waiting
    for slower ranks, which is part of what synchronising costs. On CUDA the clock synchronises
    the device around each collective so the wall time is the collective's.

    Example::

        >>> with collective_clock() as clock:
        ...     loss = ddp_model(x).sum(); loss.backward()
        >>> clock.seconds, clock.calls
    """
    global _CLOCK
    outer, _CLOCK = _CLOCK, CollectiveClock()
    try:
        yield _CLOCK
    finally:
        _CLOCK = outer


def _timed_collective(op, tensor: Tensor) -> None:
    clock = _CLOCK
    if clock is None:
        op()
        return
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)
    t0 = time.perf_counter()
    op()
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)
    clock.seconds += time.perf_counter() - t0
    clock.calls += 1


class _GatherRows(torch.autograd.Function):
    """``(k,)`` per rank -> ``(W, k)`` on every rank; backward sums the gradients of every rank.

    One all_gather forward, one all_reduce backward, on any backend (gloo has no reduce_scatter,
    which ``torch.distributed.nn.all_gather``'s backward replaces by W scatters on gloo). The
    backward runs only when the statistics need a gradient, i.e. when the norm's input does; every
    rank of a DDP model agrees on that, so the collectives stay matched.
    """

    @staticmethod
    def forward(ctx, local: Tensor, group) -> Tensor:
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        rows = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        _timed_collective(lambda: dist.all_gather(rows, local.contiguous(), group=group), local)
        return torch.stack(rows)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        _timed_collective(lambda: dist.all_reduce(grad, group=ctx.group), grad)
        return grad[ctx.rank], None


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    r"""Batch norm with statistics over the batches of every process in ``process_group``.

    Each rank computes its count, mean and sum of squared deviations per feature; one all_gather
    shares them and every rank combines them (Chan et al.'s parallel variance), so the result is
    the single-process batch norm of the concatenated batch, masks included. Outside a process
    group, in a group of one, or in eval mode it is plain batch norm (in eval mode without running
    statistics it normalizes with the local batch's, as torch's ``nn.SyncBatchNorm`` does).

    Args:
        num_features: C.
        eps, momentum, affine, track_running_stats: as ``torch.nn.BatchNorm1d``.
        process_group: the group to synchronise over (default: the whole world).
        layout: ``"channels"`` (input ``(B, C, *spatial)``, like ``BatchNorm{1,2,3}d`` and
            :class:`~lnorm.nn.ChannelBatchNorm`) or ``"last"`` (``(B, C)`` / ``(B, T, C)`` with an
            optional ``(B, T)`` padding mask, like :class:`~lnorm.nn.MaskedBatchNorm`).

    Shape:
        ``forward(x, mask=None)``: output has x's shape.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 layout: str = "channels", device=None, dtype=None) -> None:
        V.check_choice(layout, "layout", V.LAYOUTS)
        num_features = V.check_int(num_features, "num_features", minimum=1)
        eps = V.check_eps(eps)  # rsqrt(var + eps) is computed here: eps <= 0 would give NaN or wrong scales
        super().__init__(num_features, eps, V.check_momentum(momentum), V.check_bool(affine, "affine"),
                         V.check_bool(track_running_stats, "track_running_stats"), device=device, dtype=dtype)
        self.process_group = process_group
        self.layout = layout

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected input with at least 2 dims, got shape {list(input.shape)}")

    def extra_repr(self) -> str:
        return super().extra_repr() + f", layout={self.layout!r}"

    def _world(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        if not isinstance(input, Tensor) or not input.is_floating_point():
            raise TypeError(f"input must be a floating-point tensor, got {getattr(input, 'dtype', type(input))}")
        C = self.num_features
        if self.layout == "last":
            if input.dim() < 2 or input.shape[-1] != C:
                raise ValueError(f"expected input of shape (B, {C}) or (B, T, {C}), got {list(input.shape)}")
            if mask is not None and not isinstance(mask, Tensor):
                raise TypeError(f"mask must be a bool tensor or None, got {type(mask).__name__}")
            if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != tuple(input.shape[:-1])):
                raise ValueError(f"mask must be a bool tensor of shape {list(input.shape[:-1])}, got "
                                 f"{mask.dtype} {list(mask.shape)}")
            x = input.reshape(-1, C)  # (N, C)
        else:
            if mask is not None:
                raise ValueError("SyncBatchNorm(layout='channels') takes no mask; use layout='last'")
            if input.dim() < 2 or input.shape[1] != C:
                raise ValueError(f"expected input (B, {C}, ...), got {list(input.shape)}")
            x = input.transpose(0, 1).reshape(C, -1).t()  # (N, C)

        if not (self.training or not self.track_running_stats):  # eval: the running statistics
            y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
            return self._restore(y, input)

        # local statistics, in float32 at least
        xs = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        valid = xs if mask is None else xs[mask.reshape(-1)]
        n = valid.new_full((1,), valid.shape[0])
        mean = valid.sum(0) / n.clamp(min=1)  # (C,)
        m2 = (valid - mean).square().sum(0)  # (C,) sum of squared deviations
        if self.training and self._world() > 1:  # like torch: never a collective in eval mode
            group = self.process_group or dist.group.WORLD
            rows = _GatherRows.apply(torch.cat([n, mean, m2]), group)  # (W, 1 + 2C)
            ns, means, m2s = rows[:, :1], rows[:, 1:1 + C], rows[:, 1 + C:]
            n = ns.sum(0)
            mean = (ns * means).sum(0) / n.clamp(min=1)
            m2 = (m2s + ns * (means - mean).square()).sum(0)
        count = int(n.item())
        if count <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {count} "
                             "(batch norm cannot train on a single position)")
        var = m2 / count  # biased, for normalizing
        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - m).add_(mean.detach().to(self.running_mean.dtype), alpha=m)
                unbiased = (var.detach() * count / (count - 1)).to(self.running_var.dtype)
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
        y = (xs - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return self._restore(y.to(x.dtype), input)

    def _restore(self, y: Tensor, input: Tensor) -> Tensor:
        if self.layout == "last":
            return y.view(input.shape)
        B, C, *spatial = input.shape
        return y.t().reshape(C, B, *spatial).transpose(0, 1)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every batch norm in ``module`` by :class:`SyncBatchNorm`; the model for this is
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``.

    :class:`~lnorm.nn.MaskedBatchNorm` becomes ``layout="last"`` (masks keep working); other
    ``_BatchNorm`` modules (``nn.BatchNorm{1,2,3}d``, :class:`~lnorm.nn.ChannelBatchNorm`,
    ``nn.SyncBatchNorm``) become ``layout="channels"``. Parameters and buffers are shared with the
    original module (as torch does), so ``training`` and ``requires_grad`` carry over and an
    optimizer built before the conversion still holds the live parameters. Returns the converted
    module: a new object when ``module`` itself is a batch norm, else ``module`` modified in place.
    """
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm):
        if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
            raise ValueError(f"cannot convert {type(module).__name__} before its first forward "
                             "(its num_features is not known yet)")
        layout = "last" if isinstance(module, MaskedBatchNorm) else "channels"
        out = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, process_group, layout=layout)
        if module.affine:
            out.weight = module.weight
            out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, process_group))
    return out


# ------------------------------------------------------------------------------------ gradient checks


def _split(t, rank: int, world_size: int):
    if isinstance(t, Tensor):
        return t.chunk(world_size)[rank]
    return type(t)(_split(u, rank, world_size) for u in t)


def _batch_size(t) -> int:
    return t.shape[0] if isinstance(t, Tensor) else _batch_size(t[0])


def gradients(model: nn.Module) -> dict[str, Tensor]:
    """Each trainable parameter's ``.grad`` as a CPU copy (zeros where backward left none)."""
    return {n: (p.grad.detach().cpu().clone() if p.grad is not None else torch.zeros_like(p, device="cpu"))
            for n, p in model.named_parameters() if p.requires_grad}


def _as_tuple(x):
    return (x,) if isinstance(x, Tensor) else tuple(x)


def _cases(models, inputs, target) -> dict:
    """``{name: model | (model, inputs, target)}`` -> ``{name: (model, inputs, target)}``, checked."""
    if not isinstance(models, Mapping) or not models:
        raise TypeError(f"models must be a non-empty mapping name -> nn.Module or (model, inputs, target), "
                        f"got {type(models).__name__}")
    cases = {}
    for name, case in models.items():
        if isinstance(case, nn.Module):
            case = (case, inputs, target)
        if not (isinstance(case, tuple) and len(case) == 3 and isinstance(case[0], nn.Module)):
            raise TypeError(f"models[{name!r}] must be an nn.Module or (model, inputs, target), got {case!r:.80}")
        model, x, y = case
        if x is None or not isinstance(y, Tensor):
            raise TypeError(f"models[{name!r}]: inputs and target tensors are needed, got {type(x).__name__} "
                            f"and {type(y).__name__}")
        cases[name] = case
    return cases


def _ddp_grad_worker(rank: int, cases: dict, loss_fn) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    world_size = dist.get_world_size()
    dev = device()
    out = {}
    for name, (model, inputs, target) in cases.items():
        x = tuple(t.to(dev) for t in _as_tuple(_split(inputs, rank, world_size)))
        y = _split(target, rank, world_size).to(dev)
        model = model.to(dev)
        ddp = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
        loss = loss_fn(ddp(*x), y)
        loss.backward()
        out[name] = {"grads": gradients(model), "loss": float(loss.detach())}
    return out


def ddp_gradients(models: Mapping, inputs=None, target=None, *, loss_fn=F.cross_entropy,
                  nproc: int = 2, backend: str | None = None, timeout: float = 300.0) -> dict:
    """Gradients of ``DistributedDataParallel(model)`` with ``nproc`` processes on equal slices.

    ``models`` maps a name to a model (run on the shared ``inputs`` and ``target``) or to a tuple
    ``(model, inputs, target)``. All of them run in one launch (one process start-up): rank r
    takes the r-th of ``nproc`` equal chunks of the inputs (a tensor or tuple of tensors, batch
    first) and of the target, computes ``loss_fn(model(*x), y)`` (which must average over the
    batch, as DDP averages gradients over ranks), and backpropagates once.

    Returns:
        ``{name: {"grads": [per-rank {param: grad}], "loss": [per-rank loss]}}``.
    """
    cases = _cases(models, inputs, target)
    V.check_int(nproc, "nproc")
    for name, (_, x, y) in cases.items():
        n = _batch_size(x)
        if n % nproc or y.shape[0] != n:
            raise ValueError(f"models[{name!r}]: the batch ({n} inputs, {y.shape[0]} targets) must split "
                             f"into nproc={nproc} equal slices")
    per_rank = launch(_ddp_grad_worker, nproc, (cases, loss_fn), backend=backend, timeout=timeout)
    return {name: {"grads": [r[name]["grads"] for r in per_rank], "loss": [r[name]["loss"] for r in per_rank]}
            for name in cases}


@dataclass
class GradientGap:
    """How far the DDP gradient is from the single-process gradient on the whole batch.

    ``max_abs``: max over parameters and entries of |g_ddp - g_1proc|; ``max_rel``: that over the
    largest |g_1proc| entry; ``per_param``: max abs gap per parameter; ``rank_spread``: max abs
    difference between the ranks' gradients after DDP's all-reduce (0 when DDP works).
    """

    max_abs: float
    max_rel: float
    rank_spread: float
    per_param: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"max|dg|={self.max_abs:.3g} (rel {self.max_rel:.3g}), rank spread {self.rank_spread:.3g}"


def gradient_gaps(models: Mapping, inputs=None, target=None, *, loss_fn=F.cross_entropy,
                  nproc: int = 2, backend: str | None = None, timeout: float = 300.0) -> dict[str, GradientGap]:
    """:func:`ddp_gradients` of each model against its single-process gradient on the whole batch.

    The single-process reference runs here on a deep copy of each model (in train mode, like the
    workers). For a model converted with :func:`convert_sync_batchnorm` the reference is that same
    model, since :class:`SyncBatchNorm` outside a process group is plain batch norm.
    """
    cases = _cases(models, inputs, target)
    ref = {}
    for name, (model, x, y) in cases.items():
        m = copy.deepcopy(model)
        loss_fn(m(*_as_tuple(x)), y).backward()
        ref[name] = gradients(m)
    ddp = ddp_gradients(cases, loss_fn=loss_fn, nproc=nproc, backend=backend, timeout=timeout)
    gaps = {}
    for name in cases:
        per_rank = ddp[name]["grads"]
        per_param = {p: float((per_rank[0][p].double() - g.double()).abs().max()) if g.numel() else 0.0
                     for p, g in ref[name].items()}
        scale = max((float(g.abs().max()) for g in ref[name].values() if g.numel()), default=0.0)
        spread = max((float((r[p] - per_rank[0][p]).abs().max()) for r in per_rank[1:] for p in r
                      if r[p].numel()), default=0.0)
        max_abs = max(per_param.values(), default=0.0)
        gaps[name] = GradientGap(max_abs, max_abs / scale if scale > 0 else 0.0, spread, per_param)
    return gaps
