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

from dataclasses import dataclass

import torch
from torch import Tensor

from lnorm.ops import backend

__all__ = ["RecurrentWeights", "fused_applies", "fused_recurrence"]


@dataclass(frozen=True)
class RecurrentWeights:
    """The tensors of one direction of one layer, torch's gate order (LSTM i, f, g, o; GRU r, z, n)."""

    mode: str  # "LSTM" or "GRU"
    w_ih: Tensor  # (G*H, I)
    w_hh: Tensor  # (G*H, H)
    b_ih: Tensor | None  # (G*H,), None for bias=False (then b_hh is None too)
    b_hh: Tensor | None  # (G*H,)
    ln_ih_w: Tensor  # (G*H,) gain and bias of LN(W_ih x); the GRU's in two groups [2H | H]
    ln_ih_b: Tensor
    ln_hh_w: Tensor  # (G*H,) of LN(W_hh h), grouped as ln_ih
    ln_hh_b: Tensor
    ln_c_w: Tensor | None  # (H,) of LN(c) for the LSTM; None for the GRU
    ln_c_b: Tensor | None
    eps: float

    def __post_init__(self) -> None:
        if self.mode not in ("LSTM", "GRU"):
            raise ValueError(f"mode must be 'LSTM' or 'GRU', got {self.mode!r}")


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
    return (
        not torch.compiler.is_compiling()
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
