"""The torch.library path: opcheck of the custom ops, their autograd, and torch.compile of a model.

Under ``torch.compile`` :func:`lnorm.ops.norm.fused_norm` calls ``torch.ops.lnorm.norm_fwd``
(a custom op with a fake implementation and registered autograd, whose backward is
``torch.ops.lnorm.norm_bwd``) instead of the eager ``autograd.Function``; these tests cover that
second path, with the Numba kernels inside it.
"""

import pytest
import torch
from torch import nn

import lnorm
import lnorm.ops.norm  # noqa: F401  (registers torch.ops.lnorm)
from tolerances import assert_close

# opcheck and torch.compile go through torch internals that still call torch.jit.script_method
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")


def _fwd_args(case, R=5, H=8, requires_grad=True):
    dtype = torch.bfloat16 if case.startswith("bf16") else torch.float64
    pdt = torch.float32 if dtype == torch.bfloat16 else dtype
    center = "layer" in case
    with_res = "res" in case

    def t(*shape, dt):
        return torch.randn(*shape, dtype=torch.float64).to(dt).requires_grad_(requires_grad)

    x = t(R, H, dt=dtype)
    residual = t(R, H, dt=dtype) if with_res else None
    weight = t(H, dt=pdt)
    bias = t(H, dt=pdt) if center else None
    return (x, residual, weight, bias, 1e-5, center, "fp32" in case)


FWD_CASES = ["layer-res", "layer", "rms-res", "rms", "bf16-layer-res-fp32"]


@pytest.mark.parametrize("case", FWD_CASES)
def test_opcheck_norm_fwd(backend, case):
    result = torch.library.opcheck(torch.ops.lnorm.norm_fwd.default, _fwd_args(case))
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("center", [True, False], ids=["layer", "rms"])
def test_opcheck_norm_bwd(backend, center):
    R, H = 5, 8
    src = torch.randn(R, H, dtype=torch.float64)
    mean = src.mean(-1) if center else torch.empty(0, dtype=torch.float64)
    rstd = torch.rand(R, dtype=torch.float64) + 0.5
    args = (torch.randn(R, H, dtype=torch.float64), src, torch.randn(H, dtype=torch.float64),
            mean, rstd, center, True, center, torch.randn(R, H, dtype=torch.float64))
    result = torch.library.opcheck(torch.ops.lnorm.norm_bwd.default, args)
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("case", ["layer-res", "rms"])
def test_gradcheck_custom_op_autograd(backend, case):
    # the registered autograd of torch.ops.lnorm.norm_fwd is separate code from the eager
    # autograd.Function: gradcheck it too (outputs y and new_residual; mean/rstd are statistics)
    x, residual, weight, bias, eps, center, fp32 = _fwd_args(case, R=3, H=4)

    def fn(x, residual, weight, bias):
        y, res_out, _, _ = torch.ops.lnorm.norm_fwd(x, residual, weight, bias, 1e-3, center, fp32)
        return (y, res_out) if residual is not None else y

    assert torch.autograd.gradcheck(fn, (x, residual, weight, bias), eps=1e-6, atol=1e-5)


class _Block(nn.Module):
    """A 2-layer MLP in pre-norm residual form, with each of lnorm's norm modules."""

    def __init__(self, d: int = 32):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.ln = lnorm.LayerNorm(2 * d)
        self.rms = lnorm.RMSNorm(d)
        self.add_ln = lnorm.AddLayerNorm(d)
        self.add_rms = lnorm.AddRMSNorm(d, eps=1e-6)

    def forward(self, x):  # (B, T, d)
        h, residual = self.add_ln(x)  # first block: no residual yet
        h = self.fc2(torch.relu(self.ln(self.fc1(h))))
        h, residual = self.add_rms(self.rms(h), residual)
        return h * 2 + residual


@pytest.mark.slow
def test_compiled_model_matches_eager():
    with lnorm.use_backend("numba"):
        torch.manual_seed(0)
        model = _Block()
        with torch.no_grad():  # non-trivial norm parameters
            for name, p in model.named_parameters():
                if "ln" in name or "rms" in name:
                    p.add_(torch.randn_like(p) * 0.3)
        compiled = torch.compile(model, fullgraph=True)  # fullgraph: the norms must not break it
        for B in (4,):
            x = torch.randn(B, 7, 32)
            xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
            ye, yc = model(xe), compiled(xc)
            assert_close(yc, ye, atol=1e-5, rtol=1e-5, name=f"B={B} forward")
            g = torch.randn_like(ye)
            grads_e = torch.autograd.grad(ye, [xe, *model.parameters()], g)
            grads_c = torch.autograd.grad(yc, [xc, *model.parameters()], g)
            names = ["input"] + [n for n, _ in model.named_parameters()]
            for name, a, b in zip(names, grads_c, grads_e, strict=True):
                assert_close(a, b, atol=1e-5, rtol=1e-5, name=f"B={B} grad of {name}")


@pytest.mark.parametrize("dynamo_is_exporting", ["reads the flag", "True under compile"])
def test_compile_takes_the_library_ops_not_the_export_route(monkeypatch, dynamo_is_exporting):
    # Regression: under torch 2.11 dynamo answers torch.compiler.is_exporting() with True inside
    # torch.compile too, and compiled models took the export route (torch's ops, not lnorm's).
    # "True under compile" makes this torch answer so; the compiled graph must still call the
    # lnorm ops, and torch.export must still get standard ops only.
    if dynamo_is_exporting == "True under compile":
        monkeypatch.setattr(torch.compiler, "is_exporting", lambda: torch.compiler.is_compiling())
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), lnorm.LayerNorm(16), lnorm.RMSNorm(16))
    x = torch.randn(4, 8)
    with lnorm.use_backend("torch"):  # (the same route on either backend; torch needs no numba)
        out = torch.compile(model, backend=record, fullgraph=True)(x)
        assert_close(out, model(x), name="compiled")
        assert "lnorm.norm_fwd" in graphs[0], graphs[0]
        exported = torch.export.export(model, (x,))
    ops = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert not any("lnorm" in op for op in ops), ops
