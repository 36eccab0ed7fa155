import pytest
import torch

import lnorm


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(params=["numba", "torch"])
def backend(request):
    """Run the test once per CPU backend (lnorm.use_backend)."""
    if request.param == "numba" and not lnorm.numba_available():
        pytest.skip("numba is not importable")
    with lnorm.use_backend(request.param):
        yield request.param
