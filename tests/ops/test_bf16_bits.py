"""The Numba kernels read and write bfloat16 as raw bits: the conversions must be torch's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lnorm.ops.backend import numba_available

pytestmark = pytest.mark.skipif(not numba_available(), reason="numba is not importable")


def _roundtrip_fns():
    from numba import njit

    from lnorm.ops._numba_kernels import _f, _st

    @njit
    def narrow(v, out):  # float32 -> bfloat16 bits
        for i in range(v.shape[0]):
            out[i] = _st(v[i], out)

    @njit
    def widen(bits, out):  # bfloat16 bits -> float32
        for i in range(bits.shape[0]):
            out[i] = _f(bits[i])

    return narrow, widen


def _edge_values() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    f32 = torch.finfo(torch.float32)
    bf = torch.finfo(torch.bfloat16)
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), float("nan"), f32.max,
                            -f32.max, f32.tiny, f32.tiny / 4, bf.max, bf.max * 1.00390625, 3.0e38,
                            1.00390625, 1.01171875, 1.0078125])  # ties to even both ways
    # random bit patterns cover every exponent, and the tie and near-tie cases of the mantissa
    bits = torch.randint(-(2**31), 2**31 - 1, (200_000,), generator=g, dtype=torch.int64).to(torch.int32)
    ties = (bits & ~0xFFFF) | 0x8000  # exactly half way between two bfloat16 values
    return torch.cat([special, bits.view(torch.float32), ties.view(torch.float32)])


def test_narrowing_rounds_as_torch():
    narrow, _ = _roundtrip_fns()
    v = _edge_values()
    out = np.empty(v.numel(), dtype=np.uint16)
    narrow(v.numpy(), out)
    ours = torch.from_numpy(out.view(np.int16))
    theirs = v.to(torch.bfloat16).view(torch.int16)
    nan = torch.isnan(v)
    assert torch.equal(ours[~nan], theirs[~nan]), "float32 -> bfloat16 bits differ from torch's rounding"
    assert torch.isnan(ours[nan].view(torch.bfloat16)).all(), "NaN must stay NaN"


def test_widening_is_exact():
    _, widen = _roundtrip_fns()
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)  # every bfloat16 value
    out = np.empty(bits.numel(), dtype=np.float32)
    widen(bits.numpy().view(np.uint16), out)
    expected = bits.view(torch.bfloat16).float()
    ours = torch.from_numpy(out)
    nan = torch.isnan(expected)
    assert torch.equal(ours[~nan], expected[~nan])
    assert torch.isnan(ours[nan]).all()
