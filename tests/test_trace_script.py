"""torch.jit.trace (grad on and off), torch.jit.script and the legacy ONNX exporter on the norm
modules, as ``nn.LayerNorm`` allows, matched against eager on new inputs.

Under tracing the ops take the pure-torch path (``lnorm.ops.guards``); scripted modules compile
to torch's own ops. The recurrent layers' behaviour is in tests/nn/test_rnn_transforms.py.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch

import lnorm
from tolerances import assert_close

MODULES = {
    # 8 features: below the 32 from which a plain layer norm calls torch's kernel; 64 above
    "LayerNorm8": lambda: lnorm.LayerNorm(8),
    "LayerNorm64": lambda: lnorm.LayerNorm(64),
    "LayerNorm-2d": lambda: lnorm.LayerNorm((4, 8)),
    "RMSNorm64": lambda: lnorm.RMSNorm(64),
    "RMSNorm8-eps": lambda: lnorm.RMSNorm(8, eps=1e-3),
    "AddLayerNorm64": lambda: lnorm.AddLayerNorm(64),
    "AddRMSNorm8": lambda: lnorm.AddRMSNorm(8),
    "AddLayerNorm8-fp32": lambda: lnorm.AddLayerNorm(8, residual_in_fp32=True),
}


def _module(name):
    m = MODULES[name]()
    with torch.no_grad():  # parameters away from the identity, so that dropping them would show
        for p in m.parameters():
            p.add_(torch.randn_like(p))
    return m


def _args(name, m, batch, with_residual=True):
    shape = (batch, 3, *m.normalized_shape)
    x = torch.randn(shape)
    if name.startswith("Add") and with_residual:
        return (x, torch.randn(shape))
    return (x,)


def _outputs(result):
    return result if isinstance(result, tuple) else (result,)


def _check(got, want, what):
    for i, (a, b) in enumerate(zip(_outputs(got), _outputs(want), strict=True)):
        assert a.dtype == b.dtype, f"{what} output {i}: dtype {a.dtype} != {b.dtype}"
        assert_close(a, b, dtype=torch.float32, name=f"{what} output {i}")


@pytest.mark.parametrize("grad_mode", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("name", MODULES)
def test_trace_matches_eager_on_new_inputs(backend, name, grad_mode):
    # Regression: traced under no_grad the Numba call was recorded as a constant (the trace's
    # output ignored its input, 3.8 off for RMSNorm); traced with grad on, the trace failed its
    # own sanity check ("Graphs differed across invocations")
    m = _module(name)
    with torch.set_grad_enabled(grad_mode):
        traced = torch.jit.trace(m, _args(name, m, 2))
    new = _args(name, m, 2)
    with torch.no_grad():
        _check(traced(*new), m(*new), f"traced {name}")


@pytest.mark.parametrize("name", ["LayerNorm8", "RMSNorm64", "AddLayerNorm64", "AddRMSNorm8"])
def test_trace_gradients_match_eager(backend, name):
    m = _module(name)
    traced = torch.jit.trace(m, _args(name, m, 2))
    new = [a.requires_grad_() for a in _args(name, m, 2)]
    grads = []
    for fn in (traced, m):
        loss = sum(o.sin().sum() for o in _outputs(fn(*new)))
        grads.append(torch.autograd.grad(loss, [*new, *m.parameters()]))
    for i, (a, b) in enumerate(zip(*grads, strict=True)):
        assert_close(a, b, dtype=torch.float32, name=f"traced {name} gradient {i}")


@pytest.mark.parametrize("name", MODULES)
def test_script_matches_eager_and_round_trips(backend, name):
    # Regression: torch.jit.script failed to compile lnorm's forward (f-strings, torch.finfo)
    m = _module(name)
    scripted = torch.jit.script(m)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    new = _args(name, m, 5)
    with torch.no_grad():
        _check(scripted(*new), m(*new), f"scripted {name}")
        _check(loaded(*new), m(*new), f"saved and loaded {name}")
    if name.startswith("Add"):  # the first block of a model: no residual yet
        first = _args(name, m, 5, with_residual=False)
        with torch.no_grad():
            _check(scripted(*first), m(*first), f"scripted {name} without residual")


@pytest.mark.parametrize("name", MODULES)
def test_legacy_onnx_export_runs_in_onnxruntime(backend, name):
    # Regression: torch.onnx.export(..., dynamo=False) under no_grad wrote a model with no inputs
    # and a constant output
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    m = _module(name).eval()
    args = _args(name, m, 2)
    names = [f"in{i}" for i in range(len(args))]
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, args, buf, dynamo=False, opset_version=17, input_names=names,
                          dynamic_axes={n: {0: "batch"} for n in names})
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == names
    new = _args(name, m, 4)
    got = sess.run(None, {n: a.numpy() for n, a in zip(names, new, strict=True)})
    with torch.no_grad():
        want = _outputs(m(*new))
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert_close(torch.from_numpy(a), b, atol=1e-5, rtol=1e-4, name=f"onnxruntime {name} output {i}")


# Regressions from a review: a trace of 2-D rows recorded `rstd[:, None]` (unsqueeze(1)), which on
# a (B, T, H) input with T == H broadcast wrongly instead of failing; the scripted add modules
# formed the residual sum in the residual's dtype, not torch's promotion of both.


@pytest.mark.parametrize("name", ["RMSNorm", "AddRMSNorm"])
def test_trace_of_2d_rows_replayed_on_3d_input(backend, name):
    torch.manual_seed(0)
    H = 4
    m = getattr(lnorm, name)(H)
    with torch.no_grad():
        m.weight.add_(torch.randn(H))
    two_d = (torch.randn(3, H),) if name == "RMSNorm" else (torch.randn(3, H), torch.randn(3, H))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(m, two_d)
    three_d = tuple(torch.randn(2, H, H) for _ in two_d)  # T == H: a wrong broadcast would not raise
    _check(traced(*three_d), m(*three_d), f"{name} traced on 2-D, run on 3-D")


@pytest.mark.parametrize("name", ["AddRMSNorm", "AddLayerNorm"])
def test_script_sums_float64_x_and_float32_residual_in_float64(backend, name):
    m = getattr(lnorm, name)(8, dtype=torch.float64)
    scripted = torch.jit.script(m)
    x = 1.0 + 1e-9 * torch.randn(2, 8, dtype=torch.float64)
    r = torch.randn(2, 8, dtype=torch.float32)
    for a, b in zip(scripted(x, r), m(x, r), strict=True):
        assert a.dtype == b.dtype == torch.float64
        assert_close(a, b, atol=1e-12, rtol=1e-12, name=f"scripted {name}")


# From an interop review: the scripted AddLayerNorm passed half/bfloat16 parameters beside a float32
# residual sum to F.layer_norm, which raised "mixed dtype (CPU)" where eager casts the parameters.


@pytest.mark.parametrize("name", ["AddLayerNorm", "AddRMSNorm"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("how", ["residual_in_fp32", "float32 residual"])
def test_script_low_precision_parameters_with_a_float32_sum(backend, name, dtype, how):
    torch.manual_seed(0)
    m = getattr(lnorm, name)(16, residual_in_fp32=how == "residual_in_fp32").to(dtype)
    with torch.no_grad():
        m.weight.add_(0.5 * torch.randn(16).to(dtype))
    x = torch.randn(3, 16).to(dtype)
    args = (x,) if how == "residual_in_fp32" else (x, torch.randn(3, 16))
    scripted = torch.jit.script(m)
    for a, b in zip(scripted(*args), m(*args), strict=True):
        assert a.dtype == b.dtype
        assert_close(a.float(), b.float(), atol=1e-2, rtol=1e-2, name=f"scripted {name} {dtype} {how}")
