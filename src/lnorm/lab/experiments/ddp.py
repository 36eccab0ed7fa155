"""DDP (C1, C3, multi-process face): data-parallel training on real MNIST with torch.distributed.

A global batch of B digits is split over ``nproc`` processes (``lnorm lab run ddp --nproc N``;
gloo on CPU, nccl with ``--device cuda``), each training a ``DistributedDataParallel`` replica on
B/N digits. Norms: ``batch`` (each process normalizes with the statistics of its own slice, the
default in DDP), ``sync`` (:class:`lnorm.distributed.SyncBatchNorm`: statistics of the whole
global batch, one all_gather per layer per forward and one all_reduce per backward), ``layer`` and
``none``. Every DDP run is paired with single-process training on the same global batches from
the same initial weights (``sync`` on one process is ``batch``), so the table reads:

* the gradient gap at the first step: max |g_DDP - g_1proc| over the largest |g_1proc|. Per-sample
  norms (layer, none) and SyncBatchNorm give float rounding; per-process batch norm does not;
* the loss drift: how far the DDP training-loss curve strays from the single-process one. With
  per-sample norms and with SyncBatchNorm only float rounding separates the two runs (training can
  amplify it); per-process batch norm trains a different model;
* test accuracy single vs DDP after the same steps;
* median time per step, and the share of it SyncBatchNorm spends in its collectives.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

import lnorm
from lnorm.distributed import (
    collective_clock,
    convert_sync_batchnorm,
    default_backend,
    gradients,
    launch,
    world,
)
from lnorm.distributed import device as worker_device
from lnorm.lab import analysis as A
from lnorm.lab import stats as S
from lnorm.lab.data import mnist
from lnorm.lab.models import MLP, CNN2d
from lnorm.lab.train import accuracy

TITLE = "Data-parallel training (DDP): per-process batch norm, SyncBatchNorm, layer norm"
CLAIMS = ("C1", "C3")

MODELS = ("mlp", "cnn")
NORMS = ("batch", "sync", "layer", "none")


@dataclass
class Config:
    models: tuple[str, ...] = ("mlp", "cnn")  # mlp: 784-hidden^depth-10; cnn: two conv blocks (lab CNN2d)
    norms: tuple[str, ...] = ("batch", "sync", "layer", "none")  # sync = SyncBatchNorm (DDP runs only)
    batch_sizes: tuple[int, ...] = (8,)  # global batch sizes, each split over nproc processes
    nproc: int = 2  # processes per DDP run (`lnorm lab run --nproc N`)
    steps: int = 100  # optimizer steps per run, equal for every configuration
    hidden: int = 128  # MLP units per hidden layer
    depth: int = 2  # MLP hidden layers
    channels: int = 8  # CNN channels of the first block (the second has twice as many)
    lr: float = 1e-3  # Adam learning rate
    grad_tol: float = 1e-4  # C1: largest relative gradient gap that counts as "the same gradient"


SUITES = {
    "smoke": dict(models=("mlp",), norms=("batch", "sync", "layer"), batch_sizes=(8,), steps=4, hidden=32),
    "quick": {},
    "full": dict(batch_sizes=(8, 16, 32), steps=1000, hidden=256, channels=16),
}
EST_SECONDS = {"smoke": 8, "quick": 100, "full": 2400}
# the names each string field takes, checked before a run starts (lnorm.lab.config.resolve)
CHOICES = {"models": MODELS, "norms": NORMS}


def _check(cfg: Config) -> None:
    if cfg.nproc < 2:
        raise ValueError(f"ddp.nproc must be >= 2 (processes per DDP run), got {cfg.nproc}")
    for name, values, valid in (("models", cfg.models, MODELS), ("norms", cfg.norms, NORMS)):
        bad = [v for v in values if v not in valid]
        if bad:
            raise ValueError(f"ddp.{name}: unknown {bad}; valid: {', '.join(valid)}")
    bad = [b for b in cfg.batch_sizes if b % cfg.nproc or b < 2 * cfg.nproc]
    if bad:
        raise ValueError(f"ddp.batch_sizes must be multiples of nproc={cfg.nproc} with at least 2 samples "
                         f"per process (batch norm needs 2), got {bad}")


def units(cfg: Config) -> list[dict]:
    _check(cfg)
    out = []
    for m in cfg.models:
        for b in cfg.batch_sizes:
            for n in cfg.norms:
                if n != "sync":  # SyncBatchNorm in one process is batch norm: its baseline is batch's
                    out.append({"model": m, "norm": n, "batch": b, "procs": 1})
                out.append({"model": m, "norm": n, "batch": b, "procs": cfg.nproc})
    return out


# model, batches, one training loop for one process or a DDP replica


def build(cfg: Config, model: str, norm: str) -> nn.Module:
    kind = "batch" if norm == "sync" else norm
    net = MLP(784, cfg.hidden, cfg.depth, 10, kind) if model == "mlp" else CNN2d(kind, cfg.channels)
    return convert_sync_batchnorm(net) if norm == "sync" else net


def batches(n: int, batch: int, steps: int, seed: int):
    """The global batches' indices, the same for one process and for every DDP rank."""
    g = torch.Generator().manual_seed(seed)
    per_epoch = n // batch
    perm = None
    for step in range(steps):
        j = step % per_epoch
        if j == 0:
            perm = torch.randperm(n, generator=g)
        yield perm[j * batch:(j + 1) * batch]


