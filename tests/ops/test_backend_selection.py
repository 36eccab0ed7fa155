"""The backend switch really changes which kernels run (so 'both backends' tests test both)."""

import importlib
import os

import pytest
import torch

import lnorm
import lnorm.functional as LF
from lnorm.ops import norm as norm_ops


@pytest.fixture
def calls(monkeypatch):
    """Count the launcher calls per backend."""
    seen = {"numba_fwd": 0, "numba_bwd": 0, "torch_fwd": 0, "torch_bwd": 0}
    for name in seen:
        original = getattr(norm_ops, f"_{name.split('_')[1]}_{name.split('_')[0]}")

        def wrapped(*args, _original=original, _name=name):
            seen[_name] += 1
            return _original(*args)

        monkeypatch.setattr(norm_ops, f"_{name.split('_')[1]}_{name.split('_')[0]}", wrapped)
    return seen


@pytest.mark.parametrize("name", ["numba", "torch"])
def test_use_backend_selects_the_kernels(calls, name):
    if name == "numba" and not lnorm.numba_available():
        pytest.skip("numba is not importable")
    x = torch.randn(4, 8, requires_grad=True)
    with lnorm.use_backend(name):
        assert lnorm.get_backend() == name
        y, _ = LF.add_layer_norm(x, torch.randn(4, 8), 8, torch.ones(8), torch.zeros(8))
        y.sum().backward()
    other = "torch" if name == "numba" else "numba"
    assert calls[f"{name}_fwd"] == 1 and calls[f"{name}_bwd"] == 1, calls
    assert calls[f"{other}_fwd"] == 0 and calls[f"{other}_bwd"] == 0, calls


def test_use_backend_restores_the_previous_choice():
    before = lnorm.get_backend()
    with lnorm.use_backend("torch"):
        assert lnorm.get_backend() == "torch"
    assert lnorm.get_backend() == before


def test_unknown_backend_is_an_error():
    with pytest.raises(ValueError, match=r"backend must be one of .*got 'cuda'"):
        lnorm.set_backend("cuda")
    with pytest.raises(ValueError, match=r"backend must be one of .*got 'cuda'"):
        with lnorm.use_backend("cuda"):
            pass


def test_environment_variable(monkeypatch):
    # LNORM_BACKEND is read when lnorm.ops.backend is imported: reload it in place (every user holds
    # the module, not its globals), then restore it as it was
    from lnorm.ops import backend

    try:
        monkeypatch.setenv("LNORM_BACKEND", "torch")
        importlib.reload(backend)
        assert lnorm.get_backend() == "torch"
        monkeypatch.setenv("LNORM_BACKEND", "gpu")
        with pytest.raises(ValueError, match=r"LNORM_BACKEND: backend must be one of .*got 'gpu'"):
            importlib.reload(backend)
    finally:
        monkeypatch.undo()
        importlib.reload(backend)
    assert os.environ.get("LNORM_BACKEND") != "gpu"
