"""Residual add + layer norm, the spec of the pre-norm block: s = x + residual; y = LN(s)."""

from __future__ import annotations

import torch
from torch import Tensor

from lnorm.reference.layer_norm import layer_norm_ref


def add_layer_norm_ref(
    x: Tensor,  # (*, *normalized_shape)
    residual: Tensor | None,  # like x, or None (plain layer norm)
    normalized_shape: tuple[int, ...],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    residual_in_fp32: bool = False,
    upcast: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(y, new_residual, mean, rstd)``; new_residual = x + residual in the residual dtype."""
    if residual_in_fp32 and x.dtype != torch.float64:
        res_dtype = torch.float32
    else:
        # torch's type promotion of `x + residual`
        res_dtype = torch.promote_types(x.dtype, residual.dtype) if residual is not None else x.dtype
    # the norm reads the residual stream as stored, the sum rounded to res_dtype (so the returned
    # new residual and the statistics agree, as in ``torch``'s ``x + r`` then the norm)
    s = x.to(res_dtype) if residual is None else x.to(res_dtype) + residual.to(res_dtype)
    y, mean, rstd = layer_norm_ref(s, normalized_shape, weight, bias, eps, upcast)
    return y.to(x.dtype), s, mean, rstd
