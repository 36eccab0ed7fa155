"""The native time loop (``lstm_infer_loop``: oneDNN's brgemm microkernel called from inside the
Numba kernel, ``lnorm.ops.brgemm``) against the loop it replaces, run from Python with the
step kernel ``lstm_fwd_infer_step`` and float64 products: every step of a packed schedule
(batch sizes that shrink, steps in reverse), column tiles that do not divide 4H, both builds;
then whole layers with the native loop on and off, and the conditions that turn it off."""

import os

import numpy as np
import pytest
import torch

from lnorm.ops.backend import numba_available

pytestmark = pytest.mark.skipif(not numba_available(), reason="numba is not importable")


def _native():
    from lnorm.ops import brgemm

    if not brgemm.available():
        pytest.skip(f"native loop unavailable: {brgemm.status()}")


def _builds():
    from lnorm.ops import _rnn_kernels as K

    return {"threaded": K.builds(), "serial": K._SERIAL}


def _count_calls(monkeypatch, *names):
    """A list that records each call of the kernels ``names`` that ``_rnn_kernels.builds()`` hands out."""
    from lnorm.ops import _rnn_kernels as K

    calls = []
    real = K.builds

    def counted():
        ns = real()
        for name in names:
            fn = getattr(ns, name)
            setattr(ns, name, lambda *a, fn=fn, name=name: calls.append(name) or fn(*a))
        return ns

    monkeypatch.setattr(K, "builds", counted)
    return calls


def _python_loop(kern, steps, x, w_ih, w_hh, params, k, h0, c0, N):
    """The reference: per step gh = h W_hh^T and px = x W_ih^T in float64 (rounded to float32),
    then the Python route's step kernel."""
    hs, cs = h0.copy(), c0.copy()
    out = np.full((N, h0.shape[1]), 7.0, np.float32)
    for off, bs in steps:
        gh = (hs[:bs].astype(np.float64) @ w_hh.T.astype(np.float64)).astype(np.float32)
        px = (x[off : off + bs].astype(np.float64) @ w_ih.T.astype(np.float64)).astype(np.float32)
        kern.lstm_fwd_infer_step(off, 0, gh, px, *params, k, hs, cs, out)  # px holds the step's rows only
    return out, hs, cs


@pytest.mark.parametrize("build", ["threaded", "serial"])
@pytest.mark.parametrize("tile", [64, 7])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_native_loop_matches_python_loop(build, tile, reverse):
    _native()
    from lnorm.ops import rnn_fused as RF

    kern = _builds()[build]
    rng = np.random.default_rng(3)
    B, H, I = 5, 20, 9  # 4H = 80: tiles of 64 leave a tail of 16; of 7, a tail of 3
    G = 4 * H
    sched = RF._Schedule([5, 5, 4, 2, 2, 1], reverse)
    N = sched.N
    f = np.float32
    x = rng.standard_normal((N, I)).astype(f) * 2 + 1
    w_ih = (rng.standard_normal((G, I)) / I**0.5).astype(f)
    w_hh = (rng.standard_normal((G, H)) / H**0.5).astype(f)
    params = [(1 + 0.2 * rng.standard_normal(n)).astype(f) if i in (0, 1, 3) else (0.2 * rng.standard_normal(n)).astype(f)
              for i, n in enumerate((G, G, G, H, H))]
    k = RF._consts(np.float32, 1e-5, G, H)
    h0, c0 = rng.standard_normal((B, H)).astype(f), rng.standard_normal((B, H)).astype(f)
    want = _python_loop(kern, sched.steps, x, w_ih, w_hh, params, k, h0, c0, N)
    steps = np.asarray(sched.steps, dtype=np.int64)
    hs, cs, out = h0.copy(), c0.copy(), np.full((N, H), 7.0, f)
    gh, px = np.empty((B, G), f), np.empty((B, G), f)
    panels = [RF._panels_of_rows(torch.from_numpy(w), tile) for w in (w_ih, w_hh)]
    kern.lstm_infer_loop(steps[:, 0].copy(), steps[:, 1].copy(), x, *panels, *params, k, hs, cs, out, gh, px)
    for got, exp in zip((out, hs, cs), want, strict=True):
        np.testing.assert_allclose(got, exp, rtol=1e-4, atol=1e-5)
    assert not np.allclose(out, 7.0)


