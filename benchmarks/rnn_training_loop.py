"""Training steps of one recurrent layer alone in its process, as a training loop runs them.

``lnorm bench rnn`` interleaves torch's layer, lnorm's and the naive cell in one process, so each
one's freed memory is reused by the next one's allocations. A training loop of one model frees
and allocates the same tensors at every step, and glibc hands the freed memory back to the system
in between: what a step saves for backward is then faulted in and zeroed again at every step. This
script times that case: each of torch's layer, lnorm's with its pool of saved buffers
(``lnorm.ops.saved_buffers``) and lnorm's without it (``LNORM_SAVED_BUFFER_CACHE_MB=0``) runs 25
steps (``zero_grad(set_to_none=True)``, forward, ``output.sum().backward()``, an SGD step) in a
fresh process, in turns, ``--rounds`` times; it prints the median step time of the last 20 steps
of each process.

    PYTHONPATH=src python benchmarks/rnn_training_loop.py [--cells lstm gru] [--rounds 3]

Main case: B=32, T=100, input 128, hidden 512, float32, 2 threads.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time


def _one(cell: str, impl: str, steps: int = 25) -> float:
    import torch

    torch.set_num_threads(2)
    torch.manual_seed(0)
    if impl == "torch":
        m = (torch.nn.LSTM if cell == "lstm" else torch.nn.GRU)(128, 512)
    else:
        import lnorm

        m = (lnorm.LayerNormLSTM if cell == "lstm" else lnorm.LayerNormGRU)(128, 512)
    x = torch.randn(100, 32, 128)
    opt = torch.optim.SGD(m.parameters(), lr=1e-3)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out, _ = m(x)
        out.sum().backward()
        opt.step()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times[5:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", nargs="+", default=["lstm", "gru"], choices=["lstm", "gru"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", nargs=2, metavar=("CELL", "IMPL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(f"{_one(*args.child):.2f}")
        return
    from lnorm.utils import cpu_model

    print("CPU:", cpu_model(), "torch threads 2")
    impls = {"torch": {}, "lnorm": {}, "lnorm, pool off": {"LNORM_SAVED_BUFFER_CACHE_MB": "0"}}
    for cell in args.cells:
        res = {name: [] for name in impls}
        for _ in range(args.rounds):
            for name, env in impls.items():
                impl = "torch" if name == "torch" else "lnorm"
                out = subprocess.run([sys.executable, __file__, "--child", cell, impl], env={**os.environ, **env},
                                     capture_output=True, text=True, check=True)
                res[name].append(float(out.stdout.strip()))
        line = ", ".join(f"{name} {statistics.median(v):.1f} ms ({min(v):.1f}-{max(v):.1f})" for name, v in res.items())
        print(f"{cell} training step, median of {args.rounds} processes (range): {line}")


if __name__ == "__main__":
    main()