def train(rank: int, model: nn.Module, data, batch: int, steps: int, lr: float, seed: int,
          backend: str = "torch", device: str = "cpu") -> dict:
    """Train ``model`` on its share of each global batch: all of it in one process, slice ``rank``
    under DDP (called in every worker by :func:`lnorm.distributed.launch`). Returns per-step
    losses and times, SyncBatchNorm's collective time, the first step's gradients, and (rank 0)
    the test accuracy."""
    lnorm.set_backend(backend)
    _, nproc = world()
    dev = torch.device(device) if nproc == 1 else worker_device()
    Xtr, ytr, Xte, yte = (t.to(dev) for t in data)
    model = model.to(dev).train()
    net = model
    if nproc > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    losses, step_s, comm_s = [], [], []
    first = {}
    for step, idx in enumerate(batches(len(Xtr), batch, steps, seed)):
        local = idx.chunk(nproc)[rank].to(dev)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        with collective_clock() as clock:
            loss = loss_fn(net(Xtr[local]), ytr[local])
            opt.zero_grad(set_to_none=True)
            loss.backward()  # DDP: returns once the gradients are averaged over ranks
            if step == 0:
                first = gradients(model)
            opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        step_s.append(time.perf_counter() - t0)
        comm_s.append(clock.seconds)
        losses.append(float(loss.detach()))
    out = {"losses": losses, "step_s": step_s, "comm_s": comm_s, "first_grads": first if rank == 0 else {}}
    if rank == 0:
        out["test_acc"] = accuracy(model, Xte, yte)
    return out


def grad_gap(got: dict, ref: dict) -> float:
    """max |got - ref| over every parameter entry, relative to the largest |ref| entry."""
    diff = max(float((got[k].double() - ref[k].double()).abs().max()) for k in ref)
    scale = max(float(g.abs().max()) for g in ref.values())
    return diff / scale if scale > 0 else diff


