"""The converters never skip silently: what ``use_lnorm`` / ``lstm_to_layernorm`` can convert
exactly they convert (subclasses, hand-written layer norms, recurrent cells, ``proj_size``), the
rest is named in a ConversionWarning; ``convert_norms`` refuses a lazy norm it cannot size."""

from __future__ import annotations

import ast
import contextlib
import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lnorm
from lnorm import convert
from lnorm.convert import (
    ConversionWarning,
    convert_norms,
    layernorm_to_lstm,
    lstm_to_layernorm,
    use_lnorm,
)
from lnorm.nn import LayerNormGRUCell, LayerNormLSTM, LayerNormLSTMCell, LayerNormRNNCell


@contextlib.contextmanager
def _no_conversion_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConversionWarning)
        yield


def _randomize(m: nn.Module) -> None:
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p))


# ------------------------------------------------------------------- hand-written layer norms


class NanoGPTLayerNorm(nn.Module):
    """nanoGPT's model.py: LayerNorm but with an optional bias."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, input):
        return F.layer_norm(input, self.weight.shape, self.weight, self.bias, 1e-5)


class LlamaRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class HandLayerNorm(nn.Module):
    """Layer norm written out, eps fixed in forward (no attribute to read it from)."""

    def __init__(self, ndim, eps_in_forward):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim))
        self._e = eps_in_forward

    def forward(self, x):
        mu = x.mean(-1, keepdim=True)
        var = (x - mu).pow(2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + self._e) * self.weight + self.bias


class GemmaRMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)


class Block(nn.Module):
    def __init__(self, d=16, bias=True):
        super().__init__()
        self.ln_1 = NanoGPTLayerNorm(d, bias)
        self.fc = nn.Linear(d, d)
        self.ln_2 = NanoGPTLayerNorm(d, bias)

    def forward(self, x):
        x = x + self.fc(self.ln_1(x))
        return self.ln_2(x)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_use_lnorm_converts_nanogpt_layernorm(bias):
    block = Block(16, bias)
    _randomize(block)
    x = torch.randn(3, 7, 16)
    want = block(x)
    keys = list(block.state_dict())
    w = block.ln_1.weight
    with _no_conversion_warning():
        out = use_lnorm(block)
    assert out is block and type(block.ln_1) is lnorm.LayerNorm and type(block.ln_2) is lnorm.LayerNorm
    assert block.ln_1.weight is w and (block.ln_1.bias is None) == (not bias) and block.ln_1.eps == 1e-5
    assert list(block.state_dict()) == keys
    torch.testing.assert_close(block(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("module, kind, eps", [
    (LlamaRMSNorm(12, eps=1e-6), lnorm.RMSNorm, 1e-6),
    (HandLayerNorm(12, 1e-6), lnorm.LayerNorm, 1e-6),  # tried after 1e-5, which the probe tells apart
    (HandLayerNorm(12, 1e-5), lnorm.LayerNorm, 1e-5),
], ids=["llama_rms", "hand_eps1e-6", "hand_eps1e-5"])
def test_use_lnorm_converts_by_layout_and_probe(module, kind, eps):
    _randomize(module)
    # rows where eps matters (variance near eps) and one off zero mean
    x = torch.randn(5, 12) * torch.tensor([[1.0], [1e-3], [3e-3], [1e-2], [10.0]])
    x[0] += 2.0
    want = module(x)
    with _no_conversion_warning():
        new = use_lnorm(module)
    assert type(new) is kind and new.eps == eps and new.weight is module.weight
    torch.testing.assert_close(new(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("module, why", [
    (GemmaRMSNorm(12), "neither F.layer_norm nor F.rms_norm"),
    (HandLayerNorm(12, 1e-3), "neither F.layer_norm nor F.rms_norm"),
], ids=["gemma_1_plus_weight", "unusual_eps"])
def test_use_lnorm_reports_a_norm_it_cannot_match(module, why):
    model = nn.Sequential(nn.Linear(12, 12), module)
    with pytest.warns(ConversionWarning, match=rf"use_lnorm left 1 \({type(module).__name__}\) unconverted: .*{why}"):
        use_lnorm(model)
    assert model[1] is module


class LayerNormNoForward(nn.LayerNorm):
    def __init__(self, d):
        super().__init__(d, eps=1e-6)


class LayerNorm2d(nn.LayerNorm):
    """timm / torchvision: channels-first layer norm by permuting."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class LayerNormWithHelper(nn.LayerNorm):
    def stats(self):
        return self.weight.mean()


