import sys

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


@pytest.fixture
def own_layer_norm(monkeypatch):
    """lnorm's own plain layer norm at every size, on both backends.

    Below ``NATIVE_LAYER_NORM_BELOW`` elements a float32/float64 layer norm runs torch's own
    kernel (the delegation rule in ``lnorm.ops.norm``), so a test comparing it with torch would
    compare torch with itself: the Numba kernels (numba backend) and the torch launchers' backward
    (torch backend) would never run at the sizes tests use.
    """
    from lnorm.ops import norm as norm_ops

    monkeypatch.setattr(norm_ops, "NATIVE_LAYER_NORM_BELOW", 0)
    monkeypatch.setattr(norm_ops, "NATIVE_LAYER_NORM_MIN_FEATURES", sys.maxsize)

