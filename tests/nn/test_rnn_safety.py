"""The fused recurrent path under adversarial input: NaN and inf propagate as on the torch path,
and every shape, dtype and device the kernels trust is checked before they run."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import lnorm
from lnorm.nn import LayerNormGRU, LayerNormLSTM
from lnorm.ops.backend import numba_available

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


@pytest.mark.parametrize("case", ["nan", "inf", "nan weight", "huge"])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_adversarial_input_without_gradients_as_with_them(kind, case):
    # Under no_grad the fused LSTM runs its own step kernel (lstm_fwd_infer_step, which saves
    # nothing): the same NaN, inf and overflow handling as the training kernel above, against a
    # float64 run of the torch path. Bidirectional, padded and packed: both directions' step
    # orders, and sequences that end early.
    torch.manual_seed(0)
    m = LAYERS[kind](4, 8, bidirectional=True)
    x = torch.randn(6, 3, 4)
    if case == "nan weight":
        with torch.no_grad():
            m.weight_hh_l0[3, 5] = float("nan")
    elif case == "huge":
        x[1, 1] *= 1e25
    else:
        x[2, 1, 0] = float(case)
    m64 = copy.deepcopy(m).double()
    lengths = torch.tensor([6, 4, 5])

    def outputs(model, inp, backend):
        with torch.no_grad(), lnorm.use_backend(backend):
            packed = model(pack_padded_sequence(inp, lengths, enforce_sorted=False))[0]
            return model(inp)[0], pad_packed_sequence(packed)[0]

    got, ref = outputs(m, x, "numba"), outputs(m64, x.double(), "torch")
    for f, r, what in zip(got, ref, ("padded", "packed"), strict=True):
        _same_nonfinite(f, r, f"{what} output")
        fin = torch.isfinite(r)
        torch.testing.assert_close(f[fin].double(), r[fin], atol=1e-5, rtol=1e-4)
        assert fin.all() if case == "huge" else not fin.all()
        if case in ("nan", "inf"):
            assert torch.isfinite(f[:, 0]).all()  # the rest of the batch is untouched


# ------------------------------------------------------------------------- shapes the kernels trust


def _run_isolated(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter: a crash of the kernels fails the test, not pytest."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=600)


def test_packed_data_with_the_wrong_number_of_rows_is_an_error():
    # 5 or 12 rows for batch_sizes summing to 9 reached the kernels: a segfault, a double free or
    # uninitialized memory in the output
    res = _run_isolated("""
        import torch, lnorm
        from torch.nn.utils.rnn import PackedSequence
        for backend in ("numba", "torch"):
            for cls in (lnorm.LayerNormLSTM, lnorm.LayerNormGRU):
                m = cls(3, 8)
                for rows in (5, 12, 0):
                    with lnorm.use_backend(backend):
                        try:
                            m(PackedSequence(torch.randn(rows, 3), torch.tensor([3, 3, 2, 1])))
                        except ValueError as e:
                            assert "sum(batch_sizes) = 9" in str(e) and f"[{rows}, 3]" in str(e), e
                        else:
                            raise SystemExit(f"no error: {backend} {cls.__name__} {rows} rows")
        print("ok")
    """)
    assert res.returncode == 0 and "ok" in res.stdout, (res.returncode, res.stdout, res.stderr[-2000:])


@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_malformed_packed_sequence_is_an_error(kind, backend):
    m = LAYERS[kind](3, 8)
    bad = {
        "3-D data": PackedSequence(torch.randn(9, 2, 3), torch.tensor([3, 3, 2, 1])),
        "2-D batch_sizes": PackedSequence(torch.randn(9, 3), torch.tensor([[3, 3, 2, 1]])),
        "float batch_sizes": PackedSequence(torch.randn(9, 3), torch.tensor([3.0, 3, 2, 1])),
    }
    with lnorm.use_backend(backend):
        for packed in bad.values():
            with pytest.raises(ValueError, match="PackedSequence"):
                m(packed)


@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_hidden_state_on_another_device_is_an_error(kind, backend):
    # a meta hx gave "can't convert meta device type tensor to numpy"
    m = LAYERS[kind](3, 8)
    h = torch.zeros(1, 2, 8, device="meta")
    hx = (h, torch.zeros(1, 2, 8)) if kind == "lstm" else h
    with lnorm.use_backend(backend), pytest.raises(ValueError, match="not at the same device.*meta"):
        m(torch.randn(4, 2, 3), hx)


@pytest.mark.parametrize(
    ("name", "value", "match"),
    [
        ("weight_hh_l0", lambda G, H: torch.randn(G, H + 1), "weight_hh must have shape"),
        ("ln_hh_weight_l0", lambda G, H: torch.ones(G - 1), "ln_hh_weight must have shape"),
        ("ln_ih_bias_l0", lambda G, H: torch.zeros(G + 5), "ln_ih_bias must have shape"),
        ("bias_hh_l0", lambda G, H: torch.zeros(G, dtype=torch.float64), "bias_hh is a torch.float64"),
    ],
    ids=["weight_hh", "ln_hh_weight", "ln_ih_bias", "bias-dtype"],
)
@pytest.mark.parametrize("kind", list(LAYERS))
def test_parameters_of_the_wrong_shape_are_an_error_before_the_kernels(kind, name, value, match):
    # a parameter replaced by one of another shape was read out of bounds by the kernels
    H = 8
    m = LAYERS[kind](3, H)
    G = (4 if kind == "lstm" else 3) * H
    setattr(m, name, torch.nn.Parameter(value(G, H)))
    with lnorm.use_backend("numba"), pytest.raises(ValueError, match=match):
        m(torch.randn(4, 2, 3))