def run(cfg: Config, params: dict, seed: int, ctx) -> dict:
    data = mnist()
    model = build(cfg, params["model"], params["norm"])  # the runner seeded torch: same init for 1 and N procs
    B, procs = params["batch"], params["procs"]
    args = (data, B, cfg.steps, cfg.lr, seed, lnorm.get_backend())
    if procs == 1:
        out = [train(0, model, *args, device=ctx.device)]
        ref = out[0]["first_grads"]
    else:
        # the single-process gradient of the same first global batch from the same initial weights
        m = copy.deepcopy(model).to(ctx.device).train()
        idx = next(batches(len(data[0]), B, 1, seed)).to(ctx.device)
        nn.CrossEntropyLoss()(m(data[0].to(ctx.device)[idx]), data[1].to(ctx.device)[idx]).backward()
        ref = gradients(m)
        out = launch(train, procs, (model, *args), backend=default_backend(ctx.device), timeout=3600)
    losses = np.mean([o["losses"] for o in out], axis=0)  # each rank's loss is the mean over its slice
    step_ms = 1000 * float(np.mean([np.median(o["step_s"]) for o in out]))
    comm_ms = 1000 * float(np.mean([np.median(o["comm_s"]) for o in out]))
    every = max(1, cfg.steps // 20)
    curve_step, curve_loss = [], []
    for s in range(0, cfg.steps, every):
        curve_step.append(min(s + every, cfg.steps))
        curve_loss.append(float(losses[s:s + every].mean()))
        ctx.log(step=curve_step[-1], loss=curve_loss[-1])
    tail = losses[-max(1, min(50, len(losses))):]
    return {
        "curve_step": curve_step,
        "curve_loss": curve_loss,
        "test_acc": out[0]["test_acc"],
        "final_loss": float(tail.mean()),
        "ms_per_step": step_ms,
        "comm_ms_per_step": comm_ms,
        "comm_share": comm_ms / step_ms if step_ms > 0 else 0.0,
        "grad_gap": grad_gap(out[0]["first_grads"], ref),
        "steps": cfg.steps,
    }


# criteria (pure functions of numbers)


def curve_gap(a: list[float], b: list[float]) -> float:
    """Largest pointwise |a - b| of two loss curves of the same steps."""
    return max((abs(x - y) for x, y in zip(a, b, strict=False)), default=0.0)


def row_c1(ln_gaps: list[float], bn_gaps: list[float], tol: float, nproc: int) -> dict:
    """C1 across processes (by construction: a per-sample norm's gradient cannot see how the batch
    is split): every layer-norm DDP run's first gradient equals the single-process gradient of the
    whole batch (relative gap < tol), and the same check sees per-process batch norm's gap (> 100
    tol), so it could have failed."""
    v = S.exact_vs_batch_norm(ln_gaps, bn_gaps, tol)
    if not ln_gaps:
        ev = "no layer-norm DDP runs"
    else:
        ev = f"LN relative gradient gap {nproc}-proc vs 1-proc up to {S.fmt_extreme(ln_gaps)} over {len(ln_gaps)} runs"
        bad = S.exact_nonfinite_note(ln_gaps, bn_gaps)  # a non-finite gap is a failed measurement: say so
        ev += {S.NOT_SUPPORTED: f" (tolerance {tol:g})" + (f"; {bad}" if bad else ""),
               S.INCONCLUSIVE: "; " + (bad or "the check did not see BN's per-process statistics, so it may be blind")}.get(
                   v, f"; BN (per-process stats): {S.fmt_extreme(bn_gaps, False)} or more")
    return A.claim_row("ddp", "C1", "C1-ddp-gradient", None,
                       f"with {nproc} processes on slices of the batch, every LN model's first DDP gradient equals the "
                       f"single-process gradient of the whole batch (relative gap < {tol:g}) and the check detects "
                       f"per-process BN (> {100 * tol:g}).", role="by construction", verdict=v, evidence=ev)


DROP_MIN_EFFECT, DROP_MARGIN = 0.01, 0.005  # accuracy: 1 point (10 of the 1000 MNIST test digits) is the
# smallest loss from splitting a batch a user would notice; half a point counts as none
ACC_RESOLUTION = 0.001  # one MNIST test digit
CHANCE = 0.1  # ten classes: the accuracy a diverged or untrainable run is scored with


def row_c3(bn_drop: dict, ln_drop: dict, nproc: int) -> dict:
    """C3 across processes: splitting the batch costs per-process batch norm more test accuracy than
    it costs layer norm. Drops are single-process minus DDP accuracy of the same (model, global
    batch, seed), so each pair shares its batches and initial weights: compared paired."""
    # each drop is two rounded accuracies (1-proc minus DDP): four per paired difference
    eff = S.compare(bn_drop, ln_drop, min_effect=DROP_MIN_EFFECT, margin=DROP_MARGIN, unit="acc",
                    resolution=S.difference_resolution(ACC_RESOLUTION))
    return A.claim_row("ddp", "C3", "C3-ddp-split-drop", eff,
                       f"over every model, global batch and seed, the test-accuracy drop from 1 process to {nproc} "
                       "(per-process batches of B/N), BN minus LN, paired: supported if > 0 and >= 1 point (10 test "
                       "digits); not supported if the CI rules out half a point. Diverged runs score chance (0.1).",
                       evidence="accuracy drop 1-proc -> DDP, BN minus LN")


def _paired_diff(after: list[float], before: list[float]) -> str:
    """DDP minus single-process accuracy over the seeds both finished (aligned lists), paired."""
    if not after:
        return "-"
    e = S.compare(dict(enumerate(after)), dict(enumerate(before)), min_effect=DROP_MIN_EFFECT,
                  margin=DROP_MARGIN, resolution=ACC_RESOLUTION)
    return f"{e.estimate:+.3g} (one seed)" if e.n < 2 else f"{e.estimate:+.3g} [{e.lo:+.3g}, {e.hi:+.3g}] paired"


def _comparison(cfg: Config, recs: list[dict]) -> tuple[list, list, list, list]:
    """The table rows (1 vs N processes per model, norm and batch) and the figures' series."""
    N = cfg.nproc
    rows, figures = [], []
    acc_series, ms_series = [], []
    b0 = min(cfg.batch_sizes)
    for m in cfg.models:
        curves = []
        for n in cfg.norms:
            if n != "sync":
                curves.append(A.curve_series(recs, "curve_loss", f"{n} 1-proc", step_key="curve_step",
                                             model=m, norm=n, batch=b0, procs=1))
            curves.append(A.curve_series(recs, "curve_loss", f"{n} {N}-proc", step_key="curve_step",
                                         model=m, norm=n, batch=b0, procs=N))
        figures.append({"name": f"ddp_{m}_loss", "title": f"DDP: {m} training loss, global batch {b0}, 1 vs {N} "
                        "processes (same batches, same initial weights)", "xlabel": "step",
                        "ylabel": "training loss (mean over the steps since the last point)", "series": curves})
        for n in cfg.norms:
            base = "batch" if n == "sync" else n
            for b in cfg.batch_sizes:
                one = dict(model=m, norm=base, batch=b, procs=1)
                many = dict(model=m, norm=n, batch=b, procs=N)
                a1, aN = A.paired(recs, "test_acc", one, many)
                c1, cN = A.paired(recs, "curve_loss", one, many)
                drift = [curve_gap(x, y) for x, y in zip(c1, cN, strict=True)]
                rows.append([m, n, b, A.cell(recs, "test_acc", **one), A.cell(recs, "test_acc", **many),
                             _paired_diff(aN, a1),
                             A.cell(recs, "grad_gap", 2, **many), f"{max(drift):.2g}" if drift else "-",
                             A.cell(recs, "ms_per_step", **one),
                             A.cell(recs, "ms_per_step", **many),
                             A.cell(recs, "comm_share", 2, **many) if n == "sync" else "-"])
            acc_series.append(A.series(recs, "test_acc", f"{m} {n} {N}-proc", cfg.batch_sizes, "batch",
                                       model=m, norm=n, procs=N))
            ms_series.append(A.series(recs, "ms_per_step", f"{m} {n} {N}-proc", cfg.batch_sizes, "batch",
                                      model=m, norm=n, procs=N))
        for n in cfg.norms:
            if n != "sync":
                acc_series.append(A.series(recs, "test_acc", f"{m} {n} 1-proc", cfg.batch_sizes, "batch",
                                           model=m, norm=n, procs=1))
    return rows, figures, acc_series, ms_series


def _drops(cfg: Config, recs: list[dict], norm: str) -> dict:
    """``{(model, batch, seed): accuracy 1-proc minus DDP}`` for one norm; failed runs score chance."""
    out = {}
    for m in cfg.models:
        for b in cfg.batch_sizes:
            one = A.scored(recs, "test_acc", CHANCE, model=m, norm=norm, batch=b, procs=1)
            many = A.scored(recs, "test_acc", CHANCE, model=m, norm=norm, batch=b, procs=cfg.nproc)
            out |= {(m, b, s): one[s] - many[s] for s in sorted(set(one) & set(many))}
    return out


def _claims(cfg: Config, recs: list[dict]) -> list[dict]:
    claims = []
    if "layer" in cfg.norms:
        gaps = {n: A.values(recs, "grad_gap", norm=n, procs=cfg.nproc) for n in ("layer", "batch")}
        claims.append(row_c1(gaps["layer"], gaps["batch"], cfg.grad_tol, cfg.nproc))
    if {"batch", "layer"} <= set(cfg.norms):
        claims.append(row_c3(_drops(cfg, recs, "batch"), _drops(cfg, recs, "layer"), cfg.nproc))
    return claims


def analyze(cfg: Config, results: dict) -> dict:
    recs = results["ddp"]
    N = cfg.nproc
    rows, figures, acc_series, ms_series = _comparison(cfg, recs)
    return {
        "tables": [{"title": f"1 process vs {N} processes (DDP) on the same global batches from the same weights; "
                             "mean ± 95% CI over seeds. grad gap: first-step max|g_DDP - g_1proc| / max|g_1proc|; "
                             "loss drift: max over seeds and the loss curve's points of |loss_DDP - loss_1proc|; "
                             "sync comm share: share of the DDP step in SyncBatchNorm's collectives",
                    "columns": ["model", "norm", "global batch", "acc 1-proc", f"acc {N}-proc", "Δacc (DDP-1)",
                                "grad gap", "loss drift", "ms/step 1-proc", f"ms/step {N}-proc",
                                "sync comm share"],
                    "rows": rows}],
        "figures": figures + ([
            {"name": "ddp_accuracy", "title": f"DDP: MNIST test accuracy, 1 vs {N} processes",
             "xlabel": "global batch", "ylabel": "test accuracy", "logx": True, "series": acc_series},
            {"name": "ddp_step_time", "title": f"DDP: time per step with {N} processes",
             "xlabel": "global batch", "ylabel": "ms per step", "logx": True, "series": ms_series},
        ] if len(cfg.batch_sizes) > 1 else []),
        "claims": _claims(cfg, recs),
        "notes": [f"{N} processes share this machine's cores with 1 thread each; the single-process runs use 1 "
                  "thread. Step times include DDP's gradient all-reduce (gloo over loopback on CPU), so they "
                  "measure communication overhead, not a speed-up. They mean something only from a run with "
                  "`--jobs 1` on an otherwise idle machine: parallel runs put several DDP jobs on the same cores.",
                  "sync on one process is plain batch norm, so its 1-process column repeats batch's.",
                  "DDP broadcasts rank 0's buffers every step: per-process BN evaluates with rank 0's running "
                  "statistics (from its slices only), SyncBatchNorm with the global ones."],
    }
