"""``make_norm(kind, num_features, ...)``: one model definition, any normalization.

Two layouts:

* ``layout="last"`` (default): features are the last dim, as in MLPs ``(B, C)``, sequences
  ``(B, T, C)`` and transformers. ``batch`` is :class:`MaskedBatchNorm`, which takes statistics over
  every position of every sample and, given a padding ``mask`` (``(B, T)``, True = valid), over the
  valid positions only.
* ``layout="channels"``: channels are dim 1, as in CNN feature maps ``(B, C, *spatial)``. ``layer``
  normalizes each sample over ``(C, *spatial)`` with a per-channel gain and bias (the paper's
  convolutional layer norm; equal to ``GroupNorm(1, C)``), ``rms`` likewise without centring,
  ``batch`` is :class:`ChannelBatchNorm` (any number of spatial dims), ``group`` is ``nn.GroupNorm``.

Every returned module's forward is ``forward(x, mask=None)``.

=========  =====================================  ==========================================
kind       layout="last"                          layout="channels"
=========  =====================================  ==========================================
layer      :class:`lnorm.LayerNorm`               :class:`GroupNorm` with 1 group
rms        :class:`lnorm.RMSNorm`                 :class:`ChannelRMSNorm`
batch      :class:`MaskedBatchNorm`               :class:`ChannelBatchNorm`
group      :class:`GroupNorm` over the last dim   :class:`GroupNorm`
none       :class:`NoNorm`                        :class:`NoNorm`
=========  =====================================  ==========================================
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from lnorm import validation as V
from lnorm.nn.normalization import LayerNorm, RMSNorm

__all__ = ["make_norm", "NORM_KINDS", "MaskedBatchNorm", "ChannelBatchNorm", "ChannelRMSNorm",
           "GroupNorm", "NoNorm", "default_groups"]

NORM_KINDS = ("layer", "rms", "batch", "group", "none")


class NoNorm(nn.Identity):
    """The identity, with the norms' ``forward(x, mask=None)`` signature."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__()

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        return input


def _check_mask(mask, x: Tensor) -> Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = valid position), got {mask!r:.60}")
    if tuple(mask.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"mask must have shape {list(x.shape[:-1])} (input without its feature dim), "
                         f"got {list(mask.shape)}")
    return mask


class _AnyDimBatchNorm(nn.modules.batchnorm._BatchNorm):
    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None) -> None:
        super().__init__(V.check_int(num_features, "num_features"), eps, V.check_momentum(momentum),
                         V.check_bool(affine, "affine"), V.check_bool(track_running_stats, "track_running_stats"),
                         device=device, dtype=dtype)

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected input with at least 2 dims (B, C, ...), got shape {list(input.shape)}")


class ChannelBatchNorm(_AnyDimBatchNorm):
    """Batch norm over channels at dim 1 for any ``(B, C, *spatial)``; ``forward(x, mask=None)``."""

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        if mask is not None:
            raise ValueError("ChannelBatchNorm does not take a mask; use layout='last' for sequences")
        if input.shape[1] != self.num_features:
            raise ValueError(f"expected {self.num_features} channels at dim 1, got input of shape "
                             f"{list(input.shape)}")
        return super().forward(input)


