"""E6 overhead (C8): the time per training step that layer norm adds, measured as overhead: the
same implementation with and without the norm, timed in the same process, interleaved.

* MLP: ``lnorm.lab.models.MLP`` with ``make_norm("layer")`` against ``make_norm("none")`` (the
  same module code with ``nn.Identity`` in the norm's place);
* transformer: E4's pre-norm ``TinyGPT`` with layer norm against the same code with Identity;
* LSTM / GRU: ``lnorm.nn.LayerNormLSTM`` / ``LayerNormGRU`` with ``layer_norm=True`` against
  ``layer_norm=False``, both on the pure-torch path (``use_backend("torch")``: lnorm's fused
  kernels exist only with the norm, so with them the rows would compare implementations). torch's fused
  ``nn.LSTM`` is not a baseline here: comparing it with lnorm's layer measures implementations.

Each run builds both models, runs ``warmup`` untimed steps of each, then ``repeats`` timed
blocks of at least ``steps`` steps and ``block_ms`` each, alternating A B B A A B ... (so a slow drift of the machine's load hits
both alike), and keeps each model's median ms per step. A seed is one such run; the effect is the
relative overhead ``LN / none - 1`` per seed, over seeds. Widths are swept. Run it with
``--jobs 1``: under ``--jobs 2`` another run shares the cores, and the row says so.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lnorm import get_backend, use_backend
from lnorm.lab import analysis as A
from lnorm.lab import stats as S
from lnorm.lab.lm import CharRNN
from lnorm.lab.models import MLP
from lnorm.lab.transformer import TinyGPT

TITLE = "Overhead: time per training step with and without layer norm (same implementation)"
CLAIMS = ("C8",)
ARCHS = ("mlp", "transformer", "lstm", "gru")
PRIMARY_ARCH = "lstm"  # the primary row: the LSTM at the largest width (the article's recurrent case)
VOCAB = 96  # token ids of the sequence models' random inputs


@dataclass
class Config:
    archs: tuple[str, ...] = ("mlp", "transformer", "lstm")
    widths: tuple[int, ...] = (64, 128)  # hidden units (MLP, RNN) or d_model (transformer, divisible by 4)
    batch_size: int = 32
    seq_len: int = 32  # transformer and RNN
    warmup: int = 2  # untimed steps of each model before timing
    repeats: int = 6  # timed blocks of each model, interleaved
    steps: int = 2  # training steps per timed block, at least
    block_ms: float = 20.0  # ... and at least this long (fast models take more steps per block: timer noise)


SUITES = {"smoke": dict(archs=("mlp", "lstm"), widths=(16,), batch_size=4, seq_len=4, warmup=1, repeats=2, steps=1,
                        block_ms=1.0),
          "quick": {},
          "full": dict(archs=ARCHS, widths=(64, 128, 256, 512), repeats=12, steps=3)}
EST_SECONDS = {"smoke": 2, "quick": 30, "full": 900}  # quick: 27 s CPU, --jobs 1, 2-core EPYC
# the names each string field takes, checked before a run starts (lnorm.lab.config.resolve)
CHOICES = {"archs": ARCHS}


def units(cfg: Config) -> list[dict]:
    for a in cfg.archs:
        if a not in ARCHS:
            raise ValueError(f"e6.archs: unknown architecture {a!r}; valid: {', '.join(ARCHS)}")
    if cfg.repeats % 2:
        raise ValueError(f"e6.repeats must be even (A B B A pairs), got {cfg.repeats}")
    if "transformer" in cfg.archs and any(w % 4 for w in cfg.widths):
        raise ValueError(f"e6.widths: the transformer's width must be divisible by its 4 heads, got {cfg.widths}")
    return [{"arch": a, "width": w} for a in cfg.archs for w in cfg.widths]


def build(arch: str, width: int, cfg: Config, with_norm: bool) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A model and one fixed batch (inputs, targets); ``with_norm`` False puts Identity (or
    ``layer_norm=False``) where the norm was, nothing else changes."""
    g = torch.Generator().manual_seed(0)
    if arch == "mlp":
        model = MLP(width, width, 2, 10, "layer" if with_norm else "none")
        return model, torch.randn(cfg.batch_size, width, generator=g), torch.randint(0, 10, (cfg.batch_size,), generator=g)
    ids = torch.randint(0, VOCAB, (cfg.batch_size, cfg.seq_len + 1), generator=g)
    if arch == "transformer":
        model = TinyGPT(VOCAB, width, 4, 2, cfg.seq_len, "preln" if with_norm else "none")
    else:
        model = CharRNN(("ln" + arch) if with_norm else f"ln{arch}_off", VOCAB, 32, width)
    return model, ids[:, :-1], ids[:, 1:]


def _step_fn(model, x, y):
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step():
        out = model(x)
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def interleaved_ms(step_a, step_b, repeats: int, steps: int, sync=lambda: None) -> tuple[list[float], list[float]]:
    """ms per step of each of two step functions over ``repeats`` blocks in the order A B B A A B
    ...: ``(a's per-block ms, b's per-block ms)``. ``sync`` waits for queued work (CUDA runs
    kernels asynchronously: without it a block would time their launches, not their work)."""
    ms = ([], [])
    for r in range(repeats):
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):
            fn = (step_a, step_b)[i]
            sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            sync()
            ms[i].append(1000 * (time.perf_counter() - t0) / steps)
    return ms


