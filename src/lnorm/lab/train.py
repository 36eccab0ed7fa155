"""Shared pieces of a training run: seeding, outcomes, and a plain classifier loop."""

from __future__ import annotations

import math
import random
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Diverged(Exception):
    """The loss became NaN or infinite: the run is recorded as diverged, not as a crash."""

    def __init__(self, step: int, loss: float, partial: dict | None = None):
        super().__init__(f"loss {loss} at step {step}")
        self.step, self.loss, self.partial = step, loss, partial or {}


class CannotTrain(Exception):
    """The configuration cannot train at all (e.g. batch norm on one sample); the reason is kept."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_finite(loss: float, step: int, partial: dict | None = None) -> float:
    if not math.isfinite(loss):
        raise Diverged(step, loss, partial)
    return loss


@torch.no_grad()
def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Eval-mode accuracy; a sample whose logits are not all finite counts as wrong (``argmax``
    picks a NaN's index, so a NaN logit would otherwise predict its class)."""
    was = model.training
    model.eval()
    correct = 0
    for i in range(0, len(X), batch_size):
        logits = model(X[i:i + batch_size])
        ok = torch.isfinite(logits).all(-1) & (logits.argmax(-1) == y[i:i + batch_size])
        correct += int(ok.sum())
    model.train(was)
    return correct / len(X)


# nats -> bits: a character-level cross-entropy divided by this is bits per character
LN2 = math.log(2)


@torch.no_grad()
def evaluate_bpc(model: nn.Module, batches, device) -> float:
    """Bits per character of a character language model over ``(x, y)`` batches (eval mode, then
    back to training mode): the summed cross-entropy of every target over their count, in bits."""
    model.eval()
    tot, n = 0.0, 0
    for x, y in batches:
        logits = model(x.to(device))
        tot += F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten(), reduction="sum").item()
        n += y.numel()
    model.train()
    return tot / n / LN2


OPTIMIZERS = ("adam", "sgd")  # what make_optimizer builds


def make_optimizer(name: str, params, lr: float, momentum: float = 0.9):
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    raise ValueError(f"optimizer must be 'adam' or 'sgd', got {name!r}")


def _point(ctx, curve, step, loss, acc, eval_key="test_acc"):
    ctx.log(step=step, loss=loss, **{eval_key: acc})
    curve["curve_step"].append(step)
    curve["curve_loss"].append(loss)
    curve["curve_acc"].append(acc)


def _linear_anneal(steps: int, anneal: float):
    """The lr factor at each step: 1, then down to 0 in a line over the last ``anneal`` of the steps."""
    start = round(steps * (1 - anneal))
    return lambda s: 1.0 if s < start else max(0.0, (steps - s) / max(1, steps - start))


def train_classifier(model: nn.Module, data, *, ctx, batch_size: int, steps: int, lr: float,
                     optimizer: str = "adam", eval_every: int = 0, device: str = "cpu",
                     on_step=None, eval_key: str = "test_acc", anneal: float = 0.0) -> dict:
    """Minibatch training with cross-entropy; returns final test accuracy, losses and step time.

    ``data`` is ``(X_train, y_train, X_test, y_test)``. Batches are drawn by reshuffling each epoch
    (the last partial batch is dropped, so every step sees ``batch_size`` samples). ``on_step(step)``
    runs after each optimizer step (for extra statistics). ``eval_key`` names the held-out accuracy
    in the log and the result (``"val_acc"`` when the held-out tensors are a validation split).
    ``anneal``: the fraction of the final steps over which the lr falls linearly to 0 (0: constant).
    Raises :class:`Diverged` on a NaN/inf loss and :class:`CannotTrain` when the model rejects the
    batch (batch norm on one sample).
    """
    if not 0 <= anneal < 1:
        raise ValueError(f"anneal must be in [0, 1), got {anneal!r}")
    Xtr, ytr, Xte, yte = (t.to(device) for t in data)
    model.to(device).train()
    opt = make_optimizer(optimizer, model.parameters(), lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _linear_anneal(steps, anneal)) if anneal else None
    loss_fn = nn.CrossEntropyLoss()
    n = len(Xtr)
    per_epoch = max(1, n // batch_size)
    perm = torch.randperm(n, device=device)
    losses, step_times = [], []
    curve = {"curve_step": [], "curve_acc": [], "curve_loss": []}
    last_loss = math.nan
    for step in ctx.steps(steps):
        j = step % per_epoch
        if j == 0 and step:
            perm = torch.randperm(n, device=device)
        idx = perm[j * batch_size:(j + 1) * batch_size]
        t0 = time.perf_counter()
        try:
            loss = loss_fn(model(Xtr[idx]), ytr[idx])
        except ValueError as exc:
            if "Expected more than 1" in str(exc) or "more than 1 valid value" in str(exc):
                raise CannotTrain(str(exc)) from None
            raise
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        step_times.append(time.perf_counter() - t0)
        last_loss = check_finite(loss.item(), step, {eval_key: 0.1})
        losses.append(last_loss)
        if on_step is not None:
            on_step(step)
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            _point(ctx, curve, step + 1, float(np.mean(losses[-eval_every:])), accuracy(model, Xte, yte), eval_key)
    acc = accuracy(model, Xte, yte)
    _point(ctx, curve, steps, float(np.mean(losses[-max(1, eval_every or 50):])), acc, eval_key)
    return {**curve,
        eval_key: acc,
        "final_loss": float(np.mean(losses[-max(1, min(50, len(losses))):])),
        "ms_per_step": 1000 * float(np.median(step_times)),
    }
