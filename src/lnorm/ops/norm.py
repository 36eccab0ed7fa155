"""The one fused op behind ``layer_norm``, ``rms_norm``, ``add_layer_norm`` and ``add_rms_norm``.

Reads top to bottom: backends (Numba kernels, pure torch) -> launchers -> ``torch.library`` custom
ops with their fake (meta) implementations and autograd -> :func:`fused_norm`, the entry point.

Notation: ``x`` is (R, H), R rows and H normalized features. ``center=True`` is layer norm,
``center=False`` RMS norm. With ``residual`` given, the op first forms ``s = x + residual`` (in
``residual_dtype``), returns it as the new residual and normalizes ``s``. Statistics (mean, rstd)
are (R,) in float32 (float64 for float64 data) and are all that backward keeps besides the
normalized op's input, never the normalized tensor.

The custom ops make ``torch.compile`` treat the kernels as opaque ops with known output shapes;
in eager mode :func:`fused_norm` calls the same launchers through an ``autograd.Function`` to
skip the dispatcher's Python overhead, which is a large share of the time at small sizes. Under
``torch.export`` it emits standard aten ops instead (:mod:`lnorm.ops.export`).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor

from lnorm.ops import backend
from lnorm.ops.export import exporting, norm_in_standard_ops
from lnorm.ops.guards import batched, static_size, use_torch_path

# ---------------------------------------------------------------------------------------- helpers


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half types compute (and keep statistics) in float32; float64 stays float64 for gradcheck.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _residual_dtype(x: Tensor, residual: Tensor | None, residual_in_fp32: bool) -> torch.dtype:
    # the dtype of torch's `x + residual` (float64 x with a float32 residual sums in float64)
    if residual_in_fp32:
        return torch.float32 if x.dtype != torch.float64 else torch.float64
    return torch.promote_types(x.dtype, residual.dtype) if residual is not None else x.dtype


# Below this many elements a plain float32/float64 layer norm (no residual) runs torch's own fused
# kernel even on the numba backend: torch's one-pass CPU kernel is the faster one there, ours above
# (``lnorm bench ops`` shows where they cross). RMS norm and the fused add have no torch kernel to
# delegate to and always take ours.
NATIVE_LAYER_NORM_BELOW = 1 << 22
# ... and only for rows of at least this many features: on tiny rows torch's fused backward loses
# accuracy where rstd is large (at H=1, dx comes out 3e-5 where the exact value is 0), ours does not.
NATIVE_LAYER_NORM_MIN_FEATURES = 32


def delegates_to_torch(x: Tensor, features: int) -> bool:
    """Whether a plain layer norm of ``x`` over its last ``features`` runs torch's own kernel."""
    return (
        x.dtype in (torch.float32, torch.float64)
        and features >= NATIVE_LAYER_NORM_MIN_FEATURES
        and not _use_numba(x, plain_layer_norm=True)
        and not _use_triton(x, features)
    )


def _use_triton(x: Tensor, features: int) -> bool:
    # the Triton kernels where the backend picks them for x's device and they take x (dtype,
    # width); float64 and very wide rows go on to the torch launchers
    if backend.backend_for(x.device) != "triton":
        return False
    from lnorm.ops import _triton_norm

    return _triton_norm.supports(x, features)


def overflowed(rstd: Tensor) -> bool:
    """Whether torch's layer norm overflowed on some row: it gives a finite row whose squares
    overflow (float32 past about 1e19) rstd 0 and returns 0 or NaN there; lnorm's paths then
    compute the row on a scaled copy. (NaN rows count too; they stay NaN either way.)"""
    return not bool((rstd > 0).all())


def torch_layer_norm(x: Tensor, normalized_shape, weight, bias, eps: float) -> Tensor | None:
    """torch's own layer norm of ``x`` (where :func:`delegates_to_torch`), or None where it
    overflowed on a row, for the caller to run :func:`fused_norm`. Under ``torch.compile`` the
    check (data-dependent) is left out: compiled graphs keep torch's kernel as it is."""
    if torch.compiler.is_compiling() or use_torch_path():  # traced or under torch.func: no check
        return torch.layer_norm(x, normalized_shape, weight, bias, eps)
    y, _, rstd = torch.native_layer_norm(x, normalized_shape, weight, bias, eps)
    return None if overflowed(rstd) else y


