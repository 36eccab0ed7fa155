"""Converters on an MLP, a small CNN, a transformer block and an LSTM; outputs compared where the
conversion is exact, weights round-tripped where it is not."""

import copy

import pytest
import torch
from torch import nn

import lnorm
from lnorm.convert import convert_norms, layernorm_to_lstm, lstm_to_layernorm, use_lnorm
from lnorm.diagnostics import check_batch_independence
from lnorm.nn import (
    ChannelBatchNorm,
    ChannelRMSNorm,
    GroupNorm,
    LayerNormGRU,
    LayerNormLSTM,
    LayerNormRNN,
    MaskedBatchNorm,
)


def small_cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 5 * 5, 4))


def mlp():
    return nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 3))


def randomize_affine(model):
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "weight", None) is not None and isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)):
                m.weight.uniform_(0.5, 1.5)
                if m.bias is not None:
                    m.bias.uniform_(-0.5, 0.5)
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    return model


# ---------------------------------------------------------------------------------------------
# convert_norms
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target,expected", [
    ("layer", GroupNorm), ("group", GroupNorm), ("rms", ChannelRMSNorm), ("batch", ChannelBatchNorm)])
def test_cnn_channels_layout(target, expected):
    model = randomize_affine(small_cnn())
    bn = model[1]
    out = convert_norms(model, target=target, drop_bias=True)
    assert out is model
    assert type(model[1]) is expected and type(model[4]) is expected
    assert torch.equal(model[1].weight, bn.weight)
    if target == "layer":
        assert model[1].num_groups == 1
    if target == "group":
        assert model[1].num_groups == 4  # 8 channels: the largest that leaves 2 per group
    x = torch.randn(5, 3, 7, 7)
    assert model(x).shape == (5, 4)
    if target != "batch":  # per-sample norms: the converted CNN is batch independent
        assert check_batch_independence(model, x).independent


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_batch_to_batch_is_exact_including_running_stats(train):
    ref = randomize_affine(small_cnn()).train(train)
    conv = convert_norms(copy.deepcopy(ref), target="batch")
    assert type(conv[1]) is ChannelBatchNorm
    assert conv.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(4, 3, 7, 7)
    torch.testing.assert_close(conv(x), ref(x), rtol=0, atol=0)
    assert torch.equal(conv[1].running_var, ref[1].running_var)  # updated alike in train mode


def test_layer_channels_equals_groupnorm_1():
    model = randomize_affine(small_cnn())
    conv = convert_norms(model, target="layer")
    x = torch.randn(2, 3, 7, 7)
    h = model[0](x)
    want = torch.nn.functional.group_norm(h, 1, conv[1].weight, conv[1].bias, 1e-5)
    torch.testing.assert_close(conv[1](h), want)


def test_mlp_batchnorm1d_needs_layout():
    with pytest.raises(ValueError, match=r"cannot tell the layout of 1 \(BatchNorm1d\(12\)\)"):
        convert_norms(mlp())
    m = convert_norms(mlp(), layout="last")
    assert type(m[1]) is lnorm.LayerNorm and m[1].normalized_shape == (12,)
    m = convert_norms(mlp(), example_input=torch.randn(4, 6), target="batch")
    assert type(m[1]) is MaskedBatchNorm


def test_batchnorm1d_on_sequences_from_example_input():
    model = randomize_affine(nn.Sequential(nn.Conv1d(3, 8, 3), nn.BatchNorm1d(8), nn.ReLU()))
    bn = model[1]
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    out = convert_norms(model, example_input=torch.randn(4, 3, 10), target="layer")
    assert type(out[1]) is GroupNorm and out[1].num_groups == 1
    # watching the example input (a forward in training mode) left the old module as it was
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert out(torch.randn(2, 3, 10)).shape == (2, 8, 8)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_example_input_probe_restores_the_state_it_found(train):
    # to batch norm the running statistics are copied: they must be the ones from before the
    # probe, not statistics updated by the example input
    model = randomize_affine(nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.ReLU(),
                                           nn.Unflatten(1, (4, 3)), nn.BatchNorm1d(4))).train(train)
    first = model[1]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(5, 6)
    conv = convert_norms(model, example_input=x, target="batch")
    assert type(conv[1]) is MaskedBatchNorm
    after = conv.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert first.training == train and conv[1].training == train
    for k, v in first.state_dict().items():
        assert torch.equal(v, before["1." + k]), k


