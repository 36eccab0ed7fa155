"""Model conversion, in the manner of ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``.

* :func:`convert_norms`: swap one kind of normalization for another (batch norm -> layer, group
  or RMS norm, ...), in whatever layout each layer sees (CNN channels or MLP features).
* :func:`use_lnorm`: swap every ``torch.nn.LayerNorm`` / ``torch.nn.RMSNorm`` (and hand-written
  layer norms that compute the same) for lnorm's (same parameters, same outputs, lnorm's kernels).
* :func:`lstm_to_layernorm` / :func:`layernorm_to_lstm`: ``nn.LSTM``/``nn.GRU``/``nn.RNN`` and
  their cells <-> :class:`lnorm.nn.LayerNormLSTM`/``GRU``/``RNN`` and cells, weights copied.

``use_lnorm`` and ``lstm_to_layernorm`` never skip silently: a module of the kind they convert
that they cannot convert exactly is left as it is and named, with the reason, in a
:class:`ConversionWarning`.

Every converter recurses over ``named_children``, replaces matching submodules in place, copies
weights under ``torch.no_grad()``, keeps ``training``, ``requires_grad``, device and dtype, moves
the replaced module's forward and backward hooks to its replacement (state-dict hooks are not
carried: a ``ConversionWarning`` says so), keeps a module shared by two parents shared, and
returns the root: a new module when the root itself matches, else the same (modified) one.
"""

from __future__ import annotations

import inspect
import re
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin

from lnorm.nn.factory import (
    NORM_KINDS,
    ChannelBatchNorm,
    ChannelRMSNorm,
    MaskedBatchNorm,
    default_groups,
    make_norm,
)
from lnorm.nn.normalization import LayerNorm, RMSNorm
from lnorm.nn.rnn import (
    LayerNormGRU,
    LayerNormGRUCell,
    LayerNormLSTM,
    LayerNormLSTMCell,
    LayerNormRNN,
    LayerNormRNNCell,
)
from lnorm.utils import ModelState, first_tensor
from lnorm.validation import check_bool, check_eps, check_int

__all__ = ["ConversionWarning", "convert_norms", "use_lnorm", "lstm_to_layernorm", "layernorm_to_lstm"]


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
        if new is not None and new is not module:
            _carry_hooks(new, module, name)
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


# The hooks a replacement takes over: its forward and backward see the same inputs and outputs in
# the same places (a norm for a norm, a layer for a layer). The dicts themselves move, so the
# handles a caller holds still remove them.
_CARRIED_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                  "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
                  "_backward_pre_hooks")