def _use_numba(x: Tensor, plain_layer_norm: bool = False) -> bool:
    if use_torch_path() or x.numel() == 0 or backend.backend_for(x.device) != "numba":
        return False
    # Small plain layer norms run torch's kernel (float32/64, see delegates_to_torch) or the torch
    # launchers; bfloat16 always takes the kernels, which read it directly (torch's path
    # converts to float32 and back, and its backward is a composite: 10-30x slower, measured).
    return not (plain_layer_norm and x.numel() < NATIVE_LAYER_NORM_BELOW and x.dtype is not torch.bfloat16)


# ------------------------------------------------------------------------------- numba launchers


# Launch overhead matters at small sizes (a 256x768 layer norm takes tens of microseconds), so the
# launchers make as few torch calls as they can: scratch and output arrays come from numpy and
# are wrapped with torch.from_numpy, absent arguments are cached constants.

_NP = {torch.float32: np.float32, torch.float64: np.float64}


def _arr(t: Tensor, dtype: torch.dtype) -> np.ndarray:
    """A C-contiguous numpy view of ``t`` in ``dtype`` (a copy only when needed)."""
    if t.dtype is not dtype:
        t = t.to(dtype)
    if not t.is_contiguous():
        t = t.contiguous()
    return t.detach().numpy()


def _bits(t: Tensor) -> np.ndarray:
    """The raw 16 bits of a bfloat16 tensor as a C-contiguous uint16 array (the kernels read
    bfloat16 directly, see ``lnorm.ops._numba_kernels``)."""
    return t.detach().contiguous().view(torch.int16).numpy().view(np.uint16)


def _in(t: Tensor, dtype: torch.dtype) -> np.ndarray:
    """A kernel input: bfloat16 as its bits, anything else as :func:`_arr` in ``dtype``."""
    return _bits(t) if t.dtype is torch.bfloat16 else _arr(t, dtype)


# Constant weight/bias vectors are cached up to this size (64 of them: at most 16 MB); larger ones
# are made per call, which costs little next to a norm over rows of that size.
_CONST_CACHE_MAX_BYTES = 1 << 18


def _const(value: float, n: int, dtype) -> np.ndarray:
    if n * np.dtype(dtype).itemsize > _CONST_CACHE_MAX_BYTES:
        return np.full(n, value, dtype=dtype)
    return _const_cached(value, n, dtype)


@functools.lru_cache(maxsize=64)
def _const_cached(value: float, n: int, dtype) -> np.ndarray:
    return np.full(n, value, dtype=dtype)


@functools.lru_cache(maxsize=8)
def _none2d(dtype) -> np.ndarray:
    return np.empty((0, 1), dtype=dtype)


def _fwd_numba(x, residual, weight, bias, eps, center, res_dtype):
    from lnorm.ops import _numba_kernels as K

    R, H = x.shape
    cdt = _compute_dtype(x.dtype)
    # bfloat16 data (and a bfloat16 residual stream) is read and written as raw bits by the
    # kernels: no conversion passes.
    bf16 = x.dtype is torch.bfloat16 and (
        residual is None or (residual.dtype is torch.bfloat16 and res_dtype is torch.bfloat16)
    )
    if residual is not None and res_dtype != cdt and not bf16:
        # A float16 residual stream: the sum is rounded to res_dtype before it is normalized (as
        # torch's `x + r` then the norm), so statistics and the saved new residual agree. The
        # float32/float64/bfloat16 streams take the fused add (which rounds the same way).
        res_out = (x.to(res_dtype) + residual.to(res_dtype)).contiguous()
        y, _, mean, rstd = _fwd_numba(res_out, None, weight, bias, eps, center, res_dtype)
        return y.to(x.dtype), res_out, mean, rstd
    npdt = _NP[cdt]
    xa = _bits(x) if bf16 else _arr(x, cdt)
    ra = (_bits(residual) if bf16 else _arr(residual, cdt)) if residual is not None else _none2d(npdt)
    wa = _arr(weight, cdt) if weight is not None else _const(1.0, H, npdt)
    ba = _arr(bias, cdt) if bias is not None else _const(0.0, H, npdt)
    y = np.empty((R, H), dtype=xa.dtype)
    res_out = np.empty((R, H), dtype=xa.dtype) if residual is not None else _none2d(xa.dtype.type)
    mean = np.empty(R if center else 0, dtype=npdt)
    rstd = np.empty(R, dtype=npdt)
    K.pick(K.norm_fwd, K.norm_fwd_serial, R * H)(
        xa, ra, wa, ba, npdt(eps), npdt(1.0 / H), center, y, res_out, mean, rstd
    )
    if bf16:
        yt = torch.from_numpy(y.view(np.int16)).view(torch.bfloat16)
    else:
        yt = torch.from_numpy(y)
        if x.dtype is not cdt:
            yt = yt.to(x.dtype)
    if residual is None:
        res_t = torch.empty(0, dtype=res_dtype)
    elif bf16:
        res_t = torch.from_numpy(res_out.view(np.int16)).view(torch.bfloat16)
    else:
        res_t = torch.from_numpy(res_out)
    return yt, res_t, torch.from_numpy(mean), torch.from_numpy(rstd)


