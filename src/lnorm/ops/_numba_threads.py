"""When lnorm's Numba kernels may use threads: after ``fork``, and from several Python threads.

Numba runs ``parallel=True`` kernels on one of three threading layers, and they differ
(https://numba.readthedocs.io/en/stable/user/threading-layer.html):

* ``omp`` (GNU OpenMP, the usual one with pip wheels on Linux): a process forked after the
  parent started the pool is terminated when it enters a parallel kernel;
* ``workqueue`` (always present): aborts the process when two threads enter parallel kernels at
  once;
* ``tbb``: safe for both.

lnorm works under each: a child forked after the parent started Numba's pool runs the kernels'
serial builds (:func:`threads_allowed` is False there; ``os.register_at_fork``), and where the
layer is not known to be thread-safe, the threaded builds are entered by one thread at a time
(:func:`guard`, a lock). The serial builds need neither.
"""

from __future__ import annotations

import functools
import os
import threading

import numba

_THREAD_SAFE_LAYERS = ("tbb", "omp")

_serial_only = False  # set in a child forked after the parent started Numba's pool
_lock = threading.Lock()
_thread_safe: bool | None = None  # known once the pool has started


def _started_layer() -> str | None:
    """The threading layer Numba started, or None before its first parallel kernel."""
    try:
        return numba.threading_layer()
    except ValueError:  # "Threading layer is not initialized."
        return None


def _after_fork_in_child() -> None:
    global _serial_only, _lock
    _lock = threading.Lock()  # another thread of the parent may have held it at the fork
    if _started_layer() is not None:
        _serial_only = True


os.register_at_fork(after_in_child=_after_fork_in_child)


def threads_allowed() -> bool:
    """False in a process forked after its parent started Numba's thread pool."""
    return not _serial_only


def _locked(kernel, *args):
    with _lock:
        return kernel(*args)


def guard(kernel):
    """``kernel`` (a threaded build) as it may be called from any thread: itself where the
    threading layer is thread-safe, else a call that holds the lock (also before the pool has
    started, when the layer Numba will pick is not known yet)."""
    global _thread_safe
    if _thread_safe is None:
        layer = _started_layer()
        if layer is None:
            return functools.partial(_locked, kernel)
        _thread_safe = layer in _THREAD_SAFE_LAYERS
    return kernel if _thread_safe else functools.partial(_locked, kernel)
