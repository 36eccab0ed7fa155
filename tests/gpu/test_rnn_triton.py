"""The fused GPU recurrence of LayerNormLSTM / LayerNormGRU (``lnorm.ops._triton_rnn``): outputs,
final states and every gradient (input, initial states, all weights, the LN gains and biases)
against the pure-torch path in float32 and against the float64 pure-torch path, odd hidden sizes
(masked lanes), two bidirectional layers, packed sequences of unequal lengths, bfloat16 autocast;
and where the route does not apply (transforms, export, compile).

Runs on CPU tensors under Triton's interpreter and on CUDA tensors with the compiled kernels (see
``conftest.py``); every comparison asserts the fused autograd Functions really ran. Shapes are
small: the interpreter runs each program in numpy.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import lnorm
from tolerances import TOL, assert_close, assert_three_way

pytest.importorskip("triton", reason="triton is not installed (pip install lnorm[gpu]): the Triton kernels are not tested")

from lnorm.ops import _triton_rnn  # noqa: E402

KINDS = {"lstm": lnorm.LayerNormLSTM, "gru": lnorm.LayerNormGRU}


@pytest.fixture
def fused_calls(monkeypatch):
    """How many directions the fused GPU recurrence computed."""
    seen = {"n": 0}
    original = _triton_rnn.recurrence

    def counted(*args):
        seen["n"] += 1
        return original(*args)

    monkeypatch.setattr(_triton_rnn, "recurrence", counted)
    return seen


def make(kind: str, device, I=3, H=5, **kw):
    """A layer with its LN gains and biases moved off their identity initialisation (so a mixed-up
    gain or bias shows), in float32 on ``device``."""
    torch.manual_seed(0)
    m = KINDS[kind](I, H, **kw)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith("ln_"):
                p.add_(0.3 * torch.randn_like(p))
    return m.to(device)


def run(m, kind: str, x, hx, lengths, backend: str, autocast_dtype=None) -> list[torch.Tensor]:
    """Output, final states, then the gradients of x, the initial states and every parameter of a
    loss that weighs each output and state element differently."""
    inp = x
    if lengths is not None:
        inp = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
    leaves = [x, *(hx if kind == "lstm" else (hx,)), *m.parameters()]
    with lnorm.use_backend(backend), torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16,
                                                     enabled=autocast_dtype is not None):
        out, state = m(inp, hx)
        out = out.data if lengths is not None else out
        states = list(state) if kind == "lstm" else [state]
        g = torch.Generator().manual_seed(1)
        loss = sum((t.float() * torch.randn(t.shape, generator=g, dtype=torch.float64).to(t)).sum()
                   for t in [out, *states])
    grads = torch.autograd.grad(loss, leaves)
    return [out, *states, *grads]


def names(m, kind: str) -> list[str]:
    st = ["h_n", "c_n"] if kind == "lstm" else ["h_n"]
    init = ["grad h_0", "grad c_0"] if kind == "lstm" else ["grad h_0"]
    return ["output", *st, "grad x", *init, *[f"grad {n}" for n, _ in m.named_parameters()]]


def inputs(kind: str, device, T, B, I, H, L, dtype=torch.float32):
    torch.manual_seed(2)
    x = torch.randn(T, B, I, dtype=dtype, device=device, requires_grad=True)
    h0 = torch.randn(L, B, H, dtype=dtype, device=device, requires_grad=True)
    hx = (h0, torch.randn(L, B, H, dtype=dtype, device=device, requires_grad=True)) if kind == "lstm" else h0
    return x, hx


def as_float64(x, hx):
    d = lambda t: t.detach().double().requires_grad_()  # noqa: E731
    return d(x), tuple(d(t) for t in hx) if isinstance(hx, tuple) else d(hx)


# name: (T, B, I, H, layer kwargs, lengths)
CASES = {
    "1-layer-H5": (4, 3, 3, 5, {}, None),
    "2-layers-bidirectional-H3": (3, 2, 2, 3, {"num_layers": 2, "bidirectional": True}, None),
    "packed-bidirectional-H6": (4, 3, 3, 6, {"bidirectional": True}, [4, 1, 3]),
    "packed-no-bias-H1": (3, 3, 2, 1, {"bias": False}, [2, 3, 1]),
}


@pytest.fixture
def torch_loop(monkeypatch):
    """Run the layers' pure-torch loop on the triton backend (so with the same Triton norm
    kernels the fused path uses for the input projection): call with a function of no arguments."""
    import lnorm.nn.rnn as layers

    def call(fn):
        with monkeypatch.context() as mp:
            mp.setattr(layers, "fused_applies", lambda *args: False)
            return fn()

    return call


def check(ours, torch_loop, ref64, names, low=None):
    """Every tensor against the layers' pure-torch loop on the same backend in the same precision
    (the table's float32 tolerance; for ``low``-precision autocast runs only the next check) and
    against float64, where its error may be at most twice the pure-torch loop's, plus the table's
    slack. Over a few steps the recurrence amplifies float32's rounding to a few 1e-6 of a
    tensor's scale on either path, so float64 alone cannot be the yardstick: which float32 path
    lands closer to it is chance (on these cases the pure-torch loop with torch's own norm
    kernels, the torch backend, happens to be closer than with the Triton norm kernels)."""
    for a, loop, r, n in zip(ours, torch_loop, ref64, names, strict=True):
        assert a.dtype == loop.dtype == torch.float32, n  # outputs and gradients in float32 as on the torch path
        if low is None:
            assert_close(a, loop, name=f"{n} vs the pure-torch loop")
        assert_three_way(a, r, loop, dtype=low, name=f"{n} vs float64")


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("kind", KINDS)
def test_matches_torch_path_and_float64(triton_device, fused_calls, torch_loop, kind, case):
    T, B, I, H, kw, lengths = case
    m = make(kind, triton_device, I, H, **kw)
    L = kw.get("num_layers", 1) * (2 if kw.get("bidirectional") else 1)
    x, hx = inputs(kind, triton_device, T, B, I, H, L)
    ours = run(m, kind, x, hx, lengths, "triton")
    assert fused_calls["n"] == L, "the fused GPU recurrence did not run for every direction"
    loop32 = torch_loop(lambda: run(m, kind, x, hx, lengths, "triton"))
    ref64 = run(copy.deepcopy(m).double(), kind, *as_float64(x, hx), lengths, "torch")
    assert fused_calls["n"] == L
    check(ours, loop32, ref64, names(m, kind))


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_autocast(triton_device, fused_calls, torch_loop, kind):
    # Under autocast the GEMMs run in bfloat16 on both paths (W_ih x, then h W_hh^T and its
    # gradient GEMMs per step) and everything else in float32 (the fused path also keeps the
    # recurrent LN's output and its gradient in float32, where the pure-torch loop rounds them to
    # bfloat16). The pure-torch loop under the same autocast is the yardstick: its error against
    # float64 (about 1e-2 of a tensor's scale here) is what bfloat16 GEMMs cost over these steps;
    # ours may be at most twice that, plus 2**-10 of the tensor's scale (the table's slack).
    # Which of the two lands closer to float64 on one tensor is chance (ours is closer on
    # average: the geometric mean of the RMS-error ratio over four seeds of this LSTM is 0.86), so
    # the case is a single layer of H=16, not a tiny ill-conditioned one.
    T, B, I, H, lengths = 4, 4, 4, 16, [4, 2, 3, 4]
    m = make(kind, triton_device, I, H, bidirectional=True)
    x, hx = inputs(kind, triton_device, T, B, I, H, 2)
    ours = run(m, kind, x, hx, lengths, "triton", autocast_dtype=torch.bfloat16)
    assert fused_calls["n"] == 2
    loop = torch_loop(lambda: run(m, kind, x, hx, lengths, "triton", autocast_dtype=torch.bfloat16))
    ref64 = run(copy.deepcopy(m).double(), kind, *as_float64(x, hx), lengths, "torch")
    check(ours, loop, ref64, names(m, kind), low=torch.bfloat16)
    # and bfloat16 really ran: our result differs from the float32 one by bfloat16's rounding
    full = run(m, kind, x, hx, lengths, "triton")
    assert (ours[0] - full[0]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_inference_equals_training_forward(triton_device, fused_calls, kind):
    # without gradients the kernels save nothing for backward: the same numbers
    m = make(kind, triton_device, 3, 5)
    x, _ = inputs(kind, triton_device, 4, 2, 3, 5, 1)
    with lnorm.use_backend("triton"):
        trained = m(x)[0]
        with torch.no_grad():
            inferred = m(x)[0]
    assert fused_calls["n"] == 2
    assert torch.equal(trained.detach(), inferred)


@pytest.mark.parametrize("kind", KINDS)
def test_second_derivative_raises_naming_the_torch_backend(triton_device, fused_calls, kind):
    m = make(kind, triton_device, 3, 4)
    x, _ = inputs(kind, triton_device, 3, 2, 3, 4, 1)
    with lnorm.use_backend("triton"):
        (g,) = torch.autograd.grad(m(x)[0].square().sum(), x, create_graph=True)
        assert fused_calls["n"] == 1
        with pytest.raises(RuntimeError, match=r'lnorm\.use_backend\("torch"\)'):
            g.square().sum().backward()


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy, in the interpreter
def test_rows_whose_squares_overflow_are_normalized(triton_device, fused_calls):
    # W_hh h of about 1e20: its squares overflow float32; the recurrent LN still normalizes the
    # row (the float64 path's result), where a plain variance would give rstd 0, a zeroed row
    m = make("lstm", triton_device, 3, 5)
    with torch.no_grad():
        m.weight_hh_l0.mul_(1e20)
    x, (h0, c0) = inputs("lstm", triton_device, 3, 2, 3, 5, 1)
    with lnorm.use_backend("triton"):
        out = m(x, (h0, c0))[0]
    assert fused_calls["n"] == 1
    with lnorm.use_backend("torch"):
        ref = copy.deepcopy(m).double()(*as_float64(x, (h0, c0)))[0]
    assert_close(out, ref, atol=1e-5, rtol=1e-4, name="output")


@pytest.mark.parametrize("kind", KINDS)
def test_nan_propagates_as_on_the_torch_path(triton_device, fused_calls, torch_loop, kind):
    # a NaN in one sequence's input: NaN where the pure-torch loop has NaN (that sequence, and
    # through the shared weights' gradients), finite where it is finite
    m = make(kind, triton_device, 3, 4)
    x, hx = inputs(kind, triton_device, 3, 2, 3, 4, 1)
    with torch.no_grad():
        x[1, 0, 2] = float("nan")
    ours = run(m, kind, x, hx, None, "triton")
    assert fused_calls["n"] == 1
    loop = torch_loop(lambda: run(m, kind, x, hx, None, "triton"))
    for a, t, n in zip(ours, loop, names(m, kind), strict=True):
        assert torch.equal(a.isnan(), t.isnan()), n
        assert torch.isfinite(a[~t.isnan()]).all(), n
    out = ours[0]
    assert out[1:, 0].isnan().all() and torch.isfinite(out[0, 0]).all() and torch.isfinite(out[:, 1]).all()


@pytest.mark.parametrize("transform", ["vmap", "grad", "export", "compile"])
def test_transforms_keep_the_pure_torch_path(triton_device, fused_calls, transform):
    # torch.func and export see through the pure-torch loop, not through the fused Function;
    # torch.compile compiles that loop too (the route has no torch.library op)
    m = make("gru", triton_device, 3, 4)
    x, _ = inputs("gru", triton_device, 3, 2, 3, 4, 1)
    x = x.detach()
    with lnorm.use_backend("torch"):
        expected = m(x)[0]
    with lnorm.use_backend("triton"):
        if transform == "vmap":
            got = torch.func.vmap(lambda xi: m(xi)[0], in_dims=1, out_dims=1)(x)
        elif transform == "grad":
            got = m(x)[0]
            torch.func.grad(lambda xi: m(xi)[0].sum())(x)
            assert fused_calls["n"] == 1  # the plain call above
            fused_calls["n"] = 0
        elif transform == "export":
            got = torch.export.export(m, (x,)).module()(x)[0]
        else:
            got = torch.compile(m, backend="eager", fullgraph=True)(x)[0]
    assert fused_calls["n"] == 0, f"the fused recurrence ran under {transform}"
    assert_close(got, expected, **{k: 10 * v for k, v in TOL[torch.float32].items() if k in ("atol", "rtol")},
                 name=transform)


def test_mixed_devices_and_shapes_raise_naming_the_tensor(triton_device):
    m = make("lstm", triton_device, 3, 4)
    from lnorm.ops.rnn_weights import RecurrentWeights

    args = [m.weight_ih_l0, m.weight_hh_l0, m.bias_ih_l0, m.bias_hh_l0, m.ln_ih_weight_l0, m.ln_ih_bias_l0,
            m.ln_hh_weight_l0, m.ln_hh_bias_l0, m.ln_cell_weight_l0, m.ln_cell_bias_l0]
    x, h0 = torch.randn(6, 3, device=triton_device), torch.zeros(2, 4, device=triton_device)
    moved = args.copy()
    moved[1] = moved[1].to("meta")
    with pytest.raises(ValueError, match="weight_hh is a torch.float32 tensor on meta"):
        _triton_rnn.check_shapes(x, h0, h0, RecurrentWeights("LSTM", *moved, 1e-5), [2, 2, 2])
    with pytest.raises(ValueError, match=r"input rows must have shape \[5, 3\]"):
        _triton_rnn.check_shapes(x, h0, h0, RecurrentWeights("LSTM", *args, 1e-5), [2, 2, 1])
    with pytest.raises(ValueError, match=r"c_0 must have shape \[2, 4\]"):
        _triton_rnn.check_shapes(x, h0, h0[:, :3], RecurrentWeights("LSTM", *args, 1e-5), [2, 2, 2])


def test_what_the_route_leaves_to_torch(triton_device, fused_calls, monkeypatch):
    # float64, the options the kernels do not cover, and a hidden size past MAX_HIDDEN
    x = torch.randn(2, 1, 3, device=triton_device)
    with lnorm.use_backend("triton"):
        make("lstm", triton_device, 3, 2).double()(x.double())
        make("lstm", triton_device, 3, 2, zoneout=0.1).eval()(x)
        make("lstm", triton_device, 3, 2, proj_size=1)(x)
        make("gru", triton_device, 3, 2, layer_norm=False)(x)
        assert fused_calls["n"] == 0
        make("gru", triton_device, 3, 2)(x)
        assert fused_calls["n"] == 1
        monkeypatch.setattr(_triton_rnn, "MAX_HIDDEN", 1)
        make("gru", triton_device, 3, 2)(x)
        assert fused_calls["n"] == 1


@pytest.mark.parametrize("layout", ["expanded", "transposed"])
@pytest.mark.parametrize("kind", KINDS)
def test_strided_initial_states(triton_device, fused_calls, torch_loop, kind, layout):
    # The backward kernels read h0 / c0 by row * H: a learnable initial state expanded over the
    # batch, or an hx stored (batch, layers, H) and transposed, gave wrong gradients of the
    # initial states and of W_hh (the outputs were right)
    T, B, I, H = 3, 3, 3, 4
    bidir = layout == "transposed"
    m = make(kind, triton_device, I, H, bidirectional=bidir)
    L = 2 if bidir else 1
    torch.manual_seed(3)
    shape = (1, 1, H) if layout == "expanded" else (B, L, H)
    base = [torch.randn(shape, device=triton_device, requires_grad=True) for _ in range(2 if kind == "lstm" else 1)]
    x = torch.randn(T, B, I, device=triton_device, requires_grad=True)

    def go():
        states = [b.expand(L, B, H) if layout == "expanded" else b.transpose(0, 1) for b in base]
        assert not states[0].is_contiguous()
        with lnorm.use_backend("triton"):
            out, st = m(x, tuple(states) if kind == "lstm" else states[0])
        sts = list(st) if kind == "lstm" else [st]
        g = torch.Generator().manual_seed(1)
        loss = sum((t * torch.randn(t.shape, generator=g).to(t)).sum() for t in [out, *sts])
        return [out, *sts, *torch.autograd.grad(loss, [x, *base, *m.parameters()])]

    ours = go()
    assert fused_calls["n"] == L
    loop = torch_loop(go)
    labels = ["output", *(["h_n", "c_n"] if kind == "lstm" else ["h_n"]), "grad x",
              *[f"grad state {i}" for i in range(len(base))], *[f"grad {n}" for n, _ in m.named_parameters()]]
    for a, b, n in zip(ours, loop, labels, strict=True):
        assert_close(a, b, name=f"{n} vs the pure-torch loop")