# tied to the old module's parameter names and state: not carried, and said so
_STATE_DICT_HOOKS = ("_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                     "_load_state_dict_post_hooks")


def _carry_hooks(new: nn.Module, old: nn.Module, name: str) -> None:
    """Move ``old``'s forward and backward hooks to its replacement ``new`` (a monitoring or
    feature-extraction hook would otherwise stop firing without a word); warn about state-dict
    hooks, which are not carried."""
    for attr in _CARRIED_HOOKS:
        hooks = getattr(old, attr, None)
        if not hooks:
            continue
        mine = getattr(new, attr)
        if mine:  # the replacement registered its own: keep both, its own first
            mine.update(hooks)
        else:
            setattr(new, attr, hooks)
    if getattr(old, "_backward_hooks", None):
        new._is_full_backward_hook = old._is_full_backward_hook
    kinds = [attr.strip("_") for attr in _STATE_DICT_HOOKS if getattr(old, attr, None)]
    if kinds:
        warnings.warn(f"{name or 'the root module'} ({type(old).__name__}) was replaced by "
                      f"{type(new).__name__}, but its {', '.join(kinds)} were not carried over (they "
                      f"refer to the old module's parameters)", ConversionWarning, stacklevel=4)


def _like(new: nn.Module, old: nn.Module) -> nn.Module:
    """Put ``new`` on ``old``'s device and dtype, in its mode, with its ``requires_grad``."""
    ref = next(iter(old.parameters(recurse=False)), None)
    if ref is None:
        ref = next((b for b in old.buffers(recurse=False) if b.is_floating_point()), None)
    if ref is not None:
        new = new.to(device=ref.device, dtype=ref.dtype)
    new.train(old.training)
    # per parameter name (a frozen weight beside a trainable bias stays so); a parameter the old
    # module did not have takes the old module's flag where all of its parameters agree
    old_params = dict(old.named_parameters(recurse=False))
    grads = {p.requires_grad for p in old_params.values()}
    for pname, p in new.named_parameters(recurse=False):
        if pname in old_params:
            p.requires_grad_(old_params[pname].requires_grad)
        elif len(grads) == 1:
            p.requires_grad_(next(iter(grads)))
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
    names = {m: n for n, m in model.named_modules() if _is_source(m, source)}
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


def _check_convert_args(model, source, target, layout, num_groups, eps=None, drop_bias=False) \
        -> tuple[tuple[type, ...], str]:
    """The arguments of :func:`convert_norms`, checked (TypeError for a wrong type, ValueError for a
    wrong value): (source as a tuple, target lower-cased)."""
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
    if num_groups is not None:
        if target != "group":
            raise ValueError(f"num_groups is for target='group', got target={target!r}")
        check_int(num_groups, "num_groups")
    if eps is not None:
        check_eps(eps)
    check_bool(drop_bias, "drop_bias")
    return source, target


def _is_source(module: nn.Module, source: tuple[type, ...]) -> bool:
    """An instance of a source type, or a lazy module that becomes one (``nn.LazyBatchNorm1d``
    turns into a ``BatchNorm1d`` at its first forward)."""
    if isinstance(module, source):
        return True
    becomes = getattr(module, "cls_to_become", None) if isinstance(module, LazyModuleMixin) else None
    return isinstance(becomes, type) and issubclass(becomes, source)


def _refuse_uninitialized(model: nn.Module, source: tuple[type, ...]) -> None:
    """A lazy norm that has not seen an input has no size yet, so nothing can replace it."""
    lazy = [f"{name or '<model>'} ({type(m).__name__})" for name, m in model.named_modules()
            if _is_source(m, source) and isinstance(m, LazyModuleMixin) and m.has_uninitialized_params()]
    if lazy:
        raise ValueError(f"cannot convert {', '.join(lazy)}: a lazy norm learns its number of features "
                         "from its first input; run the model once on an example batch before "
                         "converting (or build the norm with its size)")


def _target_options(module: nn.Module, label: str, C: int, lay: str, target: str, eps, num_groups) -> dict:
    """``make_norm`` keyword arguments for the norm that replaces ``module``."""
    if target == "none":
        return {}
    options: dict = {}
    src_eps = getattr(module, "eps", None)
    if eps is not None or src_eps is not None:
        options["eps"] = eps if eps is not None else src_eps
    affine = getattr(module, "weight", None) is not None
    if target in ("layer", "rms") and lay == "last":
        options["elementwise_affine"] = affine
        if target == "layer":
            # a bias-free nn.LayerNorm stays bias-free; from anything else the bias starts at 0
            options["bias"] = affine and not (isinstance(module, nn.LayerNorm) and module.bias is None)
    else:
        options["affine"] = affine
    if target == "group":
        # a group norm keeps its own groups (as every layer keeps its eps): group to group is the
        # same function; from anything else the default
        own = module.num_groups if isinstance(module, nn.GroupNorm) else None
        groups = num_groups if num_groups is not None else own if own is not None else default_groups(C)
        if C % groups:
            raise ValueError(f"cannot convert {label} to group norm: its {C} channels are not "
                             f"divisible by num_groups={groups}")
        options["num_groups"] = groups
    if target == "batch":
        for key in ("momentum", "track_running_stats"):
            if hasattr(module, key):
                options[key] = getattr(module, key)
    return options


def _copy_norm_state(new: nn.Module, module: nn.Module, label: str, target: str, drop_bias: bool) -> None:
    """The affine parameters (and, batch norm to batch norm, the running statistics)."""
    bias = getattr(module, "bias", None)
    with torch.no_grad():
        _copy(getattr(new, "weight", None), getattr(module, "weight", None))
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
        num_groups: for ``target="group"``; default: a replaced ``nn.GroupNorm``'s own
            ``num_groups``, else :func:`lnorm.nn.factory.default_groups` of the channels (groups
            of at least 2 channels).
        eps: the new layers' eps; default each replaced layer's own.
        drop_bias: allow ``target="rms"`` (which has no bias) to replace a layer whose bias is
            not zero, dropping the bias. Default False: that raises.

    Raises:
        TypeError: an argument of the wrong type (``num_groups`` not an int, ``eps`` not a
            number, ``drop_bias`` not a bool, ``source`` not module types), naming it.
        ValueError: a wrong value (``num_groups`` < 1, ``eps`` <= 0, an unknown ``target``) or
            a conversion that cannot be done (unknown layout, multi-dim
            ``normalized_shape``, channels not divisible by ``num_groups``, a nonzero bias with
            no place to go, a lazy norm such as ``nn.LazyBatchNorm1d`` that has not yet seen an
            input and so has no size), naming the layer.

    Example::

        >>> cnn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        >>> cnn = convert_norms(cnn, target="group", num_groups=4)
        >>> cnn[1]
        GroupNorm(4, 8, eps=1e-05, affine=True, bias=True)
        >>> mlp = convert_norms(nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8)), layout="last")
        >>> type(mlp[1]).__name__
        'LayerNorm'
    """
    source, target = _check_convert_args(model, source, target, layout, num_groups, eps, drop_bias)
    if isinstance(layout, dict):  # a misspelt name would leave its layer to the guess it was meant to settle
        names = [n for n, m in model.named_modules() if _is_source(m, source)]
        unknown = sorted(set(layout) - set(names))
        if unknown:
            raise ValueError(f"layout names {unknown}, which are not {target!r}-convertible norms of the model; "
                             f"its source norms: {names}")
    _refuse_uninitialized(model, source)
    seen = _watch_input_dims(model, example_input, source) if example_input is not None else {}

    def convert(name: str, module: nn.Module) -> nn.Module | None:
        if not _is_source(module, source):
            return None
        label = name or "<model>"
        C, lay = _source_layout(module, name, layout, seen)
        options = _target_options(module, label, C, lay, target, eps, num_groups)
        try:
            new = make_norm(target, C, layout=lay, **options)
        except (TypeError, ValueError) as exc:  # the same kind of error, naming the layer
            raise type(exc)(f"cannot convert {label} ({type(module).__name__}) to {target!r}: {exc}") from None
        new = _like(new, module)
        _copy_norm_state(new, module, label, target, drop_bias)
        return new

    return _replace(model, convert)


# --------------------------------------------------------------------------------------------
# what a converter leaves: reported, never skipped silently
# --------------------------------------------------------------------------------------------


class ConversionWarning(UserWarning):
    """A converter left a module it could not convert exactly; the message names it and says why.
    ``warnings.simplefilter("error", ConversionWarning)`` turns a partial conversion into an error."""


class _Left(Exception):
    """Why a converter leaves a module as it is."""


def _warn_left(func: str, left: list[tuple[str, str]]) -> None:
    for name, why in left:
        warnings.warn(f"{func} left {name} unconverted: {why}", ConversionWarning, stacklevel=3)


# what every class has, and what does not change what a module computes
_INERT = frozenset({"__module__", "__qualname__", "__doc__", "__dict__", "__weakref__", "__annotations__",
                    "__firstlineno__", "__static_attributes__", "__init__", "extra_repr", "reset_parameters"})


def _check_class_adds_nothing(m: nn.Module, base: type, also_inert: tuple[str, ...] = ()) -> None:
    """Raise _Left when ``type(m)`` defines anything on the way down to ``base`` (forward, other
    methods, class attributes) that a replacement of another class would lose."""
    mro = type(m).__mro__
    added = [f"{cls.__name__}.{k}" for cls in mro[: mro.index(base) if base in mro else -1]
             for k in vars(cls) if k not in _INERT and k not in also_inert]
    if added:
        raise _Left(f"its class {type(m).__name__} defines {', '.join(added)}, which a replacement would lose")


def _check_own_tensors(m: nn.Module, params: set[str]) -> None:
    """Raise _Left when ``m`` holds parameters other than ``params``, buffers or submodules."""
    extra = [n for n, _ in m.named_parameters(recurse=False) if n not in params]
    extra += [n for n, _ in m.named_buffers(recurse=False)] + [n for n, _ in m.named_children()]
    if extra:
        raise _Left(f"it holds {', '.join(extra)}, which a replacement would lose")


def _label(name: str, m: nn.Module) -> str:
    return f"{name or '<model>'} ({type(m).__name__})"


# --------------------------------------------------------------------------------------------
# use_lnorm
# --------------------------------------------------------------------------------------------

# class names of hand-written layer / RMS norms (nanoGPT's LayerNorm, LlamaRMSNorm, T5LayerNorm)
_NORM_NAME = re.compile(r"(layer|rms)_?norm", re.IGNORECASE)
_EPS_ATTRS = ("eps", "epsilon", "variance_epsilon", "norm_eps")
_PROBE_TOL = {torch.float64: 1e-9, torch.float32: 1e-4}


def _lnorm_twin(m: nn.Module, kind: str, weight, bias, eps) -> nn.Module:
    """lnorm's module over the last ``weight.shape`` dims, sharing ``m``'s very Parameters (so
    optimizers and tied weights keep pointing at them) and keeping its mode."""
    shape = tuple(weight.shape) if weight is not None else tuple(m.normalized_shape)
    try:
        if kind == "layer":
            new = LayerNorm(shape, eps=eps, elementwise_affine=weight is not None, bias=bias is not None,
                            device="meta")
            new.bias = bias
        else:
            new = RMSNorm(shape, eps=eps, elementwise_affine=weight is not None, device="meta")
    except (TypeError, ValueError) as exc:
        raise _Left(f"lnorm's {kind} norm refuses its options: {exc}") from None
    new.weight = weight
    new.train(m.training)
    return new


def _probe_input(C: int, eps: float, like: Tensor) -> Tensor:
    """(2, 6, C): rows of variance 1 (two far from zero mean, which tells layer from RMS norm)
    and rows of variance 9 eps, eps and eps / 9, where the value of eps decides the output."""
    z = torch.randn(2, 6, C, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    scale = torch.tensor([1.0, 1.0, 1.0, 3 * eps**0.5, eps**0.5, eps**0.5 / 3], dtype=torch.float64)
    shift = torch.tensor([0.0, 2.0, -3.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    return (z * scale[:, None] + shift[:, None]).to(like)


def _probed_twin(m: nn.Module) -> nn.Module:
    """lnorm's module for a hand-written norm whose parameters are a layer norm's (``weight`` (C,),
    optional ``bias`` (C,)) and whose forward, run on a probe input with random parameters, gives
    ``F.layer_norm`` or ``F.rms_norm`` over the last dim; else raise _Left saying why not."""
    _check_own_tensors(m, {"weight", "bias"})
    _check_class_adds_nothing(m, nn.Module, also_inert=("forward",))
    w, b = getattr(m, "weight", None), getattr(m, "bias", None)
    if not isinstance(w, nn.Parameter) or w.dim() != 1 or (b is not None and b.shape != w.shape):
        raise _Left("its parameters are not a layer norm's (weight of shape (C,), optional bias (C,))")
    if w.is_meta or not w.is_floating_point():
        raise _Left(f"its weight ({w.dtype} on {w.device}) cannot be probed")
    eps_attr = next((getattr(m, a) for a in _EPS_ATTRS if isinstance(getattr(m, a, None), float)), None)
    epss = [eps_attr] if eps_attr is not None else [1e-5, 1e-6]  # F.layer_norm's default, RMSNorm's usual
    g = torch.Generator().manual_seed(1)
    params = {k: torch.randn(w.shape, generator=g, dtype=torch.float64).to(w)
              for k in ("weight", "bias") if getattr(m, k, None) is not None}
    p64 = {k: v.double() for k, v in params.items()}
    tol = _PROBE_TOL.get(w.dtype, 3e-2)
    for eps in epss:
        x = _probe_input(w.shape[0], eps, w)
        try:
            with torch.no_grad():
                y = torch.func.functional_call(m, params, (x,))
        except Exception as exc:  # noqa: BLE001 (user code: any failure means "not a norm we know")
            raise _Left(f"its forward raised {type(exc).__name__} on a probe input: {exc}") from None
        refs = {"layer": F.layer_norm(x.double(), w.shape, p64["weight"], p64.get("bias"), eps)}
        if b is None:
            refs["rms"] = F.rms_norm(x.double(), w.shape, p64["weight"], eps)
        for kind, ref in refs.items():
            if isinstance(y, Tensor) and y.shape == ref.shape and torch.allclose(y.double(), ref, rtol=tol, atol=tol):
                return _lnorm_twin(m, kind, w, b, eps)
    raise _Left(f"on a probe input its forward is neither F.layer_norm nor F.rms_norm over the last dim "
                f"with eps in {epss}")


def _use_lnorm_one(m: nn.Module) -> nn.Module | None:
    """lnorm's module for ``m``; None for a module that is not a layer or RMS norm (recurse into
    it); _Left for one that is but cannot be replaced exactly."""
    if type(m).__module__.split(".")[0] == "lnorm":
        return None  # lnorm's own
    if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
        base = nn.LayerNorm if isinstance(m, nn.LayerNorm) else nn.RMSNorm
        _check_class_adds_nothing(m, base)
        _check_own_tensors(m, {"weight", "bias"})
        kind = "layer" if base is nn.LayerNorm else "rms"
        return _lnorm_twin(m, kind, m.weight, getattr(m, "bias", None), m.eps)
    if _NORM_NAME.search(type(m).__name__) and next(m.children(), None) is None:
        return _probed_twin(m)  # (a block with submodules, "PreLayerNormBlock", is not a norm)
    return None


def use_lnorm(model: nn.Module) -> nn.Module:
    """Swap every ``torch.nn.LayerNorm`` / ``torch.nn.RMSNorm`` for :class:`lnorm.LayerNorm` /
    :class:`lnorm.RMSNorm`, keeping parameters, eps, mode, ``requires_grad``, device and dtype.

    Exact: lnorm's modules compute the same function with the same parameter names (they
    subclass torch's), so outputs match up to float round-off and ``state_dict`` keys do not
    change. Also converted, where that is exact:

    * subclasses of torch's norms that add nothing but ``__init__`` (no ``forward``, no other
      methods, parameters or submodules);
    * hand-written norms whose class name says layer or RMS norm (nanoGPT's ``LayerNorm(ndim,
      bias)``, ``LlamaRMSNorm``, ``T5LayerNorm``) with a layer norm's parameters (``weight``
      (C,), optional ``bias`` (C,)) and a forward that, run once on a small probe input with
      random parameters, computes ``F.layer_norm`` (or ``F.rms_norm``) over the last dim with
      their ``eps`` attribute (or 1e-5, 1e-6).

    Every norm left as it is (a subclass with its own ``forward``, a hand-written norm that
    computes something else, options lnorm refuses) is reported in a :class:`ConversionWarning`
    that names it and says why. lnorm's own modules are left alone. In place; returns a new root
    when ``model`` itself is converted.

    Example::

        >>> block = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)
        >>> block = use_lnorm(block)
        >>> type(block.norm1).__module__
        'lnorm.nn.normalization'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    left: list[tuple[str, str]] = []

    def convert(name: str, m: nn.Module) -> nn.Module | None:
        try:
            return _use_lnorm_one(m)
        except _Left as why:
            left.append((_label(name, m), str(why)))
            return None

    model = _replace(model, convert)
    _warn_left("use_lnorm", left)
    return model


