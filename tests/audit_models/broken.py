"""Broken model files for the audit's error paths: importing this one fails."""

from torch import nn

raise RuntimeError("this model file is broken on purpose")


def make_model() -> nn.Module:
    return nn.Linear(2, 2)
