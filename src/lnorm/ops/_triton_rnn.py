"""The fused GPU path of LayerNormLSTM / LayerNormGRU: one direction of one layer, with Triton.

The split is the fused CPU path's (:mod:`lnorm.ops.rnn_fused`):

* The input part of the gates does not depend on h: ``W_ih x`` for all time steps at once (one
  GEMM), its layer norm by the norm ops (:func:`lnorm.ops.norm.fused_norm`: the Triton norm
  kernel), plus the biases, as the pure-torch path computes it; autograd differentiates it.
* Per time step: one GEMM ``h W_hh^T`` (torch / cuBLAS, into a step buffer), then ONE Triton
  kernel for the rest of the step (layer norm of the recurrent part, gates, state update, layer
  norm of the cell, the new h), one program per batch row. It saves the normalized recurrent part
  and the statistics (the LSTM its cell too); backward recomputes the gates from them.
* Backward through time, written by hand with the same split: per step one Triton kernel (the
  step's elementwise and layer-norm backward) and one GEMM ``dgh W_hh`` for the previous h's
  gradient; after the loop, the gradient of W_hh is one GEMM over all rows and those of the
  recurrent and cell layer norms' gains and biases are column sums.

Numerics: statistics, gates, cell state and h in float32. Under ``torch.autocast`` for the
tensors' device the GEMMs run in the autocast dtype (bfloat16 / float16), as the pure-torch path's
``F.linear`` does there: the step kernel reads the half-precision GEMM result and also writes the
new h rounded to that dtype, the next GEMM's input; outputs stay float32, as on the pure-torch
path. The variance of a row is that of ``x - mean`` (two passes over registers); a finite row
whose squares overflow float32 (values past ~1e19) gets its variance from the row times 2**-64,
so it is normalized, not zeroed.

Variable lengths: rows are packed (time-major, each step's batch sorted longest first); at a step
only its first ``bs`` rows advance and the others keep their state in the (B, H) state buffers,
so every sequence gets exactly what it gets alone. Backward reads the state each row started
from through ``_Plan.prev``.

Notation: G gates (4 for the LSTM, 3 for the GRU), H hidden features, N packed rows, B batch.
Triton is imported here at module level: import this module only where triton is installed.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from lnorm.ops._triton_norm import INTERPRETED, rounded
from lnorm.ops.guards import first_order_only
from lnorm.ops.norm import fused_norm
from lnorm.ops.rnn_weights import RecurrentWeights, check_shapes

__all__ = ["MAX_HIDDEN", "recurrence", "supports"]

# ---------------------------------------------------------------------------------------- kernels

_TINY = tl.constexpr(5.421010862427522e-20)  # 2**-64: scales a row whose squares overflow (exact)
_FLT_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _sigmoid(v):
    return 1.0 / (1.0 + tl.exp(-v))


@triton.jit
def _tanh(v):
    # |v| >= 0.55: from t = exp(-2|v|) <= 1/3, which cannot overflow and leaves 1 - t without
    # cancellation; below, where 1 - t would lose digits, the Taylor series to v^19 (its next
    # term is below 3e-9 of the result there). A few ulp either way; NaN stays NaN.
    a = tl.abs(v)
    t = tl.exp(-2.0 * a)
    big = (1.0 - t) / (1.0 + t)
    s = v * v
    p = -2.3912911424355248e-04  # the series' coefficients of v^19 down to v^3
    p = p * s + 5.90027440945586e-04
    p = p * s - 1.4558343870513183e-03
    p = p * s + 3.592128036572481e-03
    p = p * s - 8.863235529902197e-03
    p = p * s + 2.1869488536155203e-02
    p = p * s - 5.396825396825397e-02
    p = p * s + 1.3333333333333333e-01
    p = p * s - 3.333333333333333e-01
    small = a + a * s * p
    r = tl.where(a < 0.55, small, big)
    return tl.where(v < 0, -r, r)


@triton.jit
def _inv_std(ss, ss_tiny, inv_n, eps):
    """1 / sqrt(var + eps) from the sum of squares ``ss`` of a centered row, or where those
    overflowed (a finite row past ~1e19), from ``ss_tiny``, that of the row times 2**-64."""
    plain = 1.0 / tl.sqrt(ss * inv_n + eps)
    # (the floor only keeps the unused branch finite: where it is used, ss_tiny * inv_n > 1e-5)
    scaled = _TINY / tl.sqrt(tl.maximum(ss_tiny * inv_n, 1e-30))
    return tl.where(ss <= _FLT_MAX, plain, scaled)  # NaN: scaled, NaN too


@triton.jit
def _ln_parts4(a, b, c, d, mask, inv_n, eps):
    """The layer norm over four (BLOCK_H,) parts of one row: the parts normalized, and rstd."""
    mu = (tl.sum(a, axis=0) + tl.sum(b, axis=0) + tl.sum(c, axis=0) + tl.sum(d, axis=0)) * inv_n
    a = tl.where(mask, a - mu, 0.0)
    b = tl.where(mask, b - mu, 0.0)
    c = tl.where(mask, c - mu, 0.0)
    d = tl.where(mask, d - mu, 0.0)
    ss = tl.sum(a * a, axis=0) + tl.sum(b * b, axis=0) + tl.sum(c * c, axis=0) + tl.sum(d * d, axis=0)
    at, bt, ct, dt = a * _TINY, b * _TINY, c * _TINY, d * _TINY
    ss_tiny = tl.sum(at * at, axis=0) + tl.sum(bt * bt, axis=0) + tl.sum(ct * ct, axis=0) + tl.sum(dt * dt, axis=0)
    r = _inv_std(ss, ss_tiny, inv_n, eps)
    return a * r, b * r, c * r, d * r, r


@triton.jit
def _ln_parts2(a, b, mask, inv_n, eps):
    """The layer norm over two (BLOCK_H,) parts of one row: the parts normalized, and rstd."""
    mu = (tl.sum(a, axis=0) + tl.sum(b, axis=0)) * inv_n
    a = tl.where(mask, a - mu, 0.0)
    b = tl.where(mask, b - mu, 0.0)
    at, bt = a * _TINY, b * _TINY
    r = _inv_std(tl.sum(a * a, axis=0) + tl.sum(b * b, axis=0), tl.sum(at * at, axis=0) + tl.sum(bt * bt, axis=0),
                 inv_n, eps)
    return a * r, b * r, r


@triton.jit
def _ln_part(a, mask, inv_n, eps):
    """The layer norm of one (BLOCK_H,) part: normalized, mean and rstd."""
    mu = tl.sum(a, axis=0) * inv_n
    a = tl.where(mask, a - mu, 0.0)
    at = a * _TINY
    r = _inv_std(tl.sum(a * a, axis=0), tl.sum(at * at, axis=0), inv_n, eps)
    return a * r, mu, r


@triton.jit
def _ln_bwd(dy, xhat, mask, rstd, mean_dy, mean_dy_xhat):
    """A layer norm's input gradient from the gradient ``dy`` of its normalized output (gain
    applied) and the row means of ``dy`` and ``dy * xhat``."""
    return tl.where(mask, rstd * (dy - mean_dy - xhat * mean_dy_xhat), 0.0)


@triton.jit
def _load(ptr, cols, mask):
    return tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _lstm_fwd_kernel(
    GH, GX, G1, B1, G3, B3,  # (bs, 4H) this step's h W_hh^T; (N, 4H) input part; (4H,) x2; (H,) x2
    HS, CS, HLOW, OUT,  # (B, H) float32 state h, c (updated); (B, H) h in the GEMM's dtype or None; (N, H)
    GHAT, CALL, STAT,  # saved for backward or None: (N, 4H), (N, H), (N, 3) = (rstd of gh, mean, rstd of c)
    off, H, inv_g, inv_h, eps,
    SAVE: tl.constexpr, HAS_LOW: tl.constexpr, BLOCK_H: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)  # int64 offsets: N * 4H may pass 2**31
    n = off + b
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    gh = GH + b * 4 * H
    ai, af, ag, ao, rh = _ln_parts4(_load(gh, cols, mask), _load(gh + H, cols, mask), _load(gh + 2 * H, cols, mask),
                                    _load(gh + 3 * H, cols, mask), mask, inv_g, eps)
    gx = GX + n * 4 * H
    i = _sigmoid(_load(G1, cols, mask) * ai + _load(B1, cols, mask) + _load(gx, cols, mask))
    f = _sigmoid(_load(G1 + H, cols, mask) * af + _load(B1 + H, cols, mask) + _load(gx + H, cols, mask))
    g = _tanh(_load(G1 + 2 * H, cols, mask) * ag + _load(B1 + 2 * H, cols, mask) + _load(gx + 2 * H, cols, mask))
    o = _sigmoid(_load(G1 + 3 * H, cols, mask) * ao + _load(B1 + 3 * H, cols, mask) + _load(gx + 3 * H, cols, mask))
    c = tl.where(mask, f * _load(CS + b * H, cols, mask) + i * g, 0.0)
    xh, muc, rc = _ln_part(c, mask, inv_h, eps)
    h = o * _tanh(_load(G3, cols, mask) * xh + _load(B3, cols, mask))
    tl.store(CS + b * H + cols, c, mask=mask)
    tl.store(HS + b * H + cols, h, mask=mask)
    tl.store(OUT + n * H + cols, h, mask=mask)
    if HAS_LOW:
        tl.store(HLOW + b * H + cols, rounded(h, HLOW.dtype.element_ty), mask=mask)
    if SAVE:
        gs = GHAT + n * 4 * H
        tl.store(gs + cols, ai, mask=mask)
        tl.store(gs + H + cols, af, mask=mask)
        tl.store(gs + 2 * H + cols, ag, mask=mask)
        tl.store(gs + 3 * H + cols, ao, mask=mask)
        tl.store(CALL + n * H + cols, c, mask=mask)
        tl.store(STAT + n * 3, rh)
        tl.store(STAT + n * 3 + 1, muc)
        tl.store(STAT + n * 3 + 2, rc)


@triton.jit
def _prev_row(ROWS, INIT, PREV, n, H, cols, mask):
    """The state row n started its step from: a row of ROWS (N, H) or, where PREV[n] = -1 - b,
    row b of INIT (B, H). Both addresses are kept in bounds; the unused load is discarded."""
    p = tl.load(PREV + n)
    from_rows = _load(ROWS + tl.maximum(p, 0) * H, cols, mask)
    from_init = _load(INIT + tl.maximum(-1 - p, 0) * H, cols, mask)
    return tl.where(p >= 0, from_rows, from_init)


@triton.jit
def _lstm_bwd_kernel(
    DOUT, DHS, DHP, DCS,  # (N, H); (B, H) dh carried, zeroed; (B, H) dgh W_hh of the step after; (B, H) dc carried
    GX, GHAT, CALL, STAT, PREV, C0, G1, B1, G3, B3,  # saved by forward (see _lstm_fwd_kernel)
    DGX, DGH, DCN, DCNX,  # out: (N, 4H) dgates; (N, 4H) dgh in the GEMM's dtype; (N, H) x2 for the cell LN's sums
    off, H, inv_g, inv_h,
    BLOCK_H: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    n = off + b
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    gs, gx = GHAT + n * 4 * H, GX + n * 4 * H
    ai, af, ag, ao = _load(gs, cols, mask), _load(gs + H, cols, mask), _load(gs + 2 * H, cols, mask), _load(gs + 3 * H, cols, mask)
    g1i, g1f, g1g, g1o = _load(G1, cols, mask), _load(G1 + H, cols, mask), _load(G1 + 2 * H, cols, mask), _load(G1 + 3 * H, cols, mask)
    i = _sigmoid(g1i * ai + _load(B1, cols, mask) + _load(gx, cols, mask))
    f = _sigmoid(g1f * af + _load(B1 + H, cols, mask) + _load(gx + H, cols, mask))
    g = _tanh(g1g * ag + _load(B1 + 2 * H, cols, mask) + _load(gx + 2 * H, cols, mask))
    o = _sigmoid(g1o * ao + _load(B1 + 3 * H, cols, mask) + _load(gx + 3 * H, cols, mask))
    rh, muc, rc = tl.load(STAT + n * 3), tl.load(STAT + n * 3 + 1), tl.load(STAT + n * 3 + 2)
    xh = tl.where(mask, (_load(CALL + n * H, cols, mask) - muc) * rc, 0.0)
    g3 = _load(G3, cols, mask)
    tc = _tanh(g3 * xh + _load(B3, cols, mask))
    dh = _load(DOUT + n * H, cols, mask) + _load(DHS + b * H, cols, mask) + _load(DHP + b * H, cols, mask)
    do = dh * tc * o * (1.0 - o)
    dcn = dh * o * (1.0 - tc * tc)  # the gradient of the cell LN's output
    dchat = dcn * g3
    dc = _ln_bwd(dchat, xh, mask, rc, tl.sum(dchat, axis=0) * inv_h, tl.sum(dchat * xh, axis=0) * inv_h)
    dc += _load(DCS + b * H, cols, mask)
    cprev = _prev_row(CALL, C0, PREV, n, H, cols, mask)
    di = dc * g * i * (1.0 - i)
    df = dc * cprev * f * (1.0 - f)
    dg = dc * i * (1.0 - g * g)
    tl.store(DCS + b * H + cols, dc * f, mask=mask)
    tl.store(DHS + b * H + cols, tl.zeros_like(dh), mask=mask)  # all of dh_prev is dgh W_hh
    dx = DGX + n * 4 * H
    tl.store(dx + cols, di, mask=mask)
    tl.store(dx + H + cols, df, mask=mask)
    tl.store(dx + 2 * H + cols, dg, mask=mask)
    tl.store(dx + 3 * H + cols, do, mask=mask)
    tl.store(DCN + n * H + cols, dcn, mask=mask)
    tl.store(DCNX + n * H + cols, dcn * xh, mask=mask)
    # the recurrent part's layer norm backward (its gain applied) -> dgh
    ti, tf, tg, to = di * g1i, df * g1f, dg * g1g, do * g1o
    s3 = (tl.sum(ti, axis=0) + tl.sum(tf, axis=0) + tl.sum(tg, axis=0) + tl.sum(to, axis=0)) * inv_g
    s4 = (tl.sum(ti * ai, axis=0) + tl.sum(tf * af, axis=0) + tl.sum(tg * ag, axis=0) + tl.sum(to * ao, axis=0)) * inv_g
    dgh = DGH + n * 4 * H
    ty = DGH.dtype.element_ty
    tl.store(dgh + cols, rounded(_ln_bwd(ti, ai, mask, rh, s3, s4), ty), mask=mask)
    tl.store(dgh + H + cols, rounded(_ln_bwd(tf, af, mask, rh, s3, s4), ty), mask=mask)
    tl.store(dgh + 2 * H + cols, rounded(_ln_bwd(tg, ag, mask, rh, s3, s4), ty), mask=mask)
    tl.store(dgh + 3 * H + cols, rounded(_ln_bwd(to, ao, mask, rh, s3, s4), ty), mask=mask)


@triton.jit
def _gru_fwd_kernel(
    GH, GX, G1, B1,  # (bs, 3H) this step's h W_hh^T; (N, 3H) input part (biases in); (3H,) x2
    HS, HLOW, OUT,  # (B, H) float32 state h (updated); (B, H) in the GEMM's dtype or None; (N, H)
    GHAT, STAT,  # saved for backward or None: (N, 3H), (N, 2) = the rstd of the groups [r, z | n]
    off, H, inv_2h, inv_h, eps,
    SAVE: tl.constexpr, HAS_LOW: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # b1: (r, z) the recurrent LN's bias; (n) that plus b_hh's n part, inside the reset gate's product
    b = tl.program_id(0).to(tl.int64)
    n = off + b
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    gh = GH + b * 3 * H
    ar, az, rs = _ln_parts2(_load(gh, cols, mask), _load(gh + H, cols, mask), mask, inv_2h, eps)
    an, _, rn = _ln_part(_load(gh + 2 * H, cols, mask), mask, inv_h, eps)
    gx = GX + n * 3 * H
    r = _sigmoid(_load(G1, cols, mask) * ar + _load(B1, cols, mask) + _load(gx, cols, mask))
    z = _sigmoid(_load(G1 + H, cols, mask) * az + _load(B1 + H, cols, mask) + _load(gx + H, cols, mask))
    hn = _load(G1 + 2 * H, cols, mask) * an + _load(B1 + 2 * H, cols, mask)
    nv = _tanh(_load(gx + 2 * H, cols, mask) + r * hn)
    h = (1.0 - z) * nv + z * _load(HS + b * H, cols, mask)
    tl.store(HS + b * H + cols, h, mask=mask)
    tl.store(OUT + n * H + cols, h, mask=mask)
    if HAS_LOW:
        tl.store(HLOW + b * H + cols, rounded(h, HLOW.dtype.element_ty), mask=mask)
    if SAVE:
        gs = GHAT + n * 3 * H
        tl.store(gs + cols, ar, mask=mask)
        tl.store(gs + H + cols, az, mask=mask)
        tl.store(gs + 2 * H + cols, an, mask=mask)
        tl.store(STAT + n * 2, rs)
        tl.store(STAT + n * 2 + 1, rn)


@triton.jit
def _gru_bwd_kernel(
    DOUT, DHS, DHP,  # (N, H); (B, H) dh carried (out: its z * dh part); (B, H) dgh W_hh of the step after
    GX, GHAT, STAT, PREV, OUT, H0, G1, B1,  # saved by forward (see _gru_fwd_kernel)
    DGX, DYN, DGH,  # out: (N, 3H) gradients of the gate pre-activations (r, z, n); (N, H) of hn; (N, 3H) dgh
    off, H, inv_2h, inv_h,
    BLOCK_H: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    n = off + b
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    gs, gx = GHAT + n * 3 * H, GX + n * 3 * H
    ar, az, an = _load(gs, cols, mask), _load(gs + H, cols, mask), _load(gs + 2 * H, cols, mask)
    g1r, g1z, g1n = _load(G1, cols, mask), _load(G1 + H, cols, mask), _load(G1 + 2 * H, cols, mask)
    r = _sigmoid(g1r * ar + _load(B1, cols, mask) + _load(gx, cols, mask))
    z = _sigmoid(g1z * az + _load(B1 + H, cols, mask) + _load(gx + H, cols, mask))
    hn = g1n * an + _load(B1 + 2 * H, cols, mask)
    nv = _tanh(_load(gx + 2 * H, cols, mask) + r * hn)
    hprev = _prev_row(OUT, H0, PREV, n, H, cols, mask)
    dh = _load(DOUT + n * H, cols, mask) + _load(DHS + b * H, cols, mask) + _load(DHP + b * H, cols, mask)
    tl.store(DHS + b * H + cols, dh * z, mask=mask)
    dn = dh * (1.0 - z) * (1.0 - nv * nv)
    dr = dn * hn * r * (1.0 - r)
    dz = dh * (hprev - nv) * z * (1.0 - z)
    dyn = dn * r
    dx = DGX + n * 3 * H
    tl.store(dx + cols, dr, mask=mask)
    tl.store(dx + H + cols, dz, mask=mask)
    tl.store(dx + 2 * H + cols, dn, mask=mask)
    tl.store(DYN + n * H + cols, dyn, mask=mask)
    # the recurrent layer norms' backward, group (r, z) and group n -> dgh
    rs, rn = tl.load(STAT + n * 2), tl.load(STAT + n * 2 + 1)
    tr, tz, tn = dr * g1r, dz * g1z, dyn * g1n
    s3 = (tl.sum(tr, axis=0) + tl.sum(tz, axis=0)) * inv_2h
    s4 = (tl.sum(tr * ar, axis=0) + tl.sum(tz * az, axis=0)) * inv_2h
    dgh = DGH + n * 3 * H
    ty = DGH.dtype.element_ty
    tl.store(dgh + cols, rounded(_ln_bwd(tr, ar, mask, rs, s3, s4), ty), mask=mask)
    tl.store(dgh + H + cols, rounded(_ln_bwd(tz, az, mask, rs, s3, s4), ty), mask=mask)
    s5 = tl.sum(tn, axis=0) * inv_h
    s6 = tl.sum(tn * an, axis=0) * inv_h
    tl.store(dgh + 2 * H + cols, rounded(_ln_bwd(tn, an, mask, rn, s5, s6), ty), mask=mask)


# ------------------------------------------------------------------------------ launch settings

# The widest hidden size the step kernels take: a program holds a row's 4H gate values in
# registers (16384 float32 values, as the norm kernels' widest row). Wider layers take the
# pure-torch path. Untuned: no GPU has measured these kernels yet.
MAX_HIDDEN = 4096


def _num_warps(block_h: int) -> int:
    # about 8-16 values of each of the row's vectors per thread
    return max(1, min(16, block_h // 128))


@contextlib.contextmanager
def _launching(device: torch.device):
    """Launch on ``device``'s GPU (triton launches on the current device), with autocast off: the
    loops choose the GEMMs' dtype themselves (``_Plan.cdt``), and out= GEMMs need it so."""
    with torch.autocast(device.type, enabled=False):
        if device.type == "cuda":
            with torch.cuda.device(device):
                yield
        else:
            yield


