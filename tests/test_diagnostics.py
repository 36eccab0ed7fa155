"""Diagnostics on models whose answers are known: batch norm (batch dependent in train mode,
train/eval gap), layer norm, group norm and no norm (neither)."""

import json
import math

import pytest
import torch
from torch import nn

import lnorm
from lnorm.diagnostics import ActivationStats, check_batch_independence, train_eval_gap
from lnorm.nn import LayerNormLSTM


def mlp(norm: str) -> nn.Module:
    norms = {"batch": lambda: nn.BatchNorm1d(16), "layer": lambda: nn.LayerNorm(16),
             "lnorm": lambda: lnorm.LayerNorm(16), "none": nn.Identity}
    return nn.Sequential(nn.Linear(8, 16), norms[norm](), nn.ReLU(), nn.Linear(16, 4))


def cnn(norm: str) -> nn.Module:
    norms = {"batch": lambda: nn.BatchNorm2d(8), "group": lambda: nn.GroupNorm(4, 8),
             "layer": lambda: nn.GroupNorm(1, 8), "none": nn.Identity}
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norms[norm](), nn.ReLU(inplace=True),
                         nn.Conv2d(8, 4, 3), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))


def state_of(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [m.training for m in model.modules()])


def assert_unchanged(model, before):
    sd, modes = before
    after = model.state_dict()
    assert sd.keys() == after.keys()
    for k in sd:
        assert torch.equal(sd[k], after[k]), f"{k} changed"
    assert modes == [m.training for m in model.modules()]


# ---------------------------------------------------------------------------------------------
# check_batch_independence
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("build,norm,x_shape", [
    (mlp, "layer", (12, 8)), (mlp, "lnorm", (12, 8)), (mlp, "none", (12, 8)),
    (cnn, "group", (6, 3, 7, 7)), (cnn, "layer", (6, 3, 7, 7)), (cnn, "none", (7, 3, 7, 7)),
], ids=lambda v: v.__name__ if callable(v) else str(v))
def test_per_sample_norms_are_batch_independent(build, norm, x_shape):
    model = build(norm)
    before = state_of(model)
    r = check_batch_independence(model, torch.randn(x_shape))
    assert r.independent, r
    assert r.sources == [] and r.errors == {}
    assert set(r.probes) == {"permute", "split", "replace"}
    assert r.max_relative_change <= 1e-5
    assert_unchanged(model, before)


@pytest.mark.parametrize("build,x_shape,bn_name", [(mlp, (12, 8), "1"), (cnn, (6, 3, 7, 7), "1")],
                         ids=["mlp", "cnn"])
def test_batch_norm_is_batch_dependent_in_train_mode_and_named(build, x_shape, bn_name):
    model = build("batch").eval()  # the check switches to train itself and restores eval
    before = state_of(model)
    r = check_batch_independence(model, torch.randn(x_shape))
    assert not r.independent and r.mode == "train"
    assert r.probes["split"] > 1e-2 and r.probes["replace"] > 1e-2
    # batch statistics do not depend on the order of the samples: permuting passes
    assert r.probes["permute"] < 1e-5
    assert [s.name for s in r.sources] == [bn_name]
    assert r.sources[0].type.startswith("BatchNorm") and r.sources[0].input_relative == 0.0
    assert_unchanged(model, before)


def test_batch_norm_in_eval_mode_is_independent():
    model = mlp("batch")
    r = check_batch_independence(model, torch.randn(10, 8), mode="eval")
    assert r.independent and r.mode == "eval"
    assert model.training  # restored


def test_mixing_module_found_inside_container():
    class MixBatch(nn.Module):  # subtracts the batch mean: batch dependent in any mode
        def forward(self, x):
            return x - x.mean(0, keepdim=True)

    model = nn.Sequential(nn.Linear(5, 6), nn.Sequential(nn.Tanh(), MixBatch()), nn.Linear(6, 2))
    r = check_batch_independence(model, torch.randn(8, 5), mode="eval")
    assert not r.independent
    assert [s.name for s in r.sources] == ["1.1"]


def test_sequence_model_with_batch_dim_1():
    lstm = nn.LSTM(4, 8, num_layers=2)  # (T, B, C)
    r = check_batch_independence(lstm, torch.randn(5, 6, 4), batch_dim=1)
    assert r.independent, r


def test_forward_failing_on_part_of_the_batch_is_reported():
    class FixedBatch(nn.Module):  # e.g. a hard-coded reshape: breaks on any other batch size
        def forward(self, x):
            if x.shape[0] != 8:
                raise RuntimeError(f"expected 8 samples, got {x.shape[0]}")
            return x

    r = check_batch_independence(nn.Sequential(mlp("layer"), FixedBatch()), torch.randn(8, 8))
    assert not r.independent
    assert r.errors["split"] == "RuntimeError: expected 8 samples, got 4"
    assert r.probes["permute"] < 1e-6  # the other probes still ran


