"""Model conversion, in the manner of ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``.

* :func:`convert_norms`: swap one kind of normalization for another (batch norm -> layer, group
  or RMS norm, ...), in whatever layout each layer sees (CNN channels or MLP features).
* :func:`use_lnorm`: swap every ``torch.nn.LayerNorm`` / ``torch.nn.RMSNorm`` for lnorm's
  (same parameters, same outputs, lnorm's kernels).
* :func:`lstm_to_layernorm` / :func:`layernorm_to_lstm`: ``nn.LSTM``/``nn.GRU``/``nn.RNN`` <->
  :class:`lnorm.nn.LayerNormLSTM`/``GRU``/``RNN`` with the weights copied.

Every converter recurses over ``named_children``, replaces matching submodules in place, copies
weights under ``torch.no_grad()``, keeps ``training``, ``requires_grad``, device and dtype, keeps
a module shared by two parents shared, and returns the root: a new module when the root itself
matches, else the same (modified) one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from lnorm.nn.factory import (
    NORM_KINDS,
    ChannelBatchNorm,
    ChannelRMSNorm,
    MaskedBatchNorm,
    default_groups,
    make_norm,
)
from lnorm.nn.normalization import LayerNorm, RMSNorm
from lnorm.nn.rnn import LayerNormGRU, LayerNormLSTM, LayerNormRNN
from lnorm.utils import ModelState, first_tensor

__all__ = ["convert_norms", "use_lnorm", "lstm_to_layernorm", "layernorm_to_lstm"]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _replace(root: nn.Module, convert: Callable[[str, nn.Module], nn.Module | None]) -> nn.Module:
    """Depth-first: ``convert(name, module)`` returns a replacement or None (recurse into it)."""
    memo: dict[int, nn.Module] = {}  # a module shared by two parents stays shared

    def visit(name: str, module: nn.Module) -> nn.Module:
        if id(module) in memo:
            return memo[id(module)]
        new = convert(name, module)
        if new is None:
            # _modules, not named_children(): that one skips a child met twice
            for child_name, child in list(module._modules.items()):
                if child is None:
                    continue
                new_child = visit(f"{name}.{child_name}" if name else child_name, child)
                if new_child is not child:
                    setattr(module, child_name, new_child)
            new = module
        memo[id(module)] = new
        return new

    return visit("", root)


def _like(new: nn.Module, old: nn.Module) -> nn.Module:
    """Put ``new`` on ``old``'s device and dtype, in its mode, with its ``requires_grad``."""
    ref = next(iter(old.parameters(recurse=False)), None)
    if ref is None:
        ref = next((b for b in old.buffers(recurse=False) if b.is_floating_point()), None)
    if ref is not None:
        new = new.to(device=ref.device, dtype=ref.dtype)
    new.train(old.training)
    grads = {p.requires_grad for p in old.parameters(recurse=False)}
    if len(grads) == 1:
        new.requires_grad_(grads.pop())
    return new


def _copy(dst: Tensor | None, src: Tensor | None) -> None:
    if dst is not None and src is not None:
        dst.copy_(src.detach())


# --------------------------------------------------------------------------------------------
# convert_norms
# --------------------------------------------------------------------------------------------

_DEFAULT_SOURCE = (nn.BatchNorm1d, nn.BatchNorm2d)


def _source_layout(module: nn.Module, name: str, layout, seen: dict[str, int]) -> tuple[int, str]:
    """(num_features, layout) of a source norm, or ValueError when it cannot be told."""
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        shape = tuple(module.normalized_shape)
        if len(shape) != 1:
            raise ValueError(f"cannot convert {name or '<model>'} ({type(module).__name__} over "
                             f"normalized_shape={list(shape)}): only norms over one feature dim convert")
        return shape[0], "last"
    if isinstance(module, ChannelRMSNorm):
        return module.num_channels, "channels"
    if isinstance(module, nn.GroupNorm):
        return module.num_channels, "last" if getattr(module, "channels_last", False) else "channels"
    if isinstance(module, MaskedBatchNorm):
        return module.num_features, "last"
    if isinstance(module, (ChannelBatchNorm, nn.BatchNorm2d, nn.BatchNorm3d, nn.modules.instancenorm._InstanceNorm)):
        return module.num_features, "channels"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):  # BatchNorm1d: (B, C) or (B, C, L)
        if isinstance(layout, dict) and name in layout:
            return module.num_features, layout[name]
        if isinstance(layout, str):
            return module.num_features, layout
        if name in seen:
            return module.num_features, "last" if seen[name] == 2 else "channels"
        raise ValueError(
            f"cannot tell the layout of {name or '<model>'} ({type(module).__name__}({module.num_features})): "
            "BatchNorm1d takes (B, C) features (layout='last') or (B, C, L) channels "
            "(layout='channels'); pass layout=..., or example_input=... to watch what it receives")
    raise ValueError(f"cannot convert {name or '<model>'}: {type(module).__name__} is not a normalization "
                     "layer lnorm knows")


