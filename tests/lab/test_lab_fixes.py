"""Regressions of the lab's design bugs (issue 18, item 6): class-sorted evaluation batches, a
"group" norm that was layer norm, E4's divergence rule, and E1's budget title."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from lnorm.lab import config as LC
from lnorm.lab.data import mnist
from lnorm.lab.experiments import e1_batch_size as e1
from lnorm.lab.experiments import e2_train_eval as e2
from lnorm.lab.experiments import e4_transformer as e4
from lnorm.lab.models import CNN1d
from lnorm.nn import GroupNorm, make_norm


def test_mnist_eval_batches_mix_classes():
    # E2 runs the test set through the model in training mode in slices of eval_batch: with the test
    # set sorted by class, every slice was one digit and batch norm saw single-class statistics
    _, _, _, yte = mnist()
    bs = e2.Config().eval_batch
    per_batch = [len(torch.unique(yte[i:i + bs])) for i in range(0, len(yte), bs)]
    assert min(per_batch) >= 8, per_batch
    assert len(torch.unique(yte[:64])) >= 8  # the batch-independence probe's batch
    assert torch.bincount(yte, minlength=10).tolist() == [100] * 10  # still stratified
    assert torch.equal(mnist()[3], yte)  # a fixed order


def test_group_norm_default_is_not_layer_norm_for_odd_channel_counts():
    assert make_norm("group", 25, layout="channels").num_groups == 5
    assert make_norm("group", 25).num_groups == 5
    assert make_norm("group", 9).num_groups == 3
    assert make_norm("group", 64).num_groups == 32  # powers of two as before
    with pytest.warns(UserWarning, match=r"make_norm\('group', 7\).*one group and is layer norm"):
        assert make_norm("group", 7).num_groups == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_norm("group", 25)
        make_norm("group", 7, num_groups=7)  # an explicit choice is not second-guessed


def test_e5_mnist1d_group_row_is_not_the_layer_row():
    # E5's MNIST-1D CNN has 25 channels: "group" used to be GroupNorm(1, 25), i.e. layer norm
    groups = [m.num_groups for m in CNN1d("group").modules() if isinstance(m, GroupNorm)]
    assert len(groups) == 3 and all(g > 1 for g in groups), groups
    x = torch.randn(16, 40, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    group = CNN1d("group")
    torch.manual_seed(0)
    layer = CNN1d("layer")
    with torch.no_grad():
        assert not torch.allclose(group(x), layer(x), atol=1e-4)


def _e4_rec(seed: int, bpc: float, status: str = "ok") -> dict:
    params = {"variant": "postln", "warmup": 0, "lr": 1e-3}
    return {"params": params, "seed": seed, "status": status,
            "result": {"final_bpc": bpc, "test_bpc": bpc, "init_bpc": 6.5, "ms_per_step": 1.0}}


def test_e4_counts_a_stalled_seed_as_diverged():
    # a full-suite post-LN seed ended at 4.65 bpc (below the 6.5 at initialisation) against 2.4-2.7
    # for its peers, and counted as a finished run
    recs = [_e4_rec(0, 2.4), _e4_rec(1, 2.7), _e4_rec(2, 4.65), _e4_rec(3, 2.5)]
    cfg = e4.Config(variants=("postln",), warmups=(0,), lrs=(1e-3,))
    out = e4.analyze(cfg, {"e4": recs})
    row = out["tables"][0]["rows"][0]  # variant, warmup, lr, selection bpc, test bpc, diverged, ms/step
    assert row[5] == "1/4", row
    assert "4.65" not in row[3] and row[3].startswith("2.5"), row  # mean of the three that trained
    marked = e4.mark_stalled(recs)
    assert [r["status"] for r in marked] == ["ok", "ok", "diverged", "ok"]
    assert marked[2]["result"]["final_bpc"] == math.inf and marked[2]["result"]["stalled_bpc"] == 4.65
    assert recs[2]["status"] == "ok"  # the input records are not modified


def test_e4_divergence_rule_keeps_ordinary_spread_and_flags_non_finite():
    spread = [_e4_rec(0, 2.4), _e4_rec(1, 2.4 * e4.STALL_FACTOR)]  # at the bound: still ok
    assert [r["status"] for r in e4.mark_stalled(spread)] == ["ok", "ok"]
    nan = [_e4_rec(0, 2.4), _e4_rec(1, math.nan), _e4_rec(2, math.inf, status="diverged")]
    assert [r["status"] for r in e4.mark_stalled(nan)] == ["ok", "diverged", "diverged"]
    other = [_e4_rec(0, 2.4), {**_e4_rec(1, 4.65), "params": {"variant": "none", "warmup": 0, "lr": 1e-3}}]
    assert [r["status"] for r in e4.mark_stalled(other)] == ["ok", "ok"]  # peers are the same setting only


def _e1_title(suite: str) -> tuple[str, e1.Config]:
    cfg = LC.resolve(e1, suite)
    return e1.analyze(cfg, {"e1": []})["figures"][0]["title"], cfg


@pytest.mark.parametrize("suite,label", [("smoke", "320"), ("quick", "3.2k"), ("full", "12.8k")])
def test_e1_sees_the_same_examples_at_every_batch_size_in_every_suite(suite, label):
    # the quick suite gave batch 1 1k examples and batch 128 12.8k (a floor of 100 steps)
    title, cfg = _e1_title(suite)
    seen = {b: e1.steps_for(cfg, b) * b for b in cfg.batch_sizes}
    assert len(set(seen.values())) == 1, seen
    assert title.endswith(f"(same examples seen: {label})"), title


def test_e1_refuses_a_budget_that_a_batch_size_does_not_divide():
    with pytest.raises(ValueError, match=r"e1.examples must be a multiple.*examples=100.*batch sizes 32"):
        e1.units(e1.Config(batch_sizes=(1, 4, 32), examples=100))


class _NaNAt(torch.nn.Module):
    """Logits that are 0 except a NaN in one class's column (or in every column)."""

    def __init__(self, col: int | None):
        super().__init__()
        self.col = col

    def forward(self, x):
        out = torch.zeros(len(x), 10)
        out[:, self.col if self.col is not None else slice(None)] = math.nan
        return out


