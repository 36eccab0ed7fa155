"""lnorm.LayerNorm / RMSNorm / AddLayerNorm / AddRMSNorm: drop-in for the torch modules."""

import copy

import pytest
import torch
from torch import nn

import lnorm
from tolerances import assert_close, assert_three_way

# (ours, torch's): the modules that share torch's constructor
PAIRS = {
    "LayerNorm": (lnorm.LayerNorm, nn.LayerNorm),
    "RMSNorm": (lnorm.RMSNorm, nn.RMSNorm),
    "AddLayerNorm": (lnorm.AddLayerNorm, nn.LayerNorm),
    "AddRMSNorm": (lnorm.AddRMSNorm, nn.RMSNorm),
}
# constructor kwargs valid for both modules of a pair
CTOR_CASES = {
    "LayerNorm": [{}, {"eps": 1e-3}, {"elementwise_affine": False}, {"bias": False},
                  {"elementwise_affine": False, "bias": False}],
    "RMSNorm": [{}, {"eps": 1e-3}, {"eps": None}, {"elementwise_affine": False}],
}
CTOR_CASES["AddLayerNorm"] = CTOR_CASES["LayerNorm"]
CTOR_CASES["AddRMSNorm"] = CTOR_CASES["RMSNorm"]
ALL_CTOR = [(name, shape, kw) for name in PAIRS for shape in (8, (3, 4), [2, 3]) for kw in CTOR_CASES[name]]


def _ctor_id(case):
    name, shape, kw = case
    opts = "-".join(f"{k}={v}" for k, v in kw.items()) or "defaults"
    return f"{name}-{shape}-{opts}".replace(" ", "")


def _out(result):
    return result[0] if isinstance(result, tuple) else result


@pytest.mark.parametrize("case", ALL_CTOR, ids=[_ctor_id(c) for c in ALL_CTOR])
def test_same_constructor_parameters_and_repr_as_torch(case):
    name, shape, kw = case
    ours_cls, torch_cls = PAIRS[name]
    ours, theirs = ours_cls(shape, **kw), torch_cls(shape, **kw)
    assert isinstance(ours, torch_cls)
    assert ours.normalized_shape == theirs.normalized_shape
    assert ours.eps == theirs.eps
    assert ours.elementwise_affine == theirs.elementwise_affine
    ours_params, theirs_params = dict(ours.named_parameters()), dict(theirs.named_parameters())
    assert ours_params.keys() == theirs_params.keys()
    for key, p in ours_params.items():
        assert p.shape == theirs_params[key].shape and p.dtype == theirs_params[key].dtype
    # gain initialised to 1, bias to 0 (the paper's and torch's default)
    if ours.weight is not None:
        assert (ours.weight == 1).all()
    if getattr(ours, "bias", None) is not None:
        assert (ours.bias == 0).all()
    assert set(ours.state_dict()) == set(theirs.state_dict())
    if name.startswith("Add"):
        assert ours.extra_repr() == theirs.extra_repr() + ", residual_in_fp32=False"
    else:
        assert ours.extra_repr() == theirs.extra_repr()
        assert repr(ours) == repr(theirs)
    # and with these options both compute the same thing
    _randomize(theirs)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, *ours.normalized_shape)
    assert_close(_out(ours(x)), theirs(x), name=f"{name} output")


@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["f64", "bf16"])
def test_factory_kwargs(name, dtype):
    ours = PAIRS[name][0]((4, 5), device="cpu", dtype=dtype)
    assert all(p.dtype == dtype and p.device.type == "cpu" for p in ours.parameters())
    meta = PAIRS[name][0](6, device="meta")
    assert all(p.device.type == "meta" for p in meta.parameters())


@pytest.mark.parametrize("name", list(PAIRS))
def test_reset_parameters(name):
    m = PAIRS[name][0](7)
    with torch.no_grad():
        for p in m.parameters():
            p.uniform_(-3, 3)
    m.reset_parameters()
    assert (m.weight == 1).all()
    if getattr(m, "bias", None) is not None:
        assert (m.bias == 0).all()


