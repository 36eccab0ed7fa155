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


# A child process that a test interrupts with SIGINT starts through this trampoline, as from a
# terminal: SIGINT unblocked and at its default disposition whatever this pytest process carries
# (the signal mask and an ignored SIGINT survive fork and exec). `make test &` from a script (a
# background job without job control) starts pytest with SIGINT ignored, and the two Ctrl-C tests
# then hung: their children ignored the Ctrl-C they were sent. The disposition and mask the child
# inherited are written to $LNORM_TEST_SIGINT_LOG when set.
_SIGINT_TRAMPOLINE = (
    "import os, signal, sys\n"
    "log = os.environ.get('LNORM_TEST_SIGINT_LOG')\n"
    "if log:\n"
    "    open(log, 'a').write(f'{signal.getsignal(signal.SIGINT)!r} "
    "{sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, []))}\\n')\n"
    "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})\n"
    "signal.signal(signal.SIGINT, signal.SIG_DFL)\n"
    "os.execv(sys.executable, [sys.executable] + sys.argv[1:])\n"
)


def interruptible(argv: list[str]) -> list[str]:
    """``argv`` (starting with ``sys.executable``) run through the SIGINT trampoline above."""
    assert argv[0] == sys.executable, argv
    return [sys.executable, "-c", _SIGINT_TRAMPOLINE, *argv[1:]]
