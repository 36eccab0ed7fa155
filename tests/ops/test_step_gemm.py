"""The recurrence's per-step GEMM (``lnorm.ops.step_gemm``): every implementation against a float64
product, the per-process choice (forced, cached, never a candidate that disagrees), and the
recurrent layers run with each implementation forced, against float64 and against each other."""

from __future__ import annotations

import platform
import sys

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import lnorm
from lnorm.nn import LayerNormGRU, LayerNormLSTM
from lnorm.ops.backend import numba_available
from tolerances import assert_close, assert_three_way

pytestmark = pytest.mark.skipif(not numba_available(), reason="the fused path needs numba")

D64 = torch.float64
F32_IMPLS = ("mkl", "onednn", "mm")


def _impls_here():
    from lnorm.ops import step_gemm

    return step_gemm.available(torch.float32)


def _skip_unless(impl):
    if impl not in _impls_here():
        pytest.skip(f"{impl} is not available in this torch build")


# ------------------------------------------------------------------------------ the products


def test_the_x86_linux_wheel_has_every_implementation():
    from lnorm.ops import step_gemm

    if sys.platform == "linux" and platform.machine() == "x86_64" and torch.backends.mkl.is_available():
        assert step_gemm.available(torch.float32) == F32_IMPLS
    assert step_gemm.available(D64) == ("mm",)


@pytest.mark.parametrize("layout", ["row-major", "transposed"])
@pytest.mark.parametrize("impl", F32_IMPLS)
def test_each_implementation_equals_a_float64_product(impl, layout):
    # h @ w.T from either layout of w, for the packed row count and fewer rows (a packed
    # sequence's later steps), written, accumulated into a slice, and returned (alone and added
    # to a buffer: the backward's next h gradient)
    from lnorm.ops.step_gemm import StepGemm

    _skip_unless(impl)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 24, generator=g)
    if layout == "transposed":
        w = w.t().contiguous().t()
    gemm = StepGemm(w, 5, impl=impl)
    assert gemm.impl == impl
    tol = {"atol": 1e-5, "rtol": 1e-5}
    for rows in (5, 3):
        h = torch.randn(rows, 24, generator=g)
        exact = (h.double() @ w.double().t()).float()
        assert_close(gemm(h), exact, name=f"{impl}, {rows} rows", **tol)
        assert_close(gemm.prod(h, torch.empty(rows, 40)), exact, name=f"{impl}, {rows} rows, prod", **tol)
        buf = torch.randn(rows, 40, generator=g)
        before = buf.clone()
        assert_close(gemm.prod(h, buf, accumulate=True), before + exact, name=f"{impl}, {rows} rows, prod added",
                     **tol)
        out = torch.randn(rows + 2, 40, generator=g)
        expected = out.clone()
        expected[1 : rows + 1] += exact
        gemm.into(h, out[1 : rows + 1], accumulate=True)
        assert_close(out, expected, name=f"{impl}, {rows} rows, accumulated into a slice", **tol)
        gemm.into(h, out[1 : rows + 1])
        expected[1 : rows + 1] = exact
        assert_close(out, expected, name=f"{impl}, {rows} rows, written into a slice", **tol)


@pytest.mark.parametrize("impl", F32_IMPLS)
def test_nan_in_h_reaches_the_product(impl):
    from lnorm.ops.step_gemm import StepGemm

    _skip_unless(impl)
    w = torch.randn(16, 8)
    h = torch.randn(4, 8)
    h[2, 3] = float("nan")
    for got in (StepGemm(w, 4, impl=impl)(h), StepGemm(w, 4, impl=impl).into(h, torch.zeros(4, 16), accumulate=True)):
        assert torch.isnan(got[2]).all() and torch.isfinite(got[[0, 1, 3]]).all()


def test_mkl_path_checks_the_buffers_it_trusts():
    from lnorm.ops.step_gemm import StepGemm

    _skip_unless("mkl")
    gemm = StepGemm(torch.randn(16, 8), 4, impl="mkl")
    for h, out in ((torch.randn(4, 8), torch.empty(4, 15)), (torch.randn(4, 7), torch.empty(4, 16)),
                   (torch.randn(4, 8), torch.empty(16, 4).t()), (torch.randn(4, 8).double(), torch.empty(4, 16))):
        with pytest.raises(ValueError, match="StepGemm"):
            gemm.into(h, out)


