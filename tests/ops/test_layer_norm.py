"""lnorm.functional.layer_norm against F.layer_norm and the float64 reference, on both backends.

Every test here runs lnorm's own layer norm (the ``own_layer_norm`` fixture): at these sizes a
float32/float64 layer norm would otherwise be torch's kernel, compared with itself. The
delegation rule itself is tested in ``test_backend_selection.py``.
"""

import math
import re

import pytest
import torch
from norm_cases import DTYPES, SHAPES, check_against_torch_and_ref, make_inputs, run

import lnorm.functional as LF
from tolerances import assert_close, assert_three_way

OP = "layer"
pytestmark = pytest.mark.usefixtures("own_layer_norm")


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize(("lead", "shape"), [s[1:] for s in SHAPES], ids=[s[0] for s in SHAPES])
def test_matches_torch_and_reference(backend, dtype, lead, shape):
    inputs = make_inputs(OP, lead, shape, dtype)
    check_against_torch_and_ref(OP, inputs, shape)


@pytest.mark.parametrize("affine", ["none", "weight-only", "weight+bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_optional_weight_and_bias(backend, dtype, affine):
    inputs = make_inputs(OP, (4, 5), (24,), dtype, affine=affine != "none")
    if affine == "weight-only":
        inputs["bias"] = None
    check_against_torch_and_ref(OP, inputs, (24,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_float32_params_with_half_input(backend, dtype):
    # mixed precision as torch allows: half activations, float32 weight and bias
    inputs = make_inputs(OP, (9,), (40,), dtype, param_dtype=torch.float32)
    ours = check_against_torch_and_ref(OP, inputs, (40,))
    assert ours["out"].dtype == dtype
    assert ours["dweight"].dtype == ours["dbias"].dtype == torch.float32


@pytest.mark.parametrize(
    "layout", ["rows-strided", "feature-strided", "transposed-lead", "expanded"]
)
def test_non_contiguous_input(backend, layout):
    base = torch.randn(6, 10, 34, dtype=torch.float64)
    if layout == "rows-strided":
        x = base[::2, :, :17]  # (3, 10, 17)
    elif layout == "feature-strided":
        x = base[:, :, ::2]  # (6, 10, 17), stride 2 inside the normalized dim
    elif layout == "transposed-lead":
        x = base[:, :, :17].transpose(0, 1)  # (10, 6, 17)
    else:
        x = base[:1, :1, :17].expand(4, 3, 17)  # stride 0 on leading dims
    assert not x.is_contiguous()
    w, b = torch.randn(17, dtype=torch.float64), torch.randn(17, dtype=torch.float64)
    dy = torch.randn(x.shape, dtype=torch.float64)
    kw = {"dy": dy, "dres": None}
    got = run("ours", OP, x, None, w, b, (17,), **kw)
    want = run("ours", OP, x.contiguous(), None, w, b, (17,), **kw)
    ref = run("ref64", OP, x, None, w, b, (17,), **kw)
    for key in got:
        assert_close(got[key], want[key], name=f"{key} strided vs contiguous")
        assert_close(got[key], ref[key], name=f"{key} vs ref64")


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_constant_rows_give_bias(backend, dtype):
    for H in (1, 5, 7, 256):
        for value in (0.0, -0.1, 1 / 3, 3.7):
            x = torch.full((3, 2, H), value, dtype=dtype, requires_grad=True)
            w = torch.randn(H, dtype=dtype).requires_grad_()
            b = torch.randn(H, dtype=dtype).requires_grad_()
            y = LF.layer_norm(x, H, w, b)
            assert torch.isfinite(y).all(), y
            # x - mean is zero, so y is the bias
            assert_close(y, b.detach().expand_as(y), name=f"H={H} row of {value}: output")
            y.backward(torch.randn_like(y))
            for name, t in [("x", x), ("weight", w), ("bias", b)]:
                assert torch.isfinite(t.grad).all(), f"H={H} row of {value}: grad of {name}: {t.grad}"


# Regression: a constant row c gives bias + (c - mean) * rstd with rstd = 1/sqrt(eps) = 316, so a
# mean off by one ulp of c shows up 316x larger. The Numba kernel's mean sum * (1/H) was not c
# for many (H, c) (float32: H=7, c=3.7 gave |y - b| = 1.6e-4, c=12345.678 gave 0.295; 12% of
# constants ~1e4 off by > 1e-2), and the torch backend's half path (native_layer_norm on
# bf16/f16) was off by ~0.07 even at H=1; torch's float32 kernel is exact here.
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_constant_rows_of_large_magnitude_give_bias(backend, dtype):
    g = torch.Generator().manual_seed(1)
    for H in (1, 2, 3, 5, 7, 12, 17, 33, 64):
        # 40 rows per H, each a constant drawn from N(0, 3000^2) (float16 keeps them finite)
        c = (torch.randn(40, generator=g, dtype=torch.float64) * 3000).to(dtype)
        x = c[:, None].expand(40, H)
        b = torch.randn(H, generator=g, dtype=torch.float64).to(dtype)
        y = LF.layer_norm(x, H, None, b)
        assert_close(y, b.expand_as(y), name=f"H={H} constant rows, y vs bias")


# Regression (found by Hypothesis on a fresh clone): in float32 a short row of close values has a
# large rstd, and backward rebuilt xhat = (x - mean) * rstd from the saved float32 mean, whose
# rounding the rstd multiplied: here dx was 2.2e-5 off float64 (torch's own: 3.6e-5), above the
# 2e-5 bound. Backward now removes the mean's rounding error, measured from the row: 8.1e-6.
# (Rows closer still stay beyond a fixed float32 bound, torch's kernel included: the error grows
# with rstd.)
def test_close_pair_rows_backward_matches_float64(backend):
    inputs = make_inputs("layer", (3, 4), (2,), torch.float32, seed=4)
    inputs["bias"] = None
    check_against_torch_and_ref("layer", inputs, (2,), eps=1e-5)


@pytest.mark.parametrize("H", [7, 512])
@pytest.mark.parametrize("offset", [1e4, -3e5], ids=["1e4", "-3e5"])
def test_large_offset_is_stable(backend, offset, H):
    # x = offset + noise in float32: a one-pass E[x^2] - E[x]^2 loses every digit of the noise
    x = (offset + torch.randn(64, H, dtype=torch.float64)).float()
    w, b = torch.randn(H), torch.randn(H)
    dy = torch.randn(64, H, dtype=torch.float64)
    ours = run("ours", OP, x, None, w, b, (H,), dy=dy)
    theirs = run("torch", OP, x, None, w, b, (H,), dy=dy)
    ref = run("ref64", OP, x, None, w, b, (H,), dy=dy)
    for key in ours:
        # the input is exact in float64, so ref64 is the true answer for this float32 input
        assert_three_way(ours[key], ref[key], theirs[key], atol=2e-4, name=f"offset {key}")
    # a one-pass E[x^2] - E[x]^2 would be off by O(1); a two-pass mean is off by about an ulp
    # of the offset, which (x - mean) * rstd * weight carries into y
    ulp = torch.finfo(torch.float32).eps * 2.0 ** math.floor(math.log2(abs(offset)))
    bound = 8 * ulp * float(w.abs().max())
    assert_close(ours["out"], ref["out"], atol=bound, rtol=0, name="offset out vs ref64")


def test_eps_is_used(backend):
    # eps inside the square root: a tiny-variance row with a large eps is shrunk towards 0
    x = torch.tensor([[0.0, 1e-3]], dtype=torch.float64)
    y = LF.layer_norm(x, 2, eps=1.0)
    expected = torch.tensor([[-5e-4, 5e-4]], dtype=torch.float64) / (1.0 + 0.25e-6) ** 0.5
    assert_close(y, expected, name="eps=1 output")


@pytest.mark.parametrize("with_affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize(("lead", "shape"), [((3,), (5,)), ((2, 2), (3, 2)), ((4,), (1,))],
                         ids=["B3-H5", "B2x2-H3x2", "B4-H1"])
def test_gradcheck_float64(backend, lead, shape, with_affine):
    x = torch.randn(*lead, *shape, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(shape, dtype=torch.float64) + 1).requires_grad_() if with_affine else None
    b = torch.randn(shape, dtype=torch.float64, requires_grad=True) if with_affine else None
    inputs = tuple(t for t in (x, w, b) if t is not None)

    def fn(*args):
        return LF.layer_norm(args[0], shape, *args[1:], eps=1e-3)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5)


# Double backward is not claimed, so it must be right or fail loudly: the fused backward is
# @once_differentiable, so a second derivative raises on both backends. (Before that, the torch
# backend's backward treated mean and rstd as constants and gave silently wrong second derivatives.)


def test_double_backward_is_right_or_an_error(backend):
    x = torch.randn(3, 5, dtype=torch.float64)
    w = torch.randn(5, dtype=torch.float64)

    def grad_penalty_grad(norm):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        (g,) = torch.autograd.grad(norm(xr, (5,), wr).pow(2).sum(), xr, create_graph=True)
        g.pow(2).sum().backward()  # a gradient penalty's gradient
        return xr.grad, wr.grad

    want = grad_penalty_grad(torch.nn.functional.layer_norm)
    try:
        ours = grad_penalty_grad(LF.layer_norm)
    except RuntimeError as exc:  # an error is acceptable, but it must say what went wrong
        assert re.search(r"differentiate twice|double backward|second.order", str(exc)), str(exc)
        return
    for name, a, b in zip(["x", "weight"], ours, want, strict=True):
        assert a is not None, f"second-order grad of {name} is missing"
        assert_close(a, b, name=f"second-order grad of {name}")
