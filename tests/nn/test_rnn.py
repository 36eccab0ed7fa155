"""LayerNormLSTM / GRU / RNN and their cells: torch parity, the paper's equations, whole vs pieces,
packed vs alone, gradcheck, batch independence, torch.compile, and bad input."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pack_sequence

import lnorm
from lnorm.nn import (
    LayerNormGRU,
    LayerNormGRUCell,
    LayerNormLSTM,
    LayerNormLSTMCell,
    LayerNormRNN,
    LayerNormRNNCell,
)
from lnorm.ops.backend import numba_available
from tolerances import assert_close, assert_three_way

D64 = torch.float64
LAYERS = {
    "lstm": (LayerNormLSTM, nn.LSTM, LayerNormLSTMCell),
    "gru": (LayerNormGRU, nn.GRU, LayerNormGRUCell),
    "rnn_tanh": (LayerNormRNN, nn.RNN, LayerNormRNNCell),
    "rnn_relu": (LayerNormRNN, nn.RNN, LayerNormRNNCell),
}


# ------------------------------------------------------------------------------------ helpers


def _extra(kind: str) -> dict:
    return {"nonlinearity": "relu"} if kind == "rnn_relu" else {}


def make(kind: str, *args, ln_noise: float = 0.3, **kw):
    """Our layer with non-trivial LN parameters (so a swapped or ignored one shows)."""
    m = LAYERS[kind][0](*args, **_extra(kind), **kw)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith("ln_"):
                p.add_(ln_noise * torch.randn_like(p))
    return m


def make_cell(kind: str, *args, **kw):
    m = LAYERS[kind][2](*args, **_extra(kind), **kw)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith("ln_"):
                p.add_(0.3 * torch.randn_like(p))
    return m


def data(out):
    return out.data if isinstance(out, PackedSequence) else out


def states(kind, res):
    return list(res[1]) if kind == "lstm" else [res[1]]


def hx_for(kind, L, B, H, dtype=D64, batched=True):
    shape = (L, B, H) if batched else (L, H)
    h = torch.randn(*shape, dtype=dtype)
    return (h, torch.randn(*shape, dtype=dtype)) if kind == "lstm" else h


def loss_of(kind, res):
    # weights so every element of every output matters differently
    total = 0
    for t in [data(res[0])] + states(kind, res):
        w = torch.linspace(-1, 1, t.numel(), dtype=t.dtype).reshape(t.shape)
        total = total + (t * w).sum()
    return total


def graph_nodes(t) -> set[str]:
    seen, stack, names = set(), [t.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    return names


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True)


# ------------------------------------------------------------------------ names and state_dict


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_parameter_names_match_torch(kind, bidirectional):
    ours = LAYERS[kind][0](5, 6, num_layers=2, bidirectional=bidirectional, layer_norm=False, **_extra(kind))
    ref = LAYERS[kind][1](5, 6, num_layers=2, bidirectional=bidirectional, **_extra(kind))
    assert list(ours.state_dict()) == list(ref.state_dict())
    for name, p in ref.named_parameters():
        assert getattr(ours, name).shape == p.shape
    ours.load_state_dict(ref.state_dict())  # strict

    ln = LAYERS[kind][0](5, 6, num_layers=2, bidirectional=bidirectional, **_extra(kind))
    res = ln.load_state_dict(ref.state_dict(), strict=False)
    assert res.unexpected_keys == []
    assert all(k.startswith("ln_") for k in res.missing_keys) and res.missing_keys
    for name, p in ref.named_parameters():
        assert torch.equal(getattr(ln, name), p)


def test_ln_parameter_names_and_init():
    m = LayerNormLSTM(3, 4, bidirectional=True)
    names = [n for n, _ in m.named_parameters() if n.startswith("ln_")]
    assert names == [
        f"ln_{p}_{w}_l0{s}" for s in ("", "_reverse") for p in ("ih", "hh", "cell") for w in ("weight", "bias")
    ]
    assert m.ln_ih_weight_l0.shape == (16,) and m.ln_cell_weight_l0.shape == (4,)
    assert torch.equal(m.ln_hh_weight_l0_reverse, torch.ones(16))
    assert torch.equal(m.ln_cell_bias_l0, torch.zeros(4))
    assert [n for n, _ in LayerNormRNN(3, 4).named_parameters() if n.startswith("ln_")] == ["ln_weight_l0", "ln_bias_l0"]
    assert LayerNormGRUCell(3, 4).ln_hh_weight.shape == (12,)


# ----------------------------------------------------------------------------- torch parity


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    kind=st.sampled_from(list(LAYERS)),
    num_layers=st.integers(1, 3),
    bidirectional=st.booleans(),
    batch_first=st.booleans(),
    bias=st.booleans(),
    T=st.integers(1, 5),
    B=st.integers(1, 4),
    I=st.integers(1, 6),
    H=st.integers(1, 6),
    with_hx=st.booleans(),
)
def test_layer_norm_off_equals_torch(backend, kind, num_layers, bidirectional, batch_first, bias, T, B, I, H, with_hx):
    ref = LAYERS[kind][1](I, H, num_layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional,
                          dtype=D64, **_extra(kind))
    ours = LAYERS[kind][0](I, H, num_layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional,
                           layer_norm=False, dtype=D64, **_extra(kind))
    ours.load_state_dict(ref.state_dict())
    D = 2 if bidirectional else 1
    x = torch.randn((B, T, I) if batch_first else (T, B, I), dtype=D64, requires_grad=True)
    hx = hx_for(kind, num_layers * D, B, H) if with_hx else None
    r_ref, r_ours = ref(x, hx), ours(x, hx)
    for a, e in zip([r_ours[0]] + states(kind, r_ours), [r_ref[0]] + states(kind, r_ref), strict=True):
        assert_close(a, e, name="output/state")
    g_ref = grads(loss_of(kind, r_ref), [x, *ref.parameters()])
    g_ours = grads(loss_of(kind, r_ours), [x, *ours.parameters()])
    for a, e, n in zip(g_ours, g_ref, ["x"] + [n for n, _ in ref.named_parameters()], strict=True):
        assert_close(a, e, name=f"grad {n}")


# ---------------------------------------------------------------------- the paper's equations


def _ln(z, w, b, eps=1e-5):
    mu = z.mean(-1, keepdim=True)
    var = ((z - mu) ** 2).mean(-1, keepdim=True)
    return w * (z - mu) / torch.sqrt(var + eps) + b


def test_lstm_cell_is_paper_eq_20_22(backend):
    cell = make_cell("lstm", 5, 4, dtype=D64)
    x, h, c = torch.randn(3, 5, dtype=D64), torch.randn(3, 4, dtype=D64), torch.randn(3, 4, dtype=D64)
    p = dict(cell.named_parameters())
    gates = (_ln(h @ p["weight_hh"].T, p["ln_hh_weight"], p["ln_hh_bias"])
             + _ln(x @ p["weight_ih"].T, p["ln_ih_weight"], p["ln_ih_bias"]) + p["bias_ih"] + p["bias_hh"])
    i, f, g, o = gates.chunk(4, -1)
    c1 = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h1 = torch.sigmoid(o) * torch.tanh(_ln(c1, p["ln_cell_weight"], p["ln_cell_bias"]))
    h_ours, c_ours = cell(x, (h, c))
    assert_close(h_ours, h1, name="h")
    assert_close(c_ours, c1, name="c (carried un-normalized)")
    # the normalized-cell variant carries LN(c) and has the same h
    cell.cell_state = "normalized"
    h_n, c_n = cell(x, (h, c))
    assert_close(h_n, h1, name="h")
    assert_close(c_n, _ln(c1, p["ln_cell_weight"], p["ln_cell_bias"]), name="normalized c")


def test_gru_cell_is_paper_eq_26_28(backend):
    cell = make_cell("gru", 5, 4, dtype=D64)
    x, h = torch.randn(3, 5, dtype=D64), torch.randn(3, 4, dtype=D64)
    p = dict(cell.named_parameters())
    H = 4
    gx, gh = x @ p["weight_ih"].T, h @ p["weight_hh"].T
    wi, bi, wh, bh = p["ln_ih_weight"], p["ln_ih_bias"], p["ln_hh_weight"], p["ln_hh_bias"]
    rz = torch.sigmoid(_ln(gx[:, :8], wi[:8], bi[:8]) + _ln(gh[:, :8], wh[:8], bh[:8])
                       + p["bias_ih"][:8] + p["bias_hh"][:8])
    r, z = rz[:, :H], rz[:, H:]
    n = torch.tanh(_ln(gx[:, 8:], wi[8:], bi[8:]) + p["bias_ih"][8:] + r * (_ln(gh[:, 8:], wh[8:], bh[8:]) + p["bias_hh"][8:]))
    assert_close(cell(x, h), (1 - z) * n + z * h, name="h")


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_rnn_cell_is_paper_eq_4(nonlinearity):
    cell = LayerNormRNNCell(5, 4, nonlinearity=nonlinearity, dtype=D64)
    with torch.no_grad():
        cell.ln_weight.uniform_(0.5, 1.5)
        cell.ln_bias.normal_()
    x, h = torch.randn(3, 5, dtype=D64), torch.randn(3, 4, dtype=D64)
    pre = _ln(x @ cell.weight_ih.T + h @ cell.weight_hh.T, cell.ln_weight, cell.ln_bias) + cell.bias_ih + cell.bias_hh
    assert_close(cell(x, h), torch.tanh(pre) if nonlinearity == "tanh" else torch.relu(pre), name="h")


# --------------------------------------------------------------------------- whole vs pieces


def _copy_cell(cell, layer, sfx="_l0"):
    with torch.no_grad():
        for name, p in cell.named_parameters():
            p.copy_(getattr(layer, name + sfx))


@pytest.mark.parametrize("kind", list(LAYERS))
def test_cell_loop_equals_layer(backend, kind):
    layer = make(kind, 5, 6, dtype=D64)
    cell = LAYERS[kind][2](5, 6, dtype=D64, **_extra(kind))
    _copy_cell(cell, layer)
    x = torch.randn(7, 3, 5, dtype=D64)
    hx = hx_for(kind, 1, 3, 6)
    out, st_ = layer(x, hx)
    state = (hx[0][0], hx[1][0]) if kind == "lstm" else hx[0]
    outs = []
    for t in range(7):
        state = cell(x[t], state)
        outs.append(state[0] if kind == "lstm" else state)
    assert_close(out, torch.stack(outs), name="output")
    assert_close(states(kind, (out, st_))[0][0], outs[-1], name="h_n")
    if kind == "lstm":
        assert_close(st_[1][0], state[1], name="c_n")


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_whole_sequence_equals_chunks_carrying_state(backend, kind):
    m = make(kind, 4, 5, num_layers=2, batch_first=True, dtype=D64)
    x = torch.randn(3, 9, 4, dtype=D64)
    out, st_ = m(x)
    o1, s1 = m(x[:, :4])
    o2, s2 = m(x[:, 4:5], s1)
    o3, s3 = m(x[:, 5:], s2)
    assert_close(torch.cat([o1, o2, o3], 1), out, name="output")
    for a, e in zip(states(kind, (o3, s3)), states(kind, (out, st_)), strict=True):
        assert_close(a, e, name="final state")


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_relu"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_packed_equals_each_sequence_alone(backend, kind, bidirectional):
    m = make(kind, 4, 5, num_layers=2, bidirectional=bidirectional, dtype=D64)
    lengths = [3, 7, 1, 5, 7]
    seqs = [torch.randn(n, 4, dtype=D64, requires_grad=True) for n in lengths]
    D = 2 if bidirectional else 1
    hx = hx_for(kind, 2 * D, len(lengths), 5)
    hx = tuple(h.requires_grad_() for h in hx) if kind == "lstm" else hx.requires_grad_()
    hx_list = list(hx) if kind == "lstm" else [hx]
    packed = pack_sequence(seqs, enforce_sorted=False)
    out, st_ = m(packed, hx)
    assert isinstance(out, PackedSequence)
    padded, _ = torch.nn.utils.rnn.pad_packed_sequence(out)
    final = states(kind, (out, st_))
    # a loss that is a sum of one term per sequence, each with its own weights on the sequence's
    # outputs and final states: its gradient w.r.t. a sequence (and its initial state) is that
    # sequence's own, which the sequence alone must give
    w_out = [torch.randn(n, D * 5, dtype=D64) for n in lengths]
    w_fin = [[torch.randn(2 * D, 5, dtype=D64) for _ in final] for _ in lengths]
    loss = sum((padded[: lengths[b], b] * w_out[b]).sum()
               + sum((f[:, b] * w).sum() for f, w in zip(final, w_fin[b], strict=True)) for b in range(len(lengths)))
    g_packed = grads(loss, seqs + hx_list)
    for b, s in enumerate(seqs):
        hb = tuple(h[:, b].detach().requires_grad_() for h in hx) if kind == "lstm" else hx[:, b].detach().requires_grad_()
        hb_list = list(hb) if kind == "lstm" else [hb]
        o_b, st_b = m(s, hb)  # unbatched
        assert_close(padded[: lengths[b], b], o_b, name=f"output of sequence {b}")
        assert_close(padded[lengths[b] :, b], torch.zeros_like(padded[lengths[b] :, b]), name="padding")
        fin_b = states(kind, (o_b, st_b))
        for a, e in zip([f[:, b] for f in final], fin_b, strict=True):
            assert_close(a, e, name=f"final state of sequence {b}")
        loss_b = (o_b * w_out[b]).sum() + sum((f * w).sum() for f, w in zip(fin_b, w_fin[b], strict=True))
        g_alone = grads(loss_b, [s] + hb_list)
        assert_close(g_packed[b], g_alone[0], name=f"grad of sequence {b}")
        for k, (gp, ga) in enumerate(zip(g_packed[len(seqs):], g_alone[1:], strict=True)):
            assert_close(gp[:, b], ga, name=f"grad of initial state {k} of sequence {b}")


def test_padded_batch_via_pack_padded_equals_alone(backend):
    m = make("lstm", 3, 4, batch_first=True, dtype=D64)
    x = torch.randn(3, 6, 3, dtype=D64)
    lengths = torch.tensor([2, 6, 4])
    out, (h, c) = m(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
    for b in range(3):
        o_b, (h_b, c_b) = m(x[b : b + 1, : lengths[b]])
        assert_close(h[:, b], h_b[:, 0], name="h_n")
        assert_close(c[:, b], c_b[:, 0], name="c_n")


@pytest.mark.parametrize("kind", list(LAYERS))
def test_unbatched_equals_batch_of_one(backend, kind):
    m = make(kind, 3, 4, num_layers=2, bidirectional=True, dtype=D64)
    x = torch.randn(5, 3, dtype=D64)
    hx = hx_for(kind, 4, 1, 4)
    o1, s1 = m(x.unsqueeze(1), hx)
    hx_u = (hx[0][:, 0], hx[1][:, 0]) if kind == "lstm" else hx[:, 0]
    o2, s2 = m(x, hx_u)
    assert_close(o2, o1[:, 0], name="output")
    for a, e in zip(states(kind, (o2, s2)), states(kind, (o1, s1)), strict=True):
        assert_close(a, e[:, 0], name="state")


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_batch_independence(backend, kind):
    """The article's point: each sample's output depends only on that sample (LN statistics are per
    sample), whatever else is in the batch and however large it is."""
    m = make(kind, 4, 6, num_layers=2, bidirectional=True)
    x = torch.randn(5, 8, 4)
    out, _ = m(x)
    others = torch.randn(5, 8, 4) * 10
    mixed = torch.cat([x[:, :3], others[:, 3:]], 1)
    out_mixed, _ = m(mixed)
    # float32 default tolerance: the matmul itself may round differently for another batch size
    assert_close(out_mixed[:, :3], out[:, :3], name="output beside other samples")
    for b in (0, 7):
        out_b, _ = m(x[:, b : b + 1])
        assert_close(out_b[:, 0], out[:, b], name=f"sample {b} alone")


# ------------------------------------------------------------------ fused path vs pure torch


@pytest.mark.skipif(not numba_available(), reason="numba is not importable")
@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("dtype", [torch.float32, D64], ids=["f32", "f64"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_fused_path_equals_torch_path(kind, dtype, packed):
    m = make(kind, 6, 9, num_layers=2, bidirectional=True, dtype=dtype)
    x = torch.randn(7, 4, 6, dtype=dtype, requires_grad=True)
    hx = hx_for(kind, 4, 4, 9, dtype=dtype)
    results = {}
    for b in ("numba", "torch"):
        inp = pack_padded_sequence(x, torch.tensor([7, 3, 5, 1]), enforce_sorted=False) if packed else x
        with lnorm.use_backend(b):
            res = m(inp, hx)
            results[b] = ([data(res[0])] + states(kind, res), grads(loss_of(kind, res), [x, *m.parameters()]))
            if b == "numba":  # the fused autograd Function really ran
                assert any("Recurrence" in n for n in graph_nodes(data(res[0]))), graph_nodes(data(res[0]))
    names = ["x"] + [n for n, _ in m.named_parameters()]
    fast = results["numba"][0] + list(results["numba"][1])
    same = results["torch"][0] + list(results["torch"][1])
    labels = ["output"] + ["state"] * (len(results["numba"][0]) - 1) + [f"grad {n}" for n in names]
    if dtype == D64:
        for a, e, n in zip(fast, same, labels, strict=True):
            assert_close(a, e, name=n)
    else:  # float32: three-way against a float64 run (the fused path's tanh is a rational approx.)
        m64 = copy.deepcopy(m).double()
        x64 = x.detach().double().requires_grad_(True)
        inp64 = pack_padded_sequence(x64, torch.tensor([7, 3, 5, 1]), enforce_sorted=False) if packed else x64
        hx64 = tuple(h.double() for h in hx) if kind == "lstm" else hx.double()
        with lnorm.use_backend("torch"):
            res = m64(inp64, hx64)
            ref = [data(res[0])] + states(kind, res) + list(grads(loss_of(kind, res), [x64, *m64.parameters()]))
        for a, r, t, n in zip(fast, ref, same, labels, strict=True):
            assert_three_way(a, r, t, atol=2e-6, name=n)
    tol = {} if dtype == D64 else {"atol": 1e-5, "rtol": 1e-4}
    with torch.no_grad(), lnorm.use_backend("numba"):
        res = m(inp, hx)
    assert_close(data(res[0]), results["torch"][0][0], name="no_grad output", **tol)


@pytest.mark.skipif(not numba_available(), reason="numba is not importable")
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_fused_path_without_bias_batch_first_equals_torch_path(kind):
    # the options the property test below draws, pinned: bias=False (the fused kernels then add
    # only the LN biases) and batch_first, packed, with initial states that require grad
    m = make(kind, 4, 5, num_layers=2, bias=False, batch_first=True, bidirectional=True, dtype=D64)
    x = torch.randn(3, 6, 4, dtype=D64, requires_grad=True)
    hx = hx_for(kind, 4, 3, 5)
    hx = tuple(h.requires_grad_() for h in hx) if kind == "lstm" else hx.requires_grad_()
    leaves = [x, *(hx if kind == "lstm" else [hx]), *m.parameters()]
    results = {}
    for b in ("numba", "torch"):
        inp = pack_padded_sequence(x, torch.tensor([6, 2, 4]), batch_first=True, enforce_sorted=False)
        with lnorm.use_backend(b):
            res = m(inp, hx)
        if b == "numba":
            assert any("Recurrence" in n for n in graph_nodes(data(res[0]))), graph_nodes(data(res[0]))
        results[b] = [data(res[0])] + states(kind, res) + list(grads(loss_of(kind, res), leaves))
    names = (["output"] + [f"final state {i}" for i in range(len(hx) if kind == "lstm" else 1)] + ["grad x"]
             + [f"grad of initial state {i}" for i in range(len(hx) if kind == "lstm" else 1)]
             + [f"grad {n}" for n, _ in m.named_parameters()])
    for a, e, n in zip(results["numba"], results["torch"], names, strict=True):
        assert_close(a, e, name=n)


@st.composite
def fused_cases(draw):
    T, B = draw(st.integers(1, 5)), draw(st.integers(1, 4))
    packed = draw(st.booleans())
    return {
        "kind": draw(st.sampled_from(["lstm", "gru"])),
        "num_layers": draw(st.integers(1, 3)),
        "bidirectional": draw(st.booleans()),
        "batch_first": draw(st.booleans()),
        "bias": draw(st.booleans()),
        "T": T, "B": B, "I": draw(st.integers(1, 5)), "H": draw(st.integers(1, 5)),
        # uneven lengths, one of them the longest (pack_padded_sequence needs it to match T)
        "lengths": [T] + draw(st.lists(st.integers(1, T), min_size=B - 1, max_size=B - 1)) if packed else None,
        "with_hx": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
    }


@pytest.mark.skipif(not numba_available(), reason="numba is not importable")
@settings(max_examples=25, deadline=None)
@given(case=fused_cases())
def test_fused_equals_torch_property(case):
    """The fused CPU path (layer norm on: the only case it runs) against the pure-torch path in
    float64: outputs, final states and every gradient, the initial states' included."""
    kind, H, B = case["kind"], case["H"], case["B"]
    torch.manual_seed(case["seed"])
    m = make(kind, case["I"], H, num_layers=case["num_layers"], bias=case["bias"], batch_first=case["batch_first"],
             bidirectional=case["bidirectional"], dtype=D64)
    L = case["num_layers"] * (2 if case["bidirectional"] else 1)
    shape = (B, case["T"], case["I"]) if case["batch_first"] else (case["T"], B, case["I"])
    x = torch.randn(shape, dtype=D64, requires_grad=True)
    hx = None
    if case["with_hx"]:
        hx = hx_for(kind, L, B, H)
        hx = tuple(h.requires_grad_() for h in hx) if kind == "lstm" else hx.requires_grad_()
    leaves = [x] + ([] if hx is None else list(hx) if kind == "lstm" else [hx]) + list(m.parameters())
    results = {}
    for b in ("numba", "torch"):
        inp = x
        if case["lengths"] is not None:
            inp = pack_padded_sequence(x, torch.tensor(case["lengths"]), batch_first=case["batch_first"],
                                       enforce_sorted=False)
        with lnorm.use_backend(b):
            res = m(inp, hx)
        if b == "numba":  # the fused autograd Functions really ran
            assert any("Recurrence" in n for n in graph_nodes(data(res[0]))), graph_nodes(data(res[0]))
        results[b] = [data(res[0])] + states(kind, res) + list(grads(loss_of(kind, res), leaves))
    n_hx = len(leaves) - 1 - len(list(m.parameters()))
    names = (["output"] + [f"state {i}" for i in range(len(states(kind, res)))] + ["grad x"]
             + [f"grad of initial state {i}" for i in range(n_hx)] + [f"grad {n}" for n, _ in m.named_parameters()])
    for a, e, n in zip(results["numba"], results["torch"], names, strict=True):
        assert a is not None and e is not None, n
        assert_close(a, e, name=n)