def _watch_input_dims(model: nn.Module, example_input, source) -> dict[str, int]:
    """Run ``example_input`` once (no grad, state restored) and record each source's input dim."""
    names = {m: n for n, m in model.named_modules() if isinstance(m, source)}
    seen: dict[str, set[int]] = {}

    def hook(mod, args):
        x = first_tensor(args)
        if x is not None:
            seen.setdefault(names[mod], set()).add(x.dim())

    handles = [m.register_forward_pre_hook(hook) for m in names]
    state = ModelState(model)
    try:
        with torch.no_grad():
            if isinstance(example_input, tuple):
                model(*example_input)
            else:
                model(example_input)
    finally:
        state.restore()
        for h in handles:
            h.remove()
    for n, dims in seen.items():
        if len(dims) > 1:
            raise ValueError(f"{n} received inputs with different numbers of dims {sorted(dims)}; "
                             "pass layout=... for it")
    return {n: dims.pop() for n, dims in seen.items()}


def convert_norms(model: nn.Module, source=_DEFAULT_SOURCE, target: str = "layer", *,
                  layout: str | dict[str, str] | None = None, example_input=None,
                  num_groups: int | None = None, eps: float | None = None,
                  drop_bias: bool = False) -> nn.Module:
    """Replace every normalization layer of the ``source`` types by a ``target`` norm.

    Built by :func:`lnorm.nn.make_norm`, in the layout the replaced layer saw: ``BatchNorm2d``/
    ``3d``, ``GroupNorm``, ``InstanceNorm`` -> ``layout="channels"`` (normalize each sample over
    ``(C, *spatial)`` with per-channel gain: for ``"layer"`` that is ``GroupNorm(1, C)``, the
    paper's convolutional layer norm); ``LayerNorm``/``RMSNorm`` over one dim -> ``"last"``.
    ``BatchNorm1d`` is either: ``(B, C)`` features (``"last"``) or ``(B, C, L)`` channels
    (``"channels"``); say which with ``layout`` or let ``example_input`` show it.

    The affine parameters (per-feature gain and bias) are copied; running statistics too when
    the target is ``"batch"``. The conversion is exact only between norms that compute the same
    thing (``nn.LayerNorm`` -> ``"layer"``, ``BatchNorm2d`` -> ``"batch"``); batch norm -> layer
    norm changes the function, so retrain or fine-tune afterwards. The model is modified in place
    and returned; the return value is a new module when ``model`` itself is a source layer.

    Args:
        model: the model.
        source: type or tuple of types to replace. Default ``(nn.BatchNorm1d, nn.BatchNorm2d)``.
        target: ``"layer"``, ``"rms"``, ``"group"``, ``"batch"`` or ``"none"``.
        layout: for ``BatchNorm1d`` sources: ``"last"`` or ``"channels"``, or a dict from module
            name to layout.
        example_input: a tensor (or tuple of positional args) run once through the model, with
            its state restored, to see what each ``BatchNorm1d`` receives.
        num_groups: for ``target="group"``; default the largest of 32, 16, 8, 4, 2 that divides
            the channels leaving at least 2 per group.
        eps: the new layers' eps; default each replaced layer's own.
        drop_bias: allow ``target="rms"`` (which has no bias) to replace a layer whose bias is
            not zero, dropping the bias. Default False: that raises.

    Raises:
        ValueError: a conversion that cannot be done (unknown layout, multi-dim
            ``normalized_shape``, channels not divisible by ``num_groups``, a nonzero bias with
            no place to go), naming the layer.

    Example::

        >>> cnn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        >>> cnn = convert_norms(cnn, target="group", num_groups=4)
        >>> cnn[1]
        GroupNorm(4, 8, eps=1e-05, affine=True, bias=True)
        >>> mlp = convert_norms(nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8)), layout="last")
        >>> type(mlp[1]).__name__
        'LayerNorm'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(source, type):
        source = (source,)
    if not (isinstance(source, tuple) and source and all(isinstance(t, type) and issubclass(t, nn.Module)
                                                          for t in source)):
        raise TypeError(f"source must be a module type or a tuple of them, got {source!r}")
    if not isinstance(target, str) or target.lower() not in NORM_KINDS:
        raise ValueError(f"target must be one of {NORM_KINDS}, got {target!r}")
    target = target.lower()
    if layout is not None and not (layout in ("last", "channels") or (
            isinstance(layout, dict) and all(v in ("last", "channels") for v in layout.values()))):
        raise ValueError(f"layout must be 'last', 'channels', a dict of them, or None, got {layout!r}")
    if num_groups is not None and target != "group":
        raise ValueError(f"num_groups is for target='group', got target={target!r}")
    seen = _watch_input_dims(model, example_input, source) if example_input is not None else {}

    def convert(name: str, module: nn.Module) -> nn.Module | None:
        if not isinstance(module, source):
            return None
        label = name or "<model>"
        C, lay = _source_layout(module, name, layout, seen)
        weight = getattr(module, "weight", None)
        bias = getattr(module, "bias", None)
        affine = weight is not None
        options: dict = {}
        src_eps = getattr(module, "eps", None)
        if eps is not None or src_eps is not None:
            options["eps"] = eps if eps is not None else src_eps
        if target in ("layer", "rms") and lay == "last":
            options["elementwise_affine"] = affine
            if target == "layer":
                # a bias-free nn.LayerNorm stays bias-free; from anything else the bias starts at 0
                options["bias"] = affine and not (isinstance(module, nn.LayerNorm) and bias is None)
        elif target != "none":
            options["affine"] = affine
        if target == "group":
            groups = num_groups if num_groups is not None else default_groups(C)
            if C % groups:
                raise ValueError(f"cannot convert {label} to group norm: its {C} channels are not "
                                 f"divisible by num_groups={groups}")
            options["num_groups"] = groups
        if target == "batch":
            for key in ("momentum", "track_running_stats"):
                if hasattr(module, key):
                    options[key] = getattr(module, key)
        if target == "none":
            options = {}
        try:
            new = make_norm(target, C, layout=lay, **options)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"cannot convert {label} ({type(module).__name__}) to {target!r}: {exc}") from None
        new = _like(new, module)
        with torch.no_grad():
            _copy(getattr(new, "weight", None), weight)
            new_bias = getattr(new, "bias", None)
            if bias is not None and new_bias is None and target != "none" and bool((bias != 0).any()):
                if not drop_bias:
                    raise ValueError(f"cannot convert {label} to {target!r} without losing its nonzero "
                                     "bias (that norm has none); pass drop_bias=True to drop it")
            _copy(new_bias, bias)
            if target == "batch" and getattr(module, "running_mean", None) is not None \
                    and getattr(new, "running_mean", None) is not None:
                new.running_mean.copy_(module.running_mean)
                new.running_var.copy_(module.running_var)
                new.num_batches_tracked.copy_(module.num_batches_tracked)
        return new

    return _replace(model, convert)


# --------------------------------------------------------------------------------------------
# use_lnorm
# --------------------------------------------------------------------------------------------


def use_lnorm(model: nn.Module) -> nn.Module:
    """Swap every ``torch.nn.LayerNorm`` / ``torch.nn.RMSNorm`` for :class:`lnorm.LayerNorm` /
    :class:`lnorm.RMSNorm`, keeping parameters, eps, mode, ``requires_grad``, device and dtype.

    Exact: lnorm's modules compute the same function with the same parameter names (they
    subclass torch's), so outputs match up to float round-off and ``state_dict`` keys do not
    change. Subclasses of torch's norms (including lnorm's own) are left alone. In place; returns
    a new root when ``model`` itself is a ``nn.LayerNorm``/``nn.RMSNorm``.

    Example::

        >>> block = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)
        >>> block = use_lnorm(block)
        >>> type(block.norm1).__module__
        'lnorm.nn.normalization'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")

    def convert(name: str, m: nn.Module) -> nn.Module | None:
        if type(m) is nn.LayerNorm:
            new = LayerNorm(m.normalized_shape, eps=m.eps, elementwise_affine=m.elementwise_affine,
                            bias=m.bias is not None, device="meta")
        elif type(m) is nn.RMSNorm:
            new = RMSNorm(m.normalized_shape, eps=m.eps, elementwise_affine=m.elementwise_affine, device="meta")
        else:
            return None
        # reuse the very parameter objects: optimizers and tied weights keep pointing at them
        new.weight = m.weight
        if isinstance(m, nn.LayerNorm):
            new.bias = m.bias
        new.train(m.training)
        return new

    return _replace(model, convert)


