"""E7 practice (C10, C11): LN gain initialisation in LayerNormLSTM (1, 0.1, or random U[0, 1]; the
paper found 1.0 better than 0.1) on the character language model, and a learning-rate grid of an
MLP on real MNIST (SGD with momentum) with and without layer norm. The MNIST test digits are split
in two: the best learning rates are chosen on the first half and compared on the second
(``lnorm.lab.lrgrid``). The article's C11 is about transformers and RNNs: this MLP row is
secondary to E4's transformer row."""

from __future__ import annotations

import math
from dataclasses import dataclass

from lnorm.lab import analysis as A
from lnorm.lab import lrgrid
from lnorm.lab import stats as S
from lnorm.lab.data import mnist, text
from lnorm.lab.experiments import e3_rnn as e3
from lnorm.lab.lm import GAIN_INITS, LMConfig, train_lm
from lnorm.lab.models import MLP
from lnorm.lab.train import accuracy, train_classifier
from lnorm.nn.factory import NORM_KINDS

TITLE = "Practice: LN gain initialisation and learning rate"
CLAIMS = ("C10", "C11")
CHANCE = 0.1  # accuracy of a diverged MLP run (10 classes)


@dataclass
class Config:
    gains: tuple[str, ...] = ("one", "0.1", "random")
    lm_hidden: int = 64
    lm_seq_len: int = 48
    lm_steps: int = 150
    lm_eval_every: int = 50
    lrs: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1, 0.3)  # SGD learning rates of the MLP grid (4+ points)
    norms: tuple[str, ...] = ("none", "layer")
    mlp_hidden: int = 128
    mlp_depth: int = 3
    mlp_steps: int = 200
    batch_size: int = 64


SUITES = {"smoke": dict(gains=("one", "0.1"), lm_hidden=8, lm_seq_len=8, lm_steps=3, lm_eval_every=3,
                        lrs=(0.01, 0.3), mlp_hidden=16, mlp_steps=10),
          "quick": {}, "full": dict(lm_hidden=128, lm_seq_len=64, lm_steps=800, lm_eval_every=50, mlp_steps=2000,
                                    lrs=(0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0))}
EST_SECONDS = {"smoke": 2, "quick": 35, "full": 1700}  # quick: 33 s CPU, --jobs 1, 2-core EPYC
# the names each string field takes, checked before a run starts (lnorm.lab.config.resolve)
CHOICES = {"gains": GAIN_INITS, "norms": NORM_KINDS}
# empty gains: no gain part; empty lrs or norms: no learning-rate part (not both: no runs at all)
MAY_BE_EMPTY = ("gains", "lrs", "norms")


def units(cfg: Config) -> list[dict]:
    return ([{"part": "gain", "gain": g} for g in cfg.gains]
            + [{"part": "lr", "norm": n, "lr": lr} for n in cfg.norms for lr in cfg.lrs])


def run(cfg: Config, params: dict, seed: int, ctx) -> dict:
    if params["part"] == "gain":
        lm = LMConfig(hidden=cfg.lm_hidden, seq_len=cfg.lm_seq_len, steps=cfg.lm_steps,
                      eval_every=cfg.lm_eval_every, gain_init=params["gain"])
        return train_lm(lm, "lnlstm", seed, ctx)
    data = mnist()
    model = MLP(784, cfg.mlp_hidden, cfg.mlp_depth, 10, params["norm"])
    out = train_classifier(model, data, ctx=ctx, batch_size=cfg.batch_size, steps=cfg.mlp_steps,
                           lr=params["lr"], optimizer="sgd", eval_every=0, device=ctx.device)
    Xte, yte = data[2].to(ctx.device), data[3].to(ctx.device)
    half = len(Xte) // 2  # selection digits, then test digits
    return {**out, "sel_acc": accuracy(model, Xte[:half], yte[:half]), "heldout_acc": accuracy(model, Xte[half:], yte[half:])}


# criteria

def verdict_c10(one: dict[int, float], alternatives: dict[str, dict[int, float]], min_effect: float = 0.02,
                margin: float = 0.01) -> tuple[str, str, S.Effect | None]:
    """C10 (lower is better, e.g. bpc; per-seed dicts, paired): gain 1 beats 0.1 (``S.compare`` of
    0.1 - one, the row's effect) and no alternative beats gain 1 (not supported if one is
    significantly better)."""
    parts, ev, eff = [], [], None
    for name, vals in alternatives.items():
        e = S.compare(vals, one, paired=True, min_effect=min_effect, margin=margin, unit="bpc", fail_score=None)
        ev.append(f"{name} - one {e.text()}")
        if name == "0.1":
            eff = e
        if e.hi < 0:  # the alternative is significantly better than gain 1
            parts.append(S.NOT_SUPPORTED)
        elif name == "0.1":
            parts.append(e.verdict)
    return (S.all_of(*parts) if eff is not None else S.INCONCLUSIVE), "; ".join(ev), eff