def test_an_unknown_or_unavailable_impl_is_refused():
    from lnorm.ops.step_gemm import StepGemm

    with pytest.raises(ValueError, match="impl must be one of"):
        StepGemm(torch.randn(4, 4), 2, impl="blas")
    with pytest.raises(ValueError, match="impl must be one of"):
        StepGemm(torch.randn(4, 4, dtype=D64), 2, impl="onednn")


# ---------------------------------------------------------------------------------- the choice


@pytest.fixture
def fresh_choices(monkeypatch):
    from lnorm.ops import step_gemm

    monkeypatch.setattr(step_gemm, "_chosen", {})
    monkeypatch.setattr(step_gemm, "_timings", {})
    monkeypatch.delenv(step_gemm.ENV, raising=False)
    return step_gemm


def test_the_choice_is_measured_once_per_shape_class(fresh_choices, monkeypatch):
    sg = fresh_choices
    calls = []
    real = sg._measure

    def counting(*args, **kw):
        calls.append(args[:4])
        return real(*args, **kw)

    monkeypatch.setattr(sg, "_measure", counting)
    first = sg.choose(6, 20, 12, torch.float32)
    assert first in _impls_here()
    assert sg.choose(6, 20, 12, torch.float32) == first and len(calls) == 1
    sg.choose(6, 20, 12, torch.float32, accumulate=True)  # another class
    sg.choose(7, 20, 12, torch.float32)
    assert len(calls) == 3
    assert sg.choose(6, 20, 12, D64) == "mm" and len(calls) == 3  # float64: nothing to choose
    listed = sg.step_gemm_choices()
    assert len(listed) == 3 and listed[0]["rows"] == 6 and listed[0]["impl"] == first
    assert set(listed[0]["ms_per_product"]) == set(_impls_here())


@pytest.mark.parametrize("fault", ["wrong", "raises"])
def test_a_candidate_that_disagrees_with_float64_is_never_chosen(fresh_choices, monkeypatch, fault):
    sg = fresh_choices
    if len(_impls_here()) < 2:
        pytest.skip("one implementation only")
    wrong = _impls_here()[0]
    real_into = sg.StepGemm.into

    def off_by_a_little(self, h, out, accumulate=False):
        if self.impl == wrong and fault == "raises":
            raise RuntimeError("this CPU lacks the instruction")
        r = real_into(self, h, out, accumulate)
        return r.add_(1e-2) if self.impl == wrong else r

    monkeypatch.setattr(sg.StepGemm, "into", off_by_a_little)
    times = sg._measure(6, 20, 12, False, _impls_here())
    assert wrong not in times and set(times) == set(_impls_here()) - {wrong}
    assert sg.choose(6, 20, 12, torch.float32) != wrong


@pytest.mark.parametrize("how", ["env", "context"])
def test_a_forced_implementation_is_used_where_it_can_run(fresh_choices, monkeypatch, how):
    sg = fresh_choices
    for impl in _impls_here():
        if how == "env":
            monkeypatch.setenv(sg.ENV, impl)
            got = sg.choose(6, 20, 12, torch.float32), sg.StepGemm(torch.randn(20, 12), 6).impl
            got64 = sg.choose(6, 20, 12, D64)
        else:
            with sg.use_step_gemm(impl):
                got = sg.choose(6, 20, 12, torch.float32), sg.StepGemm(torch.randn(20, 12), 6).impl
                got64 = sg.choose(6, 20, 12, D64)
        assert got == (impl, impl)
        assert got64 == "mm"
    assert not sg._chosen  # forcing measures nothing


def test_a_bad_forced_name_is_a_clear_error(fresh_choices, monkeypatch):
    sg = fresh_choices
    monkeypatch.setenv(sg.ENV, "cublas")
    with pytest.raises(ValueError, match="LNORM_STEP_GEMM must be one of auto, mkl, onednn, mm; got 'cublas'"):
        sg.choose(6, 20, 12, torch.float32)
    with pytest.raises(ValueError, match="use_step_gemm: name must be"), sg.use_step_gemm("fast"):
        pass


# --------------------------------------------------------------------- the layers, per product


def _layer(kind, I, H, dtype=torch.float32):
    torch.manual_seed(0)
    m = (LayerNormLSTM if kind == "lstm" else LayerNormGRU)(I, H, dtype=dtype)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith("ln_"):
                p.add_(0.3 * torch.randn_like(p))
    return m


def _outputs_and_grads(m, x, lengths=None):
    """Output (packed data if ``lengths``) and the gradients of x and every parameter."""
    m.zero_grad()
    x = x.detach().clone().requires_grad_()
    inp = pack_padded_sequence(x, lengths, enforce_sorted=False) if lengths is not None else x
    out = m(inp)[0]
    out = out.data if lengths is not None else out
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    (out * w).sum().backward()
    return [out.detach(), x.grad] + [p.grad.clone() for p in m.parameters()]


