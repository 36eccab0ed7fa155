"""The rest of the ``nn.LSTM`` API on LayerNormLSTM / GRU / RNN: ``flatten_parameters``,
``all_weights`` / ``_flat_weights``, and ``proj_size`` (LSTM with projections): parity with
``nn.LSTM(proj_size=...)`` with layer norm off, a hand-written reference with it on."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import lnorm
from lnorm import numba_available
from lnorm.nn import LayerNormGRU, LayerNormLSTM, LayerNormRNN
from tolerances import assert_close

D64 = torch.float64
BACKENDS = ["numba", "torch"] if numba_available() else ["torch"]
KINDS = {
    "lstm": (LayerNormLSTM, nn.LSTM, {}),
    "lstm_proj": (LayerNormLSTM, nn.LSTM, {"proj_size": 3}),
    "gru": (LayerNormGRU, nn.GRU, {}),
    "rnn_relu": (LayerNormRNN, nn.RNN, {"nonlinearity": "relu"}),
}


@pytest.fixture(params=BACKENDS)
def backend(request):
    with lnorm.use_backend(request.param):
        yield request.param


def _data(out):
    return out.data if isinstance(out, PackedSequence) else out


def _loss(out, h, c):
    # weights so every element of every output matters differently
    total = 0
    for t in (_data(out), h, c):
        total = total + (t * torch.linspace(-1, 1, t.numel(), dtype=t.dtype).reshape(t.shape)).sum()
    return total


# ----------------------------------------------------------------- all_weights and friends


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("layer_norm", [True, False], ids=["ln", "noln"])
def test_weight_lists_as_torch(kind, bias, layer_norm):
    ours_cls, torch_cls, extra = KINDS[kind]
    ours = ours_cls(5, 6, num_layers=2, bias=bias, bidirectional=True, layer_norm=layer_norm, **extra)
    ref = torch_cls(5, 6, num_layers=2, bias=bias, bidirectional=True, **extra)
    assert ours._flat_weights_names == ref._flat_weights_names
    assert ours._all_weights == ref._all_weights
    assert [[tuple(w.shape) for w in ws] for ws in ours.all_weights] == \
        [[tuple(w.shape) for w in ws] for ws in ref.all_weights]
    # the very parameter objects, so code that initialises through them changes the module
    named = dict(ours.named_parameters())
    assert all(w is named[n] for n, w in zip(ours._flat_weights_names, ours._flat_weights, strict=True))
    assert all(w is named[n] for ns, ws in zip(ours._all_weights, ours.all_weights, strict=True)
               for n, w in zip(ns, ws, strict=True))
    assert not any(n.startswith("ln_") for n in ours._flat_weights_names)


def test_flatten_parameters_is_a_noop():
    m = LayerNormLSTM(4, 6, num_layers=2)
    x = torch.randn(5, 2, 4)
    before = m(x)[0]
    state = {k: v.clone() for k, v in m.state_dict().items()}
    assert m.flatten_parameters() is None
    assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())
    assert torch.equal(m(x)[0], before)


def test_all_weights_init_loop_as_for_nn_lstm():
    # the usual nn.LSTM recipe: forget-gate bias 1 through all_weights / _all_weights
    m = LayerNormLSTM(4, 6)
    for names in m._all_weights:
        for name in filter(lambda n: "bias" in n, names):
            getattr(m, name).data[6:12].fill_(1.0)
    assert torch.equal(m.bias_ih_l0[6:12], torch.ones(6))
    assert torch.equal(m.ln_ih_bias_l0, torch.zeros(24))  # LN parameters are not in the lists


# ---------------------------------------------------------------------------- proj_size


@pytest.mark.parametrize("bad, err", [(-1, ValueError), (6, ValueError), (7, ValueError),
                                      (1.5, TypeError), (True, TypeError), ("2", TypeError)],
                         ids=["negative", "equal", "above", "float", "bool", "str"])
def test_proj_size_validation(bad, err):
    with pytest.raises(err, match="proj_size"):
        LayerNormLSTM(4, 6, proj_size=bad)
    if err is ValueError:  # torch refuses the same values
        with pytest.raises(ValueError):
            nn.LSTM(4, 6, proj_size=bad)


def test_proj_size_is_lstm_only():
    with pytest.raises(TypeError):
        LayerNormGRU(4, 6, proj_size=2)
    with pytest.raises(TypeError):
        LayerNormRNN(4, 6, proj_size=2)


def test_proj_size_positional_as_torch():
    m = LayerNormLSTM(4, 6, 1, True, False, 0.0, False, 2)
    assert m.proj_size == 2 and m.weight_hr_l0.shape == (2, 6) and m.weight_hh_l0.shape == (24, 2)
    assert "proj_size=2" in repr(m)
    assert "proj_size" not in repr(LayerNormLSTM(4, 6))


@pytest.mark.parametrize("layers, bidirectional", [(1, False), (2, True), (3, False)],
                         ids=["1uni", "2bi", "3uni"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_proj_parameter_names_and_shapes_match_torch(layers, bidirectional, bias):
    ours = LayerNormLSTM(5, 7, layers, bias, bidirectional=bidirectional, proj_size=3, layer_norm=False)
    ref = nn.LSTM(5, 7, layers, bias, bidirectional=bidirectional, proj_size=3)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    ours.load_state_dict(ref.state_dict())  # strict
    ln = LayerNormLSTM(5, 7, layers, bias, bidirectional=bidirectional, proj_size=3)
    res = ln.load_state_dict(ref.state_dict(), strict=False)
    assert res.unexpected_keys == [] and all(k.startswith("ln_") for k in res.missing_keys)


def _torch_and_ours(layers, bidirectional, batch_first, bias, dtype=D64):
    ref = nn.LSTM(5, 7, layers, bias, batch_first, bidirectional=bidirectional, proj_size=3).to(dtype)
    ours = LayerNormLSTM(5, 7, layers, bias, batch_first, bidirectional=bidirectional, proj_size=3,
                         layer_norm=False, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _run_both(ref, ours, x, hx):
    """Outputs, states and every gradient (parameters, input, h0, c0) of both layers."""
    results = []
    for m in (ref, ours):
        xi = x.detach().clone().requires_grad_()
        hxi = tuple(t.detach().clone().requires_grad_() for t in hx) if hx is not None else None
        out, (h, c) = m(xi, hxi)
        leaves = [xi, *(hxi or ()), *m.parameters()]
        grads = torch.autograd.grad(_loss(out, h, c), leaves)
        results.append([out, h, c, *grads])
    return results


@pytest.mark.parametrize("layers, bidirectional", [(1, False), (2, True)], ids=["1uni", "2bi"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["tb", "bt"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("with_hx", [False, True], ids=["zeros", "hx"])
def test_proj_matches_nn_lstm(backend, layers, bidirectional, batch_first, bias, with_hx):
    ref, ours = _torch_and_ours(layers, bidirectional, batch_first, bias)
    D = 2 if bidirectional else 1
    x = torch.randn(4, 6, 5, dtype=D64)
    hx = (torch.randn(layers * D, 4 if batch_first else 6, 3, dtype=D64),
          torch.randn(layers * D, 4 if batch_first else 6, 7, dtype=D64)) if with_hx else None
    want, got = _run_both(ref, ours, x, hx)
    assert got[0].shape == (4, 6, 3 * D) and got[1].shape == (layers * D, 4 if batch_first else 6, 3)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        if backend == "numba":  # torch's own kernel: bit-identical
            assert torch.equal(a, b), f"item {i}: max diff {(a - b).abs().max()}"
        else:
            assert_close(a, b, name=f"item {i}")


def test_proj_matches_nn_lstm_packed_and_unbatched(backend):
    ref, ours = _torch_and_ours(2, True, True, True)
    x = torch.randn(4, 6, 5, dtype=D64)
    packed = pack_padded_sequence(x, torch.tensor([6, 2, 5, 1]), batch_first=True, enforce_sorted=False)
    for inp in (packed, x[0]):
        (o1, (h1, c1)), (o2, (h2, c2)) = ref(inp), ours(inp)
        if isinstance(inp, PackedSequence):
            assert torch.equal(o2.batch_sizes, o1.batch_sizes)
        for a, b in ((_data(o2), _data(o1)), (h2, h1), (c2, c1)):
            assert_close(a, b)
    assert _data(o2).shape[-1] == 6 and h2.shape == (4, 3) and c2.shape == (4, 7)


def test_proj_state_sizes_checked():
    m = LayerNormLSTM(5, 7, proj_size=3)
    x = torch.randn(4, 2, 5)
    with pytest.raises(ValueError, match="h_0"):
        m(x, (torch.zeros(1, 2, 7), torch.zeros(1, 2, 7)))  # h_0 has proj_size features
    with pytest.raises(ValueError, match="c_0"):
        m(x, (torch.zeros(1, 2, 3), torch.zeros(1, 2, 3)))  # c_0 keeps hidden_size


# ---------------------------------------------------- proj_size with layer norm: the reference


def _reference_lstm_proj(m: LayerNormLSTM, x, h0, c0):
    """The equations written out: (T, B, I) time-major, all layers and directions, torch only."""
    D = 2 if m.bidirectional else 1
    H, P, T = m.hidden_size, m.proj_size, x.shape[0]
    ln = lambda z, w, b: F.layer_norm(z, (z.shape[-1],), w, b, m.eps)  # noqa: E731
    h_n, c_n = [], []
    for layer in range(m.num_layers):
        outs = []
        for d in range(D):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            g = lambda n, sfx=sfx: getattr(m, n + sfx)  # noqa: E731
            h, c = h0[layer * D + d], c0[layer * D + d]
            out = [None] * T
            for t in reversed(range(T)) if d else range(T):
                gates = (ln(h @ g("weight_hh").T, g("ln_hh_weight"), g("ln_hh_bias"))
                         + ln(x[t] @ g("weight_ih").T, g("ln_ih_weight"), g("ln_ih_bias"))
                         + g("bias_ih") + g("bias_hh"))
                i, f, gg, o = gates.split(H, dim=-1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
                h = (torch.sigmoid(o) * torch.tanh(ln(c, g("ln_cell_weight"), g("ln_cell_bias")))) @ g("weight_hr").T
                out[t] = h
            outs.append(torch.stack(out))
            h_n.append(h)
            c_n.append(c)
        x = torch.cat(outs, dim=-1)
    assert x.shape[-1] == D * P
    return x, torch.stack(h_n), torch.stack(c_n)


@pytest.mark.parametrize("layers, bidirectional", [(1, False), (2, True)], ids=["1uni", "2bi"])
def test_proj_with_layer_norm_matches_reference(backend, layers, bidirectional):
    m = LayerNormLSTM(5, 7, layers, bidirectional=bidirectional, proj_size=3, dtype=D64)
    with torch.no_grad():  # non-trivial LN parameters, so a swapped or ignored one shows
        for name, p in m.named_parameters():
            if name.startswith("ln_"):
                p.add_(0.3 * torch.randn_like(p))
    D = 2 if bidirectional else 1
    x = torch.randn(6, 4, 5, dtype=D64, requires_grad=True)
    h0 = torch.randn(layers * D, 4, 3, dtype=D64, requires_grad=True)
    c0 = torch.randn(layers * D, 4, 7, dtype=D64, requires_grad=True)
    got = m(x, (h0, c0))
    want = _reference_lstm_proj(m, x, h0, c0)
    got = [got[0], *got[1]]
    leaves = [x, h0, c0, *m.parameters()]
    g_got = torch.autograd.grad(_loss(*got), leaves)
    g_want = torch.autograd.grad(_loss(*want), leaves)
    names = ["output", "h_n", "c_n", "grad x", "grad h0", "grad c0"] + [f"grad {n}" for n, _ in m.named_parameters()]
    for name, a, b in zip(names, [*got, *g_got], [*want, *g_want], strict=True):
        assert_close(a, b, name=name)


def test_proj_with_layer_norm_skips_the_fused_kernels(monkeypatch):
    if not numba_available():
        pytest.skip("the fused path needs Numba")
    from lnorm.ops import rnn_fused

    def boom(*args, **kwargs):
        raise AssertionError("the fused recurrence ran an LSTM with projections")

    monkeypatch.setattr(rnn_fused, "recurrence", boom)
    m = LayerNormLSTM(5, 7, proj_size=3)
    x = torch.randn(6, 4, 5)
    with lnorm.use_backend("numba"):
        out, (h, c) = m(x)
    with lnorm.use_backend("torch"):
        want, (hw, cw) = m(x)
    assert out.shape == (6, 4, 3) and h.shape == (1, 4, 3) and c.shape == (1, 4, 7)
    for a, b in ((out, want), (h, hw), (c, cw)):
        assert_close(a, b)
    # and without the projection the same layer does take the fused path (the patch is live)
    with lnorm.use_backend("numba"), pytest.raises(AssertionError, match="fused recurrence"):
        LayerNormLSTM(5, 7)(x)


def test_proj_zoneout_and_normalized_cell_run(backend):
    m = LayerNormLSTM(5, 7, proj_size=3, cell_state="normalized", zoneout=0.2, zoneout_cell=0.1).eval()
    out, (h, c) = m(torch.randn(6, 4, 5))
    assert out.shape == (6, 4, 3) and h.shape == (1, 4, 3) and c.shape == (1, 4, 7)
    assert torch.isfinite(out).all()


def test_proj_deepcopy_and_state_dict_round_trip():
    m = LayerNormLSTM(5, 7, 2, bidirectional=True, proj_size=3)
    twin = copy.deepcopy(m)
    x = torch.randn(6, 4, 5)
    assert torch.equal(twin(x)[0], m(x)[0])
    other = LayerNormLSTM(5, 7, 2, bidirectional=True, proj_size=3)
    other.load_state_dict(m.state_dict())
    assert torch.equal(other(x)[0], m(x)[0])


@pytest.mark.parametrize("kind", list(KINDS))
def test_layer_norm_off_batch_first_is_nn_lstm_to_the_bit(kind):
    if not numba_available():
        pytest.skip("the fast backend runs torch's own kernel; the torch backend is checked to tolerance")
    ours_cls, torch_cls, extra = KINDS[kind]
    ref = torch_cls(5, 7, 2, batch_first=True, bidirectional=True, **extra).double()
    ours = ours_cls(5, 7, 2, batch_first=True, bidirectional=True, layer_norm=False, dtype=D64, **extra)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 6, 5, dtype=D64)
    with lnorm.use_backend("numba"):
        results = []
        for m in (ref, ours):
            xi = x.clone().requires_grad_()
            out, state = m(xi)
            states = state if isinstance(state, tuple) else (state, state)
            grads = torch.autograd.grad(_loss(out, *states), [xi, *m.parameters()])
            results.append([out, *states, *grads])
    for i, (a, b) in enumerate(zip(*results, strict=True)):
        assert torch.equal(a, b), f"item {i}: max diff {(a - b).abs().max()}"


# Regressions from a review: an empty batch with layer norm off on the fast backend (torch's own
# kernel behind it) raised from reshape(T, 0, -1); a 0-d input raised IndexError; a cell's state of
# another dtype failed deep inside with a message about "weight" and "input".


@pytest.mark.parametrize("kind", ["lstm", "lstm_proj", "gru", "rnn_relu"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_layer_norm_off_empty_batch_as_torch(backend, kind, batch_first):
    cls, ref_cls, kw = KINDS[kind]
    torch.manual_seed(0)
    ref = ref_cls(4, 6, batch_first=batch_first, **kw)
    mod = cls(4, 6, layer_norm=False, batch_first=batch_first, **kw)
    x = torch.randn(0, 5, 4) if batch_first else torch.randn(5, 0, 4)
    out, state = mod(x)
    ref_out, ref_state = ref(x)
    assert out.shape == ref_out.shape
    for a, b in zip(state if isinstance(state, tuple) else (state,),
                    ref_state if isinstance(ref_state, tuple) else (ref_state,), strict=True):
        assert a.shape == b.shape


@pytest.mark.parametrize("mod", [LayerNormLSTM(4, 6), LayerNormGRU(4, 6), lnorm.nn.LayerNormLSTMCell(4, 6),
                                 lnorm.nn.LayerNormGRUCell(4, 6)], ids=lambda m: type(m).__name__)
def test_zero_dim_input_is_a_value_error(mod):
    with pytest.raises(ValueError, match=f"{type(mod).__name__}: input .*0-d tensor"):
        mod(torch.tensor(1.0))


@pytest.mark.parametrize("layer_norm", [True, False])
@pytest.mark.parametrize("which", [0, 1])
def test_cell_state_dtype_is_named(layer_norm, which):
    cell = lnorm.nn.LayerNormLSTMCell(4, 6, layer_norm=layer_norm)
    state = [torch.randn(3, 6), torch.randn(3, 6)]
    state[which] = state[which].double()
    name = ("h_0", "c_0")[which]
    with pytest.raises(TypeError, match=f"LayerNormLSTMCell: {name} dtype torch.float64"):
        cell(torch.randn(3, 4), tuple(state))
    gru = lnorm.nn.LayerNormGRUCell(4, 6, layer_norm=layer_norm)
    with pytest.raises(TypeError, match="LayerNormGRUCell: hx dtype torch.float64"):
        gru(torch.randn(3, 4), torch.randn(3, 6, dtype=torch.float64))


def test_cell_state_device_is_named():
    cell = lnorm.nn.LayerNormGRUCell(4, 6)
    with pytest.raises(ValueError, match="LayerNormGRUCell: input and hx must be on the same device"):
        cell(torch.randn(3, 4), torch.empty(3, 6, device="meta"))


# From an interop review: a zero-length sequence returned an output with no graph (backward then
# failed far away); torch.jit.script failed with compiler errors naming generators or types;
# under autocast a Linear's bfloat16 output was refused where nn.LSTM takes it.

@pytest.mark.parametrize("cls", [LayerNormLSTM, LayerNormGRU, lnorm.nn.LayerNormRNN])
@pytest.mark.parametrize("shape", [(0, 2, 3), (0, 3)], ids=["batched", "unbatched"])
def test_zero_length_sequence_is_a_value_error_as_in_torch(cls, shape):
    with pytest.raises(ValueError, match=f"{cls.__name__}: Expected sequence length to be larger than 0"):
        cls(3, 4)(torch.randn(*shape, requires_grad=True))
    with pytest.raises(ValueError, match=f"{cls.__name__}: Expected sequence length to be larger than 0"):
        cls(3, 4, batch_first=True)(torch.randn(2, 0, 3))


@pytest.mark.parametrize("mod", [LayerNormLSTM(3, 4), LayerNormGRU(3, 4), lnorm.nn.LayerNormLSTMCell(3, 4),
                                 lnorm.nn.LayerNormGRUCell(3, 4)], ids=lambda m: type(m).__name__)
def test_script_is_one_clear_error(mod):
    name = type(mod).__name__
    with pytest.raises(RuntimeError, match=f"{name} cannot be compiled by torch.jit.script"):
        torch.jit.script(mod)
    with pytest.raises(RuntimeError, match=f"{name} cannot be compiled by torch.jit.script"):
        torch.jit.script(nn.Sequential(nn.Identity(), mod))  # inside a model too


@pytest.mark.parametrize("kind", ["lstm", "gru", "lstm_cell", "gru_cell"])
def test_autocast_takes_a_lower_precision_input_and_state(kind):
    torch.manual_seed(0)
    cell = kind.endswith("cell")
    mod = {"lstm": LayerNormLSTM, "gru": LayerNormGRU, "lstm_cell": lnorm.nn.LayerNormLSTMCell,
           "gru_cell": lnorm.nn.LayerNormGRUCell}[kind](5, 6)
    lin = nn.Linear(4, 5)
    x = torch.randn(2, 4) if cell else torch.randn(3, 2, 4)
    h = torch.randn(2, 6) if cell else torch.randn(1, 2, 6)
    hx = (h, torch.randn_like(h)) if "lstm" in kind else h
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
        assert y.dtype == torch.bfloat16
        low = tuple(t.bfloat16() for t in hx) if isinstance(hx, tuple) else hx.bfloat16()
        got = mod(y, low)
        ref = mod(y.float(), hx)  # the float32 input under autocast: what the bfloat16 one must equal
    out, ref_out = (got, ref) if cell and kind == "gru_cell" else (got[0], ref[0])
    assert out.dtype == ref_out.dtype
    assert torch.allclose(out, ref_out, atol=1e-2, rtol=1e-2)  # the same up to the state's bf16 rounding
    out.float().sum().backward()
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()
    with pytest.raises(TypeError, match="does not match the parameters' dtype|does not match the input's dtype"):
        mod(torch.randn(2, 5, dtype=torch.float64) if cell else torch.randn(3, 2, 5, dtype=torch.float64))  # no autocast: refused
