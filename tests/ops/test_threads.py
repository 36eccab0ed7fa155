"""The Numba kernels' thread count follows torch.set_num_threads (README, Limitations)."""

import pytest
import torch

import lnorm
from lnorm import numba_available

pytestmark = pytest.mark.skipif(not numba_available(), reason="numba is not importable")


@pytest.fixture
def torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("run", ["rms_norm", "lstm"])
def test_numba_threads_follow_torch(torch_threads, run):
    # Regression: the Numba pool kept its own count (all cores) whatever torch.set_num_threads said
    import numba

    for n in (1, 2):
        torch.set_num_threads(n)
        with lnorm.use_backend("numba"):
            if run == "rms_norm":
                lnorm.rms_norm(torch.randn(512, 256), 256)  # 128k elements: the threaded kernels
            else:
                lnorm.LayerNormLSTM(4, 8)(torch.randn(3, 2, 4))
        assert numba.get_num_threads() == min(n, numba.config.NUMBA_NUM_THREADS)
