"""``torch.compile`` of LayerNormLSTM / LayerNormGRU: the fused recurrence as opaque custom ops.

Under ``torch.compile`` each direction of a layer is one ``torch.ops.lnorm.lstm_recurrence`` /
``gru_recurrence`` call (fake implementation, registered autograd whose backward is the
``*_backward`` op), so the compiler does not unroll the time loop and the compiled model runs the
same kernels as eager. These tests check the ops (opcheck), that the compiled graph holds them
instead of an unrolled loop, and that compiled outputs and gradients match eager.
"""

from __future__ import annotations

import pytest
import torch

import lnorm
from lnorm.ops.backend import numba_available
from tolerances import assert_close

pytestmark = [
    pytest.mark.skipif(not numba_available(), reason="the fused path needs numba"),
    # opcheck and torch.compile go through torch internals that still call torch.jit.script_method
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated"),
]

D64 = torch.float64


@pytest.fixture(autouse=True)
def fresh_dynamo():
    # the layers' forward is one code object for every test of the suite that compiles them:
    # start from an empty cache so earlier tests' graphs do not count against the recompile limit
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


LAYERS = {"lstm": lnorm.LayerNormLSTM, "gru": lnorm.LayerNormGRU}


def _ops():
    from lnorm.ops import rnn_fused  # noqa: F401  (registers torch.ops.lnorm.*_recurrence)

    return torch.ops.lnorm


def _make(kind, *args, dtype=D64, **kw):
    m = LAYERS[kind](*args, dtype=dtype, **kw)
    with torch.no_grad():  # non-trivial LN parameters, so a swapped or ignored one shows
        for name, p in m.named_parameters():
            if name.startswith("ln_"):
                p.add_(0.3 * torch.randn_like(p))
    return m


def _leaves(res) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(res) if t is not None]


def _loss(res):
    # weights so every element of every output matters differently
    total = 0
    for t in _leaves(res):
        total = total + (t * torch.linspace(-1, 1, t.numel(), dtype=t.dtype).reshape(t.shape)).sum()
    return total


# ------------------------------------------------------------------------------------ opcheck


def _t(*shape, grad=True):
    return torch.randn(*shape, dtype=D64).requires_grad_(grad)


def _lstm_args(batch_sizes, reverse, save=True, I=3, H=2):
    N, B, G = sum(batch_sizes), batch_sizes[0], 4 * H
    tensors = [_t(N, I), _t(G, I), _t(B, H), _t(B, H), _t(G, H), _t(G), _t(G), _t(G), _t(H), _t(H)]
    return (*tensors, batch_sizes, reverse, 1e-5, save)


def _gru_args(batch_sizes, reverse, save=True, H=2):
    N, B = sum(batch_sizes), batch_sizes[0]
    tensors = [_t(N, 2 * H), _t(N, H), _t(B, H), _t(3 * H, H), _t(3 * H), _t(3 * H), _t(H)]
    return (*tensors, batch_sizes, reverse, 1e-5, save)


CASES = {"full": ([2, 2, 2], False), "packed-reverse": ([3, 2, 1], True)}


