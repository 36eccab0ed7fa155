"""The fused CPU path of LayerNormLSTM / LayerNormGRU: one direction of one layer.

What runs where (chosen by measurement, see ``lnorm bench rnn``):

* The input part of the gates does not depend on h: W_ih x for all time steps at once (one
  matmul), or without gradients to come a block of steps at a time. The LSTM's step kernels
  layer-normalize each row of it in cache (and backpropagate through that LN); so do the GRU's
  without gradients to come, while in training its input LN (two groups) runs before the loop,
  in the caller, under autograd.
* The time loop runs in one Numba call where it can (float32, torch's oneDNN brgemm microkernel
  found and checked, see ``lnorm.ops.brgemm``): each step's products by column tiles on Numba's
  threads, the elementwise kernel's rows after them (``lstm_infer_loop``, ``lstm_train_loop``,
  ``lstm_bwd_loop`` and the GRU's ``gru_infer_loop``, ``gru_train_loop``, ``gru_bwd_loop``).
  Otherwise (float64, no brgemm, ``LNORM_NATIVE_LOOP=0``, a forced step product), from Python:
* Per time step: one matmul ``h W_hh^T``, then ONE Numba kernel for all the elementwise work
  (LN of the recurrent part, gates, state update, LN of the cell), which saves the normalized
  recurrent part and per-row statistics for backward (the GRU also its gate activations; the
  LSTM's backward recomputes them; without gradients to come, eager, the kernels save nothing).
  The per-step matmuls go through ``StepGemm`` (the weight packed once per call for the batch
  size, as oneDNN's own LSTM does, by MKL or oneDNN, whichever this process measured faster for
  the shape; see ``lnorm.ops.step_gemm``).
* Backward through time is written by hand: per step one Numba kernel (the step's elementwise
  backward, the LN backwards included) and one matmul ``dgh W_hh`` for the gradient of the
  previous h; the weight gradients are matmuls over runs of steps while their rows are in cache
  (runs of 256-1024 rows, sized from the last-level cache, see ``run_rows``; by oneDNN or torch.mm,
  whichever this process measured faster, see ``WeightGrad``), and the LN parameter gradients are
  sums over all steps.

Variable lengths: rows are in packed layout (time-major, each step's batch sorted longest first);
at step t only the first ``batch_sizes[t]`` rows advance, the others keep their state, so every
sequence gets exactly what it gets alone. ``_Schedule`` holds the order of steps and, for every
row, where its previous state lives (``prev``: a row of the packed buffers or ``-1 - b`` for the
initial state of batch row b).

Under ``torch.compile`` each direction runs as one ``torch.library`` op (``lnorm::lstm_recurrence``,
``lnorm::gru_recurrence``, with backward ops), which the compiler treats as opaque.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lnorm.ops import _rnn_kernels as K
from lnorm.ops import saved_buffers
from lnorm.ops._numba_kernels import num_threads
from lnorm.ops.brgemm import available as brgemm_available
from lnorm.ops.guards import first_order_only
from lnorm.ops.norm import delegates_to_torch, fused_norm, torch_layer_norm
from lnorm.ops.rnn_weights import RecurrentWeights, check_shapes
from lnorm.ops.step_gemm import InputProjection, StepGemm, WeightGrad, forced_impl, input_product

# ----------------------------------------------------------------------------------- schedule


class _Schedule:
    __slots__ = ("steps", "prev", "prev_t", "B", "N", "full", "reverse")

    def __init__(self, batch_sizes: list[int], reverse: bool):
        bs = np.asarray(batch_sizes, dtype=np.int64)
        T = len(bs)
        offsets = np.zeros(T + 1, dtype=np.int64)
        np.cumsum(bs, out=offsets[1:])
        self.B = int(bs[0]) if T else 0
        self.N = int(offsets[-1])
        self.full = bool((bs == self.B).all())  # no sequence ends early
        self.reverse = reverse
        order = np.arange(T - 1, -1, -1) if reverse else np.arange(T)
        self.steps = list(zip(offsets[order].tolist(), bs[order].tolist(), strict=True))
        # the step each step continues from (processed just before it) and its rows: row b of
        # step t starts from row b of that step if that step had it, else from the initial state
        before = order[:-1]
        prev_bs = np.zeros(T, dtype=np.int64)
        prev_off = np.zeros(T, dtype=np.int64)
        prev_bs[order[1:]] = bs[before]
        prev_off[order[1:]] = offsets[before]
        t_of = np.repeat(np.arange(T), bs)
        b_of = np.arange(self.N) - offsets[t_of]
        self.prev = np.where(b_of < prev_bs[t_of], prev_off[t_of] + b_of, -1 - b_of)
        self.prev_t = torch.from_numpy(self.prev)

    def chunks(self, max_rows: int, backward: bool = True) -> list[tuple[int, int, list[tuple[int, int]]]]:
        """The steps in backward order (reversed; in processing order if not ``backward``),
        grouped into runs of at most ``max_rows`` rows (at least one step each): ``(lo, hi,
        steps)``, the run covering packed rows lo .. hi."""
        out, cur, rows = [], [], 0
        for off, bs in (reversed(self.steps) if backward else self.steps):
            if cur and rows + bs > max_rows:
                out.append(cur)
                cur, rows = [], 0
            cur.append((off, bs))
            rows += bs
        if cur:
            out.append(cur)
        return [(min(o for o, _ in c), max(o + b for o, b in c), c) for c in out]

    def add_weight_grad(self, dw: WeightGrad, dgh: Tensor, init: Tensor, rows: Tensor, lo: int, hi: int) -> WeightGrad:
        """``dw += dgh^T @ prev`` over packed rows lo .. hi (``dgh`` holds just those rows): the
        gradient of W_hh, where ``prev`` is the state each row started its step from, a row of
        ``rows`` (the outputs) or of ``init``. ``lo`` and ``hi`` fall on step boundaries.

        With full batches the previous states are ``rows`` shifted by one step, plus ``init`` for
        the step that starts from it: a view of ``rows``, or for the one run that holds that step
        ``init`` and the run's other rows copied together (one product: a second one, of B rows,
        would read and write the whole (4H, H) sum again for a sliver of work)."""
        B, N = self.B, self.N
        if not self.full:
            idx = self.prev_t[lo:hi]
            from_rows = rows.index_select(0, idx.clamp(min=0))
            from_init = init.index_select(0, (-1 - idx).clamp(min=0))
            dw.add(dgh, torch.where((idx >= 0)[:, None], from_rows, from_init))
            return dw
        if not self.reverse:  # row n's previous state is row n - B; the first step's is init
            prev = torch.cat([init, rows[: hi - B]]) if lo < B else rows[lo - B : hi - B]
        else:  # row n's previous state is row n + B; the last step's (rows N - B ..) is init
            prev = torch.cat([rows[lo + B :], init]) if hi > N - B else rows[lo + B : hi + B]
        dw.add(dgh, prev)
        return dw


def _np(t: Tensor):
    return t.detach().numpy()


def _check_tensors(what: str, shapes: dict) -> None:
    """The kernels index these tensors by raw row and column numbers: ``shapes`` maps a name to
    ``(tensor or None, the shape it must have)``, checked before any kernel runs, with one dtype
    and the CPU for all of them. Reached with a
    wrong shape only by a direct call of the ``lnorm::`` ops or their backward (the layers check
    their inputs first), for example backward of a forward run with ``save=False``."""
    first = next(t for t, _ in shapes.values() if t is not None)
    for name, (t, shape) in shapes.items():
        if t is None:
            continue
        if tuple(t.shape) != tuple(shape):
            hint = (" (a forward run with save=False keeps nothing for backward)"
                    if name in ("ghat", "px", "act", "c_all", "stat") else "")
            raise ValueError(f"{what}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}{hint}")
        if t.dtype != first.dtype or t.device.type != "cpu":
            raise ValueError(f"{what}: every tensor must be a CPU tensor of one dtype; {name} is {t.dtype} on "
                             f"{t.device}, the first is {first.dtype}")


def _step_product(gemm: StepGemm, hs: Tensor, gh: Tensor, bs: int):
    """The forward step's ``hs[:bs] @ W_hh^T`` for the kernel: oneDNN's fresh output (or ``gh``) as
    a NumPy array. Rows are sliced only for a partial batch: a view costs about 1 us, and this runs
    at every step (100 per layer in the benchmark case, where the time loop's Python is about 1 ms).
    Neither operand requires grad (``hs`` is the loop's own state), so no detach."""
    if bs == gemm.batch:
        return gemm.prod(hs, gh).numpy()
    return gemm.prod(hs[:bs], gh[:bs]).numpy()


def _torch_empty(shape: tuple[int, ...], dt) -> Tensor:
    return torch.empty(*shape, dtype=dt)


def _consts(dtype, eps: float, g: int, h: int):
    # scalars in the data's dtype, so the kernels' float32 loops stay float32
    return np.array([eps, 1.0, 1.0 / g, 1.0 / h], dtype=dtype)


# ---------------------------------------------------------------------------------------- LSTM


# Without gradients to come, the input projection runs a block of steps at a time, of about this
# many bytes (2 MB at 4H = 2048: 256 rows), so that the step kernels read each block of W_ih x while
# it is in cache; the one product for all rows leaves N x 4H floats (26 MB at N = 3200, H = 512)
# to be read back from memory, a row at a time. Training keeps the one product: backward reads it.
_PX_BLOCK_BYTES = 2 << 20


def _lstm_forward(x, w_ih, h0, c0, w_hh, g0, g1, b1, g3, b3, sched: _Schedule, eps: float, save: bool,
                  pooled: bool = False):
    """The time loop: ``(out, h_n, c_n, px, (ghat, c_all, stat))``, ``px = x W_ih^T`` for all rows
    when ``save`` (backward reads it with the rest), else an empty (0, 4H) tensor. ``pooled``: the
    saved buffers come from ``saved_buffers`` (the autograd Function's route)."""
    N, G = x.shape[0], w_ih.shape[0]
    H = G // 4
    B = h0.shape[0]
    dt = x.dtype
    hs = h0.detach().clone().contiguous()
    cs = c0.detach().clone().contiguous()
    out = torch.empty(N, H, dtype=dt)
    rows = N if save else 0  # what backward reads; nothing without gradients to come
    new = saved_buffers.empty if pooled else _torch_empty
    ghat = new((rows, G), dt)
    c_all = new((rows, H), dt)
    stat = new((rows, 5), dt)
    g0_n, g1_n, b1_n, g3_n, b3_n = (_np(t.contiguous()) for t in (g0, g1, b1, g3, b3))
    hs_n, cs_n, out_n = _np(hs), _np(cs), _np(out)
    ghat_n, c_n, stat_n = _np(ghat), _np(c_all), _np(stat)
    k = _consts(out_n.dtype, eps, G, H)
    gh = torch.empty(B, G, dtype=dt)  # h W_hh^T of the step, unless the GEMM returns its own
    kernels = K.builds()
    if save:
        px = input_product(x, w_ih)  # W_ih x for all rows: one matmul
        px_n = _np(px)
        if _native_loop(x, w_hh):
            steps = _steps_array(sched)
            kernels.lstm_train_loop(steps[0], steps[1], px_n, _panels_of_rows(w_hh, _native_tile(G)), g0_n, g1_n,
                                    b1_n, g3_n, b3_n, k, hs_n, cs_n, out_n, ghat_n, c_n, stat_n, _np(gh))
            return out, hs, cs, px, (ghat, c_all, stat)
        gemm = StepGemm(w_hh, B)  # h -> h W_hh^T
        step = kernels.lstm_fwd_step
        for off, bs in sched.steps:
            gh_n = _step_product(gemm, hs, gh, bs)
            step(off, off, gh_n, px_n, g0_n, g1_n, b1_n, g3_n, b3_n, k, hs_n, cs_n, out_n, ghat_n, c_n, stat_n)
        return out, hs, cs, px, (ghat, c_all, stat)
    # no gradients to come: the kernel that saves nothing (ghat, c_all, stat stay unwritten)
    if _native_loop(x, w_hh):
        _lstm_native_infer(x, w_ih, w_hh, sched, kernels.lstm_infer_loop,
                           (g0_n, g1_n, b1_n, g3_n, b3_n, k, hs_n, cs_n, out_n))
    else:
        gemm = StepGemm(w_hh, B)  # h -> h W_hh^T
        _infer_loop(x, w_ih, gemm, hs, gh, sched, kernels.lstm_fwd_infer_step,
                    (g0_n, g1_n, b1_n, g3_n, b3_n, k, hs_n, cs_n, out_n))
    return out, hs, cs, x.new_empty(0, G), (ghat, c_all, stat)


# The native loops' column tiles: each thread multiplies tiles of up to this many columns of the
# step's product (4H for gh, H for backward's previous-h gradient), at least two tiles per thread
# so that both halves of an uneven split stay busy. On an AMD EPYC (Zen 4, 2 threads),
# LayerNormLSTM(128, 512) on (100, 32, 128) without gradients, with the weights in panels: 45.8 ms
# with tiles of 64, 45.1 with 128, 45.3 with 256, nn.LSTM 41.3-42.9 (one-off interleaved medians of
# 15; ``benchmarks/lstm_train_breakdown.py --part 4`` times the same tiles). Reading the tiles of
# W^T in place, a row of 4H floats apart, took 48-52 ms (tiles of 64-512).
_NATIVE_TILE = 128
_NATIVE_TILE_MIN = 32


def _native_tile(width: int) -> int:
    """The column tile for products ``width`` columns wide: ``_NATIVE_TILE`` halved (down to
    ``_NATIVE_TILE_MIN``) until every thread gets at least two tiles."""
    tile, threads = _NATIVE_TILE, max(1, num_threads())
    while tile > _NATIVE_TILE_MIN and -(-width // tile) < 2 * threads:
        tile //= 2
    return tile


def _native_loop(x: Tensor, w_hh: Tensor) -> bool:
    """Whether a time loop (forward, inference or backward) runs natively (``lnorm.ops.brgemm``):
    float32, non-empty sizes, no per-step product forced (``use_step_gemm`` / ``LNORM_STEP_GEMM``:
    tests and benchmarks that force one get the Python loop they ask for) and the microkernel
    available."""
    if x.dtype != torch.float32 or min(x.shape[1], w_hh.shape[1], x.shape[0]) == 0:
        return False
    return forced_impl() is None and brgemm_available()


def _lstm_native_infer(x: Tensor, w_ih: Tensor, w_hh: Tensor, sched: _Schedule, loop, rest: tuple) -> None:
    """The LSTM's time loop without gradients to come in one native call (``lstm_infer_loop``):
    both weights packed once into column panels (``_panels_of_rows``), the steps in processing
    order as (first row, rows) arrays."""
    G, H = w_hh.shape
    B = rest[6].shape[0]
    offs, sizes = _steps_array(sched)
    tile = _native_tile(G)
    gh, px = np.empty((B, G), np.float32), np.empty((B, G), np.float32)
    loop(offs, sizes, _np(x.contiguous()), _panels_of_rows(w_ih, tile), _panels_of_rows(w_hh, tile), *rest, gh, px)


def _panels_of_rows(w: Tensor, tile: int) -> np.ndarray:
    """``w.T`` ((k, n) for an (n, k) ``w``) as the native loops read it: column panels, (tiles, k,
    tile), panel j holding columns j*tile .. of ``w.T`` contiguously, zero-padded past n."""
    n, k = w.shape
    tiles = -(-n // tile)
    w = w.detach()
    if tiles * tile != n:
        w = torch.cat([w, w.new_zeros(tiles * tile - n, k)])
    return _np(w.reshape(tiles, tile, k).transpose(1, 2).contiguous())


def _panels_of_cols(w: Tensor, tile: int) -> np.ndarray:
    """``w`` itself ((k, n)) in the same column panels: (tiles, k, tile), zero-padded past n."""
    k, n = w.shape
    tiles = -(-n // tile)
    w = w.detach()
    if tiles * tile != n:
        w = torch.cat([w, w.new_zeros(k, tiles * tile - n)], dim=1)
    return _np(w.reshape(k, tiles, tile).transpose(0, 1).contiguous())


def _steps_array(sched: _Schedule) -> tuple[np.ndarray, np.ndarray]:
    """The schedule's steps in processing order for a native loop: (first rows, row counts)."""
    return _steps_array_of(sched.steps)


def _steps_array_of(steps: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    arr = np.asarray(steps, dtype=np.int64).reshape(-1, 2)
    return np.ascontiguousarray(arr[:, 0]), np.ascontiguousarray(arr[:, 1])


def _infer_loop(x: Tensor, w_ih: Tensor, gemm: StepGemm, hs: Tensor, gh: Tensor, sched: _Schedule, step,
                rest: tuple) -> None:
    """The time loop without gradients to come (LSTM and GRU): W_ih x a block of steps at a time
    (``_PX_BLOCK_BYTES``), which the step kernel reads and layer-normalizes while it is in cache,
    ``step(off, off - lo, gh, px_block, *rest)`` at each step."""
    N, G = x.shape[0], w_ih.shape[0]
    block = max(1, _PX_BLOCK_BYTES // max(1, G * x.element_size()))
    proj = InputProjection(w_ih, min(block, N), x.dtype)
    for lo, hi, steps in sched.chunks(block, backward=False):
        px_n = _np(proj(x[lo:hi]))
        for off, bs in steps:
            step(off, off - lo, _step_product(gemm, hs, gh, bs), px_n, *rest)


# Backward produces the gradients of px and gh a run of steps at a time into two buffers (dpx, dgh)
# and folds each run into the weight gradients (W_hh, W_ih) and the input's gradient while it is in
# cache, instead of writing (N, 4H) tensors for one matmul at the end, which makes the step kernel
# write to memory that has left the cache. Longer runs mean fewer, longer weight-gradient products
# (each run adds into the whole (4H, H) dW_hh) but bigger buffers, so the length follows the cache
# this machine has: each buffer a quarter of the last-level cache, from 2 MB (256 rows at 4H = 2048,
# the length first tuned, on an Intel CPU) to 8 MB (1024 rows). On the Zen 5 (L3 32 MB) a training
# step of LayerNormLSTM(128, 512) on (100, 32, 128) took 84.5-86.5 ms with runs of 1024 rows against
# 91.5 ms with 256 (interleaved, median of 23, nn.LSTM 82-83 ms; 79.4 against 81.1 at a quieter
# time); 2048 rows was no better.
_RUN_BYTES_MIN, _RUN_BYTES_MAX = 2 << 20, 8 << 20
_RUN_ROWS_MIN, _RUN_ROWS_MAX = 256, 1024
_CHUNK_ROWS: int | None = None  # rows per run, forced (tests); None: from the cache, see run_rows


def last_level_cache_bytes(root: str = "/sys/devices/system/cpu/cpu0/cache") -> int | None:
    """The largest cache CPU 0 reports (Linux sysfs: ``index*/size`` such as ``32768K``), or None
    where it reports none."""
    import glob
    import os

    sizes = []
    for path in glob.glob(os.path.join(root, "index*", "size")):
        try:
            with open(path) as fh:
                text = fh.read().strip()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
        digits = text[:-1] if scale != 1 else text
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes) if sizes else None


def _run_bytes(cache: int | None) -> int:
    return _RUN_BYTES_MIN if cache is None else min(_RUN_BYTES_MAX, max(_RUN_BYTES_MIN, cache // 4))


_RUN_BYTES = _run_bytes(last_level_cache_bytes())


def run_buffer_bytes() -> int:
    """The bytes each of the LSTM backward's two run buffers is sized for on this machine."""
    return _RUN_BYTES


def run_rows(width: int, itemsize: int) -> int:
    """Rows per run of the LSTM backward for gradient rows of ``width`` (4H) elements of
    ``itemsize`` bytes: a buffer of about ``_RUN_BYTES``, 256 to 1024 rows (forced by ``_CHUNK_ROWS``)."""
    if _CHUNK_ROWS is not None:
        return _CHUNK_ROWS
    return min(_RUN_ROWS_MAX, max(_RUN_ROWS_MIN, _RUN_BYTES // max(1, width * itemsize)))


def run_width(cell: str, hidden: int) -> int:
    """The row width a backward's runs are sized by (``run_rows``): the LSTM's 4H (each of its two
    run buffers, dpx and dgh, is 4H wide); the GRU's 8H, so half the LSTM's rows (its one buffer,
    dgh, is 3H wide, and half the length measured best, see ``_GRURecurrence.backward``)."""
    return (4 if cell == "lstm" else 8) * hidden


def backward_run_rows(batch: int, cell: str, hidden: int, itemsize: int = 4) -> int:
    """The rows of one run of the ``cell`` ("lstm" or "gru") backward with full batches of
    ``batch`` rows (whole steps, at least one): what its dW_hh sums per product (``lnorm bench
    rnn`` times the same)."""
    rows = run_rows(run_width(cell, hidden), itemsize)
    return max(batch, rows // batch * batch)


def _next_dh(gemm: StepGemm, dgh: Tensor, dh: Tensor, full: bool, accumulate: bool) -> Tensor:
    """The previous step's h gradient in a backward time loop: ``dgh @ W_hh`` (plus what the step
    kernel left in ``dh`` when ``accumulate``, the GRU's ``z dh``) for the step's ``bs`` rows.
    With full batches every step has all B rows, so it may be oneDNN's fresh output (no copy back
    into ``dh``, 100 copies per layer saved); otherwise into ``dh[:bs]``, whose later rows hold the
    gradients of sequences that end at earlier steps, read when the loop reaches them."""
    bs = dgh.shape[0]
    if full:
        return gemm.prod(dgh, dh, accumulate)
    gemm.into(dgh, dh[:bs], accumulate)
    return dh


def _output_grads(dout, dhn, N: int, B: int, H: int, dt) -> tuple[Tensor, Tensor]:
    """The incoming gradients of the output (N, H) and of the final h (B, H), zeros where absent;
    the latter a fresh buffer, since backward through time accumulates into it."""
    dout = dout.contiguous() if dout is not None else torch.zeros(N, H, dtype=dt)
    dhs = dhn.clone().contiguous() if dhn is not None else torch.zeros(B, H, dtype=dt)
    return dout, dhs


class _LSTMRecurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_ih, h0, c0, w_hh, g0, g1, b1, g3, b3, sched, eps):
        out, hn, cn, px, saved = _lstm_forward(x, w_ih, h0, c0, w_hh, g0, g1, b1, g3, b3, sched, eps, True,
                                               pooled=True)
        w_keep = w_ih if ctx.needs_input_grad[0] else None  # W_ih is needed only for dx
        ctx.save_for_backward(x, w_keep, px, h0, c0, w_hh, g0, g1, b1, g3, b3, out, *saved)
        ctx.sched = sched
        return out, hn, cn

    @staticmethod
    @first_order_only
    def backward(ctx, dout, dhn, dcn):
        x, w_ih, px, h0, c0, w_hh, g0, g1, b1, g3, b3, out, ghat, c_all, stat = ctx.saved_tensors
        need_x, need_w_ih, need_w_hh = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[4]
        sched = ctx.sched
        N, B, H = sched.N, sched.B, w_hh.shape[1]
        G, I, dt = 4 * H, x.shape[1], ghat.dtype
        _check_tensors("LSTM recurrence backward", {
            "x": (x, (N, I)), "w_ih": (w_ih, (G, I)), "px": (px, (N, G)), "h0": (h0, (B, H)),
            "c0": (c0, (B, H)), "w_hh": (w_hh, (G, H)), "g0": (g0, (G,)), "g1": (g1, (G,)), "b1": (b1, (G,)),
            "g3": (g3, (H,)), "b3": (b3, (H,)), "out": (out, (N, H)), "ghat": (ghat, (N, G)),
            "c_all": (c_all, (N, H)), "stat": (stat, (N, 5)), "dout": (dout, (N, H)), "dhn": (dhn, (B, H)),
            "dcn": (dcn, (B, H))})
        dout, dhs = _output_grads(dout, dhn, N, B, H, dt)
        dcs = dcn.clone().contiguous() if dcn is not None else torch.zeros(B, H, dtype=dt)
        runs = sched.chunks(run_rows(run_width("lstm", H), ghat.element_size()))
        buf_rows = max(hi - lo for lo, hi, _ in runs)
        dpx = torch.empty(buf_rows, G, dtype=dt)
        dgh = torch.empty(buf_rows, G, dtype=dt)
        dx = torch.empty(N, I, dtype=dt) if need_x else None
        # the products over each run of rows, by the library measured fastest for them here
        dw_ih = WeightGrad(G, I, buf_rows, dt) if need_w_ih else None
        dw_hh = WeightGrad(G, H, buf_rows, dt) if need_w_hh else None
        dx_gemm = StepGemm(w_ih.detach().t(), buf_rows) if need_x else None  # dpx -> dpx W_ih
        chunks = max(1, min(B, num_threads()))  # one slice of the LN-gradient sums per thread
        acc_g = torch.zeros(chunks, 3, G, dtype=torch.float64)
        acc_c = torch.zeros(chunks, 2, H, dtype=torch.float64)
        native = _native_loop(x, w_hh)  # each run's time loop in one call (lstm_bwd_loop)
        gemm = None if native else StepGemm(w_hh.detach().t(), B)  # dgh -> dgh W_hh
        dout_n, dcs_n, ghat_n, c_n, stat_n = (_np(t) for t in (dout, dcs, ghat, c_all, stat))
        c0_n, px_n, g0_n, g1_n, b1_n, g3_n, b3_n = (_np(t.contiguous()) for t in (c0, px, g0, g1, b1, g3, b3))
        scratch = [_np(t) for t in (dpx, dgh, acc_g, acc_c)]
        k = _consts(dout_n.dtype, 1.0, G, H)
        h0d = h0.detach()
        kernels = K.builds()
        whh_n = _panels_of_cols(w_hh, _native_tile(H)) if native else None
        dh = dhs  # the gradient w.r.t. the step's h from later steps (see _next_dh)
        for lo, hi, steps in runs:
            if native:  # dh stays dhs, overwritten a step's rows at a time
                offs, sizes = _steps_array_of(steps)
                kernels.lstm_bwd_loop(offs, sizes, lo, dout_n, _np(dh), dcs_n, ghat_n, c_n, stat_n, sched.prev, c0_n,
                                      px_n, g0_n, g1_n, b1_n, g3_n, b3_n, k, *scratch, whh_n)
            for off, bs in steps if not native else ():
                kernels.lstm_bwd_step(off, lo, bs, dout_n, _np(dh), dcs_n, ghat_n, c_n, stat_n, sched.prev, c0_n,
                                      px_n, g0_n, g1_n, b1_n, g3_n, b3_n, k, *scratch)
                dh = _next_dh(gemm, dgh[off - lo : off - lo + bs], dh, sched.full, False)
            m = hi - lo
            if need_w_hh:
                sched.add_weight_grad(dw_hh, dgh[:m], h0d, out, lo, hi)
            if need_w_ih:
                dw_ih.add(dpx[:m], x[lo:hi])
            if need_x:
                dx_gemm.into(dpx[:m], dx[lo:hi])
        acc_g, acc_c = acc_g.sum(0).to(dt), acc_c.sum(0).to(dt)
        dw_ih = dw_ih.result() if need_w_ih else None
        dw_hh = dw_hh.result() if need_w_hh else None
        return (dx, dw_ih, dh, dcs, dw_hh, acc_g[2], acc_g[0], acc_g[1], acc_c[0], acc_c[1], None, None)


def lstm_recurrence(x, h0, c0, p, eps, batch_sizes, reverse):
    """``x`` is the layer's input rows (N, I): W_ih x is computed here, its layer norm in the step
    kernels. All biases (both LNs' and b_ih + b_hh) are added to the gates as one vector."""
    g0, g1, g3, b3 = p.ln_ih_w, p.ln_hh_w, p.ln_c_w, p.ln_c_b
    b1 = p.ln_hh_b + p.ln_ih_b
    if p.b_ih is not None:
        b1 = b1 + p.b_ih + p.b_hh
    x = x.contiguous()
    tensors = (x, p.w_ih, h0, c0, p.w_hh, g0, g1, b1, g3, b3)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if torch.compiler.is_compiling():
        return lstm_recurrence_op(*tensors, batch_sizes, reverse, eps, needs_grad)[:3]
    sched = _Schedule(batch_sizes, reverse)
    if needs_grad:
        return _LSTMRecurrence.apply(x, p.w_ih, h0, c0, p.w_hh, g0, g1, b1, g3, b3, sched, eps)
    with torch.no_grad():
        out, hn, cn, _, _ = _lstm_forward(x, p.w_ih, h0, c0, p.w_hh, g0, g1, b1, g3, b3, sched, eps, False)
    return out, hn, cn


# ----------------------------------------------------------------------------------------- GRU


def _gru_forward(gx_rz, gx_n, h0, w_hh, g1, b1, b_in, sched: _Schedule, eps: float, save: bool,
                 pooled: bool = False):
    N = gx_rz.shape[0]
    H = gx_n.shape[1]
    G = 3 * H
    B = h0.shape[0]
    dt = gx_rz.dtype
    hs = h0.detach().clone().contiguous()
    out = torch.empty(N, H, dtype=dt)
    rows = N if save else B
    new = saved_buffers.empty if pooled and save else _torch_empty  # (without save: one step's scratch)
    ghat = new((rows, G), dt)
    act = new((rows, 4 * H), dt)
    stat = new((rows, 2), dt)
    xrz_n, xn_n, g1_n, b1_n, bin_n = (_np(t.contiguous()) for t in (gx_rz, gx_n, g1, b1, b_in))
    hs_n, out_n = _np(hs), _np(out)
    ghat_n, act_n, stat_n = _np(ghat), _np(act), _np(stat)
    k = _consts(xrz_n.dtype, eps, 2 * H, H)
    gh = torch.empty(B, G, dtype=dt)  # h W_hh^T of the step, unless the GEMM returns its own
    if save and _native_loop(gx_rz, w_hh):  # the whole loop in one call (gru_train_loop)
        offs, sizes = _steps_array(sched)
        K.builds().gru_train_loop(offs, sizes, xrz_n, xn_n, _panels_of_rows(w_hh, _native_tile(G)), g1_n, b1_n, bin_n,
                                  k, hs_n, out_n, ghat_n, act_n, stat_n, _np(gh))
        return out, hs, (ghat, act, stat)
    gemm = StepGemm(w_hh, B)  # h -> h W_hh^T
    step = K.builds().gru_fwd_step
    for off, bs in sched.steps:
        gh_n = _step_product(gemm, hs, gh, bs)
        step(off, off if save else 0, gh_n, xrz_n, xn_n, g1_n, b1_n, bin_n, k, hs_n, out_n, ghat_n,
             act_n, stat_n)
    return out, hs, (ghat, act, stat)


def _gru_infer(x: Tensor, h0: Tensor, p: RecurrentWeights, sched: _Schedule) -> tuple[Tensor, Tensor]:
    """The GRU's time loop without gradients to come, outside the compiler: as the LSTM's
    inference, W_ih x a block of steps at a time (``_PX_BLOCK_BYTES``) and its layer norm (two
    groups) in the step kernel while the block is in cache, instead of the input LN over all rows
    before the loop (``_gru_input_groups``, which writes the (N, 3H) normalized input and reads it
    back). ``(out, h_n)``."""
    N, H, B, dt = x.shape[0], h0.shape[1], h0.shape[0], x.dtype
    G = 3 * H
    b1, b_in = _gru_biases(p, H, dt)
    # the input LN's bias joins the others: r, z's in b1, n's in b_in (outside the reset gate)
    b1 = b1 + torch.cat([p.ln_ih_b[: 2 * H], torch.zeros(H, dtype=dt)])
    b_in = b_in + p.ln_ih_b[2 * H :]
    hs = h0.detach().clone().contiguous()
    out = torch.empty(N, H, dtype=dt)
    g0_n, g1_n, b1_n, bin_n = (_np(t.contiguous()) for t in (p.ln_ih_w, p.ln_hh_w, b1, b_in))
    hs_n, out_n = _np(hs), _np(out)
    k = _consts(out_n.dtype, p.eps, 2 * H, H)
    rest = (g0_n, g1_n, b1_n, bin_n, k, hs_n, out_n)
    if _native_loop(x, p.w_hh):  # the whole loop in one call (gru_infer_loop, as the LSTM's)
        offs, sizes = _steps_array(sched)
        tile = _native_tile(G)
        scratch = np.empty((B, G), np.float32), np.empty((B, G), np.float32)
        K.builds().gru_infer_loop(offs, sizes, _np(x), _panels_of_rows(p.w_ih, tile), _panels_of_rows(p.w_hh, tile),
                                  *rest, *scratch)
        return out, hs
    gemm = StepGemm(p.w_hh, B)  # h -> h W_hh^T
    gh = torch.empty(B, G, dtype=dt)  # h W_hh^T of the step, unless the GEMM returns its own
    _infer_loop(x, p.w_ih, gemm, hs, gh, sched, K.builds().gru_fwd_infer_step, rest)
    return out, hs


class _GRURecurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gx_rz, gx_n, h0, w_hh, g1, b1, b_in, sched, eps):
        out, hn, saved = _gru_forward(gx_rz, gx_n, h0, w_hh, g1, b1, b_in, sched, eps, True, pooled=True)
        ctx.save_for_backward(h0, w_hh, g1, out, *saved)
        ctx.sched = sched
        return out, hn

    @staticmethod
    @first_order_only
    def backward(ctx, dout, dhn):
        h0, w_hh, g1, out, ghat, act, stat = ctx.saved_tensors
        sched = ctx.sched
        N, B, H = sched.N, sched.B, w_hh.shape[1]
        G, dt = 3 * H, ghat.dtype
        _check_tensors("GRU recurrence backward", {
            "h0": (h0, (B, H)), "w_hh": (w_hh, (G, H)), "g1": (g1, (G,)), "out": (out, (N, H)),
            "ghat": (ghat, (N, G)), "act": (act, (N, 4 * H)), "stat": (stat, (N, 2)), "dout": (dout, (N, H)),
            "dhn": (dhn, (B, H))})
        dout, dhs = _output_grads(dout, dhn, N, B, H, dt)
        dx_rz = torch.empty(N, 2 * H, dtype=dt)
        dx_n = torch.empty(N, H, dtype=dt)
        # dgh a run of steps at a time (as the LSTM's backward): each run is folded into dW_hh
        # while it is in cache. Half the LSTM's run length for the
        # same width: 512 rows at H = 512 on the Zen 5, where a training step of
        # LayerNormGRU(128, 512) on (100, 32, 128) took 83.6 / 71.2 ms with runs of 512 rows, 84.0 /
        # 78.2 with 1024, 85.3 / 70.4 with 256 and 92.7 / 82.3 with all rows in one run, the
        # backward before runs (two interleaved sessions, median of 19; nn.GRU 134-137 ms).
        runs = sched.chunks(run_rows(run_width("gru", H), ghat.element_size()))
        buf_rows = max(hi - lo for lo, hi, _ in runs)
        dgh = torch.empty(buf_rows, G, dtype=dt)
        need_w_hh = ctx.needs_input_grad[3]
        dw = WeightGrad(G, H, buf_rows, dt) if need_w_hh else None
        native = _native_loop(dout, w_hh)  # each run's time loop in one call (gru_bwd_loop)
        gemm = None if native else StepGemm(w_hh.detach().t(), B, accumulate=True)  # dgh -> dgh W_hh
        whh_p = _panels_of_cols(w_hh, _native_tile(H)) if native else None
        dout_n, ghat_n, act_n, stat_n, out_n = (_np(t) for t in (dout, ghat, act, stat, out))
        h0_n, g1_n = _np(h0.contiguous()), _np(g1.contiguous())
        dxrz_n, dxn_n, dgh_n = _np(dx_rz), _np(dx_n), _np(dgh)
        k = _consts(dgh_n.dtype, 1.0, 2 * H, H)
        kernels = K.builds()
        chunks = max(1, min(B, num_threads()))  # one slice of the LN-gradient sums per thread
        acc = torch.zeros(chunks, 3, G, dtype=torch.float64)
        acc_n = _np(acc)
        h0d = h0.detach()
        dh = dhs  # the gradient w.r.t. the step's h from later steps (see _next_dh)
        for lo, hi, steps in runs:
            if native:  # dh stays dhs: the kernel leaves z dh in its rows, brgemm adds dgh W_hh
                offs, sizes = _steps_array_of(steps)
                kernels.gru_bwd_loop(offs, sizes, lo, dout_n, _np(dh), ghat_n, act_n, stat_n, sched.prev, out_n, h0_n,
                                     g1_n, k, dxrz_n, dxn_n, dgh_n, acc_n, whh_p)
            for off, bs in steps if not native else ():
                # the kernel leaves z dh in dh, the product adds dgh W_hh
                kernels.gru_bwd_step(off, lo, bs, dout_n, _np(dh), ghat_n, act_n, stat_n, sched.prev, out_n, h0_n,
                                     g1_n, k, dxrz_n, dxn_n, dgh_n, acc_n)
                dh = _next_dh(gemm, dgh[off - lo : off - lo + bs], dh, sched.full, True)
            if need_w_hh:
                sched.add_weight_grad(dw, dgh[: hi - lo], h0d, out, lo, hi)
        dw = dw.result() if need_w_hh else None
        acc = acc.sum(0).to(dt)
        return (dx_rz, dx_n, dh, dw, acc[0], acc[1], acc[2, :H], None, None)


def _gru_biases(p: RecurrentWeights, H: int, dt) -> tuple[Tensor, Tensor]:
    """The GRU kernels' two bias vectors (see ``gru_recurrence``): ``b1`` (3H) and ``b_in`` (H)."""
    b1 = p.ln_hh_b
    if p.b_ih is None:
        return b1, torch.zeros(H, dtype=dt)
    return b1 + torch.cat([p.b_ih[: 2 * H] + p.b_hh[: 2 * H], p.b_hh[2 * H :]]), p.b_ih[2 * H :]


def gru_recurrence(gx, h0, p, eps, batch_sizes, reverse):
    """``gx`` is ``(LN(W_ih x)_{r,z}, LN(W_ih x)_n)`` without biases (see ``_gru_input_groups``).

    The kernel takes two bias vectors: ``b1`` (3H) added to the normalized recurrent part (r, z:
    its LN bias + b_ih + b_hh; n: its LN bias + b_hn, inside the reset gate's product) and
    ``b_in`` (H) = the n part of b_ih, outside it."""
    gx_rz, gx_n = gx
    b1, b_in = _gru_biases(p, h0.shape[1], gx_rz.dtype)
    tensors = (gx_rz, gx_n, h0, p.w_hh, p.ln_hh_w, b1, b_in)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if torch.compiler.is_compiling():
        return gru_recurrence_op(*tensors, batch_sizes, reverse, eps, needs_grad)[:2]
    sched = _Schedule(batch_sizes, reverse)
    if needs_grad:
        return _GRURecurrence.apply(gx_rz, gx_n, h0, p.w_hh, p.ln_hh_w, b1, b_in, sched, eps)
    with torch.no_grad():
        out, hn, _ = _gru_forward(gx_rz, gx_n, h0, p.w_hh, p.ln_hh_w, b1, b_in, sched, eps, False)
    return out, hn


# ------------------------------------------------------------------- torch.library ops (compile)

# Under torch.compile each direction of a layer is one opaque op (its fake implementation gives
# the output shapes), so the compiler neither traces nor unrolls the time loop and the compiled
# model runs the same kernels as eager. The ops return what backward needs as extra outputs
# (empty-batch scratch when nothing needs gradients); their backward ops call the Functions'
# backward with an _OpContext, so both routes share one backward through time.


class _OpContext:
    """The part of an autograd ctx that the Functions' backward reads."""

    __slots__ = ("saved_tensors", "needs_input_grad", "sched")

    def __init__(self, saved_tensors, needs_input_grad, sched):
        self.saved_tensors, self.needs_input_grad, self.sched = saved_tensors, needs_input_grad, sched


def _unaliased(grads, inputs, empty: Tensor) -> list[Tensor]:
    """A custom op's outputs may alias neither each other nor its inputs, and must look like its
    fake implementation's (fresh, contiguous, at storage offset 0), where the backwards return
    views of one buffer of LN-parameter sums: each gradient that is not alone in a storage of its
    own size, or whose storage an input or an earlier output holds, is cloned; ``empty`` (a fresh
    empty tensor each) stands for one not computed. Storages are compared as torch's own check
    compares them, not by ``_base``: a view made under a TorchDispatchMode (FlopCounterMode, the
    compiler's tracing) has no ``_base``."""
    held = {t.untyped_storage()._cdata for t in inputs if isinstance(t, Tensor)}
    out = []
    for g in grads:
        g = empty.new_empty(0) if g is None else g
        own = (g.storage_offset() == 0 and g.is_contiguous()
               and g.untyped_storage().nbytes() == g.numel() * g.element_size())
        if not own or g.untyped_storage()._cdata in held:
            g = g.clone(memory_format=torch.contiguous_format)
        held.add(g.untyped_storage()._cdata)
        out.append(g)
    return out


def _op_schedule(what: str, batch_sizes: list[int], reverse: bool) -> _Schedule:
    """The ops' schedule, after the check the layers make of packed batch sizes (positive, never
    increasing), which the kernels' row numbers rely on."""
    if any(b <= 0 for b in batch_sizes) or any(a < b for a, b in zip(batch_sizes[:-1], batch_sizes[1:], strict=True)):
        raise ValueError(f"{what}: batch_sizes must be positive and never increase, got {list(batch_sizes)}")
    return _Schedule(batch_sizes, reverse)


@torch.library.custom_op("lnorm::lstm_recurrence", mutates_args=())
def lstm_recurrence_op(
    x: Tensor, w_ih: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, g0: Tensor, g1: Tensor,
    b1: Tensor, g3: Tensor, b3: Tensor, batch_sizes: list[int], reverse: bool, eps: float, save: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(out, h_n, c_n, px, ghat, c_all, stat)``: the outputs, then what backward reads."""
    sched = _op_schedule("lnorm::lstm_recurrence", batch_sizes, reverse)
    N, B, H, I = sched.N, sched.B, w_hh.shape[-1], x.shape[-1]
    G = 4 * H
    _check_tensors("lnorm::lstm_recurrence", {
        "w_hh": (w_hh, (G, H)), "x": (x, (N, I)), "w_ih": (w_ih, (G, I)), "h0": (h0, (B, H)), "c0": (c0, (B, H)),
        "g0": (g0, (G,)), "g1": (g1, (G,)), "b1": (b1, (G,)), "g3": (g3, (H,)), "b3": (b3, (H,))})
    out, hn, cn, px, saved = _lstm_forward(x, w_ih, h0, c0, w_hh, g0, g1, b1, g3, b3, sched, eps, save)
    return out, hn, cn, px, *saved


@lstm_recurrence_op.register_fake
def _(x, w_ih, h0, c0, w_hh, g0, g1, b1, g3, b3, batch_sizes, reverse, eps, save):
    N, G, B = x.shape[0], w_ih.shape[0], h0.shape[0]
    H = G // 4
    rows = N if save else 0
    e = x.new_empty
    return e(N, H), e(B, H), e(B, H), e(rows, G), e(rows, G), e(rows, H), e(rows, 5)


@torch.library.custom_op("lnorm::lstm_recurrence_backward", mutates_args=())
def lstm_recurrence_backward_op(
    dout: Tensor | None, dhn: Tensor | None, dcn: Tensor | None, x: Tensor, w_ih: Tensor, px: Tensor, h0: Tensor,
    c0: Tensor, w_hh: Tensor, g0: Tensor, g1: Tensor, b1: Tensor, g3: Tensor, b3: Tensor,
    out: Tensor, ghat: Tensor, c_all: Tensor, stat: Tensor, batch_sizes: list[int], reverse: bool,
    need_x: bool, need_w_ih: bool, need_w_hh: bool,
) -> list[Tensor]:
    """The gradients of ``x, w_ih, h0, c0, w_hh, g0, g1, b1, g3, b3``; empty where not needed."""
    saved = (x, w_ih, px, h0, c0, w_hh, g0, g1, b1, g3, b3, out, ghat, c_all, stat)
    needs = (need_x, need_w_ih, False, False, need_w_hh)
    ctx = _OpContext(saved, needs, _op_schedule("lnorm::lstm_recurrence_backward", batch_sizes, reverse))
    with torch.no_grad():  # plain gradients: first_order_only's error node is for the Function's route
        grads = _LSTMRecurrence.backward(ctx, dout, dhn, dcn)[:10]
    return _unaliased(grads, (dout, dhn, dcn, *saved), x)


@lstm_recurrence_backward_op.register_fake
def _(dout, dhn, dcn, x, w_ih, px, h0, c0, w_hh, g0, g1, b1, g3, b3, out, ghat, c_all, stat,
      batch_sizes, reverse, need_x, need_w_ih, need_w_hh):
    e = x.new_empty
    like = [e(x.shape) if need_x else e(0), e(w_ih.shape) if need_w_ih else e(0), e(h0.shape),
            e(c0.shape), e(w_hh.shape) if need_w_hh else e(0)]
    return like + [e(t.shape) for t in (g0, g1, b1, g3, b3)]


def _lstm_op_setup_context(ctx, inputs, output):
    x, w_ih, h0, c0, w_hh, g0, g1, b1, g3, b3, batch_sizes, reverse, _, _ = inputs
    out, _, _, px, ghat, c_all, stat = output
    ctx.save_for_backward(x, w_ih, px, h0, c0, w_hh, g0, g1, b1, g3, b3, out, ghat, c_all, stat)
    ctx.batch_sizes, ctx.reverse, ctx.saved_all = batch_sizes, reverse, inputs[-1]


_NOT_SAVED = "{}: the forward ran with save=False and kept nothing for backward; call it with save=True to differentiate it"


def _lstm_op_backward(ctx, dout, dhn, dcn, *_):
    if not ctx.saved_all:
        raise RuntimeError(_NOT_SAVED.format("lnorm::lstm_recurrence"))
    need = ctx.needs_input_grad
    grads = lstm_recurrence_backward_op(dout, dhn, dcn, *ctx.saved_tensors, ctx.batch_sizes,
                                        ctx.reverse, need[0], need[1], need[4])
    grads = [g if n else None for g, n in zip(grads, need[:10], strict=True)]
    return (*grads, None, None, None, None)


lstm_recurrence_op.register_autograd(_lstm_op_backward, setup_context=_lstm_op_setup_context)


@torch.library.custom_op("lnorm::gru_recurrence", mutates_args=())
def gru_recurrence_op(
    gx_rz: Tensor, gx_n: Tensor, h0: Tensor, w_hh: Tensor, g1: Tensor, b1: Tensor, b_in: Tensor,
    batch_sizes: list[int], reverse: bool, eps: float, save: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(out, h_n, ghat, act, stat)``: the outputs, then what backward reads."""
    sched = _op_schedule("lnorm::gru_recurrence", batch_sizes, reverse)
    N, B, H = sched.N, sched.B, w_hh.shape[-1]
    G = 3 * H
    _check_tensors("lnorm::gru_recurrence", {
        "w_hh": (w_hh, (G, H)), "gx_rz": (gx_rz, (N, 2 * H)), "gx_n": (gx_n, (N, H)), "h0": (h0, (B, H)),
        "g1": (g1, (G,)), "b1": (b1, (G,)), "b_in": (b_in, (H,))})
    out, hn, saved = _gru_forward(gx_rz, gx_n, h0, w_hh, g1, b1, b_in, sched, eps, save)
    return out, hn, *saved


@gru_recurrence_op.register_fake
def _(gx_rz, gx_n, h0, w_hh, g1, b1, b_in, batch_sizes, reverse, eps, save):
    N, H, B = gx_n.shape[0], gx_n.shape[1], h0.shape[0]
    rows = N if save else B
    e = gx_n.new_empty
    return e(N, H), e(B, H), e(rows, 3 * H), e(rows, 4 * H), e(rows, 2)


@torch.library.custom_op("lnorm::gru_recurrence_backward", mutates_args=())
def gru_recurrence_backward_op(
    dout: Tensor | None, dhn: Tensor | None, h0: Tensor, w_hh: Tensor, g1: Tensor, out: Tensor, ghat: Tensor,
    act: Tensor, stat: Tensor, batch_sizes: list[int], reverse: bool, need_w_hh: bool,
) -> list[Tensor]:
    """The gradients of ``gx_rz, gx_n, h0, w_hh, g1, b1, b_in``; ``w_hh``'s empty if not needed."""
    saved = (h0, w_hh, g1, out, ghat, act, stat)
    ctx = _OpContext(saved, (False, False, False, need_w_hh),
                     _op_schedule("lnorm::gru_recurrence_backward", batch_sizes, reverse))
    with torch.no_grad():
        grads = _GRURecurrence.backward(ctx, dout, dhn)[:7]
    return _unaliased(grads, (dout, dhn, *saved), h0)


@gru_recurrence_backward_op.register_fake
def _(dout, dhn, h0, w_hh, g1, out, ghat, act, stat, batch_sizes, reverse, need_w_hh):
    N, H = out.shape
    e = out.new_empty
    return [e(N, 2 * H), e(N, H), e(h0.shape), e(w_hh.shape) if need_w_hh else e(0), e(3 * H),
            e(3 * H), e(H)]


def _gru_op_setup_context(ctx, inputs, output):
    _, _, h0, w_hh, g1, _, _, batch_sizes, reverse, _, save = inputs
    out, _, ghat, act, stat = output
    ctx.save_for_backward(h0, w_hh, g1, out, ghat, act, stat)
    ctx.batch_sizes, ctx.reverse, ctx.saved_all = batch_sizes, reverse, save


def _gru_op_backward(ctx, dout, dhn, *_):
    if not ctx.saved_all:
        raise RuntimeError(_NOT_SAVED.format("lnorm::gru_recurrence"))
    need = ctx.needs_input_grad
    grads = gru_recurrence_backward_op(dout, dhn, *ctx.saved_tensors, ctx.batch_sizes, ctx.reverse,
                                       need[3])
    grads = [g if n else None for g, n in zip(grads, need[:7], strict=True)]
    return (*grads, None, None, None, None)


gru_recurrence_op.register_autograd(_gru_op_backward, setup_context=_gru_op_setup_context)



# ------------------------------------------------------------------------------- entry point


def _layer_norm(z: Tensor, w: Tensor, b: Tensor, eps: float) -> Tensor:
    """``lnorm.functional.layer_norm`` of the rows of a valid 2-D ``z``."""
    if delegates_to_torch(z, z.shape[1]):
        y = torch_layer_norm(z, (z.shape[1],), w, b, eps)
        if y is not None:  # else a row overflowed torch's kernel: fused_norm handles it
            return y
    return fused_norm(z, None, w, b, eps, True)[0]


class _InputProduct(torch.autograd.Function):
    """``x @ w.T`` for all rows, its three products (forward, dx, dW) each by the library this
    process measured faster for it (``input_product``, ``WeightGrad``): ``F.linear`` is MKL's
    GEMM, up to 2x slower than oneDNN on AMD CPUs."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return input_product(x, w)

    @staticmethod
    @first_order_only
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dy = dy.contiguous()
        dx = input_product(dy, w.t()) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:
            dw = WeightGrad(w.shape[0], w.shape[1], dy.shape[0], dy.dtype)
            dw.add(dy, x)
            dw = dw.result()
        return dx, dw


def _linear(x: Tensor, w: Tensor) -> Tensor:
    if torch.compiler.is_compiling():  # the compiler sees F.linear; the measured choice is a host call
        return F.linear(x, w)
    return _InputProduct.apply(x.contiguous(), w)


def _gru_input_groups(x: Tensor, w: RecurrentWeights) -> tuple[Tensor, Tensor]:
    """LN(W_ih x) of the GRU for all rows at once, as its two groups (N, 2H) and (N, H), without
    biases (the kernels add them): two matmuls into separate tensors cost less than slicing one
    (N, 3H) product apart."""
    s = 2 * w.w_hh.shape[1]
    rz = _layer_norm(_linear(x, w.w_ih[:s]), w.ln_ih_w[:s], w.ln_ih_b[:s], w.eps)
    n = _layer_norm(_linear(x, w.w_ih[s:]), w.ln_ih_w[s:], w.ln_ih_b[s:], w.eps)
    return rz, n


def recurrence(x: Tensor, batch_sizes: list[int], h0: Tensor, c0: Tensor | None,
               w: RecurrentWeights, reverse: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """One direction of one layer over the packed rows ``x`` (N, I), see ``lnorm.ops.rnn``.

    Returns the packed output (N, H) and the final h, c (B, H) (c is None for the GRU).
    """
    check_shapes(x, h0, c0, w, batch_sizes, "cpu")
    if not torch.compiler.is_compiling():  # (a host call dynamo cannot trace; compiled, left as is)
        num_threads()  # the step kernels' threads follow torch.set_num_threads
    if w.mode == "LSTM":  # its W_ih x and LN run inside the loop's chunks, see lstm_recurrence
        return lstm_recurrence(x, h0, c0, w, w.eps, batch_sizes, reverse)
    tensors = (x, h0, w.w_ih, w.w_hh, w.b_ih, w.b_hh, w.ln_ih_w, w.ln_ih_b, w.ln_hh_w, w.ln_hh_b)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if not needs_grad and not torch.compiler.is_compiling():  # see _gru_infer
        with torch.no_grad():
            out, hn = _gru_infer(x.contiguous(), h0, w, _Schedule(batch_sizes, reverse))
        return out, hn, None
    out, hn = gru_recurrence(_gru_input_groups(x, w), h0, w, w.eps, batch_sizes, reverse)
    return out, hn, None
