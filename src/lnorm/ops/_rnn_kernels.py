"""Fused per-time-step CPU kernels for the layer-normalized LSTM and GRU, compiled by Numba.

Each kernel does all the elementwise work of one time step for the ``bs`` active rows: the layer
norm of the recurrent pre-activation ``gh = h W_hh^T`` (computed outside by one MKL matmul), the
gate nonlinearities, the state update and (LSTM) the layer norm of the cell. The backward kernels
walk the same step in reverse. ``lnorm.ops.rnn_fused`` launches them from its time loop.

Notation: row ``b`` of the step is row ``n = off + b`` of the packed (N, ...) sequence buffers;
``H`` hidden size; LSTM gates (i, f, g, o) and GRU gates (r, z, n) in torch's order. ``gx`` is the
hoisted input part of the gates (LN(W_ih x) + biases) for all rows. Saved tensors are indexed by
``n``; in inference the "saved" buffers are per-step scratch indexed by ``b`` (``soff = 0``).
Accumulators take the array's dtype.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

_FASTMATH = {"reassoc", "contract", "arcp"}
_OPTS = dict(parallel=True, fastmath=_FASTMATH, cache=True, nogil=True)


@njit(inline="always")
def _sig(x):
    return 1.0 / (1.0 + np.exp(-x))


# ------------------------------------------------------------------------------------ LSTM


@njit(**_OPTS)
def lstm_fwd_step(off, soff, gh, gx, g1, b1, g3, b3, eps, hs, cs, out,
                  ghat_s, act_s, c_s, stat_s):  # pragma: no cover
    # gh: (bs, 4H) = h W_hh^T for the active rows; gx: (N, 4H); hs, cs: (B, H) state, updated in
    # place for rows < bs; out: (N, H); saved: ghat_s, act_s (*, 4H), c_s (*, H), stat_s (*, 3)
    # holding (rstd of gh, mean of c, rstd of c)
    bs, G = gh.shape
    H = G // 4
    inv_g = 1.0 / G
    inv_h = 1.0 / H
    for b in prange(bs):
        n = off + b
        s = soff + b
        mu = gh[b, 0] * 0
        for k in range(G):
            mu += gh[b, k]
        mu = mu * inv_g
        var = gh[b, 0] * 0
        for k in range(G):
            d = gh[b, k] - mu
            var += d * d
        rh = 1.0 / np.sqrt(var * inv_g + eps)
        stat_s[s, 0] = rh
        for k in range(G):
            ghat_s[s, k] = (gh[b, k] - mu) * rh
        for k in range(G):
            pre = g1[k] * ghat_s[s, k] + b1[k] + gx[n, k]
            if k >= 2 * H and k < 3 * H:
                act_s[s, k] = np.tanh(pre)
            else:
                act_s[s, k] = _sig(pre)
        muc = gh[b, 0] * 0
        for j in range(H):
            cn = act_s[s, H + j] * cs[b, j] + act_s[s, j] * act_s[s, 2 * H + j]
            c_s[s, j] = cn
            muc += cn
        muc = muc * inv_h
        varc = muc * 0
        for j in range(H):
            d = c_s[s, j] - muc
            varc += d * d
        rc = 1.0 / np.sqrt(varc * inv_h + eps)
        stat_s[s, 1] = muc
        stat_s[s, 2] = rc
        for j in range(H):
            cn = c_s[s, j]
            tc = np.tanh(g3[j] * ((cn - muc) * rc) + b3[j])
            hv = act_s[s, 3 * H + j] * tc
            out[n, j] = hv
            hs[b, j] = hv
            cs[b, j] = cn


@njit(**_OPTS)
def lstm_bwd_step(off, bs, dout, dhs, dcs, ghat_s, act_s, c_s, stat_s, cprev_idx, c0, g1, g3, b3,
                  dgx, dgh, dcn_s, dcnc_s):  # pragma: no cover
    # dhs, dcs: (B, H) gradient state (in: w.r.t. this step's h and c from later steps; out: dcs
    # w.r.t. the previous c; dhs is overwritten by the caller's matmul); dgx, dgh: (N, 4H) outputs
    # (gradient of the gates = of gx, and of gh); dcn_s, dcnc_s: (N, H) per-row terms of the
    # cell-LN weight and bias gradients. cprev_idx[n]: row of c_s holding the previous c, or
    # -1 - b for c0[b].
    G = ghat_s.shape[1]
    H = G // 4
    inv_g = 1.0 / G
    inv_h = 1.0 / H
    for b in prange(bs):
        n = off + b
        muc = stat_s[n, 1]
        rc = stat_s[n, 2]
        rh = stat_s[n, 0]
        s1 = rc * 0
        s2 = rc * 0
        for j in range(H):
            chat = (c_s[n, j] - muc) * rc
            tc = np.tanh(g3[j] * chat + b3[j])
            o = act_s[n, 3 * H + j]
            dh = dout[n, j] + dhs[b, j]
            dgx[n, 3 * H + j] = dh * tc * o * (1.0 - o)
            dcn = dh * o * (1.0 - tc * tc)
            dcn_s[n, j] = dcn
            dcnc_s[n, j] = dcn * chat
            dchat = dcn * g3[j]
            s1 += dchat
            s2 += dchat * chat
        s1 = s1 * inv_h
        s2 = s2 * inv_h
        p = cprev_idx[n]
        for j in range(H):
            chat = (c_s[n, j] - muc) * rc
            dc = rc * (dcn_s[n, j] * g3[j] - s1 - chat * s2) + dcs[b, j]
            cp = c_s[p, j] if p >= 0 else c0[-1 - p, j]
            i = act_s[n, j]
            f = act_s[n, H + j]
            g = act_s[n, 2 * H + j]
            dgx[n, j] = dc * g * i * (1.0 - i)
            dgx[n, H + j] = dc * cp * f * (1.0 - f)
            dgx[n, 2 * H + j] = dc * i * (1.0 - g * g)
            dcs[b, j] = dc * f
        s3 = rc * 0
        s4 = rc * 0
        for k in range(G):
            dgt = dgx[n, k] * g1[k]
            s3 += dgt
            s4 += dgt * ghat_s[n, k]
        s3 = s3 * inv_g
        s4 = s4 * inv_g
        for k in range(G):
            dgh[n, k] = rh * (dgx[n, k] * g1[k] - s3 - ghat_s[n, k] * s4)


# ------------------------------------------------------------------------------------- GRU


@njit(**_OPTS)
def gru_fwd_step(off, soff, gh, gx, g1, b1, bhn, eps, hs, out, ghat_s, act_s, stat_s):  # pragma: no cover
    # gh: (bs, 3H) = h W_hh^T; LN in groups [r, z | n]; gx: (N, 3H) = LN(W_ih x) + biases (the
    # r, z part holds b_ih + b_hh, the n part b_ih only); bhn: (H,) b_hh of n (zeros if no bias).
    # saved: ghat_s (*, 3H); act_s (*, 4H) = (r, z, n, LN(W_hh h)_n + b_hn); stat_s (*, 2) = the
    # rstd of the two groups of gh.
    bs, G = gh.shape
    H = G // 3
    inv_2h = 1.0 / (2 * H)
    inv_h = 1.0 / H
    for b in prange(bs):
        n = off + b
        s = soff + b
        for grp in range(2):
            lo = 0 if grp == 0 else 2 * H
            hi = 2 * H if grp == 0 else 3 * H
            inv = inv_2h if grp == 0 else inv_h
            mu = gh[b, 0] * 0
            for k in range(lo, hi):
                mu += gh[b, k]
            mu = mu * inv
            var = mu * 0
            for k in range(lo, hi):
                d = gh[b, k] - mu
                var += d * d
            r = 1.0 / np.sqrt(var * inv + eps)
            stat_s[s, grp] = r
            for k in range(lo, hi):
                ghat_s[s, k] = (gh[b, k] - mu) * r
        for j in range(H):
            r = _sig(g1[j] * ghat_s[s, j] + b1[j] + gx[n, j])
            z = _sig(g1[H + j] * ghat_s[s, H + j] + b1[H + j] + gx[n, H + j])
            hn = g1[2 * H + j] * ghat_s[s, 2 * H + j] + b1[2 * H + j] + bhn[j]
            nv = np.tanh(gx[n, 2 * H + j] + r * hn)
            act_s[s, j] = r
            act_s[s, H + j] = z
            act_s[s, 2 * H + j] = nv
            act_s[s, 3 * H + j] = hn
            hv = (1.0 - z) * nv + z * hs[b, j]
            out[n, j] = hv
            hs[b, j] = hv


@njit(**_OPTS)
def gru_bwd_step(off, bs, dout, dhs, ghat_s, act_s, stat_s, hprev_idx, out, h0, g1,
                 dgx, dgh, dyn_s, dhprev_direct):  # pragma: no cover
    # dhs: (B, H) gradient w.r.t. this step's h from later steps; dgx (N, 3H): gradient of gx;
    # dgh (N, 3H): of gh; dyn_s (N, H): of LN(W_hh h)_n + b_hn; dhprev_direct (B, H): the z * dh part of the previous h's gradient (the
    # caller adds dgh W_hh). hprev_idx[n]: row of out holding the previous h, or -1 - b for h0[b].
    G = ghat_s.shape[1]
    H = G // 3
    inv_2h = 1.0 / (2 * H)
    inv_h = 1.0 / H
    for b in prange(bs):
        n = off + b
        p = hprev_idx[n]
        for j in range(H):
            r = act_s[n, j]
            z = act_s[n, H + j]
            nv = act_s[n, 2 * H + j]
            hn = act_s[n, 3 * H + j]
            hp = out[p, j] if p >= 0 else h0[-1 - p, j]
            dh = dout[n, j] + dhs[b, j]
            dhprev_direct[b, j] = dh * z
            dn = dh * (1.0 - z) * (1.0 - nv * nv)
            dz = dh * (hp - nv) * z * (1.0 - z)
            dr = dn * hn * r * (1.0 - r)
            dgx[n, j] = dr
            dgx[n, H + j] = dz
            dgx[n, 2 * H + j] = dn
            dyn_s[n, j] = dn * r
        for grp in range(2):
            lo = 0 if grp == 0 else 2 * H
            hi = 2 * H if grp == 0 else 3 * H
            inv = inv_2h if grp == 0 else inv_h
            rs = stat_s[n, grp]
            s3 = rs * 0
            s4 = rs * 0
            for k in range(lo, hi):
                dy = dgx[n, k] if grp == 0 else dyn_s[n, k - 2 * H]
                dgt = dy * g1[k]
                s3 += dgt
                s4 += dgt * ghat_s[n, k]
            s3 = s3 * inv
            s4 = s4 * inv
            for k in range(lo, hi):
                dy = dgx[n, k] if grp == 0 else dyn_s[n, k - 2 * H]
                dgh[n, k] = rs * (dy * g1[k] - s3 - ghat_s[n, k] * s4)


# --------------------------------------------------------------------------------- reductions


@njit(**_OPTS)
def colsum_prod(a, b, out):  # pragma: no cover
    # out[k] = sum_n a[n, k] * b[n, k], parallel over column blocks (no write races)
    N, K = a.shape
    blk = 64
    nblk = (K + blk - 1) // blk
    for q in prange(nblk):
        lo = q * blk
        hi = min(K, lo + blk)
        for k in range(lo, hi):
            out[k] = 0
        for r in range(N):
            for k in range(lo, hi):
                out[k] += a[r, k] * b[r, k]
