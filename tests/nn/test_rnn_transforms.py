"""The recurrent layers under autograd's and torch.func's transforms, tracing and autocast.

* Second derivatives: the fused CPU path computes first derivatives only and says so when a
  second one goes through it (naming ``lnorm.use_backend("torch")``); the torch path computes them.
* ``torch.func`` and forward-mode AD take the pure-torch path on both backends.
* ``torch.jit.trace`` (and the legacy ONNX exporter): the layers' Python time loop cannot be traced
  for other lengths, so they refuse with one error; the cells trace correctly.
* CPU autocast works on both backends with float32 state, and leaves nothing behind.
"""

from __future__ import annotations

import io
import subprocess
import sys
import warnings

import pytest
import torch
from torch.func import functional_call, jvp

import lnorm
from func_checks import assert_per_sample_grads_match_loop
from lnorm import numba_available
from lnorm.nn import (
    LayerNormGRU,
    LayerNormGRUCell,
    LayerNormLSTM,
    LayerNormLSTMCell,
    LayerNormRNN,
    LayerNormRNNCell,
)
from tolerances import assert_close

FUSED = {"lstm": LayerNormLSTM, "gru": LayerNormGRU}
LAYERS = {**FUSED, "rnn": LayerNormRNN}
CELLS = {"lstm": LayerNormLSTMCell, "gru": LayerNormGRUCell, "rnn": LayerNormRNNCell}


def _out(result):
    """The output tensor of a layer's or a cell's result."""
    return result[0] if isinstance(result, tuple) else result


def _state(result):
    """The final hidden state (h_n, or h' of a cell)."""
    if isinstance(result, tuple) and isinstance(result[1], tuple):
        return result[1][0]
    return result[1] if isinstance(result, tuple) else result


def _penalty(m, x):
    """|d loss / d (x, params)|^2 and the tensors it is differentiated by: a gradient penalty."""
    leaves = [x, *m.parameters()]
    loss = _out(m(x)).pow(2).mean()
    first = torch.autograd.grad(loss, leaves, create_graph=True)
    return sum(g.square().sum() for g in first), leaves, first


# -------------------------------------------------------------------------------- double backward


@pytest.mark.skipif(not numba_available(), reason="the fused path needs numba")
@pytest.mark.parametrize("kind", FUSED)
def test_fused_second_derivative_raises_naming_the_fix(kind):
    # Regression: the fused GRU returned a second derivative with no gradient for weight_hh, the
    # biases and ln_hh_* and a wrong one for weight_ih (norm 552 against 1414); the fused LSTM
    # raised "mm(): functions with out=... don't support automatic differentiation".
    m = FUSED[kind](4, 32)
    x = torch.randn(5, 2, 4, requires_grad=True)
    with lnorm.use_backend("numba"):
        penalty, leaves, first = _penalty(m, x)
        plain = torch.autograd.grad(_out(m(x)).pow(2).mean(), leaves)
    for a, b in zip(first, plain, strict=True):  # the first derivatives themselves are right
        assert_close(a, b, dtype=torch.float32, name=f"{kind} first derivative under create_graph")
    with pytest.raises(RuntimeError, match=r'lnorm\.use_backend\("torch"\)'):
        penalty.backward()


@pytest.mark.skipif(not numba_available(), reason="the fused path needs numba")
@pytest.mark.parametrize("kind", FUSED)
def test_fused_second_derivative_raises_even_for_constant_incoming_gradients(kind):
    # loss = out.sum(): the incoming gradient is a constant, so torch's once_differentiable would
    # return the weight gradient as a constant and drop its dependence on the weights silently
    m = FUSED[kind](3, 8)
    with lnorm.use_backend("numba"):
        (gw,) = torch.autograd.grad(_out(m(torch.randn(4, 2, 3))).sum(), [m.weight_hh_l0], create_graph=True)
    with pytest.raises(RuntimeError, match=r'lnorm\.use_backend\("torch"\)'):
        gw.square().sum().backward()


@pytest.mark.parametrize("kind", LAYERS)
def test_torch_backend_second_derivative_is_exact(kind):
    # the fix the error names: on the torch backend a gradient penalty is differentiable
    torch.manual_seed(0)
    m = LAYERS[kind](2, 3).double()
    names = [n for n, _ in m.named_parameters()]
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    params = [p.detach().requires_grad_() for p in m.parameters()]

    def fn(x, *ps):
        return _out(functional_call(m, dict(zip(names, ps, strict=True)), (x,)))

    with lnorm.use_backend("torch"):
        assert torch.autograd.gradgradcheck(fn, (x, *params))


# ------------------------------------------------------------------------------------- torch.func


@pytest.mark.parametrize("kind", LAYERS)
def test_per_sample_gradients(backend, kind):
    # Regression: under torch.func the fused Functions (no vmap rule) failed
    m = LAYERS[kind](3, 8).double()
    xs = torch.randn(3, 4, 2, 3, dtype=torch.float64)  # 3 samples of (T=4, B=2, I=3)
    assert_per_sample_grads_match_loop(m, xs, name=f"{kind} ")


