"""Bad input to the functional ops: ValueError/TypeError naming the argument and the value received.

Decisions pinned here: eps must be finite and > 0 (eps=0 is rejected: it turns a constant row
into 0/0); a float64 weight with float32 input is a TypeError, a float32 weight with
float16/bfloat16 input is mixed precision and allowed. The "meta" device stands in for another
device.
"""

import math

import pytest
import torch

import lnorm.functional as LF

X = torch.randn(3, 8)


def _ops():
    """Each op as f(x, normalized_shape, weight, bias, eps, residual)."""
    return {
        "layer_norm": lambda x, s, w=None, b=None, eps=1e-5, r=None: LF.layer_norm(x, s, w, b, eps),
        "rms_norm": lambda x, s, w=None, b=None, eps=1e-5, r=None: LF.rms_norm(x, s, w, eps),
        "add_layer_norm": lambda x, s, w=None, b=None, eps=1e-5, r=None: LF.add_layer_norm(x, r, s, w, b, eps),
        "add_rms_norm": lambda x, s, w=None, b=None, eps=1e-5, r=None: LF.add_rms_norm(x, r, s, w, eps),
    }


OPS = _ops()
X_NAME = {"layer_norm": "input", "rms_norm": "input", "add_layer_norm": "x", "add_rms_norm": "x"}


# (op, parameter) pairs; RMS norm has no bias
OP_PARAMS = [(o, p) for o in OPS for p in ("weight", "bias") if not (p == "bias" and "rms" in o)]
OP_PARAM_IDS = [f"{o}-{p}" for o, p in OP_PARAMS]


@pytest.fixture(params=list(OPS))
def op(request):
    return request.param


@pytest.mark.parametrize(
    ("shape", "x_shape"),
    [(7, (3, 8)), ((3, 7), (3, 8)), ((2, 3, 8), (3, 8)), (1, ())],
    ids=["H7-vs-8", "3x7-vs-3x8", "more-dims-than-input", "scalar-input"],
)
def test_normalized_shape_not_matching_input(op, shape, x_shape):
    x = torch.randn(x_shape)
    shown = list(shape) if isinstance(shape, tuple) else [shape]
    with pytest.raises(ValueError, match=rf"normalized_shape {re_list(shown)} .* "
                                         rf"{X_NAME[op]} of shape {re_list(list(x_shape))}"):
        OPS[op](x, shape)


@pytest.mark.parametrize(
    ("shape", "error", "shown"),
    [("8", TypeError, "'8'"), (8.0, TypeError, "8.0"), (True, TypeError, "True"),
     (torch.tensor([8]), TypeError, r"tensor\(\[8\]\)"), ((8, "a"), TypeError, r"\(8, 'a'\)"),
     ((), ValueError, r"\(\)"), (0, ValueError, "0"), ((8, -1), ValueError, r"\(8, -1\)")],
    ids=["str", "float", "bool", "tensor", "str-in-tuple", "empty", "zero", "negative"],
)
def test_bad_normalized_shape(op, shape, error, shown):
    with pytest.raises(error, match=rf"normalized_shape must .*got {shown}$"):
        OPS[op](X, shape)


def test_torch_size_is_a_normalized_shape(op):
    out = OPS[op](X, X.shape[-1:])
    out = out[0] if isinstance(out, tuple) else out
    assert out.shape == X.shape


@pytest.mark.parametrize(("op", "param"), OP_PARAMS, ids=OP_PARAM_IDS)
@pytest.mark.parametrize("bad_shape", [(7,), (8, 1), (1, 8), ()], ids=["7", "8x1", "1x8", "scalar"])
def test_param_of_wrong_shape(op, param, bad_shape):
    kw = {param[0]: torch.ones(bad_shape)}
    with pytest.raises(ValueError, match=rf"{param} must have shape \[8\] .*got {re_list(list(bad_shape))}"):
        OPS[op](X, 8, **kw)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64],
                         ids=["int64", "int32", "bool", "complex64"])
def test_non_floating_input(op, dtype):
    x = torch.ones(3, 8, dtype=dtype)
    with pytest.raises(TypeError, match=rf"{X_NAME[op]} must be a floating-point tensor, got dtype {dtype}"):
        OPS[op](x, 8)


def test_input_not_a_tensor(op):
    with pytest.raises(TypeError, match=rf"{X_NAME[op]} must be a torch.Tensor, got list"):
        OPS[op]([[1.0] * 8], 8)


@pytest.mark.parametrize(("op", "param"), OP_PARAMS, ids=OP_PARAM_IDS)
def test_integer_params(op, param):
    kw = {param[0]: torch.ones(8, dtype=torch.int64)}
    with pytest.raises(TypeError, match=rf"{param} must be a floating-point tensor, got dtype torch.int64"):
        OPS[op](X, 8, **kw)


@pytest.mark.parametrize(
    ("eps", "error", "shown"),
    [(0, ValueError, "0.0"), (0.0, ValueError, "0.0"), (-1e-5, ValueError, "-1e-05"),
     (math.nan, ValueError, "nan"), (math.inf, ValueError, "inf"),
     ("1e-5", TypeError, "'1e-5'"), (True, TypeError, "True"),
     (torch.tensor(1e-5), TypeError, r"tensor\(1.0000e-05\)")],
    ids=["int-zero", "zero", "negative", "nan", "inf", "str", "bool", "tensor"],
)
def test_bad_eps(op, eps, error, shown):
    with pytest.raises(error, match=rf"eps must be .*got {shown}"):
        OPS[op](X, 8, eps=eps)


