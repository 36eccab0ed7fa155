"""The norm ops at the edges of floating point: rows whose squares overflow, NaN and inf, type
promotion of the residual stream, gradients that must not share memory, and the bounded cache
of constant weights."""

from __future__ import annotations

import pytest
import torch
from norm_cases import OPS, make_inputs, run

import lnorm
import lnorm.functional as LF
from lnorm.ops.backend import numba_available
from tolerances import assert_close

# a power of two whose square overflows the dtype (float32 and bfloat16 share float32's range)
HUGE_EXP = {torch.float32: 66, torch.bfloat16: 66, torch.float64: 530}
NEAR_MAX = {torch.float32: 3.0e38, torch.bfloat16: 3.0e38, torch.float64: 1.5e308}
DT = {"f32": torch.float32, "bf16": torch.bfloat16, "f64": torch.float64}


def _huge_inputs(op, dtype, rows=4, H=33, seed=0):
    """Rows of |x| ~ 2**HUGE_EXP: a pattern, random, random with an offset, and two elements near
    the dtype's largest value; residual 0, so the normalized sum is x exactly; no gradient on
    the new residual."""
    inputs = make_inputs(op, (rows,), (H,), dtype, seed=seed)
    x = inputs["x"].double().clone()
    x[0] = torch.tensor([1.0, -1.0, 2.0] + [0.0] * (H - 3))
    x[2] += 3
    x *= 2.0 ** HUGE_EXP[dtype]
    x[3, :2] = torch.tensor([NEAR_MAX[dtype], -NEAR_MAX[dtype]], dtype=torch.float64)
    inputs["x"] = x.to(dtype)
    if inputs["residual"] is not None:
        inputs["residual"] = inputs["residual"] * 0
    inputs["dres"] = inputs["dres"] * 0  # dx is then all through the norm, and scales with it
    return inputs


def _reference(op, inputs, shape, dtype, grads=True):
    """The float64 reference on x scaled down by 2**HUGE_EXP (exact): a norm does not see the scale
    but for eps, which is negligible next to these rows' variance. Gradients w.r.t. x scale back."""
    k = 2.0 ** -HUGE_EXP[dtype]
    x = inputs["x"].double() * k
    res = inputs["residual"].double() * k if inputs["residual"] is not None else None
    ref = run("ref64", op, x, res, inputs["weight"], inputs["bias"], shape, dy=inputs["dy"],
              dres=inputs["dres"], grads=grads)
    for name in ("dx", "dresidual"):
        if name in ref:
            ref[name] = ref[name] * k
    return ref


def _scaled(t: torch.Tensor, ref: torch.Tensor):
    # gradients of huge rows are tiny (dx ~ rstd): compare in units of the reference's size
    s = ref.double().abs().amax().clamp_min(1e-300)
    return t.double() / s, ref.double() / s


def _check_rows_against_ref(op, inputs, shape, dtype, grads=True):
    args = (inputs["x"], inputs["residual"], inputs["weight"], inputs["bias"], shape)
    ours = run("ours", op, *args, dy=inputs["dy"], dres=inputs["dres"], grads=grads)
    ref = _reference(op, inputs, shape, dtype, grads)
    tol = {"atol": 4e-2, "rtol": 4e-2} if dtype is torch.bfloat16 else {"atol": 1e-4, "rtol": 1e-4}
    for name in ref:
        if name == "new_residual":
            continue
        a, e = _scaled(ours[name], ref[name]) if name != "out" else (ours[name].double(), ref[name])
        assert_close(a, e, name=f"{op} {name}", **tol)


# ------------------------------------------------------------------------------------ overflow


@pytest.mark.parametrize("dtype", DT.values(), ids=DT.keys())
@pytest.mark.parametrize("op", OPS)
def test_rows_whose_squares_overflow_get_the_float64_answer(backend, op, dtype):
    # Before, float32 rows of |x| ~ 1e20 overflowed the variance: add_layer_norm and bfloat16
    # layer_norm returned exactly the bias, RMS norm 0 (finite and wrong).
    inputs = _huge_inputs(op, dtype)
    _check_rows_against_ref(op, inputs, (inputs["x"].shape[-1],), dtype)


@pytest.mark.parametrize("op", ["layer", "rms"])
def test_overflowing_rows_in_a_large_float32_norm(backend, op):
    # above 4M elements the plain layer norm runs lnorm's kernel (the threaded build): it
    # returned NaN there
    H = 8
    x = torch.randn(1 << 19, H)
    x[7] = torch.tensor([1e20, -1e20, 2e20, 0, 0, 0, 0, 0])
    x[11] *= 1e30
    x.requires_grad_()
    fn = LF.layer_norm if op == "layer" else LF.rms_norm
    y = fn(x, H)
    dy = torch.randn_like(y)
    y.backward(dy)
    x64 = x.detach()[[0, 7, 11]].double().requires_grad_()
    y64 = fn(x64, H)
    y64.backward(dy[[0, 7, 11]].double())
    assert_close(y[[0, 7, 11]].detach().double(), y64.detach(), atol=1e-5, rtol=1e-5, name="out")
    assert_close(*_scaled(x.grad[[0, 7, 11]], x64.grad), atol=1e-4, rtol=1e-4, name="dx")


