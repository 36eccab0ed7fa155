"""Norm ops against PyTorch: LayerNorm, RMSNorm, add+LayerNorm, add+RMSNorm, forward and forward+backward.

For every case, correctness is asserted first (lnorm against the PyTorch equivalent, outputs and
gradients), then lnorm, PyTorch and a same-size elementwise op (``x * 2``, the practical memory
floor: one read and one allocated write) are timed interleaved in one run; the median of several
repeats is reported. ``speedup`` is torch time / lnorm time (above 1: lnorm is faster); GB/s counts
the minimum traffic of the op (reads of x, residual, dy; writes of y, residual, dx).

PyTorch equivalents: ``F.layer_norm``; ``F.rms_norm``; ``s = x + r`` then the norm.

``--device cuda`` times CUDA tensors (lnorm's Triton kernels where triton imports), by default at
4096x4096, 16384x4096 and 8192x8192, synchronizing before every clock read; it adds Liger-Kernel's
layer norm / RMS norm (``x + r`` then the norm for the add ops) when ``liger_kernel`` imports, and
each GB/s as a share of the GPU's peak memory bandwidth (known GPUs, or ``--peak-gbps``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import lnorm
from lnorm import functional as LF
from lnorm.bench.timing import interleaved, unwritable
from lnorm.ops.backend import backend_that_runs
from lnorm.ops.backend import choices as backend_choices
from lnorm.utils import json_safe

OPS = ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm")
MODES = ("fwd", "fwd+bwd")
DEFAULT_SHAPES = ((256, 768), (2048, 768), (8192, 1024), (4096, 4096))
CUDA_SHAPES = ((4096, 4096), (16384, 4096), (8192, 8192))
# Peak memory bandwidth in GB/s by a substring of torch.cuda.get_device_name (vendor figures).
PEAK_GBPS = {"H200": 4800.0}
# "Large" shapes for the GPU bandwidth target: at least this many elements (16384x4096, 8192x8192).
LARGE_ELEMENTS = 1 << 26
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
EPS = 1e-6
# Targets from the issue: (op, mode) -> (kind, bound) on the float32 median over the shape table.
TARGETS = {
    ("layer_norm", "fwd"): ("ratio<=", 1.05),
    ("layer_norm", "fwd+bwd"): ("ratio<=", 1.05),
    ("rms_norm", "fwd+bwd"): ("speedup>=", 3.0),
    ("add_layer_norm", "fwd"): ("speedup>=", 1.25),
    ("add_layer_norm", "fwd+bwd"): ("speedup>=", 1.25),
    ("add_rms_norm", "fwd"): ("speedup>=", 1.25),
    ("add_rms_norm", "fwd+bwd"): ("speedup>=", 1.25),
}
# GPU targets, per (op, mode, dtype) over the shape table: the share of peak bandwidth on the
# large shapes (median), the add + norm against the unfused torch pair, and Liger where it ran.
GPU_PEAK_SHARE = 0.8
GPU_ADD_SPEEDUP = 1.5
GPU_LIGER_SPEEDUP = {"rms_norm", "add_layer_norm", "add_rms_norm"}  # at least as fast as Liger


@dataclass
class Row:
    op: str
    mode: str
    rows: int
    hidden: int
    dtype: str
    lnorm_ms: float
    torch_ms: float
    floor_ms: float
    speedup: float  # torch / lnorm
    lnorm_gbps: float
    floor_gbps: float
    max_abs_err: float  # lnorm against the float64 computation
    device: str = "cpu"
    torch_gbps: float = math.nan
    liger_ms: float = math.nan  # NaN: Liger-Kernel not installed (or not on this device)
    peak_share: float = math.nan  # lnorm GB/s / the GPU's peak; NaN when the peak is unknown


# ---------------------------------------------------------------------------------- the ops


def _lnorm_fn(op, x, r, w, b):
    H = x.shape[-1]
    if op == "layer_norm":
        return (LF.layer_norm(x, H, w, b),)
    if op == "rms_norm":
        return (LF.rms_norm(x, H, w, EPS),)
    if op == "add_layer_norm":
        return LF.add_layer_norm(x, r, H, w, b)
    return LF.add_rms_norm(x, r, H, w, EPS)


def _torch_fn(op, x, r, w, b):
    H = x.shape[-1]
    if op == "layer_norm":
        return (F.layer_norm(x, (H,), w, b),)
    if op == "rms_norm":
        return (F.rms_norm(x, (H,), w, EPS),)
    s = x + r
    if op == "add_layer_norm":
        return F.layer_norm(s, (H,), w, b), s
    return F.rms_norm(s, (H,), w, EPS), s


def _liger_fn(op, x, r, w, b):
    from liger_kernel.transformers.functional import liger_layer_norm, liger_rms_norm

    H = x.shape[-1]
    s = x + r if r is not None else x
    if "layer" in op:
        y = liger_layer_norm(s.view(-1, H), w, b, 1e-5).view(s.shape)
    else:
        y = liger_rms_norm(s.view(-1, H), w, EPS, in_place=False).view(s.shape)
    return (y, s) if r is not None else (y,)


def liger_available() -> bool:
    try:
        import liger_kernel.transformers.functional  # noqa: F401
    except Exception:  # not installed, or an install that does not import: no Liger column
        return False
    return True


def peak_gbps(device: torch.device) -> float | None:
    """The GPU's peak memory bandwidth in GB/s where lnorm knows it, else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_GBPS.items() if k in name), None)


