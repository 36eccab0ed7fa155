"""The fused norm in standard torch ops, for ``torch.export`` and the ONNX exporter built on it.

Under ``torch.export`` (``torch.onnx.export(..., dynamo=True)`` included) :func:`lnorm.ops.norm.fused_norm`
calls :func:`norm_in_standard_ops` instead of the ``lnorm::norm_fwd`` custom op, so the exported
program holds only aten ops: it loads without lnorm, runs where a Python op cannot (AOTInductor,
ExecuTorch), and the ONNX exporter maps it to the standard operators that runtimes fuse:

* layer norm -> ``aten.native_layer_norm`` -> ONNX ``LayerNormalization`` (opset 17+);
* RMS norm -> ``aten.rms_norm`` -> ONNX ``RMSNormalization`` at opset 23+, its decomposition
  (``Pow``, ``ReduceMean``, ``Sqrt``, ...) at older opsets;
* the fused add -> ``Add`` before either (ONNX has no standard op for the pair).

The dtype handling is the pure-torch launcher's (``lnorm.ops.norm``): the sum is formed in the
residual dtype, half types are normalized in float32 and the result cast back, so the exported
model computes what the eager module computes.
"""

from __future__ import annotations

import torch
from torch import Tensor


def exporting() -> bool:
    """Whether ``torch.export`` (or the ONNX exporter built on it) is tracing now: True there,
    False under ``torch.compile`` and in eager mode.

    ``torch.export`` sets ``torch.compiler._is_exporting_flag`` while it traces (strict and
    non-strict), and ``torch.compiler.is_exporting()`` returns it, except inside dynamo's trace
    on some torch releases (2.11, seen on a GPU machine), where dynamo folds the call to a
    constant True for ``torch.compile`` too, which sent compiled models down the export route
    (torch's kernels instead of lnorm's). torch 2.13's dynamo reads the flag. Reading the flag
    itself gives export's answer on both (dynamo reads a module global as a constant it guards
    on); where a torch release lacks it, ``is_exporting()`` answers."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return torch.compiler.is_exporting() if flag is None else bool(flag)


def norm_in_standard_ops(
    x: Tensor,
    residual: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    center: bool,
    res_dtype: torch.dtype,
    cdt: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``fused_norm``'s ``(y, new_residual, mean, rstd)`` for 2-D ``x`` (R, H), from aten ops
    that exporters know; ``res_dtype`` is the residual stream's dtype, ``cdt`` the one the norm
    computes in. ``mean`` is empty for RMS norm, ``new_residual`` when there is no ``residual``
    (as in ``fused_norm``)."""
    R, H = x.shape
    if residual is not None:
        src = x.to(res_dtype) + residual.to(res_dtype)  # (R, H)
        new_residual = src
    else:
        src = x
        new_residual = x.new_empty(0, dtype=res_dtype)
    s = src.to(cdt)  # no-op (no node) for float32/float64 data
    w = weight.to(cdt) if weight is not None else None
    if center:
        b = bias.to(cdt) if bias is not None else None
        y, mean, rstd = torch.native_layer_norm(s, [H], w, b, eps)  # mean, rstd: (R, 1)
        mean = mean.reshape(R)
    else:
        y = torch.rms_norm(s, [H], w, eps)
        if bias is not None:
            y = y + bias.to(cdt)
        # fused_norm returns the statistics too; exporters drop them when nothing reads them
        rstd = torch.rsqrt(s.square().mean(-1, keepdim=True) + eps)
        mean = s.new_empty(0)
    return y.to(x.dtype), new_residual, mean, rstd.reshape(R)
