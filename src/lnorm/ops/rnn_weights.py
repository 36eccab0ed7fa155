"""The record of one direction of one recurrent layer that ``lnorm.nn.rnn`` hands the kernels.

Its own module so that both the dispatch (:mod:`lnorm.ops.rnn`) and the kernels' launchers
(:mod:`lnorm.ops.rnn_fused`) can import it. G gates (4 for the LSTM, 3 for the GRU), H hidden
features, I input features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["RecurrentWeights", "check_shapes"]


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


def check_shapes(x: Tensor, h0: Tensor, c0: Tensor | None, p: RecurrentWeights, batch_sizes: list[int],
                 device: str | torch.device | None = None) -> None:
    """Every tensor the kernels index by raw offsets (or that makes one they do), checked for the
    shape, dtype and device they assume before any of them runs (a wrong one would read or write
    out of bounds): a ValueError naming it. Every tensor must share the input's dtype and lie on
    ``device`` (default: the input's), the device the calling kernels run on."""
    want_dev = torch.device(device) if device is not None else x.device
    mode = p.mode
    first = batch_sizes[0] if batch_sizes else 0
    if h0.dim() != 2 or h0.shape[1] == 0 or h0.shape[0] != first:
        raise ValueError(f"fused {mode}: h_0 must have shape [{first}, hidden_size] (the first step's "
                         f"batch), got {list(h0.shape)}")
    B, H = h0.shape
    G = (4 if mode == "LSTM" else 3) * H
    I = p.w_ih.shape[1] if p.w_ih.dim() == 2 else -1
    want = {
        "h_0": (h0, (B, H)),
        "c_0": (c0, (B, H)),
        "weight_ih": (p.w_ih, (G, I)),
        "weight_hh": (p.w_hh, (G, H)),
        "bias_ih": (p.b_ih, (G,)),
        "bias_hh": (p.b_hh, (G,)),
        "ln_ih_weight": (p.ln_ih_w, (G,)),
        "ln_ih_bias": (p.ln_ih_b, (G,)),
        "ln_hh_weight": (p.ln_hh_w, (G,)),
        "ln_hh_bias": (p.ln_hh_b, (G,)),
        "ln_cell_weight": (p.ln_c_w, (H,)),
        "ln_cell_bias": (p.ln_c_b, (H,)),
        "input rows": (x, (sum(batch_sizes), I)),
    }
    for name, (t, shape) in want.items():
        if t is None:
            continue
        if t.device != want_dev or t.dtype != x.dtype:
            raise ValueError(f"fused {mode}: {name} is a {t.dtype} tensor on {t.device}, expected "
                             f"{x.dtype} on {want_dev}")
        if tuple(t.shape) != shape:
            raise ValueError(f"fused {mode}: {name} must have shape {list(shape)}, got {list(t.shape)}")
