"""The record of one direction of one recurrent layer that ``lnorm.nn.rnn`` hands the kernels.

Its own module so that both the dispatch (:mod:`lnorm.ops.rnn`) and the kernels' launchers
(:mod:`lnorm.ops.rnn_fused`) can import it. G gates (4 for the LSTM, 3 for the GRU), H hidden
features, I input features.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["RecurrentWeights"]


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