def _three_way(kind, T, B, I, H, lengths=None):
    """Each forced implementation's float32 results, the float64 reference and torch's float32
    path (the bar: at most twice torch's own error against float64)."""
    m = _layer(kind, I, H)
    x = torch.randn(T, B, I, generator=torch.Generator().manual_seed(1))
    with lnorm.use_backend("torch"):
        ref = _outputs_and_grads(_layer(kind, I, H, D64), x.double(), lengths)
        same = _outputs_and_grads(m, x, lengths)
    ours = {}
    from lnorm.ops.step_gemm import use_step_gemm

    for impl in _impls_here():
        with use_step_gemm(impl), lnorm.use_backend("numba"):
            ours[impl] = _outputs_and_grads(m, x, lengths)
    names = ["output", "grad x"] + [f"grad {n}" for n, _ in m.named_parameters()]
    return ours, ref, same, names


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_every_implementation_meets_the_float64_bar_on_small_shapes(kind, packed):
    lengths = torch.tensor([6, 2, 5, 6, 1]) if packed else None
    ours, ref, same, names = _three_way(kind, 6, 5, 7, 16, lengths)
    for impl, got in ours.items():
        for a, r, s, n in zip(got, ref, same, names, strict=True):
            assert_three_way(a, r, s, name=f"{impl}: {n}")


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_the_implementations_agree_on_the_benchmark_shape_class(kind):
    # B=32, I=128, H=512 (the products the selection times), a few steps: each forced
    # implementation meets the float64 bar and agrees with the others to float32 rounding
    ours, ref, same, names = _three_way(kind, 3, 32, 128, 512)
    impls = list(ours)
    for impl in impls:
        for a, r, s, n in zip(ours[impl], ref, same, names, strict=True):
            assert_three_way(a, r, s, name=f"{impl}: {n}")
    for impl in impls[1:]:
        for a, b, n in zip(ours[impl], ours[impls[0]], names, strict=True):
            scale = max(1.0, float(b.abs().max()))
            assert_close(a, b, atol=1e-4 * scale, rtol=1e-3, name=f"{impl} vs {impls[0]}: {n}")


# -------------------------------------------------------------------- the input projection