class RMSNormWithScale(nn.RMSNorm):
    def __init__(self, d):
        super().__init__(d)
        self.register_buffer("scale", torch.ones(()))


def test_use_lnorm_converts_a_plain_subclass():
    m = nn.Sequential(LayerNormNoForward(8))
    _randomize(m)
    x = torch.randn(4, 8)
    want = m(x)
    with _no_conversion_warning():
        use_lnorm(m)
    assert type(m[0]) is lnorm.LayerNorm and m[0].eps == 1e-6
    torch.testing.assert_close(m(x), want)


@pytest.mark.parametrize("module, why", [
    (LayerNorm2d(8), "LayerNorm2d.forward"),
    (LayerNormWithHelper(8), "LayerNormWithHelper.stats"),
    (RMSNormWithScale(8), "holds scale"),
    (nn.LayerNorm(8, eps=0.0), "refuses its options"),
], ids=["own_forward", "own_method", "own_buffer", "eps0"])
def test_use_lnorm_reports_what_it_leaves(module, why):
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(module))
    with pytest.warns(ConversionWarning, match=rf"1\.0 \({type(module).__name__}\) unconverted: .*{why}"):
        out = use_lnorm(model)
    assert out is model and model[1][0] is module


class PreLayerNormBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = NanoGPTLayerNorm(4, True)
        self.fc = nn.Linear(4, 4)


def test_use_lnorm_is_quiet_on_models_without_norms_and_on_lnorm_modules():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), lnorm.LayerNorm(4), lnorm.AddRMSNorm(4),
                          nn.GRU(4, 4), PreLayerNormBlock())
    first = model[2]
    with _no_conversion_warning():
        use_lnorm(model)
    assert model[2] is first and type(model[5].norm) is lnorm.LayerNorm


def test_conversion_warning_can_be_an_error():
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConversionWarning)
        with pytest.raises(ConversionWarning, match="LayerNorm2d"):
            use_lnorm(nn.Sequential(LayerNorm2d(8)))


# ------------------------------------------------------------------------- recurrent modules


@pytest.mark.parametrize("torch_cls, ln_cls, extra", [
    (nn.LSTMCell, LayerNormLSTMCell, {}),
    (nn.GRUCell, LayerNormGRUCell, {}),
    (nn.RNNCell, LayerNormRNNCell, {"nonlinearity": "relu"}),
    (nn.LSTMCell, LayerNormLSTMCell, {"bias": False}),
], ids=["lstm", "gru", "rnn_relu", "lstm_nobias"])
def test_lstm_to_layernorm_converts_cells(torch_cls, ln_cls, extra):
    cell = torch_cls(5, 7, **extra).double()
    x = torch.randn(3, 5, dtype=torch.float64)
    want = cell(x)
    model = nn.ModuleDict({"cell": cell})
    with _no_conversion_warning():
        lstm_to_layernorm(model, layer_norm=False)
    new = model["cell"]
    assert type(new) is ln_cls and new.weight_hh.dtype == torch.float64
    assert torch.equal(new.weight_ih, cell.weight_ih) and new.bias == cell.bias
    got = new(x)
    for a, b in zip(got if isinstance(got, tuple) else [got], want if isinstance(want, tuple) else [want],
                    strict=True):
        torch.testing.assert_close(a, b)
    back = layernorm_to_lstm(lstm_to_layernorm(torch_cls(5, 7, **extra)))
    assert type(back) is torch_cls and getattr(back, "nonlinearity", "tanh") == extra.get("nonlinearity", "tanh")


