"""LayerNormLSTM / LayerNormGRU against torch's nn.LSTM / nn.GRU and a straightforward LN cell.

Three candidates per case, timed interleaved in one run (median of ``--repeats``):

* ``torch``: ``nn.LSTM`` / ``nn.GRU`` of the same size (no normalization; the reference speed);
* ``lnorm``: ``LayerNormLSTM`` / ``LayerNormGRU`` (the paper's equations, current backend);
* ``naive``: the straightforward implementation, a cell with ``nn.LayerNorm`` calls (three for the
  LSTM, four for the GRU) in a Python loop over time.

In the main case a fourth timing, ``matmul``, runs only the matrix products such a layer must
compute (the input projection for all steps, one recurrent product per step, and in training
their backward: per step the product for the previous h, then the two weight gradients; the input
does not require grad here, so no input gradient), with the same GEMM calls lnorm's fast path
uses; it is a floor no implementation of these equations gets under, and shows how much of each
time is the elementwise work.

Correctness first: ``naive`` gets ``lnorm``'s weights, and lnorm's output must be within
float32's worst-case rounding over T steps of a float64 run of the same layer. Modes: ``train``
(forward + backward of ``output.sum()``) and ``infer`` (forward under ``no_grad``). ``saved MB``
counts the bytes of the unique storages autograd keeps for backward (saved-tensor hooks).
``--runs N`` repeats the whole measurement N times in the process (a shared machine moves the
ratios between runs more than the repeats within one show) and ends with each ratio's range and
median over the runs, and in how many runs each target held.
Cases: the main one (``--batch --seq-len --input-size --hidden-size``, 1 layer), 2 layers
bidirectional, and a packed batch of mixed lengths (uniform between T/4 and T).
The header names the CPU, the vector instructions in use (``lnorm.utils.instruction_sets``: a run
with ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
NUMBA_CPU_NAME=haswell`` times an AVX2 CPU on an AVX-512 one, and says so), and each GEMM choice.
``--device cuda`` runs every candidate on the GPU (``torch`` is then cuDNN; timing synchronizes
before every clock read; the matmul floor uses plain ``torch.mm``); lnorm's recurrent layers take
their fused Triton path there where triton imports, else their pure-torch path.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import lnorm
from lnorm.bench.timing import interleaved, unwritable
from lnorm.nn.rnn import LayerNormGRU, LayerNormLSTM
from lnorm.utils import cpu_model, instruction_sets  # cpu_model: shared with the lab's env.json

# Targets from issue 15 (main case, float32, on Intel and AMD x86 CPUs): lnorm/torch time and
# saved-memory ratios, and the speedup over the naive implementation.
TARGETS = {"train": 1.0, "infer": 1.25, "naive_speedup": 2.0, "saved_ratio": 2.0}
# the main case (issue 15's) and the repeats, unless told otherwise
_DEFAULTS = {"batch": 32, "seq_len": 100, "input_size": 128, "hidden_size": 512, "repeats": 7}


@dataclass
class Row:
    cell: str
    case: str
    mode: str
    torch_ms: float
    lnorm_ms: float
    naive_ms: float
    matmul_ms: float  # the layer's matrix products alone (main case only; NaN elsewhere)
    vs_torch: float  # lnorm / torch (below 1: lnorm is faster)
    vs_naive: float  # naive / lnorm (above 1: lnorm is faster)
    torch_saved_mb: float
    lnorm_saved_mb: float
    naive_saved_mb: float


# ------------------------------------------------------------------------------- the baseline


class NaiveLNLSTM(nn.Module):
    """The straightforward LN-LSTM: per step three ``nn.LayerNorm`` calls in a Python loop."""

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        H = hidden_size
        self.ih = nn.Linear(input_size, 4 * H)
        self.hh = nn.Linear(H, 4 * H)
        self.ln_ih, self.ln_hh, self.ln_c = nn.LayerNorm(4 * H), nn.LayerNorm(4 * H), nn.LayerNorm(H)

    def forward(self, x):  # (T, B, I) -> (T, B, H)
        T, B, _ = x.shape
        H = self.hh.in_features
        h = c = x.new_zeros(B, H)
        outs = []
        bias = self.ih.bias + self.hh.bias
        for t in range(T):
            gates = self.ln_ih(F.linear(x[t], self.ih.weight)) + self.ln_hh(F.linear(h, self.hh.weight)) + bias
            i, f, g, o = gates.chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(self.ln_c(c))
            outs.append(h)
        return torch.stack(outs), (h, c)


class NaiveLNGRU(nn.Module):
    """The straightforward LN-GRU: per step four ``nn.LayerNorm`` calls in a Python loop."""

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        H = hidden_size
        self.ih = nn.Linear(input_size, 3 * H)
        self.hh = nn.Linear(H, 3 * H)
        self.ln_ih_rz, self.ln_hh_rz = nn.LayerNorm(2 * H), nn.LayerNorm(2 * H)
        self.ln_ih_n, self.ln_hh_n = nn.LayerNorm(H), nn.LayerNorm(H)

    def forward(self, x):
        T, B, _ = x.shape
        H = self.hh.in_features
        h = x.new_zeros(B, H)
        outs = []
        b_ih, b_hh = self.ih.bias, self.hh.bias
        for t in range(T):
            gx = F.linear(x[t], self.ih.weight)
            gh = F.linear(h, self.hh.weight)
            rz = torch.sigmoid(self.ln_ih_rz(gx[:, : 2 * H]) + self.ln_hh_rz(gh[:, : 2 * H]) + b_ih[: 2 * H] + b_hh[: 2 * H])
            r, z = rz.chunk(2, 1)
            n = torch.tanh(self.ln_ih_n(gx[:, 2 * H :]) + b_ih[2 * H :] + r * (self.ln_hh_n(gh[:, 2 * H :]) + b_hh[2 * H :]))
            h = (1 - z) * n + z * h
            outs.append(h)
        return torch.stack(outs), h


def _copy_to_naive(naive: nn.Module, m: nn.Module, cell: str) -> None:
    H = m.hidden_size
    with torch.no_grad():
        naive.ih.weight.copy_(m.weight_ih_l0)
        naive.ih.bias.copy_(m.bias_ih_l0)
        naive.hh.weight.copy_(m.weight_hh_l0)
        naive.hh.bias.copy_(m.bias_hh_l0)
        if cell == "lstm":
            naive.ln_ih.weight.copy_(m.ln_ih_weight_l0)
            naive.ln_ih.bias.copy_(m.ln_ih_bias_l0)
            naive.ln_hh.weight.copy_(m.ln_hh_weight_l0)
            naive.ln_hh.bias.copy_(m.ln_hh_bias_l0)
            naive.ln_c.weight.copy_(m.ln_cell_weight_l0)
            naive.ln_c.bias.copy_(m.ln_cell_bias_l0)
        else:
            for part, ln_rz, ln_n in (("ih", naive.ln_ih_rz, naive.ln_ih_n), ("hh", naive.ln_hh_rz, naive.ln_hh_n)):
                w, b = getattr(m, f"ln_{part}_weight_l0"), getattr(m, f"ln_{part}_bias_l0")
                ln_rz.weight.copy_(w[: 2 * H])
                ln_rz.bias.copy_(b[: 2 * H])
                ln_n.weight.copy_(w[2 * H :])
                ln_n.bias.copy_(b[2 * H :])


# ----------------------------------------------------------------------------------- measure


def _output(res):
    out = res[0]
    return out.data if isinstance(out, PackedSequence) else out


def saved_bytes(fn) -> int:
    """Bytes of the unique storages autograd saves for backward while ``fn()`` runs."""
    storages: dict[int, int] = {}

    def pack(t):
        try:
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def _randomize_ln(m: nn.Module) -> None:
    # non-trivial LN parameters, so the correctness check can catch a swapped or missing one
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith("ln_"):
                p.add_(0.1 * torch.randn_like(p))


def matmul_floor(cell: str, B: int, T: int, I: int, H: int, train: bool, device: str = "cpu"):
    """A callable doing only the matrix products of one layer over (T, B, I) input (see above)."""
    try:
        if device != "cpu":
            raise ImportError  # the packed GEMMs are a CPU thing
        from lnorm.ops.rnn_fused import backward_run_rows
        from lnorm.ops.step_gemm import StepGemm, WeightGrad, input_product
    except ImportError:  # no Numba (or a GPU): the layer's torch path uses plain matmuls
        backward_run_rows, WeightGrad, input_product = None, None, F.linear

        def StepGemm(w, batch):
            return lambda a: torch.mm(a, w.t())

    G = (4 if cell == "lstm" else 3) * H
    N = B * T
    g = torch.Generator().manual_seed(0)
    x, w_ih, w_hh = (torch.randn(*s, generator=g).to(device) for s in ((N, I), (G, I), (G, H)))
    h, dg, hs = (torch.randn(*s, generator=g).to(device) for s in ((B, H), (N, G), (N, H)))

    # the GRU's input products come in two groups (r, z and n), as in the fused path
    groups = [(0, G)] if cell == "lstm" else [(0, 2 * H), (2 * H, G)]
    dg_groups = [dg[:, lo:hi].contiguous() for lo, hi in groups]  # each group's own gradient tensor

    def weight_grads():
        if WeightGrad is None:
            torch.mm(dg.t(), hs)  # dW_hh
            torch.mm(dg.t(), x)  # dW_ih (the benchmark's input needs no gradient)
            return
        # as the fused path: the LSTM sums both over runs of steps; the GRU sums dW_hh over runs
        # and dW_ih over all rows (its input projection's own backward)
        run = min(N, backward_run_rows(B, cell, H))
        run_ih = run if cell == "lstm" else N
        dw_hh = WeightGrad(G, H, run, dg.dtype)
        dw_ih = [WeightGrad(hi - lo, I, run_ih, dg.dtype) for lo, hi in groups]
        for r in range(0, N, run):
            dw_hh.add(dg[r : r + run], hs[r : r + run])
        for r in range(0, N, run_ih):
            for dgi, wg in zip(dg_groups, dw_ih, strict=True):
                wg.add(dgi[r : r + run_ih], x[r : r + run_ih])
        for wg in (dw_hh, *dw_ih):
            wg.result()

    def f():
        for lo, hi in groups:
            input_product(x, w_ih[lo:hi])
        step = StepGemm(w_hh, B)
        for _ in range(T):
            step(h)
        if train:
            back = StepGemm(w_hh.t(), B)
            for t in range(T):
                back(dg[t * B : (t + 1) * B])
            weight_grads()

    return f


def _check_against_float64(cell: str, ours: nn.Module, naive: nn.Module, x: torch.Tensor) -> None:
    """lnorm's output must be within float32's rounding of a float64 run of the same layer.

    The bar is float32's worst-case rounding carried through the recurrence: each of the T steps
    forms dot products of length I + H (``W_ih x + W_hh h``), whose float32 error is at most
    (I + H) u of their magnitude (u = 2**-24, the standard bound for a sum of products), and the
    layer norms keep the gates and h at unit scale, so after T steps the output may be off by
    T (I + H) u: 6.1e-3 at T = 100, I = H = 512, where lnorm and the naive cell measured 5e-4 to
    1e-3 (CPU and GPU). A wrong gain, bias or gate is off by 1e-1 or more. The naive cell's error
    (printed on failure) is not the bar: it is one sample of the same rounding, no bound."""
    T, _, I = x.shape
    tol = T * (I + ours.hidden_size) * 2.0**-24
    with torch.no_grad():
        got = _output(ours(x)).double()
        base = naive(x)[0].double()
        with lnorm.use_backend("torch"):
            exact = _output(copy.deepcopy(ours).double()(x.double()))
    err, naive_err = (got - exact).abs().max().item(), (base - exact).abs().max().item()
    if not err <= tol:
        raise AssertionError(f"{cell}: LayerNorm{cell.upper()}'s max abs error against float64 is {err:.3g}, "
                             f"above float32's rounding bound over {T} steps, T (I + H) 2**-24 = {tol:.3g} "
                             f"(the naive cell's error: {naive_err:.3g}); not timing it")


def _case(cell: str, case: str, B: int, T: int, I: int, H: int, repeats: int, modes, device: str = "cpu") -> list[Row]:
    torch_cls, ln_cls, naive_cls = {
        "lstm": (nn.LSTM, LayerNormLSTM, NaiveLNLSTM),
        "gru": (nn.GRU, LayerNormGRU, NaiveLNGRU),
    }[cell]
    layers, bidir = (2, True) if case == "2-layer-bidir" else (1, False)
    ref = torch_cls(I, H, num_layers=layers, bidirectional=bidir).to(device)
    ours = ln_cls(I, H, num_layers=layers, bidirectional=bidir)
    _randomize_ln(ours)
    ours = ours.to(device)
    naive = None
    x = torch.randn(T, B, I).to(device)
    if case == "packed":
        g = torch.Generator().manual_seed(1)
        lengths = torch.randint(max(1, T // 4), T + 1, (B,), generator=g)
        lengths[0] = T
        inp = pack_padded_sequence(x, lengths, enforce_sorted=False)
    else:
        inp = x
    if case == "main":
        naive = naive_cls(I, H).to(device)
        _copy_to_naive(naive, ours, cell)
        _check_against_float64(cell, ours, naive, x)
    mods = {"torch": ref, "lnorm": ours}
    if naive is not None:
        mods["naive"] = naive

    def train(m):
        def f():
            _output(m(inp)).sum().backward()
        return f

    def infer(m):
        def f():
            with torch.no_grad():
                m(inp)
        return f

    saved = {k: saved_bytes(lambda m=m: m(inp)) / 1e6 for k, m in mods.items()}
    rows = []
    for mode in modes:
        fns = {k: (train if mode == "train" else infer)(m) for k, m in mods.items()}
        if case == "main":
            fns["matmul"] = matmul_floor(cell, B, T, I, H, mode == "train", device)
        sync = torch.cuda.synchronize if device == "cuda" else None
        res = interleaved(fns, repeats=repeats, warmup=1, target_s=0.0, sync=sync)
        t = {k: v["median"] * 1e3 for k, v in res.items()}
        nan = float("nan")
        rows.append(Row(
            cell=cell, case=case, mode=mode, torch_ms=t["torch"], lnorm_ms=t["lnorm"],
            naive_ms=t.get("naive", nan), matmul_ms=t.get("matmul", nan), vs_torch=t["lnorm"] / t["torch"],
            vs_naive=t.get("naive", nan) / t["lnorm"], torch_saved_mb=saved["torch"],
            lnorm_saved_mb=saved["lnorm"], naive_saved_mb=saved.get("naive", nan),
        ))
    return rows


# ------------------------------------------------------------------------------------- report


def _cpu_line(cpu: dict) -> str:
    fam = f" (family {cpu['family']}, model {cpu['model']})" if "family" in cpu and "model" in cpu else ""
    return f"CPU: {cpu['model_name']}{fam}"


def _isa_line(isa: dict) -> str:
    line = (f"Instruction sets: CPU {isa['cpu'] or 'unknown'}, torch's kernels {isa['torch']}, "
            f"Numba {isa['numba'] or 'absent'}")
    if isa["limits"]:
        line += "; limited by " + ", ".join(f"{k}={v}" for k, v in isa["limits"].items())
    return line


def gemm_lines(choices: list[dict]) -> list[str]:
    out = []
    for c in choices:
        kind = c.get("kind", "step")
        if kind == "weight grad":
            what = f"weight gradient {c['n']} x {c['k']} summed over runs of {c['rows']} rows"
        else:
            what = (f"{'input projection' if kind == 'input' else 'per-step GEMM'} {c['rows']} x {c['k']} @ "
                    f"{c['k']} x {c['n']}{' accumulated' if c['accumulate'] else ''}")
        ms = ", ".join(f"{name} {v:.3f}" for name, v in c["ms_per_product"].items())
        out.append(f"{what}, {c['dtype']}, {c['threads']} threads: {c['impl']}"
                   + (f" (ms per product: {ms})" if ms else ""))
    return out


def _table(rows: list[Row]) -> str:
    head = (f"{'cell':5} {'case':14} {'mode':6} {'torch ms':>9} {'lnorm ms':>9} {'naive ms':>9} "
            f"{'matmul ms':>9} {'lnorm/torch':>11} {'naive/lnorm':>11} {'saved MB torch/lnorm/naive':>27}")
    lines = [head, "-" * len(head)]
    for r in rows:
        naive = "-" if r.naive_ms != r.naive_ms else f"{r.naive_ms:9.1f}"
        mm = "-" if r.matmul_ms != r.matmul_ms else f"{r.matmul_ms:9.1f}"
        vsn = "-" if r.vs_naive != r.vs_naive else f"{r.vs_naive:10.2f}x"
        nsv = "-" if r.naive_saved_mb != r.naive_saved_mb else f"{r.naive_saved_mb:.1f}"
        lines.append(
            f"{r.cell:5} {r.case:14} {r.mode:6} {r.torch_ms:9.1f} {r.lnorm_ms:9.1f} {naive:>9} {mm:>9} "
            f"{r.vs_torch:10.2f}x {vsn:>11} {f'{r.torch_saved_mb:.1f} / {r.lnorm_saved_mb:.1f} / {nsv}':>27}"
        )
    return "\n".join(lines)


def _targets(rows: list[Row]) -> list[str]:
    out = []
    for r in rows:
        if r.case != "main":
            continue
        bound = TARGETS[r.mode]
        out.append(f"{r.cell} {r.mode}: lnorm/torch {r.vs_torch:.2f} (target <= {bound}) "
                   f"{'met' if r.vs_torch <= bound else 'NOT met'}")
        out.append(f"{r.cell} {r.mode}: naive/lnorm {r.vs_naive:.2f} (target >= {TARGETS['naive_speedup']}) "
                   f"{'met' if r.vs_naive >= TARGETS['naive_speedup'] else 'NOT met'}")
        if r.mode == "train":
            ratio = r.lnorm_saved_mb / r.torch_saved_mb
            out.append(f"{r.cell} saved memory: lnorm/torch {ratio:.2f} (target <= {TARGETS['saved_ratio']}) "
                       f"{'met' if ratio <= TARGETS['saved_ratio'] else 'NOT met'}")
    return out


def _summary(all_rows: list[list[Row]]) -> list[str]:
    """Per (cell, case, mode): the ratios' range and median over the runs; in the main case, in
    how many runs each target held (the targets' rule of ``_targets``)."""
    def span(vals: list[float], fmt: str = ".2f") -> str:
        return f"{min(vals):{fmt}}x-{max(vals):{fmt}}x ({statistics.median(vals):{fmt}}x)"

    out = []
    n = len(all_rows)
    for i, r in enumerate(all_rows[0]):
        same = [rs[i] for rs in all_rows]
        vt = [x.vs_torch for x in same]
        line = f"{r.cell} {r.case} {r.mode}: lnorm/torch {span(vt)}"
        if r.case == "main":
            vn = [x.vs_naive for x in same]
            met_t = sum(v <= TARGETS[r.mode] for v in vt)
            met_n = sum(v >= TARGETS["naive_speedup"] for v in vn)
            line += (f", met (<= {TARGETS[r.mode]}) in {met_t} of {n} runs; naive/lnorm {span(vn)}, "
                     f"met (>= {TARGETS['naive_speedup']}) in {met_n} of {n}")
        out.append(line)
    return out


# ----------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cells", default="lstm,gru", help="comma list of lstm, gru (default lstm,gru)")
    parser.add_argument("--cases", default="main,2-layer-bidir,packed",
                        help="comma list of main, 2-layer-bidir, packed (default all three)")
    parser.add_argument("--modes", default="train,infer", help="comma list of train, infer")
    d = _DEFAULTS
    parser.add_argument("--batch", type=int, default=d["batch"], help=f"batch size B (default {d['batch']})")
    parser.add_argument("--seq-len", type=int, default=d["seq_len"],
                        help=f"sequence length T in steps (default {d['seq_len']})")
    parser.add_argument("--input-size", type=int, default=d["input_size"],
                        help=f"input features I (default {d['input_size']})")
    parser.add_argument("--hidden-size", type=int, default=d["hidden_size"],
                        help=f"hidden features H (default {d['hidden_size']})")
    parser.add_argument("--repeats", type=int, default=d["repeats"],
                        help="timed repeats per candidate; the median is reported")
    parser.add_argument("--runs", type=int, default=1,
                        help="whole measurements in turn; more than one adds each ratio's range and median over "
                             "the runs and how many runs met each target (default 1)")
    parser.add_argument("--threads", type=int, default=0,
                        help="threads for torch and the Numba kernels (default: their own choice)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where modules and inputs live (cuda: the first GPU, synchronized timing)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and 2 repeats (a smoke run in seconds)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows and settings as JSON to PATH")


class _Usage(Exception):
    """A usage error of ``lnorm bench rnn``: one line on stderr and exit status 2 (as ``bench ops``
    and ``lab``), where a bare ``SystemExit(message)`` exits with 1."""


def _split(value: str, allowed: tuple[str, ...], name: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise _Usage(f"lnorm bench rnn: {name} must be a comma list of {allowed}, got {value!r}")
    return items


def _numba_threads() -> int | None:
    if not lnorm.numba_available():
        return None
    import numba

    return numba.get_num_threads()


def _step_gemm_choices(device: str) -> list[dict]:
    """The per-step GEMMs this run chose (the layers' and the matmul floor's), CPU only."""
    if device != "cpu":
        return []
    try:
        from lnorm.ops.step_gemm import step_gemm_choices
    except ImportError:
        return []
    return step_gemm_choices()


def _native_loop_status(device: str) -> str | None:
    """Whether the LSTM and GRU time loops ran natively here (``lnorm.ops.brgemm``), in words; None off
    the fused CPU path."""
    if device != "cpu" or not lnorm.numba_available():
        return None
    from lnorm.ops import brgemm

    return brgemm.status()


def _backward_runs(device: str, B: int, T: int, H: int) -> dict | None:
    """The LSTM backward's run length here for the main case (whole steps of B rows, at most the
    B * T rows there are; see ``rnn_fused.run_rows``) and the cache it follows; None off the fused
    CPU path."""
    if device != "cpu" or not lnorm.numba_available():
        return None
    from lnorm.ops import rnn_fused

    return dict(rows=min(B * T, rnn_fused.backward_run_rows(B, "lstm", H)), cache_bytes=rnn_fused.last_level_cache_bytes(),
                run_bytes=rnn_fused.run_buffer_bytes())


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except _Usage as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    cells = _split(args.cells, ("lstm", "gru"), "--cells")
    cases = _split(args.cases, ("main", "2-layer-bidir", "packed"), "--cases")
    modes = _split(args.modes, ("train", "infer"), "--modes")
    B, T, I, H, repeats = args.batch, args.seq_len, args.input_size, args.hidden_size, args.repeats
    if args.quick:
        given = [f"--{k.replace('_', '-')} {v}" for k, v in (("batch", B), ("seq_len", T), ("input_size", I),
                                                              ("hidden_size", H), ("repeats", repeats))
                 if v != _DEFAULTS[k]]
        if given:  # --quick sets them all: a size given beside it would be silently ignored
            raise _Usage(f"lnorm bench rnn: --quick sets the sizes and repeats itself; drop {', '.join(given)} "
                             "or --quick")
        B, T, I, H, repeats = 4, 6, 8, 16, 2
    if args.json and (why := unwritable(args.json)):
        raise _Usage(f"lnorm bench rnn: --json: {why}")
    if min(B, T, I, H, repeats) < 1:
        raise _Usage("lnorm bench rnn: --batch, --seq-len, --input-size, --hidden-size, --repeats must be >= 1")
    runs = args.runs
    if runs < 1:
        raise _Usage(f"lnorm bench rnn: --runs must be >= 1, got {runs}")
    if args.threads < 0:
        raise _Usage(f"lnorm bench rnn: --threads must be >= 1 (0: the libraries' own choice), got {args.threads}")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
        if lnorm.numba_available():
            import numba

            numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    torch.manual_seed(0)
    settings = dict(batch=B, seq_len=T, input_size=I, hidden_size=H, repeats=repeats, dtype="float32",
                    backend=lnorm.get_backend(args.device), threads=torch.get_num_threads(), torch=torch.__version__,
                    device=args.device, gpu=torch.cuda.get_device_name() if args.device == "cuda" else None,
                    machine=platform.machine(), processor=platform.processor(), cpu=cpu_model(),
                    isa=instruction_sets(), numba_threads=_numba_threads(), command=" ".join(sys.argv))
    print(f"lnorm bench rnn: B={B} T={T} I={I} H={H}, float32 on {settings['gpu'] or 'cpu'}, backend {settings['backend']}, "
          f"{settings['threads']} threads (Numba {settings['numba_threads']}), median of {repeats}")
    print(_cpu_line(settings["cpu"]))
    print(_isa_line(settings["isa"]))
    settings["runs"] = runs
    all_rows: list[list[Row]] = []
    for run_i in range(runs):
        rows: list[Row] = []
        for cell in cells:
            for case in cases:
                rows += _case(cell, case, B, T, I, H, repeats, modes, args.device)
        all_rows.append(rows)
        if runs > 1 and run_i < runs - 1:
            print(f"run {run_i + 1} of {runs}:")
            print(_table(rows))
    if runs > 1:
        print(f"run {runs} of {runs}:")
    settings["step_gemm"] = _step_gemm_choices(args.device)
    for line in gemm_lines(settings["step_gemm"]):
        print(line)
    settings["native_loop"] = _native_loop_status(args.device)
    if settings["native_loop"]:
        print(f"LSTM and GRU time loops in native code (oneDNN brgemm inside the Numba kernels): {settings['native_loop']}")
    settings["lstm_backward_runs"] = _backward_runs(args.device, B, T, H)
    if settings["lstm_backward_runs"]:
        r = settings["lstm_backward_runs"]
        cache = f"{r['cache_bytes'] / 2**20:g} MiB" if r["cache_bytes"] else "unknown"
        print(f"LSTM backward: runs of {r['rows']} rows (last-level cache {cache}: "
              f"{r['run_bytes'] / 2**20:g} MiB per run buffer)")
    print(_table(rows))
    for line in _targets(rows):
        print(line)
    if runs > 1:
        print(f"over the {runs} runs, range (median):")
        for line in _summary(all_rows):
            print(line)
    if args.json:
        out = {"settings": settings, "targets": TARGETS, "rows": [asdict(r) for r in rows]}
        if runs > 1:
            out["runs"] = [[asdict(r) for r in rs] for rs in all_rows]
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0
