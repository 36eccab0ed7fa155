"""A deep MLP without normalization and small weights (vanishing gradients), and the same with
layer norm, for ``lnorm audit`` (input 16)."""

import torch
from torch import nn


def _mlp(norm: bool) -> nn.Module:
    layers = []
    for _ in range(12):
        lin = nn.Linear(16, 16)
        with torch.no_grad():
            lin.weight.mul_(0.5)
        layers += [lin] + ([nn.LayerNorm(16)] if norm else []) + [nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(16, 2))


def make_model() -> nn.Module:
    return _mlp(norm=False)


def make_ln_model() -> nn.Module:
    return _mlp(norm=True)