def test_bad_arguments():
    with pytest.raises(TypeError, match="model"):
        check_batch_independence("model", torch.randn(4, 2))
    with pytest.raises(TypeError, match="x must"):
        check_batch_independence(nn.Linear(2, 2), [[1.0, 2.0]])
    with pytest.raises(ValueError, match="at least 4"):
        check_batch_independence(nn.Linear(2, 2), torch.randn(3, 2))
    with pytest.raises(ValueError, match="mode"):
        check_batch_independence(nn.Linear(2, 2), torch.randn(4, 2), mode="test")
    with pytest.raises(ValueError, match="batch_dim"):
        check_batch_independence(nn.Linear(2, 2), torch.randn(4, 2), batch_dim=2)


def test_integer_inputs_token_ids():
    model = nn.Sequential(nn.Embedding(20, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    r = check_batch_independence(model, torch.randint(0, 20, (6, 5)))
    assert r.independent


# ---------------------------------------------------------------------------------------------
# train_eval_gap
# ---------------------------------------------------------------------------------------------


def test_train_eval_gap_batch_norm_restores_everything():
    model = cnn("batch")
    with torch.no_grad():  # make the running stats something other than their defaults
        model[1].running_mean.uniform_(-1, 1)
        model[1].num_batches_tracked.fill_(7)
    model.eval()
    before = state_of(model)
    r = train_eval_gap(model, torch.randn(6, 3, 7, 7) * 2 + 1)
    assert not r.consistent and r.relative_gap > 1e-2
    assert [(layer.name, layer.type) for layer in r.layers] == [("1", "BatchNorm2d")]
    gap = r.layers[0]
    assert gap.input_gap == 0.0 and gap.output_gap > 1e-2  # the gap starts at the batch norm
    assert_unchanged(model, before)
    # no gradients were created
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("build,norm,x_shape", [
    (mlp, "layer", (5, 8)), (mlp, "none", (5, 8)), (cnn, "group", (3, 3, 7, 7)), (cnn, "layer", (1, 3, 7, 7)),
], ids=lambda v: v.__name__ if callable(v) else str(v))
def test_train_eval_gap_zero_for_per_sample_norms(build, norm, x_shape):
    model = build(norm)
    r = train_eval_gap(model, torch.randn(x_shape))
    assert r.consistent and r.max_gap == 0.0
    assert all(layer.output_gap == 0.0 for layer in r.layers)


def test_train_eval_gap_dropout_excluded_by_default():
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.LayerNorm(8))
    assert train_eval_gap(model, torch.randn(4, 8)).consistent
    assert not train_eval_gap(model, torch.randn(4, 8), include_dropout=True).consistent


# ---------------------------------------------------------------------------------------------
# leaving no trace: rebound buffers, the global RNG, zoneout; checked arguments
# ---------------------------------------------------------------------------------------------


class RebindingBatchNorm(nn.Module):
    """Batch norm written by hand, rebinding its buffers (``self.running_mean = ...``)."""

    def __init__(self, c):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x):
        if self.training:
            mean, var = x.mean(0), x.var(0)
            self.running_mean = 0.9 * self.running_mean + 0.1 * mean.detach()
            self.running_var = 0.9 * self.running_var + 0.1 * var.detach()
            return (x - mean) / (var + 1e-5).sqrt()
        return (x - self.running_mean) / (self.running_var + 1e-5).sqrt()


@pytest.mark.parametrize("diagnostic", [
    lambda m, x: check_batch_independence(m, x), lambda m, x: train_eval_gap(m, x),
], ids=["batch-independence", "train-eval-gap"])
def test_diagnostics_restore_buffers_the_model_rebinds(diagnostic):
    # regression: ModelState copied the saved values into the old buffer objects, so a model that
    # rebinds its buffers kept the running statistics of the diagnostic's batches
    model = nn.Sequential(nn.Linear(8, 16), RebindingBatchNorm(16), nn.ReLU(), nn.Linear(16, 4))
    before = state_of(model)
    diagnostic(model, torch.randn(12, 8) * 3 + 1)
    assert_unchanged(model, before)


class Noise(nn.Module):
    """A model's own randomness in training mode (not dropout: no diagnostic switches it off)."""

    def forward(self, x):
        return x + 1e-3 * torch.randn_like(x) if self.training else x


def _noisy_model():
    return nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), Noise(), nn.LayerNorm(8))