def _bwd_numba(dy, src, weight, mean, rstd, center, need_dw, need_db, dres):
    from lnorm.ops import _numba_kernels as K

    R, H = src.shape
    cdt = rstd.dtype
    npdt = _NP[cdt]
    kernel = K.pick(K.norm_bwd, K.norm_bwd_serial, R * H)
    chunks = max(1, min(R, 4 * K.num_threads())) if kernel is not K.norm_bwd_serial else 1
    dx = np.empty((R, H), dtype=npdt)
    dw_part = np.zeros((chunks, H if need_dw else 0), dtype=npdt)
    db_part = np.zeros((chunks, H if need_db else 0), dtype=npdt)
    kernel(
        _in(dy, cdt), _in(src, cdt),
        _arr(weight, cdt) if weight is not None else _const(1.0, H, npdt),
        _arr(mean, cdt) if center else mean.detach().numpy(), _arr(rstd, cdt), npdt(1.0 / H), center,
        _in(dres, cdt) if dres is not None else _none2d(npdt),
        dx, dw_part, db_part,
    )
    dw = torch.from_numpy(dw_part[0] if chunks == 1 else dw_part.sum(0)) if need_dw else None
    db = torch.from_numpy(db_part[0] if chunks == 1 else db_part.sum(0)) if need_db else None
    return torch.from_numpy(dx), dw, db


# ------------------------------------------------------------------------------- torch launchers


def _fwd_torch(x, residual, weight, bias, eps, center, res_dtype):
    R, H = x.shape[0], static_size(x.shape[1])  # H: a constant also in a trace
    cdt = _compute_dtype(x.dtype)
    if residual is not None:
        src = x.to(res_dtype) + residual.to(res_dtype)
        res_out = src
    else:
        src = x
        res_out = torch.empty(0, dtype=res_dtype, device=x.device)
    if center:
        # torch's kernel is inexact on half-precision constant rows of large magnitude: normalize
        # half types in float32, and give the kernel parameters of the data's dtype.
        s = src.to(cdt) if src.dtype in (torch.float16, torch.bfloat16) else src
        w = weight.to(s.dtype) if weight is not None else None
        b = bias.to(s.dtype) if bias is not None else None
        y, mean, rstd = torch.native_layer_norm(s, [H], w, b, eps)
        y = y.to(x.dtype)
        mean, rstd = mean.reshape(R).to(cdt), rstd.reshape(R).to(cdt)
    else:
        s = src.to(cdt)
        rstd = torch.rsqrt(s.square().mean(-1) + eps)
        y = s * rstd.unsqueeze(-1)  # not rstd[:, None]: a trace of 2-D rows replayed on (B, T, H) broadcast it wrong
        if weight is not None:
            y = y * weight.to(cdt)
        if bias is not None:
            y = y + bias.to(cdt)
        y = y.to(x.dtype)
        mean = torch.empty(0, dtype=cdt, device=x.device)
    # a finite row whose squares overflow gets rstd 0 (or NaN); checked on the CPU only (on a
    # GPU the check would wait for the device on every call), and not where the check itself
    # would be data-dependent control flow to a trace or a torch.func transform
    overflowed = ~(rstd > 0)
    if src.device.type == "cpu" and not use_torch_path() and overflowed.any():
        _redo_scaled_rows(src, weight, bias, eps, center, overflowed, y, mean, rstd)
    return y, res_out, mean, rstd


