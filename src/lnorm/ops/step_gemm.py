"""The recurrence's matrix products, with the implementation chosen per machine: the per-step
product ``h @ w.T`` (:class:`StepGemm`), the input projection for all rows (:func:`input_product`)
and the weight gradients summed over runs of rows (:class:`WeightGrad`).

A layer's time loop multiplies a small batch of rows (B x k) by the same weight (k x n) at every
step. Which library does that fastest depends on the CPU: MKL dispatches on the CPU's vendor and
runs these products about 1.5x slower on an AMD EPYC (Zen 4) than oneDNN, which dispatches on the
instruction set; on the Intel machine the fused path was first tuned on, MKL's packed GEMM was the
fastest. So each process measures once per shape class and keeps the fastest:

* ``mkl``: MKL's packed GEMM (``cblas_sgemm_pack`` / ``cblas_sgemm_compute``, called through
  ctypes from the copy of MKL inside torch's library): the weight packed once for B rows, the
  product written straight into the caller's buffer;
* ``onednn``: oneDNN's inner product with the weight reordered once into its blocked layout for B
  rows (``torch.ops.mkldnn._reorder_linear_weight``, then ``_linear_pointwise`` per step), as
  oneDNN's own LSTM packs its weights once per call; it returns a fresh tensor (``into`` copies it
  into the caller's buffer, ``prod`` hands it over);
* ``mm``: ``torch.mm`` / ``addmm_``, always there; the only one for float64 and for steps with
  fewer rows than the packed count (the later steps of a packed sequence).

A shape class is (rows, n, k, dtype, torch's thread count, whether the product is accumulated).
The first product of a class times each candidate a few interleaved rounds (the fastest round,
which a busy moment on a shared machine cannot make look faster than it is; tens of
milliseconds in all), after checking it against a float64 product: a candidate that disagrees
beyond float32 rounding is never chosen. ``LNORM_STEP_GEMM=mkl|onednn|mm`` (read at each choice) or
:func:`use_step_gemm` forces one where it is available; :func:`step_gemm_choices` lists what was
chosen. Every candidate computes the same product in float32 with its own order of the sums, so
the choice moves results by float32 rounding only.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import time

import torch
from torch import Tensor

IMPLS = ("mkl", "onednn", "mm")
ENV = "LNORM_STEP_GEMM"


class _MKL:
    """MKL's packed single-precision GEMM through ctypes, or ``fns = None`` where torch's library
    does not export it (torch without MKL, other platforms). Calling MKL directly rather than
    through ``torch.ops.mkl._mkl_linear`` lets the weight be packed from either layout (no
    transposed copy of W_hh for backward) and the product be written into a buffer the step kernel
    reads, with no tensor allocated per step."""

    ROW_MAJOR, NO_TRANS, TRANS, PACKED, B_MATRIX = 101, 111, 112, 151, 162
    fns = None

    @classmethod
    def load(cls) -> None:
        import ctypes

        if not torch.backends.mkl.is_available():
            return
        # torch/lib in a pip install; by name (already loaded, found by its soname) elsewhere
        for name in (os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"), "libtorch_cpu.so"):
            try:
                lib = ctypes.CDLL(name)
                size, pack, compute = lib.cblas_sgemm_pack_get_size, lib.cblas_sgemm_pack, lib.cblas_sgemm_compute
                break
            except (OSError, AttributeError):
                continue
        else:
            return
        i, f, p = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
        size.restype = ctypes.c_size_t
        size.argtypes = [i, i, i, i]
        pack.restype = None
        pack.argtypes = [i, i, i, i, i, i, f, p, i, p]
        compute.restype = None
        compute.argtypes = [i, i, i, i, i, i, p, i, p, i, f, p, i]
        cls.fns = (size, pack, compute)
        # check the calling convention on a small product before any layer relies on it
        g = torch.Generator().manual_seed(0)
        a, w = torch.randn(3, 5, generator=g), torch.randn(7, 5, generator=g)
        with torch.autocast("cpu", enabled=False):  # an import under autocast: compare in float32
            got = [StepGemm(v, 3, impl="mkl")(a) for v in (w, w.t().contiguous().t())]
            ok = all(torch.allclose(o, a @ w.t(), rtol=1e-4, atol=1e-5) for o in got)
        if not ok:
            cls.fns = None


def _onednn_available() -> bool:
    try:
        ops = torch.ops.mkldnn
        return bool(torch.backends.mkldnn.is_available() and ops._reorder_linear_weight and ops._linear_pointwise)
    except (AttributeError, RuntimeError):
        return False


def available(dtype: torch.dtype) -> tuple[str, ...]:
    """The implementations that can run products of ``dtype`` here (``mm`` always)."""
    if dtype != torch.float32:
        return ("mm",)
    return tuple(name for name, ok in (("mkl", _MKL.fns is not None), ("onednn", _ONEDNN), ("mm", True)) if ok)


class StepGemm:
    """``h -> h @ w.T`` for the time loop (``w``: (n, k), contiguous or the transpose of a
    contiguous tensor), packed once for ``batch`` rows by the implementation ``impl`` (default:
    the one chosen for this shape class, see the module's docstring). Steps with another row count
    use ``torch.mm``."""

    __slots__ = ("impl", "b", "packed", "batch", "n", "k", "op")

    def __init__(self, w: Tensor, batch: int, accumulate: bool = False, impl: str | None = None):
        w = w.detach()
        if w.dim() != 2 or w.device.type != "cpu" or w.layout != torch.strided:
            raise ValueError(f"StepGemm: w must be a 2-d CPU tensor, got shape {tuple(w.shape)} on {w.device} "
                             f"({w.layout})")
        if not (w.is_contiguous() or w.t().is_contiguous()):
            w = w.contiguous()
        self.n, self.k = w.shape
        self.batch = batch
        self.b = w.t()  # (k, n), for torch.mm
        self.packed = None
        if batch <= 0 or min(w.shape) <= 0:
            impl = "mm"
        elif impl is None:
            impl = choose(batch, self.n, self.k, w.dtype, accumulate)
        elif impl not in available(w.dtype):
            raise ValueError(f"StepGemm: impl must be one of {available(w.dtype)} for {w.dtype}, got {impl!r}")
        self.impl = impl
        if impl == "mkl":
            fns = _MKL.fns
            # MKL's B is w.T (k, n): stored transposed if w is row-major, as is if w.T is
            trans, ld = (_MKL.TRANS, self.k) if w.is_contiguous() else (_MKL.NO_TRANS, self.n)
            self.packed = torch.empty(fns[0](_MKL.B_MATRIX, batch, self.n, self.k), dtype=torch.uint8)
            fns[1](_MKL.ROW_MAJOR, _MKL.B_MATRIX, trans, batch, self.n, self.k, 1.0, w.data_ptr(), ld,
                   self.packed.data_ptr())
        elif impl == "onednn":
            self.packed = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), batch)
            # looked up once: the time loops call prod at every step
            self.op = torch.ops.mkldnn._linear_pointwise.default

    def _check(self, h: Tensor, out: Tensor) -> tuple[int, int]:
        """MKL reads and writes through raw pointers: the shapes, strides and device it trusts,
        checked first. Returns the leading dimensions to pass (a one-row tensor's row stride is
        arbitrary, torch calls it contiguous whatever it is: its rows are as long as it is wide)."""
        rows = h.shape[0] if h.dim() == 2 else -1
        if (h.dtype != torch.float32 or out.dtype != torch.float32 or h.dim() != 2 or out.dim() != 2
                or h.device.type != "cpu" or out.device.type != "cpu" or h.layout != torch.strided
                or out.layout != torch.strided
                or h.shape[1] != self.k or tuple(out.shape) != (rows, self.n) or h.stride(1) != 1
                or out.stride(1) != 1 or (rows > 1 and (h.stride(0) < self.k or out.stride(0) < self.n))):
            raise ValueError(f"StepGemm: h {tuple(h.shape)} and out {tuple(out.shape)} must be float32 CPU "
                             f"tensors with contiguous rows, h (rows, {self.k}) and out (rows, {self.n}); got "
                             f"strides {h.stride()} and {out.stride()} on {h.device} and {out.device}")
        lo, hi = out.data_ptr(), out.data_ptr() + 4 * ((rows - 1) * out.stride(0) + self.n)
        h_lo, h_hi = h.data_ptr(), h.data_ptr() + 4 * ((rows - 1) * h.stride(0) + self.k)
        if rows > 0 and lo < h_hi and h_lo < hi:
            raise ValueError("StepGemm: out overlaps h (the product would read values it already overwrote)")
        return (h.stride(0) if rows > 1 else self.k), (out.stride(0) if rows > 1 else self.n)

    def into(self, h: Tensor, out: Tensor, accumulate: bool = False) -> Tensor:
        """``out = h @ w.T`` (``out += ...`` when ``accumulate``); ``h`` and ``out`` have
        contiguous rows. Returns ``out``."""
        rows = h.shape[0]
        if self.impl == "mm" or rows != self.batch:
            return out.addmm_(h, self.b) if accumulate else torch.mm(h, self.b, out=out)
        if self.impl == "mkl":
            ldh, ldo = self._check(h, out)
            _MKL.fns[2](_MKL.ROW_MAJOR, _MKL.NO_TRANS, _MKL.PACKED, rows, self.n, self.k, h.data_ptr(),
                        ldh, self.packed.data_ptr(), self.n, 1.0 if accumulate else 0.0,
                        out.data_ptr(), ldo)
            return out
        ops = torch.ops.mkldnn
        if accumulate:
            return out.copy_(ops._linear_pointwise.binary(h, out, self.packed, None, "add"))
        return out.copy_(self.op(h, self.packed, None, "none", [], ""))

    def prod(self, h: Tensor, buf: Tensor, accumulate: bool = False) -> Tensor:
        """``h @ w.T`` (``buf + h @ w.T`` when ``accumulate``), in ``buf`` (h's rows, n) or in a
        fresh tensor (oneDNN's own output, which saves a copy); either way a tensor with
        contiguous rows."""
        if self.impl == "onednn" and h.shape[0] == self.batch:
            if accumulate:
                return torch.ops.mkldnn._linear_pointwise.binary(h, buf, self.packed, None, "add")
            return self.op(h, self.packed, None, "none", [], "")
        return self.into(h, buf, accumulate)

    def __call__(self, h: Tensor) -> Tensor:
        return self.prod(h, torch.empty(h.shape[0], self.n, dtype=h.dtype))


# ------------------------------------------------------------------------------ the choice

# per thread (and asyncio task): one thread's use_step_gemm block does not force another's products
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("lnorm_step_gemm_forced", default=None)
_chosen: dict[tuple, str] = {}
_timings: dict[tuple, dict[str, float]] = {}


def forced_impl() -> str | None:
    """The implementation forced now (:func:`use_step_gemm` in this thread, else ``LNORM_STEP_GEMM``),
    or None for the measured choice."""
    forced = _forced.get()
    name = forced if forced is not None else os.environ.get(ENV, "auto").strip().lower()
    if name in ("", "auto"):
        return None
    if name not in IMPLS:
        raise ValueError(f"{ENV} must be one of auto, {', '.join(IMPLS)}; got {name!r}")
    return name


@contextlib.contextmanager
def use_step_gemm(name: str | None):
    """Force the implementation of the per-step products inside the block (``None`` or ``"auto"``:
    the measured choice); a forced one that cannot run a product (MKL absent, float64) leaves
    that product to the measured choice. In this thread only. For tests and benchmarks."""
    if name is not None and name != "auto" and name not in IMPLS:
        raise ValueError(f"use_step_gemm: name must be None, 'auto' or one of {IMPLS}, got {name!r}")
    token = _forced.set("auto" if name is None else name)  # None: the measured choice, whatever the env says
    try:
        yield
    finally:
        _forced.reset(token)


def choose(batch: int, n: int, k: int, dtype: torch.dtype, accumulate: bool = False) -> str:
    """The implementation for products of ``batch`` rows by a (k x n) weight: the forced one if
    it can run them, else the fastest measured here (timed at the first product of this class)."""
    names = available(dtype)
    forced = forced_impl()
    if forced in names:
        return forced
    if len(names) == 1:
        return names[0]
    key = (batch, n, k, dtype, torch.get_num_threads(), accumulate)
    if key not in _chosen:
        times = _measure(batch, n, k, accumulate, names)
        _timings[key] = times
        _chosen[key] = min(times, key=times.get)
    return _chosen[key]


def _measure(batch: int, n: int, k: int, accumulate: bool, names: tuple[str, ...],
             rounds: int = 7, calls: int = 6) -> dict[str, float]:
    """Seconds per product of each candidate that agrees with a float64 product: the fastest of
    ``rounds`` interleaved samples of ``calls`` products each."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g) / k**0.5
    h = torch.randn(batch, k, generator=g)
    exact = h.double() @ w.double().t()
    gemms, out = {}, torch.empty(batch, n)
    with torch.autocast("cpu", enabled=False), torch.no_grad():
        for name in names:
            try:  # a library that fails here (an op this CPU or build lacks) is left out
                gemm = StepGemm(w, batch, impl=name)
                got = gemm.into(h, out.zero_()).double()
            except RuntimeError:
                continue
            # float32 rounding of a k-term sum of unit-scale products: well under 1e-4 * sqrt(k)
            if torch.allclose(got, exact, rtol=1e-4, atol=1e-4 * k**0.5):
                gemms[name] = gemm

        def calls_of(gemm):
            def f():
                for _ in range(calls):
                    if accumulate:
                        gemm.into(h, out, accumulate=True)
                    else:
                        gemm.prod(h, out)
            return f

        times = _fastest({name: calls_of(gemm) for name, gemm in gemms.items()}, rounds, calls)
    return times or {"mm": 0.0}


def _fastest(fns: dict, rounds: int, per: int = 1) -> dict[str, float]:
    """Seconds per unit of work of each candidate (``fns[name]()`` does ``per`` units): the
    fastest of ``rounds`` rounds, the candidates timed in turn within each round. The fastest,
    not the median: other work only ever adds time, and under load (seen: every candidate of a
    class reading 16 ms, 10x its quiet time, and the slower one chosen) the median is noise."""
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t0) / per)
    return {name: min(s) for name, s in samples.items()}


# ------------------------------------------------------------------- the input projection
# W_ih x for all rows of a layer is one product of many rows (N = T * B, different for every
# sequence length), so its class is (n, k) alone, timed on a fixed sample of rows; the weight is
# reordered for oneDNN at every call (it changes between training steps), and that is timed too.

_INPUT_ROWS = 1024


def _onednn_input(x: Tensor, w: Tensor) -> Tensor:
    wp = torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), x.shape[0])
    return torch.ops.mkldnn._linear_pointwise(x, wp, None, "none", [], "")


