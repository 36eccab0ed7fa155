"""E7 practice (C10, C11): LN gain initialisation in LayerNormLSTM (1, 0.1, or random U[0, 1]; the
paper found 1.0 better than 0.1) on the character language model, and a learning-rate sweep of an
MLP on real MNIST (SGD with momentum) with and without layer norm."""

from __future__ import annotations

from dataclasses import dataclass

from lnorm.lab import analysis as A
from lnorm.lab import stats as S
from lnorm.lab.data import mnist
from lnorm.lab.lm import LMConfig, train_lm
from lnorm.lab.models import MLP
from lnorm.lab.stats import verdict_higher_lr
from lnorm.lab.train import train_classifier

TITLE = "Practice: LN gain initialisation and learning rate"
CLAIMS = ("C10", "C11")


@dataclass
class Config:
    gains: tuple[str, ...] = ("one", "0.1", "random")
    lm_hidden: int = 64
    lm_seq_len: int = 48
    lm_steps: int = 150
    lm_eval_every: int = 50
    lrs: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0)  # SGD learning rates of the MLP sweep
    norms: tuple[str, ...] = ("none", "layer")
    mlp_hidden: int = 128
    mlp_depth: int = 3
    mlp_steps: int = 200
    batch_size: int = 64


SUITES = {"smoke": dict(gains=("one", "0.1"), lm_hidden=8, lm_seq_len=8, lm_steps=3, lm_eval_every=3,
                        lrs=(0.01, 0.3), mlp_hidden=16, mlp_steps=10),
          "quick": {}, "full": dict(lm_hidden=128, lm_seq_len=64, lm_steps=800, lm_eval_every=50, mlp_steps=2000,
                                    lrs=(0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0))}
EST_SECONDS = {"smoke": 2, "quick": 60, "full": 1700}


def units(cfg: Config) -> list[dict]:
    return ([{"part": "gain", "gain": g} for g in cfg.gains]
            + [{"part": "lr", "norm": n, "lr": lr} for n in cfg.norms for lr in cfg.lrs])


def run(cfg: Config, params: dict, seed: int, ctx) -> dict:
    if params["part"] == "gain":
        lm = LMConfig(hidden=cfg.lm_hidden, seq_len=cfg.lm_seq_len, steps=cfg.lm_steps,
                      eval_every=cfg.lm_eval_every, gain_init=params["gain"])
        return train_lm(lm, "lnlstm", seed, ctx)
    model = MLP(784, cfg.mlp_hidden, cfg.mlp_depth, 10, params["norm"])
    return train_classifier(model, mnist(), ctx=ctx, batch_size=cfg.batch_size, steps=cfg.mlp_steps,
                            lr=params["lr"], optimizer="sgd", eval_every=0, device=ctx.device)


# criteria

def verdict_c10(one: list[float], alternatives: dict[str, list[float]], margin: float = 0.01) -> tuple[str, str]:
    """C10 (lower is better, e.g. bpc): gain 1 beats 0.1 (Welch 95% CI of 0.1 - one > 0) and no
    alternative beats gain 1 significantly. Not supported if any alternative is significantly better."""
    parts, ev = [], []
    for name, vals in alternatives.items():
        v, d = S.greater(vals, one, margin)
        worse, _ = S.greater(one, vals, 0.0)
        ev.append(f"{name} - one {S.fmt_diff(d)}")
        if worse == S.SUPPORTED:
            parts.append(S.NOT_SUPPORTED)
        elif name == "0.1":
            parts.append(v)
    return S.all_of(*parts) if parts else S.INCONCLUSIVE, "; ".join(ev)


def analyze(cfg: Config, results: dict) -> dict:
    recs = results["e7"]
    claims, tables, figs = [], [], []
    if cfg.gains:
        tables.append({"title": f"LayerNormLSTM char LM, gain initialisation ({cfg.lm_steps} steps)",
                       "columns": ["gain init", "final val bpc", "mean val bpc", "hidden-norm CV"],
                       "rows": [[g, A.cell(recs, "final_bpc", part="gain", gain=g), A.cell(recs, "mean_bpc", part="gain", gain=g),
                                 A.cell(recs, "hidden_norm_cv", part="gain", gain=g)] for g in cfg.gains]})
        figs.append({"name": "e7_gain_init", "title": "E7: LayerNormLSTM validation bpc by gain initialisation",
                     "xlabel": "step", "ylabel": "val bpc",
                     "series": [A.curve_series(recs, "curve_bpc", g, "curve_step", part="gain", gain=g) for g in cfg.gains]})
        if "one" in cfg.gains and "0.1" in cfg.gains:
            alts = {g: A.values(recs, "final_bpc", part="gain", gain=g) for g in cfg.gains if g != "one"}
            v, ev = verdict_c10(A.values(recs, "final_bpc", part="gain", gain="one"), alts)
            claims.append({"claim": "C10", "verdict": v, "evidence": f"final val bpc: {ev}", "criterion":
                           "LayerNormLSTM char LM: gain 1 gives lower final bpc than 0.1 (Welch 95% CI > 0) and no "
                           "alternative initialisation is significantly better."})
    if cfg.lrs and cfg.norms:
        tables.append({"title": f"MLP on MNIST, SGD momentum 0.9, {cfg.mlp_steps} steps: test accuracy by lr",
                       "columns": ["lr"] + list(cfg.norms),
                       "rows": [[lr] + [A.cell(recs, "test_acc", part="lr", norm=n, lr=lr) for n in cfg.norms] for lr in cfg.lrs]})
        figs.append({"name": "e7_lr_sweep", "title": "E7: MLP test accuracy vs SGD learning rate", "xlabel": "learning rate",
                     "ylabel": "test accuracy", "logx": True,
                     "series": [A.series(recs, "test_acc", n, cfg.lrs, "lr", part="lr", norm=n) for n in cfg.norms]})
        if {"none", "layer"} <= set(cfg.norms) and len(cfg.lrs) >= 2:
            acc = lambda n, lr: [a if st == "ok" else 0.0 for a, st in zip(  # noqa: E731
                [r["result"].get("test_acc", 0.0) for r in recs if r["params"].get("norm") == n and r["params"].get("lr") == lr
                 and r["status"] in ("ok", "diverged")],
                [r["status"] for r in recs if r["params"].get("norm") == n and r["params"].get("lr") == lr
                 and r["status"] in ("ok", "diverged")], strict=True)]
            v, ev = verdict_higher_lr({lr: acc("layer", lr) for lr in cfg.lrs}, {lr: acc("none", lr) for lr in cfg.lrs})
            claims.append({"claim": "C11", "verdict": v, "evidence": f"MLP/SGD, test acc (diverged = 0): {ev}", "criterion":
                           "the SGD learning rate with the best mean test accuracy is higher with LN than without, and LN "
                           "at its best lr is significantly better than LN at no-norm's best lr."})
    return {"claims": claims, "tables": tables, "figures": figs,
            "notes": ["Paper (Ba et al. 2016): initialising the LN gain to 1.0 worked better than 0.1 in their LSTM."]}
