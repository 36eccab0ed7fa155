"""E1 batch size (C1, C3, C6): an MLP on real MNIST with no/batch/layer/RMS norm at batch sizes 1..128.

Every run is given ``epochs`` x 4000 training examples, so smaller batches take more steps, but at
least ``min_steps`` (so large batches are not left with a handful of updates). Where that floor
binds, large batches see more examples than small ones (the quick suite: 1k at batch 1, 12.8k at
batch 128), and the figure title says so; the full suite's 3.2 epochs are 100 steps at batch 128,
so there every batch size sees the same 12.8k examples. The comparisons between norms are at equal
budgets for each batch size. Batch norm cannot train on one sample: that run is recorded as "cannot train" with
torch's reason. After training, each model's outputs on test digits are computed in training mode
(where a norm uses the statistics of the batch it is given) once as one batch and once in pairs:
a per-sample norm gives the same outputs (C1).
The paper used a 784-1000-1000-10 permutation-invariant MLP at batch sizes 128 and 4.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lnorm.lab import analysis as A
from lnorm.lab import stats as S
from lnorm.lab.data import mnist
from lnorm.lab.models import MLP
from lnorm.lab.train import train_classifier

TITLE = "Batch size: MLP on real MNIST"
CLAIMS = ("C1", "C3", "C6")


@dataclass
class Config:
    norms: tuple[str, ...] = ("none", "batch", "layer", "rms")
    batch_sizes: tuple[int, ...] = (1, 4, 32, 128)
    hidden: int = 128  # units per hidden layer
    depth: int = 2  # hidden layers
    epochs: float = 0.25  # passes over the 4000 training digits, equal for every batch size
    lr: float = 1e-3  # Adam learning rate
    min_steps: int = 100  # floor on steps per run
    max_steps: int = 0  # cap on steps per run (0: none)
    c1_samples: int = 256  # test digits used for the batch-independence check


SUITES = {
    "smoke": dict(norms=("none", "batch", "layer"), batch_sizes=(1, 32), hidden=64, epochs=0.05, min_steps=10,
                  c1_samples=32),
    "quick": {},
    # 3.2 epochs = 100 steps (min_steps) at batch 128: the same examples seen at every batch size
    "full": dict(hidden=1000, batch_sizes=(1, 2, 4, 8, 32, 128), epochs=3.2),
}
EST_SECONDS = {"smoke": 3, "quick": 50, "full": 1070}
N_TRAIN = 4000  # training digits of lnorm.lab.data.mnist


def units(cfg: Config) -> list[dict]:
    return [{"norm": n, "batch_size": b} for n in cfg.norms for b in cfg.batch_sizes]


def steps_for(cfg: Config, batch_size: int, n_train: int = N_TRAIN) -> int:
    """Optimizer steps of a run: ``epochs`` x ``n_train`` examples, at least ``min_steps``, at most
    ``max_steps`` (when set)."""
    steps = max(1, cfg.min_steps, int(cfg.epochs * n_train / batch_size))
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


def budget_label(cfg: Config, n_train: int = N_TRAIN) -> str:
    """The examples each batch size sees, for titles: one number when they are all equal."""
    seen = {b: steps_for(cfg, b, n_train) * b for b in sorted(cfg.batch_sizes)}
    k = lambda n: f"{n / 1000:.3g}k" if n >= 1000 else str(n)  # noqa: E731
    if len(set(seen.values())) == 1:
        return f"same examples seen: {k(next(iter(seen.values())))}"
    return "examples seen: " + ", ".join(f"{k(n)} at batch {b}" for b, n in seen.items())


@torch.no_grad()
def batch_dependence(model, X: torch.Tensor) -> float:
    """Largest |output in one batch - output in batches of 2|, both in training mode."""
    model.train()
    whole = model(X)
    pairs = torch.cat([model(X[i:i + 2]) for i in range(0, len(X) - len(X) % 2, 2)])
    return float((whole[:len(pairs)] - pairs).abs().max())


def run(cfg: Config, params: dict, seed: int, ctx) -> dict:
    data = mnist()
    bs = params["batch_size"]
    steps = steps_for(cfg, bs, len(data[0]))
    model = MLP(784, cfg.hidden, cfg.depth, 10, params["norm"])
    out = train_classifier(model, data, ctx=ctx, batch_size=bs, steps=steps, lr=cfg.lr,
                           eval_every=max(1, steps // 5), device=ctx.device)
    state = {k: v.clone() for k, v in model.state_dict().items()}  # the check must not move BN's running stats
    out["batch_dependence"] = batch_dependence(model, data[2][:cfg.c1_samples].to(ctx.device))
    model.load_state_dict(state)
    out["steps"] = steps
    return out


# criteria (pure functions of numbers)

def verdict_c1(ln_dependence: list[float], bn_dependence: list[float], tol: float = 1e-4) -> tuple[str, str]:
    """C1: every layer-norm model gives the same outputs whatever the batch (max diff < tol), and
    the check detects batch norm's dependence (> 100 tol) so it could have failed."""
    v = S.exact_vs_batch_norm(ln_dependence, bn_dependence, tol)
    if not ln_dependence:
        return v, "no layer-norm runs"
    ln_max = max(ln_dependence)
    if v == S.NOT_SUPPORTED:
        return v, f"LN outputs change with the batch by up to {ln_max:.2g} (tolerance {tol:g})"
    ev = f"LN max |Δoutput| one batch vs pairs = {ln_max:.2g} over {len(ln_dependence)} models"
    if v == S.INCONCLUSIVE:
        return v, ev + "; the check did not detect BN's dependence, so it may be blind"
    return v, ev + f"; BN: {min(bn_dependence):.2g} or more"


