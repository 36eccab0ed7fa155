"""What the recurrent layers (``lnorm.nn.rnn``) hand the fused kernels, and which kernels run.

``lnorm.nn.rnn`` builds a :class:`RecurrentWeights` for one direction of one layer of a
layer-normalized LSTM or GRU with the paper's equations (raw cell state, no zoneout) and asks
:func:`fused_applies`; if it does, :func:`fused_recurrence` computes that direction (the Numba
path is :mod:`lnorm.ops.rnn_fused`, the Triton path for CUDA tensors :mod:`lnorm.ops._triton_rnn`),
else the layer runs its own pure-torch loop. A new backend joins here, without touching ``lnorm.nn``.

Notation: G gates (4 for the LSTM, 3 for the GRU), H hidden features, I input features, N packed
rows (time-major, each step's batch sorted longest first), B batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lnorm.ops import backend
from lnorm.ops.export import exporting
from lnorm.ops.guards import use_torch_path
from lnorm.ops.rnn_weights import RecurrentWeights

__all__ = ["RecurrentWeights", "fused_applies", "fused_recurrence"]


def _numba_recurrence():
    """``lnorm.ops.rnn_fused``, or None where its kernels do not import (a broken Numba)."""
    global _rnn_fused
    if _rnn_fused is None:
        try:
            from lnorm.ops import rnn_fused
        except Exception:  # broken numba / llvmlite: the torch path is always correct
            _rnn_fused = False
        else:
            _rnn_fused = rnn_fused
    return _rnn_fused or None


_rnn_fused = None


def _triton_recurrence():
    """``lnorm.ops._triton_rnn``, or None where triton does not import."""
    if not backend.triton_available():
        return None
    from lnorm.ops import _triton_rnn

    return _triton_rnn


def fused_applies(x: Tensor, w: RecurrentWeights) -> bool:
    """Whether a fused path computes this direction for the packed rows ``x`` (N, I)."""
    # under torch.export the layer's pure-torch loop runs, so exported programs hold standard ops only
    if exporting() or x.shape[0] == 0 or w.w_hh.dtype != x.dtype:
        return False
    chosen = backend.backend_for(x.device)
    if chosen == "numba":
        # under torch.compile the Numba path runs as opaque torch.library ops; it ignores CPU
        # autocast, so autocast takes the pure-torch path
        return (
            not use_torch_path(autocast_sensitive=True)
            and x.dtype in (torch.float32, torch.float64)
            and _numba_recurrence() is not None
        )
    if chosen == "triton":
        # a loop of GEMMs and Triton launches that honours autocast itself; under torch.compile
        # the compiler gets the layer's pure-torch loop
        triton_rnn = _triton_recurrence()
        return (
            not torch.compiler.is_compiling()
            and not use_torch_path()
            and triton_rnn is not None
            and triton_rnn.supports(x, w)
        )
    return False


def fused_recurrence(x: Tensor, batch_sizes: list[int], h0: Tensor, c0: Tensor | None,
                     w: RecurrentWeights, reverse: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """One direction of one layer over the packed rows ``x`` (N, I), from h0, c0 (B, H).

    Returns the packed output (N, H) and the final h, c (B, H) (c is None for the GRU). Call it
    only where :func:`fused_applies` is true.
    """
    if backend.backend_for(x.device) == "triton":
        return _triton_recurrence().recurrence(x, batch_sizes, h0, c0, w, reverse)
    return _numba_recurrence().recurrence(x, batch_sizes, h0, c0, w, reverse)
