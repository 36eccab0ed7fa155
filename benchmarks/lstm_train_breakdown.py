"""Where a LayerNormLSTM training step's time goes on this CPU (issue 15's leads), in three parts:

1. ``torch.profiler`` over three training steps of LayerNormLSTM(128, 512) on (100, 32, 128):
   self time per op (oneDNN per-step products, weight-gradient ``addmm_``, the fused autograd
   Functions, copies), after median step times of lnorm and ``nn.LSTM`` (interleaved, 9 rounds);
2. minor page faults per training and inference step of both layers (``resource.getrusage``):
   compare with ``MALLOC_MMAP_THRESHOLD_=4000000000 MALLOC_TRIM_THRESHOLD_=8000000000`` set, which
   keeps freed memory in the process;
3. the backward's big products alone: dW_hh summed over 13 runs of 256 rows by ``WeightGrad``
   with each library forced (the fused path takes the one it measured faster), one ``torch.mm``,
   oneDNN (with transposed copies); the input gradient by ``torch.mm`` and oneDNN.

    PYTHONPATH=src python benchmarks/lstm_train_breakdown.py [--part 1 2 3]

Run it on a quiet machine; the CPU is printed first.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("CPU:", cpu_model(), f"threads {args.threads}, torch {torch.__version__}")
    for p in args.part:
        (profile, page_faults, products)[p - 1]()


if __name__ == "__main__":
    main()
