"""lnorm.utils: running a model without leaving a trace (ModelState, set_mode, preserved_rng)."""

import pytest
import torch
from torch import nn

from lnorm.nn import LayerNormGRU, LayerNormLSTM, LayerNormLSTMCell
from lnorm.utils import ModelState, preserved_rng, set_mode


class RebindingBatchNorm(nn.Module):
    """A hand-written batch norm that rebinds its buffer to a new tensor instead of updating it
    in place: ``self.running_mean = ...``, as many do."""

    def __init__(self, c):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(c))

    def forward(self, x):
        if self.training:
            self.running_mean = 0.9 * self.running_mean + 0.1 * x.mean(0).detach()
        return x - self.running_mean


def test_model_state_restores_a_rebound_buffer():
    # regression: restore() copied the saved values into the buffer objects it had seen, so a
    # buffer rebound to a new tensor kept the forward's value: the "restored" model was changed
    model = nn.Sequential(nn.Linear(3, 3), RebindingBatchNorm(3))
    original = model[1].running_mean
    state = ModelState(model)
    model(torch.randn(4, 3) + 5)
    assert not torch.equal(model[1].running_mean, torch.zeros(3))
    state.restore()
    assert model[1].running_mean is original and torch.equal(original, torch.zeros(3))
    assert list(model.state_dict()) == ["0.weight", "0.bias", "1.running_mean"]


def test_model_state_restores_in_place_updates_shared_buffers_and_removes_new_ones():
    bn = nn.BatchNorm1d(3)
    twin = nn.BatchNorm1d(3)
    twin.running_mean = bn.running_mean  # shared, as convert_sync_batchnorm shares them
    model = nn.Sequential(bn, twin)
    keys = list(model.state_dict())
    state = ModelState(model)
    model(torch.randn(8, 3) + 2)
    bn.register_buffer("added", torch.ones(1))
    state.restore()
    assert torch.equal(bn.running_mean, torch.zeros(3)) and twin.running_mean is bn.running_mean
    assert int(bn.num_batches_tracked) == 0 and list(model.state_dict()) == keys


@pytest.mark.parametrize("make", [lambda: LayerNormLSTM(4, 6, zoneout=0.5, zoneout_cell=0.2),
                                  lambda: LayerNormGRU(4, 6, zoneout=0.5),
                                  lambda: LayerNormLSTMCell(4, 6, zoneout=0.5)],
                         ids=["lstm", "gru", "lstm-cell"])
def test_set_mode_train_switches_zoneout_off_like_dropout(make):
    # regression: set_mode(model, "train") switched dropout off but left zoneout drawing random
    # masks, which the diagnostics then reported as batch dependence and a train/eval gap
    model = nn.Sequential(make(), nn.Dropout(0.5))
    set_mode(model, "train")
    assert model.training and not model[0].training and not model[1].training
    set_mode(model, "train", keep_dropout=True)
    assert model[0].training and model[1].training
    set_mode(model, "eval")
    assert not any(m.training for m in model.modules())


def test_set_mode_leaves_layers_without_zoneout_training():
    model = nn.Sequential(LayerNormLSTM(4, 6), nn.BatchNorm1d(3))
    set_mode(model, "train")
    assert all(m.training for m in model.modules())
    with pytest.raises(ValueError, match="mode must be 'train' or 'eval', got 'Eval'"):
        set_mode(model, "Eval")


def test_preserved_rng_restores_the_global_generator():
    model = nn.Linear(2, 2)
    torch.manual_seed(3)
    expected = torch.rand(5)
    torch.manual_seed(3)
    with preserved_rng(model, torch.zeros(2)):
        torch.rand(100)
    assert torch.equal(torch.rand(5), expected)


def test_instruction_sets_name_the_widest_extension_and_the_limits_set(tmp_path):
    # lnorm bench rnn prints these, so a table timed with AVX2 forced on an AVX-512 CPU says so
    from lnorm.utils import instruction_sets

    block = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx avx2 fma{}\n\nprocessor\t: 1\n" \
            "flags\t\t: fpu sse2 avx avx2 avx512f\n"
    wide, narrow = tmp_path / "wide", tmp_path / "narrow"
    wide.write_text(block.format(" avx512f avx512bw"))
    narrow.write_text(block.format(""))  # only the first processor's block is read
    env = {"ONEDNN_MAX_CPU_ISA": "AVX2", "NUMBA_CPU_NAME": "haswell", "MKL_ENABLE_INSTRUCTIONS": "", "PATH": "/bin"}
    got = instruction_sets(str(wide), env)
    assert got["cpu"] == "AVX-512" and got["numba"] == "haswell"
    assert got["limits"] == {"ONEDNN_MAX_CPU_ISA": "AVX2", "NUMBA_CPU_NAME": "haswell"}  # set and non-empty only
    assert got["torch"] == torch.backends.cpu.get_cpu_capability()
    assert instruction_sets(str(narrow), {})["cpu"] == "AVX2"
    none = instruction_sets(str(tmp_path / "absent"), {})
    assert none["cpu"] is None and none["limits"] == {} and none["numba"] != "haswell"


def test_instruction_sets_without_numba_say_so(monkeypatch):
    # regression: the header named the host CPU as Numba's target when Numba itself would not
    # import (llvmlite alone did), and a broken llvmlite raised OSError out of the bench's header
    import sys

    from lnorm.ops import backend
    from lnorm.utils import instruction_sets

    monkeypatch.setattr(backend, "_numba_ok", False)
    assert instruction_sets(environ={"NUMBA_CPU_NAME": "haswell"})["numba"] is None
    monkeypatch.setattr(backend, "_numba_ok", True)

    class Broken:
        def __getattr__(self, name):
            raise OSError("Could not find/load shared object file")

    monkeypatch.setitem(sys.modules, "llvmlite.binding", Broken())
    assert instruction_sets(environ={})["numba"] is None
