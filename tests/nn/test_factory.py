"""make_norm(kind, num_features, layout=...): every kind in both layouts, batch norm with a mask."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lnorm
from lnorm.nn import ChannelBatchNorm, ChannelRMSNorm, GroupNorm, MaskedBatchNorm, NoNorm, make_norm
from tolerances import assert_close

KINDS = ("layer", "rms", "batch", "group", "none")
EXPECTED_CLASS = {
    ("layer", "last"): lnorm.LayerNorm,
    ("rms", "last"): lnorm.RMSNorm,
    ("batch", "last"): MaskedBatchNorm,
    ("group", "last"): GroupNorm,
    ("none", "last"): NoNorm,
    ("layer", "channels"): GroupNorm,
    ("rms", "channels"): ChannelRMSNorm,
    ("batch", "channels"): ChannelBatchNorm,
    ("group", "channels"): GroupNorm,
    ("none", "channels"): NoNorm,
}
# inputs per layout: features last, or channels at dim 1 with 0..3 spatial dims
LAST_SHAPES = {"B-C": (6, 8), "B-T-C": (3, 5, 8), "B-T1-C": (4, 1, 8)}
CHANNEL_SHAPES = {"B-C": (6, 8), "B-C-L": (3, 8, 7), "B-C-H-W": (2, 8, 5, 3), "B-C-D-H-W": (2, 8, 2, 3, 3)}


def _randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 + 1)
    return module


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", ["last", "channels"])
def test_kind_and_layout_give_the_documented_module(kind, layout):
    m = make_norm(kind, 8, layout=layout)
    assert type(m) is EXPECTED_CLASS[(kind, layout)]
    shapes = LAST_SHAPES if layout == "last" else CHANNEL_SHAPES
    for shape in shapes.values():
        x = torch.randn(shape)
        y = m(x)
        assert y.shape == x.shape and torch.isfinite(y).all()
        assert m(x, mask=None).shape == x.shape


def test_kind_is_case_insensitive():
    assert isinstance(make_norm("LaYeR", 4), lnorm.LayerNorm)


@pytest.mark.parametrize("shape", LAST_SHAPES.values(), ids=LAST_SHAPES.keys())
def test_layer_and_rms_last_equal_torch(shape):
    x = torch.randn(shape)
    ln, rms = _randomize(make_norm("layer", 8, eps=1e-4)), _randomize(make_norm("rms", 8))
    assert_close(ln(x), F.layer_norm(x, (8,), ln.weight, ln.bias, 1e-4), name="layer/last")
    assert_close(rms(x), F.rms_norm(x, (8,), rms.weight), name="rms/last")


@pytest.mark.parametrize("shape", CHANNEL_SHAPES.values(), ids=CHANNEL_SHAPES.keys())
def test_layer_and_rms_channels_normalize_each_sample_over_channels_and_space(shape):
    # the paper's convolutional layer norm: statistics over (C, *spatial), per-channel gain/bias
    x = torch.randn(shape, dtype=torch.float64)
    per_channel = (1, 8) + (1,) * (len(shape) - 2)
    ln = _randomize(make_norm("layer", 8, layout="channels", dtype=torch.float64))
    want = F.layer_norm(x, shape[1:], eps=1e-5) * ln.weight.view(per_channel) + ln.bias.view(per_channel)
    assert_close(ln(x), want, name="layer/channels")
    rms = _randomize(make_norm("rms", 8, layout="channels", eps=1e-6, dtype=torch.float64))
    want = F.rms_norm(x, shape[1:], eps=1e-6) * rms.weight.view(per_channel)
    assert_close(rms(x), want, name="rms/channels")


@pytest.mark.parametrize("kind", ["layer", "rms", "group"])
def test_channels_norms_in_bfloat16(kind):
    # a bf16 model: output in bf16, close to the float64 computation on the same values
    m = _randomize(make_norm(kind, 8, layout="channels", dtype=torch.bfloat16))
    m64 = make_norm(kind, 8, layout="channels", dtype=torch.float64)
    m64.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
    x = torch.randn(2, 8, 5, 3).bfloat16()
    y = m(x)
    assert y.dtype == torch.bfloat16
    assert_close(y, m64(x.double()), dtype=torch.bfloat16, name=f"{kind}/channels bf16")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", ["last", "channels"])
def test_float32_params_with_bfloat16_input_give_bfloat16(kind, layout):
    # mixed precision: float32 norm parameters, bf16 activations, bf16 out (as torch's norms).
    # Regression: rms/channels returned float32.
    x = torch.randn(4, 5, 8).bfloat16() if layout == "last" else torch.randn(4, 8, 5).bfloat16()
    assert make_norm(kind, 8, layout=layout)(x).dtype == torch.bfloat16


def test_group_norm_in_both_layouts():
    g_last = _randomize(make_norm("group", 8, num_groups=2))
    ref = nn.GroupNorm(2, 8)
    ref.load_state_dict(g_last.state_dict())
    x = torch.randn(3, 5, 8)
    # features last: each position's 8 features form 2 groups of 4
    assert_close(g_last(x), ref(x.reshape(15, 8)).reshape(3, 5, 8), name="group/last")
    g_ch = make_norm("group", 8, layout="channels", num_groups=4)
    ref4 = nn.GroupNorm(4, 8)
    ref4.load_state_dict(g_ch.state_dict())
    x = torch.randn(2, 8, 5, 3)
    assert_close(g_ch(x), ref4(x), name="group/channels")
    assert make_norm("group", 64).num_groups == 32  # default: 32 groups when they fit
    assert make_norm("group", 6).num_groups == 2
    assert make_norm("group", 7).num_groups == 1


@pytest.mark.parametrize("layout", ["last", "channels"])
def test_none_is_the_identity(layout):
    m = make_norm("none", 8, layout=layout)
    x = torch.randn(2, 8, 3)
    assert m(x) is x
    assert m(x, mask=torch.ones(2, 8, dtype=torch.bool)) is x
    assert not list(m.parameters())


# ------------------------------------------------------------------------------- batch norm


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "cumulative"])
@pytest.mark.parametrize("T", [1, 7])
def test_batch_last_equals_batchnorm1d_on_transposed_input(T, momentum):
    ours = _randomize(make_norm("batch", 8, momentum=momentum, dtype=torch.float64))
    ref = nn.BatchNorm1d(8, momentum=momentum, dtype=torch.float64)
    ref.load_state_dict(ours.state_dict())
    for step in range(3):  # train: batch statistics, running stats updated alike
        x = torch.randn(4, T, 8, dtype=torch.float64) * (step + 1) + step
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), ref(xb.transpose(1, 2)).transpose(1, 2)  # (B, C, T) for torch
        assert_close(ya, yb, name=f"train step {step} output")
        g = torch.randn_like(ya)
        ya.backward(g)
        yb.backward(g)
        assert_close(xa.grad, xb.grad, name="input grad")
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        assert_close(getattr(ours, key).double(), getattr(ref, key).double(), name=key)
    for (name, pa), (_, pb) in zip(ours.named_parameters(), ref.named_parameters(), strict=True):
        assert_close(pa.grad, pb.grad, name=f"grad of {name}")
    ours.eval()
    ref.eval()
    x = torch.randn(5, T, 8, dtype=torch.float64)
    assert_close(ours(x), ref(x.transpose(1, 2)).transpose(1, 2), name="eval output")


def test_batch_last_on_2d_input_equals_batchnorm1d():
    ours, ref = make_norm("batch", 8), nn.BatchNorm1d(8)
    x = torch.randn(16, 8)
    assert_close(ours(x), ref(x), name="train (B, C)")
    assert_close(ours.running_var, ref.running_var, name="running_var")


@pytest.mark.parametrize("lengths", [(7, 3, 1, 5), (7, 7, 7, 7), (2, 0, 4, 1)],
                         ids=["ragged", "all-valid", "one-empty-sequence"])
def test_batch_with_mask_uses_valid_positions_only(lengths):
    B, T, C = len(lengths), 7, 8
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]  # (B, T), True = valid
    ours = _randomize(make_norm("batch", C, dtype=torch.float64))
    ref = nn.BatchNorm1d(C, dtype=torch.float64)
    ref.load_state_dict(ours.state_dict())
    for step in range(2):
        x = torch.randn(B, T, C, dtype=torch.float64) + step
        x[~mask] = 1e3  # padding that would wreck the statistics if counted
        xa = x.clone().requires_grad_()
        valid = x[mask].clone().requires_grad_()  # (N_valid, C)
        ya, yb = ours(xa, mask=mask), ref(valid)
        # equals batch norm run on only the valid rows
        assert_close(ya[mask], yb, name=f"step {step}: valid outputs")
        g = torch.randn_like(yb)
        ya[mask].backward(g)
        yb.backward(g)
        assert_close(xa.grad[mask], valid.grad, name="grad at valid positions")
        assert (xa.grad[~mask] == 0).all(), "padding must get no gradient"
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        assert_close(getattr(ours, key).double(), getattr(ref, key).double(), name=key)
    for (name, pa), (_, pb) in zip(ours.named_parameters(), ref.named_parameters(), strict=True):
        assert_close(pa.grad, pb.grad, name=f"grad of {name}")
    # eval: running statistics for every position, mask or not
    ours.eval()
    x = torch.randn(B, T, C, dtype=torch.float64)
    assert_close(ours(x, mask=mask), ours(x), name="eval with mask")
    assert_close(ours(x), ref.eval()(x.reshape(-1, C)).reshape(B, T, C), name="eval output")


def test_batch_with_mask_without_running_stats_uses_batch_stats_in_eval():
    ours = make_norm("batch", 4, track_running_stats=False).eval()
    ref = nn.BatchNorm1d(4, track_running_stats=False).eval()
    x = torch.randn(3, 5, 4)
    mask = torch.rand(3, 5) > 0.3
    assert_close(ours(x, mask=mask)[mask], ref(x[mask]), name="batch stats in eval")


@pytest.mark.parametrize("shape", [(2, 8, 5), (2, 8, 5, 3), (2, 8, 2, 3, 3)], ids=["1d", "2d", "3d"])
def test_batch_channels_equals_torch_batchnorm(shape):
    ref_cls = {3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(shape)]
    ours, ref = _randomize(make_norm("batch", 8, layout="channels")), ref_cls(8)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(shape)
    assert_close(ours(x), ref(x), name="train")
    assert_close(ours.running_mean, ref.running_mean, name="running_mean")
    assert_close(ours.eval()(x), ref.eval()(x), name="eval")


def test_batch_norm_cannot_train_on_one_position():
    m = make_norm("batch", 4)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    mask[0, 0] = True
    with pytest.raises(ValueError, match="more than 1 valid value per channel .*got 1"):
        m(torch.randn(2, 3, 4), mask=mask)
    with pytest.raises(ValueError, match="got 0"):
        m(torch.randn(2, 3, 4), mask=torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m(torch.randn(1, 4))  # torch's own check, no mask


# ----------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: make_norm("layernorm", 8), ValueError, r"kind must be one of .*got 'layernorm'"),
        (lambda: make_norm(None, 8), ValueError, r"kind must be one of .*got None"),
        (lambda: make_norm("layer", 8, layout="first"), ValueError, r"layout must be one of .*got 'first'"),
        (lambda: make_norm("layer", 0), ValueError, r"num_features must be an int >= 1, got 0"),
        (lambda: make_norm("layer", -3), ValueError, r"num_features .*got -3"),
        (lambda: make_norm("layer", 8.0), TypeError, r"num_features must be an int, got 8.0"),
        (lambda: make_norm("layer", True), TypeError, r"num_features must be an int, got True"),
        (lambda: make_norm("layer", 8, foo=1), TypeError, r"make_norm\('layer'.*unexpected keyword argument 'foo'"),
        (lambda: make_norm("rms", 8, layout="channels", bar=2), TypeError, r"unexpected keyword argument 'bar'"),
        (lambda: make_norm("batch", 8, elementwise_affine=False), TypeError,
         r"unexpected keyword argument 'elementwise_affine'"),
        (lambda: make_norm("none", 8, eps=1e-3), TypeError, r"kind 'none' takes no options, got \['eps'\]"),
        (lambda: make_norm("group", 8, num_groups=3), ValueError, r"num_channels \(8\) .*num_groups \(3\)"),
        (lambda: make_norm("group", 8, num_groups=0), ValueError, r"num_groups must be an int >= 1, got 0"),
        (lambda: make_norm("layer", 8, eps=0), ValueError, r"eps must be a finite number > 0, got 0"),
        (lambda: make_norm("group", 8, eps=-1.0), ValueError, r"eps .*got -1.0"),
        (lambda: make_norm("rms", 8, layout="channels", eps=0.0), ValueError, r"eps .*got 0.0"),
    ],
    ids=["unknown-kind", "kind-None", "unknown-layout", "zero-features", "negative-features",
         "float-features", "bool-features", "unknown-option", "unknown-option-channels",
         "batch-elementwise_affine", "none-with-options", "groups-not-dividing", "zero-groups",
         "layer-eps0", "group-eps-neg", "channel-rms-eps0"],
)
def test_construction_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_forward_errors():
    bn = make_norm("batch", 4)
    x = torch.randn(2, 3, 4)
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        bn(x, mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"mask must have shape \[2, 3\] .*got \[2, 4\]"):
        bn(x, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"expected input of shape \(B, 4\) or \(B, T, 4\), got \[2, 3, 5\]"):
        bn(torch.randn(2, 3, 5))
    with pytest.raises(TypeError, match="input must be a floating-point tensor"):
        bn(torch.ones(2, 3, 4, dtype=torch.int64))
    cbn = make_norm("batch", 4, layout="channels")
    with pytest.raises(ValueError, match="ChannelBatchNorm does not take a mask"):
        cbn(torch.randn(2, 4, 3), mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"expected 4 channels at dim 1, got input of shape \[2, 3, 4\]"):
        cbn(torch.randn(2, 3, 4))
    crms = make_norm("rms", 4, layout="channels")
    with pytest.raises(ValueError, match=r"expected input \(B, 4, ...\), got \[2, 3\]"):
        crms(torch.randn(2, 3))


# From a review: a NaN, negative or string momentum trained without complaint (running statistics
# all NaN) or failed deep inside; strings were accepted for boolean options ("no" read as True).


@pytest.mark.parametrize("build", [
    lambda **kw: lnorm.nn.make_norm("batch", 4, **kw),
    lambda **kw: lnorm.nn.make_norm("batch", 4, layout="last", **kw),
    lambda **kw: __import__("lnorm.distributed").distributed.SyncBatchNorm(4, **kw),
], ids=["channels", "last", "sync"])
def test_batch_norm_momentum_and_flags_are_checked(build):
    for bad in (float("nan"), -1.0, 5.0):
        with pytest.raises(ValueError, match=r"momentum must be a number in \[0, 1\] or None, got"):
            build(momentum=bad)
    with pytest.raises(TypeError, match="momentum must be a number in"):
        build(momentum="0.1")
    for flag in ("affine", "track_running_stats"):
        with pytest.raises(TypeError, match=f"{flag} must be a bool, got 'no'"):
            build(**{flag: "no"})
    assert build(momentum=None).momentum is None and build(momentum=1).momentum == 1.0


@pytest.mark.parametrize("build, flag", [
    (lambda **kw: lnorm.LayerNorm(8, **kw), "bias"),
    (lambda **kw: lnorm.LayerNorm(8, **kw), "elementwise_affine"),
    (lambda **kw: lnorm.RMSNorm(8, **kw), "elementwise_affine"),
    (lambda **kw: lnorm.nn.make_norm("group", 8, num_groups=2, **kw), "affine"),
    (lambda **kw: lnorm.nn.make_norm("rms", 8, layout="channels", **kw), "affine"),
])
def test_boolean_options_refuse_strings(build, flag):
    with pytest.raises(TypeError, match=f"{flag} must be a bool, got 'no'"):
        build(**{flag: "no"})