def _input_impl(w: Tensor, dtype: torch.dtype) -> str:
    """``onednn`` or ``mm`` for the input projection by the (n, k) weight ``w``: the forced one
    (``mkl`` forced means ``mm``), else the faster measured here, once per class."""
    n, k = w.shape
    if dtype != torch.float32 or not _ONEDNN or min(n, k) == 0:
        return "mm"
    forced = forced_impl()
    if forced is not None:
        return "onednn" if forced == "onednn" else "mm"
    key = ("all", n, k, dtype, torch.get_num_threads(), False)
    if key not in _chosen:
        _timings[key] = _measure_input(n, k)
        _chosen[key] = min(_timings[key], key=_timings[key].get)
    return _chosen[key]


def input_product(x: Tensor, w: Tensor) -> Tensor:
    """``x @ w.T`` for a contiguous (N, k) ``x`` and an (n, k) ``w``: one product for all rows,
    by oneDNN or ``torch.mm``, whichever measured faster here (``mkl`` forced means ``mm``)."""
    return InputProjection(w, x.shape[0], x.dtype)(x)  # one block of all the rows


class InputProjection:
    """``x -> x @ w.T`` for blocks of about ``rows`` rows of a layer's input (any count): the
    input projection a block of time steps at a time, so that the time loop reads each block's
    result while it is in cache instead of reading one (N, n) product back from memory. The
    implementation is :func:`input_product`'s; oneDNN's weight is reordered once, for ``rows``
    rows (its inner product takes any row count with it). Each row's product is the same sum
    as in :func:`input_product`, up to float32 rounding (the libraries block the rows
    differently)."""

    __slots__ = ("w", "packed")

    def __init__(self, w: Tensor, rows: int, dtype: torch.dtype):
        w = w.detach()
        if w.dim() != 2:
            raise ValueError(f"InputProjection: w must be 2-d, got shape {tuple(w.shape)}")
        self.w = w
        self.packed = None
        if rows > 0 and _input_impl(w, dtype) == "onednn":
            self.packed = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), rows)

    def __call__(self, x: Tensor) -> Tensor:
        if self.packed is None or x.shape[0] == 0 or x.dtype != torch.float32:
            return torch.mm(x, self.w.t())
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")


