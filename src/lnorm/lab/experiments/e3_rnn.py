"""E3 recurrent nets (C4, C9): a character-level language model on ``pydoc_data`` text with LSTM vs
LayerNormLSTM and GRU vs LayerNormGRU, and MNIST-1D read as a sequence by GRU vs LayerNormGRU.

Language model: validation bits per character over steps and over training wall time, the step
at which it first reaches ``target_bpc``, and hidden-state statistics on a validation batch after
training: the spread over time steps of the mean hidden-state norm (coefficient of variation) and
the fraction of saturated sigmoid gates (the model and its loop: :mod:`lnorm.lab.lm`). The
baselines are torch's ``nn.LSTM`` / ``nn.GRU``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from lnorm.lab import analysis as A
from lnorm.lab import stats as S
from lnorm.lab.data import mnist1d, text
from lnorm.lab.lm import GAIN_INITS, NORM_OFF_KINDS, RNN_KINDS, LMConfig, make_rnn, train_lm
from lnorm.lab.train import train_classifier

TITLE = "Recurrent nets: character language model and MNIST-1D as a sequence"
CLAIMS = ("C4", "C9")
TASKS = ("lm", "mnist1d")


class SeqClassifier(nn.Module):
    """MNIST-1D as a length-40 sequence; the last hidden state is classified.

    With ``embed=0`` each step's input is the raw scalar. Layer-normalizing ``W_ih x`` of a scalar
    ``x`` keeps only its sign (``LN(x w) = sign(x) LN(w)``), so LN recurrent layers get a small
    ``Linear(1, embed) -> tanh`` front end (both models get it, to compare like with like).
    """

    def __init__(self, kind: str, hidden: int, embed: int = 0):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(1, embed), nn.Tanh()) if embed else nn.Identity()
        self.rnn = make_rnn(kind, embed or 1, hidden)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(self.embed(x.unsqueeze(-1)))  # (B, 40, H)
        return self.head(h[:, -1])


@dataclass
class Config:
    tasks: tuple[str, ...] = TASKS
    models: tuple[str, ...] = RNN_KINDS  # for the language model; MNIST-1D uses the GRU pair
    emb: int = 32
    hidden: int = 96
    seq_len: int = 32
    batch_size: int = 32
    steps: int = 100  # Adam steps of the language model
    lr: float = 3e-3
    eval_every: int = 20
    eval_batches: int = 4  # validation batches of batch_size windows
    target_bpc: float = 3.2  # bits per character a run must reach to count as converged
    gain_init: str = "one"  # LN gain initialisation: one, 0.1 or random (E7 varies it)
    seq_hidden: int = 32  # MNIST-1D GRU
    seq_embed: int = 8  # Linear(1, n) -> tanh before the recurrent layer (0: raw scalars, as published)
    seq_steps: int = 600
    seq_batch: int = 64
    seq_lr: float = 1e-2


SUITES = {
    "smoke": dict(steps=6, eval_every=3, eval_batches=1, hidden=16, seq_len=16, batch_size=8, seq_steps=4,
                  seq_hidden=8),
    "quick": {},
    "full": dict(steps=1000, hidden=128, seq_len=64, eval_every=50, eval_batches=16, target_bpc=2.5,
                 seq_steps=3000, seq_hidden=64, seq_batch=100),
}
EST_SECONDS = {"smoke": 4, "quick": 100, "full": 1150}  # full: 1144 s summed over its 30 runs (--jobs 2, EPYC, 70bf14f)
# the names each string field takes, checked before a run starts (lnorm.lab.config.resolve)
CHOICES = {"tasks": TASKS, "models": RNN_KINDS + NORM_OFF_KINDS, "gain_init": GAIN_INITS}


def units(cfg: Config) -> list[dict]:
    out = []
    if "lm" in cfg.tasks:
        out += [{"task": "lm", "model": m} for m in cfg.models]
    if "mnist1d" in cfg.tasks:
        out += [{"task": "mnist1d", "model": m} for m in ("gru", "lngru")]
    return out


def lm_config(cfg: Config) -> LMConfig:
    """The language model's part of the config."""
    return LMConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(LMConfig)})