# --------------------------------------------------------------------------------------------
# recurrent layers: nn.LSTM / GRU / RNN <-> LayerNormLSTM / GRU / RNN
# --------------------------------------------------------------------------------------------

_TORCH_ARGS = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional")


_RNN_CLASSES = {nn.LSTM: LayerNormLSTM, nn.GRU: LayerNormGRU, nn.RNN: LayerNormRNN}


def _copy_rnn_weights(dst: nn.Module, src: nn.Module) -> None:
    """Copy every torch-named parameter (``weight_ih_l0``...), with its ``requires_grad``."""
    src_params = dict(src.named_parameters(recurse=False))
    with torch.no_grad():
        for name, p in dst.named_parameters(recurse=False):
            if name in src_params:
                p.copy_(src_params[name])
                p.requires_grad_(src_params[name].requires_grad)
            else:  # an LN parameter: trainable when the torch weights are
                p.requires_grad_(src.weight_ih_l0.requires_grad)


def lstm_to_layernorm(model: nn.Module, *, layer_norm: bool = True, eps: float = 1e-5,
                      **options) -> nn.Module:
    """Replace every ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` by :class:`lnorm.nn.LayerNormLSTM` /
    ``LayerNormGRU`` / ``LayerNormRNN`` with the same configuration and the weights copied.

    The torch parameters (``weight_ih_l0``, ``weight_hh_l0``, ``bias_ih_l0``, ``bias_hh_l0``,
    ``..._reverse``) keep their names and values; the layer-norm parameters are added with gain
    1 and bias 0, as close to the identity as the equations allow. Layer norm still changes the
    function (it rescales each pre-activation vector to zero mean and unit variance), so the
    outputs differ from the original layer's and the model needs training or fine-tuning. With
    ``layer_norm=False`` the new layer computes exactly what the torch layer did. In place;
    returns a new root when ``model`` itself is a recurrent layer.

    Args:
        model: a recurrent layer or a model containing some.
        layer_norm: add layer normalization (default) or not (an exact, torch-equivalent copy).
        eps: the layer norms' eps.
        **options: passed to the new layers (``cell_state``, ``zoneout``, ``zoneout_cell``).

    Raises:
        ValueError: an ``nn.LSTM`` with ``proj_size > 0`` (no layer-normalized equivalent).

    Example::

        >>> lstm = nn.LSTM(8, 16, num_layers=2, batch_first=True)
        >>> ln_lstm = lstm_to_layernorm(lstm)
        >>> torch.equal(ln_lstm.weight_hh_l1, lstm.weight_hh_l1), ln_lstm.ln_cell_weight_l0[:3]
        (True, tensor([1., 1., 1.], grad_fn=<SliceBackward0>))
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    classes = _RNN_CLASSES

    def convert(name: str, m: nn.Module) -> nn.Module | None:
        cls = classes.get(type(m))
        if cls is None:
            return None
        if getattr(m, "proj_size", 0):
            raise ValueError(f"cannot convert {name or '<model>'}: nn.LSTM with proj_size={m.proj_size} "
                             "has no layer-normalized equivalent")
        kwargs = {k: getattr(m, k) for k in _TORCH_ARGS}
        if type(m) is nn.RNN:
            kwargs["nonlinearity"] = m.nonlinearity
        ref = m.weight_ih_l0
        new = cls(**kwargs, layer_norm=layer_norm, eps=eps, **options, device=ref.device, dtype=ref.dtype)
        _copy_rnn_weights(new, m)
        new.train(m.training)
        return new

    return _replace(model, convert)


def layernorm_to_lstm(model: nn.Module) -> nn.Module:
    """The reverse of :func:`lstm_to_layernorm`: every ``LayerNormLSTM``/``GRU``/``RNN`` becomes
    the torch layer with the same configuration and the torch-named weights copied.

    The layer-norm parameters (and zoneout, and the ``cell_state`` variant) have no place in a
    torch layer and are dropped: the result computes exactly the original only when it had
    ``layer_norm=False`` and no zoneout. ``layernorm_to_lstm(lstm_to_layernorm(m))`` recovers
    ``m``'s weights exactly. In place; returns a new root when ``model`` itself matches.

    Example::

        >>> lstm = nn.GRU(4, 6)
        >>> back = layernorm_to_lstm(lstm_to_layernorm(lstm))
        >>> type(back).__name__, torch.equal(back.weight_ih_l0, lstm.weight_ih_l0)
        ('GRU', True)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    back = {v: k for k, v in _RNN_CLASSES.items()}

    def convert(name: str, m: nn.Module) -> nn.Module | None:
        cls = back.get(type(m))
        if cls is None:
            return None
        kwargs = {k: getattr(m, k) for k in _TORCH_ARGS}
        if cls is nn.RNN:
            kwargs["nonlinearity"] = m.nonlinearity
        ref = m.weight_ih_l0
        new = cls(**kwargs, device=ref.device, dtype=ref.dtype)
        _copy_rnn_weights(new, m)
        new.train(m.training)
        return new

    return _replace(model, convert)
