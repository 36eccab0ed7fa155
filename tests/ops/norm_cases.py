"""Shared machinery of the norm-op tests: run one op three ways and compare.

An op is one of ``OPS``: ``layer``, ``rms`` (plain norms) and ``add_layer``, ``add_rms`` (fused
residual add, returning ``(out, new_residual)``). :func:`run` evaluates it as

* ``"ours"``: :mod:`lnorm.functional` on the current backend;
* ``"torch"``: ``F.layer_norm`` / ``F.rms_norm`` on ``x + residual`` in the same dtype (the
  float32 sum when the residual stream is float32), what a user would write without lnorm;
* ``"ref64"``: :mod:`lnorm.reference` in float64 (the spec), on the same values upcast (the
  norm of the residual stream as stored, i.e. the sum rounded to the stream's dtype),

then backpropagates fixed upstream gradients (for ``out`` and, for the add ops, for
``new_residual``) and returns the outputs and every input gradient in a dict.
:func:`check_against_torch_and_ref` applies the right comparison for the dtype: direct closeness
for float32/float64, the three-way check for float16/bfloat16.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

import lnorm.functional as LF
from lnorm.reference import add_layer_norm_ref, add_rms_norm_ref
from tolerances import LOW_PRECISION, assert_close, assert_three_way

OPS = ("layer", "rms", "add_layer", "add_rms")
BACKENDS = ("numba", "torch")
DTYPES = {"f32": torch.float32, "f64": torch.float64, "bf16": torch.bfloat16, "f16": torch.float16}

# (id, leading dims, normalized_shape): odd sizes, T=1, no leading dim, several trailing dims,
# hidden size 1, an empty batch.
SHAPES = [
    ("B17-H33", (17,), (33,)),
    ("B2-T1-H64", (2, 1), (64,)),
    ("B2-T3-C4-H17", (2, 3, 4), (17,)),
    ("nolead-H7", (), (7,)),
    ("B5-H3x8", (5,), (3, 8)),
    ("B2-H2x3x5", (2,), (2, 3, 5)),
    ("B6-H1", (6,), (1,)),
    ("B3-H1023", (3,), (1023,)),
    ("empty-B0-T3-H8", (0, 3), (8,)),
]


def is_add(op: str) -> bool:
    return op.startswith("add_")


def has_bias(op: str) -> bool:
    return op in ("layer", "add_layer")


def make_inputs(
    op: str,
    lead: tuple[int, ...],
    shape: tuple[int, ...],
    dtype: torch.dtype,
    *,
    affine: bool = True,
    param_dtype: torch.dtype | None = None,
    residual: bool = True,
    residual_dtype: torch.dtype | None = None,
    seed: int = 0,
) -> dict:
    """Random inputs with non-trivial weight and bias (so their gradients are checked)."""
    g = torch.Generator().manual_seed(seed)
    full = (*lead, *shape)
    pdt = param_dtype or dtype

    def rnd(size, dt, scale=1.0, offset=0.0):
        return (torch.randn(size, generator=g, dtype=torch.float64) * scale + offset).to(dt)

    inputs = {
        "x": rnd(full, dtype),
        "residual": rnd(full, residual_dtype or dtype) if is_add(op) and residual else None,
        "weight": rnd(shape, pdt, 0.5, 1.0) if affine else None,
        "bias": rnd(shape, pdt, 0.5) if affine and has_bias(op) else None,
    }
    # upstream gradients representable in the data's dtype: autograd rounds the gradient of a
    # bfloat16 output to bfloat16, and the float64 reference must see the same values
    inputs["dy"] = rnd(full, dtype).double()
    inputs["dres"] = rnd(full, dtype).double()
    return inputs


def default_eps(op: str, dtype: torch.dtype) -> float:
    """torch's defaults: 1e-5 for layer norm, finfo of the compute dtype for RMS norm."""
    if has_bias(op):
        return 1e-5
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def run(
    impl: str,
    op: str,
    x,
    residual,
    weight,
    bias,
    normalized_shape,
    *,
    eps: float | None = None,
    residual_in_fp32: bool = False,
    dy=None,
    dres=None,
    grads: bool = True,
) -> dict:
    """Evaluate ``op`` with implementation ``impl``; returns outputs and gradients by name."""
    shape = tuple(normalized_shape) if not isinstance(normalized_shape, int) else (normalized_shape,)
    eps = default_eps(op, x.dtype) if eps is None else eps
    names = ["x", "residual", "weight", "bias"]
    leaves = dict(zip(names, (x, residual, weight, bias), strict=True))
    if impl == "ref64":
        leaves = {k: (v.detach().double() if v is not None else None) for k, v in leaves.items()}
    else:
        leaves = {k: (v.detach().clone() if v is not None else None) for k, v in leaves.items()}
    if grads:
        for v in leaves.values():
            if v is not None:
                v.requires_grad_(True)
    x_, r_, w_, b_ = (leaves[k] for k in names)
    center = op in ("layer", "add_layer")

    if impl == "ours":
        if op == "layer":
            out, new_res = LF.layer_norm(x_, shape, w_, b_, eps), None
        elif op == "rms":
            out, new_res = LF.rms_norm(x_, shape, w_, eps), None
        elif op == "add_layer":
            out, new_res = LF.add_layer_norm(x_, r_, shape, w_, b_, eps, residual_in_fp32)
        else:
            out, new_res = LF.add_rms_norm(x_, r_, shape, w_, eps, residual_in_fp32)
    elif impl == "torch":
        if is_add(op):
            res_dtype = _res_dtype(x_, r_, residual_in_fp32)
            new_res = x_.to(res_dtype) if r_ is None else x_.to(res_dtype) + r_.to(res_dtype)
            src = new_res
        else:
            new_res, src = None, x_
        # torch's CPU kernels take float32 params with half input, but not half params with a
        # float32 input (the float32 residual stream): cast the params to the input's dtype then.
        w2 = w_.to(src.dtype) if w_ is not None and src.dtype not in LOW_PRECISION else w_
        b2 = b_.to(src.dtype) if b_ is not None and src.dtype not in LOW_PRECISION else b_
        with warnings.catch_warnings():  # "Mismatch dtype between input and weight" (expected)
            warnings.simplefilter("ignore", UserWarning)
            if center and src.is_cuda and src.dtype in LOW_PRECISION and w2 is not None and w2.dtype != src.dtype:
                # torch's CUDA kernel refuses half input with float32 params; its CPU kernel takes
                # them and computes in float32: do that here
                out = F.layer_norm(src.float(), shape, w2, b2, eps)
            elif center:
                out = F.layer_norm(src, shape, w2, b2, eps)
            else:
                out = F.rms_norm(src, shape, w2, eps)
        out = out.to(x_.dtype)
    elif impl == "ref64":
        # the spec in float64: the norm of the residual stream as stored, x + residual rounded to
        # the stream's dtype (the leaves are upcast, so the rounding is applied here; its gradient
        # passes to x and residual unchanged)
        if is_add(op) and r_ is not None:
            rd = _res_dtype(x, residual, residual_in_fp32)
            stored = (x.to(rd) + residual.to(rd)).double()
            exact = x_ + r_
            src64, res64 = exact + (stored - exact).detach(), None
        else:
            src64, res64 = x_, r_
        if center:
            out, s = add_layer_norm_ref(src64, res64, shape, w_, b_, eps)[:2]
        else:
            out, s = add_rms_norm_ref(src64, res64, shape, w_, eps)[:2]
        new_res = s if is_add(op) else None
    else:
        raise ValueError(impl)

    result = {"out": out}
    if is_add(op):
        result["new_residual"] = new_res
    if grads:
        loss = (out.double() * dy.double()).sum()
        if is_add(op):
            loss = loss + (new_res.double() * dres.double()).sum()
        present = [k for k in names if leaves[k] is not None]
        gs = torch.autograd.grad(loss, [leaves[k] for k in present], allow_unused=True)
        for k, gk in zip(present, gs, strict=True):
            result["d" + k] = gk if gk is not None else torch.zeros_like(leaves[k])
    return result


