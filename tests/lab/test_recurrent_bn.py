"""The lab's recurrent batch-norm LSTM (Cooijmans et al. 2016) against a float64 reference of its
equations: training mode with per-step batch statistics (fixed and variable lengths), eval mode
with per-step running statistics and the last trained step's past the training length."""

import pytest
import torch

from lnorm.lab.recurrent_bn import BNLSTM


def reference(mod: BNLSTM, x: torch.Tensor, lengths=None):
    """The module's equations step by step in float64, sample by sample where lengths differ.

    Returns ``(out (B, T, H), h_n (B, H), running statistics after the call)``.
    """
    p = {k: v.detach().double() for k, v in mod.named_parameters()}
    stats = {k: v.detach().double().clone() for k, v in mod.named_buffers() if k.startswith("running")}
    x = x.double()
    B, T, _ = x.shape
    lengths = [T] * B if lengths is None else [int(n) for n in lengths]
    trained = max(int(mod.steps_trained), 1)
    m, eps = mod.momentum, mod.eps

    def bn(name, z, rows, t, gamma, beta):
        rm, rv = stats[f"running_mean_{name}"], stats[f"running_var_{name}"]
        if mod.training and len(rows) >= 2:
            zr = z[rows]
            mean, var = zr.mean(0), ((zr - zr.mean(0)) ** 2).mean(0)
            rm[t] = (1 - m) * rm[t] + m * mean
            rv[t] = (1 - m) * rv[t] + m * var * len(rows) / (len(rows) - 1)
        elif mod.training:
            mean, var = rm[t].clone(), rv[t].clone()
        else:
            s = min(t, trained - 1)
            mean, var = rm[s], rv[s]
        return (z - mean) / torch.sqrt(var + eps) * gamma + beta

    H = mod.hidden_size
    h, c = torch.zeros(B, H, dtype=torch.float64), torch.zeros(B, H, dtype=torch.float64)
    outs = []
    for t in range(T):
        rows = [b for b in range(B) if lengths[b] > t]
        a = (bn("h", h @ p["weight_hh"].T, rows, t, p["gamma_h"], 0.0)
             + bn("x", x[:, t] @ p["weight_ih"].T, rows, t, p["gamma_x"], p["bias"]))
        i, f, g, o = a.chunk(4, 1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(bn("c", c_new, rows, t, p["gamma_c"], p["beta_c"]))
        for b in rows:
            h[b], c[b] = h_new[b], c_new[b]
        outs.append(h.clone())
    return torch.stack(outs, 1), h, stats


def make(I=3, H=5, max_len=8, seed=0, **kw):
    torch.manual_seed(seed)
    mod = BNLSTM(I, H, max_len, **kw)
    with torch.no_grad():  # away from the initial values, so every parameter matters
        for prm in mod.parameters():
            prm.add_(0.3 * torch.randn_like(prm))
    return mod


def assert_stats(mod, stats, atol):
    for k, v in stats.items():
        torch.testing.assert_close(getattr(mod, k).double(), v, atol=atol, rtol=0, msg=k)


@pytest.mark.parametrize("lengths", [None, [6, 3, 4, 2], [2, 6, 1, 5]], ids=["fixed", "var", "var-unsorted"])
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 2e-5)], ids=["f64", "f32"])
def test_training_mode_matches_reference(lengths, dtype, atol):
    """Batch statistics of the running sequences per step (where one sequence runs, the step's
    running statistics), finished sequences keep their state, running statistics updated per step."""
    mod = make().to(dtype).train()
    x = torch.randn(4, 6, 3, dtype=dtype) * 2
    want_out, want_h, want_stats = reference(mod, x, lengths)
    out, h = mod(x, None if lengths is None else torch.tensor(lengths))
    torch.testing.assert_close(out.double(), want_out, atol=atol, rtol=0)
    torch.testing.assert_close(h.double(), want_h, atol=atol, rtol=0)
    assert_stats(mod, want_stats, atol)
    assert int(mod.steps_trained) == (6 if lengths is None else max(lengths))
    sum(out.sum() for out in (out, h)).backward()  # differentiable end to end
    assert all(prm.grad is not None and torch.isfinite(prm.grad).all() for prm in mod.parameters())


def test_eval_mode_uses_per_step_running_statistics():
    """Eval: step t uses the running statistics of step min(t, steps_trained - 1)."""
    mod = make(max_len=8).double()
    with torch.no_grad():
        for name in ("x", "h", "c"):  # distinct statistics at every step
            getattr(mod, f"running_mean_{name}").normal_()
            getattr(mod, f"running_var_{name}").uniform_(0.2, 3.0)
    mod.steps_trained.fill_(3)
    mod.eval()
    x = torch.randn(4, 6, 3, dtype=torch.float64)
    want_out, want_h, _ = reference(mod, x)
    before = {k: v.clone() for k, v in mod.named_buffers()}
    out, h = mod(x)
    torch.testing.assert_close(out, want_out, atol=1e-12, rtol=0)
    torch.testing.assert_close(h, want_h, atol=1e-12, rtol=0)
    assert all(torch.equal(v, before[k]) for k, v in mod.named_buffers())  # eval updates nothing

    with torch.no_grad():  # a step past the trained length has no say; the last trained one does
        mod.running_mean_x[4].add_(5.0)
    torch.testing.assert_close(mod(x)[0], out, atol=0, rtol=0)
    with torch.no_grad():
        mod.running_mean_x[2].add_(5.0)
    out2 = mod(x)[0]
    torch.testing.assert_close(out2[:, :2], out[:, :2], atol=0, rtol=0)
    assert (out2[:, 2:] - out[:, 2:]).abs().amin(dim=(0, 2)).gt(0).all()  # every step from 2 on moved


