"""The four norm ops through the Triton kernels: outputs and every gradient against the float64
reference and the torch path (``norm_cases``), the three dtypes, odd widths, the numerics the
other backends keep (constant rows, NaN, residual streams), and the launchers' own checks.

Runs on CPU tensors under Triton's interpreter and on CUDA tensors with the compiled kernels
(see ``conftest.py``); every test asserts the Triton launchers really ran.
"""

from __future__ import annotations

import math

import pytest
import torch
from norm_cases import SHAPES, check_against_torch_and_ref, make_inputs, run

import lnorm
import lnorm.functional as LF
from tolerances import assert_close, assert_three_way

pytest.importorskip("triton", reason="triton is not installed (pip install lnorm[gpu]): the Triton kernels are not tested")

from lnorm.ops import _triton_norm  # noqa: E402

OPS = ("layer", "rms", "add_layer", "add_rms")
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
# norm_cases' shapes, plus: rows that leave the last backward program without any (R=4 over three
# programs: the partial sums of weight/bias then include a row of zeros) and a wide odd row.
TRITON_SHAPES = [*SHAPES, ("B4-H9", (4,), (9,)), ("B3-H2500", (3,), (2500,))]


def on(inputs: dict, device: torch.device) -> dict:
    return {k: (v.to(device) if v is not None else None) for k, v in inputs.items()}


def expected_launches(inputs: dict) -> int:
    return 1 if inputs["x"].numel() else 0  # an empty batch never reaches a kernel


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize(("lead", "shape"), [s[1:] for s in TRITON_SHAPES], ids=[s[0] for s in TRITON_SHAPES])
@pytest.mark.parametrize("op", OPS)
def test_matches_torch_and_reference(triton_device, launches, op, dtype, lead, shape):
    inputs = on(make_inputs(op, lead, shape, dtype), triton_device)
    check_against_torch_and_ref(op, inputs, shape)
    n = expected_launches(inputs)
    assert launches == {"fwd": n, "bwd": n}, launches


