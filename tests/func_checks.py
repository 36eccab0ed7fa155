"""Checks of torch.func recipes shared by the ops' and the recurrent layers' transform tests."""

from __future__ import annotations

import torch
from torch.func import functional_call, grad, vmap

from tolerances import assert_close


def assert_per_sample_grads_match_loop(module: torch.nn.Module, samples: torch.Tensor, name: str = "") -> None:
    """torch.func's per-sample-gradient recipe, ``vmap(grad(loss))`` over ``functional_call``,
    equals one ordinary backward per sample. ``samples`` stacks the samples on dim 0; the loss is
    ``out.sin().sum()`` of the module's output (its first element when it returns a tuple)."""

    def loss(params, sample):
        out = functional_call(module, params, (sample,))
        out = out[0] if isinstance(out, tuple) else out
        return out.sin().sum()

    params = {k: v.detach() for k, v in module.named_parameters()}
    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, samples)
    for i in range(samples.shape[0]):
        module.zero_grad()
        loss(dict(module.named_parameters()), samples[i]).backward()
        for k, p in module.named_parameters():
            assert_close(per_sample[k][i], p.grad, dtype=torch.float64, name=f"{name}per-sample d{k}[{i}]")
