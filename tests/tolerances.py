"""The test suite's one tolerance table and the closeness checks built on it.

* :data:`TOL` is keyed by dtype: ``atol``/``rtol`` for direct comparisons (float32/float64
  against torch or the float64 reference) and ``atol3`` for the three-way check.
* :func:`assert_close` compares two tensors elementwise; on failure it names the tensor, the max
  abs diff, its index and the two values there.
* :func:`assert_three_way` is the low-precision check (style.md habit 3, as flash-attention's
  tests): ``max|fast - ref64| <= 2 * max|torch_same_dtype - ref64| + atol3 * scale``, where
  ``scale = max(1, max|ref64|)`` so sums over many rows (weight gradients) get a tolerance in
  their own units.

Import with ``from tolerances import TOL, assert_close, assert_three_way`` (``tests/`` is on
``sys.path`` because ``tests/conftest.py`` lives there).
"""

from __future__ import annotations

import torch

# atol / rtol: elementwise |a - b| <= atol + rtol * |b|.
# atol3: the additive slack of the three-way check, in units of max(1, max|ref64|), for tensors
# where torch happens to be exact (H=1, zero gradients). 1/8 ulp at 1 for the half types: at one
# ulp a naive layer norm computed in bfloat16 (error 3-4x torch's) still passed.
TOL: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"atol": 1e-10, "rtol": 1e-9, "atol3": 1e-12},
    torch.float32: {"atol": 2e-5, "rtol": 2e-5, "atol3": 1e-6},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2, "atol3": 2**-10},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3, "atol3": 2**-13},
}

LOW_PRECISION = (torch.bfloat16, torch.float16)


def tol(dtype: torch.dtype) -> dict[str, float]:
    return TOL[dtype]


def _where(diff: torch.Tensor) -> tuple[float, tuple[int, ...]]:
    flat = int(diff.reshape(-1).argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))
    return float(diff.reshape(-1)[flat]), idx


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    dtype: torch.dtype | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    name: str = "tensor",
) -> None:
    """Elementwise closeness with the table's tolerance for ``dtype`` (default: actual's dtype).

    Shapes must match exactly; NaN anywhere in ``actual`` where ``expected`` is finite fails.
    """
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{name}: shape {list(actual.shape)} != expected {list(expected.shape)}"
    )
    t = TOL[dtype or actual.dtype]
    atol = t["atol"] if atol is None else atol
    rtol = t["rtol"] if rtol is None else rtol
    if actual.numel() == 0:
        return
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    assert torch.isfinite(a).all() or not torch.isfinite(e).all(), f"{name}: non-finite values {a}"
    diff = (a - e).abs()
    bound = atol + rtol * e.abs()
    if bool((diff <= bound).all()):
        return
    excess = diff - bound
    _, idx = _where(excess)
    max_diff, max_idx = _where(diff)
    raise AssertionError(
        f"{name}: max abs diff {max_diff:.3e} at index {max_idx} (atol={atol:g}, rtol={rtol:g}); "
        f"worst relative to the bound at {idx}: actual {a[idx].item():.8g}, "
        f"expected {e[idx].item():.8g}; {int((diff > bound).sum())} of {diff.numel()} elements off"
    )


def assert_three_way(
    fast: torch.Tensor,
    ref64: torch.Tensor,
    torch_same: torch.Tensor,
    *,
    dtype: torch.dtype | None = None,
    atol: float | None = None,
    name: str = "tensor",
) -> None:
    """Our error against the float64 reference is at most twice torch's own, plus ``atol``.

    ``fast`` and ``torch_same`` are computed in the same (low) dtype; ``ref64`` in float64.
    """
    assert tuple(fast.shape) == tuple(ref64.shape) == tuple(torch_same.shape), (
        f"{name}: shapes fast {list(fast.shape)}, ref64 {list(ref64.shape)}, "
        f"torch {list(torch_same.shape)} differ"
    )
    if fast.numel() == 0:
        return
    atol = TOL[dtype or fast.dtype]["atol3"] if atol is None else atol
    f = fast.detach().to(torch.float64).cpu()
    r = ref64.detach().to(torch.float64).cpu()
    t = torch_same.detach().to(torch.float64).cpu()
    assert torch.isfinite(f).all(), f"{name}: non-finite values in our result"
    scale = max(1.0, float(r.abs().max()))
    ours_err, ours_idx = _where((f - r).abs())
    torch_err, torch_idx = _where((t - r).abs())
    bound = 2 * torch_err + atol * scale
    assert ours_err <= bound, (
        f"{name}: max abs diff to the float64 reference {ours_err:.3e} at index {ours_idx} "
        f"(ours {f[ours_idx].item():.8g}, ref {r[ours_idx].item():.8g}) exceeds "
        f"2 * torch's {torch_err:.3e} (at {torch_idx}) + atol {atol:g} * scale {scale:.3g} "
        f"= {bound:.3e}"
    )