def _redo_scaled_rows(src, weight, bias, eps, center, rows, y, mean, rstd) -> None:
    """Recompute ``rows`` (a mask) of ``y``, ``mean``, ``rstd`` on the rows times a power of two
    (exact) that brings max |x| under 2**40, as the Numba kernel does: torch's kernels return 0
    or NaN where the squares overflow (float32 past about 1e19). Rows holding NaN or inf come
    out NaN, as before."""
    cdt = rstd.dtype
    mu, d, r, row_mean, row_rstd, const = _scaled_row_stats(src[rows].to(cdt), center, eps)
    out = torch.where(const, torch.zeros_like(d), d * r)  # a constant row: exactly the bias
    if weight is not None:
        out = out * weight.to(cdt)
    if bias is not None:
        out = out + bias.to(cdt)
    y[rows] = out.to(y.dtype)
    rstd[rows] = row_rstd.squeeze(-1)
    if center:
        mean[rows] = row_mean.squeeze(-1)


def _scaled_row_stats(s: Tensor, center: bool, eps: float):
    """Statistics of each row of ``s`` taken on the row times the power of two (exact, a constant
    to autograd) that brings its max |x| under 2**40 (1 for a row already under it), so that the
    squares of any finite float32 row stay finite. The mean is shifted by the row's first value, as
    the Numba kernel takes it: a constant row gets its own value as its mean exactly, so its
    deviations are 0, not the rounding error of a sum of large values.

    Returns ``(mu, d, r, mean, rstd, const)``: the scaled rows' mean, deviations and 1/sqrt(var +
    eps * scale**2); the rows' own mean and rstd; and which rows are constant (variance 0). eps *
    scale**2 may underflow to 0, harmless unless the row is constant: its rstd is then 1/sqrt(eps),
    as for any constant row. All (rows, 1) but ``d``; differentiable in ``s``."""
    m = s.detach().abs().amax(-1, keepdim=True)
    scale = torch.ldexp(torch.ones_like(m), (40 - torch.frexp(m).exponent).clamp(max=0))
    xs = s * scale
    if center:
        shift = xs[:, :1].detach()
        mu = shift + (xs - shift).mean(-1, keepdim=True)
    else:
        mu = torch.zeros_like(m)
    d = xs - mu
    var = d.square().mean(-1, keepdim=True)
    r = torch.rsqrt(var + eps * scale * scale)
    const = var == 0
    # 1/sqrt(eps) taken in float64: eps itself may not fit r's dtype (eps = 1e40 in float32
    # overflowed to a RuntimeError where torch returns the bias)
    rstd = torch.where(const, torch.full_like(r, eps, dtype=torch.float64).rsqrt().to(r.dtype), r * scale)
    return mu, d, r, mu / scale, rstd, const


def _bwd_torch(dy, src, weight, mean, rstd, center, need_dw, need_db, dres):
    cdt = rstd.dtype
    H = src.shape[-1]
    s = src.to(cdt)
    g = dy.to(cdt)
    if center:
        d = s - mean[:, None]
        # the saved mean is rounded to cdt; the row's mean of d is that rounding error, which a
        # nearly constant row's large rstd would multiply (see the Numba backward kernel)
        xhat = (d - d.mean(-1, keepdim=True)) * rstd[:, None]
    else:
        xhat = s * rstd[:, None]
    dw = (g * xhat).sum(0) if need_dw else None
    db = g.sum(0) if need_db else None
    if weight is not None:
        g = g * weight.to(cdt)
    c1 = (g * xhat).sum(-1, keepdim=True) / H
    dx = g - xhat * c1
    if center:
        dx = dx - g.sum(-1, keepdim=True) / H
    dx = dx * rstd[:, None]
    if dres is not None:
        dx = dx + dres.to(cdt)
    return dx, dw, db


def _fwd(x, residual, weight, bias, eps, center, res_dtype):
    if _use_triton(x, x.shape[1]):
        from lnorm.ops import _triton_norm

        return _triton_norm.norm_fwd(x, residual, weight, bias, eps, center, res_dtype)
    impl = _fwd_numba if _use_numba(x, center and residual is None) else _fwd_torch
    return impl(x, residual, weight, bias, eps, center, res_dtype)


def _bwd(dy, src, weight, mean, rstd, center, need_dw, need_db, dres, *, add_op=False):
    # Either backward is right for either forward's statistics; the choice is only speed. An add
    # + norm whose new residual got no gradient (dres None) still chooses as an add + norm does.
    if _use_triton(src, src.shape[1]):
        from lnorm.ops import _triton_norm

        return _triton_norm.norm_bwd(dy, src, weight, mean, rstd, center, need_dw, need_db, dres)
    impl = _bwd_numba if _use_numba(src, center and dres is None and not add_op) else _bwd_torch
    return impl(dy, src, weight, mean, rstd, center, need_dw, need_db, dres)