@pytest.mark.skipif(not numba_available(), reason="numba is not importable")
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("batch_sizes", [[3, 3, 3, 3], [3, 2, 2, 1], [2]], ids=["full", "packed", "one-step"])
@pytest.mark.parametrize("impl", ["mm", "onednn"])
def test_weight_grad_equals_sum_over_previous_states(reverse, batch_sizes, impl):
    # dW_hh = sum over rows of dgh[n]^T prev[n], prev[n] read off the schedule one row at a time;
    # the fast paths (views of shifted outputs for full batches) over all rows and over runs, with
    # each library's weight-gradient product (oneDNN: float32 only)
    from lnorm.ops import step_gemm
    from lnorm.ops.rnn_fused import _Schedule

    if impl == "onednn" and not step_gemm._ONEDNN:
        pytest.skip("torch without oneDNN")
    dt = D64 if impl == "mm" else torch.float32
    sched = _Schedule(batch_sizes, reverse)
    g = torch.Generator().manual_seed(0)
    dgh = torch.randn(sched.N, 8, dtype=D64, generator=g)
    init = torch.randn(sched.B, 5, dtype=D64, generator=g)
    rows = torch.randn(sched.N, 5, dtype=D64, generator=g)
    prev = torch.stack([rows[p] if p >= 0 else init[-1 - p] for p in sched.prev.tolist()])
    expected = dgh.t() @ prev
    dgh, init, rows = dgh.to(dt), init.to(dt), rows.to(dt)
    wg = step_gemm.WeightGrad(8, 5, sched.N, dt, impl=impl)
    whole = sched.add_weight_grad(wg, dgh, init, rows, 0, sched.N).result()
    assert whole.shape == (8, 5) and whole.is_contiguous() and whole.dtype == dt
    assert_close(whole.double(), expected, atol=1e-12 if dt == D64 else 1e-5, rtol=0, name="dW_hh, all rows")
    runs = step_gemm.WeightGrad(8, 5, 4, dt, impl=impl)
    for lo, hi, _ in sched.chunks(4):
        sched.add_weight_grad(runs, dgh[lo:hi], init, rows, lo, hi)
    assert_close(runs.result().double(), expected, atol=1e-12 if dt == D64 else 1e-5, rtol=0,
                 name="dW_hh, summed over runs")