def _projection_case(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (50, 24) with a NaN in row 7, w (40, 24), and x @ w.T from float64, rounded to float32."""
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(50, 24, generator=g), torch.randn(40, 24, generator=g)
    x[7, 3] = float("nan")
    return x, w, (x.double() @ w.double().t()).float()


@pytest.mark.parametrize("impl", [None, *F32_IMPLS], ids=["auto", *F32_IMPLS])
def test_the_input_projection_equals_a_float64_product(fresh_choices, impl):
    sg = fresh_choices
    x, w, exact = _projection_case(0)
    with sg.use_step_gemm(impl):
        got = sg.input_product(x, w)
    assert torch.isnan(got[7]).all() and torch.isfinite(got[torch.arange(50) != 7]).all()
    assert_close(got[:7], exact[:7], atol=1e-5, rtol=1e-5, name=f"{impl}: x @ w.T")
    assert_close(got[8:], exact[8:], atol=1e-5, rtol=1e-5, name=f"{impl}: x @ w.T")
    if impl is None and "onednn" in _impls_here():
        (entry,) = sg.step_gemm_choices()
        assert entry["rows"] == "all" and entry["impl"] in ("onednn", "mm")
    else:
        assert not sg.step_gemm_choices()  # forced, or nothing to choose: nothing measured
    torch.testing.assert_close(sg.input_product(x.double(), w.double()), x.double() @ w.double().t(), equal_nan=True)


@pytest.mark.parametrize("impl", [None, *F32_IMPLS], ids=["auto", *F32_IMPLS])
def test_the_input_projection_by_blocks_equals_a_float64_product(fresh_choices, impl):
    # InputProjection reorders oneDNN's weight once for a block of `rows` rows and then takes
    # blocks of any row count (the last block of a sequence is shorter), float32 and float64
    sg = fresh_choices
    x, w, exact = _projection_case(1)
    with sg.use_step_gemm(impl):
        proj = sg.InputProjection(w, 16, torch.float32)
        if impl == "onednn":
            assert proj.packed is not None
        got = torch.cat([proj(x[lo : lo + 16]) for lo in range(0, 50, 16)] + [proj(x[:0])])
        whole = proj(x)  # a block longer than the rows the weight was reordered for
    assert got.shape == (50, 40)
    assert torch.isnan(got[7]).all() and torch.isfinite(got[torch.arange(50) != 7]).all()
    keep = torch.arange(50) != 7
    assert_close(got[keep], exact[keep], atol=1e-5, rtol=1e-5, name=f"{impl}: blocks of x @ w.T")
    assert torch.isnan(whole[7]).all()
    assert_close(whole[keep], exact[keep], atol=1e-5, rtol=1e-5, name=f"{impl}: 50 rows, reordered for 16")
    p64 = sg.InputProjection(w.double(), 16, torch.float64)
    assert p64.packed is None
    torch.testing.assert_close(p64(x.double()[3:20]), x.double()[3:20] @ w.double().t(), equal_nan=True)
    with pytest.raises(ValueError, match="InputProjection: w must be 2-d"):
        sg.InputProjection(w[0], 16, torch.float32)


# ------------------------------------------------------------------ review regressions


@pytest.mark.parametrize("impl", F32_IMPLS)
@pytest.mark.parametrize("cls", [LayerNormLSTM, LayerNormGRU])
def test_batch_1_with_a_strided_initial_state(cls, impl):
    # a one-row tensor counts as contiguous whatever its row stride, so the state copy kept a
    # row stride below the width and the MKL product refused a valid input
    _skip_unless(impl)
    from lnorm.ops.step_gemm import use_step_gemm

    torch.manual_seed(0)
    m = cls(3, 4)
    x = torch.randn(5, 1, 3)
    h0 = torch.randn(4, 1, 1).permute(2, 1, 0)  # (1, 1, 4), row stride 1
    hx = (h0, torch.randn(4, 1, 1).permute(2, 1, 0)) if cls is LayerNormLSTM else h0
    with use_step_gemm(impl), lnorm.use_backend("numba"):
        out = m(x, hx)[0]
    with lnorm.use_backend("torch"):
        ref = m(x, hx)[0]
    assert_close(out, ref, atol=1e-5, rtol=1e-4, name=f"output, {impl}")


def test_mkl_refuses_what_its_raw_pointers_cannot_take():
    _skip_unless("mkl")
    from lnorm.ops.step_gemm import StepGemm

    g = StepGemm(torch.randn(8, 4), 2, impl="mkl")
    x = torch.randn(2, 12)
    with pytest.raises(ValueError, match="overlaps"):  # out written over h: a silently wrong product
        g.into(x[:, :4], x[:, 4:12])
    with pytest.raises(ValueError, match="CPU"):
        g.into(torch.randn(2, 4, device="meta"), torch.empty(2, 8))
    with pytest.raises(ValueError, match="2-d CPU tensor"):
        StepGemm(torch.randn(8, 4, device="meta"), 2, impl="mkl")


def test_use_step_gemm_none_means_the_measured_choice(fresh_choices, monkeypatch):
    sg = fresh_choices
    monkeypatch.setenv(sg.ENV, "mm")
    assert sg.forced_impl() == "mm"
    with sg.use_step_gemm(None):
        assert sg.forced_impl() is None
    assert sg.forced_impl() == "mm"


def test_use_step_gemm_forces_this_thread_only(fresh_choices):
    import threading

    sg = fresh_choices
    inside, release, seen = threading.Event(), threading.Event(), []

    def other():
        inside.wait()
        seen.append(sg.forced_impl())
        release.set()

    t = threading.Thread(target=other)
    t.start()
    with sg.use_step_gemm("mm"):
        inside.set()
        release.wait(30)
        assert sg.forced_impl() == "mm"
    t.join()
    assert seen == [None] and sg.forced_impl() is None


# ----------------------------------------------------------------- the weight gradients


@pytest.mark.parametrize("impl", ["mm", "onednn"])
def test_weight_grad_sums_runs_against_float64(impl):
    from lnorm.ops import step_gemm

    if impl == "onednn" and not step_gemm._ONEDNN:
        pytest.skip("torch without oneDNN")
    g = torch.Generator().manual_seed(0)
    dg, a = torch.randn(37, 24, generator=g), torch.randn(37, 10, generator=g)
    exact = dg.double().t() @ a.double()
    wg = step_gemm.WeightGrad(24, 10, 16, torch.float32, impl=impl)
    assert torch.equal(wg.result(), torch.zeros(24, 10))  # nothing added yet
    for lo, hi in ((0, 16), (16, 16), (16, 17), (17, 37)):  # an empty run and a one-row run
        wg.add(dg[lo:hi], a[lo:hi])
    got = wg.result()
    assert got.shape == (24, 10) and got.is_contiguous()
    torch.testing.assert_close(got.double(), exact, rtol=0, atol=1e-5)


def test_weight_grad_checks_what_it_is_given():
    from lnorm.ops.step_gemm import WeightGrad

    wg = WeightGrad(8, 4, 4, torch.float32, impl="mm")
    for dg, a in ((torch.randn(3, 8), torch.randn(2, 4)), (torch.randn(3, 4), torch.randn(3, 8)),
                  (torch.randn(3, 8, dtype=D64), torch.randn(3, 4, dtype=D64)), (torch.randn(8), torch.randn(4))):
        with pytest.raises(ValueError, match=r"WeightGrad.add: dg must be \(m, 8\) and a \(m, 4\)"):
            wg.add(dg, a)
    with pytest.raises(ValueError, match="WeightGrad: impl must be one of"):
        WeightGrad(8, 4, 4, D64, impl="onednn")


def test_weight_grad_choice_is_measured_once_per_class_and_can_be_forced(fresh_choices, monkeypatch):
    sg = fresh_choices
    if not sg._ONEDNN:
        pytest.skip("torch without oneDNN: nothing to choose")
    calls = []
    real = sg._measure_weight_grad
    monkeypatch.setattr(sg, "_measure_weight_grad", lambda *a, **k: calls.append(a) or real(*a, **k))
    first = sg.choose_weight_grad(200, 24, 10, torch.float32)
    assert first in ("onednn", "mm")
    assert sg.choose_weight_grad(256, 24, 10, torch.float32) == first  # the same power-of-two class
    assert sg.choose_weight_grad(5000, 24, 10, torch.float32) in ("onednn", "mm")  # capped at 1024 rows
    assert calls == [(256, 24, 10), (1024, 24, 10)]
    assert sg.choose_weight_grad(200, 24, 10, D64) == "mm" and len(calls) == 2
    [a, b] = [c for c in sg.step_gemm_choices() if c["kind"] == "weight grad"]
    assert (a["rows"], b["rows"]) == (256, 1024) and set(a["ms_per_product"]) == {"onednn", "mm"}
    for forced, want in (("onednn", "onednn"), ("mkl", "mm"), ("mm", "mm")):
        with sg.use_step_gemm(forced):
            assert sg.choose_weight_grad(3, 7, 5, torch.float32) == want
    assert len(calls) == 2


def test_a_weight_grad_that_disagrees_with_float64_is_never_chosen(fresh_choices, monkeypatch):
    sg = fresh_choices
    if not sg._ONEDNN:
        pytest.skip("torch without oneDNN")
    real_add = sg.WeightGrad.add

    def off(self, dg, a):
        real_add(self, dg, a)
        if self.impl == "onednn":
            self.acc = self.acc + 1e-2

    monkeypatch.setattr(sg.WeightGrad, "add", off)
    assert set(sg._measure_weight_grad(16, 24, 10)) == {"mm"}
    assert sg.choose_weight_grad(16, 24, 10, torch.float32) == "mm"


@pytest.mark.parametrize("impl", ["mm", "onednn"])
def test_the_grus_input_product_and_its_gradients_against_float64(impl):
    # the GRU's W_ih x goes through _InputProduct (forward, dx and dW each by the measured
    # library); gradcheck in float64 (torch.mm), each library forced in float32 against float64
    from lnorm.ops import step_gemm
    from lnorm.ops.rnn_fused import _InputProduct

    if impl == "onednn" and not step_gemm._ONEDNN:
        pytest.skip("torch without oneDNN")
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(40, 12, dtype=D64, generator=g), torch.randn(18, 12, dtype=D64, generator=g)
    if impl == "mm":
        assert torch.autograd.gradcheck(_InputProduct.apply, (x.requires_grad_(), w.requires_grad_()))
        return
    dy = torch.randn(40, 18, dtype=D64, generator=g)
    xf, wf = x.float().requires_grad_(), w.float().requires_grad_()
    with step_gemm.use_step_gemm("onednn"):
        y = _InputProduct.apply(xf, wf)
        y.backward(dy.float())
    torch.testing.assert_close(y.double(), x @ w.t(), rtol=0, atol=1e-5)
    torch.testing.assert_close(xf.grad.double(), dy @ w, rtol=0, atol=2e-5)
    torch.testing.assert_close(wf.grad.double(), dy.t() @ x, rtol=0, atol=5e-5)