def _randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5 + 1)
    return module


@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("shape", [8, (3, 4)], ids=["H8", "H3x4"])
def test_load_state_dict_both_ways_and_same_outputs(backend, name, shape):
    ours_cls, torch_cls = PAIRS[name]
    # torch -> ours
    theirs = _randomize(torch_cls(shape, dtype=torch.float64))
    ours = ours_cls(shape, dtype=torch.float64)
    ours.load_state_dict(theirs.state_dict())
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    # ours -> torch
    ours2 = _randomize(ours_cls(shape, dtype=torch.float64), seed=1)
    theirs2 = torch_cls(shape, dtype=torch.float64)
    theirs2.load_state_dict(ours2.state_dict())
    for key, value in ours2.state_dict().items():
        assert torch.equal(theirs2.state_dict()[key], value), key
    # and the loaded modules compute the same thing, forward and backward
    full = (5, 2, *((shape,) if isinstance(shape, int) else shape))
    x = torch.randn(full, dtype=torch.float64)
    for a, b in [(ours, theirs), (ours2, theirs2)]:
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = _out(a(xa)), b(xb)
        assert_close(ya, yb, name=f"{name} output")
        g = torch.randn_like(ya)
        ya.backward(g)
        yb.backward(g)
        assert_close(xa.grad, xb.grad, name=f"{name} input grad")
        for (ka, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
            assert_close(pa.grad, pb.grad, name=f"{name} grad of {ka}")


@pytest.mark.parametrize("name", ["LayerNorm", "RMSNorm"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_half_modules_three_way(backend, name, dtype):
    ours_cls, torch_cls = PAIRS[name]
    theirs64 = _randomize(torch_cls(32, dtype=torch.float64))
    theirs = torch_cls(32, dtype=dtype)
    ours = ours_cls(32, dtype=dtype)
    theirs.load_state_dict(theirs64.state_dict())
    ours.load_state_dict(theirs64.state_dict())
    # the reference sees the half-rounded parameters
    theirs64.load_state_dict({k: v.to(dtype).double() for k, v in theirs64.state_dict().items()})
    x = torch.randn(6, 32, dtype=torch.float64).to(dtype)
    g = torch.randn(6, 32, dtype=torch.float64).to(dtype)
    results = []
    for m, inp in [(ours, x), (theirs, x), (theirs64, x.double())]:
        inp = inp.clone().requires_grad_()
        y = m(inp)
        y.backward(g.to(y.dtype))
        results.append([y, inp.grad] + [p.grad for p in m.parameters()])
    for i, (a, b, r) in enumerate(zip(*results, strict=True)):
        assert_three_way(a, r, b, name=f"{name} {['out', 'dx', 'dweight', 'dbias'][i]}")


@pytest.mark.parametrize("name", ["AddLayerNorm", "AddRMSNorm"])
def test_add_modules_forward(backend, name):
    m = _randomize(PAIRS[name][0](16, dtype=torch.float64))
    plain = PAIRS[name][1](16, dtype=torch.float64)
    plain.load_state_dict(m.state_dict())
    x, r = torch.randn(3, 5, 16, dtype=torch.float64), torch.randn(3, 5, 16, dtype=torch.float64)
    # residual=None: the plain norm, new residual = x
    out, new_res = m(x)
    assert_close(out, plain(x), name="out without residual")
    assert torch.equal(new_res, x)
    out, new_res = m(x, r)
    assert_close(new_res, x + r, name="new_residual")
    assert_close(out, plain(x + r), name="out with residual")
    out, new_res = m(x, residual=r)  # keyword
    assert_close(out, plain(x + r), name="out with residual=")


@pytest.mark.parametrize("name", ["AddLayerNorm", "AddRMSNorm"])
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "first-block"])
def test_residual_in_fp32_module(backend, name, with_residual):
    m = PAIRS[name][0](16, residual_in_fp32=True)  # float32 params, bf16 activations
    assert "residual_in_fp32=True" in repr(m)
    x = torch.randn(4, 16).bfloat16()
    r = torch.randn(4, 16).bfloat16() if with_residual else None
    out, new_res = m(x, r)
    assert out.dtype == torch.bfloat16
    assert new_res.dtype == torch.float32
    expected = x.float() + (r.float() if with_residual else 0)
    assert torch.equal(new_res, expected)
    # the next block takes the float32 stream back as its residual
    out2, new_res2 = m(x, new_res)
    assert out2.dtype == torch.bfloat16 and new_res2.dtype == torch.float32


def test_add_modules_in_a_prenorm_stack(backend):
    # h, residual = norm(block(h), residual) repeated: gradients reach every parameter
    torch.manual_seed(0)
    blocks = nn.ModuleList(nn.Linear(12, 12) for _ in range(3))
    norms = nn.ModuleList([lnorm.AddLayerNorm(12), lnorm.AddRMSNorm(12), lnorm.AddLayerNorm(12)])
    h, residual = torch.randn(2, 7, 12), None
    for block, norm in zip(blocks, norms, strict=True):
        h, residual = norm(block(h), residual)
    (h.square().sum() + residual.sum()).backward()
    for name, p in list(blocks.named_parameters()) + list(norms.named_parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("name", ["LayerNorm", "RMSNorm"])
def test_mask_argument_is_accepted(backend, name):
    # make_norm's modules share forward(x, mask=None); per-sample norms ignore the mask
    m = PAIRS[name][0](8)
    x = torch.randn(2, 3, 8)
    assert torch.equal(m(x, mask=torch.ones(2, 3, dtype=torch.bool)), m(x))


@pytest.mark.parametrize("name", list(PAIRS))
def test_deepcopy_and_train_eval_are_the_same(backend, name):
    # per-sample statistics: train and eval modes compute the same thing
    m = _randomize(PAIRS[name][0](8))
    x = torch.randn(3, 8)
    y_train = _out(m.train()(x))
    y_eval = _out(copy.deepcopy(m).eval()(x))
    assert torch.equal(y_train, y_eval)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: lnorm.LayerNorm(0), ValueError, r"normalized_shape must be .*got 0"),
        (lambda: lnorm.LayerNorm("8"), TypeError, r"normalized_shape must be .*got '8'"),
        (lambda: lnorm.LayerNorm((4, -1)), ValueError, r"normalized_shape .*got \(4, -1\)"),
        (lambda: lnorm.LayerNorm(8, eps=0), ValueError, r"eps must be a finite number > 0, got 0"),
        (lambda: lnorm.LayerNorm(8, eps=-1e-5), ValueError, r"eps .*got -1e-05"),
        (lambda: lnorm.RMSNorm(8, eps=0.0), ValueError, r"eps .*got 0.0"),
        (lambda: lnorm.RMSNorm(8, eps="small"), TypeError, r"eps .*got 'small'"),
        (lambda: lnorm.AddLayerNorm(8, residual_in_fp32=1), TypeError,
         r"residual_in_fp32 must be a bool, got 1"),
        (lambda: lnorm.AddRMSNorm(8, residual_in_fp32="no"), TypeError,
         r"residual_in_fp32 must be a bool, got 'no'"),
    ],
    ids=["LN-zero", "LN-str", "LN-negative-dim", "LN-eps0", "LN-eps-neg", "RMS-eps0", "RMS-eps-str",
         "AddLN-flag", "AddRMS-flag"],
)
def test_constructor_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("name", list(PAIRS))
def test_forward_errors(name):
    m = PAIRS[name][0](8)
    with pytest.raises(ValueError, match=r"normalized_shape \[8\] does not match .*shape \[2, 7\]"):
        m(torch.randn(2, 7))
    with pytest.raises(TypeError, match="dtype torch.float64"):
        m(torch.randn(2, 8, dtype=torch.float64))  # float32 parameters