# --------------------------------------------------------------------------------- NaN and inf


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", DT.values(), ids=DT.keys())
@pytest.mark.parametrize("op", OPS)
def test_nonfinite_rows_stay_nonfinite(backend, op, dtype, value):
    # NaN exactly where torch's own ops (on x + residual) give NaN, in the output and every
    # gradient; the other rows are unaffected
    inputs = make_inputs(op, (3,), (40,), dtype)
    inputs["x"][1, 5] = value
    shape = (40,)
    args = (inputs["x"], inputs["residual"], inputs["weight"], inputs["bias"], shape)
    ours = run("ours", op, *args, dy=inputs["dy"], dres=inputs["dres"])
    ref = run("torch", op, *args, dy=inputs["dy"], dres=inputs["dres"])
    assert not torch.isfinite(ours["out"][1]).all()
    assert torch.isfinite(ours["out"][[0, 2]]).all()
    for name in ref:
        if name != "new_residual":
            assert torch.equal(torch.isnan(ours[name]), torch.isnan(ref[name])), name


# ------------------------------------------------------------------- the residual stream's dtype


@pytest.mark.parametrize("op", ["add_layer", "add_rms"])
def test_float64_x_with_float32_residual_sums_in_float64(backend, op):
    # torch's `x + residual` promotes to float64; the sum was taken and normalized in float32
    x = torch.randn(4, 37, dtype=torch.float64) * 1e-3 + 1.0
    residual = torch.randn(4, 37, dtype=torch.float32)
    x.requires_grad_()
    residual.requires_grad_()
    fn = LF.add_layer_norm if op == "add_layer" else LF.add_rms_norm
    out, new_res = fn(x, residual, 37)
    s = x.detach() + residual.detach()  # float64
    expected = (torch.nn.functional.layer_norm(s, (37,)) if op == "add_layer"
                else torch.nn.functional.rms_norm(s, (37,), eps=torch.finfo(torch.float64).eps))
    assert new_res.dtype == torch.float64 and out.dtype == torch.float64
    torch.testing.assert_close(new_res, s, atol=0, rtol=0)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    (out.sum() + new_res.square().sum()).backward()
    assert x.grad.dtype == torch.float64 and residual.grad.dtype == torch.float32


# -------------------------------------------------------------------------- gradients' memory


@pytest.mark.parametrize("dims", [2, 3], ids=["2d", "3d"])
@pytest.mark.parametrize("dtype", DT.values(), ids=DT.keys())
@pytest.mark.parametrize("op", ["add_layer", "add_rms"])
def test_x_and_residual_gradients_do_not_share_memory(backend, op, dtype, dims):
    shape = (2, 3, 16) if dims == 3 else (6, 16)
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    residual = torch.randn(shape, dtype=dtype, requires_grad=True)
    fn = LF.add_layer_norm if op == "add_layer" else LF.add_rms_norm
    out, new_res = fn(x, residual, 16)
    (out.float().square().sum() + new_res.float().sum()).backward()
    assert x.grad.untyped_storage().data_ptr() != residual.grad.untyped_storage().data_ptr()
    before = residual.grad.clone()
    x.grad.zero_()
    torch.testing.assert_close(residual.grad, before, atol=0, rtol=0)


# ------------------------------------------------------------------------- cache of constants


@pytest.mark.skipif(not numba_available(), reason="the kernels' cache")
def test_cache_of_constant_weights_is_bounded_in_bytes():
    # weight-less calls at many large hidden sizes kept one ones/zeros array per size (12 calls at
    # H ~ 1e6 kept 48 MB of float32 alive)
    import gc
    import tracemalloc

    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for i in range(12):  # on the Numba backend (the default where numba imports)
            LF.rms_norm(torch.randn(1, 1_000_000 + i), 1_000_000 + i)
            LF.add_layer_norm(torch.randn(1, 1_000_000 + i), torch.randn(1, 1_000_000 + i), 1_000_000 + i)
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert kept < 16 * 2**20, f"{kept / 2**20:.1f} MB kept after the calls"


# -------------------------------------------- constant huge rows, and second derivatives of huge rows
# Regressions from a review: the torch launchers' overflow rescue took an unshifted mean, so a
# constant row of 1e30 came out -weight + bias (finite and wrong; NaN past 1e32, where eps times
# the scale squared underflowed); and backward with create_graph=True recomputed the statistics in
# plain torch ops, whose squares overflowed, giving such rows a gradient of exactly 0.

_FNS = {"layer": lambda x, H, w, b: LF.layer_norm(x, (H,), w, b),
        "rms": lambda x, H, w, b: LF.rms_norm(x, (H,), w),
        "add_layer": lambda x, H, w, b: LF.add_layer_norm(x, torch.zeros_like(x), (H,), w, b)[0],
        "add_rms": lambda x, H, w, b: LF.add_rms_norm(x, torch.zeros_like(x), (H,), w)[0]}


