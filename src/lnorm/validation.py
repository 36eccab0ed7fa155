"""The checks of every argument lnorm takes: options, tensors, parameters.

One exception per kind of mistake, always naming the argument and the value received, raised
before anything runs:

* ``TypeError``: the wrong kind of thing (a float where an int is due, a list for a tensor, an
  integer tensor, a dtype that does not match).
* ``ValueError``: the right kind with a wrong value (out of range, unknown name, wrong shape,
  another device).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

_HALF = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------- options

# Where the features are, for the norms that need to know (batch, group, RMS by channel): "last"
# is (B, C) or (B, T, C) with an optional padding mask, "channels" is (B, C, *spatial).
LAYOUTS = ("last", "channels")


def check_int(value, name: str, minimum: int = 1) -> int:
    """An int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_positive(value, name: str) -> float:
    """A finite real number (not a bool) > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_probability(value, name: str) -> float:
    """A real number in [0, 1): a dropout or zoneout rate."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float in [0, 1), got {value!r} ({type(value).__name__})")
    value = float(value)
    if not (0.0 <= value < 1.0):
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return value


def check_bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")
    return value


def check_momentum(value, name: str = "momentum") -> float | None:
    """A batch norm's running-average factor: None (a cumulative average) or a number in [0, 1]
    (NaN would turn every running statistic into NaN, a number outside would make them diverge)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number in [0, 1] or None, got {value!r} ({type(value).__name__})")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1] or None, got {value!r}")
    return float(value)


def check_choice(value, name: str, choices: Sequence[str]) -> str:
    """One of ``choices`` (strings, compared as given)."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


# ---------------------------------------------------------------------------------- tensors


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


def _optional_floating(t, name: str) -> Tensor | None:
    if t is not None and not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t is not None and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    return t


def check_param(
    p, x: Tensor, shape: tuple[int, ...], name: str, *, allow_fp32_with_half: bool = True,
    x_name: str = "input",
) -> Tensor | None:
    """weight / bias: None, or a floating tensor of ``shape`` on x's device with a compatible dtype.

    Compatible dtype: x's own, or float32 when x is float16/bfloat16 (mixed precision, as torch).
    """
    if _optional_floating(p, name) is None:
        return None
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
    if _optional_floating(residual, name) is None:
        return None
    if residual.shape != x.shape:
        raise ValueError(f"{name} must have the shape of {x_name} {list(x.shape)}, got {list(residual.shape)}")
    if residual.device != x.device:
        raise ValueError(f"{name} is on {residual.device} but {x_name} is on {x.device}")
    if residual.dtype != x.dtype and residual.dtype != torch.float32:
        raise TypeError(f"{name} must have {x_name}'s dtype {x.dtype} or float32, got {residual.dtype}")
    return residual
