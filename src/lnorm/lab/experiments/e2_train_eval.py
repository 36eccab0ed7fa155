"""E2 train/eval consistency (C1, C2): the same trained MLP in training and in inference mode.

For batch, layer and RMS norm: the largest difference between train-mode and eval-mode outputs
on the test set, the accuracy in each mode, and whether a sample's output changes with the rest
of its batch (``lnorm.diagnostics``: rolled, split and replaced batches, in training mode).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lnorm.diagnostics import check_batch_independence, train_eval_gap
from lnorm.lab import analysis as A
from lnorm.lab import stats as S
from lnorm.lab.data import mnist
from lnorm.lab.models import MLP
from lnorm.lab.train import train_classifier

TITLE = "Train/eval consistency and batch independence: MLP on real MNIST"
CLAIMS = ("C1", "C2")


@dataclass
class Config:
    norms: tuple[str, ...] = ("batch", "layer", "rms")
    hidden: int = 256  # units per hidden layer
    depth: int = 2
    batch_size: int = 32
    steps: int = 150  # optimizer steps (Adam)
    lr: float = 1e-3
    eval_batch: int = 100  # test digits per forward pass when measuring


SUITES = {"smoke": dict(norms=("batch", "layer"), hidden=32, steps=20), "quick": {},
          "full": dict(hidden=1000, steps=2000)}
EST_SECONDS = {"smoke": 2, "quick": 8, "full": 250}


def units(cfg: Config) -> list[dict]:
    return [{"norm": n} for n in cfg.norms]


@torch.no_grad()
def _mode_outputs(model, X, bs, train: bool) -> torch.Tensor:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train(train)
    out = torch.cat([model(X[i:i + bs]) for i in range(0, len(X), bs)])
    model.load_state_dict(state)
    model.eval()
    return out


def run(cfg: Config, params: dict, seed: int, ctx) -> dict:
    data = mnist()
    model = MLP(784, cfg.hidden, cfg.depth, 10, params["norm"])
    out = train_classifier(model, data, ctx=ctx, batch_size=cfg.batch_size, steps=cfg.steps, lr=cfg.lr,
                           eval_every=max(1, cfg.steps // 5), device=ctx.device)
    Xte, yte = data[2].to(ctx.device), data[3].to(ctx.device)
    y_train_mode = _mode_outputs(model, Xte, cfg.eval_batch, True)
    y_eval_mode = _mode_outputs(model, Xte, cfg.eval_batch, False)
    gap = train_eval_gap(model, Xte[:cfg.eval_batch])
    ind = check_batch_independence(model, Xte[:64], mode="train")
    return {
        **out,
        "max_output_gap": float((y_train_mode - y_eval_mode).abs().max()),
        "relative_gap": gap.relative_gap,
        "acc_train_mode": float((y_train_mode.argmax(-1) == yte).float().mean()),
        "acc_eval_mode": float((y_eval_mode.argmax(-1) == yte).float().mean()),
        "batch_max_relative_change": ind.max_relative_change,
        "batch_independent": bool(ind.independent),
    }


# criteria

def verdict_c2(ln_gap: list[float], bn_gap: list[float], tol: float = 1e-4) -> tuple[str, str]:
    """C2: the LN model's train- and eval-mode outputs agree (relative gap < tol in every seed), and
    BN's do not (relative gap > 100 tol in every seed, showing the measure can see a gap)."""
    if not ln_gap or not bn_gap:
        return S.INCONCLUSIVE, "missing LN or BN runs"
    v = S.exact_vs_batch_norm(ln_gap, bn_gap, tol)
    ev = f"relative train/eval output gap: LN max {max(ln_gap):.2g}, BN min {min(bn_gap):.2g}"
    return v, ev + (" (BN shows no gap either: the probe may be blind)" if v == S.INCONCLUSIVE else "")


def verdict_c1(ln_change: list[float], bn_change: list[float], tol: float = 1e-4) -> tuple[str, str]:
    """C1: changing the rest of the batch moves no LN output (relative change < tol) and moves BN's."""
    if not ln_change or not bn_change:
        return S.INCONCLUSIVE, "missing LN or BN runs"
    v = S.exact_vs_batch_norm(ln_change, bn_change, tol)
    ev = f"max relative change of a sample's output when its batch changes: LN {max(ln_change):.2g}, BN {min(bn_change):.2g}"
    return v, ev + (" (the probe did not detect BN)" if v == S.INCONCLUSIVE else "")


def analyze(cfg: Config, results: dict) -> dict:
    recs = results["e2"]
    keys = [("test_acc", "test acc"), ("max_output_gap", "max |train-eval| output"),
            ("relative_gap", "relative gap"), ("acc_train_mode", "acc, train mode"),
            ("acc_eval_mode", "acc, eval mode"), ("batch_max_relative_change", "batch dependence")]
    rows = [[n] + [A.cell(recs, k, norm=n) for k, _ in keys] for n in cfg.norms]
    claims = []
    if {"batch", "layer"} <= set(cfg.norms):
        v, ev = verdict_c2(A.values(recs, "relative_gap", norm="layer"), A.values(recs, "relative_gap", norm="batch"))
        acc_gap = [a - b for a, b in zip(A.values(recs, "acc_train_mode", norm="batch"),
                                         A.values(recs, "acc_eval_mode", norm="batch"), strict=True)]
        claims.append({"claim": "C2", "verdict": v, "evidence": ev + f"; BN accuracy train-eval mode {S.fmt_ci(acc_gap)}",
                       "criterion": "LN's relative train/eval output gap < 1e-4 in every seed, BN's > 1e-2."})
        v, ev = verdict_c1(A.values(recs, "batch_max_relative_change", norm="layer"),
                           A.values(recs, "batch_max_relative_change", norm="batch"))
        claims.append({"claim": "C1", "verdict": v, "evidence": ev,
                       "criterion": "in training mode, rolling/splitting/replacing the batch changes LN outputs by "
                                    "< 1e-4 (relative) and BN's by more than 1e-2."})
    fig = {"name": "e2_train_eval_gap", "title": "E2: relative train/eval output gap by norm (exact 0 drawn at 1e-9)",
           "xlabel": "norm", "ylabel": "relative gap", "logy": True,
           "series": [{"label": n, "x": [n], "y": [max(1e-9, S.mean_ci(A.values(recs, "relative_gap", norm=n))[0] or 1e-9)]}
                      for n in cfg.norms if A.values(recs, "relative_gap", norm=n)]}
    return {"figures": [fig], "claims": claims,
            "tables": [{"title": "Train vs eval mode (mean ± 95% CI)", "columns": ["norm"] + [h for _, h in keys],
                        "rows": rows}]}