# ------------------------------------------------------------------------- torch.library ops


@torch.library.custom_op("lnorm::norm_fwd", mutates_args=())
def norm_fwd_op(
    x: Tensor,
    residual: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    center: bool,
    residual_in_fp32: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    res_dtype = _residual_dtype(x, residual, residual_in_fp32)
    y, res_out, mean, rstd = _fwd(x, residual, weight, bias, eps, center, res_dtype)
    return y, res_out, mean, rstd


@norm_fwd_op.register_fake
def _(x, residual, weight, bias, eps, center, residual_in_fp32):
    R, H = x.shape
    cdt = _compute_dtype(x.dtype)
    res_dtype = _residual_dtype(x, residual, residual_in_fp32)
    res_out = x.new_empty((R, H) if residual is not None else (0,), dtype=res_dtype)
    mean = x.new_empty((R,) if center else (0,), dtype=cdt)
    return x.new_empty((R, H)), res_out, mean, x.new_empty((R,), dtype=cdt)


@torch.library.custom_op("lnorm::norm_bwd", mutates_args=())
def norm_bwd_op(
    dy: Tensor,
    src: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    center: bool,
    need_dw: bool,
    need_db: bool,
    dres: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    dx, dw, db = _bwd(dy, src, weight, mean, rstd, center, need_dw, need_db, dres)
    cdt = rstd.dtype
    dx = dx.to(cdt)  # the Triton launcher may return dx already in dy's dtype
    dw = dw if dw is not None else torch.zeros(0, dtype=cdt, device=src.device)
    db = db if db is not None else torch.zeros(0, dtype=cdt, device=src.device)
    return dx, dw, db


@norm_bwd_op.register_fake
def _(dy, src, weight, mean, rstd, center, need_dw, need_db, dres):
    R, H = src.shape
    cdt = rstd.dtype
    return (
        src.new_empty((R, H), dtype=cdt),
        src.new_empty((H if need_dw else 0,), dtype=cdt),
        src.new_empty((H if need_db else 0,), dtype=cdt),
    )


# The custom op's autograd and the eager Function share the context layout and the gradient
# bookkeeping; they differ only in how backward's kernel is called (op vs launcher).


def _save(ctx, x, residual, weight, bias, center, res_out, mean, rstd) -> None:
    ctx.save_for_backward(res_out if residual is not None else x, weight, mean, rstd)
    ctx.center = center
    ctx.has_residual = residual is not None
    ctx.has_bias = bias is not None
    ctx.x_dtype = x.dtype
    ctx.res_dtype = residual.dtype if residual is not None else None
    ctx.w_dtype = weight.dtype if weight is not None else None
    ctx.b_dtype = bias.dtype if bias is not None else None


def _grads(ctx, dy, dres_out, bwd) -> tuple:
    src, weight, mean, rstd = ctx.saved_tensors
    need_dw = weight is not None and ctx.needs_input_grad[2]
    need_db = ctx.has_bias and ctx.needs_input_grad[3]
    dres = dres_out if ctx.has_residual and dres_out is not None and dres_out.numel() else None
    if dy is None:  # only the new residual was used (the eager Function does not materialize zeros)
        dy = src.new_zeros(src.shape, dtype=ctx.x_dtype)
    dx, dw, db = bwd(dy.contiguous(), src, weight, mean, rstd, ctx.center, need_dw, need_db, dres)
    d_x = dx.to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
    d_res = dx.to(ctx.res_dtype) if ctx.has_residual and ctx.needs_input_grad[1] else None
    if d_res is not None and d_res is d_x:  # both `.to` returned dx itself
        d_res = d_res.clone()  # the two gradients must not share memory (an in-place edit of one)
    return (
        d_x,
        d_res,
        dw.to(ctx.w_dtype) if need_dw else None,
        db.to(ctx.b_dtype) if need_db else None,
        None,
        None,
        None,
    )


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, center, residual_in_fp32 = inputs
    _, res_out, mean, rstd = output
    _save(ctx, x, residual, weight, bias, center, res_out, mean, rstd)


def _backward(ctx, dy, dres_out, dmean, drstd):
    return _grads(ctx, dy, dres_out, norm_bwd_op)


norm_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------- eager autograd.Function


def _bwd_recomputed(eps, dy, src, weight, mean, rstd, center, need_dw, need_db, dres):
    """:func:`_bwd_torch` with the statistics recomputed from ``src`` in torch ops, so that the
    gradients are a differentiable function of the inputs (backward with ``create_graph=True``):
    second derivatives are exact on either backend and at every size."""
    # on the rows scaled as the forward's overflow rescue does (scale 1 for ordinary rows): plain
    # torch ops would square a row past 1.8e19 to inf and give every such row a zero gradient
    *_, row_mean, row_rstd, _ = _scaled_row_stats(src.to(rstd.dtype), center, eps)
    mean = row_mean.squeeze(-1) if center else mean
    return _bwd_torch(dy, src, weight, mean, row_rstd.squeeze(-1), center, need_dw, need_db, dres)


class _FusedNorm(torch.autograd.Function):
    """Eager path: the same launchers as the custom ops, without the dispatcher round trip."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, center, residual_in_fp32):
        res_dtype = _residual_dtype(x, residual, residual_in_fp32)
        y, res_out, mean, rstd = _fwd(x, residual, weight, bias, eps, center, res_dtype)
        _save(ctx, x, residual, weight, bias, center, res_out, mean, rstd)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, rstd)
        # no zero tensors for the outputs backward ignores (mean, rstd, an unused residual): on a
        # GPU their allocation and fill were a large share of a step's host time (measured)
        ctx.set_materialize_grads(False)
        return y, res_out, mean, rstd

    @staticmethod
    def backward(ctx, dy, dres_out, dmean, drstd):
        # grad mode is on in backward only with create_graph=True (a second derivative may follow);
        # a transform active in backward (is_grads_batched=True, jacobian(vectorize=True) run it
        # under vmap) gets the same torch ops, which it can batch, not the kernels, which it cannot
        if torch.is_grad_enabled() or use_torch_path() or batched(dy) or batched(dres_out):
            return _grads(ctx, dy, dres_out, functools.partial(_bwd_recomputed, ctx.eps))
        return _grads(ctx, dy, dres_out, functools.partial(_bwd, add_op=ctx.has_residual))


# ------------------------------------------------------------------------------ entry point


def fused_norm(x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None, eps: float,
               center: bool, residual_in_fp32: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Normalize the rows of 2-D ``x`` (after adding ``residual``). Inputs are validated by the caller.

    Returns ``(y, new_residual, mean, rstd)``; ``new_residual`` is empty when ``residual`` is None.
    """
    if torch.compiler.is_compiling():
        if exporting():
            # standard ops in exported programs: portable, and ONNX has operators for them
            res_dtype = _residual_dtype(x, residual, residual_in_fp32)
            return norm_in_standard_ops(x, residual, weight, bias, eps, center, res_dtype,
                                        _compute_dtype(x.dtype))
        if not use_torch_path():
            return norm_fwd_op(x, residual, weight, bias, eps, center, residual_in_fp32)
        # compiled code that runs a torch.func transform (compile(lambda x: jvp(norm, ...))): the
        # op has no forward-AD or batching rule (a jvp through it gave a zero tangent), so the
        # torch path below
    if use_torch_path():
        # traced or under a torch.func transform: torch ops that the tracer and the transforms
        # see through (see lnorm.ops.guards)
        return _fwd_torch(x, residual, weight, bias, eps, center, _residual_dtype(x, residual, residual_in_fp32))
    if center and residual is None and delegates_to_torch(x, x.shape[1]):
        # Plain layer norm where torch's kernel is the faster one: call it with torch's own
        # autograd (no Python Function in between; double backward works there too).
        y, mean, rstd = torch.native_layer_norm(x, [x.shape[1]], weight, bias, eps)
        if not overflowed(rstd):
            R = x.shape[0]
            return y, x.new_empty(0), mean.view(R), rstd.view(R)
    if not torch.is_grad_enabled() or not (
        x.requires_grad
        or (residual is not None and residual.requires_grad)
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
    ):
        # Nothing to differentiate: skip autograd.Function's bookkeeping (inference).
        res_dtype = _residual_dtype(x, residual, residual_in_fp32)
        return _fwd(x, residual, weight, bias, eps, center, res_dtype)
    return _FusedNorm.apply(x, residual, weight, bias, eps, center, residual_in_fp32)
