"""Retrieval metrics: R@K and mean rank in both directions, and order AUC.

Rank definition. On MSCOCO (Vendrov et al., Kiros et al.) each test image has its own five
captions; caption retrieval ranks all 5N captions for an image and takes the rank of the best of
its own five, image retrieval ranks the N images for a caption and takes the rank of its image.
Here the same 1-to-5 protocol is used, but an item counts as correct when the caption *truly
describes* the image (its digit is in the caption's extension), since "an even digit" written for
one image is equally true of every other even digit. So:

    rank(query) = 1 + #{ wrong items j : S_j >= max over correct items of S }

the rank of the best-scored correct item, with ties broken *against* the query (a wrong item
scored equal to the best correct one counts as ranked above it). Order scores are exactly 0 for
every caption an image fully satisfies, so ties are real and this choice gives no credit for them.
R@K is the percentage of queries with rank <= K; mean rank is the mean of the ranks (1 = perfect).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

KS = (1, 5, 10)


def first_relevant_rank(scores: Tensor, relevant: Tensor) -> Tensor:
    """(Q,) int64: for each query (row), the 1-based rank of its best-scored relevant item."""
    if scores.dim() != 2 or relevant.shape != scores.shape:
        raise ValueError(f"scores and relevant must be (Q, D) of one shape, got {tuple(scores.shape)} "
                         f"and {tuple(relevant.shape)}")
    if relevant.dtype != torch.bool:
        raise TypeError(f"relevant must be a bool tensor, got {relevant.dtype}")
    has = relevant.any(1)
    if not bool(has.all()):
        q = int((~has).nonzero()[0])
        raise ValueError(f"relevant: query {q} has no relevant item, so it has no rank")
    neg_inf = torch.finfo(scores.dtype).min
    best = scores.masked_fill(~relevant, neg_inf).max(1, keepdim=True).values  # (Q, 1)
    return 1 + ((scores >= best) & ~relevant).sum(1)


def ranking_metrics(ranks: Tensor, ks=KS) -> dict[str, float]:
    """``{"r1": %, "r5": %, "r10": %, "mean_rank": ..., "median_rank": ...}`` from (Q,) ranks."""
    r = ranks.to(torch.float64)
    out = {f"r{k}": 100.0 * float((r <= k).to(torch.float64).mean()) for k in ks}
    out["mean_rank"] = float(r.mean())
    out["median_rank"] = float(r.median())
    return out


def retrieval_metrics(scores: Tensor, covers: Tensor, ks=KS) -> dict[str, float]:
    """Both directions from a caption-by-image score matrix S (M, N) and truth ``covers`` (M, N).

    Keys ``caption_r1`` ... (caption retrieval: an image queries the M captions, the
    paper's "Caption Retrieval") and ``image_r1`` ... (image retrieval: a caption queries the N
    images), plus ``rsum`` (sum of the six recalls, the usual single number).
    """
    cap = ranking_metrics(first_relevant_rank(scores.T, covers.T), ks)
    img = ranking_metrics(first_relevant_rank(scores, covers), ks)
    out = {f"caption_{k}": v for k, v in cap.items()} | {f"image_{k}": v for k, v in img.items()}
    out["rsum"] = sum(cap[f"r{k}"] + img[f"r{k}"] for k in ks)
    return out


def order_auc(scores: Tensor, covers: Tensor) -> float:
    """Area under the ROC curve of S for telling true (caption, image) pairs from false ones:
    the probability that a random true pair outscores a random false pair (ties count half).
    Measures whether the learned order holds over the whole hierarchy, generic captions included."""
    s = scores.reshape(-1).double().numpy()
    y = covers.reshape(-1).numpy()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"covers must hold both true and false pairs, got {n_pos} true and {n_neg} false")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    # average ranks over ties (Mann-Whitney U)
    ranks = np.empty(len(s), dtype=np.float64)
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))
