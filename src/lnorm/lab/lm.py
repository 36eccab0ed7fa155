"""The character-level language model shared by E3 (LSTM vs LayerNormLSTM, GRU vs LayerNormGRU)
and E7 (LN gain initialisation): the model, its training loop and its hidden-state statistics.

``lnorm.nn``'s layers against torch's ``nn.LSTM`` / ``nn.GRU`` on ``pydoc_data`` text: validation
bits per character over steps and wall time, the step at which it first reaches ``target_bpc``,
and after training the spread over time of the mean hidden-state norm and the fraction of
saturated sigmoid gates.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lnorm.lab.data import text, text_batch, text_eval_batches
from lnorm.lab.train import LN2, check_finite, evaluate_bpc
from lnorm.nn import LayerNormGRU, LayerNormLSTM
from lnorm.nn.rnn import gate_preactivations

RNN_KINDS = ("lstm", "lnlstm", "gru", "lngru")  # torch's layers and lnorm's layer-normalized ones
# lnorm's layers with ``layer_norm=False``: the same implementation without the norm (E6's baseline)
NORM_OFF_KINDS = ("lnlstm_off", "lngru_off")
GAIN_INITS = ("one", "0.1", "random")  # how init_gains sets the LN gains


@dataclass
class LMConfig:
    emb: int = 32
    hidden: int = 96
    seq_len: int = 32
    batch_size: int = 32
    steps: int = 100  # Adam steps
    lr: float = 3e-3
    eval_every: int = 20
    eval_batches: int = 4  # validation batches of batch_size windows
    target_bpc: float = 3.2  # bits per character a run must reach to count as converged
    gain_init: str = "one"  # LN gain initialisation: one, 0.1 or random


def make_rnn(kind: str, input_size: int, hidden: int) -> nn.Module:
    if kind == "lstm":
        return nn.LSTM(input_size, hidden, batch_first=True)
    if kind == "gru":
        return nn.GRU(input_size, hidden, batch_first=True)
    if kind in ("lnlstm", "lnlstm_off"):
        return LayerNormLSTM(input_size, hidden, batch_first=True, layer_norm=kind == "lnlstm")
    if kind in ("lngru", "lngru_off"):
        return LayerNormGRU(input_size, hidden, batch_first=True, layer_norm=kind == "lngru")
    raise ValueError(f"rnn kind must be one of {RNN_KINDS + NORM_OFF_KINDS}, got {kind!r}")


class CharRNN(nn.Module):
    """Embedding -> one recurrent layer -> linear head over the vocabulary. ``(B, T)`` ids -> ``(B, T, V)``."""

    def __init__(self, kind: str, vocab: int, emb: int, hidden: int):
        super().__init__()
        self.kind = kind
        self.embed = nn.Embedding(vocab, emb)
        self.rnn = make_rnn(kind, emb, hidden)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, ids: torch.Tensor, return_hidden: bool = False):
        x = self.embed(ids)  # (B, T, E)
        h, _ = self.rnn(x)  # (B, T, H)
        y = self.head(h)
        return (y, x, h) if return_hidden else y


def init_gains(rnn: nn.Module, how: str, gen: torch.Generator | None = None) -> None:
    """Set every LN gain of a layer-normalized RNN: ``one`` (the default), ``0.1`` or ``random`` (U[0, 1])."""
    with torch.no_grad():
        for name, p in rnn.named_parameters():
            if name.startswith("ln_") and "_weight" in name:
                if how == "one":
                    p.fill_(1.0)
                elif how == "0.1":
                    p.fill_(0.1)
                elif how == "random":
                    p.copy_(torch.rand(p.shape, generator=gen))
                else:
                    raise ValueError(f"gain_init must be one of {', '.join(GAIN_INITS)}, got {how!r}")


@torch.no_grad()
def hidden_stats(model: CharRNN, ids: torch.Tensor) -> dict:
    """Spread over time of the mean hidden norm, and the fraction of saturated sigmoid gates."""
    _, x, h = model(ids, return_hidden=True)  # (B, T, E), (B, T, H)
    per_step = h.norm(dim=-1).mean(0)  # (T,)
    cv = float(per_step.std() / per_step.mean().clamp_min(1e-12))
    H = h.shape[-1]
    h_prev = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], 1)
    pre = gate_preactivations(model.rnn, x, h_prev)  # (B, T, G*H)
    sig_blocks = [slice(0, 2 * H), slice(3 * H, 4 * H)] if "lstm" in model.kind else [slice(0, 2 * H)]
    gates = torch.sigmoid(torch.cat([pre[..., s] for s in sig_blocks], -1))
    sat = float(((gates < 0.02) | (gates > 0.98)).float().mean())
    return {"hidden_norm_cv": cv, "gate_saturation": sat, "hidden_norm_mean": float(per_step.mean())}


def train_lm(cfg: LMConfig, kind: str, seed: int, ctx) -> dict:
    train_ids, val_ids, vocab = text()
    val = text_eval_batches(val_ids, cfg.batch_size, cfg.seq_len, cfg.eval_batches)
    model = CharRNN(kind, vocab, cfg.emb, cfg.hidden).to(ctx.device)
    if kind in ("lnlstm", "lngru"):
        init_gains(model.rnn, cfg.gain_init, torch.Generator().manual_seed(seed))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(10_000 + seed)
    curve = {"curve_step": [0], "curve_wall": [0.0], "curve_bpc": [evaluate_bpc(model, val, ctx.device)]}
    ctx.log(step=0, wall_s=0.0, val_bpc=curve["curve_bpc"][0])
    wall, step_times, train_bpc = 0.0, [], math.nan
    for step in ctx.steps(cfg.steps):
        x, y = text_batch(train_ids, cfg.batch_size, cfg.seq_len, gen)
        x, y = x.to(ctx.device), y.to(ctx.device)
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        dt = time.perf_counter() - t0
        step_times.append(dt)
        wall += dt
        train_bpc = check_finite(loss.item(), step, {"final_bpc": math.inf}) / LN2
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            v = check_finite(evaluate_bpc(model, val, ctx.device), step, {"final_bpc": math.inf})
            for k, val_ in (("curve_step", step + 1), ("curve_wall", wall), ("curve_bpc", v)):
                curve[k].append(val_)
            ctx.log(step=step + 1, wall_s=wall, val_bpc=v, train_bpc=train_bpc)
    reach = [s for s, b in zip(curve["curve_step"], curve["curve_bpc"], strict=True) if b <= cfg.target_bpc]
    reach_wall = [w for w, b in zip(curve["curve_wall"], curve["curve_bpc"], strict=True) if b <= cfg.target_bpc]
    x, _ = val[0]
    return {**curve, **hidden_stats(model, x.to(ctx.device)), "final_bpc": curve["curve_bpc"][-1],
            "mean_bpc": float(sum(curve["curve_bpc"][1:]) / max(1, len(curve["curve_bpc"]) - 1)),
            "steps_to_target": reach[0] if reach else math.inf, "wall_to_target": reach_wall[0] if reach_wall else math.inf,
            "ms_per_step": 1000 * sorted(step_times)[len(step_times) // 2], "train_bpc": train_bpc}
