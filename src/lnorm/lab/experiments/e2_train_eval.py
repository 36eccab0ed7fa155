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
from lnorm.nn.factory import NORM_KINDS

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
EST_SECONDS = {"smoke": 2, "quick": 8, "full": 380}  # full: 373 s summed over its 15 runs (--jobs 2, EPYC, 70bf14f)
# the names each string field takes, checked before a run starts (lnorm.lab.config.resolve)
CHOICES = {"norms": NORM_KINDS}


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

TOL = 1e-4  # float rounding of a relative output difference; LN's exact checks must stay below it
GAP_MIN_EFFECT, GAP_MARGIN = 1e-2, 1e-3  # BN's relative train/eval output gap: 1% of the output
# scale (100x the rounding tolerance) is a difference a deployed model's logits would show


def row_c2_ln_exact(ln_gap: list[float], bn_gap: list[float]) -> dict:
    """C2, LN's side (by construction: LN normalizes each sample by its own statistics in both
    modes): every LN seed's relative train/eval gap is below ``TOL``; the check is blind, and so
    inconclusive, unless BN's gap clears ``100 * TOL`` in every seed."""
    v = S.exact_vs_batch_norm(ln_gap, bn_gap, TOL) if ln_gap and bn_gap else S.INCONCLUSIVE
    bad = S.exact_nonfinite_note(ln_gap, bn_gap)  # a non-finite gap is a failed measurement: say so
    ev = (f"relative train/eval output gap: LN max {S.fmt_extreme(ln_gap)}, BN min {S.fmt_extreme(bn_gap, False)}"
          if ln_gap and bn_gap else "missing LN or BN runs")
    if ln_gap and bn_gap and bad:
        ev += f" ({bad})"
    elif v == S.INCONCLUSIVE and ln_gap and bn_gap:
        ev += " (BN shows no gap either: the probe may be blind)"
    return A.claim_row("e2", "C2", "C2-ln-train-eval-exact", None, f"LN's relative train/eval output gap < {TOL:g} "
                       f"in every seed, with BN's > {100 * TOL:g} (the probe can see a gap).", role="by construction",
                       verdict=v, evidence=ev)


def row_c2_bn_gap(ln_gap: dict, bn_gap: dict, ln_exact: str) -> dict:
    """C2, BN's side (the primary test): BN's relative train/eval output gap exceeds LN's, paired
    by seed. LN failing its exact check makes the claim not supported whatever BN does."""
    eff = S.compare(bn_gap, ln_gap, min_effect=GAP_MIN_EFFECT, margin=GAP_MARGIN, unit="relative gap")
    verdict = S.NOT_SUPPORTED if ln_exact == S.NOT_SUPPORTED else None
    return A.claim_row("e2", "C2", "C2-bn-train-eval-gap", eff,
                       f"BN minus LN relative train/eval output gap, paired by seed: supported if > 0 and >= "
                       f"{GAP_MIN_EFFECT:g} (1% of the output scale); not supported if the CI rules out "
                       f"{GAP_MARGIN:g}, or if LN's exact check (C2-ln-train-eval-exact) fails.",
                       evidence=f"LN exact check {ln_exact}", verdict=verdict)


def row_c1(ln_change: list[float], bn_change: list[float]) -> dict:
    """C1 (by construction): changing the rest of the batch moves no LN output (relative change <
    ``TOL``), while it moves BN's (> 100 ``TOL``: the probe can see batch dependence)."""
    if not ln_change or not bn_change:
        v, ev = S.INCONCLUSIVE, "missing LN or BN runs"
    else:
        v = S.exact_vs_batch_norm(ln_change, bn_change, TOL)
        bad = S.exact_nonfinite_note(ln_change, bn_change)  # a non-finite change is a failed measurement
        ev = (f"max relative change of a sample's output when its batch changes: LN {S.fmt_extreme(ln_change)}, "
              f"BN {S.fmt_extreme(bn_change, False)}"
              + (f" ({bad})" if bad else " (the probe did not detect BN)" if v == S.INCONCLUSIVE else ""))
    return A.claim_row("e2", "C1", "C1-batch-independence", None,
                       f"in training mode, rolling/splitting/replacing the batch changes LN outputs by < {TOL:g} "
                       f"(relative) and BN's by more than {100 * TOL:g}.", role="by construction", verdict=v,
                       evidence=ev)


def analyze(cfg: Config, results: dict) -> dict:
    recs = results["e2"]
    keys = [("test_acc", "test acc"), ("max_output_gap", "max |train-eval| output"),
            ("relative_gap", "relative gap"), ("acc_train_mode", "acc, train mode"),
            ("acc_eval_mode", "acc, eval mode"), ("batch_max_relative_change", "batch dependence")]
    rows = [[n] + [A.cell(recs, k, norm=n) for k, _ in keys] for n in cfg.norms]
    claims = []
    if {"batch", "layer"} <= set(cfg.norms):
        gap = {n: A.scored(recs, "relative_gap", None, norm=n) for n in ("layer", "batch")}
        exact = row_c2_ln_exact(A.values(recs, "relative_gap", norm="layer"), A.values(recs, "relative_gap", norm="batch"))
        claims += [row_c2_bn_gap(gap["layer"], gap["batch"], exact["verdict"]), exact]
        claims.append(row_c1(A.values(recs, "batch_max_relative_change", norm="layer"),
                             A.values(recs, "batch_max_relative_change", norm="batch")))
    fig = {"name": "e2_train_eval_gap", "title": "E2: relative train/eval output gap by norm (exact 0 drawn at 1e-9)",
           "xlabel": "norm", "ylabel": "relative gap", "logy": True,
           "series": [{"label": n, "x": [n], "y": [max(1e-9, S.mean_ci(A.values(recs, "relative_gap", norm=n))[0] or 1e-9)]}
                      for n in cfg.norms if A.values(recs, "relative_gap", norm=n)]}
    return {"figures": [fig], "claims": claims,
            "tables": [{"title": "Train vs eval mode (mean ± 95% CI)", "columns": ["norm"] + [h for _, h in keys],
                        "rows": rows}]}