# --------------------------------------------------------------------------------------------
# recurrent layers: nn.LSTM / GRU / RNN (and cells) <-> LayerNormLSTM / GRU / RNN (and cells)
# --------------------------------------------------------------------------------------------

_TORCH_ARGS = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional")
_CELL_ARGS = ("input_size", "hidden_size", "bias")
_CELL_WEIGHTS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


_RNN_CLASSES = {nn.LSTM: LayerNormLSTM, nn.GRU: LayerNormGRU, nn.RNN: LayerNormRNN,
                nn.LSTMCell: LayerNormLSTMCell, nn.GRUCell: LayerNormGRUCell, nn.RNNCell: LayerNormRNNCell}


def _rnn_config(m: nn.Module, torch_cls: type) -> dict:
    """The constructor arguments shared by a torch recurrent module and lnorm's."""
    is_cell = issubclass(torch_cls, nn.RNNCellBase)
    kwargs = {k: getattr(m, k) for k in (_CELL_ARGS if is_cell else _TORCH_ARGS)}
    if torch_cls in (nn.RNN, nn.RNNCell):
        kwargs["nonlinearity"] = m.nonlinearity
    if torch_cls is nn.LSTM and m.proj_size:
        kwargs["proj_size"] = m.proj_size
    return kwargs


