"""Functional norm ops with torch's signatures and semantics.

* :func:`layer_norm` ``(x, normalized_shape, weight=None, bias=None, eps=1e-5)`` as ``F.layer_norm``
* :func:`rms_norm` ``(x, normalized_shape, weight=None, eps=None)`` as ``F.rms_norm``
* :func:`add_layer_norm` / :func:`add_rms_norm`: the pre-norm transformer block's
  ``new_residual = x + residual; out = norm(new_residual)``, fused, returning ``(out, new_residual)``;
  ``residual=None`` means a plain norm (then ``new_residual`` is ``x``).

Math (statistics over the trailing ``normalized_shape`` dims of each sample, biased variance,
eps inside the square root)::

    layer_norm(x) = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias
    rms_norm(x)   = x / sqrt(mean(x^2) + eps) * weight

Any number of leading dims; float32/float64/float16/bfloat16 (statistics in float32 for the half
types); non-contiguous input is accepted (copied once). Gradients flow to input, residual,
weight and bias. See :mod:`lnorm.reference` for the float64 specs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lnorm import validation as V
from lnorm.ops.norm import delegates_to_torch, fused_norm, torch_layer_norm

__all__ = ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"]


def _run(x, residual, normalized_shape, weight, bias, eps, *, center: bool, residual_in_fp32: bool,
         with_residual: bool):
    x_name = "x" if with_residual else "input"  # the argument's name in the public signature
    x = V.check_input(x, x_name)
    shape = V.normalized_shape_tuple(normalized_shape)
    V.check_matches_shape(x, shape, x_name)
    weight = V.check_param(weight, x, shape, "weight", x_name=x_name)
    bias = V.check_param(bias, x, shape, "bias", x_name=x_name)
    eps = V.check_eps(eps)
    residual = V.check_residual(residual, x, x_name=x_name)
    if not isinstance(residual_in_fp32, bool):
        raise TypeError(f"residual_in_fp32 must be a bool, got {residual_in_fp32!r}")

    H = shape[0] if len(shape) == 1 else math.prod(shape)
    if center and residual is None and not with_residual and delegates_to_torch(x, H):
        # Torch's own kernel is the faster one here (see lnorm.ops.norm): call it directly, as
        # F.layer_norm would be called, with nothing in between (but a check of its statistics:
        # where a row's squares overflowed, the kernels below compute it).
        y = torch_layer_norm(x, shape, weight, bias, eps)
        if y is not None:
            return y
    # The reshapes cost microseconds each, a visible share at small sizes: skip them when the
    # input already is (rows, features).
    flat = x.dim() == 2 and len(shape) == 1
    x2 = x if flat else x.reshape(-1, H)
    r2 = residual if flat or residual is None else residual.reshape(-1, H)
    w = weight if weight is None or weight.dim() == 1 else weight.reshape(H)
    b = bias if bias is None or bias.dim() == 1 else bias.reshape(H)
    y, new_res, _, _ = fused_norm(x2, r2, w, b, eps, center, residual_in_fp32)
    if not flat:
        y = y.view(x.shape)
    if not with_residual:
        return y
    if residual is None:
        # Plain norm: the new residual is x itself (cast if residual_in_fp32 asks for float32).
        new_res = x.to(torch.float32) if residual_in_fp32 and x.dtype != torch.float64 else x
        return y, new_res
    return y, new_res if flat else new_res.view(x.shape)


def _default_rms_eps(dtype: torch.dtype) -> float:
    # What F.rms_norm does with eps=None (its docs say finfo(input.dtype).eps, its kernels and
    # decomposition use the eps of the compute dtype): float32's for float16/bfloat16 input.
    # finfo(bfloat16).eps = 2**-7 would differ from torch on every row with an RMS below ~1.
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def layer_norm(
    input: Tensor,
    normalized_shape,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """Layer norm over the trailing ``normalized_shape`` dims; drop-in for ``F.layer_norm``."""
    return _run(input, None, normalized_shape, weight, bias, eps, center=True, residual_in_fp32=False,
                with_residual=False)


def rms_norm(
    input: Tensor,
    normalized_shape,
    weight: Tensor | None = None,
    eps: float | None = None,
) -> Tensor:
    """RMS norm over the trailing dims; drop-in for ``F.rms_norm``.

    ``eps=None`` means what it means in torch: ``torch.finfo`` of the compute dtype, so float32's
    eps for float16/bfloat16 input (not ``finfo(input.dtype).eps``).
    """
    V.check_input(input)
    if eps is None:
        eps = _default_rms_eps(input.dtype)
    return _run(input, None, normalized_shape, weight, None, eps, center=False, residual_in_fp32=False,
                with_residual=False)


def add_layer_norm(
    x: Tensor,
    residual: Tensor | None,
    normalized_shape,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    residual_in_fp32: bool = False,
) -> tuple[Tensor, Tensor]:
    """``new_residual = x + residual``; returns ``(layer_norm(new_residual), new_residual)``.

    ``residual_in_fp32=True`` keeps the residual stream in float32 when ``x`` is half precision.
    """
    return _run(x, residual, normalized_shape, weight, bias, eps, center=True,
                residual_in_fp32=residual_in_fp32, with_residual=True)


def add_rms_norm(
    x: Tensor,
    residual: Tensor | None,
    normalized_shape,
    weight: Tensor | None = None,
    eps: float | None = None,
    residual_in_fp32: bool = False,
) -> tuple[Tensor, Tensor]:
    """``new_residual = x + residual``; returns ``(rms_norm(new_residual), new_residual)``."""
    V.check_input(x, "x")
    if eps is None:
        eps = _default_rms_eps(x.dtype)
    return _run(x, residual, normalized_shape, weight, None, eps, center=False,
                residual_in_fp32=residual_in_fp32, with_residual=True)
