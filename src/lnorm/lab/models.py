"""Small models whose normalization is a constructor argument (``lnorm.nn.make_norm`` kinds)."""

from __future__ import annotations

import torch
from torch import nn

from lnorm.nn import make_norm

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}  # the MLP's nonlinearities

class MLP(nn.Module):
    """``depth`` hidden layers of Linear -> norm -> ReLU (the norm sees the summed inputs, as in the
    paper), then a Linear head. Input ``(B, in_features)``, output ``(B, classes)``."""

    def __init__(self, in_features: int, hidden: int, depth: int, classes: int, norm: str = "none",
                 act: str = "relu"):
        super().__init__()
        acts = ACTIVATIONS
        if act not in acts:
            raise ValueError(f"act must be one of {sorted(acts)}, got {act!r}")
        layers = []
        d = in_features
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), make_norm(norm, hidden), acts[act]()]
            d = hidden
        self.hidden = nn.ModuleList(layers)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.hidden:
            x = m(x)
        return self.head(x)

    def linears(self) -> list[nn.Linear]:
        return [m for m in self.hidden if isinstance(m, nn.Linear)] + [self.head]


class CNN2d(nn.Module):
    """Two 3x3 conv blocks (conv -> norm -> ReLU -> 2x2 max-pool) and a linear head, for 28x28 digits."""

    def __init__(self, norm: str = "none", channels: int = 16, classes: int = 10):
        super().__init__()
        c1, c2 = channels, 2 * channels
        self.net = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), make_norm(norm, c1, layout="channels"), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), make_norm(norm, c2, layout="channels"), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Linear(c2 * 7 * 7, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, 1, 28, 28)
        return self.head(self.net(x).flatten(1))


class CNN1d(nn.Module):
    """MNIST-1D's reference CNN shape (three conv layers of 25 channels, kernel 5, stride 2), with a
    norm after each conv. Input ``(B, 40)``."""

    def __init__(self, norm: str = "none", channels: int = 25, classes: int = 10, length: int = 40):
        super().__init__()
        layers, c_in, L = [], 1, length
        for _ in range(3):
            layers += [nn.Conv1d(c_in, channels, 5, stride=2, padding=1), make_norm(norm, channels, layout="channels"),
                       nn.ReLU()]
            c_in = channels
            L = (L + 2 - 5) // 2 + 1
        self.net = nn.Sequential(*layers)
        self.head = nn.Linear(channels * L, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x.unsqueeze(1)).flatten(1))


class _ResBlock(nn.Module):
    """conv -> norm -> ReLU -> conv -> norm, plus the input (a 1x1 conv -> norm when the shape
    changes), then ReLU: the pre-2016 ResNet block, so every conv output passes through the norm."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1)
        self.norm1 = make_norm(norm, c_out, layout="channels")
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.norm2 = make_norm(norm, c_out, layout="channels")
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride), make_norm(norm, c_out, layout="channels"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(h)) + self.shortcut(x))


class ResCNN(nn.Module):
    """A small residual CNN for one-channel images ``(B, 1, H, W)``: a stride-2 3x3 conv stem, then
    stages of residual blocks (``blocks[i]`` blocks of ``channels * 2**i`` channels; each stage after
    the first halves the resolution), global average pooling and a linear head. ``blocks=(2, 2)``
    has 9 3x3 convs. Conv weights are drawn in the same order whatever the norm, so one seed gives
    every norm the same initial convs."""

    def __init__(self, norm: str = "none", channels: int = 8, blocks: tuple[int, ...] = (2, 2), classes: int = 10):
        super().__init__()
        if not blocks or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in blocks):
            raise ValueError(f"blocks must be a non-empty tuple of ints >= 1, got {blocks!r}")
        self.stem = nn.Sequential(nn.Conv2d(1, channels, 3, 2, 1), make_norm(norm, channels, layout="channels"),
                                  nn.ReLU())
        layers, c = [], channels
        for i, n in enumerate(blocks):
            c_out = channels * 2**i
            for j in range(n):
                layers.append(_ResBlock(c, c_out, 2 if (i and not j) else 1, norm))
                c = c_out
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 1:
            raise ValueError(f"ResCNN expects images (B, 1, H, W), got shape {list(x.shape)}")
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))
