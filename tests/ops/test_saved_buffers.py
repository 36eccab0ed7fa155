"""lnorm.ops.saved_buffers: the pool the fused recurrences take their saved tensors from.

The property that matters: a block is handed out again only after every tensor holding its memory
is gone, so a graph kept for a second backward (or any holder) never sees its saved tensors
overwritten by a later step."""

from __future__ import annotations

import gc
import os

import pytest
import torch

import lnorm
from lnorm.ops import saved_buffers as SB
from lnorm.ops.backend import numba_available

D64 = torch.float64


@pytest.fixture(autouse=True)
def empty_pool(monkeypatch):
    monkeypatch.delenv(SB.ENV, raising=False)
    SB.release()
    yield
    SB.release()


def test_a_block_is_reused_only_after_every_tensor_holding_it_is_freed():
    t = SB.empty((4, 8), torch.float32)
    p = t.data_ptr()
    view = t[1:]  # another tensor over the same storage
    del t
    gc.collect()
    other = SB.empty((4, 8), torch.float32)
    assert other.data_ptr() != p  # the view still holds the first block
    del view
    gc.collect()
    again = SB.empty((4, 8), torch.float32)
    assert again.data_ptr() == p and other.data_ptr() != p  # now free, and reused
    assert again.shape == (4, 8) and again.dtype == torch.float32 and again.is_contiguous()


def test_float64_and_shapes_share_blocks_by_size_and_dtype():
    t = SB.empty((2, 6), D64)
    p = t.data_ptr()
    del t
    assert SB.empty((6, 2), torch.float32).data_ptr() != p  # another dtype: another block
    same = SB.empty((3, 4), D64)  # the same 12 float64s in another shape
    assert same.data_ptr() == p and same.shape == (3, 4)


def test_what_the_pool_does_not_take(monkeypatch):
    # other dtypes and empty shapes are torch.empty's (resizable storage); 0 turns the pool off
    for t in (SB.empty((3, 2), torch.bfloat16), SB.empty((0, 5), torch.float32)):
        assert t.untyped_storage().resizable()
    assert not SB.empty((3, 2), torch.float32).untyped_storage().resizable()  # a pool block
    monkeypatch.setenv(SB.ENV, "0")
    assert SB.empty((3, 2), torch.float32).untyped_storage().resizable()
    for bad in ("lots", "-1", "nan", "inf", "1e400"):
        monkeypatch.setenv(SB.ENV, bad)
        with pytest.raises(ValueError, match=rf"{SB.ENV} must be a finite number of megabytes >= 0, got '{bad}'"):
            SB.empty((3, 2), torch.float32)


def test_free_blocks_are_kept_up_to_the_cap_and_release_drops_them(monkeypatch):
    monkeypatch.setenv(SB.ENV, str(100 / (1 << 20)))  # 100 bytes: a 128-byte block is not kept
    t = SB.empty((4, 8), torch.float32)
    del t
    assert SB.free_bytes() == 0
    monkeypatch.setenv(SB.ENV, "1")
    t, u = SB.empty((4, 8), torch.float32), SB.empty((2, 8), torch.float32)
    del t, u
    assert SB.free_bytes() == 128 + 64
    assert SB.release() == 192 and SB.free_bytes() == 0


def test_over_the_cap_the_oldest_free_blocks_go_first(monkeypatch):
    # a loop whose sizes change keeps the sizes it uses now, not the first ones it saw
    monkeypatch.setenv(SB.ENV, str(200 / (1 << 20)))  # 200 bytes
    a, b, c = SB.empty((32,), torch.float32), SB.empty((16,), torch.float32), SB.empty((32,), torch.float32)
    pa, pc = a.data_ptr(), c.data_ptr()
    del a, b  # 128 + 64 bytes kept
    assert SB.free_bytes() == 192
    del c  # 320 > 200: the oldest, a's block, goes
    assert SB.free_bytes() == 192
    d = SB.empty((32,), torch.float32)
    assert d.data_ptr() == pc and pa != pc
    assert SB.free_bytes() == 64
    del d
    monkeypatch.setenv(SB.ENV, "0")  # turned off: what it kept goes at the next request
    SB.empty((16,), torch.float32)
    monkeypatch.delenv(SB.ENV)
    assert SB.free_bytes() == 0


