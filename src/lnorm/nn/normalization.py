"""Norm modules: drop-in for ``torch.nn.LayerNorm`` / ``torch.nn.RMSNorm``, plus fused add + norm.

``LayerNorm`` and ``RMSNorm`` subclass the torch modules, so constructor arguments, parameter
names, ``reset_parameters``, ``extra_repr`` and ``state_dict`` are the same in both directions;
only ``forward`` runs lnorm's kernels. Every module takes an optional ``mask`` in forward and
ignores it (per-sample statistics need none), so models built with :func:`lnorm.nn.make_norm`
can pass a padding mask whatever the norm.

``torch.jit.script`` compiles each module to torch's own ops (``F.layer_norm``, ``F.rms_norm``,
the add then the norm): the same function, scriptable and saveable as ``nn.LayerNorm`` is; in
Python the modules call lnorm's kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lnorm import functional as LF
from lnorm import validation as V

__all__ = ["LayerNorm", "RMSNorm", "AddLayerNorm", "AddRMSNorm"]


def _residual_sum(x: Tensor, residual: Tensor | None, residual_in_fp32: bool) -> Tensor:
    """The new residual stream of the add modules in torch ops (their TorchScript form): the sum
    in the residual dtype, as :func:`lnorm.functional.add_layer_norm` forms it."""
    if residual_in_fp32 and x.dtype != torch.float64:
        dtype = torch.float32
    elif residual is not None:  # torch's `x + residual` (float64 x with a float32 residual: float64)
        dtype = torch.promote_types(x.dtype, residual.dtype)
    else:
        dtype = x.dtype
    if residual is None:
        return x.to(dtype)
    return x.to(dtype) + residual.to(dtype)


class LayerNorm(nn.LayerNorm):
    r"""Layer normalization (Ba, Kiros & Hinton, 2016) over the trailing ``normalized_shape`` dims.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \odot g + b

    with the mean and biased variance of each sample over the normalized dims, gain ``g``
    (``weight``) initialised to 1 and bias ``b`` to 0.

    Args:
        normalized_shape: int or tuple, the trailing dims to normalize over.
        eps: added to the variance inside the square root; must be > 0. Default 1e-5.
        elementwise_affine: learn ``weight`` (and ``bias``). Default True.
        bias: learn ``bias`` (with ``elementwise_affine``). Default True.
        device, dtype: factory kwargs for the parameters.

    Shape:
        input ``(*, *normalized_shape)``, output the same.

    Example::

        >>> norm = lnorm.LayerNorm(768)
        >>> y = norm(torch.randn(4, 10, 768))
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None) -> None:
        shape = V.normalized_shape_tuple(normalized_shape)
        eps = V.check_eps(eps)
        elementwise_affine, bias = V.check_bool(elementwise_affine, "elementwise_affine"), V.check_bool(bias, "bias")
        super().__init__(shape, eps, elementwise_affine, bias, device=device, dtype=dtype)

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        if torch.jit.is_scripting():
            return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
        return self._lnorm(input)

    @torch.jit.unused
    def _lnorm(self, input: Tensor) -> Tensor:
        return LF.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.RMSNorm):
    r"""Root-mean-square normalization (Zhang & Sennrich, 2019) over the trailing dims.

    .. math::
        y = \frac{x}{\sqrt{\mathrm{E}[x^2] + \epsilon}} \odot g

    Args:
        normalized_shape: int or tuple, the trailing dims to normalize over.
        eps: added inside the square root; ``None`` (default) means what it means in torch:
            ``torch.finfo`` of the compute dtype (float32's eps for float16/bfloat16 input).
        elementwise_affine: learn ``weight`` (initialised to 1). Default True.
        device, dtype: factory kwargs.
    """

    def __init__(self, normalized_shape, eps: float | None = None, elementwise_affine: bool = True,
                 device=None, dtype=None) -> None:
        shape = V.normalized_shape_tuple(normalized_shape)
        if eps is not None:
            eps = V.check_eps(eps)
        super().__init__(shape, eps, V.check_bool(elementwise_affine, "elementwise_affine"), device=device,
                         dtype=dtype)

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        if torch.jit.is_scripting():
            return F.rms_norm(input, self.normalized_shape, self.weight, self.eps)
        return self._lnorm(input)

    @torch.jit.unused
    def _lnorm(self, input: Tensor) -> Tensor:
        return LF.rms_norm(input, self.normalized_shape, self.weight, self.eps)


class AddLayerNorm(LayerNorm):
    r"""Fused residual add + layer norm, the pre-norm transformer block's step.

    ``forward(x, residual=None)`` returns ``(out, new_residual)`` with ``new_residual = x + residual``
    (``x`` when ``residual`` is None) and ``out = LayerNorm(new_residual)``. Same parameters and
    ``state_dict`` as :class:`LayerNorm` / ``torch.nn.LayerNorm``.

    Args:
        residual_in_fp32: keep ``new_residual`` in float32 when ``x`` is float16/bfloat16.

    Example::

        >>> norm = lnorm.AddLayerNorm(64)
        >>> h, residual = norm(torch.randn(2, 5, 64))          # first block: no residual yet
        >>> h, residual = norm(torch.randn(2, 5, 64), residual)
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, residual_in_fp32: bool = False, device=None, dtype=None) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device=device, dtype=dtype)
        if not isinstance(residual_in_fp32, bool):
            raise TypeError(f"residual_in_fp32 must be a bool, got {residual_in_fp32!r}")
        self.residual_in_fp32 = residual_in_fp32

    def forward(self, x: Tensor, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        if torch.jit.is_scripting():
            s = _residual_sum(x, residual, self.residual_in_fp32)
            # the parameters in the sum's dtype, as eager does (F.layer_norm refuses half or
            # bfloat16 parameters beside a float32 sum)
            w, b = self.weight, self.bias
            if w is not None:
                w = w.to(s.dtype)
            if b is not None:
                b = b.to(s.dtype)
            return F.layer_norm(s, self.normalized_shape, w, b, self.eps).to(x.dtype), s
        return self._lnorm_add(x, residual)

    @torch.jit.unused
    def _lnorm_add(self, x: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
        return LF.add_layer_norm(x, residual, self.normalized_shape, self.weight, self.bias,
                                 self.eps, self.residual_in_fp32)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", residual_in_fp32={self.residual_in_fp32}"


class AddRMSNorm(RMSNorm):
    r"""Fused residual add + RMS norm: ``forward(x, residual=None) -> (out, new_residual)``."""

    def __init__(self, normalized_shape, eps: float | None = None, elementwise_affine: bool = True,
                 residual_in_fp32: bool = False, device=None, dtype=None) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, device=device, dtype=dtype)
        if not isinstance(residual_in_fp32, bool):
            raise TypeError(f"residual_in_fp32 must be a bool, got {residual_in_fp32!r}")
        self.residual_in_fp32 = residual_in_fp32

    def forward(self, x: Tensor, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        if torch.jit.is_scripting():
            s = _residual_sum(x, residual, self.residual_in_fp32)
            eps = self.eps
            if eps is None:  # lnorm's default: the compute dtype's, as for the sum's rms_norm
                eps = 2.220446049250313e-16 if x.dtype == torch.float64 else 1.1920928955078125e-07
            return F.rms_norm(s, self.normalized_shape, self.weight, eps).to(x.dtype), s
        return self._lnorm_add(x, residual)

    @torch.jit.unused
    def _lnorm_add(self, x: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
        return LF.add_rms_norm(x, residual, self.normalized_shape, self.weight, self.eps,
                               self.residual_in_fp32)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", residual_in_fp32={self.residual_in_fp32}"