# --------------------------------------------------------------------------------------- plan


class _Plan:
    """The order of the steps of one direction over packed rows, and where each row's previous
    state lives: ``prev[n]``, a row of the packed outputs, or ``-1 - b`` for the initial state of
    batch row b (on the tensors' device; the kernels and the weight gradient read it)."""

    __slots__ = ("steps", "prev", "gather", "B", "N", "H", "cdt", "eps", "block", "warps")

    def __init__(self, batch_sizes: list[int], reverse: bool, device: torch.device, H: int,
                 cdt: torch.dtype, eps: float):
        bs = torch.tensor(batch_sizes, dtype=torch.int64)
        T = len(batch_sizes)
        offsets = torch.zeros(T + 1, dtype=torch.int64)
        torch.cumsum(bs, 0, out=offsets[1:])
        order = torch.arange(T - 1, -1, -1) if reverse else torch.arange(T)
        self.steps = list(zip(offsets[order].tolist(), bs[order].tolist(), strict=True))
        self.B, self.N, self.H, self.cdt, self.eps = batch_sizes[0], int(offsets[-1]), H, cdt, eps
        # row b of step t continues from row b of the step processed before it, if that had it
        prev_bs = torch.zeros(T, dtype=torch.int64)
        prev_off = torch.zeros(T, dtype=torch.int64)
        prev_bs[order[1:]] = bs[order[:-1]]
        prev_off[order[1:]] = offsets[order[:-1]]
        t_of = torch.repeat_interleave(torch.arange(T), bs)
        b_of = torch.arange(self.N) - offsets[t_of]
        prev = torch.where(b_of < prev_bs[t_of], prev_off[t_of] + b_of, -1 - b_of)
        self.prev = prev.to(device)
        self.gather = torch.where(prev >= 0, prev, self.N - 1 - prev).to(device)  # into cat([out, h0])
        self.block = triton.next_power_of_2(H)
        self.warps = _num_warps(self.block)

    def previous_states(self, out: Tensor, h0: Tensor) -> Tensor:
        """(N, H): the h each row started its step from."""
        return torch.cat([out, h0]).index_select(0, self.gather)


