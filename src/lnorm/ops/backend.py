"""Which implementation runs the norm kernels on the CPU.

* ``"numba"``: fused kernels compiled by Numba (``pip install lnorm[fast]``); the default where
  Numba imports.
* ``"torch"``: pure PyTorch (torch's own fused layer-norm kernel, composites for the rest); runs
  anywhere, and is always used for CUDA tensors and under ``torch.compile`` tracing of the fake
  implementations.

Choose with the environment variable ``LNORM_BACKEND=auto|numba|torch`` (read at import) or at run
time with :func:`set_backend` / the :func:`use_backend` context manager.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

BACKENDS = ("auto", "numba", "torch")

_requested = "auto"
_numba_ok: bool | None = None


def numba_available() -> bool:
    """True when the Numba kernels import (Numba installed and working)."""
    global _numba_ok
    if _numba_ok is None:
        try:
            from lnorm.ops import _numba_kernels  # noqa: F401

            _numba_ok = True
        except Exception:  # ImportError, or a broken llvmlite: fall back to torch quietly
            _numba_ok = False
    return _numba_ok


def _validate(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name.lower()


def set_backend(name: str) -> None:
    """Select the CPU backend: ``"auto"`` (Numba if available), ``"numba"`` or ``"torch"``."""
    global _requested
    name = _validate(name)
    if name == "numba" and not numba_available():
        raise RuntimeError(
            "backend 'numba' requested but numba is not importable; install it with "
            "`pip install lnorm[fast]` or choose backend 'torch'"
        )
    _requested = name


def get_backend() -> str:
    """The backend that CPU tensors use now: ``"numba"`` or ``"torch"``."""
    if _requested == "auto":
        return "numba" if numba_available() else "torch"
    return _requested


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: run the enclosed code with backend ``name``."""
    global _requested
    previous = _requested
    set_backend(name)
    try:
        yield
    finally:
        _requested = previous


_env = os.environ.get("LNORM_BACKEND", "auto")
try:
    _requested = _validate(_env)
except ValueError as exc:
    raise ValueError(f"LNORM_BACKEND: {exc}") from None