def test_trained_then_evaluated_past_training_length():
    """After training on 4 steps, a 7-step eval sequence uses step 3's statistics for steps 3-6, and
    one sequence at a time in eval mode gives the batched outputs."""
    mod = make(max_len=8).double().train()
    for _ in range(3):
        mod(torch.randn(5, 4, 3, dtype=torch.float64))
    assert int(mod.steps_trained) == 4
    assert not torch.equal(mod.running_var_h[3], torch.ones_like(mod.running_var_h[3]))
    assert torch.equal(mod.running_var_h[4], torch.ones_like(mod.running_var_h[4]))  # never trained
    mod.eval()
    x = torch.randn(3, 7, 3, dtype=torch.float64)
    want_out, _, _ = reference(mod, x)
    out, _ = mod(x)
    torch.testing.assert_close(out, want_out, atol=1e-12, rtol=0)
    one = torch.cat([mod(x[i:i + 1])[0] for i in range(3)])
    torch.testing.assert_close(one, out, atol=1e-12, rtol=0)


def test_batch_of_one_cannot_use_batch_statistics():
    mod = make().train()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        mod(torch.randn(1, 4, 3))
    mod.eval()
    assert mod(torch.randn(1, 4, 3))[0].shape == (1, 4, 5)


def test_h0_noise_only_in_training():
    mod = make(h0_noise=0.1).train()
    x = torch.zeros(4, 3, 3)  # a constant prefix: without noise every W_hh h would be equal
    torch.manual_seed(1)
    a, _ = mod(x)
    assert a[:, 0].std(0).gt(0).all()
    mod.eval()
    b1, _ = mod(x)
    b2, _ = mod(x)
    torch.testing.assert_close(b1, b2, atol=0, rtol=0)


@pytest.mark.parametrize("args,kw,match", [
    ((0, 4, 5), {}, "input_size"), ((3, 4, 0), {}, "max_len"), ((3, 4, 5), {"momentum": 2.0}, "momentum"),
    ((3, 4, 5), {"eps": 0.0}, "eps"), ((3, 4, 5), {"h0_noise": -1.0}, "h0_noise")])
def test_bad_options(args, kw, match):
    with pytest.raises(ValueError, match=match):
        BNLSTM(*args, **kw)


@pytest.mark.parametrize("x,lengths,match", [
    (torch.randn(2, 4), None, "x must be"), (torch.randn(2, 4, 2), None, "x must be"),
    (torch.randn(2, 9, 3), None, "longer than max_len"), (torch.randn(2, 4, 3), torch.tensor([4, 5]), "lengths"),
    (torch.randn(2, 4, 3), torch.tensor([4.0, 2.0]), "lengths"), (torch.randn(2, 4, 3), torch.tensor([4]), "lengths")])
def test_bad_input(x, lengths, match):
    with pytest.raises(ValueError, match=match):
        make(max_len=8).train()(x, lengths)


def test_population_statistics_are_the_average_over_batches():
    from lnorm.lab.recurrent_bn import population_statistics

    mod = make(max_len=8).double()
    batches = [torch.randn(4, 5, 3, dtype=torch.float64) + k for k in range(3)]
    population_statistics(mod, [(x,) for x in batches])
    assert mod.training and mod.momentum == 0.1
    # the first step's W_ih x statistics: mean of the per-batch means and unbiased variances
    z = [x[:, 0] @ mod.weight_ih.detach().T for x in batches]
    torch.testing.assert_close(mod.running_mean_x[0], sum(v.mean(0) for v in z) / 3, atol=1e-12, rtol=0)
    torch.testing.assert_close(mod.running_var_x[0], sum(v.var(0) for v in z) / 3, atol=1e-12, rtol=0)
    assert int(mod.steps_trained) == 5


def test_seeded_weights_are_nn_lstm_s():
    """Same names, shapes and draw order as nn.LSTM's first tensors: runs of one seed start from the
    same recurrent weights (the lab pairs its comparisons by seed)."""
    torch.manual_seed(3)
    ref = torch.nn.LSTM(3, 5)
    torch.manual_seed(3)
    mod = BNLSTM(3, 5, 4)
    assert torch.equal(mod.weight_ih, ref.weight_ih_l0) and torch.equal(mod.weight_hh, ref.weight_hh_l0)