# ------------------------------------------------------------------------------------ checks


def supports(x: Tensor, w: RecurrentWeights) -> bool:
    """Whether the kernels take this direction: float32 data and weights (under autocast too),
    a hidden size up to :data:`MAX_HIDDEN`, on CUDA (or on the CPU under the interpreter)."""
    H = w.w_hh.shape[1] if w.w_hh.dim() == 2 else 0
    return (
        x.dtype == torch.float32
        and w.w_hh.dtype == torch.float32
        and 0 < H <= MAX_HIDDEN
        and (x.device.type == "cuda" or (INTERPRETED and x.device.type == "cpu"))
    )


def _state(t: Tensor) -> Tensor:
    """A fresh contiguous float32 copy of a (B, H) state or gradient, which the loops update."""
    return t.detach().clone(memory_format=torch.contiguous_format)


def _low(hs: Tensor, cdt: torch.dtype) -> Tensor | None:
    """The copy of h in the GEMM's dtype that the step kernel keeps, or None (float32: h itself)."""
    return hs.to(cdt) if cdt != torch.float32 else None


def _lstm_forward(gx, h0, c0, w_hh, g1, b1, g3, b3, plan: _Plan, save: bool):
    N, B, H, cdt = plan.N, plan.B, plan.H, plan.cdt
    dev = gx.device
    w_t = w_hh.detach().to(cdt).t()  # h -> h W_hh^T
    hs, cs = _state(h0), _state(c0)
    hlow = _low(hs, cdt)
    gemm_in = hlow if hlow is not None else hs
    out = torch.empty(N, H, dtype=torch.float32, device=dev)
    gh = torch.empty(B, 4 * H, dtype=cdt, device=dev)
    saved = (torch.empty(N, 4 * H, dtype=torch.float32, device=dev), torch.empty(N, H, dtype=torch.float32, device=dev),
             torch.empty(N, 3, dtype=torch.float32, device=dev)) if save else (None, None, None)
    params = [t.detach() for t in (g1, b1, g3, b3)]
    with _launching(dev):
        for off, bs in plan.steps:
            torch.mm(gemm_in[:bs], w_t, out=gh[:bs])
            _lstm_fwd_kernel[(bs,)](
                gh, gx.detach(), *params, hs, cs, hlow, out, *saved,
                off, H, 1.0 / (4 * H), 1.0 / H, plan.eps,
                SAVE=save, HAS_LOW=hlow is not None, BLOCK_H=plan.block, num_warps=plan.warps,
            )
    return out, hs, cs, saved


