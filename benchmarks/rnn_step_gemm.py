"""LayerNormLSTM / LayerNormGRU with each per-step GEMM forced, against torch's layer, interleaved.

    PYTHONPATH=src python3 benchmarks/rnn_step_gemm.py [--cells lstm,gru] [--repeats 9] [--threads 2]

For each cell and mode (training step, inference), one process times torch's layer and lnorm's
layer with the per-step products forced to each implementation (``mkl``, ``onednn``, ``mm``) and
left to the measured choice (``auto``), in turn (A B C ... A B C ...); forcing one forces the input
projection and the weight gradients too (``onednn``, or ``torch.mm`` for ``mkl`` and ``mm``). It
prints the median of
the per-round ratios lnorm / torch: on a shared machine a slow moment hits every candidate of a
round alike. Shows whether the choice ``lnorm.ops.step_gemm`` made here is the fastest for the
whole layer, and by how much. B=32, T=100, I=128, H=512, float32 unless told otherwise.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from lnorm.bench.rnn import gemm_lines
from lnorm.nn import LayerNormGRU, LayerNormLSTM
from lnorm.ops.step_gemm import available, step_gemm_choices, use_step_gemm


def _step(m, x, train: bool, impl: str | None):
    def f():
        with use_step_gemm(impl):
            if train:
                m(x)[0].sum().backward()
            else:
                with torch.no_grad():
                    m(x)
    return f


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", default="lstm,gru")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shape", type=int, nargs=4, default=(32, 100, 128, 512), metavar=("B", "T", "I", "H"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    B, T, I, H = args.shape
    x = torch.randn(T, B, I)
    for cell in args.cells.split(","):
        ref = (nn.LSTM if cell == "lstm" else nn.GRU)(I, H)
        ours = (LayerNormLSTM if cell == "lstm" else LayerNormGRU)(I, H)
        for train in (True, False):
            fns = {"torch": _step(ref, x, train, None)}
            fns.update({impl: _step(ours, x, train, impl) for impl in (*available(torch.float32), "auto")})
            for f in fns.values():
                f()
            samples = {k: [] for k in fns}
            for _ in range(args.repeats):
                for k, f in fns.items():
                    t0 = time.perf_counter()
                    f()
                    samples[k].append(time.perf_counter() - t0)
            t_ms = statistics.median(samples["torch"]) * 1e3
            ratios = {k: statistics.median(a / b for a, b in zip(samples[k], samples["torch"], strict=True))
                      for k in fns if k != "torch"}
            print(f"{cell} {'train' if train else 'infer'}: torch {t_ms:.1f} ms; lnorm / torch "
                  + ", ".join(f"{k} {r:.2f}x" for k, r in ratios.items()), flush=True)
    for line in gemm_lines(step_gemm_choices()):
        print("chosen:", line)


if __name__ == "__main__":
    main()
