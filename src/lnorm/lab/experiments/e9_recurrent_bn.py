"""E9 layer norm against recurrent batch norm (C4, C14) on sequential MNIST.

The article's RNN argument: batch norm needs separate statistics for every time step of a
recurrent net, which is "problematic if a test sequence is longer than any of the training
sequences", and it cannot be used at batch size 1; layer norm has neither problem. The baseline is
the recurrent batch norm of Cooijmans et al. (2016) (:mod:`lnorm.lab.recurrent_bn`: per-step
statistics, the last trained step's statistics past the training length). Three models, one
recurrent layer each, a ``Linear(1, embed) + tanh`` front end per pixel and a linear head on the
last hidden state: ``lstm`` (``LayerNormLSTM(layer_norm=False)``, torch's LSTM equations),
``lnlstm`` (``LayerNormLSTM``) and ``bnlstm``.

* (a) ``fixed``: test accuracy after the same Adam steps at full length (pixel and permuted
  order). After training, the first ``b1_probe`` test digits go through one at a time, in eval and
  in training mode, against their batched eval-mode outputs.
* (b) ``extrapolate``: trained on the first L pixels truncated to random lengths in [L/2, L]
  (L = ``train_frac`` * T, packed sequences), evaluated at L and beyond, up to the full T.
* (c) ``batch1``: trained on one sequence per step.

Runs of the same seed draw the same training digits, lengths and order (pairing by seed).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from lnorm.lab import analysis as A
from lnorm.lab import stats as S
from lnorm.lab.data import mnist_pixels
from lnorm.lab.recurrent_bn import BNLSTM, population_statistics
from lnorm.lab.train import CannotTrain, accuracy, check_finite
from lnorm.nn import LayerNormLSTM

TITLE = ("Layer norm vs recurrent batch norm on sequential MNIST (full suite: 784 steps; quick suite: 7x7 averaged "
         "digits, 49 steps): longer test sequences, batch 1")
CLAIMS = ("C4", "C14")
MODELS = ("lstm", "lnlstm", "bnlstm")
ORDERS = ("pixel", "permuted")  # the digit's pixels in reading order, or in one fixed random order
CHANCE = 0.1  # ten balanced classes: the score of a run that diverged or cannot train
H0_NOISE = 0.1  # BN-LSTM's random initial state in training, as in the authors' sequential-MNIST run


class PixelRNN(nn.Module):
    """``(B, T)`` pixels -> ``(B, 10)`` logits from the hidden state at each sequence's last step."""

    def __init__(self, kind: str, hidden: int, embed: int, max_len: int):
        super().__init__()
        if kind not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {kind!r}")
        self.kind = kind
        # LN of W_ih x for a scalar x keeps only its sign: every model reads a small embedding
        self.embed = nn.Sequential(nn.Linear(1, embed), nn.Tanh())
        if kind == "bnlstm":
            self.rnn = BNLSTM(embed, hidden, max_len, h0_noise=H0_NOISE)
        else:
            self.rnn = LayerNormLSTM(embed, hidden, batch_first=True, layer_norm=kind == "lnlstm")
        self.head = nn.Linear(hidden, 10)
        with torch.no_grad():  # forget-gate bias 1 in every model, as the authors' code has it
            forget = slice(hidden, 2 * hidden)
            if kind == "bnlstm":
                self.rnn.bias[forget] = 1.0
            else:
                self.rnn.bias_ih_l0[forget] = 1.0
                self.rnn.bias_hh_l0[forget] = 0.0

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        e = self.embed(x.unsqueeze(-1))  # (B, T, E)
        if self.kind == "bnlstm":
            return self.head(self.rnn(e, lengths)[1])
        if lengths is not None:
            e = pack_padded_sequence(e, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, (h, _) = self.rnn(e)  # h (1, B, H), in the input's order
        return self.head(h[-1])


@dataclass
class Config:
    side: int = 7  # 28: pixel by pixel, 784 steps; 14 or 7: 2x2- or 4x4-averaged digits, 196 or 49 steps
    orders: tuple[str, ...] = ("pixel",)  # (a): "pixel" and/or "permuted"
    extrapolate_orders: tuple[str, ...] = ("pixel",)  # (b)
    models: tuple[str, ...] = MODELS
    hidden: int = 48
    embed: int = 8
    batch_size: int = 32
    steps: int = 200  # Adam steps of (a) and (b)
    lr: float = 5e-3  # one Adam learning rate for every model (not tuned per model)
    clip: float = 1.0  # gradient norm clipping
    train_frac: float = 0.5  # (b): train on lengths in [train_frac/2, train_frac] * T
    b1_steps: int = 300  # (c): Adam steps of one sequence each; 0 leaves (c) out
    b1_probe: int = 20  # test digits fed one at a time after (a)
    evals: int = 4  # test-accuracy points along training
    floor: float = 0.25  # a model below this test accuracy has not learned the task at this budget


SUITES = {
    "smoke": dict(hidden=8, embed=4, batch_size=8, steps=2, b1_steps=2, b1_probe=2, evals=1),
    "quick": {},
    "full": dict(side=28, orders=("pixel", "permuted"), hidden=64, batch_size=64, steps=400, b1_steps=1000),
}
# full: estimated from per-step CPU times at 784 steps with --jobs 2, not yet run end to end
EST_SECONDS = {"smoke": 6, "quick": 60, "full": 3900}
# the names each string field takes, checked before a run starts (lnorm.lab.config.resolve)
CHOICES = {"orders": ORDERS, "extrapolate_orders": ORDERS, "models": MODELS}
MAY_BE_EMPTY = ("orders", "extrapolate_orders")  # empty: no (a) or no (b) runs


def units(cfg: Config) -> list[dict]:
    out = [{"task": "fixed", "order": o, "model": m} for o in cfg.orders for m in cfg.models]
    out += [{"task": "extrapolate", "order": o, "model": m} for o in cfg.extrapolate_orders for m in cfg.models]
    if cfg.b1_steps:
        out += [{"task": "batch1", "order": "pixel", "model": m} for m in cfg.models]
    return out


# training and evaluation

def train(model: PixelRNN, cfg: Config, data, seed: int, ctx, *, batch_size: int, steps: int,
          lengths: tuple[int, int] | None = None) -> dict:
    """Adam with gradient clipping on the first ``lengths[1]`` pixels of each digit, each truncated
    to a random length in ``[lengths[0], lengths[1]]`` (full length when None); test accuracy at the
    longest training length ``cfg.evals`` times along the way."""
    Xtr, ytr, Xte, yte = (t.to(ctx.device) for t in data)
    T = Xtr.shape[1] if lengths is None else lengths[1]
    gen = torch.Generator().manual_seed(10_000 + seed)  # data order and lengths: shared by a seed's runs
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    model.to(ctx.device).train()
    curve = {"curve_step": [], "curve_acc": []}
    every = max(1, steps // max(1, cfg.evals))
    losses, step_times = [], []
    for step in ctx.steps(steps):
        idx = torch.randint(0, len(Xtr), (batch_size,), generator=gen).to(ctx.device)
        lens = None if lengths is None else torch.randint(lengths[0], lengths[1] + 1, (batch_size,), generator=gen)
        t0 = time.perf_counter()
        try:
            loss = F.cross_entropy(model(Xtr[idx, :T], lens), ytr[idx])
        except ValueError as exc:
            if "more than 1 value per channel" in str(exc):
                raise CannotTrain(str(exc)) from None
            raise
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        step_times.append(time.perf_counter() - t0)
        losses.append(check_finite(loss.item(), step, {"test_acc": CHANCE, "acc_train_len": CHANCE,
                                                        "acc_full": CHANCE}))
        if (step + 1) % every == 0 or step + 1 == steps:
            refresh_statistics(model, Xtr[:, :T], cfg.batch_size)
            acc = accuracy(model, Xte[:, :T], yte)
            curve["curve_step"].append(step + 1)
            curve["curve_acc"].append(acc)
            ctx.log(step=step + 1, loss=float(np.mean(losses[-every:])), test_acc=acc)
    return {**curve, "test_acc": curve["curve_acc"][-1], "final_loss": float(np.mean(losses[-max(1, steps // 10):])),
            "ms_per_step": 1000 * float(np.median(step_times))}


def refresh_statistics(model: PixelRNN, X: torch.Tensor, batch_size: int, n: int = 512) -> None:
    """BN-LSTM: population statistics from the first ``n`` training sequences before evaluating."""
    if model.kind == "bnlstm":
        bs = max(2, batch_size)
        population_statistics(model, [(X[i:i + bs],) for i in range(0, min(n, len(X)), bs)])


@torch.no_grad()
def probe_batch1(model: nn.Module, X: torch.Tensor) -> dict:
    """Largest |logit| difference between feeding the digits ``X`` one at a time and as one
    eval-mode batch: in eval mode, and in training mode (None where the model cannot run one
    sequence in training mode: batch statistics of one sample). The state is restored after."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    batched = model(X)
    one_eval = torch.cat([model(X[i:i + 1]) for i in range(len(X))])
    model.train()
    try:
        one_train = torch.cat([model(X[i:i + 1]) for i in range(len(X))])
    except ValueError as exc:
        if "more than 1 value per channel" not in str(exc):
            raise
        one_train = None
    model.load_state_dict(state)
    return {"b1_eval_maxdiff": float((one_eval - batched).abs().max()),
            "b1_train_maxdiff": None if one_train is None else float((one_train - batched).abs().max()),
            "b1_train_vs_eval_maxdiff": None if one_train is None else float((one_train - one_eval).abs().max())}


def training_mode_departure(result: dict) -> float | None:
    """How far training mode moves a model's one-at-a-time logits from eval mode's: the probe's
    direct difference, or for a run recorded before the probe kept it, the excess of the
    training-mode difference from the batched logits over the eval-mode one (a float32 batch of
    64 against one sequence at a time differs by up to ~4e-4 in eval mode too: batch-shape
    rounding, no training-mode effect). None where training mode cannot run one sequence."""
    if result.get("b1_train_vs_eval_maxdiff") is not None:
        return result["b1_train_vs_eval_maxdiff"]
    train, ev = result.get("b1_train_maxdiff"), result.get("b1_eval_maxdiff")
    if train is None:
        return None
    return max(0.0, train - ev) if ev is not None else train


def eval_lengths(T: int, L: int) -> list[int]:
    """The evaluation lengths of (b): the training length L, then up to the full T."""
    return sorted({L, (L + T) // 2, T})


def run(cfg: Config, params: dict, seed: int, ctx) -> dict:
    data = mnist_pixels(cfg.side, params["order"] == "permuted")
    T = data[0].shape[1]
    model = PixelRNN(params["model"], cfg.hidden, cfg.embed, T)
    if params["task"] == "fixed":
        out = train(model, cfg, data, seed, ctx, batch_size=cfg.batch_size, steps=cfg.steps)
        return {**out, **probe_batch1(model, data[2][:cfg.b1_probe].to(ctx.device))}
    if params["task"] == "batch1":
        return train(model, cfg, data, seed, ctx, batch_size=1, steps=cfg.b1_steps)
    L = max(2, round(cfg.train_frac * T))
    out = train(model, cfg, data, seed, ctx, batch_size=cfg.batch_size, steps=cfg.steps, lengths=(L // 2, L))
    Xte, yte = data[2].to(ctx.device), data[3].to(ctx.device)
    lens = eval_lengths(T, L)
    accs = [accuracy(model, Xte[:, :n], yte) for n in lens]
    return {**out, "eval_lengths": lens, "acc_by_length": accs, "acc_train_len": accs[0], "acc_full": accs[-1],
            "train_len": L}


# criteria

ACC_MIN_EFFECT, ACC_MARGIN = 0.02, 0.01  # accuracy: 2 points (20 of the 1000 test digits) matter;
# an interval inside 1 point rules an effect out
ACC_RESOLUTION = 0.001  # one test digit
TAIL = 0.2  # the last 20% of training, where a converged run no longer gains accuracy
B1_TOL = 1e-4  # largest |logit| difference that still counts as "the same output"


def _scored(v) -> float:
    return CHANCE if v is None or not math.isfinite(v) else float(v)


def _mean(d: dict) -> float:
    v = [_scored(x) for x in d.values()]
    return sum(v) / len(v) if v else math.nan


def _row(claim: str, key: str, eff: S.Effect | None, criterion: str, evidence: str, blocking=(), notes=(), *,
         role: str = "secondary", verdict: str | None = None) -> dict:
    """A claim row. ``blocking`` caveats leave the data unable to decide (the verdict becomes
    inconclusive); ``notes`` are shown beside the verdict without changing it."""
    blocking, notes = [c for c in blocking if c], [c for c in notes if c]
    return A.claim_row("e9", claim, key, eff, criterion, evidence=evidence, caveats=blocking + notes, role=role,
                       verdict=verdict or (S.INCONCLUSIVE if blocking else None))


def near_chance(floor: float, **means: float) -> str | None:
    """The caveat of models whose mean accuracy is below ``floor`` (they had not learned the task),
    or that have no finished run to tell (a NaN mean: it read "near chance: ... nan")."""
    missing = [name for name, m in means.items() if math.isnan(m)]
    if missing:
        return f"no finished runs of {', '.join(missing)} to compare"
    low = [f"{name} {m:.3f}" for name, m in means.items() if not m >= floor]
    return f"near chance: {', '.join(low)} below {floor:g} accuracy at this budget" if low else None


def _change(train: dict, full: dict, seeds: list) -> S.Scored:
    """Per seed, accuracy at the full length minus at the training length; a run that failed
    (None, non-finite, or listed in ``failed``) scores chance at both, a change of 0, and is
    listed in ``failed`` so the comparison says how many it scored, and at what: chance, not the
    change of 0 compared."""
    def failed(d: dict, s) -> bool:
        return d[s] is None or not math.isfinite(d[s]) or s in getattr(d, "failed", ())

    return S.Scored({s: _scored(full[s]) - _scored(train[s]) for s in seeds},
                    failed={s for s in seeds if failed(full, s) or failed(train, s)}, fail_score=CHANCE,
                    fail_note="chance")


def row_c14_extrapolation(ln_train: dict, ln_full: dict, bn_train: dict, bn_full: dict, floor: float,
                          order: str = "pixel") -> dict:
    """C14 (primary on pixel order): evaluated past the training length, BN-LSTM loses more accuracy
    than LN-LSTM. Effect: per seed, (LN at full length - LN at the training length) - (the same for
    BN), paired; a diverged run scores chance at both lengths (no change). Inconclusive when either
    model is below ``floor`` at the training length (nothing to lose)."""
    seeds = sorted(set(ln_train) & set(ln_full) & set(bn_train) & set(bn_full))
    d_ln, d_bn = _change(ln_train, ln_full, seeds), _change(bn_train, bn_full, seeds)
    # each value is a change (accuracy at T minus at L), two rounded accuracies: the paired difference
    # of two changes holds four, so its rounding term is 4q, not compare's 2q for plain accuracies
    eff = S.compare(d_ln, d_bn, min_effect=ACC_MIN_EFFECT, margin=ACC_MARGIN, unit="acc",
                    resolution=S.difference_resolution(ACC_RESOLUTION))
    caveat = near_chance(floor, **{"lnlstm at the training length": _mean(ln_train),
                                   "bnlstm at the training length": _mean(bn_train)})
    suffix = "" if order == "pixel" else f"-{order}"
    return _row("C14", f"C14-longer-test-sequences{suffix}", eff,
                f"{order} order, trained on the first L pixels at random lengths in [L/2, L], tested on all T: "
                f"(LN-LSTM accuracy at T minus at L) minus (the same for BN-LSTM, which uses step L's statistics "
                f"past L), paired by seed: supported if > 0 and >= {ACC_MIN_EFFECT:g}; not supported if the CI "
                f"rules out {ACC_MARGIN:g}; inconclusive if either is below {floor:g} at L.",
                f"change from L to T: LN {_mean(d_ln):+.3f}, BN {_mean(d_bn):+.3f}; at T: LN {_mean(ln_full):.3f}, "
                f"BN {_mean(bn_full):.3f}", [caveat])


def row_c14_batch1_training(ln_b1: dict, bn_b1: dict, b1_examples: int, ln_examples_needed: float) -> dict:
    """C14: trained on one sequence per step, LN-LSTM beats BN-LSTM (which cannot compute batch
    statistics of one sequence: scored chance). A result short of "supported" is undecided when the
    batch-1 runs saw fewer digits than LN-LSTM needed at the full batch size to leave chance
    (``ln_examples_needed``, inf if it never did): the budget, not the batch size, would decide."""
    eff = S.compare(ln_b1, bn_b1, min_effect=ACC_MIN_EFFECT, margin=ACC_MARGIN, unit="acc", fail_score=CHANCE,
                    resolution=ACC_RESOLUTION)
    short = eff.verdict != S.SUPPORTED and not b1_examples >= ln_examples_needed
    caveat = (f"budget: the batch-1 runs saw {b1_examples} digits; LN-LSTM at the full batch size "
              + ("never left chance" if math.isinf(ln_examples_needed) else f"needed {ln_examples_needed:.0f}")
              ) if short else None
    return _row("C14", "C14-batch1-training", eff,
                f"pixel order, trained at batch size 1: LN-LSTM minus BN-LSTM test accuracy, paired by seed, a run "
                f"that cannot train scored {CHANCE:g}: supported if > 0 and >= {ACC_MIN_EFFECT:g}; not supported if "
                f"the CI rules out {ACC_MARGIN:g}; otherwise inconclusive if batch 1 saw fewer digits than LN-LSTM "
                "needed at the full batch size to leave chance.",
                f"batch 1: LN {_mean(ln_b1):.3f}, BN {_mean(bn_b1):.3f}", [caveat])


def examples_to_floor(steps: list, accs: list, floor: float, batch_size: int) -> float:
    """Digits seen when a (mean) accuracy curve first reached ``floor``; inf if it never did."""
    return next((s * batch_size for s, a in zip(steps, accs, strict=True) if a >= floor), math.inf)


def row_c14_batch1_train_mode(ln_diff: list, bn_diff: list) -> dict:
    """C14 by construction: fed one sequence at a time, LN-LSTM gives in training mode what it gives
    in eval mode (``ln_diff``: :func:`training_mode_departure` per run, < B1_TOL in every run) and
    BN-LSTM cannot run in training mode (None: no batch statistics of one sample) or gives other
    outputs than its batched eval-mode ones (``bn_diff``, > 100 B1_TOL)."""
    ln = [v for v in ln_diff if v is not None]
    if not ln or not bn_diff:
        v, ev = S.INCONCLUSIVE, "missing LN or BN runs"
    else:
        bn_fails = all(v is None or v > 100 * B1_TOL for v in bn_diff)
        ok_ln = len(ln) == len(ln_diff) and max(ln) < B1_TOL
        v = S.SUPPORTED if ok_ln and bn_fails else S.NOT_SUPPORTED
        ran = [x for x in bn_diff if x is not None]
        ev = (f"one sequence at a time in training mode: LN max |Δlogit| from eval mode {max(ln):.2g} "
              f"({len(ln)}/{len(ln_diff)} ran); "
              f"BN " + (f"ran in {len(ran)}/{len(bn_diff)} runs, max |Δlogit| {max(ran):.2g}" if ran else
                        f"cannot run in {len(bn_diff)}/{len(bn_diff)} runs (batch statistics of one sample)"))
    return _row("C14", "C14-batch1-train-mode", None,
                f"test digits fed one at a time: LN's logits in training mode within {B1_TOL:g} of its eval-mode "
                f"ones in every run (per-sample statistics); BN cannot run in training mode or differs from its "
                f"batched eval-mode logits by > {100 * B1_TOL:g}.",
                ev, role="by construction", verdict=v)


def row_c4_long_sequences(ln: dict, lstm: dict, floor: float, order: str, caveat: str | None = None,
                          length: int | None = None) -> dict:
    """C4 (secondary): on sequential MNIST, LN-LSTM's test accuracy after the same budget is above the
    unnormalized LSTM's, paired by seed (diverged = chance): faster training on long sequences, so a
    "not converged" ``caveat`` is shown but does not decide. Inconclusive when neither left chance."""
    eff = S.compare(ln, lstm, min_effect=ACC_MIN_EFFECT, margin=ACC_MARGIN, unit="acc", fail_score=CHANCE,
                    resolution=ACC_RESOLUTION)
    both_stuck = near_chance(floor, lnlstm=_mean(ln), lstm=_mean(lstm)) if max(_mean(ln), _mean(lstm)) < floor else None
    steps = f"{length} steps" if length else "full length"
    return _row("C4", f"C4-seqmnist-{order}", eff,
                f"sequential MNIST ({order} order, {steps}), LN-LSTM minus LSTM test accuracy after the same "
                f"training steps, paired by seed, diverged runs scored {CHANCE:g}: supported if > 0 and >= "
                f"{ACC_MIN_EFFECT:g}; not supported if the CI rules out {ACC_MARGIN:g}; inconclusive if both are "
                f"below {floor:g}.", f"LN {_mean(ln):.3f}, LSTM {_mean(lstm):.3f}", [both_stuck], [caveat])


def tail_gain(steps: list, accs: list) -> float:
    """Accuracy gained over the last ``TAIL`` of training (from the last point at or before it)."""
    if len(steps) < 2:
        return math.nan
    start = max([i for i, s in enumerate(steps) if s <= (1 - TAIL) * steps[-1]], default=0)
    return accs[-1] - accs[start]


def convergence_note(recs: list[dict], models, **match) -> str | None:
    """"not converged" naming the models whose mean accuracy still rose by more than half the minimum
    effect over the last ``TAIL`` of training (a later point could change the comparison)."""
    late = []
    for m in models:
        gains = [tail_gain(r["result"]["curve_step"], r["result"]["curve_acc"]) for r in recs
                 if r["status"] == "ok" and "curve_acc" in r["result"] and r["params"].get("model") == m
                 and all(r["params"].get(k) == v for k, v in match.items())]
        gains = [g for g in gains if not math.isnan(g)]
        if gains and sum(gains) / len(gains) > ACC_MIN_EFFECT / 2:
            late.append(f"{m} +{sum(gains) / len(gains):.3f}")
    return f"not converged: accuracy still rising over the last {TAIL:.0%} of training ({', '.join(late)})" if late else None


# analysis

def _digits(cfg: Config) -> str:
    T = cfg.side * cfg.side
    return f"{T} steps" + ("" if cfg.side == 28 else f", {cfg.side}x{cfg.side} averaged digits")


def _fixed(cfg: Config, recs: list[dict], order: str) -> tuple[dict, list[dict]]:
    keys = [("test_acc", "test acc"), ("final_loss", "final train loss"), ("ms_per_step", "ms/step"),
            ("b1_eval_maxdiff", "one at a time, eval mode: max |Δlogit|")]

    def train_mode(m):
        v = [r["result"].get("b1_train_maxdiff") for r in recs if r["status"] == "ok"
             and r["params"] == {"task": "fixed", "order": order, "model": m}]
        return "cannot (batch statistics of one sample)" if v and all(x is None for x in v) else \
            A.cell(recs, "b1_train_maxdiff", task="fixed", order=order, model=m)

    rows = [[m] + [A.cell(recs, k, task="fixed", order=order, model=m) for k, _ in keys] + [train_mode(m)]
            for m in cfg.models]
    table = {"title": f"(a) Sequential MNIST, {order} order, {_digits(cfg)}: after {cfg.steps} Adam steps of "
                      f"{cfg.batch_size} (mean ± 95% CI)",
             "columns": ["model"] + [h for _, h in keys] + ["one at a time, training mode: max |Δlogit|"], "rows": rows}
    claims = []
    if {"lstm", "lnlstm"} <= set(cfg.models):
        g = lambda m: A.scored(recs, "test_acc", CHANCE, task="fixed", order=order, model=m)  # noqa: E731
        claims.append(row_c4_long_sequences(g("lnlstm"), g("lstm"), cfg.floor, order,
                                            convergence_note(recs, ("lstm", "lnlstm"), task="fixed", order=order),
                                            cfg.side * cfg.side))
    return table, claims


def _extrapolation(cfg: Config, recs: list[dict], order: str) -> tuple[dict, dict, list[dict]]:
    T = cfg.side * cfg.side
    L = max(2, round(cfg.train_frac * T))
    lens = eval_lengths(T, L)
    match = {"task": "extrapolate", "order": order}
    rows = []
    for m in cfg.models:
        runs = [r["result"]["acc_by_length"] for r in recs if r["status"] == "ok" and r["params"] == {**match, "model": m}]
        failed = A.failed_note(recs, **match, model=m)  # not in the means: say how many
        rows.append([m] + [S.fmt_ci([a[i] for a in runs]) + failed if runs else "/".join(A.statuses(recs, **match, model=m))
                           for i in range(len(lens))]
                    + [S.fmt_ci([a[-1] - a[0] for a in runs]) + failed if runs else "-"])
    table = {"title": f"(b) {order} order: trained on the first {L} of {T} pixels at random lengths in [{L // 2}, "
                      f"{L}], tested at longer lengths (BN past {L}: step {L}'s statistics)",
             "columns": ["model"] + [f"acc at {n}" for n in lens] + [f"change {L} -> {T}"], "rows": rows}
    fig = {"name": f"e9_longer_{order}", "title": f"E9: accuracy vs test length, trained up to {L} ({order} order)",
           "xlabel": "test sequence length", "ylabel": "test accuracy",
           "series": [_length_series(recs, {**match, "model": m}, m, lens) for m in cfg.models]}
    claims = []
    if {"lnlstm", "bnlstm"} <= set(cfg.models):
        g = lambda k, m: A.scored(recs, k, None, **match, model=m)  # noqa: E731
        claims.append(row_c14_extrapolation(g("acc_train_len", "lnlstm"), g("acc_full", "lnlstm"),
                                            g("acc_train_len", "bnlstm"), g("acc_full", "bnlstm"), cfg.floor, order))
    return table, fig, claims


def _length_series(recs, params: dict, label: str, lens: list[int]) -> dict:
    runs = [r["result"]["acc_by_length"] for r in recs if r["status"] == "ok" and r["params"] == params]
    X, Y, LO, HI = [], [], [], []
    for i, n in enumerate(lens if runs else []):
        m, lo, hi, _ = S.mean_ci([a[i] for a in runs])
        X.append(n)
        Y.append(m)
        LO.append(lo if lo == lo else m)
        HI.append(hi if hi == hi else m)
    return {"label": label, "x": X, "y": Y, "lo": LO, "hi": HI}


def _batch1(cfg: Config, recs: list[dict]) -> tuple[dict, list[dict]]:
    rows = [[m, A.cell(recs, "test_acc", task="batch1", model=m), "/".join(sorted(set(A.statuses(recs, task="batch1", model=m))))]
            for m in cfg.models]
    table = {"title": f"(c) Trained at batch size 1 for {cfg.b1_steps} Adam steps (pixel order, {_digits(cfg)})",
             "columns": ["model", "test acc", "status"], "rows": rows}
    claims = []
    if {"lnlstm", "bnlstm"} <= set(cfg.models):
        g = lambda m: A.scored(recs, "test_acc", CHANCE, task="batch1", order="pixel", model=m)  # noqa: E731
        ln = A.curve_series(recs, "curve_acc", "lnlstm", "curve_step", task="fixed", order="pixel", model="lnlstm")
        needed = examples_to_floor(ln["x"], ln["y"], cfg.floor, cfg.batch_size)
        claims.append(row_c14_batch1_training(g("lnlstm"), g("bnlstm"), cfg.b1_steps, needed))
    return table, claims


def analyze(cfg: Config, results: dict) -> dict:
    recs = results["e9"]
    claims, tables, figs = [], [], []
    for order in cfg.orders:
        table, rows = _fixed(cfg, recs, order)
        tables.append(table)
        claims += rows
        figs.append({"name": f"e9_fixed_{order}", "title": f"E9: test accuracy during training ({order} order, "
                                                           f"{_digits(cfg)})",
                     "xlabel": "step", "ylabel": "test accuracy",
                     "series": [A.curve_series(recs, "curve_acc", m, "curve_step", task="fixed", order=order, model=m)
                                for m in cfg.models]})
    if {"lnlstm", "bnlstm"} <= set(cfg.models) and cfg.orders:
        fixed = lambda m: [r["result"] for r in recs  # noqa: E731
                           if r["status"] == "ok" and r["params"].get("task") == "fixed" and r["params"]["model"] == m]
        claims.append(row_c14_batch1_train_mode([training_mode_departure(r) for r in fixed("lnlstm")],
                                                [r.get("b1_train_maxdiff") for r in fixed("bnlstm")]))
    for order in cfg.extrapolate_orders:
        table, fig, rows = _extrapolation(cfg, recs, order)
        tables.append(table)
        figs.append(fig)
        claims += rows
    if cfg.b1_steps:
        table, rows = _batch1(cfg, recs)
        tables.append(table)
        claims += rows
    notes = [f"Models: one recurrent layer of {cfg.hidden} units after Linear(1, {cfg.embed}) + tanh per pixel; one "
             f"Adam learning rate ({cfg.lr:g}, gradient norm clipped at {cfg.clip:g}) for every model, not tuned per "
             "model; forget-gate bias 1 in every model. lstm is LayerNormLSTM(layer_norm=False) (torch's LSTM "
             "equations, the same implementation as lnlstm).",
             "bnlstm: recurrent batch norm (Cooijmans et al. 2016): BN of W_x x and W_h h and of the cell before tanh, "
             "statistics per time step, gamma initialised to 0.1, the last trained step's statistics past the "
             "training length, population statistics re-estimated on 512 training digits before every evaluation, "
             f"and a N(0, {H0_NOISE:g}^2) initial state in training (the authors' sequential-MNIST setting: with one "
             "shared initial state the blank top rows give zero batch variance and the gradient overflows).",
             "Past the training length L, BN-LSTM normalizes every step with the statistics of step L, whose pixel "
             "position is fixed in pixel order (random in permuted order): how far they are from a later step's "
             "depends on that position.",
             "Cooijmans et al. report 99.0% (sequential) and 95.4% (permuted MNIST) for the BN-LSTM at 784 steps, "
             "trained on 50,000 digits for many epochs; this lab trains on 4000 digits with a short budget."]
    return {"claims": claims, "tables": tables, "figures": figs, "notes": notes}