@pytest.mark.skipif(not numba_available(), reason="numba is not importable")
def test_lstm_backward_run_length_follows_the_last_level_cache(tmp_path, monkeypatch):
    # the run length is read from the cache sizes sysfs reports (the largest), a quarter of it
    # per buffer within 2 .. 8 MB and 256 .. 1024 rows; unknown cache: the first-tuned 256 rows
    from lnorm.ops import rnn_fused as rf

    for i, size in enumerate(["48K", "2048K", "32768K", "bogus"]):
        (tmp_path / f"index{i}").mkdir()
        (tmp_path / f"index{i}" / "size").write_text(size + "\n")
    assert rf.last_level_cache_bytes(str(tmp_path)) == 32 << 20
    assert rf.last_level_cache_bytes(str(tmp_path / "absent")) is None
    assert rf._run_bytes(None) == 2 << 20
    assert rf._run_bytes(32 << 20) == 8 << 20
    assert rf._run_bytes(4 << 20) == 2 << 20
    assert rf._run_bytes(256 << 20) == 8 << 20
    monkeypatch.setattr(rf, "_RUN_BYTES", 8 << 20)
    assert rf.run_rows(2048, 4) == 1024  # H = 512, float32: 8 KB rows
    assert rf.run_rows(4096, 4) == 512
    assert rf.run_rows(64, 8) == 1024  # capped
    assert rf.run_rows(1 << 20, 4) == 256  # floored
    assert rf.backward_run_rows(32, "lstm", 512) == 1024 and rf.backward_run_rows(48, "lstm", 512) == 1008
    assert rf.backward_run_rows(2000, "lstm", 512) == 2000  # at least one whole step
    assert rf.backward_run_rows(32, "gru", 512) == 512  # half the LSTM's rows at the same H
    monkeypatch.setattr(rf, "_RUN_BYTES", 2 << 20)
    assert rf.run_rows(2048, 4) == 256
    monkeypatch.setattr(rf, "_CHUNK_ROWS", 9)
    assert rf.run_rows(2048, 4) == 9