@pytest.mark.parametrize("save", [True, False], ids=["save", "no-save"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_opcheck_recurrence(kind, case, save):
    # save=False (inference, inputs without gradients) too: its extra outputs are scratch whose
    # shapes the fake must give (regression: the LSTM's real op returned B-row buffers where its
    # fake said 0 rows)
    op = _ops().lstm_recurrence if kind == "lstm" else _ops().gru_recurrence
    args = (_lstm_args if kind == "lstm" else _gru_args)(*CASES[case], save=save)
    if not save:
        args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    result = torch.library.opcheck(op.default, args)
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_backward_of_an_unsaved_forward_is_a_clear_error(kind):
    # regression: backward through the op run with save=False read its B-row (GRU) or 0-row (LSTM)
    # scratch as the N rows of saved state: a segfault or garbage gradients
    op = _ops().lstm_recurrence if kind == "lstm" else _ops().gru_recurrence
    args = (_lstm_args if kind == "lstm" else _gru_args)([3, 2, 1], False, save=False)
    out = op(*args)[0]
    with pytest.raises(RuntimeError, match="save=False"):
        out.sum().backward()


@pytest.mark.parametrize("bad", ["ghat", "batch_sizes"])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_backward_op_checks_the_shapes_it_trusts(kind, bad):
    # the backward ops called directly with what an unsaved forward returned (too few rows of
    # saved state), or with batch sizes that increase (rows the initial state does not have): a
    # ValueError naming it, before any kernel reads past the end of a tensor
    op, args = _backward_args(kind, [3, 2, 1], False)
    args = list(args)
    if bad == "ghat":
        i = 3 + 12 if kind == "lstm" else 2 + 4  # after the output gradients and 12 (4) saved tensors
        args[i] = args[i][:1]
    else:
        i = 3 + 15 if kind == "lstm" else 2 + 7
        assert args[i] == [3, 2, 1]
        args[i] = [1, 2, 3]
    with pytest.raises(ValueError, match=f"{bad} must"):
        op(*args)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("bad", ["batch_sizes", "h0", "w_hh", "dtype"])
def test_ops_check_their_inputs(kind, bad):
    # the layers check their inputs before the ops; a direct call of an op gets the same
    # treatment instead of kernels reading past the end of a tensor
    make = _lstm_args if kind == "lstm" else _gru_args
    args = list(make([3, 2, 1], False, save=False))
    n = 10 if kind == "lstm" else 7
    if bad == "batch_sizes":
        args[n] = [1, 2, 3]  # increasing: not a packed sequence
    elif bad == "h0":
        args[2] = args[2][:, :1]
    elif bad == "dtype":  # a float32 parameter beside float64 data: one dtype for all
        args[5] = args[5].float()
    else:
        args[3 if kind == "gru" else 4] = args[3 if kind == "gru" else 4][1:]
    op = _ops().lstm_recurrence if kind == "lstm" else _ops().gru_recurrence
    with pytest.raises(ValueError, match="one dtype" if bad == "dtype" else bad):
        op(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])


def _backward_args(kind, batch_sizes, reverse):
    # the backward op's arguments: output gradients, then what the forward op saved, as the op's
    # registered autograd passes them
    ops = _ops()
    args = (_lstm_args if kind == "lstm" else _gru_args)(batch_sizes, reverse)
    n = 10 if kind == "lstm" else 7
    tensors = [t.detach() for t in args[:n]]
    res = (ops.lstm_recurrence if kind == "lstm" else ops.gru_recurrence)(*tensors, *args[n:])
    grads = [torch.randn_like(t) for t in res[: 3 if kind == "lstm" else 2]]
    if kind == "lstm":
        x, w_ih, h0, c0, w_hh, g0, g1, b1, g3, b3 = tensors
        out, _, _, px, ghat, c_all, stat = res
        saved = (x, w_ih, px, h0, c0, w_hh, g0, g1, b1, g3, b3, out, ghat, c_all, stat)
        return ops.lstm_recurrence_backward, (*grads, *saved, batch_sizes, reverse, True, True, True)
    _, _, h0, w_hh, g1, _, _ = tensors
    out, _, ghat, act, stat = res
    return ops.gru_recurrence_backward, (*grads, h0, w_hh, g1, out, ghat, act, stat, batch_sizes, reverse, True)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_opcheck_recurrence_backward(kind, case):
    # regression: the backward ops returned views of one buffer of LN-parameter sums; a clone keyed
    # on ``_base`` missed them under a dispatch mode (opcheck's schema test, FlopCounterMode)
    op, args = _backward_args(kind, *CASES[case])
    result = torch.library.opcheck(op.default, args)
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_compiled_backward_runs_under_a_dispatch_mode(kind):
    # the same regression as a user meets it: counting the flops of a compiled layer's backward
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    m = _make(kind, 3, 4)
    x = torch.randn(5, 2, 3, dtype=D64, requires_grad=True)
    y = _loss(torch.compile(m, backend="aot_eager")(x))
    with FlopCounterMode(display=False):
        y.backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in m.parameters()]
    x.grad = None
    m.zero_grad()
    _loss(m(x)).backward()  # eager
    for got, want in zip(grads, [x.grad] + [p.grad for p in m.parameters()], strict=True):
        assert_close(got, want, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_gradcheck_recurrence_op(kind):
    # the op's registered autograd (its backward op) against finite differences
    op = _ops().lstm_recurrence if kind == "lstm" else _ops().gru_recurrence
    args = (_lstm_args if kind == "lstm" else _gru_args)([3, 2, 2], True)
    n = 10 if kind == "lstm" else 7
    tensors, rest = args[:n], args[n:]

    def fn(*ts):
        res = op(*ts, *rest)
        return res[:3] if kind == "lstm" else res[:2]

    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-5)