def _measure_input(n: int, k: int, rounds: int = 5) -> dict[str, float]:
    """Seconds per product of ``_INPUT_ROWS`` rows, oneDNN (its reorder included) and torch.mm,
    oneDNN only if it agrees with a float64 product."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g) / k**0.5
    x = torch.randn(_INPUT_ROWS, k, generator=g)
    fns = {"onednn": lambda: _onednn_input(x, w), "mm": lambda: torch.mm(x, w.t())}
    with torch.autocast("cpu", enabled=False), torch.no_grad():
        try:
            ok = torch.allclose(fns["onednn"]().double(), x.double() @ w.double().t(), rtol=1e-4,
                                atol=1e-4 * k**0.5)
        except RuntimeError:
            ok = False
        if not ok:
            del fns["onednn"]
        return _fastest(fns, rounds)


# ------------------------------------------------------------------- the weight gradients
# dW = dG^T A summed over runs of rows (the LSTM and GRU backwards fold each run of 256-1024 rows in
# while it is in cache, see ``rnn_fused.run_rows``). torch.mm is MKL's GEMM, which on AMD CPUs runs these
# products up to 2x slower than oneDNN (Zen 5: dW_hh for 3200 rows, 32 ms against 17-21). oneDNN's
# inner product reads the reduced dimension contiguously, so it accumulates the transpose,
# dW^T += A^T dG (both operands transposed views, no copies), and the result is transposed back once.
# The class is (rows per run, rounded up to a power of two and capped at 1024, n, k, dtype,
# threads), timed on runs of that many rows.


_GRAD_ROWS_MAX = 1024


class WeightGrad:
    """``dw = sum of dg^T @ a`` over calls of :meth:`add` (``dg``: (m, n), ``a``: (m, k), any m),
    ``dw``: (n, k), by oneDNN or ``torch.mm`` (see above), the one chosen for ``rows`` rows per
    call unless ``impl`` is given. :meth:`result` returns a contiguous (n, k) tensor."""

    __slots__ = ("impl", "acc", "n", "k", "dtype")

    def __init__(self, n: int, k: int, rows: int, dtype: torch.dtype, impl: str | None = None):
        self.n, self.k, self.dtype = n, k, dtype
        names = ("onednn", "mm") if dtype == torch.float32 and _ONEDNN else ("mm",)
        if impl is None:
            impl = choose_weight_grad(rows, n, k, dtype) if min(rows, n, k) > 0 else "mm"
        elif impl not in names:
            raise ValueError(f"WeightGrad: impl must be one of {names} for {dtype}, got {impl!r}")
        self.impl = impl
        self.acc = None  # (n, k), or (k, n) for oneDNN

    def add(self, dg: Tensor, a: Tensor) -> None:
        if (dg.dim() != 2 or a.dim() != 2 or dg.shape[0] != a.shape[0] or dg.shape[1] != self.n
                or a.shape[1] != self.k or dg.dtype != self.dtype or a.dtype != self.dtype):
            raise ValueError(f"WeightGrad.add: dg must be (m, {self.n}) and a (m, {self.k}), both {self.dtype}; "
                             f"got {tuple(dg.shape)} {dg.dtype} and {tuple(a.shape)} {a.dtype}")
        if dg.shape[0] == 0:
            return
        if self.impl == "onednn":
            lin = torch.ops.mkldnn._linear_pointwise
            self.acc = (lin(a.t(), dg.t(), None, "none", [], "") if self.acc is None
                        else lin.binary(a.t(), self.acc, dg.t(), None, "add"))
        elif self.acc is None:
            self.acc = torch.mm(dg.t(), a)
        else:
            self.acc.addmm_(dg.t(), a)

    def result(self) -> Tensor:
        if self.acc is None:
            return torch.zeros(self.n, self.k, dtype=self.dtype)
        return self.acc.t().contiguous() if self.impl == "onednn" else self.acc


def choose_weight_grad(rows: int, n: int, k: int, dtype: torch.dtype) -> str:
    """``onednn`` or ``mm`` for weight gradients summed over runs of ``rows`` rows (forced:
    ``onednn`` if forced, ``mm`` for ``mkl`` or ``mm``), measured once per class."""
    if dtype != torch.float32 or not _ONEDNN:
        return "mm"
    forced = forced_impl()
    if forced is not None:
        return "onednn" if forced == "onednn" else "mm"
    rows = min(1 << max(rows - 1, 0).bit_length(), _GRAD_ROWS_MAX)  # a class per power of two, capped
    key = (("dW", rows), n, k, dtype, torch.get_num_threads(), True)
    if key not in _chosen:
        _timings[key] = _measure_weight_grad(rows, n, k)
        _chosen[key] = min(_timings[key], key=_timings[key].get)
    return _chosen[key]


def _measure_weight_grad(rows: int, n: int, k: int, runs: int = 3, rounds: int = 5) -> dict[str, float]:
    """Seconds per run of ``rows`` rows of each candidate (``runs`` runs summed, then the result
    taken), oneDNN only if its sum agrees with a float64 one."""
    g = torch.Generator().manual_seed(0)
    dg = torch.randn(runs * rows, n, generator=g)
    a = torch.randn(runs * rows, k, generator=g) / rows**0.5

    def total(impl):
        wg = WeightGrad(n, k, rows, torch.float32, impl=impl)
        for i in range(runs):
            wg.add(dg[i * rows : (i + 1) * rows], a[i * rows : (i + 1) * rows])
        return wg.result()

    names = ["onednn", "mm"]
    with torch.autocast("cpu", enabled=False), torch.no_grad():
        try:
            exact = dg.double().t() @ a.double()
            ok = torch.allclose(total("onednn").double(), exact, rtol=1e-4, atol=1e-4 * (runs * rows) ** 0.5)
        except RuntimeError:
            ok = False
        if not ok:
            names.remove("onednn")
        return _fastest({name: lambda name=name: total(name) for name in names}, rounds, runs)


def step_gemm_choices() -> list[dict]:
    """What this process chose so far, one entry per shape class: kind (``step``: the per-step
    products ``h @ w.T``; ``input``: the input projection, rows ``"all"``, see
    :func:`input_product`; ``weight grad``: ``dw (n, k) += dg^T @ a`` over runs of ``rows`` rows,
    see :class:`WeightGrad`), rows, n, k, dtype, threads, accumulate, the implementation and the
    measured milliseconds per product (per run, for weight gradients) of each candidate."""
    out = []
    for key, impl in list(_chosen.items()):  # another thread may be adding a class
        batch, n, k, dtype, threads, accumulate = key
        kind = "input" if batch == "all" else "weight grad" if isinstance(batch, tuple) else "step"
        ms = {name: round(s * 1e3, 4) for name, s in _timings.get(key, {}).items()}
        out.append(dict(kind=kind, rows=batch[1] if kind == "weight grad" else batch, n=n, k=k,
                        dtype=str(dtype).replace("torch.", ""), threads=threads, accumulate=accumulate,
                        impl=impl, ms_per_product=ms))
    return out


_ONEDNN = _onednn_available()
_MKL.load()
