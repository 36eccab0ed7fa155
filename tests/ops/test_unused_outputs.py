"""Backward through the fused norm when only some of its outputs reach the loss."""

import torch

import lnorm.functional as LF


def _ref(x, r, w, b):
    s = x + r
    return torch.nn.functional.layer_norm(s, (s.shape[-1],), w, b), s


def test_only_the_new_residual_reaches_the_loss(backend):
    torch.manual_seed(0)
    x, r = (torch.randn(6, 40, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w, b = torch.rand(40, dtype=torch.float64, requires_grad=True), torch.randn(40, dtype=torch.float64, requires_grad=True)
    _, new_res = LF.add_layer_norm(x, r, 40, w, b)
    gx, gr = torch.autograd.grad((new_res * 3).sum(), (x, r))
    assert torch.equal(gx, torch.full_like(x, 3.0)) and torch.equal(gr, torch.full_like(r, 3.0))


def test_only_the_output_reaches_the_loss(backend):
    torch.manual_seed(1)
    x, r = (torch.randn(6, 40, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w, b = torch.rand(40, dtype=torch.float64, requires_grad=True), torch.randn(40, dtype=torch.float64, requires_grad=True)
    out, _ = LF.add_layer_norm(x, r, 40, w, b)
    dy = torch.randn_like(out)
    ours = torch.autograd.grad(out, (x, r, w, b), dy)
    ref_out, _ = _ref(x, r, w, b)
    theirs = torch.autograd.grad(ref_out, (x, r, w, b), dy)
    for a, t in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, t)
