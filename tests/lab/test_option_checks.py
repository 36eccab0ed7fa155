"""`lnorm lab run` options checked before anything runs: a backend that would not run where the
lab runs, empty tuples, names an experiment does not know. Each is one line, exit status 2, and
no run directory; the backend a run records is the one that ran."""

import dataclasses
import json
import typing

import pytest

from lnorm.cli import main
from lnorm.lab import config as LC
from lnorm.lab import experiments, runner
from lnorm.ops import backend as B

E1_TINY = ["e1", "--suite", "smoke", "--no-progress", "--jobs", "1", "--set", "e1.norms=layer",
           "--set", "e1.batch_sizes=32"]


def run_cli(capsys, *argv):
    code = main(["lab", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def refused(code: int, err: str) -> bool:
    return code == 2 and err.startswith("lnorm lab run: error: ") and err.count("\n") == 1 \
        and "Traceback" not in err


# --backend


@pytest.fixture
def fake_backends():
    """Two backends the lab cannot use on CPU: one for CUDA tensors only, one not available."""
    B.register_backend(B.Backend("cudaonly", available=lambda: True, supports=lambda d: d.type == "cuda"))
    B.register_backend(B.Backend("missing", available=lambda: False, supports=lambda d: True))
    try:
        yield
    finally:
        B.unregister_backend("cudaonly")
        B.unregister_backend("missing")


@pytest.mark.parametrize("name, needle", [("cudaonly", "does not run on --device cpu"),
                                          ("missing", "not available here")])
def test_a_backend_that_cannot_run_on_the_device_is_refused(fake_backends, tmp_path, capsys, name, needle):
    # a CUDA-only backend on a CPU run fell back to another quietly, and the run recorded its name
    code, out, err = run_cli(capsys, "run", *E1_TINY, "--backend", name, "--out", tmp_path / "r")
    assert refused(code, err), err
    assert f"--backend {name}" in err and needle in err and out == ""
    assert not (tmp_path / "r").exists()
    if name == "cudaonly":
        assert "valid for --device cpu: auto, torch" in err


@pytest.mark.skipif(not B.triton_available() or B.triton_interpreted(),
                    reason="needs triton installed and not under its CPU interpreter")
def test_triton_on_a_cpu_run_is_refused(tmp_path, capsys):
    code, _, err = run_cli(capsys, "run", "sanity", "--suite", "smoke", "--jobs", "1", "--no-progress",
                           "--backend", "triton", "--out", tmp_path / "r")
    assert refused(code, err) and "--backend triton does not run on --device cpu" in err, err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("choice", ["auto", "torch"])
def test_the_recorded_backend_is_the_one_that_ran(tmp_path, capsys, choice):
    with B.use_backend(choice):
        ran = B.backend_for("cpu")
    out = tmp_path / "r"
    code, _, err = run_cli(capsys, "run", *E1_TINY, "--backend", choice, "--out", out)
    assert code == 0, err
    env = json.loads((out / "env.json").read_text())
    assert env["backend"] == ran and env["invocations"][-1]["backend"] == ran
    assert f"--backend {choice}" in env["command"]  # the command as given
    assert f"- **lnorm backend**: {ran}\n" in (out / "report.md").read_text()


def test_runs_on_names_the_backend_of_the_device():
    assert runner.runs_on("torch", "cpu") == "torch"
    with B.use_backend("auto"):
        assert runner.runs_on("auto", "cpu") == B.backend_for("cpu")


# empty tuples


@pytest.mark.parametrize("setting", ["e1.batch_sizes=", "e1.norms= , ", "batch_sizes=", "e3.tasks=",
                                     "e4.lrs=", "e6.archs="])
def test_an_empty_tuple_is_refused(tmp_path, capsys, setting):
    # e1.batch_sizes= planned 0 runs and exited 0
    exp = setting.split(".")[0] if "." in setting else "e1"
    code, out, err = run_cli(capsys, "run", exp, "--suite", "smoke", "--no-progress", "--set", setting,
                             "--out", tmp_path / "r")
    assert refused(code, err), err
    assert "expected one or more comma-separated values" in err and out == ""
    assert not (tmp_path / "r").exists()


def test_an_empty_tuple_is_accepted_where_it_means_something():
    cfgs = runner.resolve_all(["e5", "e7", "e9"], "smoke", ["e5.lrs=", "e7.gains=", "e9.orders="])
    assert cfgs["e5"].lrs == () and cfgs["e7"].gains == () and cfgs["e9"].orders == ()
    assert {u.params["part"] for u in runner.plan("e7", cfgs["e7"], 1)} == {"lr"}


def test_settings_that_leave_an_experiment_no_runs_are_refused(tmp_path, capsys):
    code, _, err = run_cli(capsys, "run", "e7", "--suite", "smoke", "--no-progress", "--set", "e7.gains=",
                           "--set", "e7.lrs=", "--out", tmp_path / "r")
    assert refused(code, err) and "e7: no runs to do" in err, err
    assert not (tmp_path / "r").exists()


# names in string fields


@pytest.mark.parametrize("setting, valid", [
    ("e1.norms=bogus", "layer, rms, batch, group, none"), ("e1.norms=layer,bogus", "layer, rms"),
    ("norms=bogus", "layer, rms"), ("e2.norms=bogus", "layer, rms"), ("e3.gain_init=two", "one, 0.1, random"),
    ("e3.models=lstm,bogus", "lstm, lnlstm, gru, lngru"), ("e3.tasks=bogus", "lm, mnist1d"),
    ("e4.variants=bogus", "postln, preln, prerms, prebn, none"), ("e5.norms=bogus", "layer, rms"),
    ("e6.archs=bogus", "mlp, transformer, lstm, gru"), ("e7.gains=bogus", "one, 0.1, random"),
    ("e7.norms=bogus", "layer, rms"), ("e8.act=bogus", "relu, tanh"), ("e8.optimizer=bogus", "adam, sgd"),
    ("e8.baseline_inits=bogus", "default, xavier, orthogonal"), ("e9.orders=bogus", "pixel, permuted"),
    ("e9.extrapolate_orders=bogus", "pixel, permuted"), ("e9.models=bogus", "lstm, lnlstm, bnlstm"),
    ("ddp.norms=bogus", "batch, sync, layer, none"), ("retrieval.models=bogus", "order-gru, order-ln_gru"),
])
def test_unknown_names_are_refused_before_the_run(tmp_path, capsys, setting, valid):
    # e1.norms=bogus started the run; every unit then failed and the exit status was 1
    exp = setting.split(".")[0] if "." in setting.split("=")[0] else "e1"
    field = setting.split("=")[0].split(".")[-1]
    code, out, err = run_cli(capsys, "run", exp, "--suite", "smoke", "--no-progress", "--set", setting,
                             "--out", tmp_path / "r")
    assert refused(code, err), err
    assert f"--set {exp}.{field}: unknown name" in err and valid in err and out == ""
    assert "'bogus'" in err or "'two'" in err
    assert not (tmp_path / "r").exists()


def _string_fields(mod) -> list[str]:
    hints = typing.get_type_hints(mod.Config)
    return [f.name for f in dataclasses.fields(mod.Config)
            if hints[f.name] is str or typing.get_args(hints[f.name])[:1] == (str,)]


@pytest.mark.parametrize("name", experiments.names())
def test_every_string_field_has_its_names_and_every_suite_uses_them(name):
    mod = experiments.get(name)
    assert sorted(getattr(mod, "CHOICES", {})) == sorted(_string_fields(mod))
    assert set(getattr(mod, "MAY_BE_EMPTY", ())) <= {f.name for f in dataclasses.fields(mod.Config)}
    for suite in LC.SUITES:
        LC.resolve(mod, suite)  # the suites' own names pass the check
