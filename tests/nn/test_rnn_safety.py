"""The fused recurrent path under adversarial input: NaN and inf propagate as on the torch path,
and every shape, dtype and device the kernels trust is checked before they run."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence

import lnorm
from lnorm.ops.backend import numba_available
from lnorm.nn import LayerNormGRU, LayerNormLSTM

pytestmark = pytest.mark.skipif(not numba_available(), reason="the fused path needs numba")

LAYERS = {"lstm": LayerNormLSTM, "gru": LayerNormGRU}


def _run(m, x, backend: str):
    """Output, and the gradients of a loss that reads only batch row 0, on ``backend``."""
    m.zero_grad()
    x = x.detach().clone().requires_grad_()
    with lnorm.use_backend(backend):
        out = m(x)[0]
        out[:, 0].sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    grads["input"] = x.grad.clone()
    return out.detach(), grads


def _same_nonfinite(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    for name, f in (("NaN", torch.isnan), ("inf", torch.isinf)):
        assert torch.equal(f(a), f(b)), f"{what}: {name} at {f(a).nonzero().tolist()[:8]} (fused) vs " \
                                        f"{f(b).nonzero().tolist()[:8]} (torch)"


# --------------------------------------------------------------------------------- NaN and inf


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_nonfinite_input_propagates_as_torch_path(kind, value, dtype):
    # One bad element in batch row 1 at step 2: the fused path must give NaN exactly where the
    # torch path does, in the output and in every gradient (a finite loss over NaN weight
    # gradients would let an optimizer step corrupt all weights unnoticed).
    torch.manual_seed(0)
    m = LAYERS[kind](4, 8, dtype=dtype)
    x = torch.randn(6, 3, 4, dtype=dtype)
    x[2, 1, 0] = value
    out_f, g_f = _run(m, x, "numba")
    out_t, g_t = _run(m, x, "torch")
    _same_nonfinite(out_f, out_t, "output")
    assert torch.isfinite(out_f[:, 0]).all() and not torch.isfinite(out_f[2:, 1]).all()
    fin = torch.isfinite(out_t)
    torch.testing.assert_close(out_f[fin], out_t[fin])
    for name in g_t:
        _same_nonfinite(g_f[name], g_t[name], f"grad of {name}")


def test_nan_loss_is_not_finite_on_the_fused_path():
    # the reproduction: float32 LSTM, one NaN in the input
    torch.manual_seed(0)
    m = LayerNormLSTM(4, 8)
    x = torch.randn(6, 2, 4)
    x[2, 1, 0] = float("nan")
    with lnorm.use_backend("numba"):
        assert torch.isnan(m(x)[0].pow(2).mean())


@pytest.mark.parametrize("kind", list(LAYERS))
def test_nan_in_a_weight_propagates(kind):
    torch.manual_seed(0)
    m = LAYERS[kind](4, 8)
    with torch.no_grad():
        m.weight_hh_l0[3, 5] = float("nan")
    x = torch.randn(5, 2, 4)
    out_f, g_f = _run(m, x, "numba")
    out_t, g_t = _run(m, x, "torch")
    _same_nonfinite(out_f, out_t, "output")
    assert torch.isnan(out_f[1:]).any()
    for name in g_t:
        _same_nonfinite(g_f[name], g_t[name], f"grad of {name}")


@pytest.mark.parametrize("kind", list(LAYERS))
def test_huge_input_gets_the_float64_answer(kind):
    # W_ih x of |x| ~ 1e25 overflows the square sums of the input's layer norm inside the fused
    # LSTM's step kernel (it returned NaN); the layer norm makes the answer scale-free
    torch.manual_seed(0)
    m = LAYERS[kind](4, 8)
    m64 = LAYERS[kind](4, 8, dtype=torch.float64)
    m64.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
    x = torch.randn(3, 2, 4)
    x[1, 1] *= 1e25
    out, _ = _run(m, x, "numba")
    out64, g64 = _run(m64, x.double(), "numba")
    torch.testing.assert_close(out.double(), out64, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(m.weight_hh_l0.grad).all()
