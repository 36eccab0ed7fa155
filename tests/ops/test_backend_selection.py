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


def test_use_backend_is_an_override_for_its_own_thread_only():
    # issue 13 item 7: a `with use_backend(...)` block in one thread switched every thread, and
    # two interleaved blocks left the whole process on the last one's previous choice
    import threading

    default = lnorm.get_backend()
    inside, entered, release = {}, threading.Event(), threading.Event()

    def worker(name):
        with lnorm.use_backend(name):
            entered.set()
            release.wait(timeout=60)
            inside[name] = lnorm.get_backend()
        inside[name + " after"] = lnorm.get_backend()

    t = threading.Thread(target=worker, args=("torch",))
    t.start()
    assert entered.wait(timeout=60)
    seen_here = lnorm.get_backend()  # main thread, while the worker is inside its block
    release.set()
    t.join()
    assert seen_here == default
    assert inside == {"torch": "torch", "torch after": default}
    assert lnorm.get_backend() == default


def test_interleaved_blocks_in_two_threads_restore_the_process_default():
    import threading

    default = lnorm.get_backend()
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first():
        with lnorm.use_backend("torch"):
            a_in.set()
            b_in.wait(timeout=60)
        a_out.set()  # leaves before the second thread does
        seen["first"] = lnorm.get_backend()

    def second():
        a_in.wait(timeout=60)
        with lnorm.use_backend("auto"):
            b_in.set()
            a_out.wait(timeout=60)
            seen["second inside"] = lnorm.get_backend()

    threads = [threading.Thread(target=f) for f in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen["first"] == default
    assert seen["second inside"] == ("numba" if lnorm.numba_available() else "torch")
    assert lnorm.get_backend() == default


def test_set_backend_is_the_default_of_threads_without_an_override():
    import threading

    before = lnorm.get_backend()
    seen = {}
    try:
        lnorm.set_backend("torch")
        t = threading.Thread(target=lambda: seen.setdefault("thread", lnorm.get_backend()))
        t.start()
        t.join()
    finally:
        lnorm.set_backend("auto")
    assert seen["thread"] == "torch"
    assert lnorm.get_backend() == before


def test_a_registered_backend_is_chosen_per_device():
    # a backend joins through the registry: "auto" prefers it on the devices it supports, and
    # naming it leaves devices it does not support on the best backend for them
    from lnorm.ops import backend

    try:
        backend.register_backend(backend.Backend(
            "fake", available=lambda: True, supports=lambda device: device.type == "meta"))
        assert "fake" in backend.choices()
        assert backend.backend_for("meta") == "fake"
        assert backend.backend_for("cpu") == ("numba" if lnorm.numba_available() else "torch")
        with lnorm.use_backend("fake"):
            assert backend.backend_for("meta") == "fake"
            assert backend.backend_for("cpu") == ("numba" if lnorm.numba_available() else "torch")
        with lnorm.use_backend("torch"):
            assert backend.backend_for("meta") == "torch"
        backend.register_backend(backend.Backend("gone", available=lambda: False, supports=lambda d: True))
        with pytest.raises(RuntimeError, match="'gone' requested but it is not available"):
            lnorm.set_backend("gone")
        with pytest.raises(ValueError, match="lower-case identifier"):
            backend.register_backend(backend.Backend("auto", available=lambda: True, supports=lambda d: True))
    finally:
        for name in ("fake", "gone"):
            if name in backend.choices():
                backend.unregister_backend(name)
    assert backend.choices() == ("auto", "torch", "triton", "numba")
    with pytest.raises(ValueError, match="unregister"):
        backend.unregister_backend("torch")


@pytest.mark.skipif(not lnorm.numba_available(), reason="numba is not importable")
def test_torch_compile_follows_the_backend_of_each_call():
    # the choice is traced (and guarded): a graph compiled under one backend is not reused under
    # another, and fullgraph tracing does not break on reading it
    def f(x):
        return x + (1.0 if lnorm.get_backend() == "torch" else 2.0)

    g = torch.compile(f, fullgraph=True, backend="eager")
    x = torch.zeros(2)
    with lnorm.use_backend("torch"):
        assert g(x).tolist() == [1.0, 1.0]
    with lnorm.use_backend("numba"):
        assert g(x).tolist() == [2.0, 2.0]
    with lnorm.use_backend("torch"):
        assert g(x).tolist() == [1.0, 1.0]


@pytest.mark.parametrize(("rows", "features", "delegated"), [(4, 64, True), (4, 8, False)],
                         ids=["H64-torch-kernel", "H8-ours"])
def test_small_plain_layer_norm_delegates_to_torch(calls, rows, features, delegated):
    # the delegation rule of lnorm.ops.norm: a small float32 layer norm over >= 32 features is
    # torch's own kernel (no launcher of ours runs); below 32 features it is ours
    if not lnorm.numba_available():
        pytest.skip("numba is not importable")
    x = torch.randn(rows, features, requires_grad=True)
    with lnorm.use_backend("numba"):
        y = LF.layer_norm(x, features, torch.ones(features), torch.zeros(features))
        y.sum().backward()
    ran = sum(calls.values())
    assert (ran == 0) == delegated, calls
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x.detach(), (features,)))


def test_own_layer_norm_fixture_turns_delegation_off(calls, own_layer_norm, backend):
    x = torch.randn(4, 64, requires_grad=True)
    LF.layer_norm(x, 64).sum().backward()
    assert calls[f"{backend}_fwd"] == 1 and calls[f"{backend}_bwd"] == 1, calls


def test_get_backend_names_a_bad_device():
    # get_backend("bogus") and get_backend(3) raised torch's messages, naming neither the argument
    with pytest.raises(ValueError, match="get_backend: device must name a device such as 'cpu' or 'cuda:0', got 'bogus'"):
        lnorm.get_backend("bogus")
    with pytest.raises(TypeError, match=r"get_backend: device must be a torch.device or a device string .* got 3 \(int\)"):
        lnorm.get_backend(3)
    assert lnorm.get_backend(torch.device("cpu")) == lnorm.get_backend("cpu")