@pytest.mark.skipif(not numba_available(), reason="numba is not importable")
@pytest.mark.parametrize("chunk_rows", [1, 9], ids=["one-step-runs", "mixed-runs"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_backward_in_runs_of_steps_equals_torch_path(monkeypatch, kind, chunk_rows, packed):
    # the LSTM and GRU backwards fold runs of steps into the weight gradients (and the LSTM's input
    # gradient, the GRU's LN sums); the other tests' sizes fit one run, so force several (each
    # step alone, and runs that split unevenly)
    from lnorm.ops import rnn_fused

    monkeypatch.setattr(rnn_fused, "_CHUNK_ROWS", chunk_rows)
    m = make(kind, 5, 6, num_layers=2, bidirectional=True, dtype=D64)
    with torch.no_grad():  # LN weights away from 1, so each group's LN gradient counts
        for name, p in m.named_parameters():
            if name.startswith("ln_"):
                p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(7, 4, 5, dtype=D64, requires_grad=True)
    hx = hx_for(kind, 4, 4, 6, dtype=D64)
    results = {}
    for b in ("numba", "torch"):
        inp = pack_padded_sequence(x, torch.tensor([7, 3, 5, 1]), enforce_sorted=False) if packed else x
        with lnorm.use_backend(b):
            res = m(inp, hx)
            results[b] = [data(res[0])] + states(kind, res) + list(grads(loss_of(kind, res), [x, *m.parameters()]))
    names = ["output"] + ["state"] * (len(results["numba"]) - 2 - len(list(m.parameters()))) + ["grad x"]
    names += [f"grad {n}" for n, _ in m.named_parameters()]
    for a, e, n in zip(results["numba"], results["torch"], names, strict=True):
        assert_close(a, e, name=n)


@pytest.mark.skipif(not numba_available(), reason="numba is not importable")
@pytest.mark.parametrize("block_rows", [1, 5, 10**6], ids=["one-step-blocks", "mixed-blocks", "one-block"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, "f32-onednn", D64], ids=["f32", "f32-onednn", "f64"])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_inference_in_blocks_of_steps_equals_torch_path(monkeypatch, kind, block_rows, packed, dtype):
    # without gradients both layers project their input a block of steps at a time (the step
    # kernel reads px of the block at row off - lo and normalizes it); the other tests' sizes fit
    # one block, so force several: each step alone, blocks that split a packed batch unevenly, and
    # all in one, in both directions and both layers, against a float64 run of the torch path
    # at these sizes the projection measures torch.mm faster; "f32-onednn" forces oneDNN's
    from lnorm.ops import rnn_fused, step_gemm

    forced = None
    if dtype == "f32-onednn":
        if "onednn" not in step_gemm.available(torch.float32):
            pytest.skip("torch without oneDNN")
        forced, dtype = "onednn", torch.float32
    m = make(kind, 5, 6, num_layers=2, bidirectional=True, dtype=dtype)
    monkeypatch.setattr(rnn_fused, "_PX_BLOCK_BYTES", block_rows * m.weight_ih_l0.shape[0] * m.weight_ih_l0.element_size())
    x = torch.randn(7, 4, 5, dtype=dtype)
    hx = hx_for(kind, 4, 4, 6, dtype=dtype)
    m64 = copy.deepcopy(m).double()

    def run(model, inp, h, backend):
        if packed:
            inp = pack_padded_sequence(inp, torch.tensor([7, 3, 5, 1]), enforce_sorted=False)
        with torch.no_grad(), lnorm.use_backend(backend), step_gemm.use_step_gemm(forced):
            res = model(inp, h)
        return [data(res[0])] + states(kind, res)

    got = run(m, x, hx, "numba")
    ref = run(m64, x.double(), tuple(h.double() for h in hx) if kind == "lstm" else hx.double(), "torch")
    tol = {} if dtype == D64 else {"atol": 2e-6, "rtol": 1e-5}
    for a, r, n in zip(got, ref, ["output", "h_n", "c_n"][: len(got)], strict=True):
        assert_close(a.double(), r, name=n, **tol)


# ---------------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("kind", list(LAYERS))
def test_gradcheck_cell(backend, kind):
    cell = make_cell(kind, 3, 4, dtype=D64)
    x = torch.randn(2, 3, dtype=D64, requires_grad=True)
    h = torch.randn(2, 4, dtype=D64, requires_grad=True)
    c = torch.randn(2, 4, dtype=D64, requires_grad=True)
    params = tuple(cell.parameters())

    def f(x, h, c, *ps):
        out = torch.func.functional_call(cell, dict(zip([n for n, _ in cell.named_parameters()], ps, strict=True)),
                                         (x, (h, c) if kind == "lstm" else h))
        return out if kind == "lstm" else (out,)

    assert torch.autograd.gradcheck(f, (x, h, c, *params))


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_gradcheck_layer(backend, kind, packed):
    m = make(kind, 3, 4, bidirectional=True, dtype=D64)
    names = [n for n, _ in m.named_parameters()]
    x = torch.randn(4, 3, 3, dtype=D64, requires_grad=True)
    hx = hx_for(kind, 2, 3, 4)
    h0 = hx[0] if kind == "lstm" else hx
    h0.requires_grad_(True)
    c0 = hx[1].requires_grad_(True) if kind == "lstm" else torch.zeros(1)
    lengths = torch.tensor([4, 1, 3])

    def f(x, h0, c0, *ps):
        inp = pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x
        res = torch.func.functional_call(m, dict(zip(names, ps, strict=True)), (inp, (h0, c0) if kind == "lstm" else h0))
        return (data(res[0]), *states(kind, res))

    # fast_mode: checks v^T J u for random u, v instead of building the whole Jacobian
    assert torch.autograd.gradcheck(f, (x, h0, c0, *m.parameters()), fast_mode=True)


# ------------------------------------------------------------------------ options and zoneout


def test_zoneout_eval_is_expectation_and_train_keeps_units():
    torch.manual_seed(0)
    m = make("lstm", 4, 64, zoneout=0.3, zoneout_cell=0.6, dtype=D64).eval()
    cell = LayerNormLSTMCell(4, 64, dtype=D64)
    _copy_cell(cell, m)
    x = torch.randn(6, 2, 4, dtype=D64)
    h = c = torch.zeros(2, 64, dtype=D64)
    outs = []
    for t in range(6):
        h1, c1 = cell(x[t], (h, c))
        h, c = 0.3 * h + 0.7 * h1, 0.6 * c + 0.4 * c1
        outs.append(h)
    out, (h_n, c_n) = m(x)
    assert_close(out, torch.stack(outs), name="eval output")
    assert_close(c_n[0], c, name="eval c_n")

    m.train()
    out, _ = m(x)
    same = (out[1:] == out[:-1]).double().mean().item()
    assert 0.2 < same < 0.4, f"fraction of units kept from the previous step {same:.3f}, zoneout 0.3"
    out2, _ = m(x)
    assert not torch.equal(out, out2)


def test_dropout_between_layers_only_in_training():
    m = LayerNormLSTM(3, 8, num_layers=2, dropout=0.5)
    x = torch.randn(4, 2, 3)
    m.eval()
    assert torch.equal(m(x)[0], m(x)[0])
    m.train()
    assert not torch.equal(m(x)[0], m(x)[0])
    one = LayerNormLSTM(3, 8, num_layers=1, dropout=0.5).train()
    assert torch.equal(one(x)[0], one(x)[0])


def test_repr_and_options():
    m = LayerNormLSTM(3, 4, num_layers=2, bidirectional=True, cell_state="normalized", zoneout=0.1)
    assert "cell_state='normalized'" in repr(m) and "zoneout=0.1" in repr(m)
    assert "nonlinearity='relu'" in repr(LayerNormRNN(3, 4, nonlinearity="relu"))


# --------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_bad_input_errors(kind):
    m = LAYERS[kind][0](4, 5, num_layers=2)
    with pytest.raises(ValueError, match=r"input.size\(-1\) must be equal to input_size. Expected 4, got 3"):
        m(torch.randn(6, 2, 3))
    with pytest.raises(ValueError, match="Expected input to be 2D or 3D, got 1D"):
        m(torch.randn(4))
    with pytest.raises(ValueError, match="Expected input to be 2D or 3D, got 4D"):
        m(torch.randn(2, 2, 2, 4))
    bad_h = torch.zeros(1, 2, 5)
    with pytest.raises(ValueError, match=r"Expected (h_0|hx) size \(2, 2, 5\), got \(1, 2, 5\)"):
        m(torch.randn(6, 2, 4), (bad_h, torch.zeros(2, 2, 5)) if kind == "lstm" else bad_h)
    if kind == "lstm":
        with pytest.raises(ValueError, match=r"Expected c_0 size \(2, 2, 5\), got \(2, 3, 5\)"):
            m(torch.randn(6, 2, 4), (torch.zeros(2, 2, 5), torch.zeros(2, 3, 5)))
        with pytest.raises(TypeError, match="hx must be a tuple"):
            m(torch.randn(6, 2, 4), torch.zeros(2, 2, 5))
    with pytest.raises(ValueError, match="unbatched 2-D input"):
        h = torch.zeros(2, 1, 5)
        m(torch.randn(6, 4), (h, h) if kind == "lstm" else h)
    with pytest.raises(TypeError, match="floating-point"):
        m(torch.ones(6, 2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="dtype"):
        m(torch.randn(6, 2, 4, dtype=D64))
    with pytest.raises(TypeError, match="Tensor or PackedSequence"):
        m([[1.0] * 4])


def test_unsorted_lengths_with_enforce_sorted():
    m = LayerNormLSTM(3, 4)
    x = torch.randn(5, 3, 3)
    with pytest.raises(RuntimeError, match="must be sorted in decreasing order"):
        m(pack_padded_sequence(x, torch.tensor([2, 5, 3]), enforce_sorted=True))
    bad = PackedSequence(torch.randn(6, 3), torch.tensor([2, 3, 1]), None, None)  # increasing batch sizes
    with pytest.raises(ValueError, match="batch_sizes must be positive and non-increasing"):
        m(bad)


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5])
def test_dropout_and_zoneout_range(value):
    with pytest.raises(ValueError, match=r"dropout should be a number in range \[0, 1\)"):
        LayerNormLSTM(3, 4, num_layers=2, dropout=value)
    with pytest.raises(ValueError, match=rf"zoneout must be a number in \[0, 1\), got {value}"):
        LayerNormGRU(3, 4, zoneout=value)
    with pytest.raises(ValueError, match=r"zoneout_cell must be a number in \[0, 1\)"):
        LayerNormLSTMCell(3, 4, zoneout_cell=value)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="hidden_size must be an int >= 1, got 0"):
        LayerNormLSTM(3, 0)
    with pytest.raises(TypeError, match="input_size must be an int, got 3.5"):
        LayerNormGRU(3.5, 4)
    with pytest.raises(ValueError, match="num_layers must be an int >= 1, got 0"):
        LayerNormRNN(3, 4, num_layers=0)
    with pytest.raises(ValueError, match="nonlinearity must be 'tanh' or 'relu', got 'gelu'"):
        LayerNormRNN(3, 4, nonlinearity="gelu")
    with pytest.raises(ValueError, match="cell_state must be one of"):
        LayerNormLSTM(3, 4, cell_state="norm")
    with pytest.raises(TypeError, match="cell_state"):
        LayerNormGRU(3, 4, cell_state="normalized")
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        LayerNormLSTM(3, 4, eps=0.0)
    # one exception per kind of mistake: the wrong type is a TypeError here as in lnorm.LayerNorm
    with pytest.raises(TypeError, match="eps must be a positive float, got '1e-5'"):
        LayerNormLSTM(3, 4, eps="1e-5")
    with pytest.raises(TypeError, match="layer_norm must be a bool"):
        LayerNormLSTM(3, 4, layer_norm=1)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_cell_bad_input(kind):
    cell = LAYERS[kind][2](4, 5)
    with pytest.raises(ValueError, match=r"input.size\(-1\) must be equal to input_size. Expected 4, got 2"):
        cell(torch.randn(3, 2))
    with pytest.raises(ValueError, match="Expected input to be 1D or 2D, got 3D"):
        cell(torch.randn(1, 3, 4))
    h = torch.zeros(2, 5)
    with pytest.raises(ValueError, match=r"Expected (h_0|hx) of shape \[3, 5\], got \[2, 5\]"):
        cell(torch.randn(3, 4), (h, torch.zeros(3, 5)) if kind == "lstm" else h)