def _copy_rnn_weights(dst: nn.Module, src: nn.Module) -> None:
    """Copy every torch-named parameter (``weight_ih_l0``...), with its ``requires_grad``."""
    src_params = dict(src.named_parameters(recurse=False))
    with torch.no_grad():
        for name, p in dst.named_parameters(recurse=False):
            if name in src_params:
                p.copy_(src_params[name])
                p.requires_grad_(src_params[name].requires_grad)
            else:  # an LN parameter: trainable when the torch weights are
                p.requires_grad_(next(iter(src_params.values())).requires_grad)


def _torch_rnn_class(m: nn.Module, classes: dict[type, type]) -> type | None:
    """The torch class ``m`` is, or is a plain subclass of (one that adds only ``__init__``);
    None for a module that is not a torch recurrent layer or cell; _Left for one that cannot be
    converted exactly."""
    if type(m) in classes:
        return type(m)
    if not isinstance(m, (nn.RNNBase, nn.RNNCellBase)):
        return None
    base = next((cls for cls in type(m).__mro__ if cls in classes), None)
    if base is None:
        raise _Left(f"lnorm has no layer-normalized {type(m).__name__} (mode {getattr(m, 'mode', '?')!r})")
    _check_class_adds_nothing(m, base)
    _check_own_tensors(m, set(m._flat_weights_names) if isinstance(m, nn.RNNBase) else set(_CELL_WEIGHTS))
    return base