@pytest.mark.parametrize("build", ["threaded", "serial"])
def test_native_loop_checks_the_sizes_it_trusts(build):
    _native()
    from lnorm.ops import rnn_fused as RF

    kern = _builds()[build]
    B, H, I, N = 2, 4, 3, 6
    G = 4 * H
    f = np.float32
    z = lambda *s: np.zeros(s, f)  # noqa: E731
    k = RF._consts(np.float32, 1e-5, G, H)

    def call(offs, sizes, hs=None, x=None, whh_p=None):
        kern.lstm_infer_loop(np.array(offs, np.int64), np.array(sizes, np.int64), z(N, I) if x is None else x,
                             z(1, I, 64), z(1, H, 64) if whh_p is None else whh_p, z(G), z(G), z(G), z(H), z(H), k,
                             z(B, H) if hs is None else hs, z(B, H), z(N, H), z(B, G), z(B, G))

    call([0, 2, 4], [2, 2, 2])  # consistent: runs
    with pytest.raises(ValueError, match="outside the buffers"):
        call([0, 2, 5], [2, 2, 2])  # the last step's rows run past N
    with pytest.raises(ValueError, match="outside the buffers"):
        call([0], [3])  # more rows than the batch
    with pytest.raises(ValueError, match="inconsistent shapes"):
        call([0], [2], whh_p=z(1, H + 1, 64))
    with pytest.raises(ValueError, match="inconsistent shapes"):
        call([0], [2], whh_p=z(1, H, 8))  # panels too narrow for 4H = 16 columns
    with pytest.raises(ValueError, match="inconsistent shapes"):
        call([0], [2], whh_p=z(3, H, 8))  # a panel past the last column
    with pytest.raises(ValueError, match="inconsistent shapes"):
        call([0], [2], x=z(N, I + 1))


