"""A tiny pre-norm transformer over token ids with layer norm, and a variant with batch norm,
for ``lnorm audit`` (input 12 tokens, --int-high 50)."""

import torch
from torch import nn


class SeqBatchNorm(nn.Module):
    """Batch norm over the features of (B, T, C)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(d)

    def forward(self, x):
        return self.bn(x.transpose(1, 2)).transpose(1, 2)


class Block(nn.Module):
    def __init__(self, d: int, norm) -> None:
        super().__init__()
        self.norm1, self.norm2 = norm(d), norm(d)
        self.attn = nn.MultiheadAttention(d, 4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):  # (B, T, d)
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, norm=nn.LayerNorm, vocab: int = 50, d: int = 32, layers: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(1, 64, d))
        self.blocks = nn.ModuleList(Block(d, norm) for _ in range(layers))
        self.norm = norm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens):  # (B, T) ids
        x = self.emb(tokens) + self.pos[:, : tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))  # (B, T, vocab)


def make_model() -> nn.Module:
    return TinyLM()


def make_bn_model() -> nn.Module:
    return TinyLM(norm=SeqBatchNorm)