@pytest.mark.parametrize("col", [3, None], ids=["one-nan-column", "all-nan"])
def test_accuracy_counts_non_finite_logits_as_wrong(col):
    # argmax picks a NaN's index: a model whose class-3 logit is NaN "predicted" 3 for every digit
    # and scored the share of 3s (or of 0s when every logit is NaN) instead of 0
    from lnorm.lab.train import accuracy

    y = torch.arange(10).repeat(5)
    model = _NaNAt(col)
    assert accuracy(model, torch.zeros(len(y), 4), y, batch_size=7) == 0.0
    assert model.training  # the mode it came in with


def test_experiments_score_with_the_shared_accuracy():
    from lnorm.lab import train
    from lnorm.lab.experiments import ddp
    from lnorm.lab.experiments import e9_recurrent_bn as e9

    assert e9.accuracy is train.accuracy and ddp.accuracy is train.accuracy


class _Ctx:
    device = "cpu"

    def steps(self, n):
        return range(n)


@pytest.mark.parametrize("arch", ["lstm", "gru"])
def test_e6_times_both_recurrent_sides_on_one_implementation(arch, monkeypatch):
    # LayerNormLSTM(layer_norm=False) has no fused kernel, so with the default backend the LN side
    # ran lnorm's Numba recurrence and the other side the pure-torch loop: C8 compared
    # implementations. Both sides must take the pure-torch loop.
    from lnorm.lab.experiments import e6_overhead as e6
    from lnorm.nn import rnn as R

    calls = []
    real = R.fused_applies
    monkeypatch.setattr(R, "fused_applies", lambda x, w: calls.append(real(x, w)) or calls[-1])
    cfg = e6.Config(archs=(arch,), widths=(8,), batch_size=2, seq_len=3, warmup=1, repeats=2, steps=1, block_ms=0.0)
    out = e6.run(cfg, {"arch": arch, "width": 8}, 0, _Ctx())
    assert calls and not any(calls), "a fused recurrence ran on one side only"
    assert out["backend"] == "torch" and out["ms_ln"] > 0 and out["ms_none"] > 0


def test_e6_blocks_wait_for_queued_work():
    # on CUDA a block must time the kernels, not their launches: sync runs before and after each block
    from lnorm.lab.experiments import e6_overhead as e6

    log = []
    e6.interleaved_ms(lambda: log.append("a"), lambda: log.append("b"), 2, 1, sync=lambda: log.append("|"))
    assert "".join(log) == "|a||b||b||a|"
