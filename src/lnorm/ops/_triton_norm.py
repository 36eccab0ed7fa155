"""Triton kernels for the fused norm op: the CUDA implementation behind ``lnorm::norm_fwd`` /
``lnorm::norm_bwd`` (and, under ``TRITON_INTERPRET=1``, a way to run the same kernels on CPU tensors).

Reads top to bottom: kernels (forward, backward) -> launch settings -> launchers. The launchers have
the signatures of the other backends' launchers in :mod:`lnorm.ops.norm` and return the same
tensors; the notation is that module's: ``x`` is (R, H), ``center=True`` is layer norm, ``center=False``
RMS norm, ``residual`` given means ``s = x + residual`` rounded to ``res_dtype`` (the residual stream
as stored) is returned and normalized.

Numerics (the Numba kernels' choices, so every backend agrees with the float64 reference alike):

* one row lives in registers (H up to :func:`max_features`); statistics in float32 whatever the
  data's dtype; half-precision data, weights and residuals are widened on load;
* the mean is shifted by the row's first value, so a constant row has exactly its value as mean
  and ``1e4 + noise`` loses no digits to the sum; the variance is that of ``x - mean`` (two passes
  over registers, not ``E[x^2] - mean^2``);
* backward recomputes ``xhat`` from the saved mean/rstd and removes the row mean of ``x - mean``
  (the saved mean's rounding error, which a nearly constant row's large rstd would multiply);
* ``dweight`` / ``dbias`` are summed per program into a (programs, H) float32 buffer, then over
  programs by torch: no atomics, a deterministic result.

Triton is imported here at module level: import this module only where triton is installed
(:func:`lnorm.ops.backend.triton_available`).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# ---------------------------------------------------------------------------------------- kernels


@triton.jit
def rounded(v, dtype: tl.constexpr):
    """float32 ``v`` as ``dtype``, rounding to nearest even as torch does. bfloat16 is rounded in
    integer arithmetic first (then the cast is exact): the GPU's own conversion rounds to nearest
    even too, the interpreter's truncates, and both must give the GPU's answer."""
    if dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        v = tl.where(v != v, v, bits.to(tl.float32, bitcast=True))  # NaN stays NaN
    return v.to(dtype)


@triton.jit
def _norm_fwd_kernel(
    X, RES, W, B,  # inputs: (R, H), (R, H) or None, (H,) or None, (H,) or None
    Y, RES_OUT, MEAN, RSTD,  # outputs: (R, H), (R, H) or None, (R,) or None, (R,)
    N, inv_n, eps,  # inv_n = 1 / N from the host: the GPU's fp32 `/` is not correctly rounded
    CENTER: tl.constexpr, HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64 offsets: R * H may pass 2**31
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    start = row * N
    x = tl.load(X + start + cols, mask=mask, other=0.0).to(tl.float32)
    first = tl.load(X + start).to(tl.float32)
    if HAS_RES:
        r = tl.load(RES + start + cols, mask=mask, other=0.0).to(tl.float32)
        s = rounded(x + r, RES_OUT.dtype.element_ty)  # the residual stream as stored
        tl.store(RES_OUT + start + cols, s, mask=mask)
        x = s.to(tl.float32)
        first = rounded(first + tl.load(RES + start).to(tl.float32), RES_OUT.dtype.element_ty).to(tl.float32)
    if CENTER:
        mean = first + tl.sum(tl.where(mask, x - first, 0.0), axis=0) * inv_n
        tl.store(MEAN + row, mean)
        d = tl.where(mask, x - mean, 0.0)
    else:
        d = x  # masked lanes were loaded as 0
    var = tl.sum(d * d, axis=0) * inv_n
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(RSTD + row, rstd)
    y = d * rstd
    if HAS_W:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + start + cols, rounded(y, Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd_kernel(
    DY, SRC, W, MEAN, RSTD, DRES,  # (R, H), (R, H), (H,) or None, (R,) or None, (R,), (R, H) or None
    DX, DW_PART, DB_PART,  # (R, H); (programs, H) float32 or None
    M, N, inv_n, rows_per_program,
    CENTER: tl.constexpr, HAS_W: tl.constexpr, HAS_DRES: tl.constexpr,
    NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    start = row_start.to(tl.int64) * N  # int64 offsets: R * H may pass 2**31
    for row in range(row_start, row_end):
        dy = tl.load(DY + start + cols, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(SRC + start + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        if CENTER:
            d = tl.where(mask, s - tl.load(MEAN + row), 0.0)
            xhat = tl.where(mask, (d - tl.sum(d, axis=0) * inv_n) * rstd, 0.0)
        else:
            xhat = s * rstd
        g = dy * w if HAS_W else dy
        c1 = tl.sum(g * xhat, axis=0) * inv_n
        if CENTER:
            dx = (g - xhat * c1 - tl.sum(g, axis=0) * inv_n) * rstd
        else:
            dx = (g - xhat * c1) * rstd
        if HAS_DRES:
            dx = dx + tl.load(DRES + start + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + start + cols, rounded(dx, DX.dtype.element_ty), mask=mask)
        if NEED_DW:
            dw += dy * xhat
        if NEED_DB:
            db += dy
        start += N
    # every program writes its row of the partial sums, also one left without rows (zeros)
    if NEED_DW:
        tl.store(DW_PART + pid * N + cols, dw, mask=mask)
    if NEED_DB:
        tl.store(DB_PART + pid * N + cols, db, mask=mask)


# Under TRITON_INTERPRET=1 (read by triton when the kernels above were decorated) triton.jit makes
# interpreted functions, which run on CPU tensors; compiled kernels need CUDA tensors.
INTERPRETED = type(_norm_fwd_kernel).__name__ == "InterpretedFunction"

# ------------------------------------------------------------------------------ launch settings

# A row is held in registers (one program per row forward); past 64 KB of data per row the
# kernels would spill, and such rows take the torch path instead.
_MAX_ROW_BYTES = 65536

# Backward programs per streaming multiprocessor: more hide memory latency better, but each
# program adds a row to the partial dweight/dbias buffers that torch then sums.
BWD_PROGRAMS_PER_SM = 4
_INTERPRETER_BWD_PROGRAMS = 3  # several, so the tests see partial sums over uneven row counts


_ITEMSIZE = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


def max_features(dtype: torch.dtype) -> int:
    """The widest row (H) the kernels take for data of ``dtype`` (0 for a dtype they do not take)."""
    return _MAX_ROW_BYTES // _ITEMSIZE[dtype] if dtype in _ITEMSIZE else 0


def supports(x: Tensor, features: int) -> bool:
    """Whether the kernels take a (R, ``features``) ``x``: a supported dtype, H not too wide, R > 0."""
    return 0 < features <= max_features(x.dtype) and x.numel() > 0


def _num_warps(block_n: int) -> int:
    # more warps for wider rows, so each thread holds at most 8-16 values of a row
    if block_n >= 32768:
        return 32
    if block_n >= 8192:
        return 16
    if block_n >= 2048:
        return 8
    return 4


@functools.lru_cache(maxsize=16)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _bwd_programs(device: torch.device, rows: int) -> int:
    if device.type == "cuda" and not INTERPRETED:
        cap = BWD_PROGRAMS_PER_SM * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:
        cap = _INTERPRETER_BWD_PROGRAMS
    return max(1, min(rows, cap))


def _on_device(device: torch.device):
    """Launch on ``device``'s GPU (triton launches on the current device)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------- checks