# ----------------------------------------------------------------------- the compiled graph


class _Recorder:
    """A torch.compile backend that keeps the graphs it is given and runs them as they are."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    def targets(self) -> list[str]:
        return [str(n.target) for gm in self.graphs for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_compiled_graph_calls_the_fused_op(kind):
    # one op per direction and layer, not T unrolled steps of sigmoid/tanh/layer norm
    m = _make(kind, 3, 4, num_layers=2, bidirectional=True)
    rec = _Recorder()
    res = torch.compile(m, backend=rec, fullgraph=True)(torch.randn(7, 2, 3, dtype=D64))
    targets = rec.targets()
    assert sum(f"lnorm.{kind}_recurrence" in t for t in targets) == 4, targets
    assert not any("sigmoid" in t or "tanh" in t for t in targets), targets
    assert len(_leaves(res)) == (3 if kind == "lstm" else 2)


# --------------------------------------------------------------------- compiled matches eager


def _compare(m, compiled, x, hx=None, name=""):
    args = (x,) if hx is None else (x, hx)
    res = m(*args)
    xc = x.detach().clone().requires_grad_(x.requires_grad)
    res_c = compiled(xc) if hx is None else compiled(xc, hx)
    for i, (a, e) in enumerate(zip(_leaves(res_c), _leaves(res), strict=True)):
        assert_close(a, e, name=f"{name} output {i}")
    if not x.requires_grad:
        return
    wrt = [x, *m.parameters()]
    g = torch.autograd.grad(_loss(res), wrt)
    g_c = torch.autograd.grad(_loss(res_c), [xc, *m.parameters()])
    names = ["input"] + [n for n, _ in m.named_parameters()]
    for n, a, e in zip(names, g_c, g, strict=True):
        assert_close(a, e, name=f"{name} grad of {n}")


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_compiled_matches_eager_aot(kind):
    # aot_eager: AOTAutograd traces forward and backward through the ops' fake implementations
    m = _make(kind, 3, 4, num_layers=2, bidirectional=True, batch_first=True)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 5, 3, dtype=D64, requires_grad=True)
    _compare(m, compiled, x, name="train")
    h0 = torch.randn(4, 2, 4, dtype=D64)
    hx = (h0, torch.randn(4, 2, 4, dtype=D64)) if kind == "lstm" else h0
    _compare(m, compiled, x, hx, name="with hx")
    with torch.no_grad():  # inference: the ops keep no per-step state for backward
        _compare(m, compiled, torch.randn(2, 6, 3, dtype=D64), name="no_grad")


@pytest.mark.slow
def test_compiled_lstm_inductor_matches_eager():
    # the default backend, float32 and the shapes changing as in training with a last short batch
    m = _make("lstm", 8, 16, num_layers=2, dtype=torch.float32)
    compiled = torch.compile(m)
    for T, B in [(6, 4), (6, 3), (9, 4)]:
        _compare(m, compiled, torch.randn(T, B, 8, requires_grad=True), name=f"T={T} B={B}")