class MaskedBatchNorm(_AnyDimBatchNorm):
    """Batch norm over the last dim of ``(B, C)`` or ``(B, T, C)`` input, padding-aware.

    Training statistics are the mean and biased variance over every position of every sample,
    or, given ``mask`` (True = valid), over the valid positions only; the running statistics are
    updated from those (unbiased variance, like torch). Padded positions are normalized with the
    same statistics so the output keeps the input's shape. Batch norm with one value per feature
    cannot compute a variance: training on a single position raises ``ValueError`` as torch does.
    """

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        V.check_input(input)
        if input.dim() < 2 or input.shape[-1] != self.num_features:
            raise ValueError(f"expected input of shape (B, {self.num_features}) or (B, T, "
                             f"{self.num_features}), got {list(input.shape)}")
        mask = _check_mask(mask, input)
        C = self.num_features
        flat = input.reshape(-1, C)
        use_batch_stats = self.training or not self.track_running_stats
        if mask is None or not use_batch_stats:
            return super().forward(flat).view(input.shape)
        valid = flat[mask.reshape(-1)]
        n = valid.shape[0]
        if n <= 1:
            raise ValueError(f"Expected more than 1 valid value per channel when training, got {n} "
                             "(batch norm cannot train on a single position)")
        mean = valid.mean(0)
        var = valid.var(0, unbiased=False)
        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1), alpha=m)
        y = (flat - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y.view(input.shape)


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` with ``forward(x, mask=None)``; ``channels_last=True`` puts channels last."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 channels_last: bool = False, device=None, dtype=None) -> None:
        V.check_int(num_groups, "num_groups")
        if num_channels % num_groups:
            raise ValueError(f"num_channels ({num_channels}) must be divisible by num_groups ({num_groups})")
        super().__init__(num_groups, num_channels, V.check_eps(eps), V.check_bool(affine, "affine"), device=device,
                         dtype=dtype)
        self.channels_last = channels_last

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        if not self.channels_last:
            return super().forward(input)
        lead = input.shape[:-1]
        y = super().forward(input.reshape(-1, input.shape[-1]))
        return y.view(*lead, input.shape[-1])


class ChannelRMSNorm(nn.Module):
    """RMS norm of each sample over ``(C, *spatial)`` with a per-channel gain; input ``(B, C, ...)``."""

    def __init__(self, num_channels: int, eps: float = 1e-5, affine: bool = True, device=None, dtype=None):
        super().__init__()
        self.num_channels = V.check_int(num_channels, "num_channels")
        self.eps = V.check_eps(eps)
        if V.check_bool(affine, "affine"):
            self.weight = nn.Parameter(torch.ones(num_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        if input.dim() < 2 or input.shape[1] != self.num_channels:
            raise ValueError(f"expected input (B, {self.num_channels}, ...), got {list(input.shape)}")
        # statistics in float32 for half types, but never below the input's precision (float64);
        # the output has the input's dtype whatever the weight's (mixed precision, as nn.RMSNorm)
        cdt = torch.float64 if input.dtype == torch.float64 else torch.float32
        flat = input.reshape(input.shape[0], -1).to(cdt)
        y = (flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + self.eps)).view(input.shape)
        if self.weight is not None:
            y = y * self.weight.to(cdt).view(1, -1, *([1] * (input.dim() - 2)))
        return y.to(input.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}, affine={self.weight is not None}"


def default_groups(num_features: int) -> int:
    """The group count of ``make_norm("group")``: the largest of 32, 16, 8, 4, 2 dividing
    ``num_features`` into groups of at least 2 channels; failing that (an odd count), the largest
    divisor up to 32 that does (25 channels: 5 groups of 5). 1 only when no count above 1 does
    (``num_features`` prime or below 4): one group is layer norm, and ``make_norm`` warns."""
    for g in (32, 16, 8, 4, 2):
        if num_features % g == 0 and num_features // g >= 2:
            return g
    # an odd count: a single group would make "group" norm layer norm under another name
    for g in range(min(32, num_features // 2), 1, -1):
        if num_features % g == 0:
            return g
    return 1


def _groups_or_warn(num_features: int) -> int:
    groups = default_groups(num_features)
    if groups == 1:
        warnings.warn(f"make_norm('group', {num_features}): {num_features} channels cannot be split into groups of "
                      "2 or more, so this group norm has one group and is layer norm; pass num_groups to choose",
                      UserWarning, stacklevel=3)
    return groups


def make_norm(kind: str, num_features: int, *, layout: str = "last", **options) -> nn.Module:
    """Build a norm module by name: ``kind`` in ``layer``, ``rms``, ``batch``, ``group``, ``none``.

    Args:
        kind: which normalization (case-insensitive).
        num_features: size of the feature (``layout="last"``) or channel (``"channels"``) dim.
        layout: ``"last"`` (features last: MLPs, sequences, transformers) or ``"channels"``
            (dim 1: CNN feature maps).
        **options: passed to the module (``eps``, ``elementwise_affine``/``affine``, ``momentum``,
            ``num_groups``, ``device``, ``dtype``...); unknown options raise ``TypeError``.

    Example::

        >>> norm = make_norm("batch", 64)
        >>> y = norm(torch.randn(8, 20, 64), mask=torch.ones(8, 20, dtype=torch.bool))
    """
    if not isinstance(kind, str) or kind.lower() not in NORM_KINDS:
        raise ValueError(f"kind must be one of {NORM_KINDS}, got {kind!r}")
    V.check_choice(layout, "layout", V.LAYOUTS)
    V.check_int(num_features, "num_features")
    kind = kind.lower()
    try:
        if kind == "none":
            if options:
                raise TypeError(f"kind 'none' takes no options, got {sorted(options)}")
            return NoNorm()
        if layout == "last":
            if kind == "layer":
                return LayerNorm(num_features, **options)
            if kind == "rms":
                return RMSNorm(num_features, **options)
            if kind == "batch":
                return MaskedBatchNorm(num_features, **options)
            groups = options.pop("num_groups") if "num_groups" in options else _groups_or_warn(num_features)
            return GroupNorm(groups, num_features, channels_last=True, **options)
        if kind == "layer":
            return GroupNorm(1, num_features, **options)
        if kind == "rms":
            return ChannelRMSNorm(num_features, **options)
        if kind == "batch":
            return ChannelBatchNorm(num_features, **options)
        groups = options.pop("num_groups") if "num_groups" in options else _groups_or_warn(num_features)
        return GroupNorm(groups, num_features, **options)
    except TypeError as exc:
        if "unexpected keyword" in str(exc):
            raise TypeError(f"make_norm({kind!r}, layout={layout!r}): {exc}") from None
        raise


