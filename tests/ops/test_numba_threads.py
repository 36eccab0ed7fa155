"""lnorm's Numba kernels after fork and from several threads, under each threading layer.

Each case runs in a fresh interpreter: the failures it guards against terminate or abort the
process (GNU OpenMP after fork, workqueue entered by two threads), which must fail the test,
not kill pytest."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from lnorm.ops.backend import numba_available

pytestmark = pytest.mark.skipif(not numba_available(), reason="the Numba kernels' threading")

# The work each process does: every threaded kernel (norm forward and backward above the
# threaded size, the fused LSTM and GRU forward and backward); returns a checksum so parent and
# child can be compared.
WORK = """
import torch, lnorm

def work(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 256, generator=g, requires_grad=True)  # 131k elements: threaded kernels
    r = torch.randn(512, 256, generator=g)
    y = lnorm.rms_norm(x, 256) + lnorm.add_layer_norm(x, r, 256)[0]
    y.square().sum().backward()
    total = float(y.detach().sum()) + float(x.grad.sum())
    for cls in (lnorm.LayerNormLSTM, lnorm.LayerNormGRU):
        m = cls(16, 32)
        with torch.no_grad():  # from g: the global generator is shared by the threads
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        out = m(torch.randn(7, 4, 16, generator=g))[0]
        out.sum().backward()
        total += float(out.detach().sum()) + float(m.weight_hh_l0.grad.sum())
    assert total == total, "NaN"
    return total


def same(a, b):  # the serial and threaded builds (and torch on 1 or 2 threads) sum in other orders
    return abs(a - b) <= 1e-4 * max(1.0, abs(b))
"""


def _run(code: str, layer: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if layer is not None:
        env["NUMBA_THREADING_LAYER"] = layer
    src = textwrap.dedent(WORK) + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, env=env, timeout=900)


def _check(res: subprocess.CompletedProcess) -> None:
    assert res.returncode == 0 and "ok" in res.stdout, (
        f"exit {res.returncode}\nstdout: {res.stdout[-2000:]}\nstderr: {res.stderr[-3000:]}"
    )


LAYERS = ["default", "workqueue"]


@pytest.mark.parametrize("layer", LAYERS)
def test_forked_child_after_the_parent_used_the_thread_pool(layer):
    # with GNU OpenMP the child was terminated ("fork() called from a process already using GNU
    # OpenMP, this is unsafe")
    _check(_run("""
        import os
        expected = work()  # starts Numba's pool in the parent
        pid = os.fork()
        if pid == 0:
            # torch's own OpenMP ops hang in a child forked after the parent used them, unless
            # the child runs them on one thread (as DataLoader's workers do)
            torch.set_num_threads(1)
            os._exit(0 if same(work(), expected) else 3)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, f"child: {os.waitstatus_to_exitcode(status)}"
        assert same(work(), expected)  # the parent keeps its threads
        print("ok")
    """, None if layer == "default" else layer))


def test_dataloader_workers_calling_lnorm():
    # "DataLoader worker (pid ...) exited unexpectedly" after the parent ran a threaded kernel
    _check(_run("""
        import multiprocessing
        from torch.utils.data import DataLoader, Dataset

        class Normed(Dataset):
            def __len__(self):
                return 4
            def __getitem__(self, i):
                return torch.tensor(work(i))

        expected = [work(i) for i in range(4)]
        loader = DataLoader(Normed(), batch_size=None, num_workers=2,
                            multiprocessing_context=multiprocessing.get_context("fork"))
        got = [float(v) for v in loader]
        assert all(same(a, b) for a, b in zip(got, expected, strict=True)), (got, expected)
        print("ok")
    """))


@pytest.mark.parametrize("layer", LAYERS)
def test_two_threads_at_once(layer):
    # workqueue aborted the process: "Concurrent access has been detected"
    _check(_run("""
        import threading
        expected = work()
        results, errors = [], []

        def run():
            try:
                for _ in range(5):
                    results.append(work())
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=run) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert len(results) == 10 and all(same(r, expected) for r in results), results
        print("ok")
    """, None if layer == "default" else layer))
