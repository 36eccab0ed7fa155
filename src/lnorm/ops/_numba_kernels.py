"""Fused CPU kernels for layer norm and RMS norm, with an optional residual add, compiled by Numba.

Notation: R rows, H normalized features per row (the trailing dims flattened). ``center=True`` is
layer norm (subtract the row mean), ``center=False`` is RMS norm. Statistics are two-pass (mean,
shifted by the row's first value, then the variance of ``x - mean``), so constant rows and large
offsets such as ``1e4 + noise`` stay accurate.
Accumulators take the array's dtype: float32 for float32 data, float64 for float64 data. Mind
Numba's typing rules here: ``x * 0`` or ``1.0 / x`` with a float32 ``x`` is float64 (an int or
Python-float literal promotes), which halves the vector width and was 2x slower; constants are
made from ``inv_h`` (passed in the data's dtype) as ``zero = inv_h * np.float32(0)``.

These kernels know nothing of autograd or torch; ``lnorm.ops.norm`` launches them.
Absent arguments are passed as zero-length arrays (weight and bias as ones / zeros), so each
kernel has one compiled signature per dtype and no branch inside the inner loops.
"""

from __future__ import annotations

import types

import numba
import numpy as np
from numba import njit, prange

# reassoc lets LLVM vectorize the reductions; NaN and inf keep their IEEE meaning.
_FASTMATH = {"reassoc", "contract", "arcp"}


def _norm_fwd(x, res, w, b, eps, inv_h, center, y, res_out, mean, rstd):  # pragma: no cover
    # x, res, res_out, y: (R, H); w, b: (H,); mean, rstd: (R,) (mean is (0,) for RMS norm)
    # eps and inv_h = 1/H come in the data's dtype, so float32 data stays in float32 arithmetic.
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
            shift = xi[0] + ri[0]
            for j in range(H):
                s = xi[j] + ri[j]
                src[j] = s
                acc += s - shift
        else:
            src = x[i]
            shift = src[0]
            if center:
                for j in range(H):
                    acc += src[j] - shift
        mu = zero
        if center:
            mu = shift + acc * inv_h
            mean[i] = mu
        var = zero
        for j in range(H):
            d = src[j] - mu
            var += d * d
        r = one / np.sqrt(var * inv_h + eps)
        rstd[i] = r
        yi = y[i]
        for j in range(H):
            yi[j] = (src[j] - mu) * r * w[j] + b[j]


def _norm_bwd(dy, src, w, mean, rstd, inv_h, center, dres, dx, dw_part, db_part):  # pragma: no cover
    # dy, src, dres, dx: (R, H); w: (H,); mean, rstd: (R,); dw_part, db_part: (chunks, H) or (chunks, 0)
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
            s1 = zero  # sum of g * xhat
            s2 = zero  # sum of g
            for j in range(H):
                g = dyi[j] * w[j]
                s1 += g * ((si[j] - mu) * r)
                s2 += g
            c1 = s1 * inv_h
            c2 = s2 * inv_h if center else zero
            if has_dres:
                dri = dres[i]
                for j in range(H):
                    xhat = (si[j] - mu) * r
                    dxi[j] = r * (dyi[j] * w[j] - xhat * c1 - c2) + dri[j]
            else:
                for j in range(H):
                    xhat = (si[j] - mu) * r
                    dxi[j] = r * (dyi[j] * w[j] - xhat * c1 - c2)
            if need_dw and need_db:
                for j in range(H):
                    dwp[j] += dyi[j] * ((si[j] - mu) * r)
                    dbp[j] += dyi[j]
            elif need_dw:
                for j in range(H):
                    dwp[j] += dyi[j] * ((si[j] - mu) * r)
            elif need_db:
                for j in range(H):
                    dbp[j] += dyi[j]


# Each kernel in two builds: threaded (prange splits rows across Numba's threads) and serial
# (prange is a plain range). Waking a thread pool costs more than a small problem's whole
# work, so launchers pick the serial build below PARALLEL_MIN_ELEMENTS.
PARALLEL_MIN_ELEMENTS = 1 << 16
_JIT = {"fastmath": _FASTMATH, "cache": True, "nogil": True}
norm_fwd = njit(parallel=True, **_JIT)(_norm_fwd)
norm_bwd = njit(parallel=True, **_JIT)(_norm_bwd)


def _twin(fn, name: str):
    """A copy of ``fn`` under another name: Numba's disk cache is keyed by the function's name,
    not by its compile flags, so the serial build needs a name of its own."""
    twin = types.FunctionType(fn.__code__, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    twin.__qualname__ = name
    return twin


norm_fwd_serial = njit(**_JIT)(_twin(_norm_fwd, "_norm_fwd_serial"))
norm_bwd_serial = njit(**_JIT)(_twin(_norm_bwd, "_norm_bwd_serial"))


def num_threads() -> int:
    return numba.get_num_threads()


def pick(parallel_kernel, serial_kernel, elements: int):
    """The threaded build for big problems on several threads, else the serial one."""
    if elements >= PARALLEL_MIN_ELEMENTS and numba.get_num_threads() > 1:
        return parallel_kernel
    return serial_kernel