def verdict_c3(bn_b1_status: list[str], ln_b1_acc: list[float], ref_b1_acc: list[float], bn_drop: list[float],
               ln_drop: list[float], tol: float = 0.05, margin: float = 0.005) -> tuple[str, str]:
    """C3 has three parts, all needed: BN cannot train at batch 1 (every seed); LN works at batch 1
    (its mean accuracy is within ``tol`` of the reference, the unnormalized net at batch 1 with the
    same budget, or better); BN loses more accuracy going from the largest batch to the
    smallest batch it can train with than LN does (Welch 95% interval of the drop difference > 0;
    not supported if it rules out more than ``margin``)."""
    parts, ev = [], []
    if bn_b1_status:
        ok = all(s == "cannot_train" for s in bn_b1_status)
        parts.append(S.SUPPORTED if ok else S.NOT_SUPPORTED)
        ev.append(f"BN@1: {'cannot train' if ok else 'trained'} ({len(bn_b1_status)} seeds)")
    if ln_b1_acc and ref_b1_acc:
        ok = S.mean_ci(ln_b1_acc)[0] >= S.mean_ci(ref_b1_acc)[0] - tol
        parts.append(S.SUPPORTED if ok else S.NOT_SUPPORTED)
        ev.append(f"acc at batch 1: LN {S.fmt_ci(ln_b1_acc)}, no norm {S.fmt_ci(ref_b1_acc)}")
    v, d = S.greater(bn_drop, ln_drop, margin)
    parts.append(v)
    ev.append(f"acc drop large->small batch BN minus LN {S.fmt_diff(d)}")
    return S.all_of(*parts), "; ".join(ev)


def verdict_c6(bn_acc: list[float], ln_acc: list[float], margin: float = 0.01) -> tuple[str, str]:
    """C6 (non-inferiority at the largest batch): supported if the 95% interval of BN - LN accuracy
    lies above -margin; not supported if BN is significantly worse (interval below 0)."""
    d, lo, hi = S.diff_ci(bn_acc, ln_acc)
    if lo != lo:
        v = S.INCONCLUSIVE
    elif lo > -margin:
        v = S.SUPPORTED
    elif hi < 0:
        v = S.NOT_SUPPORTED
    else:
        v = S.INCONCLUSIVE
    return v, f"BN {S.fmt_ci(bn_acc)} vs LN {S.fmt_ci(ln_acc)}; BN-LN {S.fmt_diff((d, lo, hi))}"


def analyze(cfg: Config, results: dict) -> dict:
    recs = results["e1"]

    def sel(norm, bs, key="test_acc"):
        return A.values(recs, key, norm=norm, batch_size=bs)

    bss = sorted(cfg.batch_sizes)
    rows = [[n, b, A.cell(recs, "test_acc", norm=n, batch_size=b), S.fmt_ci(sel(n, b, "final_loss")),
             S.fmt_ci(sel(n, b, "ms_per_step"))] for n in cfg.norms for b in bss]
    series = [A.series(recs, "test_acc", n, bss, "batch_size", norm=n) for n in cfg.norms]
    claims = []
    big, small = bss[-1], bss[0]
    if "layer" in cfg.norms:
        v, ev = verdict_c1(A.values(recs, "batch_dependence", norm="layer"),
                           A.values(recs, "batch_dependence", norm="batch"))
        claims.append({"claim": "C1", "verdict": v, "evidence": ev, "criterion":
                       "trained LN models give outputs that differ by < 1e-4 between one batch and batches of 2 "
                       "(training mode), and the same check detects BN (> 1e-2)."})
    if {"batch", "layer"} <= set(cfg.norms) and len(bss) >= 2:
        trainable = [b for b in bss if sel("batch", b)]
        bn_small = trainable[0] if trainable else small
        drops = {}
        for n in ("batch", "layer"):
            at_big, at_small = A.paired(recs, "test_acc", {"norm": n, "batch_size": big}, {"norm": n, "batch_size": bn_small})
            drops[n] = [a - b for a, b in zip(at_big, at_small, strict=True)]
        bn1 = A.statuses(recs, norm="batch", batch_size=1)
        v, ev = verdict_c3(bn1, sel("layer", 1), sel("none", 1), drops["batch"] if bn_small != big else [], drops["layer"])
        claims.append({"claim": "C3", "verdict": v, "evidence": ev, "criterion":
                       f"BN cannot train at batch 1; LN's accuracy at batch 1 is within 5 points of the unnormalized net's at batch 1 "
                       f"(same budget) or better; BN's accuracy drop from batch {big} "
                       f"to batch {bn_small} exceeds LN's (Welch 95% CI > 0)."})
        v, ev = verdict_c6(sel("batch", big), sel("layer", big))
        claims.append({"claim": "C6", "verdict": v, "evidence": f"batch {big}: {ev}", "criterion":
                       f"at batch {big}, the 95% CI of BN minus LN test accuracy lies above -1 point."})
    return {
        "figures": [{"name": "e1_accuracy_vs_batch", "title": f"E1: MNIST test accuracy vs batch size ({budget_label(cfg)})",
                     "xlabel": "batch size", "ylabel": "test accuracy", "logx": True, "series": series}],
        "tables": [{"title": "Test accuracy, final training loss and time per step (mean ± 95% CI half-width)",
                    "columns": ["norm", "batch", "test acc", "final loss", "ms/step"], "rows": rows}],
        "claims": claims,
        "notes": ["Paper (Ba et al. 2016, fig. 3): 784-1000-1000-10 MLP; LN is robust to batch size while BN "
                  "degrades at batch 4. Ours: smaller MLP, 4000 real MNIST digits, Adam, steps = max(epochs x 4000 / batch, "
                  f"{cfg.min_steps}) with epochs = {cfg.epochs}."],
    }