C10_CRITERION = ("LayerNormLSTM char LM: gain 1 gives lower final bpc than 0.1 (paired 95% CI of 0.1 - one > 0, by "
                 "0.02 bpc or more; not supported below 0.01) and no alternative initialisation is significantly "
                 "better; inconclusive if gain 1's or 0.1's bpc still fell more than 0.01 (half the minimum effect) "
                 "over the last 20% of training: the final values then compare speed, not where the runs end.")


def row_c10(one: dict[int, float], alternatives: dict[str, dict[int, float]],
            curves: dict[str, list[tuple[list, list]]], min_effect: float = 0.02, margin: float = 0.01) -> dict:
    """The C10 row: :func:`verdict_c10`, undecided while gain 1's or 0.1's runs were still improving
    (``curves``: gain -> [(steps, val bpc) of each finished run]; E3's rule for C9)."""
    v, ev, eff = verdict_c10(one, alternatives, min_effect, margin)
    caveat = e3.convergence_caveat({g: curves.get(g, []) for g in ("one", "0.1")}, min_effect / 2, "val bpc")
    if caveat is not None and v in (S.SUPPORTED, S.NOT_SUPPORTED):
        v = S.INCONCLUSIVE
    return A.claim_row("e7", "C10", "C10-gain-one-vs-0.1", eff, role="primary", verdict=v,
                       caveats=[caveat] if caveat else [], evidence=f"final val bpc: {ev}", criterion=C10_CRITERION)


def _c11_row(cfg: Config, recs: list[dict]) -> dict:
    sel_seeds, test_seeds, split_caveats = lrgrid.split_seeds(r["seed"] for r in recs if r["params"].get("part") == "lr")

    def grid(key, norm):
        return {lr: A.scored(recs, key, CHANCE, part="lr", norm=norm, lr=lr) for lr in cfg.lrs}

    v, ev, eff, caveats = lrgrid.verdict_higher_lr(grid("sel_acc", "layer"), grid("sel_acc", "none"),
                                                   grid("heldout_acc", "layer"), sel_seeds, test_seeds,
                                                   min_effect=0.01, margin=0.005, unit="acc")
    scope = ("an MLP on MNIST: the article's C11 is about transformers and RNNs (E4's transformer row is the "
             "primary)")
    return A.claim_row("e7", "C11", "C11-mlp-best-lr", eff, role="secondary", verdict=v,
                       caveats=[scope] + caveats + split_caveats, evidence=f"MLP/SGD, accuracy (diverged = chance): {ev}",
                       criterion="MLP/SGD on one lr grid: no norm's best lr and LN's best lr above and at-or-below it "
                                 "are chosen on the first 500 test digits; LN's accuracy on the other 500 is higher (by "
                                 "1 point or more, paired 95% CI; not supported below 0.5) at its best lr above no "
                                 "norm's best than at or below it. Inconclusive when a best lr is at the grid's edge.")


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
            fail = math.log2(text()[2])  # a diverged run scores the bpc of a uniform prediction
            alts = {g: A.scored(recs, "final_bpc", fail, part="gain", gain=g) for g in cfg.gains if g != "one"}
            curves = {g: e3.finished_curves(recs, "curve_bpc", part="gain", gain=g) for g in cfg.gains}
            claims.append(row_c10(A.scored(recs, "final_bpc", fail, part="gain", gain="one"), alts, curves))
    if cfg.lrs and cfg.norms:
        tables.append({"title": f"MLP on MNIST, SGD momentum 0.9, {cfg.mlp_steps} steps: accuracy on all 1000 test digits by lr",
                       "columns": ["lr"] + list(cfg.norms),
                       "rows": [[lr] + [A.cell(recs, "test_acc", part="lr", norm=n, lr=lr) for n in cfg.norms] for lr in cfg.lrs]})
        figs.append({"name": "e7_lr_sweep", "title": "E7: MLP test accuracy vs SGD learning rate", "xlabel": "learning rate",
                     "ylabel": "test accuracy", "logx": True,
                     "series": [A.series(recs, "test_acc", n, cfg.lrs, "lr", part="lr", norm=n) for n in cfg.norms]})
        if {"none", "layer"} <= set(cfg.norms) and len(cfg.lrs) >= 2:
            claims.append(_c11_row(cfg, recs))
    return {"claims": claims, "tables": tables, "figures": figs,
            "notes": ["Paper (Ba et al. 2016): initialising the LN gain to 1.0 worked better than 0.1 in their LSTM."]}
