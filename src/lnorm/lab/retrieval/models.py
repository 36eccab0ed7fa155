"""Encoders for image-sentence retrieval: an MLP on pixels and a GRU over word embeddings.

Vendrov et al. (2016) map 4096-d VGG features linearly into a 1024-d space and encode sentences
with a GRU (300-d word embeddings) whose last hidden state is the sentence embedding; the
layer-norm paper swaps that GRU for a layer-normalized one. Here there is no pretrained CNN, so
the image encoder is a small MLP on raw pixels; the sentence encoder is ``torch.nn.GRU`` or
``lnorm.nn.LayerNormGRU`` (paper eq. 26-28), chosen by ``rnn``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from lnorm.lab.retrieval import losses
from lnorm.nn import LayerNormGRU

RNNS = ("gru", "ln_gru")


class ImageEncoder(nn.Module):
    """(B, 784) pixels -> (B, dim) unnormalized embedding: Linear-ReLU-Linear."""

    def __init__(self, in_features: int = 784, hidden: int = 256, dim: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class SentenceEncoder(nn.Module):
    """(B, L) token ids + (B,) lengths -> (B, dim): the GRU's last hidden state."""

    def __init__(self, vocab_size: int, word_dim: int = 64, dim: int = 128, rnn: str = "gru"):
        super().__init__()
        if rnn not in RNNS:
            raise ValueError(f"rnn must be one of {RNNS}, got {rnn!r}")
        self.rnn_kind = rnn
        self.embedding = nn.Embedding(vocab_size, word_dim, padding_idx=0)
        if rnn == "gru":
            self.rnn = nn.GRU(word_dim, dim, batch_first=True)
        else:
            self.rnn = LayerNormGRU(word_dim, dim, batch_first=True)

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        x = self.embedding(tokens)  # (B, L, W)
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, h = self.rnn(packed)  # h: (1, B, dim), in the input's order
        return h[-1]


class RetrievalModel(nn.Module):
    """Both encoders and the scoring rule (``method`` "order" or "cosine")."""

    def __init__(self, vocab_size: int, *, method: str = "order", rnn: str = "gru", dim: int = 128,
                 word_dim: int = 64, image_hidden: int = 256):
        super().__init__()
        if method not in losses.METHODS:
            raise ValueError(f"method must be one of {losses.METHODS}, got {method!r}")
        self.method = method
        self.images = ImageEncoder(hidden=image_hidden, dim=dim)
        self.sentences = SentenceEncoder(vocab_size, word_dim, dim, rnn)

    def embed_images(self, x: Tensor) -> Tensor:
        return losses.embed(self.images(x), self.method)

    def embed_captions(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        return losses.embed(self.sentences(tokens, lengths), self.method)

    def scores(self, captions: Tensor, images: Tensor) -> Tensor:
        """(M, N) from embedded captions (M, D) and images (N, D)."""
        return losses.scores(captions, images, self.method)

    @torch.no_grad()
    def embed_all(self, images: Tensor, tokens: Tensor, lengths: Tensor, batch: int = 1000):
        """Embeddings of a whole split, in eval mode batches."""
        was = self.training
        self.eval()
        try:
            im = torch.cat([self.embed_images(x) for x in images.split(batch)])
            cap = torch.cat([self.embed_captions(t, n) for t, n in zip(tokens.split(batch), lengths.split(batch), strict=True)])
        finally:
            self.train(was)
        return cap, im
