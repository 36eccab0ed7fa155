"""Which implementation runs the kernels, chosen per device from a registry of backends.

* ``"numba"``: fused CPU kernels compiled by Numba (``pip install lnorm[fast]``).
* ``"triton"``: Triton kernels for CUDA tensors (``pip install lnorm[gpu]``). CPU tensors take them
  only when ``"triton"`` is chosen explicitly and ``TRITON_INTERPRET=1`` was set before triton was
  imported (Triton's interpreter: slow, a way to run the GPU code path on a machine without one);
  under the interpreter "auto" leaves CUDA tensors to torch too.
* ``"torch"``: pure PyTorch (torch's own fused layer-norm kernel, composites for the rest); runs
  on every device and under ``torch.compile`` tracing of the fake implementations.

A backend joins with :func:`register_backend` (name, ``available()``, ``supports(device)``).
The choice is ``"auto"`` or a backend's name; :func:`backend_for` turns it into the backend a
device's tensors use: the chosen one where it is available and supports the device, else the
first registered backend that is available and supports it, ``"torch"`` last.

Choose with the environment variable ``LNORM_BACKEND`` (read at import), :func:`set_backend`
(the process default) or :func:`use_backend` (a context manager: an override for the current
thread only; other threads keep the process default).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

__all__ = [
    "Backend",
    "backend_for",
    "choices",
    "get_backend",
    "numba_available",
    "register_backend",
    "set_backend",
    "triton_available",
    "triton_interpreted",
    "unregister_backend",
    "use_backend",
]


@dataclass(frozen=True)
class Backend:
    """One implementation of the kernels.

    ``available()``: whether it imports and works in this process (called on every choice, so
    cache anything slow). ``supports(device)``: whether it runs tensors on ``device``.
    """

    name: str
    available: Callable[[], bool]
    supports: Callable[[torch.device], bool]


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


_triton_ok: bool | None = None


def triton_available() -> bool:
    """True when the Triton kernels import (triton installed and working)."""
    global _triton_ok
    if _triton_ok is None:
        try:
            from lnorm.ops import _triton_norm  # noqa: F401

            _triton_ok = True
        except Exception:  # ImportError, or a triton that fails on import: torch serves CUDA
            _triton_ok = False
    return _triton_ok


def triton_interpreted() -> bool:
    """True when the Triton kernels run under Triton's interpreter (on CPU tensors)."""
    if not triton_available():
        return False
    from lnorm.ops import _triton_norm

    return _triton_norm.INTERPRETED


def _triton_supports(device: torch.device) -> bool:
    # the interpreter (a test tool, far slower than torch) only where triton is chosen by name
    if device.type not in ("cuda", "cpu"):
        return False
    if triton_interpreted():
        return (getattr(_local, "override", None) or _default) == "triton"
    return device.type == "cuda"


_registry: dict[str, Backend] = {}
_auto_order: list[Backend] = []  # what "auto" tries: newest registration first, "torch" (runs everywhere) last


def register_backend(backend: Backend) -> None:
    """Add ``backend`` (or replace the one of that name); "auto" prefers it to those added before."""
    if not isinstance(backend, Backend):
        raise TypeError(f"backend must be a lnorm.ops.backend.Backend, got {type(backend).__name__}")
    if not isinstance(backend.name, str) or not backend.name.isidentifier() or backend.name == "auto" \
            or backend.name != backend.name.lower():
        raise ValueError(f"backend name must be a lower-case identifier other than 'auto', got {backend.name!r}")
    _registry.pop(backend.name, None)
    _registry[backend.name] = backend
    _reorder()


def unregister_backend(name: str) -> None:
    """Remove a registered backend (not "torch"); a process default of that name becomes "auto"."""
    global _default
    if name == "torch" or name not in _registry:
        raise ValueError(f"backend to unregister must be one of {tuple(n for n in _registry if n != 'torch')}, "
                         f"got {name!r}")
    del _registry[name]
    _reorder()
    if _default == name:
        _default = "auto"


def _reorder() -> None:
    _auto_order[:] = [b for b in reversed(_registry.values()) if b.name != "torch"]
    _auto_order.extend(b for b in _registry.values() if b.name == "torch")


def choices() -> tuple[str, ...]:
    """What :func:`set_backend` accepts: ``"auto"`` and every registered backend's name."""
    return ("auto", *_registry)


def _known(name) -> str:
    if not isinstance(name, str) or name.lower() not in choices():
        raise ValueError(f"backend must be one of {choices()}, got {name!r}")
    return name.lower()


def _checked(name) -> str:
    name = _known(name)
    if name != "auto" and not _registry[name].available():
        raise RuntimeError(
            f"backend {name!r} requested but it is not available here"
            + (" (numba is not importable; install it with `pip install lnorm[fast]`)" if name == "numba" else "")
            + (" (triton is not importable; install it with `pip install lnorm[gpu]`)" if name == "triton" else "")
            + "; choose backend 'torch' or 'auto'"
        )
    return name


_default = "auto"
# .override: this thread's use_backend choice (absent or None outside a block). A threading.local,
# not a ContextVar: torch.compile traces reads of it (and guards on their value), not ContextVar.get.
_local = threading.local()


def set_backend(name: str) -> None:
    """Set the process default: ``"auto"`` or a registered backend (``"numba"``, ``"torch"``)."""
    global _default
    _default = _checked(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed code with backend ``name``, in this thread only."""
    chosen = _checked(name)
    previous = getattr(_local, "override", None)
    _local.override = chosen
    try:
        yield
    finally:
        _local.override = previous


def backend_for(device: torch.device | str) -> str:
    """The backend that tensors on ``device`` use now, in this thread."""
    if not isinstance(device, torch.device):
        device = torch.device(device)
    b = _registry.get(getattr(_local, "override", None) or _default)  # None for "auto" (or one since unregistered)
    if b is not None and b.available() and b.supports(device):
        return b.name
    for b in _auto_order:
        if b.available() and b.supports(device):
            return b.name
    return "torch"  # unreachable while "torch" is registered: it supports every device


def backend_that_runs(name: str, device: torch.device | str) -> str:
    """The backend that tensors on ``device`` use when ``name`` is chosen (``"auto"`` or a fallback
    can make it another); the errors of :func:`use_backend` for an unknown or unavailable name."""
    with use_backend(name):
        return backend_for(device)


def get_backend(device: torch.device | str = "cpu") -> str:
    """The backend that tensors on ``device`` (default: CPU) use now, in this thread."""
    if device == "cpu":
        return backend_for(_CPU)
    if not isinstance(device, (torch.device, str)):
        raise TypeError(f"get_backend: device must be a torch.device or a device string such as 'cuda', got "
                        f"{device!r} ({type(device).__name__})")
    try:
        device = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"get_backend: device must name a device such as 'cpu' or 'cuda:0', got {device!r}") from exc
    return backend_for(device)


_CPU = torch.device("cpu")

register_backend(Backend("torch", available=lambda: True, supports=lambda device: True))
# triton before numba: "auto" asks numba first, so CPU tensors never import triton to choose
register_backend(Backend("triton", available=triton_available, supports=_triton_supports))
register_backend(Backend("numba", available=numba_available, supports=lambda device: device.type == "cpu"))

try:  # a known name that is not available here falls back as "auto" does
    _default = _known(os.environ.get("LNORM_BACKEND", "auto"))
except ValueError as exc:
    raise ValueError(f"LNORM_BACKEND: {exc}") from None
