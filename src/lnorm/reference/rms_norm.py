"""RMS norm, the spec: y = x / sqrt(mean(x^2) + eps) * weight over the trailing dims."""

from __future__ import annotations

import torch
from torch import Tensor


def rms_norm_ref(
    x: Tensor,  # (*, *normalized_shape)
    normalized_shape: tuple[int, ...],
    weight: Tensor | None = None,  # normalized_shape
    eps: float | None = None,  # None: finfo of the compute dtype (float32 for half), as torch's kernels
    upcast: bool = True,
) -> tuple[Tensor, Tensor]:
    """Returns ``(y, rstd)``; y in x's dtype, rstd (R,) in the compute dtype."""
    if eps is None:
        eps = torch.finfo(torch.float64 if x.dtype == torch.float64 else torch.float32).eps
    dtype = torch.float64 if upcast else x.dtype
    dims = tuple(range(-len(normalized_shape), 0))
    xc = x.to(dtype)
    rstd = torch.rsqrt(xc.square().mean(dim=dims, keepdim=True) + eps)  # (*, 1...)
    y = xc * rstd
    if weight is not None:
        y = y * weight.to(dtype)
    return y.to(x.dtype), rstd.reshape(-1)
