"""Measure the Triton norm kernels' launch settings on a GPU, to choose them from numbers.

    PYTHONPATH=src python3 benchmarks/triton_launch_sweep.py --json sweep.json

Two settings of ``lnorm.ops._triton_norm`` are swept, each alone, the other at its default:
``BWD_PROGRAMS_PER_SM`` (backward: more programs hide latency, each adds a row of partial
weight/bias sums) and the warps per row of the forward and backward kernels (``_num_warps``).
For each (op, dtype, shape) every setting is timed interleaved (median of ``--repeats``) and
reported in GB/s of the kernel's own traffic. Nothing is changed in the library: the numbers are
for a person to read (benchmarks/gpu_check.sh runs this with what is left of its budget).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from lnorm.bench.timing import interleaved
from lnorm.ops import _triton_norm as T

SHAPES = ((4096, 4096), (16384, 4096), (8192, 8192))
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
PROGRAMS_PER_SM = (1, 2, 4, 8)
WARPS = (4, 8, 16, 32)


def _case(center: bool, R: int, H: int, dtype: torch.dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(R, H, device="cuda", generator=g).to(dtype)
    w = torch.randn(H, device="cuda", generator=g)
    b = torch.randn(H, device="cuda", generator=g) if center else None
    dy = torch.randn(R, H, device="cuda", generator=g).to(dtype)
    y, _, mean, rstd = T.norm_fwd(x, None, w, b, 1e-5, center, dtype)
    fwd = lambda: T.norm_fwd(x, None, w, b, 1e-5, center, dtype)  # noqa: E731
    bwd = lambda: T.norm_bwd(dy, x, w, mean, rstd, center, True, center, None)  # noqa: E731
    item = x.element_size()
    return fwd, bwd, 2 * R * H * item, 3 * R * H * item  # bytes: fwd x, y; bwd dy, x, dx


def _timed(fns: dict, repeats: int) -> dict:
    return {k: v["median"] for k, v in interleaved(fns, repeats=repeats, sync=torch.cuda.synchronize).items()}


def sweep(center: bool, R: int, H: int, dtype_name: str, repeats: int) -> list[dict]:
    fwd, bwd, fwd_bytes, bwd_bytes = _case(center, R, H, DTYPES[dtype_name])
    base = {"op": "layer_norm" if center else "rms_norm", "rows": R, "hidden": H, "dtype": dtype_name}
    rows = []
    default_pps, default_warps = T.BWD_PROGRAMS_PER_SM, T._num_warps
    try:
        calls = {}
        for pps in PROGRAMS_PER_SM:
            def call(pps=pps):
                T.BWD_PROGRAMS_PER_SM = pps
                return bwd()
            calls[pps] = call
        for pps, t in _timed(calls, repeats).items():
            rows.append({**base, "kernel": "bwd", "programs_per_sm": pps, "ms": t * 1e3, "gbps": bwd_bytes / t / 1e9})
        T.BWD_PROGRAMS_PER_SM = default_pps
        for kernel, fn, nbytes in (("fwd", fwd, fwd_bytes), ("bwd", bwd, bwd_bytes)):
            calls = {}
            for warps in WARPS:
                def call(warps=warps, fn=fn):
                    T._num_warps = lambda block: warps
                    return fn()
                calls[warps] = call
            for warps, t in _timed(calls, repeats).items():
                rows.append({**base, "kernel": kernel, "num_warps": warps, "ms": t * 1e3, "gbps": nbytes / t / 1e9})
    finally:
        T.BWD_PROGRAMS_PER_SM, T._num_warps = default_pps, default_warps
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per setting (median reported)")
    p.add_argument("--json", metavar="FILE", help="write the rows as JSON (after every case)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or T.INTERPRETED:
        print("error: needs a CUDA device and the compiled kernels (TRITON_INTERPRET unset or 0)", file=sys.stderr)
        return 2
    print(f"defaults: BWD_PROGRAMS_PER_SM={T.BWD_PROGRAMS_PER_SM}, warps by row width "
          f"{[(b, T._num_warps(b)) for b in (1024, 4096, 8192)]}; GPU {torch.cuda.get_device_name()}")
    rows = []
    for dtype_name in DTYPES:
        for R, H in SHAPES:
            for center in (True, False):
                new = sweep(center, R, H, dtype_name, args.repeats)
                rows += new
                for r in new:
                    setting = f"programs/SM {r['programs_per_sm']}" if "programs_per_sm" in r else f"warps {r['num_warps']}"
                    print(f"{r['op']:<11}{r['kernel']:<4}{r['dtype']:<9}{r['rows']:>6}x{r['hidden']:<6}"
                          f"{setting:<16}{r['ms']:>8.3f} ms{r['gbps']:>8.0f} GB/s", flush=True)
                if args.json:
                    with open(args.json, "w") as f:
                        json.dump({"gpu": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
