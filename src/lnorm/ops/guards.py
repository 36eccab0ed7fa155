"""When lnorm's fast paths may run, and what they do when a second derivative is asked of them.

A fast path (the Numba kernels behind a Python ``autograd.Function``: the norm ops, the fused
LSTM/GRU recurrence) is an opaque box to anything that records or transforms the computation:

* ``torch.jit.trace`` (and the legacy ONNX exporter, which traces) records a kernel call on numpy
  views as a constant, so the trace would ignore its input;
* ``torch.func`` transforms (``grad``, ``vmap``, ``jacrev``, ``jvp``, ``hessian``) and forward-mode
  AD need rules the Functions do not have (a batching rule, a jvp);
* a Python dispatch mode (``make_fx``, ``FlopCounterMode``, fake tensors) sees only torch ops,
  not a kernel on numpy views;
* CPU autocast asks for lower-precision matmuls that the fused recurrence, which runs its own
  float32/float64 loop, would not do.

:func:`use_torch_path` is the one place that decides: while it is True, the callers
(:func:`lnorm.ops.norm.fused_norm`, the recurrent layers' dispatch in :mod:`lnorm.nn.rnn`) run
their pure-torch path, differentiable composites of torch ops that every transform understands.
``torch.compile`` is not listed: it has its own route, the ``torch.library`` custom ops.

Second derivatives: the norm ops compute them (their backward is differentiable when
``create_graph=True``); the fused recurrences do not, and :func:`first_order_only` makes any
second derivative through them raise :data:`SECOND_ORDER_MESSAGE` instead of returning a silently
incomplete gradient.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch.autograd import forward_ad

__all__ = ["SECOND_ORDER_MESSAGE", "first_order_only", "is_tracing", "static_size", "use_torch_path"]


def is_tracing() -> bool:
    """True under ``torch.jit.trace`` and the legacy (TorchScript-based) ONNX exporter."""
    return torch.jit.is_tracing()


def static_size(n) -> int:
    """A size that is a constant of the model (a normalized size), as a Python int.

    ``torch.jit.trace`` records sizes as tensors; a normalized size passed on as one would be a
    traced value where ops (and ONNX's LayerNormalization) need a constant."""
    if isinstance(n, torch.Tensor):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return int(n)
    return n


def use_torch_path(autocast_sensitive: bool = False) -> bool:
    """Whether a fast path must give way to the pure-torch path now (see the module docstring).

    ``autocast_sensitive``: the caller's fast path would ignore CPU autocast (the fused
    recurrence); the norm kernels honour it already (they keep the input's dtype, as torch's
    norms do under autocast), so they pass False.
    """
    transformed = torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0
    if torch.compiler.is_compiling():
        # the callers' torch.library ops, unless the compiled code runs a torch.func transform
        # (compile(lambda x: jvp(f, ...))): the ops have no forward-AD or batching rule, and a
        # jvp through them gave a zero tangent
        return transformed or (autocast_sensitive and torch.is_autocast_enabled("cpu"))
    return (torch.jit.is_tracing() or transformed or _dispatch_mode_active()
            or (autocast_sensitive and torch.is_autocast_enabled("cpu")))


def _dispatch_mode_active() -> bool:
    """Whether a Python dispatch mode sees every op now (``make_fx``'s proxy tracing, a
    ``FlopCounterMode``, a fake-tensor mode): the kernels work on numpy views it cannot see, so
    ``make_fx`` recorded their output as a constant of the graph, which then ignored its input."""
    return torch._C._len_torch_dispatch_stack() > 0


SECOND_ORDER_MESSAGE = (
    "lnorm: the fused path of LayerNormLSTM/LayerNormGRU (Numba on the CPU, Triton on CUDA) computes "
    "first derivatives only, and "
    "a second derivative (a gradient of a gradient, e.g. a gradient penalty with "
    "create_graph=True) went through it. Run the model under lnorm.use_backend(\"torch\") (or "
    "lnorm.set_backend(\"torch\") / LNORM_BACKEND=torch) for second derivatives."
)


class _SecondDerivativeError(torch.autograd.Function):
    """Identity on the gradients a first-order backward returned (the first ``count`` tensors);
    its own backward raises, so a second derivative that reaches them fails loudly instead of
    treating them as constants. The tensors after them (``links``: what the gradients depend on,
    the forward's saved inputs and the incoming gradients) are inputs of the node but not of the
    identity: they put the node on every path from the gradients back to the model's inputs and
    weights, so ``torch.autograd.grad(penalty, inputs)`` runs it too (with the gradients' inputs
    as fresh leaves alone, it found no path, pruned the node and reported the inputs unused:
    None, or zeros with ``materialize_grads=True``, a silently dropped second derivative)."""

    @staticmethod
    def forward(ctx, message, count, *grads_and_links):
        ctx.message = message
        return tuple(g.view_as(g) if g is not None else None for g in grads_and_links[:count])

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(ctx.message)


def batched(t) -> bool:
    """Whether ``t`` is a gradient batched by vmap inside backward (``torch.autograd.grad(...,
    is_grads_batched=True)``, ``jacobian(..., vectorize=True)``): no functorch transform reads as
    active there, so :func:`use_torch_path` cannot tell, and those still use the legacy vmap,
    whose tensors only the legacy test sees."""
    if not isinstance(t, torch.Tensor):
        return False
    fns = torch._C._functorch
    return bool(fns.is_batchedtensor(t) or (hasattr(fns, "is_legacy_batchedtensor") and fns.is_legacy_batchedtensor(t)))


BATCHED_MESSAGE = (
    "lnorm: the fused path of LayerNormLSTM/LayerNormGRU (Numba on the CPU, Triton on CUDA) cannot run a "
    "batched backward (torch.autograd.grad(..., is_grads_batched=True) or "
    "torch.autograd.functional.jacobian(..., vectorize=True)): its kernels see one gradient at a time. "
    "Run the model under lnorm.use_backend(\"torch\") for batched gradients, or loop over them."
)


def first_order_only(backward):
    """Decorate a custom Function's ``backward`` that is not differentiable (it runs kernels on
    numpy views). With ``create_graph=True`` the gradients it returns carry a node that raises
    :data:`SECOND_ORDER_MESSAGE` when differentiated; plain backward is unaffected.

    Unlike ``torch.autograd.function.once_differentiable``, the gradients are attached to the
    error node even when the incoming gradients do not require grad, so no part of a second
    derivative is silently dropped."""

    @functools.wraps(backward)
    def wrapper(ctx, *grad_outputs):
        if any(batched(g) for g in grad_outputs):
            raise RuntimeError(BATCHED_MESSAGE)
        with torch.no_grad():
            grads = backward(ctx, *grad_outputs)
        if not torch.is_grad_enabled():
            return grads
        attached = [g.detach().requires_grad_() if isinstance(g, torch.Tensor) else None for g in grads]
        try:
            saved = tuple(ctx.saved_tensors)
        except (AttributeError, RuntimeError):
            saved = ()
        links = [t for t in (*saved, *grad_outputs) if isinstance(t, torch.Tensor) and t.requires_grad]
        return _SecondDerivativeError.apply(SECOND_ORDER_MESSAGE, len(attached), *attached, *links)

    return wrapper