def run(cfg: Config, params: dict, seed: int, ctx) -> dict:
    if params["task"] == "lm":
        return train_lm(lm_config(cfg), params["model"], seed, ctx)
    data = mnist1d()
    model = SeqClassifier(params["model"], cfg.seq_hidden, cfg.seq_embed)
    return train_classifier(model, data, ctx=ctx, batch_size=cfg.seq_batch, steps=cfg.seq_steps, lr=cfg.seq_lr,
                            eval_every=max(1, cfg.seq_steps // 10), device=ctx.device)


# criteria

# Minimum effects (what the claims care about) and equivalence margins (what "no effect" allows):
LM_MIN_EFFECT, LM_MARGIN = 0.05, 0.02  # bits per character: 0.05 is ~2% of the 2.5-3.5 bpc these
# models reach, about what a different seed or a few percent of learning rate moves a char LM by
CV_MIN_EFFECT, CV_MARGIN = 0.02, 0.01  # hidden-norm CV: a 2-point steadier norm ||h_t|| over time
ACC_MIN_EFFECT, ACC_MARGIN = 0.01, 0.005  # accuracy: 1 point (10 of the 1000 MNIST-1D test sequences)
ACC_RESOLUTION = 0.001  # one MNIST-1D test sequence
CHANCE = 0.1  # ten classes: the score of a run that diverged
TAIL = 0.2  # the last 20% of training, where a converged run no longer improves


def tail_improvement(steps: list[float], values: list[float], higher_is_better: bool = False) -> float:
    """How much a curve still improved over the last ``TAIL`` of training: the least-squares slope
    of the points from the last one at or before ``(1 - TAIL) * final step`` on, times that span.
    NaN with fewer than two points."""
    if len(steps) < 2:
        return math.nan
    start = max([i for i, s in enumerate(steps) if s <= (1 - TAIL) * steps[-1]], default=0)
    xs, ys = steps[start:], values[start:]
    if len(xs) < 2:
        xs, ys = steps[-2:], values[-2:]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return (1 if higher_is_better else -1) * slope * (xs[-1] - xs[0])


def convergence_caveat(curves: dict[str, list[tuple[list, list]]], tol: float, metric: str,
                       higher_is_better: bool = False) -> str | None:
    """"not converged" when a model's mean (over seeds) improvement over the last ``TAIL`` of training
    exceeds ``tol`` (half the minimum effect: what is still to come could flip the comparison); None
    when every model has settled. ``curves``: model -> [(steps, values) of each finished run]."""
    late = []
    for model, runs in curves.items():
        gains = [g for g in (tail_improvement(st, v, higher_is_better) for st, v in runs) if not math.isnan(g)]
        if not gains:
            return f"not converged? {model} has too few evaluations to tell"
        g = sum(gains) / len(gains)
        if g > tol:
            late.append(f"{model}'s {metric} still improved {g:.3g} over the last {TAIL:.0%} of training")
    return ("not converged: " + "; ".join(late) + f" (> {tol:g})") if late else None


def _row(claim: str, key: str, eff: S.Effect, criterion: str, evidence: str, caveat: str | None = None) -> dict:
    """A claim row; a "not converged" caveat leaves a final-value comparison undecided."""
    return A.claim_row("e3", claim, key, eff, criterion, evidence=evidence, caveats=[caveat] if caveat else [],
                       verdict=S.INCONCLUSIVE if caveat else None)


def row_c4_convergence(base: str, ln: str, mean_base: dict, mean_ln: dict, fail_score: float) -> dict:
    """C4, convergence: the mean validation bpc over training (area under the curve) is lower with LN,
    paired by seed (the runs of a seed see the same batches). Not converged does not matter here:
    the area compares speed over the same budget."""
    eff = S.compare(mean_base, mean_ln, min_effect=LM_MIN_EFFECT, margin=LM_MARGIN, unit="bpc", fail_score=fail_score)
    return _row("C4", f"C4-{base}-convergence", eff,
                f"char LM, {base} minus {ln} mean validation bpc over training (faster convergence), paired by "
                f"seed: supported if the 95% CI > 0 and the effect >= {LM_MIN_EFFECT} bpc (about 2% of the bpc "
                f"reached); not supported if it rules out {LM_MARGIN} bpc. Diverged runs score log2(vocab).",
                f"{base} vs {ln}")


def row_c4_hidden(base: str, ln: str, cv_base: dict, cv_ln: dict) -> dict:
    """C4, stability: LN lowers the spread over time of the mean hidden-state norm (CV)."""
    eff = S.compare(cv_base, cv_ln, min_effect=CV_MIN_EFFECT, margin=CV_MARGIN, unit="CV")
    return _row("C4", f"C4-{base}-hidden-cv", eff,
                f"char LM, {base} minus {ln} coefficient of variation over time steps of the mean hidden norm, "
                f"paired: supported if > 0 and >= {CV_MIN_EFFECT} (a 2-point steadier norm); a diverged run has "
                "no hidden states, so it leaves the row inconclusive.", f"{base} vs {ln}")


def row_c9_lm(base: str, ln: str, final_base: dict, final_ln: dict, fail_score: float,
              caveat: str | None = None) -> dict:
    """C9 (language model): held-out bpc at the end of training is lower with LN; undecided when the
    runs had not converged (the final value would then measure speed, not generalization)."""
    eff = S.compare(final_base, final_ln, min_effect=LM_MIN_EFFECT, margin=LM_MARGIN, unit="bpc",
                    fail_score=fail_score)
    return _row("C9", f"C9-{base}-final-bpc", eff,
                f"char LM, {base} minus {ln} final validation bpc, paired: supported if > 0 and >= {LM_MIN_EFFECT} "
                f"bpc; not supported if the CI rules out {LM_MARGIN}; inconclusive if either model's bpc still fell "
                f"more than {LM_MIN_EFFECT / 2:g} over the last {TAIL:.0%} of training.", f"{base} vs {ln}", caveat)


def row_c9_acc(acc_ln: dict, acc_base: dict, caveat: str | None = None) -> dict:
    """C9 (classifier): MNIST-1D test accuracy is higher with LN (diverged = chance)."""
    eff = S.compare(acc_ln, acc_base, min_effect=ACC_MIN_EFFECT, margin=ACC_MARGIN, unit="acc",
                    fail_score=CHANCE, resolution=ACC_RESOLUTION)
    return _row("C9", "C9-mnist1d-gru-acc", eff,
                f"MNIST-1D sequence, LayerNormGRU minus GRU test accuracy, paired: supported if > 0 and >= "
                f"{ACC_MIN_EFFECT:g} (1 point, 10 test sequences); not supported if the CI rules out {ACC_MARGIN:g}; "
                f"inconclusive if either still gained more than {ACC_MIN_EFFECT / 2:g} over the last {TAIL:.0%}.",
                "MNIST-1D", caveat)


PAIRS = (("lstm", "lnlstm"), ("gru", "lngru"))


def finished_curves(recs, key: str, **match) -> list[tuple[list, list]]:
    """[(steps, values)] of ``key`` in the finished runs matching ``match`` (E3's C9, E7's C10)."""
    return [(r["result"]["curve_step"], r["result"][key]) for r in recs if r["status"] == "ok" and key in r["result"]
            and all(r["params"].get(k) == v for k, v in match.items())]


def _lm_claims(cfg: Config, recs: list[dict]) -> list[dict]:
    fail = math.log2(text()[2])  # the bpc of a uniform guess over the characters
    claims = []
    for base, ln in PAIRS:
        if not {base, ln} <= set(cfg.models):
            continue

        def g(key, model, fail_score=fail):
            return A.scored(recs, key, fail_score, task="lm", model=model)

        claims.append(row_c4_convergence(base, ln, g("mean_bpc", base), g("mean_bpc", ln), fail))
        claims.append(row_c4_hidden(base, ln, g("hidden_norm_cv", base, None), g("hidden_norm_cv", ln, None)))
        caveat = convergence_caveat({m: finished_curves(recs, "curve_bpc", task="lm", model=m) for m in (base, ln)},
                                    LM_MIN_EFFECT / 2, "val bpc")
        claims.append(row_c9_lm(base, ln, g("final_bpc", base), g("final_bpc", ln), fail, caveat))
    return claims


def _seq_claims(recs: list[dict]) -> list[dict]:
    acc = {m: A.scored(recs, "test_acc", CHANCE, task="mnist1d", model=m) for m in ("gru", "lngru")}
    caveat = convergence_caveat({m: finished_curves(recs, "curve_acc", task="mnist1d", model=m) for m in ("gru", "lngru")},
                                ACC_MIN_EFFECT / 2, "test accuracy", higher_is_better=True)
    return [row_c9_acc(acc["lngru"], acc["gru"], caveat)]


def analyze(cfg: Config, results: dict) -> dict:
    recs = results["e3"]
    claims, tables, figs = [], [], []
    if "lm" in cfg.tasks:
        keys = ["final_bpc", "mean_bpc", "steps_to_target", "wall_to_target", "hidden_norm_cv", "gate_saturation",
                "ms_per_step"]
        rows = [[m] + [A.cell(recs, k, task="lm", model=m, **({"cap": cfg.steps, "resolution": cfg.eval_every}
                                                                if k == "steps_to_target" else {})) for k in keys]
                for m in cfg.models]
        tables.append({"title": f"Language model on pydoc_data text after {cfg.steps} steps (mean ± 95% CI; "
                                f"target {cfg.target_bpc} bpc; steps to target ≥ {cfg.steps} (cap): not reached)",
                       "columns": ["model", "final val bpc", "mean val bpc", "steps to target", "train s to target",
                                   "hidden-norm CV over t", "saturated gates", "ms/step"], "rows": rows})
        figs.append({"name": "e3_lm_bpc_steps", "title": "E3: validation bits per character vs step",
                     "xlabel": "step", "ylabel": "val bpc",
                     "series": [A.curve_series(recs, "curve_bpc", m, "curve_step", task="lm", model=m) for m in cfg.models]})
        figs.append({"name": "e3_lm_bpc_wall", "title": "E3: validation bits per character vs training time",
                     "xlabel": "training wall time (s)", "ylabel": "val bpc",
                     "series": [A.curve_series(recs, "curve_bpc", m, "curve_wall", task="lm", model=m) for m in cfg.models]})
        claims += _lm_claims(cfg, recs)
    if "mnist1d" in cfg.tasks:
        claims += _seq_claims(recs)
        tables.append({"title": f"MNIST-1D as a sequence after {cfg.seq_steps} steps (published GRU: 91%)",
                       "columns": ["model", "test acc", "final loss", "ms/step"],
                       "rows": [[m, A.cell(recs, "test_acc", task="mnist1d", model=m),
                                 A.cell(recs, "final_loss", task="mnist1d", model=m),
                                 A.cell(recs, "ms_per_step", task="mnist1d", model=m)] for m in ("gru", "lngru")]})
        figs.append({"name": "e3_mnist1d", "title": "E3: MNIST-1D sequence test accuracy during training",
                     "xlabel": "step", "ylabel": "test accuracy",
                     "series": [A.curve_series(recs, "curve_acc", m, "curve_step", task="mnist1d", model=m)
                                for m in ("gru", "lngru")]})
    return {"claims": claims, "tables": tables, "figures": figs,
            "notes": [f"MNIST-1D input: {'raw scalars' if not cfg.seq_embed else f'Linear(1, {cfg.seq_embed}) + tanh per step'}. "
                      "With raw scalar inputs LayerNormGRU sees only the sign of each input (LN(x w) = sign(x) LN(w)); "
                      "a quick run with raw inputs gave LN-GRU 22% vs GRU 95% (one seed, 500 steps).",
                      "Paper (Ba et al. 2016): LN-LSTM converges faster on skip-thoughts, attentive reader and "
                      "handwriting; Greydanus & Kobak: GRU reaches 91% on MNIST-1D. Baselines here are torch's fused "
                      "nn.LSTM/nn.GRU, so wall-time curves include the implementation difference."]}
