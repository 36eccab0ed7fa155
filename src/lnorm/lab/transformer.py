"""The tiny character-level transformer of E4 (norm kind and placement) and E6 (its time per step
with and without layer norm): a GPT-style decoder whose norms are ``make_norm`` kinds, so "no
norm" is the same code with ``nn.Identity`` in the norms' places."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lnorm.nn import make_norm

VARIANTS = {  # name -> (norm kind, post-norm?)
    "postln": ("layer", True), "preln": ("layer", False), "prerms": ("rms", False),
    "prebn": ("batch", False), "none": ("none", False),
}


class Block(nn.Module):
    def __init__(self, d: int, heads: int, norm: str, post: bool):
        super().__init__()
        self.heads, self.post = heads, post
        self.n1, self.n2 = make_norm(norm, d), make_norm(norm, d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def attn(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))

    def forward(self, x):
        if self.post:
            x = self.n1(x + self.attn(x))
            return self.n2(x + self.mlp(x))
        x = x + self.attn(self.n1(x))
        return x + self.mlp(self.n2(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int, d: int, heads: int, layers: int, block: int, variant: str):
        super().__init__()
        norm, post = VARIANTS[variant]
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.blocks = nn.ModuleList(Block(d, heads, norm, post) for _ in range(layers))
        self.norm_f = make_norm("none" if post else norm, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):  # (B, T) -> (B, T, V)
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm_f(x))
