"""Which backend runs per device (``lnorm.get_backend(device)``), and the errors of forcing triton
where it is missing. These need no triton: its presence is simulated."""

from __future__ import annotations

import pytest
import torch

import lnorm
from lnorm.ops import backend


@pytest.fixture
def fake_triton(monkeypatch):
    """Pretend triton imports (compiled kernels, no interpreter) or not: call with True/False."""

    def set_state(available: bool, interpreted: bool = False):
        monkeypatch.setattr(backend, "_triton_ok", available)
        monkeypatch.setattr(backend, "triton_interpreted", lambda: available and interpreted)

    return set_state


def cpu_default() -> str:
    return "numba" if lnorm.numba_available() else "torch"


def test_auto_picks_triton_for_cuda_where_it_imports(fake_triton):
    fake_triton(True)
    with lnorm.use_backend("auto"):
        assert lnorm.get_backend("cuda") == "triton"
        assert lnorm.get_backend(torch.device("cuda", 1)) == "triton"
        assert lnorm.get_backend("cpu") == lnorm.get_backend() == cpu_default()
        assert lnorm.get_backend("meta") == "torch"
    fake_triton(False)
    with lnorm.use_backend("auto"):
        assert lnorm.get_backend("cuda") == "torch"


def test_auto_leaves_the_interpreter_to_an_explicit_request(fake_triton):
    # under TRITON_INTERPRET=1 CUDA tensors would crawl through the interpreter: auto gives them
    # torch, and CPU tensors keep their default; "triton" routes both through the kernels
    fake_triton(True, interpreted=True)
    with lnorm.use_backend("auto"):
        assert lnorm.get_backend("cuda") == "torch"
        assert lnorm.get_backend("cpu") == cpu_default()
    with lnorm.use_backend("triton"):
        assert lnorm.get_backend("cuda") == "triton"
        assert lnorm.get_backend("cpu") == lnorm.get_backend() == "triton"


def test_triton_without_the_interpreter_leaves_cpu_tensors_to_the_cpu_default(fake_triton):
    fake_triton(True, interpreted=False)
    with lnorm.use_backend("triton"):
        assert lnorm.get_backend("cuda") == "triton"
        assert lnorm.get_backend("cpu") == cpu_default()


def test_torch_applies_to_every_device(fake_triton):
    fake_triton(True)
    with lnorm.use_backend("torch"):
        assert [lnorm.get_backend(d) for d in ("cpu", "cuda", "meta")] == ["torch"] * 3


def test_numba_is_a_cpu_backend(fake_triton):
    if not lnorm.numba_available():
        pytest.skip("numba is not importable")
    fake_triton(True)
    with lnorm.use_backend("numba"):
        assert lnorm.get_backend("cpu") == "numba"
        assert lnorm.get_backend("cuda") == "triton"  # numba cannot run there: auto's choice


def test_forcing_triton_without_triton_is_an_error(fake_triton, monkeypatch):
    fake_triton(False)
    before = lnorm.get_backend()
    with pytest.raises(RuntimeError, match=r"backend 'triton' requested but it is not available.*lnorm\[gpu\]"):
        lnorm.set_backend("triton")
    with pytest.raises(RuntimeError, match=r"backend 'triton' requested but it is not available"):
        with lnorm.use_backend("triton"):
            pass
    assert lnorm.get_backend() == before
    # LNORM_BACKEND=triton (read at import, where nothing is checked) falls back as "auto" does
    monkeypatch.setattr(backend, "_default", "triton")
    assert lnorm.get_backend("cuda") == "torch"
    assert lnorm.get_backend("cpu") == cpu_default()


def test_triton_is_a_known_backend_name():
    assert "triton" in backend.choices()
    with pytest.raises(ValueError, match=r"backend must be one of .*'triton'.*got 'gpu'"):
        lnorm.set_backend("gpu")
