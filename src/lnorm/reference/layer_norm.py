"""Layer norm, the spec: y = (x - mean) / sqrt(var + eps) * weight + bias over the trailing dims."""

from __future__ import annotations

import torch
from torch import Tensor


def layer_norm_ref(
    x: Tensor,  # (*, *normalized_shape)
    normalized_shape: tuple[int, ...],
    weight: Tensor | None = None,  # normalized_shape
    bias: Tensor | None = None,  # normalized_shape
    eps: float = 1e-5,
    upcast: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(y, mean, rstd)``; y in x's dtype, mean/rstd (R,) in the compute dtype."""
    dtype = torch.float64 if upcast else x.dtype
    dims = tuple(range(-len(normalized_shape), 0))
    xc = x.to(dtype)
    mean = xc.mean(dim=dims, keepdim=True)  # (*, 1...)
    var = (xc - mean).square().mean(dim=dims, keepdim=True)  # biased
    rstd = torch.rsqrt(var + eps)
    y = (xc - mean) * rstd
    if weight is not None:
        y = y * weight.to(dtype)
    if bias is not None:
        y = y + bias.to(dtype)
    return y.to(x.dtype), mean.reshape(-1), rstd.reshape(-1)