def _traffic_bytes(op: str, mode: str, n: int, itemsize: int) -> int:
    add = op.startswith("add_")
    fwd = (2 + 2 * add) * n  # read x (+ r), write y (+ new residual)
    bwd = (3 + add) * n  # read dy (+ dres) and the saved input, write dx
    return itemsize * (fwd + (bwd if mode == "fwd+bwd" else 0))


def _inputs(op, R, H, dtype, grad, device="cpu"):
    g = torch.Generator(device=device).manual_seed(R * 7919 + H)

    def randn(*size):
        return torch.randn(*size, generator=g, device=device)

    x = randn(R, H).to(dtype)
    r = randn(R, H).to(dtype) if op.startswith("add_") else None
    w = (1 + 0.1 * randn(H)).to(dtype)
    b = (0.1 * randn(H)).to(dtype) if "layer" in op else None
    leaves = [t for t in (x, r, w, b) if t is not None]
    for t in leaves:
        t.requires_grad_(grad)
    dys = [randn(R, H).to(dtype) for _ in range(2 if r is not None else 1)]
    return x, r, w, b, leaves, dys


def _make_call(fn, op, mode, x, r, w, b, leaves, dys):
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return fn(op, x, r, w, b)
    else:
        def call():
            outs = fn(op, x, r, w, b)
            return torch.autograd.grad(outs, leaves, dys)
    return call


def _max_err(a, b) -> float:
    # in float64: a float32 difference would hide float64 errors below its rounding step and report
    # a one-bit float64 difference as 1e-7
    return max((p.double() - q.double()).abs().max().item() if p.numel() else 0.0 for p, q in zip(a, b, strict=True))


def _check(op, mode, x, r, w, b, leaves, dys, dtype) -> float:
    """Assert lnorm is right before timing it; returns lnorm's max abs error against float64.

    The bar is PyTorch's own error in the same dtype against float64 (doubled, plus a small
    absolute term): in bfloat16 the weight gradient sums thousands of rounded products, so
    neither lnorm nor torch is close to the exact value, and comparing the two directly would
    measure torch's rounding as much as lnorm's.
    """
    def as64(t):
        return None if t is None else t.detach().double().requires_grad_(t.requires_grad)

    x64, r64, w64, b64 = (as64(t) for t in (x, r, w, b))
    leaves64 = [t for t in (x64, r64, w64, b64) if t is not None]
    dys64 = [d.double() for d in dys]
    def outputs(fn, *args):
        # the forward's outputs, and in fwd+bwd the gradients too (a wrong forward kernel must not
        # pass behind right gradients: lnorm's forward and backward are separate kernels)
        got = tuple(_make_call(fn, op, "fwd", *args)())
        return got if mode == "fwd" else got + tuple(_make_call(fn, op, mode, *args)())

    ours = outputs(_lnorm_fn, x, r, w, b, leaves, dys)
    theirs = outputs(_torch_fn, x, r, w, b, leaves, dys)
    exact = outputs(_torch_fn, x64, r64, w64, b64, leaves64, dys64)
    err = _max_err(ours, exact)
    torch_err = _max_err(theirs, exact)
    scale = max(1.0, max(t.abs().max().item() for t in exact if t.numel()))
    atol = {torch.float32: 1e-5, torch.float64: 1e-12}.get(dtype, 1e-2) * scale
    if not err <= 2 * torch_err + atol:
        raise AssertionError(f"lnorm {op} {mode} {tuple(x.shape)} {dtype}: max abs error {err:.3g} "
                             f"against float64 exceeds 2 x torch's ({torch_err:.3g}) + {atol:.3g}; "
                             "not timing a wrong result")
    return err