@pytest.mark.parametrize("run", [
    lambda m, x: check_batch_independence(m, x),
    lambda m, x: check_batch_independence(m.train(), x, mode="current"),
    lambda m, x: train_eval_gap(m, x),
    lambda m, x: train_eval_gap(m, x, include_dropout=True),
], ids=["batch-independence", "batch-independence-current", "train-eval-gap", "train-eval-gap-dropout"])
def test_diagnostics_leave_the_global_rng_as_they_found_it(run):
    # regression: the train-mode forwards drew from torch's global generator, so running a
    # diagnostic changed every random number the caller drew afterwards
    model, x = _noisy_model(), torch.randn(8, 8)
    modes = [m.training for m in model.modules()]
    state = torch.get_rng_state()
    run(model, x)
    assert torch.equal(torch.get_rng_state(), state)
    assert [m.training for m in model.modules()] == modes


def test_zoneout_is_not_batch_dependence_nor_a_train_eval_gap():
    # regression: zoneout stayed on in the train-mode probes; its random masks read as batch
    # dependence of a layer-normalized LSTM (relative change ~1) and as a train/eval gap
    model = LayerNormLSTM(4, 8, batch_first=True, zoneout=0.5, zoneout_cell=0.3)
    x = torch.randn(8, 5, 4)
    r = check_batch_independence(model, x)
    assert r.independent and r.max_relative_change <= 1e-5, r
    assert train_eval_gap(model, x).consistent
    assert not train_eval_gap(model, x, include_dropout=True).consistent  # zoneout kept: a real gap
    assert model.training


@pytest.mark.parametrize("value", ["yes", 1, None], ids=["str", "int", "None"])
def test_train_eval_gap_include_dropout_must_be_a_bool(value):
    # regression: any truthy value ("no" too) was taken for True
    with pytest.raises(TypeError, match=f"include_dropout must be a bool, got {value!r}"):
        train_eval_gap(mlp("layer"), torch.randn(4, 8), include_dropout=value)


@pytest.mark.parametrize("seed", [1.5, "0", True], ids=["float", "str", "bool"])
def test_check_batch_independence_seed_must_be_an_int(seed):
    # regression: seed=1.5 surfaced as torch's "manual_seed expected a long" from deep inside
    with pytest.raises(TypeError, match=f"seed must be an int, got {seed!r}"):
        check_batch_independence(mlp("layer"), torch.randn(8, 8), seed=seed)


# ---------------------------------------------------------------------------------------------
# ActivationStats
# ---------------------------------------------------------------------------------------------


def test_activation_stats_values_match_direct_computation():
    model = mlp("layer")
    x = torch.randn(7, 8)
    with ActivationStats(model) as stats:
        out = model(x)
        out.sum().backward()
    s = stats.summary()
    assert set(s) == {"0", "1", "2", "3"}  # the leaves
    h = model[0](x)
    assert s["0"]["mean"] == pytest.approx(h.mean().item(), rel=1e-5, abs=1e-7)
    assert s["0"]["std"] == pytest.approx(h.std(unbiased=False).item(), rel=1e-5)
    assert s["0"]["max_abs"] == pytest.approx(h.abs().max().item(), rel=1e-6)
    # d(sum out)/d out is all ones: norm sqrt(numel), rms 1
    assert s["3"]["grad_norm"] == pytest.approx(math.sqrt(7 * 4))
    assert s["3"]["grad_rms"] == pytest.approx(1.0)
    assert s["1"]["type"] == "LayerNorm" and s["1"]["calls"] == 1


def test_activation_stats_costs_nothing_outside_the_block():
    model = mlp("batch")
    with ActivationStats(model, grads=True):
        assert any(m._forward_hooks for m in model.modules())
    assert not any(m._forward_hooks for m in model.modules())
    stats = ActivationStats(model)
    model(torch.randn(4, 8))  # not entered: nothing recorded
    assert stats.summary() == {}


def test_activation_stats_selection_by_type_and_name():
    model = mlp("layer")
    with ActivationStats(model, modules=nn.LayerNorm, grads=False) as s1:
        model(torch.randn(3, 8))
    assert list(s1.summary()) == ["1"] and "grad_norm" not in s1.summary()["1"]
    with ActivationStats(model, modules=["0", ""]) as s2:
        model(torch.randn(3, 8))
    assert set(s2.summary()) == {"0", ""}
    with pytest.raises(ValueError, match="not found"):
        ActivationStats(model, modules=["nope"])
    with pytest.raises(TypeError, match="modules"):
        ActivationStats(model, modules=3)


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "time_first"])
def test_activation_stats_per_time_step_for_lstm(batch_first):
    lstm = nn.LSTM(3, 6, batch_first=batch_first)
    x = torch.randn(4, 5, 3) if batch_first else torch.randn(5, 4, 3)
    with ActivationStats(lstm) as stats:
        out, _ = lstm(x)
        out.square().sum().backward()
    s = stats.summary()[""]
    time_dim = 1 if batch_first else 0
    assert len(s["time"]["mean"]) == 5
    for t in range(5):
        step = out.detach().select(time_dim, t)
        assert s["time"]["std"][t] == pytest.approx(step.std(unbiased=False).item(), rel=1e-5)
        # the gradient of sum(out^2) is 2 out
        assert s["time"]["grad_rms"][t] == pytest.approx(2 * step.square().mean().sqrt().item(), rel=1e-5)