def _check_device(x: Tensor) -> None:
    if x.device.type != "cuda" and not (INTERPRETED and x.device.type == "cpu"):
        raise ValueError(
            f"the Triton norm kernels run on CUDA tensors (or on CPU tensors when TRITON_INTERPRET=1 "
            f"was set before triton was imported), got x on {x.device}"
        )


def _check_tensor(t: Tensor | None, name: str, shape: tuple[int, ...], device: torch.device,
                  dtypes=DTYPES) -> None:
    """The launchers trust shapes, devices and dtypes only after this (raw pointers follow)."""
    if t is None:
        return
    if t.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {t.dtype}; the Triton norm kernels take {', '.join(map(str, dtypes))}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}; move them to one device")


def _contiguous(t: Tensor | None) -> Tensor | None:
    return t if t is None or t.is_contiguous() else t.contiguous()


# ------------------------------------------------------------------------------------ launchers


def norm_fwd(x, residual, weight, bias, eps, center, res_dtype):
    """Forward: ``(y, new_residual, mean, rstd)`` as the other backends' launchers return them."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (rows, features), got shape {list(x.shape)}")
    R, H = x.shape
    _check_device(x)
    _check_tensor(x, "x", (R, H), x.device)
    _check_tensor(residual, "residual", (R, H), x.device)
    _check_tensor(weight, "weight", (H,), x.device)
    _check_tensor(bias, "bias", (H,), x.device)
    if residual is not None and res_dtype not in DTYPES:
        raise TypeError(f"res_dtype must be one of {DTYPES}, got {res_dtype}")
    if not supports(x, H):
        raise ValueError(f"x of shape {[R, H]}: the Triton kernels take 1..{max_features(x.dtype)} features and R > 0")
    x, residual, weight, bias = (_contiguous(t) for t in (x, residual, weight, bias))
    y = torch.empty_like(x)
    res_out = torch.empty((R, H) if residual is not None else (0,), dtype=res_dtype, device=x.device)
    mean = torch.empty(R if center else 0, dtype=torch.float32, device=x.device)
    rstd = torch.empty(R, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(H)
    with _on_device(x.device):
        _norm_fwd_kernel[(R,)](
            x, residual, weight, bias,
            y, res_out if residual is not None else None, mean if center else None, rstd,
            H, 1.0 / H, float(eps),
            CENTER=center, HAS_RES=residual is not None, HAS_W=weight is not None,
            HAS_B=bias is not None, BLOCK_N=block, num_warps=_num_warps(block),
        )
    return y, res_out, mean, rstd


def norm_bwd(dy, src, weight, mean, rstd, center, need_dw, need_db, dres):
    """Backward: ``(dx, dweight, dbias)``; dweight/dbias float32 (None when not needed).

    ``dx`` comes in ``dy``'s dtype when ``src`` has it too (x's gradient and, with a residual of
    the same dtype, the residual's: one rounding of the float32 result, as a cast would do), else
    in float32 (a float32 residual stream under half-precision x needs the unrounded gradient).
    """
    if src.dim() != 2:
        raise ValueError(f"src must be 2-D (rows, features), got shape {list(src.shape)}")
    R, H = src.shape
    _check_device(src)
    _check_tensor(src, "src", (R, H), src.device)
    _check_tensor(dy, "dy", (R, H), src.device)
    _check_tensor(dres, "dres", (R, H), src.device)
    _check_tensor(weight, "weight", (H,), src.device)
    _check_tensor(rstd, "rstd", (R,), src.device, dtypes=(torch.float32,))
    if center:
        _check_tensor(mean, "mean", (R,), src.device, dtypes=(torch.float32,))
    if need_dw and weight is None:
        raise ValueError("need_dw=True needs a weight")
    if not supports(src, H):
        raise ValueError(f"src of shape {[R, H]}: the Triton kernels take 1..{max_features(src.dtype)} features and R > 0")
    dy, src, weight, dres = (_contiguous(t) for t in (dy, src, weight, dres))
    dx = torch.empty((R, H), dtype=dy.dtype if src.dtype == dy.dtype else torch.float32, device=src.device)
    programs = _bwd_programs(src.device, R)
    dw_part = torch.empty((programs, H), dtype=torch.float32, device=src.device) if need_dw else None
    db_part = torch.empty((programs, H), dtype=torch.float32, device=src.device) if need_db else None
    block = triton.next_power_of_2(H)
    with _on_device(src.device):
        _norm_bwd_kernel[(programs,)](
            dy, src, weight, mean if center else None, rstd, dres,
            dx, dw_part, db_part,
            R, H, 1.0 / H, triton.cdiv(R, programs),
            CENTER=center, HAS_W=weight is not None, HAS_DRES=dres is not None,
            NEED_DW=need_dw, NEED_DB=need_db, BLOCK_N=block, num_warps=_num_warps(block),
        )
    dw = dw_part.sum(0) if need_dw else None
    db = db_part.sum(0) if need_db else None
    return dx, dw, db