def _weight_grad(dgh: Tensor, out: Tensor, h0: Tensor, plan: _Plan) -> Tensor:
    """dW_hh = sum over rows of dgh[n]^T h_prev[n]: one GEMM over all rows, in the GEMMs' dtype."""
    prev = plan.previous_states(out, h0.detach()).to(plan.cdt)
    return torch.mm(dgh.t(), prev).to(torch.float32)


def _lstm_backward(saved, plan: _Plan, dout, dhn, dcn, need_w_hh: bool):
    gx, h0, c0, w_hh, g1, b1, g3, b3, out, ghat, c_all, stat = saved
    N, B, H, cdt = plan.N, plan.B, plan.H, plan.cdt
    dev = gx.device
    f32 = dict(dtype=torch.float32, device=dev)
    dout = dout.contiguous() if dout is not None else torch.zeros(N, H, **f32)
    dhs = _state(dhn) if dhn is not None else torch.zeros(B, H, **f32)
    dcs = _state(dcn) if dcn is not None else torch.zeros(B, H, **f32)
    dhp = torch.zeros(B, H, dtype=cdt, device=dev)  # dgh W_hh of the step processed last
    dgx = torch.empty(N, 4 * H, **f32)
    dgh = torch.empty(N, 4 * H, dtype=cdt, device=dev)
    d_cell = torch.empty(N, H, **f32)  # the gradient of the cell LN's output
    d_cell_x = torch.empty(N, H, **f32)  # ... times the normalized cell
    w = w_hh.detach().to(cdt)  # dgh -> dgh W_hh
    params = [t.detach() for t in (g1, b1, g3, b3)]
    with _launching(dev):
        for off, bs in reversed(plan.steps):
            _lstm_bwd_kernel[(bs,)](
                dout, dhs, dhp, dcs, gx, ghat, c_all, stat, plan.prev, c0.detach(), *params,
                dgx, dgh, d_cell, d_cell_x, off, H, 1.0 / (4 * H), 1.0 / H,
                BLOCK_H=plan.block, num_warps=plan.warps,
            )
            torch.mm(dgh[off : off + bs], w, out=dhp[:bs])
        dw = _weight_grad(dgh, out, h0, plan) if need_w_hh else None
    dh0 = dhs + dhp.to(torch.float32)
    return (dgx, dh0, dcs, dw, (dgx * ghat).sum(0), dgx.sum(0), d_cell_x.sum(0), d_cell.sum(0))


