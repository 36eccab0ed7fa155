"""`lnorm bench ops` checks lnorm against float64 before timing it: the check must catch a wrong
forward in fwd+bwd mode and a float64 error below float32's rounding step (regressions from a
review: fwd+bwd compared only gradients, and the error was measured after a cast to float32)."""

from __future__ import annotations

import pytest
import torch

from lnorm.bench import ops


@pytest.fixture
def wrong_forward(monkeypatch):
    def set_offset(offset):
        orig = ops._lnorm_fn
        monkeypatch.setattr(ops, "_lnorm_fn", lambda op, x, r, w, b: tuple(o + offset for o in orig(op, x, r, w, b)))
    return set_offset


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_a_wrong_forward_fails_the_check(wrong_forward, mode):
    wrong_forward(1.0)  # the outputs are off by 1, the gradients unchanged
    args = ops._inputs("layer_norm", 4, 8, torch.float32, mode != "fwd")
    with pytest.raises(AssertionError, match="max abs error"):
        ops._check("layer_norm", mode, *args, torch.float32)


def test_float64_errors_are_measured_in_float64(wrong_forward):
    args = ops._inputs("layer_norm", 3, 16, torch.float64, False)
    assert ops._check("layer_norm", "fwd", *args, torch.float64) < 1e-12  # right: passes, tiny error
    wrong_forward(1e-10)  # below float32's resolution at 1, far above float64's
    with pytest.raises(AssertionError, match="max abs error 1e-10"):
        ops._check("layer_norm", "fwd", *args, torch.float64)
