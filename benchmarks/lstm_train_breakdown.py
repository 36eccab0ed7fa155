"""Where a LayerNormLSTM training step's and inference's time goes on this CPU (issue 15's leads):

1. ``torch.profiler`` over three training steps of LayerNormLSTM(128, 512) on (100, 32, 128):
   self time per op (oneDNN per-step products, weight-gradient ``addmm_``, the fused autograd
   Functions, copies), after median step times of lnorm and ``nn.LSTM`` (interleaved, 9 rounds);
2. minor page faults per training and inference step of both layers (``resource.getrusage``):
   compare with ``MALLOC_MMAP_THRESHOLD_=4000000000 MALLOC_TRIM_THRESHOLD_=8000000000`` set, which
   keeps freed memory in the process;
3. the backward's big products alone: dW_hh summed over 13 runs of 256 rows by ``WeightGrad``
   with each library forced (the fused path takes the one it measured faster), one ``torch.mm``,
   oneDNN (with transposed copies); the input gradient by ``torch.mm`` and oneDNN;
4. an inference's parts, each alone, beside the whole layers (interleaved, 15 rounds): ``nn.LSTM``
   with a 1-wide input (the whole layer minus this is what the input part costs inside oneDNN's
   fused RNN), the layer with its time loop run from Python and in native code (by column tile,
   see ``rnn_fused._NATIVE_TILE``), the input projection of all rows, packing W_hh for the step
   products (done once per call), 100 per-step products, 100 calls of the same oneDNN op on a 1 x 16
   product (what a call costs besides its arithmetic), 100 calls of the inference step kernel reading
   W_ih x from memory (as the layer does) and from cache (the same 32 rows each step), and the
   whole time loop (``_lstm_forward``: its products, kernels and the input projection, a block of
   steps at a time);
5. a design lead, not the layer's path: the inference time loop split by batch rows across the
   threads, each thread running its rows' whole loop (a one-thread oneDNN product of B/threads
   rows, then the serial step kernel) with no hand-off between oneDNN's and Numba's thread pools
   at each step, against the layer (interleaved, 21 rounds, after checking that both give the
   same output). Needs torch's bundled GNU OpenMP (the threads' OpenMP thread count is set
   through it); skipped elsewhere.

    PYTHONPATH=src python benchmarks/lstm_train_breakdown.py [--part 1 2 3 4 5]

Run it on a quiet machine; the CPU is printed first.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import numpy as np
import torch

from lnorm.nn import LayerNormLSTM
from lnorm.ops.step_gemm import WeightGrad
from lnorm.utils import cpu_model


def _median_ms(fns: dict, rounds: int = 9) -> dict[str, float]:
    for f in fns.values():
        f()
        f()
    res = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            res[k].append((time.perf_counter() - t) * 1e3)
    return {k: round(statistics.median(v), 2) for k, v in res.items()}


def _layers():
    torch.manual_seed(0)
    m, ref = LayerNormLSTM(128, 512), torch.nn.LSTM(128, 512)
    x = torch.randn(100, 32, 128, requires_grad=True)

    def train(mod):
        def f():
            out, _ = mod(x)
            out.sum().backward()
        return f

    def infer(mod):
        def f():
            with torch.no_grad():
                mod(x)
        return f

    return m, ref, train, infer


def profile() -> None:
    m, ref, train, infer = _layers()
    print("median ms:", _median_ms({"lnorm train": train(m), "nn.LSTM train": train(ref),
                                    "lnorm infer": infer(m), "nn.LSTM infer": infer(ref)}))
    with torch.profiler.profile() as prof:
        for _ in range(3):
            train(m)()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def page_faults() -> None:
    m, ref, train, infer = _layers()
    for name, mod in (("LayerNormLSTM", m), ("nn.LSTM", ref)):
        for mode, make in (("train", train), ("infer", infer)):
            f = make(mod)
            for _ in range(3):
                f()
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(5):
                f()
            per = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 5
            print(f"{name} {mode}: {per:.0f} minor faults per step ({per * 4 / 1024:.1f} MB of 4 KiB pages)")


def products() -> None:
    g = torch.Generator().manual_seed(0)
    N, G, H, I = 3200, 2048, 512, 128
    dgh, hp, w_ih = torch.randn(N, G, generator=g), torch.randn(N, H, generator=g), torch.randn(G, I, generator=g)
    lin = torch.ops.mkldnn._linear_pointwise

    def chunked(impl):
        def f():
            dw = WeightGrad(G, H, 256, torch.float32, impl=impl)
            for lo in range(0, N, 256):
                dw.add(dgh[lo:lo + 256], hp[lo:lo + 256])
            return dw.result()
        return f

    print("median ms:", _median_ms({
        "dW_hh, 13 runs, WeightGrad mm (addmm_)": chunked("mm"),
        "dW_hh, 13 runs, WeightGrad onednn": chunked("onednn"),
        "dW_hh, one torch.mm": lambda: torch.mm(dgh.t(), hp),
        "dW_hh, oneDNN": lambda: lin(dgh.t().contiguous(), hp.t().contiguous(), None, "none", [], ""),
        "dx, torch.mm": lambda: torch.mm(dgh, w_ih),
        "dx, oneDNN": lambda: lin(dgh, w_ih.t().contiguous(), None, "none", [], ""),
    }))


def inference_parts() -> None:
    import os

    from lnorm.ops import _rnn_kernels as K
    from lnorm.ops import brgemm
    from lnorm.ops import rnn_fused as RF
    from lnorm.ops.step_gemm import StepGemm, input_product

    m, ref, _, infer = _layers()
    T, B, I, H = 100, 32, 128, 512
    G, N = 4 * H, T * B
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, I, generator=g)
    w_ih, w_hh = torch.randn(G, I, generator=g) / I**0.5, torch.randn(G, H, generator=g) / H**0.5
    px = input_product(x, w_ih)
    h, gh = torch.randn(B, H, generator=g), torch.randn(B, G, generator=g)
    ones, zeros = torch.ones(G), torch.zeros(G)
    hs, cs, out = torch.zeros(B, H), torch.zeros(B, H), torch.empty(N, H)
    k = RF._consts(np.float32, 1e-5, G, H)
    step = K.builds().lstm_fwd_infer_step
    gemm = StepGemm(w_hh, B)
    args = [t.numpy() for t in (px, ones, ones, zeros, ones[:H], zeros[:H])]
    state = [t.numpy() for t in (hs, cs, out)]
    sched = RF._Schedule([B] * T, False)

    def steps(cached):
        def f():
            for t in range(T):
                step(0 if cached else t * B, 0 if cached else t * B, gh.numpy(), *args, k, *state)
        return f

    def products():
        for _ in range(T):
            gemm.prod(h, gh)

    # the fixed cost of a call of torch's oneDNN op, on a product too small to take any time
    tiny_w = torch.ops.mkldnn._reorder_linear_weight(torch.randn(16, 16, generator=g), 1)
    tiny_h = torch.randn(1, 16, generator=g)

    def tiny_calls():
        for _ in range(T):
            torch.ops.mkldnn._linear_pointwise(tiny_h, tiny_w, None, "none", [], "")

    # nn.LSTM with a 1-wide input: oneDNN's RNN with its input part almost free, so the whole
    # layer's time minus this one is what the input part (W_ih x, K = 128) costs inside oneDNN's
    # fused loop, to compare with the input projection as a separate product
    torch.manual_seed(0)
    ref1 = torch.nn.LSTM(1, H)
    x1 = torch.randn(T, B, 1, generator=g)

    def ref1_infer():
        with torch.no_grad():
            ref1(x1)

    # the layer with its time loop in native code (lnorm.ops.brgemm) by column tile, and run from
    # Python (LNORM_NATIVE_LOOP=0)
    def layer_with(tile=None):
        def f():
            saved, env = RF._NATIVE_TILE, os.environ.get("LNORM_NATIVE_LOOP")
            RF._NATIVE_TILE = tile or saved
            os.environ["LNORM_NATIVE_LOOP"] = "1" if tile else "0"
            try:
                with torch.no_grad():
                    m(xb)
            finally:
                RF._NATIVE_TILE = saved
                os.environ.pop("LNORM_NATIVE_LOOP") if env is None else os.environ.update(LNORM_NATIVE_LOOP=env)
        return f

    xb = x.view(T, B, I)
    native_tiles = {"lnorm layer, time loop from Python": layer_with()}
    if brgemm.available():
        native_tiles.update({f"lnorm layer, native loop, tiles of {t}": layer_with(t) for t in (32, 64, 128, 256)})

    print("median ms:", _median_ms({
        "lnorm layer": infer(m), "nn.LSTM layer": infer(ref), "nn.LSTM layer, 1-wide input": ref1_infer,
        "input projection (all rows)": lambda: input_product(x, w_ih),
        "packing W_hh for the step products (once per call)": lambda: StepGemm(w_hh, B),
        f"{T} per-step products": products,
        f"{T} oneDNN calls on 1 x 16 @ 16 x 16 (the cost of a call)": tiny_calls,
        f"{T} step kernels, W_ih x from memory": steps(False),
        f"{T} step kernels, W_ih x from cache": steps(True),
        **native_tiles,
        "time loop (_lstm_forward, the route the layer takes)": lambda: RF._lstm_forward(
            x, w_ih, hs, cs, w_hh, ones, ones, zeros, ones[:H], zeros[:H], sched, 1e-5, False),
    }, rounds=15))


def batch_split() -> None:
    import ctypes
    import os
    import threading

    from lnorm.ops import _rnn_kernels as K
    from lnorm.ops import rnn_fused as RF
    from lnorm.ops.step_gemm import InputProjection, StepGemm, available

    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp.so.1")
    if not os.path.exists(path) or "onednn" not in available(torch.float32):
        print("part 5 skipped: needs torch's bundled libgomp and oneDNN")
        return
    gomp = ctypes.CDLL(path)
    m, ref, _, infer = _layers()
    T, B, I, H = 100, 32, 128, 512
    G, parts = 4 * H, torch.get_num_threads()
    if B % parts:
        print(f"part 5 skipped: {B} rows do not split over {parts} threads")
        return
    hb = B // parts
    x = torch.randn(T, B, I, generator=torch.Generator().manual_seed(0))
    p = {k: v.detach() for k, v in m.named_parameters()}
    w_ih, w_hh = p["weight_ih_l0"], p["weight_hh_l0"]
    b1 = p["ln_hh_bias_l0"] + p["ln_ih_bias_l0"] + p["bias_ih_l0"] + p["bias_hh_l0"]
    params = [t.contiguous().numpy() for t in (p["ln_ih_weight_l0"], p["ln_hh_weight_l0"], b1,
                                               p["ln_cell_weight_l0"], p["ln_cell_bias_l0"])]
    k = RF._consts(np.float32, m.eps, G, H)
    gemm = StepGemm(w_hh, hb, impl="onednn")  # packed once for hb rows, shared by the threads
    step, block = K._SERIAL.lstm_fwd_infer_step, 8  # steps per block of the input projection

    def split_forward():
        out, hs, cs = torch.empty(T * B, H), torch.zeros(B, H), torch.zeros(B, H)
        errors = []

        def rows(j):
            try:
                # torch sets a new thread's OpenMP thread count at its first query (to
                # torch.set_num_threads's); query first, then lower it for this thread only
                old = torch.get_num_threads()
                gomp.omp_set_num_threads(1)  # this thread's OpenMP regions: one thread
                try:
                    lo = j * hb
                    hv, cv = hs[lo:lo + hb], cs[lo:lo + hb]
                    hn, cn, on = hv.numpy(), cv.numpy(), out.numpy()
                    proj = InputProjection(w_ih, block * hb, torch.float32)
                    for t0 in range(0, T, block):
                        px = proj(x[t0:t0 + block, lo:lo + hb].reshape(-1, I)).numpy()
                        for t in range(t0, min(T, t0 + block)):
                            gh = gemm.prod(hv, None).numpy()
                            step(t * B + lo, (t - t0) * hb, gh, px, *params, k, hn, cn, on)
                finally:
                    gomp.omp_set_num_threads(old)
            except BaseException as e:  # noqa: BLE001 - reported by the caller
                errors.append(e)

        threads = [threading.Thread(target=rows, args=(j,)) for j in range(1, parts)]
        for th in threads:
            th.start()
        rows(0)
        for th in threads:
            th.join()
        if errors:
            raise errors[0]
        return out.view(T, B, H)

    with torch.no_grad():
        diff = (split_forward() - m(x)[0]).abs().max().item()
    print(f"split by rows over {parts} threads: max |difference| from the layer's output {diff:.3g}")

    def layer():
        with torch.no_grad():
            m(x)

    def split():
        with torch.no_grad():
            split_forward()

    print("median ms:", _median_ms({"lnorm layer": layer, f"split over {parts} threads": split,
                                    "nn.LSTM layer": infer(ref)}, rounds=21))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", type=int, nargs="+", default=[1, 2, 3, 4, 5], choices=[1, 2, 3, 4, 5])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("CPU:", cpu_model(), f"threads {args.threads}, torch {torch.__version__}")
    for p in args.part:
        (profile, page_faults, products, inference_parts, batch_split)[p - 1]()


if __name__ == "__main__":
    main()