def bench_case(op, mode, R, H, dtype_name, repeats, device="cpu", peak=None, liger=False) -> Row:
    """One case: check lnorm, then time lnorm, torch, the floor (and Liger) interleaved."""
    dtype = DTYPES[dtype_name]
    device = torch.device(device)
    x, r, w, b, leaves, dys = _inputs(op, R, H, dtype, grad=(mode == "fwd+bwd"), device=device)
    err = _check(op, mode, x, r, w, b, leaves, dys, dtype)
    xf = x.detach()
    fns = {
        "lnorm": _make_call(_lnorm_fn, op, mode, x, r, w, b, leaves, dys),
        "torch": _make_call(_torch_fn, op, mode, x, r, w, b, leaves, dys),
        "floor": lambda: torch.mul(xf, 2),
    }
    if liger and dtype in (torch.float32, torch.bfloat16, torch.float16):
        liger_call = _make_call(_liger_fn, op, mode, x, r, w, b, leaves, dys)
        try:
            liger_call()
        except Exception as exc:  # a Liger version with another signature: report, don't fail
            print(f"liger skipped for {op} {mode} {R}x{H} {dtype_name}: {exc!r}", file=sys.stderr)
        else:
            fns["liger"] = liger_call
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    timings = interleaved(fns, repeats=repeats, sync=sync)
    t_l, t_t, t_f = (timings[k]["median"] for k in ("lnorm", "torch", "floor"))
    n = R * H
    item = torch.empty(0, dtype=dtype).element_size()
    traffic = _traffic_bytes(op, mode, n, item)
    return Row(
        op=op, mode=mode, rows=R, hidden=H, dtype=dtype_name,
        lnorm_ms=t_l * 1e3, torch_ms=t_t * 1e3, floor_ms=t_f * 1e3, speedup=t_t / t_l,
        lnorm_gbps=traffic / t_l / 1e9,
        floor_gbps=2 * n * item / t_f / 1e9, max_abs_err=err,
        device=device.type, torch_gbps=traffic / t_t / 1e9,
        liger_ms=timings["liger"]["median"] * 1e3 if "liger" in timings else math.nan,
        peak_share=traffic / t_l / 1e9 / peak if peak else math.nan,
    )


# ------------------------------------------------------------------------------------- report


def summarize(rows: list[Row]) -> list[dict]:
    """Median speedup per (op, mode, dtype) over the shapes, with the issue's targets where they exist."""
    out = []
    keys = sorted({(r.op, r.mode, r.dtype) for r in rows}, key=lambda k: (OPS.index(k[0]), MODES.index(k[1]), k[2]))
    for op, mode, dtype in keys:
        sel = [r for r in rows if (r.op, r.mode, r.dtype) == (op, mode, dtype)]
        sp = statistics.median(r.speedup for r in sel)
        entry = {"op": op, "mode": mode, "dtype": dtype, "median_speedup": sp, "median_ratio": 1 / sp}
        if all(r.device == "cuda" for r in sel):
            entry.update(_gpu_verdicts(op, sp, sel))
            out.append(entry)
            continue
        target = TARGETS.get((op, mode)) if dtype == "float32" else None
        if target:
            kind, bound = target
            entry["target"] = f"{kind}{bound}"
            entry["meets_target"] = (1 / sp <= bound) if kind == "ratio<=" else (sp >= bound)
        out.append(entry)
    return out


