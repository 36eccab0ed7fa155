"""Fused per-time-step CPU kernels for the layer-normalized LSTM and GRU, compiled by Numba.

Each kernel does all the elementwise work of one time step for the ``bs`` active rows: the layer
norm of the recurrent pre-activation ``gh = h W_hh^T`` (computed outside by one MKL matmul), the
gate nonlinearities, the state update and (LSTM) the layer norm of the cell. The backward kernels
walk the same step in reverse. ``lnorm.ops.rnn_fused`` launches them from its time loop.

Notation: row ``b`` of the step is row ``n = off + b`` of the packed (N, ...) sequence buffers;
``H`` hidden size; LSTM gates (i, f, g, o) and GRU gates (r, z, n) in torch's order. ``gx`` is the
hoisted input part of the gates (LN(W_ih x) + biases) for all rows. Saved tensors are indexed by
``n``. Without gradients to come the layers run ``lstm_fwd_infer_step`` and
``gru_fwd_infer_step``, which save nothing and normalize a block of W_ih x themselves (compiled
with ``torch.compile``, the GRU's op runs ``gru_fwd_step`` with per-step scratch indexed by ``b``,
``soff = 0``, as its "saved" buffers).
Accumulators take the array's dtype: they start from ``zero = one * np.float32(0)`` (``one`` comes
in the data's dtype), never from ``x * 0``, which Numba types float64 for float32 ``x``.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from lnorm.ops._numba_kernels import twin
from lnorm.ops._numba_threads import guard, threads_allowed
from lnorm.ops.brgemm import brgemm

_FASTMATH = {"reassoc", "contract", "arcp"}
# error_model="numpy": no ZeroDivisionError branch, so the divisions in the loops vectorize
_OPTS = dict(parallel=True, fastmath=_FASTMATH, cache=True, nogil=True, error_model="numpy")


# ------------------------------------------------------------------------------ nonlinearities
# float32 has no vectorized tanh/exp in LLVM without Intel SVML, and scalar libm calls cost ~30x
# a vectorized rational approximation. float32 uses Eigen's rational approximation of tanh
# (max abs error 2.6e-7, about 2 ulp near +-1; torch's own vectorized tanh is also ~1 ulp);
# float64 (gradcheck, references) uses the exact libm functions.
_TANH_P = (4.89352455891786e-03, 6.37261928875436e-04, 1.48572235717979e-05, 5.12229709037114e-08,
           -8.60467152213735e-11, 2.00018790482477e-13, -2.76076847742355e-16)
_TANH_Q = (4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04, 1.19825839466702e-06)
_TANH_CLAMP = 7.90531110763549805


def ftanh(x):  # pragma: no cover - replaced by the overload inside jitted code
    return np.tanh(x)


def fsig(x):  # pragma: no cover
    return 1.0 / (1.0 + np.exp(-x))


@overload(ftanh, jit_options={"fastmath": _FASTMATH, "error_model": "numpy"})
def _ftanh(x):
    if x == types.float32:
        a1, a3, a5, a7, a9, a11, a13 = (np.float32(v) for v in _TANH_P)
        b0, b2, b4, b6 = (np.float32(v) for v in _TANH_Q)
        lim = np.float32(_TANH_CLAMP)

        def impl(x):
            # clamped so that NaN fails both tests and passes through (``x if x < lim`` would
            # turn NaN into lim, a finite gate from a NaN input)
            y = lim if x > lim else x
            y = -lim if y < -lim else y
            y2 = y * y
            p = y2 * a13 + a11
            p = y2 * p + a9
            p = y2 * p + a7
            p = y2 * p + a5
            p = y2 * p + a3
            p = y2 * p + a1
            q = y2 * b6 + b4
            q = y2 * q + b2
            q = y2 * q + b0
            return y * p / q

        return impl
    return lambda x: np.tanh(x)


@overload(fsig, jit_options={"fastmath": _FASTMATH, "error_model": "numpy"})
def _fsig(x):
    if x == types.float32:
        half = np.float32(0.5)
        return lambda x: half * ftanh(half * x) + half
    return lambda x: 1.0 / (1.0 + np.exp(-x))


# --------------------------------------------------------------------------- row statistics


@njit(cache=True, nogil=True, error_model="numpy")
def _scaled_mean_rstd(a, r, lo, hi, inv, eps, one):  # pragma: no cover
    # _mean_rstd of a finite row whose squares overflow: on the row times a power of two (exact)
    # that brings max |a| under 2**40; a row holding NaN or inf gets NaN, as on the torch path
    zero = one * np.float32(0)
    m = zero
    for q in range(lo, hi):
        v = abs(a[r, q])
        if not (v <= m):  # NaN too
            m = v
    if not (m < np.inf):
        return m - m, m - m
    s = one
    while m * s > np.float32(2.0**40):
        s = s * np.float32(2.0**-16)
    mu = zero
    for q in range(lo, hi):
        mu += a[r, q] * s
    mu = mu * inv
    var = zero
    for q in range(lo, hi):
        d = a[r, q] * s - mu
        var += d * d
    return mu / s, s / np.sqrt(var * inv + eps * s * s)


@njit(inline="always")
def _mean_rstd(a, r, lo, hi, inv, eps, one):  # pragma: no cover
    # mean and 1/sqrt(var + eps) of a[r, lo:hi] (inv = 1 / (hi - lo)), two passes, in a's dtype
    zero = one * np.float32(0)
    mu = zero
    for q in range(lo, hi):
        mu += a[r, q]
    mu = mu * inv
    var = zero
    for q in range(lo, hi):
        d = a[r, q] - mu
        var += d * d
    if not (var < np.inf):  # one test per row: overflow (or a non-finite row), rare
        return _scaled_mean_rstd(a, r, lo, hi, inv, eps, one)
    return mu, one / np.sqrt(var * inv + eps)


@njit(inline="always")
def _ln_rows(gh, b, lo, hi, inv, eps, one, ghat_s, s, stat_s, col):  # pragma: no cover
    # ghat_s[s, lo:hi] = the normalized gh[b, lo:hi]; its rstd into stat_s[s, col]
    mu, r = _mean_rstd(gh, b, lo, hi, inv, eps, one)
    stat_s[s, col] = r
    for q in range(lo, hi):
        ghat_s[s, q] = (gh[b, q] - mu) * r


# ------------------------------------------------------------------------------------ LSTM
# k: (eps, 1, 1/G, 1/H) in the data's dtype, so float32 stays float32 in the vector loops


@njit(**_OPTS)
def lstm_fwd_step(off, soff, gh, px, g0, g1, b1, g3, b3, k, hs, cs, out,
                  ghat_s, c_s, stat_s):  # pragma: no cover
    # gh: (bs, 4H) = h W_hh^T for the active rows; px: (N, 4H) = W_ih x for all rows, layer-
    # normalized here (weight g0; its bias is folded into b1 with the other biases) while the
    # row is in cache; hs, cs: (B, H) state, updated in place for rows < bs; out: (N, H); saved:
    # ghat_s (*, 4H), c_s (*, H), stat_s (*, 5) holding (rstd of gh, mean of c, rstd of c,
    # mean of px, rstd of px). The gate activations are not saved (backward recomputes them from
    # ghat, px and the statistics: 26 MB fewer written and read per training step at N = 3200,
    # H = 512).
    # Each loop touches few arrays: the pre-activations go to a row-local buffer first, then
    # the gates read only it. One loop over the four gates that read gh, px and the parameters and
    # wrote ghat, out and c at once (a dozen arrays) compiled into code several times slower
    # (likely left scalar: LLVM's vectorizer drops a loop whose runtime alias checks between
    # that many arrays pass its limit).
    bs = gh.shape[0]
    eps, one, inv_g, inv_h = k[0], k[1], k[2], k[3]
    for b in prange(bs):
        _lstm_train_row(b, off + b, soff + b, gh, px, g0, g1, b1, g3, b3, eps, one, inv_g, inv_h, hs, cs, out,
                        ghat_s, c_s, stat_s)


@njit(inline="always")
def _lstm_train_row(b, n, s, gh, px, g0, g1, b1, g3, b3, eps, one, inv_g, inv_h, hs, cs, out, ghat_s, c_s,
                    stat_s):  # pragma: no cover
    # one row of lstm_fwd_step: gh row b, px and output row n, saved row s, state row b
    G = gh.shape[1]
    H = G // 4
    zero = one * np.float32(0)
    a = np.empty(G, dtype=gh.dtype)  # the row's gate pre-activations, then o in a[3H:]
    muh, rh = _mean_rstd(gh, b, 0, G, inv_g, eps, one)
    stat_s[s, 0] = rh
    mux, rx = _mean_rstd(px, n, 0, G, inv_g, eps, one)
    stat_s[s, 3] = mux
    stat_s[s, 4] = rx
    for q in range(G):
        gq = (gh[b, q] - muh) * rh
        ghat_s[s, q] = gq
        a[q] = g1[q] * gq + g0[q] * ((px[n, q] - mux) * rx) + b1[q]
    muc = zero
    for j in range(H):
        i = fsig(a[j])
        f = fsig(a[H + j])
        g = ftanh(a[2 * H + j])
        a[3 * H + j] = fsig(a[3 * H + j])
        cn = f * cs[b, j] + i * g
        c_s[s, j] = cn
        muc += cn
    muc = muc * inv_h
    stat_s[s, 1] = muc
    varc = zero
    for j in range(H):
        d = c_s[s, j] - muc
        varc += d * d
    rc = one / np.sqrt(varc * inv_h + eps)
    stat_s[s, 2] = rc
    for j in range(H):
        cn = c_s[s, j]
        hv = a[3 * H + j] * ftanh(g3[j] * ((cn - muc) * rc) + b3[j])
        out[n, j] = hv
        hs[b, j] = hv
        cs[b, j] = cn


@njit(inline="always")
def _steps_inside(offs, sizes, B, N, doff, R):  # pragma: no cover
    # every step's rows (offs[s] .. + sizes[s]) lie in the (N, .) packed buffers and in the (B, .)
    # state, and at row offs[s] - doff in a run buffer of R rows (forward: doff 0, R = N)
    if sizes.shape[0] != offs.shape[0]:
        return False
    for s in range(offs.shape[0]):
        if (sizes[s] <= 0 or sizes[s] > B or offs[s] < 0 or offs[s] + sizes[s] > N or offs[s] - doff < 0
                or offs[s] - doff + sizes[s] > R):
            return False
    return True


@njit(inline="always")
def _prev_inside(prev, N, B):  # pragma: no cover
    # every row's previous state is a row of the N packed rows or (-1 - b) of the B initial ones
    for n in range(prev.shape[0]):
        if prev[n] >= N or -1 - prev[n] >= B:
            return False
    return prev.shape[0] == N


@njit(inline="always")
def _panel_product(j, rows, a, lda, panels, c, ldc, width, add):  # pragma: no cover
    # columns j*tile .. of C (``width`` in all, ldc apart, at address c) (+)= A (rows x k at address
    # a, lda apart) @ panel j of ``panels`` (tiles, k, tile): one brgemm call
    k = panels.shape[1]
    tile = panels.shape[2]
    c0 = j * tile
    brgemm(rows, min(tile, width - c0), k, lda, tile, ldc, add, a, panels.ctypes.data + 4 * c0 * k, c + 4 * c0)


@njit(inline="always")
def _c_order(a, b, c, d):  # pragma: no cover
    # the arrays brgemm reads or writes through raw addresses are C-contiguous (a strided view
    # would be read with the wrong leading dimension: the kernels are compiled for any layout)
    return a.flags.c_contiguous and b.flags.c_contiguous and c.flags.c_contiguous and d.flags.c_contiguous


@njit(inline="always")
def _panels_cover(ntile, tile, width):  # pragma: no cover
    # column panels of ``tile`` columns, ``ntile`` of them, cover ``width`` columns, the last partly
    return tile > 0 and ntile > 0 and (ntile - 1) * tile < width <= ntile * tile


@njit(**_OPTS)
def lstm_train_loop(offs, sizes, px, whh_p, g0, g1, b1, g3, b3, k, hs, cs, out, ghat_s, c_s, stat_s,
                    gh):  # pragma: no cover
    # The time loop of lstm_fwd_step (gradients to come) in one call, as lstm_infer_loop: per step
    # the threads multiply their column tiles of gh = h W_hh^T with oneDNN's brgemm, then the
    # rows' elementwise work, saving for backward at the rows' packed numbers (px: (N, 4H), all
    # rows, computed before the loop since backward reads it). whh_p: W_hh^T in column panels, as
    # lstm_infer_loop's. Sizes checked first.
    ntile, H, tile = whh_p.shape
    G = gh.shape[1]
    N = px.shape[0]
    B = hs.shape[0]
    if (gh.itemsize != 4 or G != 4 * H or px.shape[1] != G or hs.shape[1] != H or cs.shape[0] != B
            or cs.shape[1] != H or out.shape[0] != N or out.shape[1] != H or gh.shape[0] != B or gh.shape[1] != G
            or ghat_s.shape[0] != N or ghat_s.shape[1] != G or c_s.shape[0] != N or c_s.shape[1] != H
            or stat_s.shape[0] != N or stat_s.shape[1] != 5 or g0.shape[0] != G or g1.shape[0] != G
            or b1.shape[0] != G or g3.shape[0] != H or b3.shape[0] != H or sizes.shape[0] != offs.shape[0]
            or H <= 0 or not _panels_cover(ntile, tile, G)):
        raise ValueError("lstm_train_loop: inconsistent shapes")
    if not _c_order(hs, gh, whh_p, px):
        raise ValueError("lstm_train_loop: the arrays must be C-contiguous")
    if not _steps_inside(offs, sizes, B, N, 0, N):
        raise ValueError("lstm_train_loop: a step's rows lie outside the buffers")
    eps, one, inv_g, inv_h = k[0], k[1], k[2], k[3]
    hp, ghp = hs.ctypes.data, gh.ctypes.data
    for s in range(offs.shape[0]):
        off = offs[s]
        bs = sizes[s]
        for j in prange(ntile):
            _panel_product(j, bs, hp, H, whh_p, ghp, G, G, False)
        for b in prange(bs):
            _lstm_train_row(b, off + b, off + b, gh, px, g0, g1, b1, g3, b3, eps, one, inv_g, inv_h, hs, cs, out,
                            ghat_s, c_s, stat_s)


@njit(inline="always")
def _lstm_infer_row(b, n, p, gh, px, g0, g1, b1, g3, b3, eps, one, inv_g, inv_h, hs, cs, out):  # pragma: no cover
    # one row of lstm_fwd_infer_step: gh row b, px row p, state row b, output row n
    G = gh.shape[1]
    H = G // 4
    zero = one * np.float32(0)
    a = np.empty(G, dtype=gh.dtype)  # the gate pre-activations; then c in a[:H], o in a[3H:]
    muh, rh = _mean_rstd(gh, b, 0, G, inv_g, eps, one)
    mux, rx = _mean_rstd(px, p, 0, G, inv_g, eps, one)
    for q in range(G):
        a[q] = g1[q] * ((gh[b, q] - muh) * rh) + g0[q] * ((px[p, q] - mux) * rx) + b1[q]
    muc = zero
    for j in range(H):
        i = fsig(a[j])
        f = fsig(a[H + j])
        g = ftanh(a[2 * H + j])
        a[3 * H + j] = fsig(a[3 * H + j])
        cn = f * cs[b, j] + i * g
        a[j] = cn
        muc += cn
    muc = muc * inv_h
    varc = zero
    for j in range(H):
        d = a[j] - muc
        varc += d * d
    rc = one / np.sqrt(varc * inv_h + eps)
    for j in range(H):
        cn = a[j]
        hv = a[3 * H + j] * ftanh(g3[j] * ((cn - muc) * rc) + b3[j])
        out[n, j] = hv
        hs[b, j] = hv
        cs[b, j] = cn


@njit(**_OPTS)
def lstm_fwd_infer_step(off, poff, gh, px, g0, g1, b1, g3, b3, k, hs, cs, out):  # pragma: no cover
    # lstm_fwd_step without gradients to come: nothing saved (the normalized gh, the cell and the
    # statistics stay in the row-local buffer), which saves writing 4H + H + 5 floats per row.
    # The same arithmetic; the results agree to float32 rounding (the two builds may contract
    # different multiply-adds). The new cell goes into a[:H] once i is read. px holds a block of
    # steps (the caller projects the input a block at a time): row b's is px[poff + b].
    bs = gh.shape[0]
    eps, one, inv_g, inv_h = k[0], k[1], k[2], k[3]
    for b in prange(bs):
        _lstm_infer_row(b, off + b, poff + b, gh, px, g0, g1, b1, g3, b3, eps, one, inv_g, inv_h, hs, cs, out)


@njit(**_OPTS)
def lstm_infer_loop(offs, sizes, x, wih_p, whh_p, g0, g1, b1, g3, b3, k, hs, cs, out, gh,
                    px):  # pragma: no cover
    # The whole time loop of lstm_fwd_infer_step in one call (float32 only; see lnorm.ops.brgemm):
    # at step s (rows offs[s] .. offs[s] + sizes[s] of the packed x and out), the threads split
    # the 4H columns into tiles and each multiplies its tiles, gh = h W_hh^T and px = x W_ih^T,
    # with oneDNN's brgemm microkernel; then the rows' elementwise work, as lstm_fwd_infer_step's.
    # The weights come as column panels (whh_p: (tiles, H, tile), panel j = W_hh^T[:, j*tile ..],
    # zero-padded past 4H; wih_p the same of W_ih^T), so each tile reads one contiguous block
    # (a tile of W^T in place spans the whole matrix, a row of 4H floats apart per k). gh and
    # px are (B, 4H) scratch. brgemm reads and writes through raw addresses: the sizes, float32
    # and C order are checked here first.
    ntile, H, tile = whh_p.shape
    G = gh.shape[1]
    N, I = x.shape
    B = hs.shape[0]
    if (gh.itemsize != 4 or G != 4 * H or wih_p.shape[0] != ntile or wih_p.shape[1] != I or wih_p.shape[2] != tile
            or not _panels_cover(ntile, tile, G) or hs.shape[1] != H
            or cs.shape[0] != B or cs.shape[1] != H or out.shape[0] != N or out.shape[1] != H
            or gh.shape[0] != B or gh.shape[1] != G or px.shape[0] != B or px.shape[1] != G
            or g0.shape[0] != G or g1.shape[0] != G or b1.shape[0] != G or g3.shape[0] != H
            or b3.shape[0] != H or sizes.shape[0] != offs.shape[0] or H <= 0 or I <= 0):
        raise ValueError("lstm_infer_loop: inconsistent shapes")
    if not _c_order(hs, gh, px, x) or not _c_order(wih_p, whh_p, wih_p, whh_p):
        raise ValueError("lstm_infer_loop: the arrays must be C-contiguous")
    if not _steps_inside(offs, sizes, B, N, 0, N):
        raise ValueError("lstm_infer_loop: a step's rows lie outside the buffers")
    eps, one, inv_g, inv_h = k[0], k[1], k[2], k[3]
    hp, ghp, pxp = hs.ctypes.data, gh.ctypes.data, px.ctypes.data
    for s in range(offs.shape[0]):
        off = offs[s]
        bs = sizes[s]
        xp = x.ctypes.data + 4 * off * I
        for j in prange(ntile):
            _panel_product(j, bs, hp, H, whh_p, ghp, G, G, False)
            _panel_product(j, bs, xp, I, wih_p, pxp, G, G, False)
        for b in prange(bs):
            _lstm_infer_row(b, off + b, b, gh, px, g0, g1, b1, g3, b3, eps, one, inv_g, inv_h, hs, cs, out)


@njit(**_OPTS)
def lstm_bwd_step(off, doff, bs, dout, dhs, dcs, ghat_s, c_s, stat_s, cprev_idx, c0, px, g0, g1, b1,
                  g3, b3, k, dpx, dgh, acc_g, acc_c):  # pragma: no cover
    # dhs, dcs: (B, H) gradient state (in: w.r.t. this step's h and c from later steps; out: dcs
    # w.r.t. the previous c; dhs is overwritten by the caller's matmul); dpx, dgh: outputs, the
    # gradient of px = W_ih x through its layer norm and of gh, for row n at row n - doff (the
    # caller's buffers hold a chunk of steps, see rnn_fused). acc_g (chunks, 3, 4H) and
    # acc_c (chunks, 2, H), float64: running sums over all rows of the LN parameter gradients
    # (weight of the recurrent LN, bias of the gates, weight of the input LN; weight and bias of
    # the cell's LN), one slice per chunk of rows (the caller sums the slices at the end); each
    # row is added right after it is computed, while it is in cache, rather than in a second pass
    # over the rows.
    # cprev_idx[n]: row of c_s holding the previous c, or -1 - b for c0[b]. The gate activations
    # are recomputed from the saved ghat, px and statistics with the forward's expressions.
    one, inv_g, inv_h = k[1], k[2], k[3]
    chunks = acc_g.shape[0]
    per = (bs + chunks - 1) // chunks
    for ch in prange(chunks):
        _lstm_bwd_chunk(ch, per, off, doff, bs, dout, dhs, dcs, ghat_s, c_s, stat_s, cprev_idx, c0, px, g0, g1,
                        b1, g3, b3, one, inv_g, inv_h, dpx, dgh, acc_g, acc_c)


@njit(inline="always")
def _lstm_bwd_chunk(ch, per, off, doff, bs, dout, dhs, dcs, ghat_s, c_s, stat_s, cprev_idx, c0, px, g0, g1, b1,
                    g3, b3, one, inv_g, inv_h, dpx, dgh, acc_g, acc_c):  # pragma: no cover
    # the rows ch * per .. of lstm_bwd_step, and their share (slice ch) of the LN-gradient sums
    G = ghat_s.shape[1]
    H = G // 4
    zero = one * np.float32(0)
    # this step's sums over the chunk's rows, in the data's dtype (vectorizes), then into the
    # float64 running sums once per step
    ag = np.zeros((3, G), dtype=dpx.dtype)
    ac = np.zeros((2, H), dtype=dpx.dtype)
    dcn = np.empty(H, dtype=dpx.dtype)  # the row's gradient of the normalized cell
    chat = np.empty(H, dtype=dpx.dtype)  # and the cell's xhat
    dg = np.empty(G, dtype=dpx.dtype)  # the row's gradient of the gate pre-activations
    for b in range(ch * per, min(bs, (ch + 1) * per)):
        n = off + b
        muc = stat_s[n, 1]
        rc = stat_s[n, 2]
        rh = stat_s[n, 0]
        mux = stat_s[n, 3]
        rx = stat_s[n, 4]
        s1 = zero
        s2 = zero
        for j in range(H):
            xh = (c_s[n, j] - muc) * rc
            tc = ftanh(g3[j] * xh + b3[j])
            o = fsig(g1[3 * H + j] * ghat_s[n, 3 * H + j] + g0[3 * H + j] * ((px[n, 3 * H + j] - mux) * rx)
                     + b1[3 * H + j])
            dh = dout[n, j] + dhs[b, j]
            dg[3 * H + j] = dh * tc * o * (one - o)
            d = dh * o * (one - tc * tc)
            dcn[j] = d
            chat[j] = xh
            dchat = d * g3[j]
            s1 += dchat
            s2 += dchat * xh
        s1 = s1 * inv_h
        s2 = s2 * inv_h
        for j in range(H):
            ac[0, j] += dcn[j] * chat[j]
            ac[1, j] += dcn[j]
        p = cprev_idx[n]
        cprev = c_s if p >= 0 else c0
        pr = p if p >= 0 else -1 - p
        for j in range(H):
            dc = rc * (dcn[j] * g3[j] - s1 - chat[j] * s2) + dcs[b, j]
            i = fsig(g1[j] * ghat_s[n, j] + g0[j] * ((px[n, j] - mux) * rx) + b1[j])
            f = fsig(g1[H + j] * ghat_s[n, H + j] + g0[H + j] * ((px[n, H + j] - mux) * rx) + b1[H + j])
            g = ftanh(g1[2 * H + j] * ghat_s[n, 2 * H + j] + g0[2 * H + j] * ((px[n, 2 * H + j] - mux) * rx)
                      + b1[2 * H + j])
            dg[j] = dc * g * i * (one - i)
            dg[H + j] = dc * cprev[pr, j] * f * (one - f)
            dg[2 * H + j] = dc * i * (one - g * g)
            dcs[b, j] = dc * f
        # the recurrent part's LN backward -> dgh
        s3 = zero
        s4 = zero
        for q in range(G):
            dgt = dg[q] * g1[q]
            s3 += dgt
            s4 += dgt * ghat_s[n, q]
        s3 = s3 * inv_g
        s4 = s4 * inv_g
        for q in range(G):
            dgh[n - doff, q] = rh * (dg[q] * g1[q] - s3 - ghat_s[n, q] * s4)
        # the input part's LN backward -> dpx
        s5 = zero
        s6 = zero
        for q in range(G):
            dgt = dg[q] * g0[q]
            s5 += dgt
            s6 += dgt * ((px[n, q] - mux) * rx)
        s5 = s5 * inv_g
        s6 = s6 * inv_g
        for q in range(G):
            xh = (px[n, q] - mux) * rx
            dpx[n - doff, q] = rx * (dg[q] * g0[q] - s5 - xh * s6)
            ag[0, q] += dg[q] * ghat_s[n, q]
            ag[1, q] += dg[q]
            ag[2, q] += dg[q] * xh
    for q in range(G):
        acc_g[ch, 0, q] += ag[0, q]
        acc_g[ch, 1, q] += ag[1, q]
        acc_g[ch, 2, q] += ag[2, q]
    for j in range(H):
        acc_c[ch, 0, j] += ac[0, j]
        acc_c[ch, 1, j] += ac[1, j]


@njit(**_OPTS)
def lstm_bwd_loop(offs, sizes, doff, dout, dhs, dcs, ghat_s, c_s, stat_s, cprev_idx, c0, px, g0, g1, b1, g3, b3, k,
                  dpx, dgh, acc_g, acc_c, whh_p):  # pragma: no cover
    # A run of lstm_bwd_step's steps (in backward order) in one call, as lstm_infer_loop: per step
    # the rows' elementwise backward (into dgh and dpx at row n - doff, and the LN sums), then the
    # threads multiply their column tiles of the previous h's gradient, dhs[:bs] = dgh W_hh, with
    # oneDNN's brgemm (whh_p: W_hh in column panels, (tiles, 4H, tile), as lstm_infer_loop's).
    # dhs rows past bs keep the gradients of sequences that end at earlier steps. Sizes checked
    # first.
    ntile, G, tile = whh_p.shape
    H = dhs.shape[1]
    N = ghat_s.shape[0]
    B = dhs.shape[0]
    R = dgh.shape[0]
    if (dgh.itemsize != 4 or G != 4 * H or ghat_s.shape[1] != G or dgh.shape[1] != G or dpx.shape[0] != R
            or dpx.shape[1] != G or dhs.shape[1] != H or dcs.shape[0] != B or dcs.shape[1] != H
            or dout.shape[0] != N or dout.shape[1] != H or c_s.shape[0] != N or c_s.shape[1] != H
            or stat_s.shape[0] != N or stat_s.shape[1] != 5 or px.shape[0] != N or px.shape[1] != G
            or cprev_idx.shape[0] != N or c0.shape[0] != B or c0.shape[1] != H or g0.shape[0] != G
            or g1.shape[0] != G or b1.shape[0] != G or g3.shape[0] != H or b3.shape[0] != H
            or acc_g.shape[1] != 3 or acc_g.shape[2] != G or acc_c.shape[0] != acc_g.shape[0]
            or acc_c.shape[1] != 2 or acc_c.shape[2] != H or sizes.shape[0] != offs.shape[0] or H <= 0
            or not _panels_cover(ntile, tile, H)):
        raise ValueError("lstm_bwd_loop: inconsistent shapes")
    if not _c_order(dhs, dgh, whh_p, dpx):
        raise ValueError("lstm_bwd_loop: the arrays must be C-contiguous")
    if not _steps_inside(offs, sizes, B, N, doff, R):
        raise ValueError("lstm_bwd_loop: a step's rows lie outside the buffers")
    if not _prev_inside(cprev_idx, N, B):  # the rows the kernel reads a previous cell from
        raise ValueError("lstm_bwd_loop: cprev_idx points outside the buffers")
    one, inv_g, inv_h = k[1], k[2], k[3]
    chunks = acc_g.shape[0]
    dhp = dhs.ctypes.data
    for s in range(offs.shape[0]):
        off = offs[s]
        bs = sizes[s]
        per = (bs + chunks - 1) // chunks
        for ch in prange(chunks):
            _lstm_bwd_chunk(ch, per, off, doff, bs, dout, dhs, dcs, ghat_s, c_s, stat_s, cprev_idx, c0, px, g0, g1,
                            b1, g3, b3, one, inv_g, inv_h, dpx, dgh, acc_g, acc_c)
        dgp = dgh.ctypes.data + 4 * (off - doff) * G
        for j in prange(ntile):
            _panel_product(j, bs, dgp, G, whh_p, dhp, H, H, False)


# ------------------------------------------------------------------------------------- GRU
# k: (eps, 1, 1/(2H), 1/H) in the data's dtype


@njit(**_OPTS)
def gru_fwd_step(off, soff, gh, gx_rz, gx_n, g1, b1, b_in, k, hs, out, ghat_s, act_s,
                 stat_s):  # pragma: no cover
    # gh: (bs, 3H) = h W_hh^T; LN in groups [r, z | n]; gx_rz (N, 2H), gx_n (N, H): LN(W_ih x)
    # of the two groups, no biases; b1 (3H): added to the normalized recurrent part (r, z: LN
    # bias + b_ih + b_hh; n: LN bias + b_hn); b_in (H): b_ih of n. saved: ghat_s (*, 3H);
    # act_s (*, 4H) = (r, z, n, LN(W_hh h)_n + b_hn); stat_s (*, 2) = the rstd of the two
    # groups of gh.
    bs = gh.shape[0]
    eps, one, inv_2h, inv_h = k[0], k[1], k[2], k[3]
    for b in prange(bs):
        _gru_ln_row(b, soff + b, gh, eps, one, inv_2h, inv_h, ghat_s, stat_s)
    # A second parallel loop for the gates: Numba compiles the layer norms and the gates in one
    # loop body into much slower code than the two loops (``lnorm bench rnn`` shows it).
    for b in prange(bs):
        _gru_gate_row(b, off + b, soff + b, gx_rz, gx_n, g1, b1, b_in, one, hs, out, ghat_s, act_s)


@njit(inline="always")
def _gru_ln_row(b, s, gh, eps, one, inv_2h, inv_h, ghat_s, stat_s):  # pragma: no cover
    # gru_fwd_step's first loop for row b: the two groups of gh normalized into saved row s
    H = gh.shape[1] // 3
    _ln_rows(gh, b, 0, 2 * H, inv_2h, eps, one, ghat_s, s, stat_s, 0)
    _ln_rows(gh, b, 2 * H, 3 * H, inv_h, eps, one, ghat_s, s, stat_s, 1)


@njit(inline="always")
def _gru_gate_row(b, n, s, gx_rz, gx_n, g1, b1, b_in, one, hs, out, ghat_s, act_s):  # pragma: no cover
    # gru_fwd_step's second loop for row b: gates and state from saved row s, output row n
    H = gx_n.shape[1]
    for j in range(H):
        r = fsig(g1[j] * ghat_s[s, j] + b1[j] + gx_rz[n, j])
        z = fsig(g1[H + j] * ghat_s[s, H + j] + b1[H + j] + gx_rz[n, H + j])
        hn = g1[2 * H + j] * ghat_s[s, 2 * H + j] + b1[2 * H + j]
        nv = ftanh(gx_n[n, j] + b_in[j] + r * hn)
        act_s[s, j] = r
        act_s[s, H + j] = z
        act_s[s, 2 * H + j] = nv
        act_s[s, 3 * H + j] = hn
        hv = (one - z) * nv + z * hs[b, j]
        out[n, j] = hv
        hs[b, j] = hv


@njit(**_OPTS)
def gru_train_loop(offs, sizes, gx_rz, gx_n, whh_p, g1, b1, b_in, k, hs, out, ghat_s, act_s, stat_s,
                   gh):  # pragma: no cover
    # The time loop of gru_fwd_step (gradients to come) in one call, as lstm_train_loop: per step
    # the threads multiply their column panels of gh = h W_hh^T (3H columns) with oneDNN's brgemm,
    # then the rows' layer norms and gates, saving at the rows' packed numbers. Sizes checked first.
    ntile, H, tile = whh_p.shape
    G = gh.shape[1]
    N = gx_rz.shape[0]
    B = hs.shape[0]
    if (gh.itemsize != 4 or G != 3 * H or not _panels_cover(ntile, tile, G) or gx_rz.shape[1] != 2 * H
            or gx_n.shape[0] != N or gx_n.shape[1] != H or hs.shape[1] != H or out.shape[0] != N
            or out.shape[1] != H or gh.shape[0] != B or ghat_s.shape[0] != N or ghat_s.shape[1] != G
            or act_s.shape[0] != N or act_s.shape[1] != 4 * H or stat_s.shape[0] != N or stat_s.shape[1] != 2
            or g1.shape[0] != G or b1.shape[0] != G or b_in.shape[0] != H or sizes.shape[0] != offs.shape[0]
            or H <= 0):
        raise ValueError("gru_train_loop: inconsistent shapes")
    if not _c_order(hs, gh, whh_p, gx_rz):
        raise ValueError("gru_train_loop: the arrays must be C-contiguous")
    if not _steps_inside(offs, sizes, B, N, 0, N):
        raise ValueError("gru_train_loop: a step's rows lie outside the buffers")
    eps, one, inv_2h, inv_h = k[0], k[1], k[2], k[3]
    hp, ghp = hs.ctypes.data, gh.ctypes.data
    for s in range(offs.shape[0]):
        off = offs[s]
        bs = sizes[s]
        for j in prange(ntile):
            _panel_product(j, bs, hp, H, whh_p, ghp, G, G, False)
        for b in prange(bs):
            _gru_ln_row(b, off + b, gh, eps, one, inv_2h, inv_h, ghat_s, stat_s)
        for b in prange(bs):
            _gru_gate_row(b, off + b, off + b, gx_rz, gx_n, g1, b1, b_in, one, hs, out, ghat_s, act_s)


@njit(**_OPTS)
def gru_fwd_infer_step(off, poff, gh, px, g0, g1, b1, b_in, k, hs, out):  # pragma: no cover
    # gru_fwd_step without gradients to come, and with the input's layer norm inside, as
    # lstm_fwd_infer_step: px holds W_ih x for a block of steps (row b's at px[poff + b], the
    # caller projects the input a block at a time), normalized here in its two groups [r, z | n]
    # with weight g0 (3H; the LN's bias is folded into b1's r, z part and into b_in) while the row
    # is in cache. Nothing is saved, and there is one parallel loop instead of two. The gates of a
    # row go through a row-local buffer (r, z in a[:2H]): Numba vectorizes that as it does
    # lstm_fwd_infer_step's (a row of a scratch array of the caller's compiled into code several
    # times slower: its aliasing with the other arrays is unknown). The same arithmetic as the
    # training route (the input LN, then gru_fwd_step), to float32 rounding.
    bs = gh.shape[0]
    eps, one, inv_2h, inv_h = k[0], k[1], k[2], k[3]
    for b in prange(bs):
        _gru_infer_row(b, off + b, poff + b, gh, px, g0, g1, b1, b_in, eps, one, inv_2h, inv_h, hs, out)


@njit(inline="always")
def _gru_infer_row(b, n, p, gh, px, g0, g1, b1, b_in, eps, one, inv_2h, inv_h, hs, out):  # pragma: no cover
    # one row of gru_fwd_infer_step: gh row b, px row p, state row b, output row n
    H = gh.shape[1] // 3
    a = np.empty(2 * H, dtype=gh.dtype)
    mu1, r1 = _mean_rstd(gh, b, 0, 2 * H, inv_2h, eps, one)
    mu2, r2 = _mean_rstd(gh, b, 2 * H, 3 * H, inv_h, eps, one)
    mx1, rx1 = _mean_rstd(px, p, 0, 2 * H, inv_2h, eps, one)
    mx2, rx2 = _mean_rstd(px, p, 2 * H, 3 * H, inv_h, eps, one)
    for q in range(2 * H):
        a[q] = fsig(g1[q] * ((gh[b, q] - mu1) * r1) + b1[q] + g0[q] * ((px[p, q] - mx1) * rx1))
    for j in range(H):
        hn = g1[2 * H + j] * ((gh[b, 2 * H + j] - mu2) * r2) + b1[2 * H + j]
        xn = g0[2 * H + j] * ((px[p, 2 * H + j] - mx2) * rx2)
        nv = ftanh(xn + b_in[j] + a[j] * hn)
        z = a[H + j]
        hv = (one - z) * nv + z * hs[b, j]
        out[n, j] = hv
        hs[b, j] = hv


@njit(**_OPTS)
def gru_infer_loop(offs, sizes, x, wih_p, whh_p, g0, g1, b1, b_in, k, hs, out, gh, px):  # pragma: no cover
    # The GRU's time loop of gru_fwd_infer_step in one call, as lstm_infer_loop: per step the
    # threads multiply their column panels of gh = h W_hh^T and px = x W_ih^T (3H columns) with
    # oneDNN's brgemm, then the rows' elementwise work. Sizes checked first.
    ntile, H, tile = whh_p.shape
    G = gh.shape[1]
    N, I = x.shape
    B = hs.shape[0]
    if (gh.itemsize != 4 or G != 3 * H or wih_p.shape[0] != ntile or wih_p.shape[1] != I or wih_p.shape[2] != tile
            or not _panels_cover(ntile, tile, G) or hs.shape[1] != H or out.shape[0] != N or out.shape[1] != H
            or gh.shape[0] != B or px.shape[0] != B or px.shape[1] != G or g0.shape[0] != G or g1.shape[0] != G
            or b1.shape[0] != G or b_in.shape[0] != H or sizes.shape[0] != offs.shape[0] or H <= 0 or I <= 0):
        raise ValueError("gru_infer_loop: inconsistent shapes")
    if not _c_order(hs, gh, px, x) or not _c_order(wih_p, whh_p, wih_p, whh_p):
        raise ValueError("gru_infer_loop: the arrays must be C-contiguous")
    if not _steps_inside(offs, sizes, B, N, 0, N):
        raise ValueError("gru_infer_loop: a step's rows lie outside the buffers")
    eps, one, inv_2h, inv_h = k[0], k[1], k[2], k[3]
    hp, ghp, pxp = hs.ctypes.data, gh.ctypes.data, px.ctypes.data
    for s in range(offs.shape[0]):
        off = offs[s]
        bs = sizes[s]
        xp = x.ctypes.data + 4 * off * I
        for j in prange(ntile):
            _panel_product(j, bs, hp, H, whh_p, ghp, G, G, False)
            _panel_product(j, bs, xp, I, wih_p, pxp, G, G, False)
        for b in prange(bs):
            _gru_infer_row(b, off + b, b, gh, px, g0, g1, b1, b_in, eps, one, inv_2h, inv_h, hs, out)


@njit(**_OPTS)
def gru_bwd_step(off, doff, bs, dout, dhs, ghat_s, act_s, stat_s, hprev_idx, out, h0, g1, k,
                 dx_rz, dx_n, dgh, acc):  # pragma: no cover
    # dhs: (B, H) in: the gradient w.r.t. this step's h from later steps; out: its z * dh part of
    # the previous h's gradient (the caller adds dgh W_hh); dx_rz (N, 2H), dx_n (N, H):
    # gradients of gx_rz, gx_n; dgh (*, 3H): of gh, for row n at row n - doff (the caller's buffer
    # holds a run of steps, see rnn_fused).
    # hprev_idx[n]: row of out holding the previous h, or -1 - b for h0[b].
    # acc (chunks, 3, 3H), float64: running sums over all rows of the gradients of the recurrent
    # LN's weight (acc[:, 0]) and of the bias b1 (acc[:, 1]), and of b_in (acc[:, 2, :H]), one slice
    # per chunk of rows (the caller sums the slices), each row added while it is in cache, as in
    # lstm_bwd_step (a second pass over dx_rz and ghat read 26 MB back from memory).
    one, inv_2h, inv_h = k[1], k[2], k[3]
    chunks = acc.shape[0]
    per = (bs + chunks - 1) // chunks
    for ch in prange(chunks):
        _gru_bwd_chunk(ch, per, off, doff, bs, dout, dhs, ghat_s, act_s, stat_s, hprev_idx, out, h0, g1, one, inv_2h,
                       inv_h, dx_rz, dx_n, dgh, acc)


@njit(inline="always")
def _gru_bwd_chunk(ch, per, off, doff, bs, dout, dhs, ghat_s, act_s, stat_s, hprev_idx, out, h0, g1, one, inv_2h,
                   inv_h, dx_rz, dx_n, dgh, acc):  # pragma: no cover
    # the rows ch * per .. of gru_bwd_step, and their share (slice ch) of the LN-gradient sums
    G = ghat_s.shape[1]
    H = G // 3
    zero = one * np.float32(0)
    # this step's sums over the chunk's rows in the data's dtype, then into the float64 sums
    ag = np.zeros((3, G), dtype=dgh.dtype)
    dyn = np.empty(H, dtype=dgh.dtype)  # the row's gradient of LN(W_hh h)_n + b_hn
    for b in range(ch * per, min(bs, (ch + 1) * per)):
        n = off + b
        d = n - doff
        p = hprev_idx[n]
        hprev = out if p >= 0 else h0
        pr = p if p >= 0 else -1 - p
        for j in range(H):
            r = act_s[n, j]
            z = act_s[n, H + j]
            nv = act_s[n, 2 * H + j]
            hn = act_s[n, 3 * H + j]
            dh = dout[n, j] + dhs[b, j]
            dhs[b, j] = dh * z
            dn = dh * (one - z) * (one - nv * nv)
            dx_rz[n, j] = dn * hn * r * (one - r)
            dx_rz[n, H + j] = dh * (hprev[pr, j] - nv) * z * (one - z)
            dx_n[n, j] = dn
            dyn[j] = dn * r
        # LN backward, group r, z (its output gradient is dx_rz's)
        rs = stat_s[n, 0]
        s3 = zero
        s4 = zero
        for q in range(2 * H):
            dgt = dx_rz[n, q] * g1[q]
            s3 += dgt
            s4 += dgt * ghat_s[n, q]
        s3 = s3 * inv_2h
        s4 = s4 * inv_2h
        for q in range(2 * H):
            dgh[d, q] = rs * (dx_rz[n, q] * g1[q] - s3 - ghat_s[n, q] * s4)
            ag[0, q] += dx_rz[n, q] * ghat_s[n, q]
            ag[1, q] += dx_rz[n, q]
        # group n (its output gradient is r * dn)
        rs = stat_s[n, 1]
        s3 = zero
        s4 = zero
        for j in range(H):
            dgt = dyn[j] * g1[2 * H + j]
            s3 += dgt
            s4 += dgt * ghat_s[n, 2 * H + j]
        s3 = s3 * inv_h
        s4 = s4 * inv_h
        for j in range(H):
            dgh[d, 2 * H + j] = rs * (dyn[j] * g1[2 * H + j] - s3 - ghat_s[n, 2 * H + j] * s4)
            ag[0, 2 * H + j] += dyn[j] * ghat_s[n, 2 * H + j]
            ag[1, 2 * H + j] += dyn[j]
            ag[2, j] += dx_n[n, j]
    for q in range(G):
        acc[ch, 0, q] += ag[0, q]
        acc[ch, 1, q] += ag[1, q]
    for j in range(H):
        acc[ch, 2, j] += ag[2, j]


@njit(**_OPTS)
def gru_bwd_loop(offs, sizes, doff, dout, dhs, ghat_s, act_s, stat_s, hprev_idx, out, h0, g1, k, dx_rz, dx_n, dgh,
                 acc, whh_p):  # pragma: no cover
    # A run of gru_bwd_step's steps (in backward order) in one call, as lstm_bwd_loop: per step the
    # rows' elementwise backward (which leaves z dh in dhs), then the threads add their column
    # panels of dgh W_hh to dhs[:bs] with oneDNN's brgemm (add_C; whh_p: W_hh in column panels,
    # (tiles, 3H, tile)). Sizes checked first.
    ntile, G, tile = whh_p.shape
    H = dhs.shape[1]
    N = ghat_s.shape[0]
    B = dhs.shape[0]
    R = dgh.shape[0]
    if (dgh.itemsize != 4 or G != 3 * H or not _panels_cover(ntile, tile, H) or ghat_s.shape[1] != G
            or dgh.shape[1] != G or dout.shape[0] != N or dout.shape[1] != H or act_s.shape[0] != N
            or act_s.shape[1] != 4 * H or stat_s.shape[0] != N or stat_s.shape[1] != 2 or hprev_idx.shape[0] != N
            or out.shape[0] != N or out.shape[1] != H or h0.shape[0] != B or h0.shape[1] != H or g1.shape[0] != G
            or dx_rz.shape[0] != N or dx_rz.shape[1] != 2 * H or dx_n.shape[0] != N or dx_n.shape[1] != H
            or acc.shape[1] != 3 or acc.shape[2] != G or sizes.shape[0] != offs.shape[0] or H <= 0):
        raise ValueError("gru_bwd_loop: inconsistent shapes")
    if not _c_order(dhs, dgh, whh_p, dout):
        raise ValueError("gru_bwd_loop: the arrays must be C-contiguous")
    if not _steps_inside(offs, sizes, B, N, doff, R):
        raise ValueError("gru_bwd_loop: a step's rows lie outside the buffers")
    if not _prev_inside(hprev_idx, N, B):  # the rows the kernel reads a previous h from
        raise ValueError("gru_bwd_loop: hprev_idx points outside the buffers")
    one, inv_2h, inv_h = k[1], k[2], k[3]
    chunks = acc.shape[0]
    dhp = dhs.ctypes.data
    for s in range(offs.shape[0]):
        off = offs[s]
        bs = sizes[s]
        per = (bs + chunks - 1) // chunks
        for ch in prange(chunks):
            _gru_bwd_chunk(ch, per, off, doff, bs, dout, dhs, ghat_s, act_s, stat_s, hprev_idx, out, h0, g1, one,
                           inv_2h, inv_h, dx_rz, dx_n, dgh, acc)
        dgp = dgh.ctypes.data + 4 * (off - doff) * G
        for j in prange(ntile):
            _panel_product(j, bs, dgp, G, whh_p, dhp, H, H, True)


# ------------------------------------------------------------------------------------- builds
# Each kernel also in a serial build (prange is a plain range), for a process forked after its
# parent started Numba's thread pool (see ``lnorm.ops._numba_threads``); compiled on first use.

_KERNELS = (lstm_fwd_step, lstm_train_loop, lstm_fwd_infer_step, lstm_infer_loop, lstm_bwd_step, lstm_bwd_loop,
            gru_fwd_step, gru_train_loop, gru_fwd_infer_step, gru_infer_loop, gru_bwd_step, gru_bwd_loop)
_SERIAL_OPTS = dict(_OPTS, parallel=False)
_SERIAL = SimpleNamespace(**{
    k.__name__: njit(**_SERIAL_OPTS)(twin(k.py_func, k.__name__ + "_serial")) for k in _KERNELS
})


def builds() -> SimpleNamespace:
    """The kernels to call now, by name: the threaded builds (each guarded for the threading
    layer), or the serial ones in a child forked after the pool started."""
    if not threads_allowed():
        return _SERIAL
    return SimpleNamespace(**{k.__name__: guard(k) for k in _KERNELS})