def _source(kind: str, C: int) -> tuple[nn.Module, torch.Size]:
    """A source norm with random affine parameters and the input shape it sees."""
    if kind == "bn1d-last":
        return nn.BatchNorm1d(C), (4, C)
    if kind == "bn1d-channels":
        return nn.BatchNorm1d(C), (4, C, 5)
    if kind == "bn2d":
        return nn.BatchNorm2d(C), (4, C, 3, 3)
    if kind == "layernorm":
        return nn.LayerNorm(C), (4, 5, C)
    if kind == "groupnorm":
        return nn.GroupNorm(2, C), (4, C, 5)
    return nn.RMSNorm(C), (4, 5, C)


SOURCES = ["bn1d-last", "bn1d-channels", "bn2d", "layernorm", "groupnorm", "rmsnorm"]


@pytest.mark.parametrize("target", ["layer", "rms", "group", "batch"])
@pytest.mark.parametrize("kind", SOURCES)
def test_affine_parameters_are_copied_in_every_layout(kind, target):
    src, shape = _source(kind, 8)
    randomize_affine(src)
    with torch.no_grad():
        src.weight.uniform_(0.5, 1.5)  # RMSNorm is not a randomize_affine type
    model = nn.Sequential(src)
    x = torch.randn(shape)
    new = convert_norms(model, source=type(src), target=target, drop_bias=True, example_input=x)[0]
    assert torch.equal(new.weight, src.weight)
    if getattr(src, "bias", None) is not None and getattr(new, "bias", None) is not None:
        assert torch.equal(new.bias, src.bias)
    if target == "batch" and isinstance(src, nn.modules.batchnorm._BatchNorm):
        assert torch.equal(new.running_mean, src.running_mean)
        assert torch.equal(new.running_var, src.running_var)
    assert new(x).shape == x.shape


def test_root_matches_returns_new_module_and_keeps_everything():
    bn = nn.BatchNorm2d(4).double()
    bn.eval()
    bn.weight.requires_grad_(False)
    bn.bias.requires_grad_(False)
    new = convert_norms(bn, target="rms", drop_bias=True)
    assert new is not bn and isinstance(new, ChannelRMSNorm)
    assert not new.training and new.weight.dtype == torch.float64 and not new.weight.requires_grad


def test_shared_module_stays_shared():
    bn = nn.BatchNorm2d(4)
    model = nn.Sequential(nn.Conv2d(4, 4, 1), bn, nn.Conv2d(4, 4, 1), bn)
    convert_norms(model, target="group", num_groups=2)
    assert model[1] is model[3] and isinstance(model[1], GroupNorm)


def test_refusals_name_the_layer():
    with pytest.raises(ValueError, match=r"cannot convert 1 to group norm: its 6 channels are not divisible by num_groups=4"):
        convert_norms(nn.Sequential(nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6)), target="group", num_groups=4)
    with pytest.raises(ValueError, match=r"normalized_shape=\[4, 5\]"):
        convert_norms(nn.Sequential(nn.LayerNorm((4, 5))), source=nn.LayerNorm, target="rms")
    with pytest.raises(ValueError, match="nonzero bias"):
        convert_norms(randomize_affine(small_cnn()), target="rms")
    with pytest.raises(ValueError, match="target must be one of"):
        convert_norms(small_cnn(), target="instance")
    with pytest.raises(ValueError, match="layout must be"):
        convert_norms(mlp(), layout="first")
    with pytest.raises(TypeError, match="source must be"):
        convert_norms(mlp(), source="BatchNorm1d")
    with pytest.raises(ValueError, match="num_groups is for target='group'"):
        convert_norms(mlp(), num_groups=2)
    # a fresh batch norm has bias 0: nothing is lost, so rms is allowed
    assert isinstance(convert_norms(small_cnn(), target="rms")[1], ChannelRMSNorm)