def _res_dtype(x, residual, residual_in_fp32):
    if residual_in_fp32 and x.dtype != torch.float64:
        return torch.float32
    return torch.promote_types(x.dtype, residual.dtype) if residual is not None else x.dtype


def check_against_torch_and_ref(
    op: str, inputs: dict, shape, *, eps=None, residual_in_fp32: bool = False, label: str = ""
) -> dict:
    """Run ours, torch and ref64 on ``inputs``; assert outputs and all gradients agree."""
    args = (inputs["x"], inputs["residual"], inputs["weight"], inputs["bias"], shape)
    kw = {"eps": eps, "residual_in_fp32": residual_in_fp32, "dy": inputs["dy"], "dres": inputs["dres"]}
    ours = run("ours", op, *args, **kw)
    theirs = run("torch", op, *args, **kw)
    ref = run("ref64", op, *args, **kw)
    dtype = inputs["x"].dtype
    assert ours["out"].dtype == dtype, f"out dtype {ours['out'].dtype}, input {dtype}"
    assert ours["out"].shape == inputs["x"].shape
    assert set(ours) == set(theirs) == set(ref), (sorted(ours), sorted(theirs), sorted(ref))
    for key in ours:
        a, t, r = ours[key], theirs[key], ref[key]
        name = f"{label}{op}:{key}"
        assert a.dtype == t.dtype, f"{name}: dtype {a.dtype}, torch gives {t.dtype}"
        if key == "new_residual":
            # x + residual rounded once to the residual dtype: must equal torch's add
            assert_close(a, t, atol=0.0, rtol=0.0, name=name)
        else:
            # torch's own error against the spec bounds ours; in float32/float64 we must also be
            # close to the spec outright (torch can be the one that is off, e.g. dx at H=1)
            assert_three_way(a, r, t, name=name)
            if a.dtype not in LOW_PRECISION:
                assert_close(a, r, name=name + " vs ref64")
    return ours


def numel(shape) -> int:
    return math.prod(shape)
