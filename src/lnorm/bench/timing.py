"""Interleaved timing: medians of several repeats, candidates measured in turn in one run.

Machines here are shared and noisy, so every candidate is timed in each round (A, B, C, A, B, C,
...) and the median over rounds is reported; a slow moment hits all candidates alike.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable


def _no_sync() -> None:
    pass


def _calibrate(fn: Callable[[], object], target_s: float, sync: Callable[[], None]) -> int:
    """Calls per sample so one sample lasts about ``target_s`` (at least 1)."""
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    dt = time.perf_counter() - t0
    if dt <= 0:
        return 1000
    return max(1, min(1000, int(target_s / dt)))


def interleaved(
    fns: dict[str, Callable[[], object]],
    repeats: int = 7,
    warmup: int = 2,
    target_s: float = 0.02,
    sync: Callable[[], None] | None = None,
) -> dict[str, dict[str, float]]:
    """Time each callable ``repeats`` times, interleaved; returns per name median/min/max seconds.

    ``sync`` waits for queued device work (``torch.cuda.synchronize`` for CUDA): it runs before
    the clock starts and before it is read, so a sample is the time of the work, not of queueing it.
    """
    sync = sync or _no_sync
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    calls = {name: _calibrate(fn, target_s, sync) for name, fn in fns.items()}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            for name, fn in fns.items():
                n = calls[name]
                sync()
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                sync()
                samples[name].append((time.perf_counter() - t0) / n)
    finally:
        if gc_was:
            gc.enable()
    return {
        name: {"median": statistics.median(s), "min": min(s), "max": max(s), "repeats": len(s)}
        for name, s in samples.items()
    }


def unwritable(path) -> str | None:
    """Why ``path`` cannot take a results file, or None: checked before a benchmark runs, so that
    minutes of timings are not lost to a typo in the output path at the end."""
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return f"{path!r} is a directory"
    if not os.path.isdir(parent):
        return f"the folder {parent!r} does not exist"
    if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        return f"{path!r} is not writable"
    return None