@pytest.mark.parametrize("kwargs, exc, needle", [
    (dict(num_groups=0), ValueError, "num_groups must be an int >= 1, got 0"),  # was ZeroDivisionError
    (dict(num_groups=-2), ValueError, "num_groups must be an int >= 1, got -2"),
    (dict(num_groups="2"), TypeError, "num_groups must be an int, got '2'"),  # was a TypeError from %
    (dict(num_groups=2.0), TypeError, "num_groups must be an int, got 2.0"),  # was a ValueError
    (dict(num_groups=True), TypeError, "num_groups must be an int, got True"),
    (dict(eps="x"), TypeError, "eps must be a positive float, got 'x'"),  # was a ValueError
    (dict(eps=0.0), ValueError, "eps must be a finite number > 0, got 0.0"),
    (dict(drop_bias="no"), TypeError, "drop_bias must be a bool, got 'no'"),
], ids=["groups-0", "groups-negative", "groups-str", "groups-float", "groups-bool", "eps-str", "eps-0", "drop-bias"])
def test_convert_norms_checks_its_options_with_the_documented_errors(kwargs, exc, needle):
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    with pytest.raises(exc) as info:
        convert_norms(cnn, target="group", **kwargs)
    assert type(info.value) is exc and needle in str(info.value)
    assert type(cnn[1]) is nn.BatchNorm2d  # nothing converted


def test_lstm_to_layernorm_refuses_the_structure_the_source_fixes():
    # proj_size=2 failed deep in the weight copy with a size mismatch
    lstm = nn.LSTM(4, 8)
    with pytest.raises(TypeError, match=r"proj_size cannot be passed \(got proj_size=2\).*from the layer it "
                                        r"replaces"):
        lstm_to_layernorm(lstm, proj_size=2)
    for key, value in (("input_size", 3), ("hidden_size", 3), ("num_layers", 2), ("bidirectional", True),
                       ("batch_first", True), ("bias", False), ("dropout", 0.5)):
        with pytest.raises(TypeError, match=f"{key} cannot be passed .*input_size, hidden_size, num_layers, "
                                            "bias, batch_first, dropout, bidirectional, proj_size"):
            lstm_to_layernorm(lstm, **{key: value})
    assert not lstm.proj_size and isinstance(lstm_to_layernorm(lstm), LayerNormLSTM)


@pytest.mark.parametrize("model", [nn.Linear(2, 2), nn.LSTM(2, 3)], ids=["nothing-to-convert", "lstm"])
@pytest.mark.parametrize("kwargs, exc, needle", [
    (dict(zonout=0.1), TypeError, "unknown option 'zonout'; valid: cell_state, zoneout, zoneout_cell"),
    (dict(eps=-1), ValueError, "eps must be a finite number > 0, got -1"),
    (dict(eps="x"), TypeError, "eps must be a positive float"),
    (dict(layer_norm="yes"), TypeError, "layer_norm must be a bool"),
    (dict(zoneout=1.5), ValueError, "zoneout must be a number in [0, 1), got 1.5"),
    (dict(cell_state="bogus"), ValueError, "cell_state must be one of"),
], ids=["misspelt", "eps-negative", "eps-str", "layer-norm-str", "zoneout", "cell-state"])
def test_lstm_to_layernorm_checks_its_options_whether_or_not_anything_converts(model, kwargs, exc, needle):
    # with nothing to convert, a misspelt option or eps=-1 returned without a word
    with pytest.raises(exc) as info:
        lstm_to_layernorm(model, **kwargs)
    assert needle in str(info.value)


def test_transformer_block_layernorm_to_rms_and_none():
    block = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
    convert_norms(block, source=nn.LayerNorm, target="rms", drop_bias=True)
    assert type(block.norm1) is lnorm.RMSNorm
    assert block(torch.randn(2, 5, 16)).shape == (2, 5, 16)
    block2 = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
    convert_norms(block2, source=nn.LayerNorm, target="none")
    assert block2(torch.randn(2, 5, 16)).shape == (2, 5, 16)


# ---------------------------------------------------------------------------------------------
# use_lnorm
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_use_lnorm_transformer_block_exact(train):
    block = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
    randomize_affine(block)
    block.train(train)
    x = torch.randn(3, 7, 16)
    want = block(x)
    keys = set(block.state_dict())
    w = block.norm1.weight
    out = use_lnorm(block)
    assert out is block and type(block.norm1) is lnorm.LayerNorm and type(block.norm2) is lnorm.LayerNorm
    assert block.norm1.weight is w  # the same Parameter: optimizers keep working
    assert set(block.state_dict()) == keys and block.norm1.training == train
    torch.testing.assert_close(block(x), want, rtol=1e-5, atol=1e-5)


