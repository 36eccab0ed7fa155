"""The step kernels that run without gradients to come (``lstm_fwd_infer_step``,
``gru_fwd_infer_step``: nothing saved, fewer passes) against the training kernels they stand in
for, step by step, in both builds (threaded and serial) and both dtypes: a partial batch (rows
past ``bs`` untouched), rows placed at an offset of the packed buffers, and a second step that
reads the state the first one wrote.

The module-level tests compare whole layers under ``no_grad`` with the torch path; this one
pins a disagreement to the kernel."""

import numpy as np
import pytest

from lnorm.ops.backend import numba_available

pytestmark = pytest.mark.skipif(not numba_available(), reason="numba is not importable")

B, H, BS, OFF = 5, 24, 3, 7  # batch, hidden, active rows, packed row of the step's first row


def _arrays(rng, dtype, *shapes):
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


def _builds():
    from lnorm.ops import _rnn_kernels as K

    return {"threaded": K.builds(), "serial": K._SERIAL}


def _layer_norm_groups(px, g0, eps, H):
    """LN of each row of px in the GRU's two groups [r, z | n], weight g0, no bias (float64)."""
    px = px.astype(np.float64)
    out = np.empty_like(px)
    for lo, hi in ((0, 2 * H), (2 * H, 3 * H)):
        part = px[:, lo:hi]
        mu, var = part.mean(1, keepdims=True), part.var(1, keepdims=True)
        out[:, lo:hi] = (part - mu) / np.sqrt(var + eps) * g0[lo:hi]
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("build", ["threaded", "serial"])
def test_gru_infer_step_matches_training_step(build, dtype):
    # the infer kernel normalizes W_ih x itself (the training route gets LN(W_ih x) from the
    # caller) and takes the input LN's bias folded into b1 (r, z) and b_in (n)
    kern = _builds()[build]
    rng = np.random.default_rng(0)
    G, N, eps = 3 * H, OFF + 2 * B, 1e-5
    px, g0, ln_b, g1, b1, b_in, h0 = _arrays(rng, dtype, (N, G), G, G, G, G, H, (B, H))
    px = px * 4 + 2  # a mean and a scale for the layer norm to remove
    gx = _layer_norm_groups(px, g0, eps, H).astype(dtype)
    gx_rz, gx_n = np.ascontiguousarray(gx[:, : 2 * H]), np.ascontiguousarray(gx[:, 2 * H :])
    b1_t, b_in_t = b1.copy(), b_in.copy()
    b1_t[: 2 * H] += ln_b[: 2 * H]
    b_in_t += ln_b[2 * H :]
    k = np.array([eps, 1.0, 1.0 / (2 * H), 1.0 / H], dtype=dtype)
    hs_t, hs_i = h0.copy(), h0.copy()
    out_t, out_i = np.full((N, H), 9.0, dtype), np.full((N, H), 9.0, dtype)
    ghat, act, stat = np.empty((N, G), dtype), np.empty((N, 4 * H), dtype), np.empty((N, 2), dtype)
    lo = OFF - 2  # the infer kernel reads px from a block of rows that starts at lo
    for off in (OFF, OFF + BS):  # the second step reads the h the first one wrote
        gh = rng.standard_normal((BS, G)).astype(dtype) * 3 + 1
        kern.gru_fwd_step(off, off, gh, gx_rz, gx_n, g1, b1_t, b_in_t, k, hs_t, out_t, ghat, act, stat)
        kern.gru_fwd_infer_step(off, off - lo, gh, px[lo:], g0, g1, b1_t, b_in_t, k, hs_i, out_i)
    tol = dict(rtol=1e-5, atol=2e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(out_i, out_t, **tol)
    np.testing.assert_allclose(hs_i, hs_t, **tol)
    np.testing.assert_array_equal(hs_i[BS:], h0[BS:])  # rows past bs untouched
    assert (out_i[:OFF] == 9).all() and (out_i[OFF + 2 * BS:] == 9).all()
    assert not np.allclose(hs_i[:BS], h0[:BS])


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("build", ["threaded", "serial"])
def test_lstm_infer_step_matches_training_step(build, dtype):
    kern = _builds()[build]
    rng = np.random.default_rng(1)
    G, N = 4 * H, OFF + 2 * B
    px, g0, g1, b1, g3, b3, h0, c0 = _arrays(rng, dtype, (N, G), G, G, G, H, H, (B, H), (B, H))
    k = np.array([1e-5, 1.0, 1.0 / G, 1.0 / H], dtype=dtype)
    hs_t, cs_t, hs_i, cs_i = h0.copy(), c0.copy(), h0.copy(), c0.copy()
    out_t, out_i = np.full((N, H), 9.0, dtype), np.full((N, H), 9.0, dtype)
    ghat, c_s, stat = np.empty((N, G), dtype), np.empty((N, H), dtype), np.empty((N, 5), dtype)
    lo = OFF - 2  # the infer kernel reads px from a block of rows that starts at lo
    for off in (OFF, OFF + BS):
        gh = rng.standard_normal((BS, G)).astype(dtype) * 3 + 1
        kern.lstm_fwd_step(off, off, gh, px, g0, g1, b1, g3, b3, k, hs_t, cs_t, out_t, ghat, c_s, stat)
        kern.lstm_fwd_infer_step(off, off - lo, gh, px[lo:], g0, g1, b1, g3, b3, k, hs_i, cs_i, out_i)
    tol = dict(rtol=1e-5, atol=2e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-13)
    for got, want in ((out_i, out_t), (hs_i, hs_t), (cs_i, cs_t)):
        np.testing.assert_allclose(got, want, **tol)
    np.testing.assert_array_equal(hs_i[BS:], h0[BS:])
    np.testing.assert_array_equal(cs_i[BS:], c0[BS:])
    assert (out_i[:OFF] == 9).all() and (out_i[OFF + 2 * BS:] == 9).all()