class _LSTMRecurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gx, h0, c0, w_hh, g1, b1, g3, b3, plan):
        out, hn, cn, saved = _lstm_forward(gx, h0, c0, w_hh, g1, b1, g3, b3, plan, True)
        ctx.save_for_backward(gx, h0, c0, w_hh, g1, b1, g3, b3, out, *saved)
        ctx.plan = plan
        return out, hn, cn

    @staticmethod
    @first_order_only
    def backward(ctx, dout, dhn, dcn):
        grads = _lstm_backward(ctx.saved_tensors, ctx.plan, dout, dhn, dcn, ctx.needs_input_grad[3])
        return (*grads, None)


# ----------------------------------------------------------------------------------------- GRU


def _gru_forward(gx, h0, w_hh, g1, b1, plan: _Plan, save: bool):
    N, B, H, cdt = plan.N, plan.B, plan.H, plan.cdt
    dev = gx.device
    w_t = w_hh.detach().to(cdt).t()
    hs = _state(h0)
    hlow = _low(hs, cdt)
    gemm_in = hlow if hlow is not None else hs
    out = torch.empty(N, H, dtype=torch.float32, device=dev)
    gh = torch.empty(B, 3 * H, dtype=cdt, device=dev)
    saved = (torch.empty(N, 3 * H, dtype=torch.float32, device=dev),
             torch.empty(N, 2, dtype=torch.float32, device=dev)) if save else (None, None)
    with _launching(dev):
        for off, bs in plan.steps:
            torch.mm(gemm_in[:bs], w_t, out=gh[:bs])
            _gru_fwd_kernel[(bs,)](
                gh, gx.detach(), g1.detach(), b1.detach(), hs, hlow, out, *saved,
                off, H, 1.0 / (2 * H), 1.0 / H, plan.eps,
                SAVE=save, HAS_LOW=hlow is not None, BLOCK_H=plan.block, num_warps=plan.warps,
            )
    return out, hs, saved


