"""Order-embedding scores and the pairwise ranking loss of Vendrov et al. (2016).

Notation: M captions, N images, D embedding dims. Embeddings live in the non-negative orthant
(``order_embed``: unit L2 norm, then absolute value, as in the authors' code). Images are more
specific than captions, so an image embedding should dominate its caption's coordinate-wise; the
order-violation penalty of caption c against image i is

    E(c, i) = || max(0, c - i) ||^2        (0 iff c <= i coordinate-wise)

and the score is S(c, i) = -E(c, i). The cosine baseline (Kiros et al. 2014, the "symmetric"
model of the same paper) scores S(c, i) = <c, i> with unit-norm embeddings.

Loss on a batch of B matched pairs (caption b was written for image b), margin alpha::

    L = sum_b sum_{a in neg(b)} [ max(0, alpha - S(b, b) + S(a, b))      contrastive captions
                                + max(0, alpha - S(b, b) + S(b, a)) ]    contrastive images

Vendrov et al. take every other item of the batch as a negative. Here a caption such as "an even
digit" truly describes many images of a batch, so ``negatives`` says which off-diagonal pairs
are real mismatches; pairs where the caption does describe the image are left out of the loss
(never pushed apart). Margins as in the authors' code: 0.05 for order, 0.2 for cosine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

MARGINS = {"order": 0.05, "cosine": 0.2}
METHODS = tuple(MARGINS)


def order_embed(x: Tensor) -> Tensor:
    """Map encoder outputs into the non-negative orthant with unit norm: ``|x / ||x|||``."""
    return F.normalize(x, dim=-1).abs()


def cosine_embed(x: Tensor) -> Tensor:
    return F.normalize(x, dim=-1)


def embed(x: Tensor, method: str) -> Tensor:
    _check_method(method)
    return order_embed(x) if method == "order" else cosine_embed(x)


def order_violation(captions: Tensor, images: Tensor, chunk: int = 256) -> Tensor:
    """E[m, n] = ||max(0, captions[m] - images[n])||^2, shape (M, N).

    Computed ``chunk`` captions at a time so an (M, N, D) tensor is never built whole.
    """
    if captions.dim() != 2 or images.dim() != 2 or captions.shape[1] != images.shape[1]:
        raise ValueError(
            f"captions and images must be (M, D) and (N, D), got {tuple(captions.shape)} and {tuple(images.shape)}"
        )
    out = [
        (c[:, None, :] - images[None, :, :]).clamp(min=0).pow(2).sum(-1)  # (m, N)
        for c in captions.split(chunk)
    ]
    return torch.cat(out) if out else captions.new_zeros(0, images.shape[0])


def scores(captions: Tensor, images: Tensor, method: str) -> Tensor:
    """S[m, n], higher = caption m fits image n better; (M, N)."""
    _check_method(method)
    if method == "order":
        return -order_violation(captions, images)
    return captions @ images.T


def contrastive_loss(scores: Tensor, negatives: Tensor | None = None, margin: float = 0.05,
                     reduction: str = "sum") -> Tensor:
    """The hinge ranking loss above on a (B, B) score matrix whose diagonal holds the matched pairs.

    ``negatives`` (B, B) bool marks the pairs that may be pushed apart (default: every
    off-diagonal pair, as in Vendrov et al.); the diagonal is never a negative. ``reduction``
    "sum" (the paper's) or "mean" (divided by B).
    """
    if scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"scores must be a square (B, B) matrix, got shape {tuple(scores.shape)}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin!r}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    B = scores.shape[0]
    eye = torch.eye(B, dtype=torch.bool, device=scores.device)
    if negatives is None:
        negatives = ~eye
    elif negatives.shape != scores.shape or negatives.dtype != torch.bool:
        raise ValueError(f"negatives must be a bool tensor of shape {tuple(scores.shape)}, "
                         f"got {negatives.dtype} {tuple(negatives.shape)}")
    pos = scores.diagonal()
    # [a, b]: caption a as a contrastive caption for image b, against the matched pair (b, b)
    cost_captions = (margin - pos[None, :] + scores).clamp(min=0)
    # [a, b]: image b as a contrastive image for caption a, against the matched pair (a, a)
    cost_images = (margin - pos[:, None] + scores).clamp(min=0)
    mask = (negatives & ~eye).to(scores.dtype)
    total = ((cost_captions + cost_images) * mask).sum()
    return total if reduction == "sum" else total / max(B, 1)


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