# ------------------------------------------------------------------------------ torch.compile


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_torch_compile_matches_eager(kind):
    # float64: eager runs the fused path (rational tanh in float32), compiled traces the torch path
    m = make(kind, 3, 4, num_layers=2, bidirectional=True, dtype=D64)
    x = torch.randn(5, 2, 3, dtype=D64, requires_grad=True)
    res = m(x)
    g = grads(loss_of(kind, res), [x, *m.parameters()])
    compiled = torch.compile(m, backend="aot_eager", fullgraph=False)
    res_c = compiled(x)
    g_c = grads(loss_of(kind, res_c), [x, *m.parameters()])
    for a, e in zip([res_c[0]] + states(kind, res_c), [res[0]] + states(kind, res), strict=True):
        assert_close(a, e, name="compiled output")
    for a, e in zip(g_c, g, strict=True):
        assert_close(a, e, name="compiled grad")


# ------------------------------------------------------------------------------------ bench


def test_bench_rnn_cli_quick(tmp_path):
    out = tmp_path / "rnn.json"
    proc = subprocess.run(
        [sys.executable, "-m", "lnorm", "bench", "rnn", "--quick", "--cases", "main,packed", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "lnorm/torch" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    assert {(r["cell"], r["case"], r["mode"]) for r in rows} == {
        (c, k, m) for c in ("lstm", "gru") for k in ("main", "packed") for m in ("train", "infer")
    }
    assert all(r["lnorm_ms"] > 0 and r["lnorm_saved_mb"] >= 0 for r in rows)
    # the header and the JSON name the CPU and the per-step GEMM each product chose
    settings = json.loads(out.read_text())["settings"]
    assert settings["cpu"]["model_name"] and f"CPU: {settings['cpu']['model_name']}" in proc.stdout
    isa = settings["isa"]  # and the instruction sets the libraries used
    assert f"Instruction sets: CPU {isa['cpu'] or 'unknown'}, torch's kernels {isa['torch']}" in proc.stdout
    if numba_available():
        chosen = settings["step_gemm"]
        assert chosen and all(c["impl"] in ("mkl", "onednn", "mm") and c["threads"] >= 1 for c in chosen)
        lines = [ln for ln in proc.stdout.splitlines() if " threads: " in ln]
        assert len(lines) == len(chosen)
        kinds = {"step": "per-step GEMM", "input": "input projection", "weight grad": "weight gradient"}
        assert all(ln.startswith(kinds[c["kind"]]) for ln, c in zip(lines, chosen, strict=True))
        assert {"step", "weight grad"} <= {c["kind"] for c in chosen}  # train mode ran backward


def test_bench_rnn_runs_summarizes_every_run(tmp_path, capsys):
    # --runs 3: three whole measurements; the summary's ranges and counts come from the three
    # runs' rows, which the JSON keeps
    from lnorm.cli import main

    out = tmp_path / "rnn.json"
    assert main(["bench", "rnn", "--quick", "--runs", "3", "--cells", "lstm", "--cases", "main,packed",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    data = json.loads(out.read_text())
    runs = data["runs"]
    assert len(runs) == 3 and data["settings"]["runs"] == 3 and data["rows"] == runs[-1]
    assert "run 1 of 3:" in text and "run 3 of 3:" in text and "over the 3 runs, range (median):" in text
    for i, key in enumerate([("lstm", "main", "train"), ("lstm", "main", "infer"),
                             ("lstm", "packed", "train"), ("lstm", "packed", "infer")]):
        rows = [rs[i] for rs in runs]
        assert all((r["cell"], r["case"], r["mode"]) == key for r in rows)
        vt = sorted(r["vs_torch"] for r in rows)
        line = next(ln for ln in text.splitlines() if ln.startswith(" ".join(key) + ": lnorm/torch "))
        assert f"lnorm/torch {vt[0]:.2f}x-{vt[2]:.2f}x ({vt[1]:.2f}x)" in line
        if key[1] == "main":
            bound = 1.0 if key[2] == "train" else 1.25
            assert f"met (<= {bound}) in {sum(v <= bound for v in vt)} of 3 runs" in line
            vn = sorted(r["vs_naive"] for r in rows)
            assert f"naive/lnorm {vn[0]:.2f}x-{vn[2]:.2f}x ({vn[1]:.2f}x), met (>= 2.0) in {sum(v >= 2 for v in vn)} of 3" in line


def test_bench_rnn_runs_must_be_positive(capsys):
    from lnorm.cli import main

    assert main(["bench", "rnn", "--quick", "--runs", "0"]) == 2
    assert "--runs must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("layer", ["lnorm", "torch"])
def test_gate_preactivations_are_the_gates_the_layer_computes(layer):
    # one LSTM step from h0 = c0 = 0, rebuilt from the pre-activations: c1 = sig(i) tanh(g),
    # h1 = sig(o) tanh(LN(c1)) (torch's layer: no LN)
    from lnorm.nn.rnn import gate_preactivations

    torch.manual_seed(1)
    m = LayerNormLSTM(3, 5, dtype=D64) if layer == "lnorm" else nn.LSTM(3, 5, dtype=D64)
    if layer == "lnorm":
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name.startswith("ln_"):
                    p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(1, 4, 3, dtype=D64)
    h1 = m(x)[0][0]
    i, f, g, o = gate_preactivations(m, x[0], torch.zeros(4, 5, dtype=D64)).chunk(4, -1)
    c1 = torch.sigmoid(i) * torch.tanh(g)
    if layer == "lnorm":
        c1 = torch.nn.functional.layer_norm(c1, (5,), m.ln_cell_weight_l0, m.ln_cell_bias_l0, m.eps)
    assert_close(torch.sigmoid(o) * torch.tanh(c1), h1, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("argv, message", [
    (["--quick", "--threads", "-1"], "--threads must be >= 1 (0: the libraries' own choice), got -1"),
    (["--batch", "0"], "--batch, --seq-len, --input-size, --hidden-size, --repeats must be >= 1"),
])
def test_bench_rnn_bad_numbers_are_one_clear_error(argv, message, capsys):
    # --threads -1 reached torch.set_num_threads and ended in its RuntimeError's traceback; usage
    # errors exit 2 with one line, as bench ops and lab do (they exited 1 through SystemExit(msg))
    from lnorm.cli import main

    assert main(["bench", "rnn", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_bench_rnn_quick_refuses_explicit_sizes_and_checks_the_json_path_first(tmp_path, capsys):
    # --quick silently replaced --hidden-size 64 and the rest; --json to a missing folder failed
    # with a traceback after the whole benchmark had run
    import re

    from lnorm.cli import main

    assert main(["bench", "rnn", "--quick", "--hidden-size", "64", "--batch", "9"]) == 2
    assert "--quick sets the sizes and repeats itself; drop --batch 9, --hidden-size 64 or --quick" in capsys.readouterr().err
    assert main(["bench", "rnn", "--quick", "--json", str(tmp_path / "missing" / "r.json")]) == 2
    assert re.search("--json: the folder .* does not exist", capsys.readouterr().err)
    assert main(["bench", "rnn", "--cells", "foo"]) == 2
    assert "--cells must be a comma list of ('lstm', 'gru'), got 'foo'" in capsys.readouterr().err


def test_bench_ops_checks_the_json_path_first(tmp_path, capsys):
    from lnorm.cli import main

    assert main(["bench", "ops", "--json", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--json: " in err and "is a directory" in err


def test_bench_ops_refuses_a_backend_that_would_not_run(capsys):
    # --backend triton on a CPU run timed numba (the header said so, the flag did not)
    import lnorm.ops.backend as B
    from lnorm.cli import main

    B.register_backend(B.Backend("cudaonly_test", available=lambda: True, supports=lambda d: d.type == "cuda"))
    try:
        before = lnorm.get_backend("cpu")
        assert main(["bench", "ops", "--backend", "cudaonly_test"]) == 2
        assert "--backend cudaonly_test does not run on --device cpu here" in capsys.readouterr().err
        assert lnorm.get_backend("cpu") == before  # nothing left set
    finally:
        B.unregister_backend("cudaonly_test")


@pytest.mark.skipif(not numba_available(), reason="numba is not importable")
@pytest.mark.parametrize("impl", ["mkl", "onednn"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_lstm_float32_backward_in_runs_with_each_library_as_accurate_as_mm(monkeypatch, impl, packed):
    # the weight gradients summed over several runs of rows (WeightGrad) and the input gradient per
    # run, with a library forced, in float32 against the float64 torch path: within twice the error
    # of the same layer with every product by torch.mm (the path before the libraries could be
    # chosen; its own float32 accuracy is the parity tests' business). The run-length tests above
    # are float64, where only torch.mm runs.
    from lnorm.ops import rnn_fused, step_gemm

    if impl not in step_gemm.available(torch.float32):
        pytest.skip(f"{impl} is not available here")
    monkeypatch.setattr(rnn_fused, "_CHUNK_ROWS", 9)
    torch.manual_seed(0)
    m32 = make("lstm", 5, 6, num_layers=2, bidirectional=True)
    with torch.no_grad():
        for name, p in m32.named_parameters():
            if name.startswith("ln_"):
                p.add_(0.3 * torch.randn_like(p))
    m64 = copy.deepcopy(m32).double()
    x = torch.randn(7, 4, 5)

    def run(m, xx, backend, forced=None):
        xx = xx.detach().clone().requires_grad_()
        inp = pack_padded_sequence(xx, torch.tensor([7, 3, 5, 1]), enforce_sorted=False) if packed else xx
        with lnorm.use_backend(backend), step_gemm.use_step_gemm(forced):
            res = m(inp)
            return [data(res[0])] + list(grads(loss_of("lstm", res), [xx, *m.parameters()]))

    ours = run(m32, x, "numba", impl)
    with_mm = run(m32, x, "numba", "mm")
    ref = run(m64, x.double(), "torch")
    names = ["output", "grad x"] + [f"grad {n}" for n, _ in m32.named_parameters()]
    for a, r, b, n in zip(ours, ref, with_mm, names, strict=True):
        assert_three_way(a, r, b, atol=1e-6, name=f"{impl} (against mm): {n}")
