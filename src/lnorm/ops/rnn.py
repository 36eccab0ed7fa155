"""What the recurrent layers (``lnorm.nn.rnn``) hand the fused kernels, and which kernels run.

``lnorm.nn.rnn`` builds a :class:`RecurrentWeights` for one direction of one layer of a
layer-normalized LSTM or GRU with the paper's equations (raw cell state, no zoneout) and asks
:func:`fused_applies`; if it does, :func:`fused_recurrence` computes that direction (the Numba
path is :mod:`lnorm.ops.rnn_fused`), else the layer runs its own pure-torch loop. A new backend
joins here, without touching ``lnorm.nn``.

Notation: G gates (4 for the LSTM, 3 for the GRU), H hidden features, I input features, N packed
rows (time-major, each step's batch sorted longest first), B batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lnorm.ops import backend
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


def fused_applies(x: Tensor, w: RecurrentWeights) -> bool:
    """Whether a fused path computes this direction for the packed rows ``x`` (N, I)."""
    # under torch.compile the Numba path runs as opaque torch.library ops; under torch.export
    # the layer's pure-torch loop runs, so exported programs hold standard ops only
    return (
        not torch.compiler.is_exporting()
        and not use_torch_path(autocast_sensitive=True)
        and x.dtype in (torch.float32, torch.float64)
        and x.shape[0] > 0
        and w.w_hh.dtype == x.dtype
        and backend.backend_for(x.device) == "numba"
        and _numba_recurrence() is not None
    )


def fused_recurrence(x: Tensor, batch_sizes: list[int], h0: Tensor, c0: Tensor | None,
                     w: RecurrentWeights, reverse: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """One direction of one layer over the packed rows ``x`` (N, I), from h0, c0 (B, H).

    Returns the packed output (N, H) and the final h, c (B, H) (c is None for the GRU). Call it
    only where :func:`fused_applies` is true.
    """
    return _numba_recurrence().recurrence(x, batch_sizes, h0, c0, w, reverse)