# what every converted module takes from the layer it replaces, never from the caller
_FROM_SOURCE = (*_TORCH_ARGS, "proj_size", "nonlinearity", "device", "dtype")


def _rnn_options() -> tuple[str, ...]:
    """The options of lnorm's recurrent modules that :func:`lstm_to_layernorm` passes on."""
    names: list[str] = []
    for cls in _RNN_CLASSES.values():
        for p in inspect.signature(cls.__init__).parameters.values():
            if p.kind is p.KEYWORD_ONLY and not p.name.startswith("_") and p.name not in names \
                    and p.name not in ("layer_norm", "eps", *_FROM_SOURCE):
                names.append(p.name)
    return tuple(names)


def _check_rnn_options(layer_norm, eps, options: dict) -> None:
    """:func:`lstm_to_layernorm`'s options, checked whether or not the model has anything to
    convert: TypeError for a structural or unknown option or a wrong type, ValueError for a wrong value."""
    check_bool(layer_norm, "layer_norm")
    check_eps(eps)
    fixed = [k for k in options if k in _FROM_SOURCE]
    if fixed:
        raise TypeError(f"lstm_to_layernorm: {', '.join(fixed)} cannot be passed (got "
                        f"{', '.join(f'{k}={options[k]!r}' for k in fixed)}): each converted layer takes "
                        f"{', '.join(_FROM_SOURCE)} from the layer it replaces")
    valid = _rnn_options()
    unknown = [k for k in options if k not in valid]
    if unknown:
        raise TypeError(f"lstm_to_layernorm got unknown option{'s' * (len(unknown) > 1)} "
                        f"{', '.join(map(repr, unknown))}; valid: {', '.join(valid)}")
    # the values: a module that takes every one of them checks them (on the meta device: no memory)
    for cls in _RNN_CLASSES.values():
        if set(options) <= set(inspect.signature(cls.__init__).parameters):
            cls(1, 1, layer_norm=layer_norm, eps=eps, **options, device="meta")
            return


