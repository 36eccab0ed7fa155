"""Fused CPU kernels for layer norm and RMS norm, with an optional residual add, compiled by Numba.

Notation: R rows, H normalized features per row (the trailing dims flattened). ``center=True`` is
layer norm (subtract the row mean), ``center=False`` is RMS norm. Statistics are two-pass (mean,
shifted by the row's first value, then the variance of ``x - mean``), so constant rows and large
offsets such as ``1e4 + noise`` stay accurate. A finite row whose squares overflow (float32 values
past about 1e19) is redone on a copy scaled by a power of two, so it gets the float64 answer.
Accumulators take the array's dtype: float32 for float32 data, float64 for float64 data. Mind
Numba's typing rules here: ``x * 0`` or ``1.0 / x`` with a float32 ``x`` is float64 (an int or
Python-float literal promotes), which halves the vector width and was 2x slower; constants are
made from ``inv_h`` (passed in the data's dtype) as ``zero = inv_h * np.float32(0)``.

bfloat16 data comes in and goes out as its raw 16 bits (``uint16`` arrays): ``_f`` widens an
element to float32 (the bits shifted into the high half), ``_st`` narrows a float32 result with
round-to-nearest-even as torch does; for float32/float64 arrays both are the identity, so one
kernel source serves all three dtypes and the bfloat16 path needs no conversion passes.

These kernels know nothing of autograd or torch; ``lnorm.ops.norm`` launches them.
Absent arguments are passed as zero-length arrays (weight and bias as ones / zeros), so each
kernel has one compiled signature per dtype and no branch inside the inner loops.
"""

from __future__ import annotations

import types

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba import types as nt
from numba.core.extending import intrinsic, overload

from lnorm.ops._numba_threads import guard, threads_allowed

# reassoc lets LLVM vectorize the reductions; NaN and inf keep their IEEE meaning.
_FASTMATH = {"reassoc", "contract", "arcp"}

# ------------------------------------------------------------------------ bfloat16 as raw bits


@intrinsic
def _u32_as_f32(typingctx, u):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())

    return nt.float32(nt.uint32), codegen


@intrinsic
def _f32_as_u32(typingctx, f):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return nt.uint32(nt.float32), codegen


def _f(v):  # pragma: no cover - replaced by the overload inside jitted code
    return v


def _st(v, like):  # pragma: no cover
    return v


@overload(_f)
def _f_ov(v):
    if v == nt.uint16:  # bfloat16 bits -> float32
        return lambda v: _u32_as_f32(np.uint32(v) << np.uint32(16))
    return lambda v: v