def test_lstm_to_layernorm_cell_with_layer_norm():
    new = lstm_to_layernorm(nn.LSTMCell(5, 7), zoneout=0.1)
    assert type(new) is LayerNormLSTMCell and new.layer_norm and new.zoneout == 0.1
    assert torch.equal(new.ln_cell_weight, torch.ones(7))


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_lstm_to_layernorm_carries_proj_size(bidirectional):
    lstm = nn.LSTM(5, 8, num_layers=2, bidirectional=bidirectional, proj_size=3)
    x = torch.randn(6, 2, 5)
    want = lstm(x)
    exact = lstm_to_layernorm(lstm, layer_norm=False)
    assert type(exact) is LayerNormLSTM and exact.proj_size == 3
    got = exact(x)
    for a, b in ((got[0], want[0]), (got[1][0], want[1][0]), (got[1][1], want[1][1])):
        torch.testing.assert_close(a, b)
    ln = lstm_to_layernorm(lstm)
    assert ln.proj_size == 3 and torch.equal(ln.weight_hr_l1, lstm.weight_hr_l1)
    back = layernorm_to_lstm(ln)
    assert type(back) is nn.LSTM and back.proj_size == 3
    back.load_state_dict(lstm.state_dict())  # strict: same names and shapes


class PlainLSTM(nn.LSTM):
    def __init__(self):
        super().__init__(4, 6, batch_first=True)


class LastStepLSTM(nn.LSTM):
    def forward(self, x, hx=None):
        return super().forward(x, hx)[0][:, -1]


class TiedGRUCell(nn.GRUCell):
    def __init__(self):
        super().__init__(4, 6)
        self.extra = nn.Parameter(torch.zeros(6))


def test_lstm_to_layernorm_subclasses():
    model = nn.ModuleList([PlainLSTM(), LastStepLSTM(4, 6), TiedGRUCell()])
    with pytest.warns(ConversionWarning) as record:
        lstm_to_layernorm(model)
    assert type(model[0]) is LayerNormLSTM and model[0].batch_first
    assert type(model[1]) is LastStepLSTM and type(model[2]) is TiedGRUCell
    messages = sorted(str(w.message) for w in record if issubclass(w.category, ConversionWarning))
    assert len(messages) == 2
    assert "1 (LastStepLSTM) unconverted" in messages[0] and "LastStepLSTM.forward" in messages[0]
    assert "2 (TiedGRUCell) unconverted" in messages[1] and "holds extra" in messages[1]


# ------------------------------------------------------------------- convert_norms: lazy norms


def test_convert_norms_refuses_an_uninitialized_lazy_batchnorm():
    model = nn.Sequential(nn.Linear(4, 8), nn.LazyBatchNorm1d(), nn.ReLU())
    with pytest.raises(ValueError, match=r"1 \(LazyBatchNorm1d\).*run the model once"):
        convert_norms(model, layout="last")
    with pytest.raises(ValueError, match=r"1 \(LazyBatchNorm1d\)"):  # not a cryptic lazy-tensor error
        convert_norms(model, example_input=torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"0 \(LazyBatchNorm2d\)"):
        convert_norms(nn.Sequential(nn.LazyBatchNorm2d()), target="group", num_groups=1)
    assert type(model[1]) is nn.LazyBatchNorm1d  # refused, untouched


def test_convert_norms_converts_a_lazy_batchnorm_once_initialized():
    model = nn.Sequential(nn.Linear(4, 8), nn.LazyBatchNorm1d(), nn.LazyLinear(2))
    model(torch.randn(3, 4))
    convert_norms(model, layout="last")
    assert type(model[1]) is lnorm.LayerNorm and model[1].normalized_shape == (8,)


def test_convert_norms_ignores_unrelated_lazy_modules():
    model = nn.Sequential(nn.LazyLinear(8), nn.BatchNorm1d(8))
    convert_norms(model, layout="last")
    assert type(model[1]) is lnorm.LayerNorm


# ------------------------------------------------------------------------------ structure


def test_convert_functions_fit_on_a_screen():
    tree = ast.parse(inspect.getsource(convert))
    long = {n.name: n.end_lineno - n.lineno + 1 for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 80}
    assert not long, f"functions over 80 lines in lnorm.convert: {long}"
