"""The norm kernels at the sizes users hit: the threaded Numba builds (>= PARALLEL_MIN_ELEMENTS
elements), where each thread sums its share of the weight and bias gradients and the launcher
adds the shares, against the float64 reference.

The threaded build is forced even on a one-thread machine (it then runs its chunks in turn, and
the shares are still summed), and the test checks that it ran.
"""

import pytest
import torch
from norm_cases import check_against_torch_and_ref, make_inputs

import lnorm
from lnorm.ops.backend import numba_available

pytestmark = [pytest.mark.skipif(not numba_available(), reason="numba is not importable"),
              pytest.mark.usefixtures("own_layer_norm")]

# rows x features: a square-ish block, many short rows (the shares split rows unevenly), and
# few long rows (fewer rows than 4 chunks per thread on a big machine)
SIZES = [((256,), (272,)), ((1021,), (67,)), ((16,), (4099,))]
SIZE_IDS = ["256x272", "1021x67", "16x4099"]


@pytest.fixture
def threaded(monkeypatch):
    """Pick the threaded build above the size threshold whatever the thread count; count its runs."""
    from lnorm.ops import _numba_kernels as K

    ran = []

    def pick(parallel_kernel, serial_kernel, elements):
        if elements >= K.PARALLEL_MIN_ELEMENTS:
            ran.append(parallel_kernel)
            return parallel_kernel
        return serial_kernel

    monkeypatch.setattr(K, "pick", pick)
    with lnorm.use_backend("numba"):
        yield ran, K


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize(("lead", "shape"), SIZES, ids=SIZE_IDS)
@pytest.mark.parametrize("op", ["layer", "rms", "add_layer", "add_rms"])
def test_threaded_kernels_match_reference(threaded, op, lead, shape, dtype):
    ran, K = threaded
    assert lead[0] * shape[0] >= K.PARALLEL_MIN_ELEMENTS
    inputs = make_inputs(op, lead, shape, dtype, seed=3)
    ours = check_against_torch_and_ref(op, inputs, shape)
    assert K.norm_fwd in ran and K.norm_bwd in ran, "the threaded kernels did not run"
    assert "dweight" in ours
