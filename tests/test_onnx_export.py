"""``torch.onnx.export(..., dynamo=True)`` of every module, run in onnxruntime against eager.

Under ``torch.export`` the norms are written in standard aten ops (``lnorm.ops.export``) and the
recurrent layers take their pure-torch path, so the ONNX graph holds standard operators only:
``LayerNormalization`` for layer norms, ``RMSNormalization`` at opset 23 (a decomposition below).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

import lnorm
from lnorm.ops.backend import numba_available
from tolerances import assert_close

BACKENDS = ["numba", "torch"] if numba_available() else ["torch"]

# the exporter's own deprecation and progress chatter is not what these tests are about
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


def _export(model, args, opset=None, **kwargs):
    model.eval()
    return torch.onnx.export(model, args, dynamo=True, verbose=False, opset_version=opset, **kwargs)


def _run(program, args) -> list[torch.Tensor]:
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args, strict=True)}
    return [torch.from_numpy(np.asarray(o)) for o in session.run(None, feeds)]


def _op_types(program) -> set[str]:
    graph = program.model_proto.graph
    assert all(n.domain in ("", "ai.onnx") for n in graph.node), (
        f"non-standard ops: {sorted({(n.domain, n.op_type) for n in graph.node if n.domain not in ('', 'ai.onnx')})}"
    )
    return {n.op_type for n in graph.node}


def _check_against_eager(model, args, got: list[torch.Tensor], name: str) -> None:
    with torch.no_grad():
        want = torch.utils._pytree.tree_leaves(model(*args))
    assert len(got) == len(want), f"{name}: {len(got)} outputs, eager has {len(want)}"
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert_close(g, w, name=f"{name} output {i}")


def _perturbed(model):
    # non-trivial norm parameters, so a dropped or misplaced weight/bias shows
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


# ---------------------------------------------------------------------------------- norms

NORMS = {
    # name: (module factory, input shapes, ONNX op at opset 18, at opset 23)
    "layer-768": (lambda: lnorm.LayerNorm(768), [(2, 3, 768)], "LayerNormalization", "LayerNormalization"),
    "layer-7": (lambda: lnorm.LayerNorm(7), [(5, 7)], "LayerNormalization", "LayerNormalization"),
    "layer-2d-shape": (lambda: lnorm.LayerNorm((3, 5)), [(4, 3, 5)], "LayerNormalization", "LayerNormalization"),
    "layer-no-affine": (lambda: lnorm.LayerNorm(16, elementwise_affine=False), [(3, 16)], "LayerNormalization", "LayerNormalization"),
    "rms-64": (lambda: lnorm.RMSNorm(64, eps=1e-6), [(2, 3, 64)], "ReduceMean", "RMSNormalization"),
    "rms-default-eps": (lambda: lnorm.RMSNorm(5), [(4, 5)], "ReduceMean", "RMSNormalization"),
    "rms-no-affine": (lambda: lnorm.RMSNorm(9, elementwise_affine=False), [(4, 9)], "ReduceMean", "RMSNormalization"),
    "add-layer": (lambda: lnorm.AddLayerNorm(48), [(2, 3, 48), (2, 3, 48)], "LayerNormalization", "LayerNormalization"),
    "add-layer-first": (lambda: lnorm.AddLayerNorm(48), [(2, 3, 48)], "LayerNormalization", "LayerNormalization"),
    "add-layer-small": (lambda: lnorm.AddLayerNorm(6), [(4, 6), (4, 6)], "LayerNormalization", "LayerNormalization"),
    "add-rms": (lambda: lnorm.AddRMSNorm(40, eps=1e-5), [(2, 3, 40), (2, 3, 40)], "ReduceMean", "RMSNormalization"),
    "add-rms-first": (lambda: lnorm.AddRMSNorm(40), [(3, 40)], "ReduceMean", "RMSNormalization"),
}


@pytest.mark.parametrize("opset", [18, 23])
@pytest.mark.parametrize("case", list(NORMS))
def test_norm_onnx_matches_eager(case, opset):
    make, shapes, op18, op23 = NORMS[case]
    model = _perturbed(make())
    args = tuple(torch.randn(*s) for s in shapes)
    program = _export(model, args, opset)
    _check_against_eager(model, args, _run(program, args), case)
    ops = _op_types(program)
    assert (op18 if opset < 23 else op23) in ops, f"{case}: {sorted(ops)}"


def test_norm_onnx_dynamic_batch():
    # one exported graph serves other batch sizes and sequence lengths
    model = _perturbed(lnorm.AddRMSNorm(32))
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    x, r = torch.randn(2, 3, 32), torch.randn(2, 3, 32)
    program = _export(model, (x, r), 23, dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}))
    for shape in [(5, 7, 32), (1, 1, 32)]:
        args = (torch.randn(*shape), torch.randn(*shape))
        _check_against_eager(model, args, _run(program, args), f"shape {shape}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_export_holds_standard_ops_only(backend):
    # the exported program is portable (loads without lnorm): no lnorm custom op in it
    with lnorm.use_backend(backend):
        model = _perturbed(torch.nn.Sequential(lnorm.RMSNorm(8), lnorm.LayerNorm(8)))
        program = torch.export.export(model.eval(), (torch.randn(3, 8),))
        targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
        assert not any("lnorm" in t for t in targets), targets
        x = torch.randn(3, 8)
        assert_close(program.module()(x), model(x), name="exported program")


# ------------------------------------------------------------------------------ recurrent

RNNS = {
    "lstm": lambda **kw: lnorm.LayerNormLSTM(3, 5, **kw),
    "gru": lambda **kw: lnorm.LayerNormGRU(3, 5, **kw),
    "rnn_relu": lambda **kw: lnorm.LayerNormRNN(3, 5, nonlinearity="relu", **kw),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(RNNS))
def test_rnn_onnx_matches_eager(kind):
    # 2 layers, bidirectional, batch_first, an initial state: every part of the layer's forward
    model = _perturbed(RNNS[kind](num_layers=2, bidirectional=True, batch_first=True))
    x = torch.randn(2, 4, 3)
    h0 = torch.randn(4, 2, 5)
    args = (x, (h0, torch.randn(4, 2, 5))) if kind == "lstm" else (x, h0)
    program = _export(model, args)
    flat = torch.utils._pytree.tree_leaves(args)
    _check_against_eager(model, args, _run(program, flat), kind)
    assert "LayerNormalization" in _op_types(program)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_rnn_onnx_dynamic_batch(kind):
    # the case a user exports first: one layer, no initial state; the batch stays dynamic
    model = _perturbed(RNNS[kind]())
    program = _export(model, (torch.randn(3, 2, 3),), dynamic_shapes=({1: torch.export.Dim("batch")},))
    for batch in (2, 1, 5):
        args = (torch.randn(3, batch, 3),)
        _check_against_eager(model, args, _run(program, args), f"{kind} batch {batch}")
    assert "LayerNormalization" in _op_types(program)