def _gpu_verdicts(op: str, speedup: float, sel: list[Row]) -> dict:
    """The GPU targets for one (op, mode, dtype): ``targets`` maps each one that applies to met/not."""
    entry: dict = {"targets": {}}
    large = [r for r in sel if r.rows * r.hidden >= LARGE_ELEMENTS and not math.isnan(r.peak_share)]
    if large:
        share = statistics.median(r.peak_share for r in large)
        entry["median_peak_share_large"] = share
        entry["targets"][f"peak_share>={GPU_PEAK_SHARE}"] = share >= GPU_PEAK_SHARE
    if op.startswith("add_"):
        entry["targets"][f"speedup>={GPU_ADD_SPEEDUP}"] = speedup >= GPU_ADD_SPEEDUP
    with_liger = [r for r in sel if not math.isnan(r.liger_ms)]
    if with_liger:
        liger_sp = statistics.median(r.liger_ms / r.lnorm_ms for r in with_liger)
        entry["median_liger_speedup"] = liger_sp
        if op in GPU_LIGER_SPEEDUP:
            entry["targets"]["liger_speedup>=1.0"] = liger_sp >= 1.0
    return entry


def format_table(rows: list[Row], summary: list[dict]) -> str:
    gpu = any(r.device == "cuda" for r in rows)
    head = (f"{'op':<15}{'mode':<9}{'shape':>11} {'dtype':<9}{'lnorm ms':>10}{'torch ms':>10}"
            f"{'speedup':>9}{'GB/s':>8}{'floor GB/s':>12}")
    if gpu:
        head += f"{'torch GB/s':>12}{'% peak':>8}{'liger ms':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        line = (f"{r.op:<15}{r.mode:<9}{f'{r.rows}x{r.hidden}':>11} {r.dtype:<9}{r.lnorm_ms:>10.3f}"
                f"{r.torch_ms:>10.3f}{r.speedup:>8.2f}x{r.lnorm_gbps:>8.1f}{r.floor_gbps:>12.1f}")
        if gpu:
            share = "-" if math.isnan(r.peak_share) else f"{100 * r.peak_share:.0f}%"
            liger = "-" if math.isnan(r.liger_ms) else f"{r.liger_ms:.3f}"
            line += f"{r.torch_gbps:>12.1f}{share:>8}{liger:>10}"
        lines.append(line)
    lines += ["", "median over shapes (speedup = torch time / lnorm time; ratio = its inverse):"]
    for s in summary:
        verdict = ""
        if "target" in s:
            verdict = f"  target {s['target']}: {'met' if s['meets_target'] else 'MISSED'}"
        if "median_peak_share_large" in s:
            verdict += f"  peak share (large shapes) {100 * s['median_peak_share_large']:.0f}%"
        if "median_liger_speedup" in s:
            verdict += f"  vs liger {s['median_liger_speedup']:.2f}x"
        for name, met in s.get("targets", {}).items():
            verdict += f"  {name}: {'met' if met else 'MISSED'}"
        lines.append(f"  {s['op']:<15}{s['mode']:<9}{s['dtype']:<9} speedup {s['median_speedup']:.2f}x "
                     f"(ratio {s['median_ratio']:.2f}){verdict}")
    return "\n".join(lines)


def environment(device: torch.device | None = None, peak: float | None = None) -> dict:
    device = device or torch.device("cpu")
    env = {
        "lnorm": lnorm.__version__, "torch": torch.__version__, "python": platform.python_version(),
        "backend": lnorm.get_backend(device), "threads": torch.get_num_threads(), "machine": platform.machine(),
        "device": device.type,
    }
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda, peak_gbps=peak,
                   triton=_version("triton"), liger_kernel=_version("liger_kernel"))
    return env


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # not installed
        return None


# ---------------------------------------------------------------------------------------- CLI


