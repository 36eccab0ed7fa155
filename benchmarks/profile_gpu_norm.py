"""Where the time of a GPU norm op goes: torch.profiler over lnorm's and torch's forward + backward.

    PYTHONPATH=src python3 benchmarks/profile_gpu_norm.py [--op layer_norm] [--shape 16384 4096] [--dtype bfloat16]

Prints, for lnorm and for torch, the median wall time of one forward + backward (synchronized),
the GPU time of every kernel and the CPU time of the Python-side calls: which share is kernels
and which is launch overhead. Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import lnorm.functional as LF


def step_fn(impl: str, op: str, x, r, w, b, dy):
    H = x.shape[-1]

    def step():
        if impl == "lnorm":
            if op == "layer_norm":
                y = LF.layer_norm(x, H, w, b)
            elif op == "rms_norm":
                y = LF.rms_norm(x, H, w)
            else:
                y, _ = (LF.add_layer_norm if op == "add_layer_norm" else LF.add_rms_norm)(
                    x, r, H, w, *([b] if op == "add_layer_norm" else []))
        else:
            s = x if op in ("layer_norm", "rms_norm") else x + r
            y = F.layer_norm(s, (H,), w, b) if "layer" in op else F.rms_norm(s, (H,), w)
        leaves = [t for t in (x, r, w, b) if t is not None and t.requires_grad]
        return torch.autograd.grad(y, leaves, dy)

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--op", default="layer_norm", choices=("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"))
    p.add_argument("--shape", type=int, nargs=2, default=(16384, 4096))
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--rows", type=int, default=12, help="profiler table rows")
    a = p.parse_args()
    dt = getattr(torch, a.dtype)
    R, H = a.shape
    dev = "cuda"
    x = torch.randn(R, H, device=dev, dtype=dt, requires_grad=True)
    r = torch.randn(R, H, device=dev, dtype=dt, requires_grad=True) if a.op.startswith("add") else None
    w = torch.rand(H, device=dev, dtype=dt, requires_grad=True)
    b = torch.randn(H, device=dev, dtype=dt, requires_grad=True) if "layer" in a.op else None
    dy = torch.randn(R, H, device=dev, dtype=dt)
    for impl in ("lnorm", "torch"):
        step = step_fn(impl, a.op, x, r, w, b, dy)
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        # CPU time of the calls alone: launch without waiting, 20 in a row
        t0 = time.perf_counter()
        for _ in range(20):
            step()
        cpu_ms = (time.perf_counter() - t0) / 20 * 1e3
        torch.cuda.synchronize()
        print(f"== {impl} {a.op} {R}x{H} {a.dtype}: wall {statistics.median(times) * 1e3:.3f} ms "
              f"per fwd+bwd (median of 20), host-side issue time {cpu_ms:.3f} ms per step")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=a.rows, max_name_column_width=60))
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=a.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