def _layer_outputs(m, x, native: bool):
    old = os.environ.get("LNORM_NATIVE_LOOP")
    os.environ["LNORM_NATIVE_LOOP"] = "1" if native else "0"
    try:
        with torch.no_grad():
            out, state = m(x)
    finally:
        if old is None:
            del os.environ["LNORM_NATIVE_LOOP"]
        else:
            os.environ["LNORM_NATIVE_LOOP"] = old
    out = torch.nn.utils.rnn.pad_packed_sequence(out)[0] if isinstance(out, torch.nn.utils.rnn.PackedSequence) else out
    return [out, *state]


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_layers_native_loop_on_and_off_agree(packed, monkeypatch):
    _native()
    from lnorm.nn import LayerNormLSTM
    from lnorm.ops import rnn_fused as RF

    calls = []
    real = RF._lstm_native_infer
    monkeypatch.setattr(RF, "_lstm_native_infer", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    m = LayerNormLSTM(11, 24, num_layers=2, bidirectional=True).eval()
    x = torch.randn(7, 5, 11) * 2
    if packed:
        x = torch.nn.utils.rnn.pack_padded_sequence(x, [7, 6, 6, 3, 1], enforce_sorted=False)
    on = _layer_outputs(m, x, True)
    assert len(calls) == 4  # two layers, two directions
    off = _layer_outputs(m, x, False)
    assert len(calls) == 4
    for a, b in zip(on, off, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_native_loop_off_without_onednn_or_when_a_product_is_forced(monkeypatch):
    _native()
    from lnorm.nn import LayerNormLSTM
    from lnorm.ops import rnn_fused as RF
    from lnorm.ops.step_gemm import use_step_gemm

    calls = []
    real = RF._lstm_native_infer
    monkeypatch.setattr(RF, "_lstm_native_infer", lambda *a: calls.append(1) or real(*a))
    m = LayerNormLSTM(6, 8)
    x = torch.randn(4, 3, 6)
    with torch.no_grad():
        m(x)
        assert len(calls) == 1
        with torch.backends.mkldnn.flags(enabled=False):
            m(x)
        with use_step_gemm("mm"):
            m(x)
        m.double()(x.double())  # float64: the Python loop
    assert len(calls) == 1


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_training_native_loops_on_and_off_agree(packed, monkeypatch):
    # forward (lstm_train_loop) and backward (lstm_bwd_loop, one call per run of steps: runs of
    # 12 rows force several runs) against the Python loops, outputs and every gradient
    _native()
    from lnorm.nn import LayerNormLSTM
    from lnorm.ops import rnn_fused as RF

    monkeypatch.setattr(RF, "_CHUNK_ROWS", 12)  # runs of two or three steps
    calls = _count_calls(monkeypatch, "lstm_train_loop", "lstm_bwd_loop")
    torch.manual_seed(0)
    m = LayerNormLSTM(11, 24, num_layers=2, bidirectional=True)
    x0 = torch.randn(7, 5, 11) * 2
    h0 = torch.randn(4, 5, 24)

    def run(native):
        monkeypatch.setenv("LNORM_NATIVE_LOOP", "1" if native else "0")
        m.zero_grad()
        x, h = x0.clone().requires_grad_(), h0.clone().requires_grad_()
        inp = torch.nn.utils.rnn.pack_padded_sequence(x, [7, 6, 6, 3, 1]) if packed else x
        out, (hn, cn) = m(inp, (h, torch.zeros_like(h)))
        if packed:
            out = torch.nn.utils.rnn.pad_packed_sequence(out)[0]
        (out.square().sum() + hn.sum() + 0.5 * cn.sum()).backward()
        return [out, hn, cn, x.grad, h.grad] + [p.grad.clone() for p in m.parameters()]

    on = run(True)
    assert calls.count("lstm_train_loop") == 4 and calls.count("lstm_bwd_loop") >= 8
    n = len(calls)
    off = run(False)
    assert len(calls) == n
    for a, b in zip(on, off, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("build", ["threaded", "serial"])
def test_training_native_loops_check_the_sizes_they_trust(build):
    _native()
    from lnorm.ops import rnn_fused as RF

    kern = _builds()[build]
    B, H, N = 2, 4, 6
    G = 4 * H
    f = np.float32
    z = lambda *s: np.zeros(s, f)  # noqa: E731
    k = RF._consts(np.float32, 1e-5, G, H)
    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731

    def fwd(offs, sizes, px_rows=N, panels=(1, H, 64)):
        kern.lstm_train_loop(i64(*offs), i64(*sizes), z(px_rows, G), z(*panels), z(G), z(G), z(G), z(H), z(H), k,
                             z(B, H), z(B, H), z(N, H), z(N, G), z(N, H), z(N, 5), z(B, G))

    fwd([0, 2, 4], [2, 2, 2])
    with pytest.raises(ValueError, match="outside the buffers"):
        fwd([0, 2, 5], [2, 2, 2])
    with pytest.raises(ValueError, match="inconsistent shapes"):
        fwd([0], [2], px_rows=N + 1)
    with pytest.raises(ValueError, match="inconsistent shapes"):
        fwd([0], [2], panels=(1, H, 8))

    def bwd(offs, sizes, doff=0, run_rows=N, prev=None, panels=(1, G, 64)):
        kern.lstm_bwd_loop(i64(*offs), i64(*sizes), doff, z(N, H), z(B, H), z(B, H), z(N, G), z(N, H), z(N, 5),
                           i64(-1, -2, 0, 1, 2, 3) if prev is None else prev, z(B, H), z(N, G), z(G), z(G), z(G),
                           z(H), z(H), k, z(run_rows, G), z(run_rows, G), np.zeros((2, 3, G)), np.zeros((2, 2, H)),
                           z(*panels))

    bwd([4, 2, 0], [2, 2, 2])
    with pytest.raises(ValueError, match="outside the buffers"):
        bwd([4, 2], [2, 2], doff=2, run_rows=2)  # row 2 - 2 + 2 fits, row 4 - 2 + 2 does not
    with pytest.raises(ValueError, match="inconsistent shapes"):
        bwd([0], [2], panels=(1, G + 1, 64))
    with pytest.raises(ValueError, match="cprev_idx"):
        bwd([0], [2], prev=i64(-1, -3, 0, 1, 2, 3))  # -1 - (-3) = 2: no initial state row 2


def test_native_loop_status_says_why(monkeypatch):
    from lnorm.ops import brgemm

    monkeypatch.setenv("LNORM_NATIVE_LOOP", "0")
    assert not brgemm.available() and brgemm.status() == "off (LNORM_NATIVE_LOOP=0)"
    monkeypatch.delenv("LNORM_NATIVE_LOOP")
    with torch.backends.mkldnn.flags(enabled=False):
        assert not brgemm.available() and "mkldnn" in brgemm.status()
    assert brgemm.status().startswith("on: " if brgemm.available() else "off: ")


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_gru_native_inference_loop_on_and_off_agree(packed, monkeypatch):
    # gru_infer_loop against the Python loop (gru_fwd_infer_step): 3H = 72 columns, tiles of 32
    # with a tail of 8, packed and bidirectional, two layers
    _native()
    from lnorm.nn import LayerNormGRU

    calls = _count_calls(monkeypatch, "gru_infer_loop")
    torch.manual_seed(0)
    m = LayerNormGRU(11, 24, num_layers=2, bidirectional=True).eval()
    x = torch.randn(7, 5, 11) * 2
    if packed:
        x = torch.nn.utils.rnn.pack_padded_sequence(x, [7, 6, 6, 3, 1], enforce_sorted=False)
    on = _layer_outputs(m, x, True)
    assert len(calls) == 4
    off = _layer_outputs(m, x, False)
    assert len(calls) == 4
    for a, b in zip(on, off, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_gru_native_loop_checks_the_sizes_it_trusts():
    _native()
    from lnorm.ops import rnn_fused as RF

    kern = _builds()["threaded"]
    B, H, I, N = 2, 4, 3, 6
    G = 3 * H
    z = lambda *s: np.zeros(s, np.float32)  # noqa: E731
    k = RF._consts(np.float32, 1e-5, 2 * H, H)

    def call(offs, sizes, panels=(1, H, 16)):
        kern.gru_infer_loop(np.array(offs, np.int64), np.array(sizes, np.int64), z(N, I), z(panels[0], I, panels[2]),
                            z(*panels), z(G), z(G), z(G), z(H), k, z(B, H), z(N, H), z(B, G), z(B, G))

    call([0, 2, 4], [2, 2, 2])
    with pytest.raises(ValueError, match="outside the buffers"):
        call([0, 2, 5], [2, 2, 2])
    with pytest.raises(ValueError, match="inconsistent shapes"):
        call([0], [2], panels=(1, H, 8))  # 8 columns of 12


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_gru_training_native_loops_on_and_off_agree(packed, monkeypatch):
    # gru_train_loop and gru_bwd_loop (brgemm accumulating dgh W_hh onto the kernel's z dh; runs of
    # 12 rows: several steps per run) against the Python loops, outputs and every gradient
    _native()
    from lnorm.nn import LayerNormGRU
    from lnorm.ops import rnn_fused as RF

    monkeypatch.setattr(RF, "_CHUNK_ROWS", 12)
    calls = _count_calls(monkeypatch, "gru_train_loop", "gru_bwd_loop")
    torch.manual_seed(0)
    m = LayerNormGRU(11, 24, num_layers=2, bidirectional=True)
    x0 = torch.randn(7, 5, 11) * 2
    h0 = torch.randn(4, 5, 24)

    def run(native):
        monkeypatch.setenv("LNORM_NATIVE_LOOP", "1" if native else "0")
        m.zero_grad()
        x, h = x0.clone().requires_grad_(), h0.clone().requires_grad_()
        inp = torch.nn.utils.rnn.pack_padded_sequence(x, [7, 6, 6, 3, 1]) if packed else x
        out, hn = m(inp, h)
        if packed:
            out = torch.nn.utils.rnn.pad_packed_sequence(out)[0]
        (out.square().sum() + hn.sum()).backward()
        return [out, hn, x.grad, h.grad] + [p.grad.clone() for p in m.parameters()]

    on = run(True)
    assert calls.count("gru_train_loop") == 4 and calls.count("gru_bwd_loop") >= 8
    n = len(calls)
    off = run(False)
    assert len(calls) == n
    for a, b in zip(on, off, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_gru_training_native_loops_check_the_sizes_they_trust():
    _native()
    from lnorm.ops import rnn_fused as RF

    kern = _builds()["threaded"]
    B, H, N = 2, 4, 6
    G = 3 * H
    z = lambda *s: np.zeros(s, np.float32)  # noqa: E731
    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
    k = RF._consts(np.float32, 1e-5, 2 * H, H)

    def fwd(offs, sizes, panels=(1, H, 16)):
        kern.gru_train_loop(i64(*offs), i64(*sizes), z(N, 2 * H), z(N, H), z(*panels), z(G), z(G), z(H), k,
                            z(B, H), z(N, H), z(N, G), z(N, 4 * H), z(N, 2), z(B, G))

    fwd([0, 2, 4], [2, 2, 2])
    with pytest.raises(ValueError, match="outside the buffers"):
        fwd([0, 2, 5], [2, 2, 2])
    with pytest.raises(ValueError, match="inconsistent shapes"):
        fwd([0], [2], panels=(1, H, 8))

    def bwd(offs, sizes, doff=0, run_rows=N, prev=None, panels=(1, G, 16)):
        kern.gru_bwd_loop(i64(*offs), i64(*sizes), doff, z(N, H), z(B, H), z(N, G), z(N, 4 * H), z(N, 2),
                          i64(-1, -2, 0, 1, 2, 3) if prev is None else prev, z(N, H), z(B, H), z(G), k,
                          z(N, 2 * H), z(N, H), z(run_rows, G), np.zeros((2, 3, G)), z(*panels))

    bwd([4, 2, 0], [2, 2, 2])
    with pytest.raises(ValueError, match="outside the buffers"):
        bwd([4, 2], [2, 2], doff=2, run_rows=2)
    with pytest.raises(ValueError, match="inconsistent shapes"):
        bwd([0], [2], panels=(1, G + 1, 16))
    with pytest.raises(ValueError, match="hprev_idx"):
        bwd([0], [2], prev=i64(-1, -3, 0, 1, 2, 3))


def test_native_loops_refuse_strided_arrays():
    # brgemm reads through raw addresses with the leading dimensions the shapes imply: a strided
    # view of the right shape would be read wrongly, so the kernels check C order (found by review)
    _native()
    from lnorm.ops import rnn_fused as RF

    kern = _builds()["threaded"]
    B, H, I, N = 2, 4, 3, 6
    G = 4 * H
    z = lambda *s: np.zeros(s, np.float32)  # noqa: E731
    k = RF._consts(np.float32, 1e-5, G, H)
    strided_x = np.zeros((N, 2 * I), np.float32)[:, ::2]
    assert strided_x.shape == (N, I) and not strided_x.flags.c_contiguous
    with pytest.raises(ValueError, match="C-contiguous"):
        kern.lstm_infer_loop(np.array([0], np.int64), np.array([2], np.int64), strided_x, z(1, I, 64), z(1, H, 64),
                             z(G), z(G), z(G), z(H), z(H), k, z(B, H), z(B, H), z(N, H), z(B, G), z(B, G))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("where", ["input", "weight_hh", "weight_ih"])
def test_native_inference_propagates_nan_as_the_torch_path(cell, where, monkeypatch):
    # the inference loops (no gradients) compute W_ih x inside the loop: a NaN in the input or in
    # either weight reaches the same outputs as on lnorm's pure-torch path, never a finite number
    _native()
    import lnorm
    from lnorm.nn import LayerNormGRU, LayerNormLSTM

    calls = _count_calls(monkeypatch, f"{cell}_infer_loop")
    torch.manual_seed(0)
    m = (LayerNormLSTM if cell == "lstm" else LayerNormGRU)(6, 10)
    x = torch.randn(5, 3, 6)
    with torch.no_grad():
        if where == "input":
            x[2, 1, 0] = float("nan")
        else:
            getattr(m, f"{where}_l0")[3, 2] = float("nan")
        with lnorm.use_backend("numba"):
            native = m(x)[0]
        with lnorm.use_backend("torch"):
            ref = m(x)[0]
    assert len(calls) == 1  # the native loop ran
    assert torch.equal(torch.isfinite(native), torch.isfinite(ref)) and not torch.isfinite(ref).all()
    fin = torch.isfinite(ref)
    torch.testing.assert_close(native[fin], ref[fin], rtol=1e-4, atol=1e-5)