def _gru_backward(saved, plan: _Plan, dout, dhn, need_w_hh: bool):
    gx, h0, w_hh, g1, b1, out, ghat, stat = saved
    N, B, H, cdt = plan.N, plan.B, plan.H, plan.cdt
    dev = gx.device
    f32 = dict(dtype=torch.float32, device=dev)
    dout = dout.contiguous() if dout is not None else torch.zeros(N, H, **f32)
    dhs = _state(dhn) if dhn is not None else torch.zeros(B, H, **f32)
    dhp = torch.zeros(B, H, dtype=cdt, device=dev)
    dgx = torch.empty(N, 3 * H, **f32)
    dyn = torch.empty(N, H, **f32)  # the gradient of the recurrent candidate LN(W_hh h)_n + b_hn
    dgh = torch.empty(N, 3 * H, dtype=cdt, device=dev)
    w = w_hh.detach().to(cdt)
    with _launching(dev):
        for off, bs in reversed(plan.steps):
            _gru_bwd_kernel[(bs,)](
                dout, dhs, dhp, gx, ghat, stat, plan.prev, out, h0.detach(), g1.detach(), b1.detach(),
                dgx, dyn, dgh, off, H, 1.0 / (2 * H), 1.0 / H,
                BLOCK_H=plan.block, num_warps=plan.warps,
            )
            torch.mm(dgh[off : off + bs], w, out=dhp[:bs])
        dw = _weight_grad(dgh, out, h0, plan) if need_w_hh else None
    dh0 = dhs + dhp.to(torch.float32)
    d_pre = torch.cat([dgx[:, : 2 * H], dyn], 1)  # the gradient of the recurrent LN's output
    return dgx, dh0, dw, (d_pre * ghat).sum(0), d_pre.sum(0)