@pytest.mark.parametrize("affine", ["none", "fp32-params"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("op", OPS)
def test_half_data_without_params_or_with_float32_params(triton_device, launches, op, dtype, affine):
    inputs = make_inputs(op, (6,), (45,), dtype, affine=affine != "none", param_dtype=torch.float32)
    check_against_torch_and_ref(op, on(inputs, triton_device), (45,))
    assert launches == {"fwd": 1, "bwd": 1}, launches


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "first-block"])
@pytest.mark.parametrize("op", ["add_layer", "add_rms"])
def test_residual_in_fp32(triton_device, launches, op, with_residual, dtype):
    # half activations, float32 residual stream: new_residual = x.float() + residual.float(); the
    # backward's dx comes from the kernel in float32 (src is float32), then is cast per input
    inputs = make_inputs(op, (5, 3), (32,), dtype, param_dtype=torch.float32, residual=with_residual)
    ours = check_against_torch_and_ref(op, on(inputs, triton_device), (32,), residual_in_fp32=True)
    assert ours["new_residual"].dtype == torch.float32
    assert launches == {"fwd": 1, "bwd": 1}, launches


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_float32_residual_with_half_x(triton_device, launches, dtype):
    # residual passed in float32 while x is half: the stream is float32 without residual_in_fp32
    inputs = make_inputs("add_rms", (7,), (24,), dtype, residual_dtype=torch.float32)
    ours = check_against_torch_and_ref("add_rms", on(inputs, triton_device), (24,))
    assert ours["new_residual"].dtype == torch.float32
    assert launches == {"fwd": 1, "bwd": 1}, launches


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("op", ["layer", "add_layer"])
def test_constant_rows_give_exactly_the_bias(triton_device, launches, op, dtype):
    # the mean is shifted by the row's first value: a constant row's mean is exactly its value,
    # so its output is exactly the bias (a plain sum / H of 1000.1 in float32 is off by an ulp,
    # which rstd = 1/sqrt(eps) then blows up to ~1e-2); rows 2-3 are 100 + noise
    inputs = make_inputs(op, (4,), (33,), dtype)
    x = torch.empty(4, 33, dtype=torch.float64)
    x[0], x[1] = 1000.1, -250.3
    x[2:] = 100 + torch.randn(2, 33, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    inputs["x"] = x.to(dtype)
    if inputs["residual"] is not None:
        inputs["residual"] = torch.zeros_like(inputs["x"])
    ours = check_against_torch_and_ref(op, on(inputs, triton_device), (33,))
    bias = inputs["bias"].to(dtype).expand(2, 33)
    assert_close(ours["out"][:2].cpu(), bias, atol=0, rtol=0, name="constant rows give the bias")
    assert launches == {"fwd": 1, "bwd": 1}, launches


def test_close_pair_rows_backward_matches_float64(triton_device, launches):
    # rows of two close values have a large rstd, which multiplies the saved float32 mean's
    # rounding: backward removes it, measured from the row (as the Numba kernel; see
    # tests/ops/test_layer_norm.py for the case Hypothesis found)
    inputs = make_inputs("layer", (3, 4), (2,), torch.float32, seed=4)
    inputs["bias"] = None
    check_against_torch_and_ref("layer", on(inputs, triton_device), (2,), eps=1e-5)
    assert launches == {"fwd": 1, "bwd": 1}, launches


@pytest.mark.parametrize("H", [2, 5])
def test_rows_of_close_values_keep_dx_accurate(triton_device, launches, H):
    # rstd ~ 1e3 here: without removing the saved mean's rounding, dx is ~2e-2 off float64 (as
    # torch's own kernel); with it ~1e-4
    g = torch.Generator().manual_seed(1)
    c = 3 * torch.randn(100, 1, generator=g, dtype=torch.float64)
    x = (c + 1e-3 * torch.randn(100, H, generator=g, dtype=torch.float64)).float().to(triton_device)
    dy = torch.randn(100, H, generator=g, dtype=torch.float64).to(triton_device)
    ours = run("ours", "layer", x, None, None, None, (H,), dy=dy, eps=1e-5)
    ref = run("ref64", "layer", x, None, None, None, (H,), dy=dy, eps=1e-5)
    assert_close(ours["dx"], ref["dx"], atol=1e-3, rtol=0, name="dx of rows of close values")
    assert launches == {"fwd": 1, "bwd": 1}, launches


@pytest.mark.parametrize("offset", [1e4, -3e5], ids=["1e4", "-3e5"])
def test_large_offset_is_stable(triton_device, launches, offset):
    # offset + noise in float32: a one-pass E[x^2] - E[x]^2 would lose every digit of the noise;
    # the two-pass mean is off by about an ulp of the offset, which y carries
    g = torch.Generator().manual_seed(6)
    x = (offset + torch.randn(16, 37, generator=g, dtype=torch.float64)).float()
    w, b = torch.randn(37, generator=g), torch.randn(37, generator=g)
    dy = torch.randn(16, 37, generator=g, dtype=torch.float64)
    x, w, b, dy = (t.to(triton_device) for t in (x, w, b, dy))
    ours = run("ours", "layer", x, None, w, b, (37,), dy=dy)
    theirs = run("torch", "layer", x, None, w, b, (37,), dy=dy)
    ref = run("ref64", "layer", x, None, w, b, (37,), dy=dy)
    for key in ours:
        assert_three_way(ours[key], ref[key], theirs[key], atol=2e-4, name=f"offset {key}")
    ulp = torch.finfo(torch.float32).eps * 2.0 ** math.floor(math.log2(abs(offset)))
    assert_close(ours["out"], ref["out"], atol=8 * ulp * float(w.abs().max()), rtol=0, name="out vs ref64")
    assert launches == {"fwd": 1, "bwd": 1}, launches


@pytest.mark.parametrize("op", OPS)
def test_nan_stays_in_its_row(triton_device, launches, op):
    inputs = on(make_inputs(op, (3,), (19,), torch.float32), triton_device)
    inputs["x"][1, 5] = float("nan")
    ours = run("ours", op, inputs["x"], inputs["residual"], inputs["weight"], inputs["bias"], (19,),
               dy=inputs["dy"], dres=inputs["dres"])
    out = ours["out"].cpu()
    assert torch.isnan(out[1]).all(), "a NaN in a row makes the whole row NaN, as in torch"
    assert torch.isfinite(out[[0, 2]]).all(), "other rows are untouched"
    assert torch.isnan(ours["dx"][1].cpu()).all() and torch.isfinite(ours["dx"][[0, 2]].cpu()).all()
    assert launches == {"fwd": 1, "bwd": 1}, launches


def test_non_contiguous_input(triton_device, launches):
    g = torch.Generator().manual_seed(5)
    base = torch.randn(21, 10, generator=g).to(triton_device)
    x = base.t()  # (10, 21), columns of base: not contiguous
    assert not x.is_contiguous()
    w = torch.randn(21, generator=g).to(triton_device)
    ours = LF.rms_norm(x, 21, w, 1e-6)
    with lnorm.use_backend("torch"):
        theirs = LF.rms_norm(x, 21, w, 1e-6)
    assert_close(ours.cpu(), theirs.cpu(), name="rms_norm of a transposed input")
    assert launches["fwd"] == 1


def test_dispatch_leaves_what_the_kernels_do_not_take_to_torch(triton_device, launches):
    # float64 (the kernels compute in float32) and rows wider than the kernels hold in registers
    # take the torch launchers, with the same answers; nothing reaches the Triton launchers
    x64 = torch.randn(3, 40, dtype=torch.float64, device=triton_device)
    y64 = LF.layer_norm(x64, 40)
    assert_close(y64.cpu(), torch.nn.functional.layer_norm(x64, (40,)).cpu(), name="float64 layer_norm")
    wide = _triton_norm.max_features(torch.float32) + 1
    xw = torch.randn(2, wide, device=triton_device)
    yw = LF.rms_norm(xw, wide)
    assert_close(yw.cpu(), torch.nn.functional.rms_norm(xw, (wide,)).cpu(), name="wide rms_norm")
    assert launches == {"fwd": 0, "bwd": 0}, launches


def test_modules_run_the_kernels(triton_device, launches):
    # the nn modules reach the same op: forward and backward through the Triton launchers
    norm = lnorm.AddRMSNorm(16, device=triton_device)
    x = torch.randn(4, 16, device=triton_device, requires_grad=True)
    r = torch.randn(4, 16, device=triton_device)
    out, res = norm(x, r)
    (out.sum() + res.sum()).backward()
    assert launches == {"fwd": 1, "bwd": 1}, launches
    assert x.grad is not None and norm.weight.grad is not None


# ------------------------------------------------------------------ the launchers' own checks


def test_launcher_rejects_unsupported_dtypes(triton_device):
    x = torch.randn(2, 8, device=triton_device)
    with pytest.raises(TypeError, match=r"x has dtype torch.float64"):
        _triton_norm.norm_fwd(x.double(), None, None, None, 1e-5, True, torch.float64)
    with pytest.raises(TypeError, match=r"weight has dtype torch.int32"):
        _triton_norm.norm_fwd(x, None, torch.ones(8, dtype=torch.int32, device=triton_device), None,
                              1e-5, True, torch.float32)
    rstd = torch.ones(2, dtype=torch.float64, device=triton_device)
    with pytest.raises(TypeError, match=r"rstd has dtype torch.float64"):
        _triton_norm.norm_bwd(x, x, None, None, rstd, False, False, False, None)


def test_launcher_rejects_shapes_and_devices_it_would_trust(triton_device):
    x = torch.randn(2, 8, device=triton_device)
    with pytest.raises(ValueError, match=r"weight must have shape \[8\], got \[7\]"):
        _triton_norm.norm_fwd(x, None, torch.ones(7, device=triton_device), None, 1e-5, True, x.dtype)
    with pytest.raises(ValueError, match=r"residual must have shape \[2, 8\]"):
        _triton_norm.norm_fwd(x, torch.ones(3, 8, device=triton_device), None, None, 1e-5, True, x.dtype)
    with pytest.raises(ValueError, match=r"bias is on meta but x is on"):
        _triton_norm.norm_fwd(x, None, None, torch.ones(8, device="meta"), 1e-5, True, x.dtype)
    with pytest.raises(ValueError, match=r"dy must have shape \[2, 8\]"):
        _triton_norm.norm_bwd(x[:1], x, None, None, torch.ones(2, device=triton_device), False, False, False, None)


def test_launcher_refuses_cpu_tensors_for_compiled_kernels(triton_device, monkeypatch):
    # compiled kernels dereference GPU pointers: a CPU tensor must be refused before the launch
    monkeypatch.setattr(_triton_norm, "INTERPRETED", False)
    with pytest.raises(ValueError, match=r"run on CUDA tensors .*got x on cpu"):
        _triton_norm.norm_fwd(torch.randn(2, 8), None, None, None, 1e-5, True, torch.float32)


def test_functional_names_the_mixed_device_argument(triton_device):
    if triton_device.type != "cuda":
        pytest.skip("mixed devices need a GPU (CPU tensors with a CUDA weight)")
    x = torch.randn(2, 8, device=triton_device)
    with pytest.raises(ValueError, match=r"weight is on cpu but input is on cuda"):
        LF.layer_norm(x, 8, torch.ones(8))
    with pytest.raises(ValueError, match=r"residual is on cpu but x is on cuda"):
        LF.add_rms_norm(x, torch.randn(2, 8), 8)


# ---------------------------------------------------------------- the torch.library path


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")
@pytest.mark.parametrize("case", ["f32-layer-res", "bf16-rms", "bf16-layer-res-fp32"])
def test_opcheck_norm_fwd(triton_device, launches, case):
    dtype = torch.bfloat16 if case.startswith("bf16") else torch.float32
    center, with_res = "layer" in case, "res" in case

    def t(*shape, dt=dtype):
        return torch.randn(*shape, dtype=torch.float64).to(dt).to(triton_device).requires_grad_(True)

    args = (t(5, 24), t(5, 24) if with_res else None, t(24, dt=torch.float32),
            t(24) if center else None, 1e-5, center, case.endswith("fp32"))
    result = torch.library.opcheck(torch.ops.lnorm.norm_fwd.default, args)
    assert all(v == "SUCCESS" for v in result.values()), result
    assert launches["fwd"] > 0 and launches["bwd"] > 0, launches


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_opcheck_norm_bwd(triton_device, launches, dtype):
    # the kernel may write dx in dy's dtype; the op returns it as its fake says, in float32
    R, H = 5, 24
    src = torch.randn(R, H, device=triton_device).to(dtype)
    mean = src.float().mean(-1)
    rstd = torch.rand(R, device=triton_device) + 0.5
    args = (torch.randn(R, H, device=triton_device).to(dtype), src, torch.randn(H, device=triton_device),
            mean, rstd, True, True, True, torch.randn(R, H, device=triton_device).to(dtype))
    result = torch.library.opcheck(torch.ops.lnorm.norm_bwd.default, args)
    assert all(v == "SUCCESS" for v in result.values()), result
    assert torch.ops.lnorm.norm_bwd(*args)[0].dtype == torch.float32
    assert launches["bwd"] > 0, launches


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")
def test_compiled_model_matches_eager(triton_device, launches):
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), lnorm.RMSNorm(32), torch.nn.Linear(32, 32),
                                lnorm.LayerNorm(32)).to(triton_device)
    x = torch.randn(6, 16, device=triton_device)
    eager = model(x)
    eager.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    assert_close(out, eager, name="compiled out")
    for g, p in zip(grads, model.parameters(), strict=True):
        assert_close(p.grad, g, name="compiled grad")
    assert launches["fwd"] >= 4 and launches["bwd"] >= 4, launches