@pytest.mark.parametrize("eps", [1e-12, 1, 0.5], ids=["tiny", "int-one", "half"])
def test_good_eps(op, eps):
    out = OPS[op](X, 8, eps=eps)
    out = out[0] if isinstance(out, tuple) else out
    # the value is used as given (an int eps too): rows of X with a large eps are visibly shrunk
    norm = torch.nn.functional.layer_norm if "layer" in op else torch.nn.functional.rms_norm
    torch.testing.assert_close(out, norm(X, (8,), eps=float(eps)))


def test_layer_norm_eps_none_is_an_error():
    # F.layer_norm has no eps=None; only the RMS ops default it
    with pytest.raises(TypeError, match="eps must be a positive float, got None"):
        LF.layer_norm(X, 8, eps=None)


@pytest.mark.parametrize(("op", "param"), OP_PARAMS, ids=OP_PARAM_IDS)
def test_param_on_another_device(op, param):
    kw = {param[0]: torch.ones(8, device="meta")}
    with pytest.raises(ValueError, match=rf"{param} is on meta but {X_NAME[op]} is on cpu"):
        OPS[op](X, 8, **kw)


def test_input_on_another_device_than_weight(op):
    with pytest.raises(ValueError, match=rf"weight is on cpu but {X_NAME[op]} is on meta"):
        OPS[op](X.to("meta"), 8, w=torch.ones(8))


@pytest.mark.parametrize(
    ("x_dtype", "p_dtype"),
    [(torch.float32, torch.float64), (torch.float32, torch.bfloat16), (torch.float64, torch.float32),
     (torch.bfloat16, torch.float16), (torch.bfloat16, torch.float64), (torch.float16, torch.bfloat16)],
    ids=["f32-input-f64-weight", "f32-input-bf16-weight", "f64-input-f32-weight",
         "bf16-input-f16-weight", "bf16-input-f64-weight", "f16-input-bf16-weight"],
)
def test_param_dtype_mismatch(op, x_dtype, p_dtype):
    with pytest.raises(TypeError, match=rf"weight has dtype {p_dtype} but {X_NAME[op]} has dtype {x_dtype}"):
        OPS[op](X.to(x_dtype), 8, w=torch.ones(8, dtype=p_dtype))


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_float32_params_with_half_input_are_allowed(op, x_dtype):
    out = OPS[op](X.to(x_dtype), 8, w=torch.ones(8), b=torch.zeros(8))
    out = out[0] if isinstance(out, tuple) else out
    assert out.dtype == x_dtype


# ---------------------------------------------------------------------------------- residual

ADD = {"add_layer_norm": LF.add_layer_norm, "add_rms_norm": LF.add_rms_norm}


@pytest.fixture(params=list(ADD))
def add_op(request):
    return ADD[request.param]


@pytest.mark.parametrize("bad_shape", [(3, 1), (8,), (1, 3, 8)], ids=["3x1", "8", "1x3x8"])
def test_residual_of_wrong_shape(add_op, bad_shape):
    with pytest.raises(ValueError, match=rf"residual must have the shape of x \[3, 8\], "
                                         rf"got {re_list(list(bad_shape))}"):
        add_op(X, torch.ones(bad_shape), 8)


def test_residual_not_floating(add_op):
    with pytest.raises(TypeError, match="residual must be a floating-point tensor, got dtype torch.int64"):
        add_op(X, torch.ones(3, 8, dtype=torch.int64), 8)


def test_residual_not_a_tensor(add_op):
    with pytest.raises(TypeError, match="residual must be a torch.Tensor or None, got list"):
        add_op(X, [1.0], 8)


def test_residual_on_another_device(add_op):
    with pytest.raises(ValueError, match="residual is on meta but x is on cpu"):
        add_op(X, X.to("meta"), 8)


@pytest.mark.parametrize(
    ("x_dtype", "r_dtype"),
    [(torch.float32, torch.float64), (torch.bfloat16, torch.float16), (torch.float32, torch.bfloat16)],
    ids=["f32-x-f64-residual", "bf16-x-f16-residual", "f32-x-bf16-residual"],
)
def test_residual_dtype_mismatch(add_op, x_dtype, r_dtype):
    with pytest.raises(TypeError, match=rf"residual must have x's dtype {x_dtype} or float32, "
                                        rf"got {r_dtype}"):
        add_op(X.to(x_dtype), torch.ones(3, 8, dtype=r_dtype), 8)


@pytest.mark.parametrize("flag", [1, "yes", None], ids=["int", "str", "None"])
def test_residual_in_fp32_must_be_bool(add_op, flag):
    with pytest.raises(TypeError, match=rf"residual_in_fp32 must be a bool, got {flag!r}"):
        add_op(X, X, 8, residual_in_fp32=flag)


def re_list(values) -> str:
    """The regex for ``[a, b]`` as the messages print shapes."""
    return r"\[" + ", ".join(str(v) for v in values) + r"\]"