def test_use_lnorm_root_and_rmsnorm():
    ln = nn.LayerNorm(8, eps=1e-3, bias=False)
    new = use_lnorm(ln)
    assert new is not ln and type(new) is lnorm.LayerNorm and new.eps == 1e-3 and new.bias is None
    rms = nn.Sequential(nn.RMSNorm(8))
    use_lnorm(rms)
    assert type(rms[0]) is lnorm.RMSNorm
    x = torch.randn(4, 8)
    torch.testing.assert_close(rms(x), torch.nn.functional.rms_norm(x, (8,), rms[0].weight))
    already = nn.Sequential(lnorm.LayerNorm(8))
    first = already[0]
    use_lnorm(already)
    assert already[0] is first


# ---------------------------------------------------------------------------------------------
# recurrent layers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("torch_cls,ln_cls,kwargs", [
    (nn.LSTM, LayerNormLSTM, dict(num_layers=2, batch_first=True)),
    (nn.LSTM, LayerNormLSTM, dict(bidirectional=True, bias=False)),
    (nn.GRU, LayerNormGRU, dict(num_layers=2, bidirectional=True)),
    (nn.RNN, LayerNormRNN, dict(nonlinearity="relu")),
], ids=["lstm-2layer", "lstm-bidir-nobias", "gru-2layer-bidir", "rnn-relu"])
def test_rnn_round_trip_weights_and_exact_without_ln(torch_cls, ln_cls, kwargs):
    rnn = torch_cls(5, 7, **kwargs)
    rnn.weight_hh_l0.requires_grad_(False)
    rnn.eval()
    ln = lstm_to_layernorm(rnn)
    assert type(ln) is ln_cls and ln.layer_norm and not ln.training
    assert not ln.weight_hh_l0.requires_grad and ln.weight_ih_l0.requires_grad
    ln_params = {n: p for n, p in ln.named_parameters() if n.startswith("ln_")}
    assert ln_params
    for n, p in ln_params.items():  # identity initialisation
        assert torch.equal(p, torch.ones_like(p) if "_weight" in n else torch.zeros_like(p)), n
    back = layernorm_to_lstm(ln)
    assert type(back) is torch_cls and not back.training
    sd, sd_back = rnn.state_dict(), back.state_dict()
    assert sd.keys() == sd_back.keys()
    for k in sd:
        assert torch.equal(sd[k], sd_back[k]), k
    # with layer_norm=False the conversion is exact, in outputs and in gradients
    ref = torch_cls(5, 7, **kwargs).double()
    plain = lstm_to_layernorm(copy.deepcopy(ref), layer_norm=False)
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    out_ref, out = ref(x)[0], plain(x)[0]
    torch.testing.assert_close(out, out_ref, rtol=0, atol=1e-12)
    g_ref, = torch.autograd.grad(out_ref.sum(), x)
    g, = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-12)


def test_lstm_inside_a_model_and_ln_changes_the_function():
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 6)
            self.rnn = nn.LSTM(6, 8, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, tokens):
            return self.head(self.rnn(self.emb(tokens))[0])

    model = Tagger()
    tokens = torch.randint(0, 10, (2, 5))
    before = model(tokens)
    out = lstm_to_layernorm(model, cell_state="normalized")
    assert out is model and type(model.rnn) is LayerNormLSTM and model.rnn.cell_state == "normalized"
    after = model(tokens)
    assert after.shape == before.shape
    assert not torch.allclose(after, before, atol=1e-4)  # LN is not the identity function


def test_lstm_to_layernorm_refuses_a_non_module():
    # (proj_size converts now: tests/test_convert_coverage.py)
    with pytest.raises(TypeError, match="model must be"):
        lstm_to_layernorm("lstm")


