"""E8 gradient scale (C13): a deep MLP (24 hidden layers) on real MNIST with and without layer norm.

Gradient norm of every linear layer's weight at initialisation and after training, and whether
the net trains at all. Well-scaled: the ratio between the largest and smallest per-layer gradient
norm stays small.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from lnorm.lab import analysis as A
from lnorm.lab import stats as S
from lnorm.lab.data import mnist
from lnorm.lab.models import MLP
from lnorm.lab.train import train_classifier

TITLE = "Gradient scale in a deep MLP (real MNIST)"
CLAIMS = ("C13",)


@dataclass
class Config:
    norms: tuple[str, ...] = ("none", "layer")
    depth: int = 24  # hidden layers
    hidden: int = 64
    act: str = "tanh"
    batch_size: int = 64
    steps: int = 200
    optimizer: str = "adam"  # adam or sgd (momentum 0.9)
    lr: float = 1e-3
    probe: int = 256  # training digits used to measure gradient norms


SUITES = {"smoke": dict(depth=6, hidden=16, steps=10, probe=64), "quick": {},
          "full": dict(steps=2000, hidden=256)}
EST_SECONDS = {"smoke": 2, "quick": 12, "full": 400}


def units(cfg: Config) -> list[dict]:
    return [{"norm": n} for n in cfg.norms]


def grad_norms(model: MLP, X, y) -> list[float]:
    """Frobenius norm of the loss gradient w.r.t. each linear weight, input layer first."""
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(X), y).backward()
    out = [float(m.weight.grad.norm()) for m in model.linears()]
    model.zero_grad(set_to_none=True)
    return out


def run(cfg: Config, params: dict, seed: int, ctx) -> dict:
    data = mnist()
    model = MLP(784, cfg.hidden, cfg.depth, 10, params["norm"], act=cfg.act).to(ctx.device)
    Xp, yp = data[0][:cfg.probe].to(ctx.device), data[1][:cfg.probe].to(ctx.device)
    g0 = grad_norms(model, Xp, yp)
    out = train_classifier(model, data, ctx=ctx, batch_size=cfg.batch_size, steps=cfg.steps, lr=cfg.lr,
                           optimizer=cfg.optimizer, eval_every=max(1, cfg.steps // 10), device=ctx.device)
    g1 = grad_norms(model, Xp, yp)
    return {**out, "grad_init": g0, "grad_trained": g1, "log10_spread_init": spread(g0),
            "log10_spread_trained": spread(g1)}


def spread(g: list[float]) -> float:
    """log10(max/min) of the per-layer gradient norms: 0 is perfectly even; inf if one is zero."""
    lo, hi = min(g), max(g)
    return math.inf if lo <= 0 else math.log10(hi / lo)


def verdict_c13(spread_ln: list[float], spread_none: list[float], acc_ln: list[float], chance: float = 0.1,
                margin: float = 0.1) -> tuple[str, str]:
    """C13: at initialisation LN's per-layer gradient norms are more even than without a norm
    (Welch 95% CI of log10 spread none - LN > 0) and the LN net trains (every seed above 2x chance)."""
    v, d = S.greater(spread_none, spread_ln, margin)
    if len(acc_ln) < 2:  # one seed decides nothing
        trains = S.INCONCLUSIVE
    else:
        trains = S.SUPPORTED if min(acc_ln) > 2 * chance else S.NOT_SUPPORTED
    return S.all_of(v, trains), (f"log10(max/min layer grad norm) at init: none {S.fmt_ci(spread_none)}, "
                                 f"LN {S.fmt_ci(spread_ln)}, none-LN {S.fmt_diff(d)}; LN test acc {S.fmt_ci(acc_ln)}")


def analyze(cfg: Config, results: dict) -> dict:
    recs = results["e8"]
    rows = [[n, A.cell(recs, "log10_spread_init", norm=n), A.cell(recs, "log10_spread_trained", norm=n),
             A.cell(recs, "test_acc", norm=n), ", ".join(sorted(set(A.statuses(recs, norm=n))))] for n in cfg.norms]
    series = []
    for n in cfg.norms:
        for key, when in (("grad_init", "init"), ("grad_trained", "trained")):
            runs = A.values(recs, key, norm=n)
            if runs:
                L = len(runs[0])
                series.append({"label": f"{n}, {when}", "x": list(range(1, L + 1)),
                               "y": [S.mean_ci([r[i] for r in runs])[0] for i in range(L)]})
    claims = []
    if {"none", "layer"} <= set(cfg.norms):
        v, ev = verdict_c13(A.values(recs, "log10_spread_init", norm="layer"),
                            A.values(recs, "log10_spread_init", norm="none"), A.values(recs, "test_acc", norm="layer"))
        claims.append({"claim": "C13", "verdict": v, "evidence": ev, "criterion":
                       f"{cfg.depth}-layer {cfg.act} MLP: the spread of per-layer gradient norms at init is smaller with "
                       "LN (Welch 95% CI of the difference of log10 spreads > 0) and the LN net trains (acc > 20%)."})
    return {"claims": claims,
            "figures": [{"name": "e8_grad_norms", "title": "E8: gradient norm per layer (mean over seeds)",
                         "xlabel": "layer (input first)", "ylabel": "||dL/dW||", "logy": True, "series": series}],
            "tables": [{"title": "Gradient spread and accuracy (mean ± 95% CI)", "columns":
                        ["norm", "log10 spread, init", "log10 spread, trained", "test acc", "status"], "rows": rows}]}