def _shape(text: str) -> tuple[int, int]:
    try:
        r, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like ROWSxHIDDEN (e.g. 2048x768), got {text!r}") from None
    if r < 1 or h < 1:
        raise argparse.ArgumentTypeError(f"shape sizes must be positive, got {text!r}")
    return r, h


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS), help="which ops (default: all)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="fwd and/or fwd+bwd")
    p.add_argument("--shapes", nargs="+", type=_shape, default=None,
                   help="ROWSxHIDDEN shapes (default: 256x768 2048x768 8192x1024 4096x4096 on the CPU, "
                        "4096x4096 16384x4096 8192x8192 on CUDA)")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=7, help="timed repeats per case; the median is reported")
    p.add_argument("--backend", choices=backend_choices(), default=None,
                   help="lnorm backend to time (default: LNORM_BACKEND or auto)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the tensors live (cuda: the first GPU; synchronized timing)")
    p.add_argument("--peak-gbps", type=float, default=None,
                   help="the GPU's peak memory bandwidth in GB/s for the share-of-peak column "
                        "(default: known for H200, 4800)")
    p.add_argument("--no-liger", action="store_true", help="do not time Liger-Kernel even if it imports")
    p.add_argument("--json", metavar="FILE", help="also write rows, summary and environment as JSON")


def run(args: argparse.Namespace) -> int:
    if args.repeats < 1:
        print(f"error: --repeats must be >= 1, got {args.repeats}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    if args.peak_gbps is not None and not args.peak_gbps > 0:
        print(f"error: --peak-gbps must be > 0, got {args.peak_gbps}", file=sys.stderr)
        return 2
    if args.json and (why := unwritable(args.json)):
        print(f"error: --json: {why}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if args.backend:
        try:
            ran = backend_that_runs(args.backend, device)
        except (RuntimeError, ValueError) as exc:
            print(f"error: --backend {args.backend}: {exc}", file=sys.stderr)
            return 2
        if args.backend != "auto" and ran != args.backend:  # else it would time another backend under its name
            print(f"error: --backend {args.backend} does not run on --device {args.device} here (lnorm would "
                  f"run {ran})", file=sys.stderr)
            return 2
        lnorm.set_backend(args.backend)
    shapes = args.shapes or list(CUDA_SHAPES if device.type == "cuda" else DEFAULT_SHAPES)
    peak = args.peak_gbps or peak_gbps(device)
    liger = device.type == "cuda" and not args.no_liger and liger_available()
    cases = [(op, mode, R, H, dt) for dt in args.dtypes for op in args.ops for mode in args.modes
             for R, H in shapes]
    env = environment(device, peak)
    print(f"lnorm bench ops: {len(cases)} cases on {env.get('gpu', device.type)}, backend {env['backend']}, "
          f"torch {env['torch']}, {env['threads']} threads, median of {args.repeats} interleaved repeats"
          f"{', with Liger-Kernel' if liger else ''}", flush=True)
    try:
        from tqdm import tqdm

        it = tqdm(cases, desc="bench ops", unit="case", file=sys.stderr, leave=False)
    except ImportError:  # progress bars are optional in the core install
        it = cases
    rows, errors = [], []
    for case in it:
        try:
            rows.append(bench_case(*case, repeats=args.repeats, device=device, peak=peak, liger=liger))
        except Exception as exc:  # a wrong result or a failing kernel: report it, time the rest
            errors.append({"case": list(case), "error": repr(exc)})
            print(f"FAILED {case}: {exc!r}", file=sys.stderr, flush=True)
        if args.json:  # after every case, so a run cut short still leaves its rows
            _write_json(args.json, env, rows, None, errors)
    summary = summarize(rows)
    print(format_table(rows, summary))
    if args.json:
        _write_json(args.json, env, rows, summary, errors)
        print(f"wrote {args.json}")
    if errors:
        print(f"{len(errors)} of {len(cases)} cases failed (see above)", file=sys.stderr)
        return 1
    return 0


def _write_json(path, env, rows, summary, errors) -> None:
    result = {"environment": env, "rows": [asdict(r) for r in rows], "summary": summary,
              "errors": errors, "complete": summary is not None}
    with open(path, "w") as f:
        json.dump(json_safe(result), f, indent=2)
