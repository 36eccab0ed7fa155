"""A child process that a test interrupts with SIGINT (the Ctrl-C tests)."""

import sys

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
