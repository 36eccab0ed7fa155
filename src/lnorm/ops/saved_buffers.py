"""Buffers for what the fused CPU recurrences save for backward, reused once torch has freed them.

A training step of ``LayerNormLSTM(128, 512)`` on (100, 32, 128) saves 33 MB of the fused path's
own tensors (the normalized recurrent pre-activations, the cells, the statistics; the GRU 45 MB).
Taken fresh from the allocator at every step, that memory comes back from the system each time
(glibc returns it when backward frees it) and is faulted in and zeroed page by page while the step
kernels write it: on a Zen 5, a forward of 26 ms without page faults took 35.5 ms with them
(12768 faults). In a training loop of one layer (``PYTHONPATH=src python
benchmarks/rnn_training_loop.py``, one run on that Zen 5) an LSTM step took 79.6 ms with these
buffers reused and 93.2 ms without (``nn.LSTM`` 85.2), a GRU step 65.2 and 82.7 ms.

So the forward takes them from this pool. A buffer goes back to the pool when the last tensor that
holds its memory is freed, never earlier: it is handed out as ``torch.from_numpy`` of a NumPy view
of the pool's block, torch keeps exactly that view alive as long as the storage lives, and a
finalizer on the view returns the block. A buffer still in use (saved by an autograd graph kept
with ``retain_graph``, held by a saved-tensor hook, ...) is therefore never handed out twice.

Blocks are matched by exact size and dtype (a training loop repeats its shapes; another size is a
miss and is allocated as before). At most :func:`max_free_bytes` of free blocks are kept, 256 MiB
by default or ``LNORM_SAVED_BUFFER_CACHE_MB`` (0 turns the pool off), the most recently returned
(sizes a loop stopped using age out): the memory a training step used stays with the process
between steps and after training, up to that much;
:func:`release` gives it all back. Per process: a child forked from a process with free blocks
starts with none. Only float32 and float64 (NumPy's types); the custom ops of the compiled path
allocate as before.
"""

from __future__ import annotations

import collections
import math
import os
import threading
import weakref

import numpy as np
import torch

ENV = "LNORM_SAVED_BUFFER_CACHE_MB"
_DEFAULT_MB = 256
_NUMPY = {torch.float32: np.float32, torch.float64: np.float64}

_lock = threading.Lock()
_free: dict[tuple[int, type], list[np.ndarray]] = {}  # (elements, numpy dtype) -> free blocks
_order: collections.OrderedDict = collections.OrderedDict()  # id(block) -> (key, block), oldest first
_free_bytes = 0
# blocks whose last holder is gone, appended by the finalizers: deque.append takes no lock, so a
# finalizer run by the garbage collector inside this module's own locked code cannot deadlock
_returned: collections.deque = collections.deque()


def max_free_bytes() -> int:
    """The most bytes of free blocks kept: ``LNORM_SAVED_BUFFER_CACHE_MB`` (read at each call),
    256 MiB by default; 0 turns the pool off."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return _DEFAULT_MB << 20
    try:
        mb = float(raw)
    except ValueError:
        raise ValueError(f"{ENV} must be a finite number of megabytes >= 0, got {raw!r}") from None
    if not (mb >= 0 and math.isfinite(mb)):  # NaN, inf
        raise ValueError(f"{ENV} must be a finite number of megabytes >= 0, got {raw!r}")
    return int(mb * (1 << 20))


def _drain(cap: int) -> None:
    # under _lock: the returned blocks into the free lists, then the oldest dropped (freed with
    # their last reference) until at most cap bytes are kept; sizes a loop stopped using age out
    global _free_bytes
    while _returned:
        key, block = _returned.popleft()
        _free.setdefault(key, []).append(block)
        _order[id(block)] = (key, block)
        _free_bytes += block.nbytes
    while _free_bytes > cap and _order:  # (an interrupted update may leave the count above the blocks)
        _, (key, block) = _order.popitem(last=False)
        _take(key, block)


def _take(key: tuple[int, type], block: np.ndarray) -> None:
    # under _lock: block leaves the free lists and the age order (tolerating either having lost it
    # to an interrupt between two of these statements: no StopIteration or KeyError from here)
    global _free_bytes
    _order.pop(id(block), None)
    blocks = _free.get(key, [])
    for i, b in enumerate(blocks):
        if b is block:
            del blocks[i]
            _free_bytes -= block.nbytes
            break
    if not blocks:
        _free.pop(key, None)


def _returned_by_finalizer(item: tuple[tuple[int, type], np.ndarray]) -> None:
    # a handed-out view's finalizer: the block's last holder is gone. Queued without a lock (the
    # garbage collector may run this inside the pool's own locked code), then moved into the free
    # lists and trimmed to the cap at once when the lock is free, so what a step saved does not
    # wait, uncapped, for the next request
    _returned.append(item)
    if _lock.acquire(blocking=False):
        try:
            _drain(max_free_bytes())
        except ValueError:  # a bad LNORM_SAVED_BUFFER_CACHE_MB: reported by the next request
            pass
        finally:
            _lock.release()


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized contiguous CPU tensor of ``shape`` and ``dtype``, from a block no live
    tensor holds (``torch.empty`` for other dtypes, empty shapes, or with the pool off)."""
    global _free_bytes
    npdt = _NUMPY.get(dtype)
    n = 1
    for s in shape:
        n *= s
    cap = max_free_bytes()
    if npdt is None or n == 0 or cap == 0:
        if cap == 0 and (_returned or _free_bytes):  # turned off: let go of what it kept
            with _lock:
                _drain(0)
        return torch.empty(*shape, dtype=dtype)
    key = (n, npdt)
    with _lock:
        _drain(cap)
        blocks = _free.get(key)
        block = blocks[-1] if blocks else None  # the most recently returned
        if block is not None:
            _take(key, block)
    if block is None:
        block = np.empty(n, dtype=npdt)
    view = block.view()  # a new array object over the block, the one torch keeps alive
    view.shape = shape
    weakref.finalize(view, _returned_by_finalizer, (key, block)).atexit = False
    return torch.from_numpy(view)


def release() -> int:
    """Drop every free block (the allocator gets them back once nothing else holds them);
    returns the bytes dropped."""
    global _free_bytes
    with _lock:
        _drain(1 << 62)
        dropped = _free_bytes
        _free.clear()
        _order.clear()
        _free_bytes = 0
    return dropped


def free_bytes() -> int:
    """The bytes of free blocks the pool keeps now."""
    with _lock:
        _drain(max_free_bytes())
        return _free_bytes


def _after_fork_in_child() -> None:
    global _lock, _free_bytes
    _lock = threading.Lock()  # another thread of the parent may have held it at the fork
    _free.clear()
    _order.clear()
    _returned.clear()  # the same deque: the parent's finalizers, copied here, append to it
    _free_bytes = 0


os.register_at_fork(after_in_child=_after_fork_in_child)
