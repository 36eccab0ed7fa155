"""lnorm.functional.rms_norm against F.rms_norm and the float64 reference, on both backends."""

import pytest
import torch
from norm_cases import DTYPES, SHAPES, check_against_torch_and_ref, make_inputs, run

import lnorm.functional as LF
from tolerances import assert_close, assert_three_way

OP = "rms"


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize(("lead", "shape"), [s[1:] for s in SHAPES], ids=[s[0] for s in SHAPES])
def test_matches_torch_and_reference(backend, dtype, lead, shape):
    inputs = make_inputs(OP, lead, shape, dtype)
    check_against_torch_and_ref(OP, inputs, shape)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_without_weight(backend, dtype):
    inputs = make_inputs(OP, (4, 5), (24,), dtype, affine=False)
    check_against_torch_and_ref(OP, inputs, (24,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_float32_weight_with_half_input(backend, dtype):
    inputs = make_inputs(OP, (9,), (40,), dtype, param_dtype=torch.float32)
    ours = check_against_torch_and_ref(OP, inputs, (40,))
    assert ours["out"].dtype == dtype
    assert ours["dweight"].dtype == torch.float32


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_default_eps_is_torchs(backend, dtype):
    # eps=None means what F.rms_norm does: finfo of the compute dtype (float32's eps for half
    # input, not finfo(bfloat16).eps = 2**-7); rows of tiny values show which eps was used
    x = (torch.randn(8, 16, dtype=torch.float64) * 1e-4).to(dtype)
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    dy = torch.randn(8, 16, dtype=torch.float64)
    ours = run("ours", OP, x, None, None, None, (16,), eps=None, dy=dy)
    theirs = run("torch", OP, x, None, None, None, (16,), eps=None, dy=dy)
    ref = run("ref64", OP, x, None, None, None, (16,), eps=eps, dy=dy)
    for key in ours:
        assert_three_way(ours[key], ref[key], theirs[key], name=f"eps=None {key}")
    y = LF.rms_norm(x, 16)
    assert_close(y, ours["out"], atol=0, rtol=0, name="eps=None vs eps omitted")


@pytest.mark.parametrize("layout", ["rows-strided", "feature-strided", "transposed-lead"])
def test_non_contiguous_input(backend, layout):
    base = torch.randn(6, 10, 34, dtype=torch.float64)
    x = {
        "rows-strided": base[::2, :, :17],
        "feature-strided": base[:, :, ::2],
        "transposed-lead": base[:, :, :17].transpose(0, 1),
    }[layout]
    assert not x.is_contiguous()
    w = torch.randn(17, dtype=torch.float64)
    dy = torch.randn(x.shape, dtype=torch.float64)
    got = run("ours", OP, x, None, w, None, (17,), dy=dy)
    want = run("ours", OP, x.contiguous(), None, w, None, (17,), dy=dy)
    ref = run("ref64", OP, x, None, w, None, (17,), dy=dy)
    for key in got:
        assert_close(got[key], want[key], name=f"{key} strided vs contiguous")
        assert_close(got[key], ref[key], name=f"{key} vs ref64")


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_zero_and_constant_rows(backend, dtype):
    # a zero row gives exactly 0 (eps keeps 0/0 away), a constant row c gives about sign(c) * w
    x = torch.zeros(4, 3, 9, dtype=dtype)
    x[1] = 2.5
    x[2] = -1.0
    w = torch.randn(9, dtype=dtype)
    dy = torch.randn(x.shape, dtype=torch.float64).to(dtype).double()
    ours = run("ours", OP, x, None, w, None, (9,), eps=1e-6, dy=dy)
    ref = run("ref64", OP, x, None, w, None, (9,), eps=1e-6, dy=dy)
    y = ours["out"]
    assert (y[0] == 0).all() and (y[3] == 0).all(), y[0]
    assert_close(y[1], w.expand(3, 9), atol=1e-3, rtol=1e-3, name="row of 2.5 vs weight")
    for key in ours:
        assert torch.isfinite(ours[key]).all(), f"{key} not finite"
        assert_close(ours[key], ref[key].to(ours[key].dtype), dtype=dtype, name=key)


@pytest.mark.parametrize("scale", [1e4, 1e-3], ids=["1e4", "1e-3"])
def test_large_and_small_scales(backend, scale):
    # float32 rows of large or small magnitude: mean(x^2) stays in range and eps=1e-6 matters
    # only for the small ones; both must match the float64 reference
    x = (torch.randn(32, 300, dtype=torch.float64) * scale).float()
    w = torch.randn(300)
    dy = torch.randn(32, 300, dtype=torch.float64)
    ours = run("ours", OP, x, None, w, None, (300,), eps=1e-6, dy=dy)
    ref = run("ref64", OP, x, None, w, None, (300,), eps=1e-6, dy=dy)
    for key in ours:
        assert_close(ours[key], ref[key], atol=2e-5 * float(ref[key].detach().abs().max()), name=key)


@pytest.mark.parametrize("with_weight", [True, False], ids=["weight", "plain"])
@pytest.mark.parametrize(("lead", "shape"), [((3,), (5,)), ((2, 2), (3, 2)), ((4,), (1,))],
                         ids=["B3-H5", "B2x2-H3x2", "B4-H1"])
def test_gradcheck_float64(backend, lead, shape, with_weight):
    x = torch.randn(*lead, *shape, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(shape, dtype=torch.float64) + 1).requires_grad_() if with_weight else None
    inputs = (x, w) if with_weight else (x,)

    def fn(*args):
        return LF.rms_norm(args[0], shape, *args[1:], eps=1e-3)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5)
