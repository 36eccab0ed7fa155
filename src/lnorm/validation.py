"""Input checks shared by the functional API and the modules.

Every check raises ``TypeError`` (wrong kind of thing) or ``ValueError`` (right kind, wrong value)
with the argument's name and the value received, before any kernel sees the data.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

_HALF = (torch.float16, torch.bfloat16)


def normalized_shape_tuple(normalized_shape, name: str = "normalized_shape") -> tuple[int, ...]:
    """``int`` or sequence of ints -> tuple of positive ints."""
    if type(normalized_shape) is tuple and len(normalized_shape) == 1:  # the modules' common case
        d = normalized_shape[0]
        if type(d) is int and d > 0:
            return normalized_shape
    elif type(normalized_shape) is int and normalized_shape > 0:
        return (normalized_shape,)
    if isinstance(normalized_shape, bool):
        raise TypeError(f"{name} must be an int or a tuple of ints, got {normalized_shape!r}")
    if isinstance(normalized_shape, numbers.Integral):
        shape = (int(normalized_shape),)
    elif isinstance(normalized_shape, (Sequence, torch.Size)) and not isinstance(normalized_shape, str):
        if not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) for d in normalized_shape):
            raise TypeError(f"{name} must be an int or a tuple of ints, got {normalized_shape!r}")
        shape = tuple(int(d) for d in normalized_shape)
    else:
        raise TypeError(f"{name} must be an int or a tuple of ints, got {normalized_shape!r}")
    if len(shape) == 0 or any(d <= 0 for d in shape):
        raise ValueError(f"{name} must be non-empty with positive sizes, got {normalized_shape!r}")
    return shape


def check_eps(eps, name: str = "eps") -> float:
    """eps must be a finite real number > 0: eps = 0 turns a constant row into 0/0 = NaN."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"{name} must be a positive float, got {eps!r} ({type(eps).__name__})")
    eps = float(eps)
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"{name} must be a finite number > 0, got {eps!r}")
    return eps


def check_input(x, name: str = "input") -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return x


def check_matches_shape(x: Tensor, normalized_shape: tuple[int, ...], name: str = "input") -> None:
    n = len(normalized_shape)
    if x.dim() < n or tuple(x.shape[x.dim() - n :]) != normalized_shape:
        raise ValueError(
            f"normalized_shape {list(normalized_shape)} does not match the trailing dims of "
            f"{name} of shape {list(x.shape)}; expected {name} of shape [*, "
            f"{', '.join(map(str, normalized_shape))}]"
        )


def check_param(
    p, x: Tensor, shape: tuple[int, ...], name: str, *, allow_fp32_with_half: bool = True,
    x_name: str = "input",
) -> Tensor | None:
    """weight / bias: None, or a floating tensor of ``shape`` on x's device with a compatible dtype.

    Compatible dtype: x's own, or float32 when x is float16/bfloat16 (mixed precision, as torch).
    """
    if p is None:
        return None
    if not isinstance(p, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(p).__name__}")
    if not p.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {p.dtype}")
    if tuple(p.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)} (normalized_shape), got {list(p.shape)}")
    if p.device != x.device:
        raise ValueError(f"{name} is on {p.device} but {x_name} is on {x.device}; move them to one device")
    if p.dtype != x.dtype and not (allow_fp32_with_half and x.dtype in _HALF and p.dtype == torch.float32):
        raise TypeError(
            f"{name} has dtype {p.dtype} but {x_name} has dtype {x.dtype}; use the same dtype "
            f"(or float32 {name} with float16/bfloat16 {x_name})"
        )
    return p


def check_residual(residual, x: Tensor, name: str = "residual", x_name: str = "x") -> Tensor | None:
    if residual is None:
        return None
    if not isinstance(residual, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(residual).__name__}")
    if not residual.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {residual.dtype}")
    if residual.shape != x.shape:
        raise ValueError(f"{name} must have the shape of {x_name} {list(x.shape)}, got {list(residual.shape)}")
    if residual.device != x.device:
        raise ValueError(f"{name} is on {residual.device} but {x_name} is on {x.device}")
    if residual.dtype != x.dtype and residual.dtype != torch.float32:
        raise TypeError(f"{name} must have {x_name}'s dtype {x.dtype} or float32, got {residual.dtype}")
    return residual
