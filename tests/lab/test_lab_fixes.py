"""Regressions of the lab's design bugs (issue 18, item 6): class-sorted evaluation batches, a
"group" norm that was layer norm, E4's divergence rule, and E1's budget title."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from lnorm.lab import config as LC
from lnorm.lab.data import mnist
from lnorm.lab.experiments import e1_batch_size as e1
from lnorm.lab.experiments import e2_train_eval as e2
from lnorm.lab.experiments import e4_transformer as e4
from lnorm.lab.models import CNN1d
from lnorm.nn import GroupNorm, make_norm


def test_mnist_eval_batches_mix_classes():
    # E2 runs the test set through the model in training mode in slices of eval_batch: with the test
    # set sorted by class, every slice was one digit and batch norm saw single-class statistics
    _, _, _, yte = mnist()
    bs = e2.Config().eval_batch
    per_batch = [len(torch.unique(yte[i:i + bs])) for i in range(0, len(yte), bs)]
    assert min(per_batch) >= 8, per_batch
    assert len(torch.unique(yte[:64])) >= 8  # the batch-independence probe's batch
    assert torch.bincount(yte, minlength=10).tolist() == [100] * 10  # still stratified
    assert torch.equal(mnist()[3], yte)  # a fixed order