@pytest.mark.parametrize("kind", LAYERS)
def test_jvp_matches_finite_differences(backend, kind):
    m = LAYERS[kind](3, 8).double()
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    t = torch.randn_like(x)
    f = lambda v: _out(m(v))  # noqa: E731
    y, tangent = jvp(f, (x,), (t,))
    h = 1e-6
    assert_close(y, f(x).detach(), dtype=torch.float64, name=f"{kind} jvp primal")
    fd = (f(x + h * t) - f(x - h * t)).detach() / (2 * h)
    assert_close(tangent, fd, atol=1e-6, rtol=1e-5, name=f"{kind} jvp tangent")


# ---------------------------------------------------------------------------------------- tracing


@pytest.mark.parametrize("grad_mode", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("kind", LAYERS)
def test_layers_refuse_jit_trace(backend, kind, grad_mode):
    # Regression: traced under no_grad the LSTM's fused kernels were recorded as constants and the
    # trace returned uninitialized memory (3.4e37) for a new input; the GRU failed on a size
    m = LAYERS[kind](4, 8)
    with torch.set_grad_enabled(grad_mode), pytest.raises(RuntimeError, match="cannot be traced.*torch.export"):
        torch.jit.trace(m, torch.randn(5, 2, 4))


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_layers_refuse_legacy_onnx_export(kind):
    pytest.importorskip("onnx")
    m = LAYERS[kind](4, 8)
    with torch.no_grad(), warnings.catch_warnings(), pytest.raises(Exception, match="dynamo=True"):
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (torch.randn(5, 2, 4),), io.BytesIO(), dynamo=False)


@pytest.mark.parametrize("grad_mode", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("kind", CELLS)
def test_cells_trace_correctly(backend, kind, grad_mode):
    m = CELLS[kind](4, 40)  # 4H = 160 features: the LSTM's gate LN takes torch's kernel, the rest ours
    with torch.set_grad_enabled(grad_mode):
        traced = torch.jit.trace(m, torch.randn(3, 4))
    x = torch.randn(6, 4)
    with torch.no_grad():
        assert_close(_state(traced(x)), _state(m(x)), dtype=torch.float32, name=f"traced {kind} cell")


# ---------------------------------------------------------------------------------------- autocast


@pytest.mark.parametrize("kind", FUSED)
def test_autocast_after_an_ordinary_call(backend, kind):
    # Regression: after one ordinary call, the fused path raised "Got unsupported ScalarType
    # BFloat16" under autocast
    m = FUSED[kind](4, 16)
    x = torch.randn(6, 3, 4)
    ref = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = m(x)
    assert _out(got).dtype == torch.float32 and _state(got).dtype == torch.float32
    if kind == "lstm":
        assert got[1][1].dtype == torch.float32  # the cell state stays float32
    assert_close(_out(got), _out(ref), atol=0.05, rtol=0.05, name=f"{kind} under autocast")
    _out(got).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


_FIRST_CALL = """
import torch, lnorm
m = lnorm.LayerNormLSTM(4, 8)
if {autocast}:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m(torch.randn(3, 2, 4))
out = m(torch.randn(3, 2, 4))[0]
seen, todo = set(), [out.grad_fn]
while todo:  # the autograd graph's node names: the fused path's Function is one of them
    node = todo.pop()
    if node is not None and node not in seen:
        seen.add(node)
        todo += [n for n, _ in node.next_functions]
print(any("Recurrence" in type(n).__name__ for n in seen))
"""


@pytest.mark.skipif(not numba_available(), reason="the fused path needs numba")
def test_first_call_under_autocast_leaves_the_fast_path_on():
    # Regression: a process whose first call ran under autocast failed to import the fused path
    # (its MKL self-check compared against a bfloat16 product) and ran without it from then on
    def fused_after_first_call(autocast: bool) -> str:
        code = _FIRST_CALL.format(autocast=autocast)
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr
        return run.stdout.strip()

    assert fused_after_first_call(False) == "True"
    assert fused_after_first_call(True) == "True"


@pytest.mark.skipif(not numba_available(), reason="the fused path needs numba")
@pytest.mark.parametrize("kind", FUSED)
@pytest.mark.parametrize("how", ["allow_unused", "materialize_grads", "plain"])
def test_fused_second_derivative_by_autograd_grad_raises(kind, how):
    # Regression: torch.autograd.grad(penalty, [x, weights]) never reached the error node (its
    # inputs were fresh leaves, off every path to x and the weights), so it returned None for
    # every input with allow_unused=True and zeros with materialize_grads=True: a gradient
    # penalty silently dropped (the torch backend gives norms of 24 and 64 here); without either
    # flag, torch's misleading "appears to not have been used in the graph"
    torch.manual_seed(0)
    m = FUSED[kind](5, 7)
    x = torch.randn(4, 3, 5, requires_grad=True)
    with lnorm.use_backend("numba"):
        (g,) = torch.autograd.grad(_out(m(x)).pow(2).sum(), x, create_graph=True)
    penalty = g.pow(2).sum()
    flags = {"allow_unused": dict(allow_unused=True), "materialize_grads": dict(materialize_grads=True),
             "plain": {}}[how]
    with pytest.raises(RuntimeError, match=r'lnorm\.use_backend\("torch"\)'):
        torch.autograd.grad(penalty, [x, m.weight_hh_l0], **flags)