class _GRURecurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gx, h0, w_hh, g1, b1, plan):
        out, hn, saved = _gru_forward(gx, h0, w_hh, g1, b1, plan, True)
        ctx.save_for_backward(gx, h0, w_hh, g1, b1, out, *saved)
        ctx.plan = plan
        return out, hn

    @staticmethod
    @first_order_only
    def backward(ctx, dout, dhn):
        grads = _gru_backward(ctx.saved_tensors, ctx.plan, dout, dhn, ctx.needs_input_grad[2])
        return (*grads, None)


# ------------------------------------------------------------------------------- entry point


def _layer_norm(z: Tensor, w: Tensor, b: Tensor, eps: float) -> Tensor:
    return fused_norm(z, None, w, b, eps, True)[0]


def _input_part(x: Tensor, w: RecurrentWeights) -> Tensor:
    """Everything of the gates that does not depend on h, for all rows at once (N, G*H) in
    float32, as the pure-torch path computes it: LN(W_ih x) (the GRU's in two groups) plus the
    biases outside the recurrent LN (the GRU's n part of b_hh stays inside the reset gate's product)."""
    px = F.linear(x, w.w_ih)  # under autocast: in its dtype, as on the pure-torch path
    if w.mode == "LSTM":
        gx = _layer_norm(px, w.ln_ih_w, w.ln_ih_b, w.eps)
        if w.b_ih is not None:
            gx = gx + (w.b_ih + w.b_hh)
    else:
        s = 2 * w.w_hh.shape[1]
        gx = torch.cat([_layer_norm(px[:, :s], w.ln_ih_w[:s], w.ln_ih_b[:s], w.eps),
                        _layer_norm(px[:, s:], w.ln_ih_w[s:], w.ln_ih_b[s:], w.eps)], 1)
        if w.b_ih is not None:
            gx = gx + torch.cat([w.b_ih[:s] + w.b_hh[:s], w.b_ih[s:]])
    return gx.to(torch.float32).contiguous()


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The GEMMs' dtype: autocast's for the tensors' device where it is on, else float32."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        cdt = torch.get_autocast_dtype(kind)
        if cdt in (torch.bfloat16, torch.float16):
            return cdt
    return torch.float32