@overload(_st)
def _st_ov(v, like):
    # ``v`` as an element of the array ``like``: bfloat16 bits with round-to-nearest-even (NaN
    # becomes the quiet NaN 0x7FC0, as torch's conversion), else unchanged.
    if isinstance(like, nt.Array) and like.dtype == nt.uint16:
        def impl(v, like):
            b = _f32_as_u32(np.float32(v))
            r = (b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
            return np.uint16(0x7FC0) if v != v else np.uint16(r)

        return impl
    return lambda v, like: v


@njit(fastmath=_FASTMATH, cache=True, nogil=True)
def _rescaled_row(src, w, b, eps, inv_h, center, one, yi, mean, rstd, i):  # pragma: no cover
    # Row i's statistics and output when its sum or sum of squares overflowed: computed on the
    # row times s, a power of two (exact) that brings max |x| under 2**40, so the squares of
    # float32 rows up to its largest value stay finite. Returns False (nothing written) when the
    # row holds NaN or inf, whose non-finite statistics are the answer, as torch's.
    H = src.shape[0]
    zero = one * np.float32(0)
    m = zero
    for j in range(H):
        a = abs(_f(src[j]))
        if not (a <= m):  # NaN too
            m = a
    if not (m < np.inf):
        return False
    s = one
    while m * s > np.float32(2.0**40):
        s = s * np.float32(2.0**-16)
    mu = zero
    if center:
        shift = _f(src[0]) * s
        acc = zero
        for j in range(H):
            acc += _f(src[j]) * s - shift
        mu = shift + acc * inv_h
        mean[i] = mu / s
    var = zero
    for j in range(H):
        d = _f(src[j]) * s - mu
        var += d * d
    # eps scales with the data's square; eps * s * s may underflow to 0, negligible next to var
    r = one / np.sqrt(var * inv_h + eps * s * s)
    rstd[i] = r * s
    for j in range(H):
        yi[j] = _st((_f(src[j]) * s - mu) * r * w[j] + b[j], yi)
    return True


def _norm_fwd(x, res, w, b, eps, inv_h, center, y, res_out, mean, rstd):  # pragma: no cover
    # x, res, res_out, y: (R, H); w, b: (H,); mean, rstd: (R,) (mean is (0,) for RMS norm)
    # eps and inv_h = 1/H come in the compute dtype, so float32 data stays in float32 arithmetic.
    # x, y (and res, res_out) may be bfloat16 bits (uint16); res_out always has x's dtype.
    R, H = x.shape
    has_res = res.shape[0] > 0
    zero = inv_h * np.float32(0)  # the data's dtype (see the module docstring)
    one = zero + np.float32(1)
    for i in prange(R):
        # Shifted by the row's first value: a constant row sums to exactly 0 and gets mean == its
        # value (so the output is exactly the bias), and offsets such as 1e4 + noise lose no
        # digits to the sum. With a residual, the sum is taken in the same pass as the add.
        acc = zero
        if has_res:
            xi = x[i]
            ri = res[i]
            src = res_out[i]
            # the sum as stored (rounded to res_out's dtype) is what gets normalized
            src[0] = _st(_f(xi[0]) + _f(ri[0]), src)
            shift = _f(src[0])
            for j in range(H):
                src[j] = _st(_f(xi[j]) + _f(ri[j]), src)
                acc += _f(src[j]) - shift
        else:
            src = x[i]
            shift = _f(src[0])
            if center:
                for j in range(H):
                    acc += _f(src[j]) - shift
        mu = zero
        if center:
            mu = shift + acc * inv_h
        var = zero
        for j in range(H):
            d = _f(src[j]) - mu
            var += d * d
        r = one / np.sqrt(var * inv_h + eps)
        if var == np.inf:
            # torch's 1/sqrt(inf) is 0 (an RMS row holding inf: 0 where finite, NaN at the inf);
            # arcp lets LLVM turn the division into an rsqrt estimate, NaN at inf (the threaded
            # build did: the whole row came out NaN). A finite row that overflowed is redone below.
            r = zero
        yi = y[i]
        # var is inf or NaN only when a square or a sum overflowed or the row is not finite: one
        # test per row, and the rare finite row is redone on a scaled copy
        if var < np.inf or not _rescaled_row(src, w, b, eps, inv_h, center, one, yi, mean, rstd, i):
            if center:
                mean[i] = mu
            rstd[i] = r
            for j in range(H):
                yi[j] = _st((_f(src[j]) - mu) * r * w[j] + b[j], yi)


def _norm_bwd(dy, src, w, mean, rstd, inv_h, center, dres, dx, dw_part, db_part):  # pragma: no cover
    # dy, src, dres, dx: (R, H); w: (H,); mean, rstd: (R,); dw_part, db_part: (chunks, H) or (chunks, 0)
    # dy and src may be bfloat16 bits (uint16); dx and the rest are in the compute dtype.
    R, H = dy.shape
    chunks = dw_part.shape[0]
    per = (R + chunks - 1) // chunks
    has_dres = dres.shape[0] > 0
    need_dw = dw_part.shape[1] > 0
    need_db = db_part.shape[1] > 0
    zero = inv_h * np.float32(0)  # the data's dtype (see the module docstring)
    for c in prange(chunks):
        dwp = dw_part[c]
        dbp = db_part[c]
        for i in range(c * per, min(R, (c + 1) * per)):
            dyi = dy[i]
            si = src[i]
            dxi = dx[i]
            mu = mean[i] if center else zero
            r = rstd[i]
            s1 = zero  # sum of g * (x - mu) * r
            s2 = zero  # sum of g
            sd = zero  # sum of x - mu
            for j in range(H):
                g = _f(dyi[j]) * w[j]
                d = _f(si[j]) - mu
                s1 += g * (d * r)
                s2 += g
                sd += d
            # The saved mean is rounded to the data's dtype; the row's own mean of x - mu is that
            # rounding error, which the rstd of a nearly constant row multiplies: subtract it,
            # xhat = (x - mu) r - dr.
            dr = sd * inv_h * r if center else zero
            c1 = (s1 - dr * s2) * inv_h
            c2 = s2 * inv_h if center else zero
            if has_dres:
                dri = dres[i]
                for j in range(H):
                    xhat = (_f(si[j]) - mu) * r - dr
                    dxi[j] = r * (_f(dyi[j]) * w[j] - xhat * c1 - c2) + _f(dri[j])
            else:
                for j in range(H):
                    xhat = (_f(si[j]) - mu) * r - dr
                    dxi[j] = r * (_f(dyi[j]) * w[j] - xhat * c1 - c2)
            if need_dw and need_db:
                for j in range(H):
                    dwp[j] += _f(dyi[j]) * ((_f(si[j]) - mu) * r - dr)
                    dbp[j] += _f(dyi[j])
            elif need_dw:
                for j in range(H):
                    dwp[j] += _f(dyi[j]) * ((_f(si[j]) - mu) * r - dr)
            elif need_db:
                for j in range(H):
                    dbp[j] += _f(dyi[j])


# Each kernel in two builds: threaded (prange splits rows across Numba's threads) and serial
# (prange is a plain range). Waking a thread pool costs more than a small problem's whole
# work, so launchers pick the serial build below PARALLEL_MIN_ELEMENTS.
PARALLEL_MIN_ELEMENTS = 1 << 16
# error_model="numpy": a division by zero gives inf/NaN as torch does (an eps that rounds to 0 in
# float32 on a constant row); Numba's default raised ZeroDivisionError in the serial build only
_JIT = {"fastmath": _FASTMATH, "cache": True, "nogil": True, "error_model": "numpy"}
norm_fwd = njit(parallel=True, **_JIT)(_norm_fwd)
norm_bwd = njit(parallel=True, **_JIT)(_norm_bwd)


def twin(fn, name: str):
    """A copy of ``fn`` under another name: Numba's disk cache is keyed by the function's name,
    not by its compile flags, so the serial build needs a name of its own."""
    twin = types.FunctionType(fn.__code__, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    twin.__qualname__ = name
    return twin


norm_fwd_serial = njit(**_JIT)(twin(_norm_fwd, "_norm_fwd_serial"))
norm_bwd_serial = njit(**_JIT)(twin(_norm_bwd, "_norm_bwd_serial"))


def num_threads() -> int:
    """The threads the kernels use, made to follow ``torch.get_num_threads()`` (at most Numba's
    pool size, ``NUMBA_NUM_THREADS``), so ``torch.set_num_threads`` limits lnorm as it limits
    torch. Numba's setting is per calling thread; it is set before each launch."""
    import torch

    n = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if threads_allowed() and numba.get_num_threads() != n:  # not in a forked child (see pick)
        numba.set_num_threads(n)
    return n


def pick(parallel_kernel, serial_kernel, elements: int):
    """The threaded build for big problems on several threads (guarded, see ``_numba_threads``),
    else the serial one; always the serial one in a child forked after the pool started."""
    if elements >= PARALLEL_MIN_ELEMENTS and threads_allowed() and num_threads() > 1:
        return guard(parallel_kernel)
    return serial_kernel