def test_mixed_requires_grad_is_kept_per_parameter():
    # regression: the flag was copied only when all of the old module's parameters agreed, so a
    # frozen weight beside a trainable bias came back trainable
    bn = nn.BatchNorm1d(4)
    bn.weight.requires_grad_(False)
    m = convert_norms(nn.Sequential(nn.Linear(3, 4), bn), layout="last", target="layer")
    assert {n: p.requires_grad for n, p in m[1].named_parameters()} == {"weight": False, "bias": True}
    ln = nn.LayerNorm(4)
    ln.bias.requires_grad_(False)
    m = convert_norms(nn.Sequential(ln), source=nn.LayerNorm, target="rms")
    assert {n: p.requires_grad for n, p in m[0].named_parameters()} == {"weight": True}


def test_group_to_group_keeps_its_groups():
    # regression: GroupNorm(2, 8) converted with target="group" became GroupNorm(4, 8) (the
    # default for 8 channels), a different function
    torch.manual_seed(0)
    gn = nn.GroupNorm(2, 8)
    with torch.no_grad():
        gn.weight.add_(torch.randn(8))
        gn.bias.add_(torch.randn(8))
    model = nn.Sequential(gn)
    new = convert_norms(model, source=nn.GroupNorm, target="group")
    x = torch.randn(3, 8, 5)
    assert new[0].num_groups == 2
    torch.testing.assert_close(new(x), gn(x))
    assert convert_norms(nn.Sequential(nn.GroupNorm(2, 8)), source=nn.GroupNorm, target="group",
                         num_groups=8)[0].num_groups == 8


# From an interop review: the converters replaced modules and dropped their hooks without a word (a
# monitoring or feature-extraction hook stopped firing).


def _hooked(module, calls):
    handles = [module.register_forward_pre_hook(lambda m, a: calls.append(("pre", type(m).__name__))),
               module.register_forward_hook(lambda m, a, o: calls.append(("fwd", type(m).__name__))),
               module.register_full_backward_hook(lambda m, gi, go: calls.append(("bwd", type(m).__name__)))]
    return handles


@pytest.mark.parametrize("how", ["use_lnorm", "lstm_to_layernorm", "convert_norms"])
def test_converters_carry_forward_and_backward_hooks(how):
    import lnorm.convert as C

    torch.manual_seed(0)
    if how == "lstm_to_layernorm":
        model, x = nn.Sequential(nn.LSTM(4, 8)), torch.randn(3, 2, 4, requires_grad=True)
        convert, new_cls = lambda m: C.lstm_to_layernorm(m, layer_norm=False), "LayerNormLSTM"
    elif how == "use_lnorm":
        model, x = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)), torch.randn(2, 8, requires_grad=True)
        convert, new_cls = C.use_lnorm, "LayerNorm"
    else:
        model, x = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)), torch.randn(4, 8, requires_grad=True)
        convert, new_cls = lambda m: C.convert_norms(m, nn.BatchNorm1d, "layer", layout="last"), None
    calls = []
    handles = _hooked(model[-1], calls)
    model = convert(model)
    if new_cls:
        assert type(model[-1]).__name__ == new_cls
    out = model(x)
    (out[0] if isinstance(out, tuple) else out).sum().backward()
    names = {type(model[-1]).__name__}
    assert [k for k, n in calls if n in names] == ["pre", "fwd", "bwd"], calls
    for h in handles:  # the caller's handles still remove them
        h.remove()
    calls.clear()
    out = model(x)
    (out[0] if isinstance(out, tuple) else out).sum().backward()
    assert calls == []


def test_state_dict_hooks_are_not_carried_and_a_warning_says_so():
    from lnorm.convert import ConversionWarning, use_lnorm

    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    model[1]._register_state_dict_hook(lambda m, sd, prefix, local: sd)
    with pytest.warns(ConversionWarning, match=r"1 \(LayerNorm\) was replaced by LayerNorm, but its state_dict_hooks"):
        use_lnorm(model)


def test_convert_norms_layout_dict_with_an_unknown_name_is_an_error():
    # a misspelt module name in layout={...} was silently ignored
    mlp = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
    with pytest.raises(ValueError, match=r"layout names \['l'\], which are not .* its source norms: \['1'\]"):
        convert_norms(mlp, layout={"l": "last"})
    assert type(convert_norms(mlp, layout={"1": "last"})[1]).__name__ == "LayerNorm"
