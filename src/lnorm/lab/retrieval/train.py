"""Train and evaluate one image-caption retrieval model (the protocol of Vendrov et al. 2016, small).

Adam, batches of matched (caption, image) pairs, the hinge ranking loss summed over the batch's
real mismatches, gradient-norm clipping at 2; validation R@K every ``eval_every`` steps; the model
with the best validation R-sum (sum of the six recalls) is the one tested, as in the paper.
Wall time counts training steps only (evaluation excluded), so "time to best validation" compares
the cost of training.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from lnorm.lab.retrieval import captions as C
from lnorm.lab.retrieval import data, losses, metrics
from lnorm.lab.retrieval.models import RNNS, RetrievalModel


@dataclass
class TrainConfig:
    method: str = "order"          # "order" (order embeddings) or "cosine" (the symmetric baseline)
    rnn: str = "gru"               # sentence encoder: "gru" (torch.nn.GRU) or "ln_gru" (LayerNormGRU)
    dim: int = 128                 # joint embedding size (paper: 1024)
    word_dim: int = 64             # word embedding size (paper: 300)
    image_hidden: int = 256        # hidden units of the image MLP
    batch_size: int = 128          # matched pairs per step (paper: 128)
    lr: float = 1e-3               # Adam (paper: 1e-3)
    grad_clip: float = 2.0         # max gradient norm (paper: 2)
    margin: float = -1.0           # < 0: the method's default (order 0.05, cosine 0.2)
    steps: int = 600               # training steps
    eval_every: int = 50           # steps between validation evaluations
    captions_per_image: int = 5    # as on MSCOCO
    max_extension: int = 3         # val/test captions describe at most this many digits
    train_images: int = 0          # 0: all 4000; else the first n (tiny configs)
    eval_images: int = 0           # 0: all 500 validation and test images; else the first n

    def __post_init__(self):
        if self.method not in losses.METHODS:
            raise ValueError(f"method must be one of {losses.METHODS}, got {self.method!r}")
        if self.rnn not in RNNS:
            raise ValueError(f"rnn must be one of {RNNS}, got {self.rnn!r}")
        for name in ("dim", "word_dim", "image_hidden", "batch_size", "steps", "eval_every",
                     "captions_per_image", "max_extension"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")

    @property
    def resolved_margin(self) -> float:
        return losses.MARGINS[self.method] if self.margin < 0 else self.margin


def load_data(cfg: TrainConfig) -> dict[str, data.CaptionedImages]:
    lim = lambda n: n or None  # noqa: E731
    return {
        "train": data.captioned("train", cfg.captions_per_image, None, limit=lim(cfg.train_images)),
        "val": data.captioned("val", cfg.captions_per_image, cfg.max_extension, limit=lim(cfg.eval_images)),
        "test": data.captioned("test", cfg.captions_per_image, cfg.max_extension, limit=lim(cfg.eval_images)),
        # one caption per test image from the whole hierarchy: does the order hold for "a digit" too?
        "test_hierarchy": data.captioned("test", 1, None, caption_seed=1, limit=lim(cfg.eval_images)),
    }


def evaluate(model: RetrievalModel, split: data.CaptionedImages, auc: bool = False) -> dict[str, float]:
    cap, im = model.embed_all(split.images, split.tokens, split.lengths)
    s = model.scores(cap, im)  # (M, N)
    covers = split.covers()
    out = metrics.retrieval_metrics(s, covers)
    if auc:
        out["order_auc"] = metrics.order_auc(s, covers)
    return out


def train(cfg: TrainConfig, seed: int = 0, log: Callable[..., None] | None = None,
          steps: Callable[[int], object] | None = None, splits: dict | None = None) -> dict:
    """Train one model; return its test metrics (best validation checkpoint) and its curves.

    ``log(step=..., **metrics)`` receives the training loss and each validation evaluation;
    ``steps(n)`` wraps ``range(n)`` (a progress bar); ``splits`` reuses data already loaded.
    Raises ``FloatingPointError`` if the loss stops being finite.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    splits = splits or load_data(cfg)
    tr = splits["train"]
    model = RetrievalModel(len(C.vocabulary()), method=cfg.method, rnn=cfg.rnn, dim=cfg.dim,
                           word_dim=cfg.word_dim, image_hidden=cfg.image_hidden)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    margin = cfg.resolved_margin
    M = len(tr.texts)
    order, pos = torch.randperm(M, generator=gen), 0

    curve = {"step": [], "time_s": [], "val_rsum": [], "val_caption_r1": [], "val_image_r1": []}
    best = {"rsum": -math.inf, "step": 0, "time_s": 0.0, "state": None}
    train_s, loss_sum, loss_n = 0.0, 0.0, 0

    def validate(step: int) -> None:
        v = evaluate(model, splits["val"])
        for k, key in (("val_rsum", "rsum"), ("val_caption_r1", "caption_r1"), ("val_image_r1", "image_r1")):
            curve[k].append(v[key])
        curve["step"].append(step)
        curve["time_s"].append(train_s)
        if v["rsum"] > best["rsum"]:
            best.update(rsum=v["rsum"], step=step, time_s=train_s, state=copy.deepcopy(model.state_dict()))
        if log is not None:
            log(step=step, time_s=train_s, train_loss=loss_sum / max(loss_n, 1), **{f"val_{k}": x for k, x in v.items()})

    validate(0)
    it = steps(cfg.steps) if steps is not None else range(cfg.steps)
    for step in it:
        t0 = time.perf_counter()
        if pos + cfg.batch_size > M:
            order, pos = torch.randperm(M, generator=gen), 0
        idx = order[pos:pos + cfg.batch_size]
        pos += cfg.batch_size
        img_idx = tr.cap_image[idx]
        cap = model.embed_captions(tr.tokens[idx], tr.lengths[idx])  # (B, D)
        im = model.embed_images(tr.images[img_idx])                  # (B, D)
        s = model.scores(cap, im)                                    # (B, B)
        loss = losses.contrastive_loss(s, ~tr.covers(idx, img_idx), margin)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        train_s += time.perf_counter() - t0
        loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            validate(step + 1)
            loss_sum, loss_n = 0.0, 0

    model.load_state_dict(best["state"])
    test = evaluate(model, splits["test"])
    test["order_auc"] = evaluate(model, splits["test_hierarchy"], auc=True)["order_auc"]
    return {
        "config": asdict(cfg),
        "test": test,
        "best_val_rsum": best["rsum"],
        "best_step": best["step"],
        "best_time_s": best["time_s"],
        "train_s": train_s,
        "s_per_step": train_s / cfg.steps,
        "curve": curve,
        "params": sum(p.numel() for p in model.parameters()),
    }