def recurrence(x: Tensor, batch_sizes: list[int], h0: Tensor, c0: Tensor | None,
               w: RecurrentWeights, reverse: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """One direction of one layer over the packed rows ``x`` (N, I), see ``lnorm.ops.rnn``.

    Returns the packed output (N, H) and the final h, c (B, H) (c is None for the GRU).
    """
    check_shapes(x, h0, c0, w, batch_sizes)
    plan = _Plan(batch_sizes, reverse, x.device, h0.shape[1], _compute_dtype(x), w.eps)
    gx = _input_part(x, w)
    # the kernels index h0, c0 and the LN parameters by row * H + column: a strided view (an
    # expanded learnable initial state, a transposed hx) would be read at the wrong places
    h0 = h0.contiguous()
    if w.mode == "LSTM":
        tensors = (gx, h0, c0.contiguous(), w.w_hh, *(t.contiguous() for t in (w.ln_hh_w, w.ln_hh_b, w.ln_c_w, w.ln_c_b)))
    else:
        b1 = w.ln_hh_b  # the n part of b_hh joins the recurrent LN's bias, inside the reset gate's product
        if w.b_hh is not None:
            H = h0.shape[1]
            b1 = b1 + torch.cat([torch.zeros_like(w.b_hh[: 2 * H]), w.b_hh[2 * H :]])
        tensors = (gx, h0, w.w_hh, w.ln_hh_w.contiguous(), b1.contiguous())
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if w.mode == "LSTM":
        if needs_grad:
            return _LSTMRecurrence.apply(*tensors, plan)
        out, hn, cn, _ = _lstm_forward(*tensors, plan, False)
        return out, hn, cn
    if needs_grad:
        out, hn = _GRURecurrence.apply(*tensors, plan)
    else:
        out, hn, _ = _gru_forward(*tensors, plan, False)
    return out, hn, None
