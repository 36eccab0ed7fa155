"""Factories that misbehave, for ``lnorm audit``'s exit-status contract (tests/test_audit.py)."""

import os
import sys
import time

import torch
from torch import nn


def make_exit0():
    sys.exit(0)


def make_exit7():
    raise SystemExit(7)


def make_bn_mlp() -> nn.Module:
    """Runs in eval mode at any batch size, fails in training mode on one sample."""
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))


class _Hang(nn.Module):
    def forward(self, x):
        marker = os.environ.get("LNORM_AUDIT_TEST_MARKER")
        if marker:
            open(marker, "w").close()
        while True:  # a model that never returns
            time.sleep(0.05)


def make_hang() -> nn.Module:
    return _Hang()


class _FailingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("this backward fails on purpose")


class _BreaksInBackward(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 2)

    def forward(self, x):
        return _FailingBackward.apply(self.lin(x))


def make_breaks_in_backward() -> nn.Module:
    return _BreaksInBackward()