def test_activation_stats_jsonl_and_reset(tmp_path):
    model = mlp("none")
    path = tmp_path / "stats.jsonl"
    with ActivationStats(model) as stats:
        model(torch.randn(2, 8)).sum().backward()
        assert stats.to_jsonl(path, extra={"step": 1}) == 4
        stats.reset()
        assert stats.summary() == {}
        model(torch.randn(2, 8))
        stats.to_jsonl(path, extra={"step": 2})
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 8 and rows[0]["step"] == 1 and rows[-1]["step"] == 2
    assert {"module", "mean", "std", "max_abs", "type"} <= set(rows[0])


def test_the_tools_long_functions_are_split_into_named_steps():
    """Issue 12: audit_model, check_batch_independence and the lab's run read in one screen."""
    import inspect

    from lnorm import audit, diagnostics
    from lnorm.lab import runner

    for fn in (audit.audit_model, diagnostics.check_batch_independence, runner.run):
        lines = len(inspect.getsourcelines(fn)[0])
        assert lines <= 80, f"{fn.__module__}.{fn.__name__}: {lines} lines"


def test_current_mode_on_a_training_model_does_not_read_dropout_as_batch_dependence():
    # mode="current" kept dropout's random masks on: a model without any batch mixing was reported
    # batch dependent; the model's own modes (a frozen BN in eval here) are kept, and restored
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.BatchNorm1d(8), nn.Linear(8, 3))
    model.train()
    model[2].eval()
    report = check_batch_independence(model, torch.randn(8, 6), mode="current")
    assert report.independent and report.max_relative_change < 1e-6, report.probes  # rounding of the roll
    assert report.mode == "train"
    assert model.training and model[1].training and not model[2].training
    model[2].train()  # the same call with BN in train mode still finds it
    report = check_batch_independence(model, torch.randn(8, 6), mode="current")
    assert not report.independent and [s.name for s in report.sources] == ["2"]


# From a review: one NaN in x (or a model whose output is NaN) was reported as batch dependence
# (max_relative_change inf, "no single module") and as a train/eval gap.


def test_a_non_finite_input_is_refused_not_reported_as_batch_dependence():
    m = nn.Sequential(nn.Linear(8, 4))
    x = torch.randn(8, 8)
    x[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"x holds 1 non-finite value\(s\)"):
        check_batch_independence(m, x)
    x[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"x holds 1 non-finite value\(s\)"):
        train_eval_gap(m, x)


def test_a_model_with_non_finite_output_is_refused():
    m = nn.Sequential(nn.Linear(8, 4))
    with torch.no_grad():
        m[0].bias[1] = float("nan")
    with pytest.raises(ValueError, match=r"the model's output in train mode holds 8 non-finite"):
        check_batch_independence(m, torch.randn(8, 8))
    with pytest.raises(ValueError, match=r"the model's output in eval mode holds 8 non-finite"):
        train_eval_gap(m, torch.randn(8, 8))
    with pytest.raises(ValueError, match=r"the model's output holds 8 non-finite"):
        check_batch_independence(m, torch.randn(8, 8), mode="current")


def test_to_jsonl_extra_must_not_overwrite_the_columns(tmp_path):
    # extra={"module": ...} overwrote every line's module name: the rows could not be told apart
    m = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with ActivationStats(m) as stats:
        m(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"extra must not use the names of the columns.*\['module'\]"):
        stats.to_jsonl(tmp_path / "s.jsonl", extra={"module": "X"})
    assert not (tmp_path / "s.jsonl").exists()
    assert stats.to_jsonl(tmp_path / "s.jsonl", extra={"step": 3}) >= 1
    rows = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len({r["module"] for r in rows}) == len(rows) and all(r["step"] == 3 for r in rows)


@pytest.mark.parametrize("modules, message", [
    ([], "modules must name at least one submodule"), ((), "modules must name at least one submodule"),
    (nn.Conv2d, "modules: no submodule of the model is a"),
])
def test_activation_stats_refuses_a_selection_that_watches_nothing(modules, message):
    # an empty list, an empty tuple or a type with no match silently watched nothing
    with pytest.raises(ValueError, match=message):
        ActivationStats(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), modules=modules)