# The recurrent layers run lnorm's fused kernels only with layer norm (layer_norm=False takes the
# pure-torch loop), so both sides are timed on the pure-torch path: the one implementation that runs
# with and without the norm. The MLP and the transformer differ only in the norm module.
RECURRENT_BACKEND = "torch"


def run(cfg: Config, params: dict, seed: int, ctx) -> dict:
    recurrent = params["arch"] in ("lstm", "gru")
    with use_backend(RECURRENT_BACKEND) if recurrent else contextlib.nullcontext():
        out = _timed(cfg, params, seed, ctx)
    return {**out, "backend": RECURRENT_BACKEND if recurrent else get_backend(ctx.device)}


def _timed(cfg: Config, params: dict, seed: int, ctx) -> dict:
    fns = []
    for with_norm in (True, False):
        torch.manual_seed(seed)
        model, x, y = build(params["arch"], params["width"], cfg, with_norm)
        fns.append(_step_fn(model.to(ctx.device).train(), x.to(ctx.device), y.to(ctx.device)))
    dev = torch.device(ctx.device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    warm = interleaved_ms(fns[0], fns[1], cfg.warmup, 1, sync)[1]  # untimed for the result; sizes the blocks
    steps = max(cfg.steps, min(1000, math.ceil(cfg.block_ms / max(1e-3, min(warm)))))
    ln, none = [], []
    for _ in ctx.steps(cfg.repeats // 2):
        a, b = interleaved_ms(fns[0], fns[1], 2, steps, sync)
        ln += a
        none += b
    ms_ln, ms_none = statistics.median(ln), statistics.median(none)
    return {"ms_ln": ms_ln, "ms_none": ms_none, "overhead": ms_ln / ms_none - 1, "steps_per_block": steps,
            "blocks_ln": ln, "blocks_none": none,
            "shared_cores": multiprocessing.parent_process() is not None, "threads": torch.get_num_threads()}


# criterion

def verdict_c8(overhead: dict[int, float], min_effect: float = 0.02, margin: float = 0.01) -> tuple[str, str, S.Effect]:
    """C8 for one architecture and width: LN's relative overhead per training step, ``LN / none - 1``
    of each seed's medians, is above 0 by ``min_effect`` or more (95% interval over seeds);
    not supported when the interval rules out ``margin``."""
    eff = S.compare(overhead, {s: 0.0 for s in overhead}, paired=True, min_effect=min_effect, margin=margin,
                    unit="x (relative)")
    return eff.verdict, "relative overhead LN / none - 1", eff


def _row(cfg: Config, recs: list[dict], arch: str, width: int, primary: bool) -> dict:
    m = dict(arch=arch, width=width)
    v, ev, eff = verdict_c8(A.by_seed(recs, "overhead", **m))
    ms_ln, ms_none = A.values(recs, "ms_ln", **m), A.values(recs, "ms_none", **m)
    caveats = []
    if any(A.values(recs, "shared_cores", **m)):
        caveats.append("timed while another run shared the cores (--jobs > 1): the A/B interleaving cancels "
                       "slow drift, not contention within a block")
    return A.claim_row("e6", "C8", "C8-ln-overhead" if primary else f"C8-{arch}-{width}", eff,
                       role="primary" if primary else "secondary", caveats=caveats,
                       evidence=f"{arch} width {width}: {ev} (ms/step LN {S.fmt_ci(ms_ln)}, none {S.fmt_ci(ms_none)})",
                       criterion=f"{arch}, width {width}: the same implementation with and without layer norm, "
                                 "timed interleaved in one process; LN / none - 1 of the median ms per step is at "
                                 "least 0.02 (paired over seeds, 95% CI > 0; not supported below 0.01).")


def analyze(cfg: Config, results: dict) -> dict:
    recs = results["e6"]
    primary_arch = PRIMARY_ARCH if PRIMARY_ARCH in cfg.archs else cfg.archs[0]
    claims, rows = [], []
    for a in cfg.archs:
        for w in cfg.widths:
            m = dict(arch=a, width=w)
            if not A.values(recs, "overhead", **m):
                continue
            claims.append(_row(cfg, recs, a, w, primary=(a, w) == (primary_arch, max(cfg.widths))))
            rows.append([a, w, A.cell(recs, "ms_none", **m), A.cell(recs, "ms_ln", **m), A.cell(recs, "overhead", **m)])
    series = [A.series(recs, "overhead", a, sorted(cfg.widths), "width", arch=a) for a in cfg.archs]
    return {"claims": claims,
            "tables": [{"title": "Median ms per training step of the same implementation without and with layer norm "
                                 "(mean ± 95% CI over seeds), and the relative overhead",
                        "columns": ["architecture", "width", "ms/step, no norm", "ms/step, LN", "LN / none - 1"],
                        "rows": rows}],
            "figures": [{"name": "e6_overhead", "title": "E6: relative overhead of layer norm per training step",
                         "xlabel": "width", "ylabel": "LN / none - 1", "logx": True, "series": series}],
            "notes": [f"Each run: {cfg.warmup} untimed steps of each model, then {cfg.repeats} blocks of at least "
                      f"{cfg.steps} steps and {cfg.block_ms:g} ms alternating A B B A; the median block of each. Batch norm is not a row: in these models it "
                      "would be torch's BatchNorm against lnorm's LayerNorm, two implementations. The RNN rows time "
                      f"lnorm's layer on the {RECURRENT_BACKEND!r} backend whatever the run's backend (its fused "
                      "kernels exist only with the norm), with layer_norm=True vs False."]}