def lstm_to_layernorm(model: nn.Module, *, layer_norm: bool = True, eps: float = 1e-5,
                      **options) -> nn.Module:
    """Replace every ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` by :class:`lnorm.nn.LayerNormLSTM` /
    ``LayerNormGRU`` / ``LayerNormRNN``, and every ``nn.LSTMCell`` / ``GRUCell`` / ``RNNCell`` by
    ``LayerNormLSTMCell`` / ``GRUCell`` / ``RNNCell``, with the same configuration (``proj_size``
    included) and the weights copied.

    The torch parameters (``weight_ih_l0``, ``weight_hh_l0``, ``bias_ih_l0``, ``bias_hh_l0``,
    ``weight_hr_l0``, ``..._reverse``) keep their names and values; the layer-norm parameters are
    added with gain 1 and bias 0, as close to the identity as the equations allow. Layer norm still
    changes the function (it rescales each pre-activation vector to zero mean and unit variance),
    so the outputs differ from the original layer's and the model needs training or fine-tuning.
    With ``layer_norm=False`` the new layer computes exactly what the torch layer did. Subclasses
    that add only ``__init__`` convert too; any other recurrent module is left as it is and
    reported in a :class:`ConversionWarning` that names it and says why. In place; returns a new
    root when ``model`` itself is converted.

    Args:
        model: a recurrent layer or cell, or a model containing some.
        layer_norm: add layer normalization (default) or not (an exact, torch-equivalent copy).
        eps: the layer norms' eps.
        **options: passed to the new modules (``cell_state``, ``zoneout``, ``zoneout_cell``).
            The structure (``input_size``, ``hidden_size``, ``num_layers``, ``bias``,
            ``batch_first``, ``dropout``, ``bidirectional``, ``proj_size``, ``nonlinearity``)
            comes from each replaced layer and cannot be passed.

    Raises:
        TypeError: a structural, unknown or wrongly typed option.
        ValueError: an option's value out of range (``eps`` <= 0, ``zoneout`` outside [0, 1)).
        Both are raised whether or not ``model`` holds anything to convert.

    Example::

        >>> lstm = nn.LSTM(8, 16, num_layers=2, batch_first=True)
        >>> ln_lstm = lstm_to_layernorm(lstm)
        >>> torch.equal(ln_lstm.weight_hh_l1, lstm.weight_hh_l1), ln_lstm.ln_cell_weight_l0[:3]
        (True, tensor([1., 1., 1.], grad_fn=<SliceBackward0>))
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_rnn_options(layer_norm, eps, options)
    classes = _RNN_CLASSES
    left: list[tuple[str, str]] = []

    def convert(name: str, m: nn.Module) -> nn.Module | None:
        try:
            torch_cls = _torch_rnn_class(m, classes)
        except _Left as why:
            left.append((_label(name, m), str(why)))
            return None
        if torch_cls is None:
            return None
        ref = m.weight_ih_l0 if isinstance(m, nn.RNNBase) else m.weight_ih
        new = classes[torch_cls](**_rnn_config(m, torch_cls), layer_norm=layer_norm, eps=eps, **options,
                                 device=ref.device, dtype=ref.dtype)
        _copy_rnn_weights(new, m)
        new.train(m.training)
        return new

    model = _replace(model, convert)
    _warn_left("lstm_to_layernorm", left)
    return model


def layernorm_to_lstm(model: nn.Module) -> nn.Module:
    """The reverse of :func:`lstm_to_layernorm`: every ``LayerNormLSTM``/``GRU``/``RNN`` (and
    cell) becomes the torch module with the same configuration and the torch-named weights copied.

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
        ref = m.weight_ih_l0 if hasattr(m, "num_layers") else m.weight_ih
        new = cls(**_rnn_config(m, cls), device=ref.device, dtype=ref.dtype)
        _copy_rnn_weights(new, m)
        new.train(m.training)
        return new

    return _replace(model, convert)
