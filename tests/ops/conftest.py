import pytest

import lnorm
from lnorm.ops.backend import numba_available


@pytest.fixture(params=["numba", "torch"])
def backend(request):
    """Run the test once per CPU backend (lnorm.use_backend)."""
    if request.param == "numba" and not numba_available():
        pytest.skip("numba is not importable")
    with lnorm.use_backend(request.param):
        yield request.param
