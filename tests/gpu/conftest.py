"""The Triton kernels' tests run two ways, chosen per test by the ``triton_device`` fixture:

* ``cpu``: CPU tensors through Triton's interpreter. Triton reads ``TRITON_INTERPRET`` when the
  kernels are decorated, so it must be in the environment before :mod:`lnorm.ops._triton_norm` is
  first imported: this conftest sets it at collection time, before any test runs, unless it is set
  already or a GPU is present.
* ``cuda``: CUDA tensors through the compiled kernels (``TRITON_INTERPRET`` unset or 0, a GPU
  present); ``benchmarks/gpu_check.sh`` runs them so.

Without triton installed every Triton test skips with that reason (the backend-selection tests in
``test_backend_devices.py`` that need no triton still run).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# the norm ops' shared test machinery (run one op as ours / torch / float64 reference, compare)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "ops"))

import lnorm  # noqa: E402
from lnorm.ops import backend  # noqa: E402


def triton_skip_reason(device: str) -> str | None:
    """Why the Triton kernels cannot run on ``device`` here, or None when they can."""
    if not backend.triton_available():
        return "triton is not installed (pip install lnorm[gpu]): the Triton kernels are not tested"
    interpreted = backend.triton_interpreted()
    if device == "cpu" and not interpreted:
        return "the Triton kernels are compiled for the GPU here; TRITON_INTERPRET=1 runs them on CPU tensors"
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    if device == "cuda" and interpreted:
        return "TRITON_INTERPRET=1: run with TRITON_INTERPRET=0 to test the compiled kernels on CUDA"
    return None


@pytest.fixture(params=["cpu", "cuda"])
def triton_device(request):
    """A device the Triton kernels run on, with lnorm's backend set to triton for the test."""
    reason = triton_skip_reason(request.param)
    if reason:
        pytest.skip(reason)
    with lnorm.use_backend("triton"):
        yield torch.device(request.param)


@pytest.fixture
def launches(monkeypatch):
    """Counts of the Triton launchers' calls, so a test knows the kernels really ran."""
    from lnorm.ops import _triton_norm

    seen = {"fwd": 0, "bwd": 0}
    for kind in seen:
        original = getattr(_triton_norm, f"norm_{kind}")

        def wrapped(*args, _original=original, _kind=kind):
            seen[_kind] += 1
            return _original(*args)

        monkeypatch.setattr(_triton_norm, f"norm_{kind}", wrapped)
    return seen
