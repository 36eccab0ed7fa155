"""E8 gradient scale (C13): a deep MLP (24 hidden layers of tanh) on real MNIST with layer norm
against unnormalized nets with fair initialisations for tanh.

The baselines are the same net without a norm under PyTorch's default init (``default``), Xavier
normal with the tanh gain 5/3 (``xavier``) and orthogonal with the same gain (``orthogonal``): a
deep tanh net is expected to fail under a poor init, so beating only the default would say little.
Measured: the gradient norm of every linear layer's weight at initialisation and after training,
and test accuracy. Well-scaled: the spread ``log10(max / min)`` of the per-layer gradient norms is
small. Runs of one seed share the probe batch and the data order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lnorm.lab import analysis as A
from lnorm.lab import stats as S
from lnorm.lab.data import mnist
from lnorm.lab.models import ACTIVATIONS, MLP
from lnorm.lab.train import OPTIMIZERS, Diverged, train_classifier
from lnorm.nn.factory import NORM_KINDS

TITLE = "Gradient scale in a deep MLP (real MNIST): layer norm against fair inits for tanh"
CLAIMS = ("C13",)
INITS = ("default", "xavier", "orthogonal")
CHANCE = 0.1  # accuracy of a diverged run (10 classes)
ACC_RESOLUTION = 1e-3  # one of the 1000 test digits
SPREAD_FAIL = 76.0  # log10 spread of a layer whose gradient is exactly 0: the float32 range (1e-38..3e38)


@dataclass
class Config:
    norms: tuple[str, ...] = ("none", "layer")
    baseline_inits: tuple[str, ...] = INITS  # inits of the unnormalized net (LN keeps torch's default)
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
EST_SECONDS = {"smoke": 2, "quick": 25, "full": 800}  # quick: 23 s CPU, --jobs 1, 2-core EPYC
# the names each string field takes, checked before a run starts (lnorm.lab.config.resolve)
CHOICES = {"norms": NORM_KINDS, "baseline_inits": INITS, "act": tuple(ACTIVATIONS), "optimizer": OPTIMIZERS}


def units(cfg: Config) -> list[dict]:
    bad = [i for i in cfg.baseline_inits if i not in INITS]
    if bad:
        raise ValueError(f"e8.baseline_inits: unknown init {bad[0]!r}; valid: {', '.join(INITS)}")
    return [{"norm": n, "init": i} for n in cfg.norms for i in (cfg.baseline_inits if n == "none" else ("default",))]


def init_weights(model: MLP, how: str, act: str) -> None:
    """``default`` leaves torch's init; ``xavier`` / ``orthogonal`` set every hidden weight with the
    activation's gain (5/3 for tanh), the head with gain 1, and the biases to 0."""
    if how == "default":
        return
    init = {"xavier": nn.init.xavier_normal_, "orthogonal": nn.init.orthogonal_}[how]
    linears = model.linears()
    with torch.no_grad():
        for i, m in enumerate(linears):
            init(m.weight, gain=1.0 if i == len(linears) - 1 else nn.init.calculate_gain(act))
            m.bias.zero_()


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
    init_weights(model, params.get("init", "default"), cfg.act)
    torch.manual_seed(10_000 + seed)  # the same data order for every variant of a seed
    Xp, yp = data[0][:cfg.probe].to(ctx.device), data[1][:cfg.probe].to(ctx.device)
    g0 = grad_norms(model, Xp, yp)
    at_init = {"grad_init": g0, "log10_spread_init": spread(g0)}
    try:
        out = train_classifier(model, data, ctx=ctx, batch_size=cfg.batch_size, steps=cfg.steps, lr=cfg.lr,
                               optimizer=cfg.optimizer, eval_every=max(1, cfg.steps // 10), device=ctx.device)
    except Diverged as exc:  # the spread at init is still a measurement
        raise Diverged(exc.step, exc.loss, {**exc.partial, **at_init}) from None
    g1 = grad_norms(model, Xp, yp)
    return {**out, **at_init, "grad_trained": g1, "log10_spread_trained": spread(g1)}


def spread(g: list[float]) -> float:
    """log10(max/min) of the per-layer gradient norms: 0 is perfectly even; inf if one is zero."""
    lo, hi = min(g), max(g)
    return math.inf if lo <= 0 else math.log10(hi / lo)


# criterion

def verdict_c13(spread_ln: dict[int, float], spread_baselines: dict[str, dict[int, float]], acc_ln: dict[int, float],
                min_effect: float = 0.3, margin: float = 0.1, trains_by: float = 0.1
                ) -> tuple[str, str, S.Effect | None]:
    """C13, two parts, both needed, paired by seed:

    * at initialisation LN's per-layer gradient norms are more even than those of *every*
      baseline init: log10 spread baseline - LN >= ``min_effect`` (a factor 2 for 0.3), 95%
      interval > 0; not supported when the interval against any baseline rules out ``margin``.
      The row's effect is the comparison with the most even baseline (the weakest effect);
    * the LN net trains: test accuracy above chance by ``trains_by`` or more (95% interval; a
      diverged run scores chance).
    A zero gradient (infinite spread) scores ``SPREAD_FAIL``."""
    effs = {name: S.compare(b, spread_ln, paired=True, min_effect=min_effect, margin=margin, unit="log10",
                            fail_score=SPREAD_FAIL) for name, b in spread_baselines.items()}
    trains = S.compare(acc_ln, {s: CHANCE for s in acc_ln}, paired=True, min_effect=trains_by, unit="acc",
                       fail_score=CHANCE, resolution=ACC_RESOLUTION)
    ev = [f"spread at init, {n} - LN: {e.text()}" for n, e in effs.items()]
    ev.append(f"LN test acc - chance: {trains.text()} ({trains.verdict})")
    if not effs:
        return S.INCONCLUSIVE, "; ".join(ev + ["no baseline"]), None
    weakest = min(effs, key=lambda n: effs[n].estimate if effs[n].estimate == effs[n].estimate else -math.inf)
    ev.append(f"the effect shown: against {weakest}, the most even baseline")
    return S.all_of(*(e.verdict for e in effs.values()), trains.verdict), "; ".join(ev), effs[weakest]


def _at_init(recs: list[dict], **match) -> dict[int, float]:
    """``{seed: log10 spread at init}`` of finished and diverged runs (measured before training)."""
    return {r["seed"]: r["result"]["log10_spread_init"] for r in recs
            if r["status"] in ("ok", "diverged") and "log10_spread_init" in r.get("result", {})
            and all(r["params"].get(k) == v for k, v in match.items())}


def _variants(cfg: Config) -> list[tuple[str, dict]]:
    return [(u["norm"] if u["norm"] != "none" else f"none, {u['init']} init", u) for u in units(cfg)]


def analyze(cfg: Config, results: dict) -> dict:
    recs = [{**r, "params": {"init": "default", **r["params"]}} for r in results["e8"]]  # records before inits
    variants = _variants(cfg)
    rows = [[label, A.cell(recs, "log10_spread_init", **m), A.cell(recs, "log10_spread_trained", **m),
             A.cell(recs, "test_acc", **m), ", ".join(sorted(set(A.statuses(recs, **m))))] for label, m in variants]
    series = []
    for label, m in variants:
        for key, when in (("grad_init", "init"), ("grad_trained", "trained")):
            runs = A.values(recs, key, **m)
            if runs:
                L = len(runs[0])
                series.append({"label": f"{label}, {when}", "x": list(range(1, L + 1)),
                               "y": [S.mean_ci([r[i] for r in runs])[0] for i in range(L)]})
    claims = []
    if {"none", "layer"} <= set(cfg.norms) and cfg.baseline_inits:
        base = {i: _at_init(recs, norm="none", init=i) for i in cfg.baseline_inits}
        v, ev, eff = verdict_c13(_at_init(recs, norm="layer"), base,
                                 A.scored(recs, "test_acc", CHANCE, norm="layer"))
        caveats = [] if {"xavier", "orthogonal"} & set(cfg.baseline_inits) else [
            "no tanh-aware baseline init (xavier/orthogonal): only torch's default"]
        claims.append(A.claim_row("e8", "C13", "C13-grad-spread", eff, role="primary", verdict=v, evidence=ev,
                                  caveats=caveats, criterion=(
                                      f"{cfg.depth}-layer {cfg.act} MLP: at init the log10 spread of per-layer gradient "
                                      "norms is smaller with LN than without a norm under every baseline init "
                                      f"({', '.join(cfg.baseline_inits)}) by 0.3 or more (a factor 2; paired 95% CI > 0; "
                                      "not supported below 0.1 against any), and LN's test accuracy is above chance by "
                                      "10 points or more (95% CI).")))
    return {"claims": claims,
            "figures": [{"name": "e8_grad_norms", "title": "E8: gradient norm per layer (mean over seeds)",
                         "xlabel": "layer (input first)", "ylabel": "||dL/dW||", "logy": True, "series": series}],
            "tables": [{"title": "Gradient spread log10(max/min layer grad norm) and accuracy (mean ± 95% CI)",
                        "columns": ["variant", "log10 spread, init", "log10 spread, trained", "test acc", "status"],
                        "rows": rows}]}