def test_returned_blocks_are_trimmed_to_the_cap_when_they_come_back(monkeypatch):
    # regression: blocks came back to an unbounded queue, trimmed only at the next request, so a
    # step that saved more than the cap kept all of it through evaluation and after training
    monkeypatch.setenv(SB.ENV, str(200 / (1 << 20)))
    held = [SB.empty((32,), torch.float32) for _ in range(5)]  # 5 x 128 bytes
    del held
    assert sum(b.nbytes for _, b in SB._returned) + SB._free_bytes <= 200  # without a request


def test_an_interrupted_update_cannot_break_later_requests(monkeypatch):
    # a block in the age order but not in its free list (an interrupt between the two updates)
    # is skipped, not a StopIteration out of a forward
    monkeypatch.setenv(SB.ENV, str(200 / (1 << 20)))
    t = SB.empty((32,), torch.float32)
    del t
    key, block = next(iter(SB._order.values()))
    SB._free[key].remove(block)  # the desync
    for _ in range(3):
        u = SB.empty((48,), torch.float32)
        del u  # over the cap: the eviction meets the stray entry
    SB.empty((32,), torch.float32)
    monkeypatch.setattr(SB, "_free_bytes", SB._free_bytes + 10_000)  # a count left above the blocks
    SB.empty((32,), torch.float32)  # eviction runs out of blocks: no KeyError from the empty order


def test_a_forked_child_starts_with_no_free_blocks():
    t = SB.empty((4, 8), torch.float32)
    del t
    assert SB.free_bytes() == 128
    pid = os.fork()
    if pid == 0:  # the child: no blocks of the parent's, and the pool still works
        ok = SB.free_bytes() == 0 and SB.empty((4, 8), torch.float32).shape == (4, 8)
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert SB.free_bytes() == 128  # the parent keeps its own


# ------------------------------------------------------------------------------- in the layers

LAYERS = {"lstm": lnorm.LayerNormLSTM, "gru": lnorm.LayerNormGRU}


def _grads(m, x, **backward):
    out, _ = m(x)
    loss = (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum()
    return loss, torch.autograd.grad(loss, [x, *m.parameters()], **backward)


@pytest.mark.skipif(not numba_available(), reason="the fused path needs numba")
@pytest.mark.parametrize("kind", list(LAYERS))
def test_the_pool_changes_no_gradient_and_a_retained_graph_keeps_its_buffers(kind, monkeypatch):
    torch.manual_seed(0)
    m = LAYERS[kind](5, 16)
    x = torch.randn(7, 3, 5, requires_grad=True)
    monkeypatch.setenv(SB.ENV, "0")
    with lnorm.use_backend("numba"):
        _, want = _grads(m, x)
    monkeypatch.delenv(SB.ENV)
    with lnorm.use_backend("numba"):
        _, first = _grads(m, x)
        assert SB.free_bytes() > 0  # the step's saved buffers came back to the pool
        loss, _ = _grads(m, x, retain_graph=True)  # this graph keeps its saved buffers
        for _ in range(3):  # later steps take blocks of the same sizes and overwrite them
            _grads(m, 2 * x)
        again = torch.autograd.grad(loss, [x, *m.parameters()])  # the retained graph's second backward
    for a, b, c in zip(want, first, again, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.skipif(not numba_available(), reason="the fused path needs numba")
def test_the_compiled_paths_custom_op_allocates_as_before():
    # the op's outputs (what backward reads) stay torch's own tensors: no pool under torch.compile
    from lnorm.ops import rnn_fused  # noqa: F401  (registers the ops)

    N, B, I, H = 6, 2, 3, 4
    t = [torch.randn(*s) for s in ((N, I), (4 * H, I), (B, H), (B, H), (4 * H, H), (4 * H,), (4 * H,),
                                   (4 * H,), (H,), (H,))]
    res = torch.ops.lnorm.lstm_recurrence(*t, [B] * (N // B), False, 1e-5, True)
    assert res[4].shape == (N, 4 * H)  # ghat: saved, from the pool on the Function's route
    del res
    gc.collect()
    assert SB.free_bytes() == 0  # nothing came back: none of the op's outputs was the pool's
