"""Residual add + RMS norm, the spec: s = x + residual; y = RMSNorm(s)."""

from __future__ import annotations

import torch
from torch import Tensor

from lnorm.reference.rms_norm import rms_norm_ref


def add_rms_norm_ref(
    x: Tensor,  # (*, *normalized_shape)
    residual: Tensor | None,  # like x, or None (plain RMS norm)
    normalized_shape: tuple[int, ...],
    weight: Tensor | None = None,
    eps: float | None = None,
    residual_in_fp32: bool = False,
    upcast: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(y, new_residual, rstd)``; new_residual = x + residual in the residual dtype."""
    if eps is None:
        eps = torch.finfo(torch.float64 if x.dtype == torch.float64 else torch.float32).eps
    if residual_in_fp32 and x.dtype != torch.float64:
        res_dtype = torch.float32
    else:
        # torch's type promotion of `x + residual`
        res_dtype = torch.promote_types(x.dtype, residual.dtype) if residual is not None else x.dtype
    # the norm reads the residual stream as stored, the sum rounded to res_dtype (see add_layer_norm)
    s = x.to(res_dtype) if residual is None else x.to(res_dtype) + residual.to(res_dtype)
    y, rstd = rms_norm_ref(s, normalized_shape, weight, eps, upcast)
    return y.to(x.dtype), s, rstd