@pytest.mark.parametrize("value", [1e10, 1e30, 1e31, 1e33, 3e38, -2e35])
@pytest.mark.parametrize("op", OPS)
def test_constant_rows_of_any_magnitude_give_the_bias(backend, own_layer_norm, op, value):
    H = 40
    w, b = torch.full((H,), 2.0), torch.full((H,), 0.5)
    x = torch.randn(3, H)
    x[1] = value
    y = _FNS[op](x, H, w, b)
    # layer norm of a constant row: exactly the bias; RMS norm: sign(value) * weight (eps negligible)
    expect = torch.full((H,), 0.5) if op in ("layer", "add_layer") else torch.full((H,), 2.0 * (1 if value > 0 else -1))
    assert_close(y[1].double(), expect.double(), atol=1e-6, rtol=1e-6, name=f"{op} at {value:g}")
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("op", OPS)
def test_second_derivative_path_keeps_huge_rows(backend, own_layer_norm, op):
    H = 4
    w, b = torch.tensor([1.0, 0.5, 2.0, -1.0]), torch.tensor([0.1, 0.2, 0.3, 0.4])
    x = torch.tensor([[0.3, -1.2, 0.7, 2.0], [0.5, 0.1, -0.3, 1.0], [7.0, 7.0, 7.0, 7.0]])
    x[0] *= 1e30  # squares overflow float32
    x[2] *= 1e33  # constant and huge
    x = x.requires_grad_()
    g = torch.tensor([[1.0, -2.0, 0.5, 3.0], [0.2, 0.4, -1.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    (plain,) = torch.autograd.grad(_FNS[op](x, H, w, b), x, g)
    (graph,) = torch.autograd.grad(_FNS[op](x, H, w, b), x, g, create_graph=True)
    x64 = x.detach().double().requires_grad_()
    F = torch.nn.functional
    y64 = (F.layer_norm(x64, (H,), w.double(), b.double()) if op in ("layer", "add_layer")
           else F.rms_norm(x64, (H,), w.double()))
    (ref,) = torch.autograd.grad(y64, x64, g.double())  # torch in float64: no overflow at 1e33
    for got, name in ((plain, "plain backward"), (graph, "create_graph")):
        assert torch.isfinite(got).all(), name
        for i in range(3):  # row by row: their gradients differ by 60 orders of magnitude
            assert_close(*_scaled(got[i], ref[i]), atol=1e-4, rtol=1e-4, name=f"{op} {name} row {i}")
    assert graph[0].abs().max() > 0  # was exactly 0


@pytest.mark.parametrize("rows", [3, 1 << 14], ids=["serial", "threaded"])
@pytest.mark.parametrize("op", OPS)
def test_a_row_holding_inf_is_nan_where_torch_is(backend, own_layer_norm, op, rows):
    # regression: at sizes that take the threaded kernel, an RMS row holding one inf came out NaN
    # everywhere (torch: 0 at the finite elements, NaN at the inf), the rsqrt estimate that arcp
    # allows giving NaN for 1/sqrt(inf)
    H = 8
    x = torch.randn(rows, H)
    x[1, 3] = float("inf")
    y = _FNS[op](x, H, None, None)
    F = torch.nn.functional
    ref = F.layer_norm(x, (H,)) if op in ("layer", "add_layer") else F.rms_norm(x, (H,))
    assert torch.equal(torch.isnan(y[1]), torch.isnan(ref[1])), (y[1], ref[1])
    assert torch.isfinite(y[[0, 2]]).all()


def test_extreme_eps_behaves_as_torch():
    # Regressions (found by review): an eps that rounds to 0 in float32 raised ZeroDivisionError
    # from the serial Numba build on a constant row (the threaded build gave NaN, as torch does),
    # and an eps above float32's range raised "value cannot be converted to type float without
    # overflow" from the row rescue, where torch returns the bias
    import torch.nn.functional as F

    from lnorm import functional as LF

    z = torch.zeros(2, 8)
    torch.testing.assert_close(LF.rms_norm(z, (8,), eps=1e-46), F.rms_norm(z, (8,), eps=1e-46), equal_nan=True)
    ones = torch.ones(2, 8, dtype=torch.bfloat16)
    torch.testing.assert_close(LF.layer_norm(ones, (8,), eps=1e-46), F.layer_norm(ones, (8,), eps=1e-46),
                               equal_nan=True)
    x = torch.randn(2, 64)
    w, b = torch.randn(64), torch.randn(64)
    for backend in ("numba", "torch") if numba_available() else ("torch",):
        with lnorm.use_backend(backend):
            for eps in (3.5e38, 1e40):
                torch.testing.assert_close(LF.layer_norm(x, (64,), w, b, eps=eps),
                                           F.layer_norm(x, (64,), w, b, eps=eps))
                torch.testing.assert_close(LF.rms_norm(x, (64,), w, eps=eps), F.rms_norm(x, (64,), w, eps=eps))
