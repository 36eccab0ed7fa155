"""oneDNN's batch-reduce GEMM microkernel, called from inside Numba kernels: the time loop of a
layer in one native call.

A layer's time loop alternates a matrix product (``h W_hh^T``) with the step's elementwise work.
Run from Python, every step pays a library call (oneDNN's inner product costs about 15-25 us a
call besides its arithmetic), a hand-off between two thread pools (torch's OpenMP pool runs the
product, Numba's the step kernel), and the input projection ``W_ih x`` runs apart as a product of
its own with a short inner dimension (K = I). oneDNN's own LSTM avoids all three by running its
time loop natively on JIT-compiled microkernels ("brgemm"); on an AMD EPYC (Zen 4) that is what
kept ``nn.LSTM`` ahead of lnorm's Python loop whatever library ran the products (issue 15).

torch ships the same microkernel: ``at::native::cpublas::brgemm`` (float32 ``C = A @ B`` or
``C += A @ B`` for one (M x K) @ (K x N) block, row-major with leading dimensions; oneDNN's JIT
code for the instruction set this CPU has, AVX2 or AVX-512, generated once per shape and thread).
It is a C++ function of plain arguments exported by ``libtorch_cpu``, so a Numba kernel can call
it by its symbol (:func:`brgemm`, an intrinsic) from each of its threads: the time loop then runs
in one Numba call, each thread multiplying its tiles of the weight's columns, then the step's
elementwise work by rows (see ``_rnn_kernels.lstm_infer_loop``).

It is used only where :func:`available` says so: the symbol resolves, the kernel it runs agrees
with a float64 product on small shapes with every leading-dimension case the loops use (checked
once per process, so that a future torch whose function means something else under the same
symbol is caught before any layer relies on it), oneDNN is enabled in torch
(``torch.backends.mkldnn``; without it torch's function falls back to a plain GEMM) and the CPU
has AVX2. ``LNORM_NATIVE_LOOP=0`` turns it off (the time loops then run from Python as before).
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

import numpy as np
import torch
from llvmlite import binding as llvm
from llvmlite import ir
from numba import types as nt
from numba.core import cgutils
from numba.core.extending import intrinsic

# void at::native::cpublas::brgemm(int64_t M, int64_t N, int64_t K, int64_t ld_a, int64_t ld_b,
#     int64_t ld_c, bool add_C, const float* A, const float* B, float* C, bool is_vnni)
SYMBOL = "_ZN2at6native7cpublas6brgemmEllllllbPKfS3_Pfb"
ENV = "LNORM_NATIVE_LOOP"

_state: dict[str, object] = {"checked": False, "ok": False, "why": "not checked yet"}


def _library() -> str | None:
    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    return path if os.path.exists(path) else None


def _load() -> tuple[bool, str]:
    """Resolve the symbol for Numba's linker (llvmlite) and check what it computes through ctypes."""
    if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "AMD64"):
        return False, f"not x86-64 Linux ({sys.platform}, {platform.machine()})"
    if not torch.backends.mkldnn.is_available():
        return False, "torch was built without oneDNN"
    path = _library()
    if path is None:
        return False, "libtorch_cpu.so not found beside torch"
    try:
        llvm.load_library_permanently(path)
        fn = getattr(ctypes.CDLL(path), SYMBOL)
    except (OSError, AttributeError, RuntimeError) as e:
        return False, f"{SYMBOL} not exported by this torch ({e})"
    if not llvm.address_of_symbol(SYMBOL):
        return False, f"{SYMBOL} does not resolve for Numba"
    i64, p = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [i64] * 6 + [ctypes.c_bool, p, p, p, ctypes.c_bool]
    fn.restype = None
    rng = np.random.default_rng(0)
    # (M, N, K, ld_a, ld_b, ld_c): tight and padded leading dimensions, a single row, odd sizes
    for m, n, k, lda, ldb, ldc in ((3, 5, 7, 7, 5, 5), (4, 16, 9, 12, 40, 24), (1, 64, 33, 33, 64, 64),
                                   (5, 20, 3, 3, 48, 20)):
        a = rng.standard_normal((m, lda), dtype=np.float32)
        b = rng.standard_normal((k, ldb), dtype=np.float32)
        c = rng.standard_normal((m, ldc), dtype=np.float32)
        want = a[:, :k].astype(np.float64) @ b[:, :n].astype(np.float64)
        for add in (False, True):
            before = c.copy()
            fn(m, n, k, lda, ldb, ldc, add, a.ctypes.data, b.ctypes.data, c.ctypes.data, False)
            exact = want + (before[:, :n] if add else 0.0)
            if not np.allclose(c[:, :n], exact, rtol=1e-4, atol=1e-4 * k**0.5):
                return False, f"{SYMBOL} disagrees with a float64 product (M, N, K = {m}, {n}, {k}, add_C={add})"
            if not np.array_equal(c[:, n:], before[:, n:]):
                return False, f"{SYMBOL} wrote outside its block (M, N, K = {m}, {n}, {k})"
    return True, "oneDNN brgemm from libtorch_cpu"


def _isa_ok() -> bool:
    flags = ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = line
                    break
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


def available() -> bool:
    """Whether the native time loops may run now (see the module's docstring)."""
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not torch.backends.mkldnn.enabled:
        return False
    if not _state["checked"]:
        ok, why = _load()
        if ok and not _isa_ok():
            ok, why = False, "the CPU lacks AVX2/FMA (torch's brgemm would fall back to a plain GEMM)"
        _state.update(checked=True, ok=ok, why=why)
    return bool(_state["ok"])


def status() -> str:
    """Why the native loops run or not, in words (``lnorm bench rnn`` prints it)."""
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return f"off ({ENV}={os.environ[ENV]})"
    if not torch.backends.mkldnn.enabled:
        return "off (torch.backends.mkldnn.enabled is False)"
    return ("on: " if available() else "off: ") + str(_state["why"])


@intrinsic
def brgemm(typingctx, m, n, k, lda, ldb, ldc, add_c, a, b, c):
    """``C[:m, :n] (+)= A[:m, :k] @ B[:k, :n]`` on float32 row-major blocks at the addresses ``a``,
    ``b``, ``c`` (integers, e.g. ``arr.ctypes.data``) with leading dimensions ``lda``, ``ldb``,
    ``ldc``. Trusts every address and size: the caller checks the shapes first."""
    sig = nt.void(nt.int64, nt.int64, nt.int64, nt.int64, nt.int64, nt.int64, nt.boolean, nt.intp, nt.intp,
                  nt.intp)

    def codegen(context, builder, signature, args):
        i64, i8 = ir.IntType(64), ir.IntType(8)
        fnty = ir.FunctionType(ir.VoidType(), [i64] * 6 + [i8, i64, i64, i64, i8])
        fn = cgutils.get_or_insert_function(builder.module, fnty, SYMBOL)
        add = builder.zext(args[6], i8)
        builder.call(fn, [*args[:6], add, *args[7:], ir.Constant(i8, 0)])
        return context.get_dummy_value()

    return sig, codegen
