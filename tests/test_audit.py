"""``lnorm audit`` through the CLI on the example model files in tests/audit_models."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from interruptible import interruptible
from lnorm.audit import audit_model
from lnorm.cli import main

MODELS = Path(__file__).parent / "audit_models"


def audit(capsys, *args):
    code = main(["audit", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def audit_json(capsys, *args):
    code, out, err = audit(capsys, *args, "--json")
    return code, json.loads(out)


def levels(result):
    return {f["id"]: f["level"] for f in result["findings"]}


def test_cnn_with_batch_norm(capsys):
    code, r = audit_json(capsys, f"{MODELS}/cnn_bn.py:make_model", "--input-shape", "3,16,16", "--batch-size", "16")
    assert code == 1 and r["flagged"]
    assert [(n["name"], n["type"], n["input_shape"]) for n in r["norm_layers"]] == [
        ("1", "BatchNorm2d", [16, 16, 16, 16]), ("5", "BatchNorm2d", [16, 32, 8, 8])]
    lv = levels(r)
    assert lv["batch-independence-eval"] == "ok"
    assert lv["batch-dependence-train"] == "info"  # batch norm's nature, not a defect
    assert lv["train-eval-gap"] == "flag" and lv["small-batch"] == "ok"
    gap = next(f for f in r["findings"] if f["id"] == "train-eval-gap")
    assert gap["evidence"]["layers"][0]["input_gap"] == 0.0 and gap["evidence"]["layers"][0]["output_gap"] > 0.1
    # a CNN at batch size 16: the article's advice keeps batch norm (C7), never layer norm
    assert gap["claims"] == ["C2"] and "Keep batch norm" in gap["advice"][0] and "'layer'" not in gap["advice"][0]
    train = next(f for f in r["findings"] if f["id"] == "batch-dependence-train")
    assert [s["name"] for s in train["evidence"]["sources"]] == ["1"]


def test_cnn_small_batch_flagged_in_text_output(capsys):
    code, out, err = audit(capsys, f"{MODELS}/cnn_bn.py:make_model", "--input-shape", "3,16,16", "--batch-size", "2")
    assert code == 1 and err == ""
    assert "FLAG  batch norm with small batches  [C3]" in out
    assert "will see batches of 2 samples (below 16)" in out
    assert "BatchNorm2d" in out and out.rstrip().endswith("(exit status 1)")


def test_plain_lstm_flagged_layer_norm_lstm_clean(capsys):
    args = ["--input-shape", "6,8", "--batch-size", "8"]
    code, r = audit_json(capsys, f"{MODELS}/rnn_lstm.py:make_model", *args)
    assert code == 1 and r["flagged_ids"] == ["rnn-without-norm"]
    assert r["recurrent_layers"] == [{"name": "rnn", "type": "LSTM", "normalized": False, "input_shape": [8, 6, 8]}]
    code, r = audit_json(capsys, f"{MODELS}/rnn_lstm.py:make_ln_model", *args)
    assert code == 0 and not r["flagged"]
    assert r["recurrent_layers"][0]["normalized"]


def test_transformer_layer_norm_clean_batch_norm_flagged(capsys):
    args = ["--input-shape", "6", "--int-high", "50", "--batch-size", "8"]
    code, r = audit_json(capsys, f"{MODELS}/transformer_ln.py:make_model", *args)
    assert code == 0 and r["input_dtype"] == "int64" and len(r["norm_layers"]) == 5
    code, r = audit_json(capsys, f"{MODELS}/transformer_ln.py:make_bn_model", *args)
    assert code == 1 and "bn-in-transformer" in r["flagged_ids"]


def test_gradient_scale_deep_mlp(capsys):
    code, r = audit_json(capsys, f"{MODELS}/deep_mlp.py:make_model", "--input-shape", "16", "--batch-size", "8")
    assert code == 1 and r["flagged_ids"] == ["gradient-scale"]
    ev = next(f for f in r["findings"] if f["id"] == "gradient-scale")["evidence"]
    # vanishing: the smallest relative gradient is in the first half of the 12 hidden layers
    assert ev["ratio"] > 1e3 and int(ev["smallest"]) < 12 and int(ev["largest"]) > 12
    code, r = audit_json(capsys, f"{MODELS}/deep_mlp.py:make_ln_model", "--input-shape", "16", "--batch-size", "8")
    assert code == 0


def test_module_target_and_input_file(capsys, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(MODELS))
    x = torch.randn(10, 6, 8)
    torch.save(x, tmp_path / "x.pt")
    code, r = audit_json(capsys, "rnn_lstm:make_ln_model", "--input", tmp_path / "x.pt", "--batch-size", "6")
    assert code == 0 and r["input_shape"] == [6, 6, 8]


def test_audit_leaves_model_untouched():
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    audit_model(model, torch.randn(8, 6))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in sd.items())
    assert all(p.grad is None for p in model.parameters()) and model.training


@pytest.mark.parametrize("target,args,message", [
    ("broken.py:make_model", ["--input-shape", "2"], "importing {M}/broken.py failed: RuntimeError: this model file is broken on purpose"),
    ("not_a_module.py:make_model", ["--input-shape", "2"], "make_model() from {M}/not_a_module.py returned a int, not a torch.nn.Module"),
    ("not_a_module.py:make_failing", ["--input-shape", "2"], "calling make_failing() from {M}/not_a_module.py failed: ValueError: hidden_size must be positive"),
    ("cnn_bn.py:make_modle", ["--input-shape", "2"], "has no 'make_modle'; callables defined there: make_model"),
    ("missing.py:make_model", ["--input-shape", "2"], "no such file"),
    ("cnn_bn.py", ["--input-shape", "2"], "TARGET must be path/to/file.py:factory"),
    ("cnn_bn.py:make_model", ["--input-shape", "3,8"], "the model rejected an input of shape [32, 3, 8] (float32): RuntimeError"),
    ("cnn_bn.py:make_model", ["--input-shape", "a,b"], "--input-shape must be comma-separated positive ints"),
    ("cnn_bn.py:make_model", [], "give the input: --input-shape"),
    ("cnn_bn.py:make_model", ["--input-shape", "3,8,8", "--batch-size", "0"], "--batch-size must be a positive"),
], ids=["import-fails", "not-a-module", "factory-raises", "missing-factory", "missing-file", "no-colon",
        "shape-rejected", "bad-shape", "no-input", "bad-batch-size"])
def test_errors_are_one_paragraph_exit_2(capsys, target, args, message):
    path = target if target == "cnn_bn.py" else f"{MODELS}/{target}"
    code, out, err = audit(capsys, path, *args)
    assert code == 2 and out == ""
    assert message.format(M=MODELS) in err
    assert err.startswith("lnorm audit: error: ") and err.count("\n") == 1  # one paragraph
    assert "Traceback" not in err and "--debug" in err


def test_syntax_error_and_debug_traceback(capsys, tmp_path):
    bad = tmp_path / "bad_syntax.py"
    bad.write_text("def make_model(:\n    pass\n")
    code, out, err = audit(capsys, f"{bad}:make_model", "--input-shape", "2")
    assert code == 2 and "SyntaxError" in err and "Traceback" not in err
    code, out, err = audit(capsys, f"{bad}:make_model", "--input-shape", "2", "--debug")
    assert code == 2 and "Traceback" in err


@pytest.mark.slow
def test_console_entry_point_runs_as_module():
    proc = subprocess.run([sys.executable, "-m", "lnorm", "audit", f"{MODELS}/rnn_lstm.py:make_model",
                           "--input-shape", "6,8", "--batch-size", "4"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "FLAG  recurrent layers without normalization  [C4]" in proc.stdout


# the exit-status contract: 0 ran and flagged nothing, 1 findings only, 2 anything else


def _one_paragraph_error(code, out, err):
    assert code == 2 and out == "", (code, out, err)
    assert err.startswith("lnorm audit: error: ") and err.count("\n") == 1 and "Traceback" not in err, err


def test_model_failing_only_in_training_mode_is_a_finding(capsys):
    code, r = audit_json(capsys, f"{MODELS}/hostile.py:make_bn_mlp", "--input-shape", "8", "--batch-size", "1")
    assert code == 1
    lv = levels(r)
    assert lv["train-mode-fails"] == "flag" and lv["small-batch"] == "flag"
    fail = next(f for f in r["findings"] if f["id"] == "train-mode-fails")
    assert "Expected more than 1 value per channel" in fail["summary"] and fail["claims"] == ["C3"]
    assert "train-eval-gap" not in lv and "gradient-scale" not in lv  # they need training mode


@pytest.mark.parametrize("factory, needle", [
    ("hostile.py:make_exit0", "make_exit0() from {M}/hostile.py failed: the code called sys.exit(0)"),
    ("hostile.py:make_exit7", "the code called sys.exit(7)"),
    ("exits_on_import.py:make_model", "importing {M}/exits_on_import.py failed: the code called sys.exit(0)"),
    ("hostile.py:make_breaks_in_backward", "the audit could not run the model: RuntimeError: this backward fails"),
], ids=["factory-exit-0", "factory-exit-7", "import-exit-0", "fails-in-a-probe"])
def test_sys_exit_and_failures_in_the_audit_exit_2(capsys, factory, needle):
    code, out, err = audit(capsys, f"{MODELS}/{factory}", "--input-shape", "8")
    _one_paragraph_error(code, out, err)
    assert needle.format(M=MODELS) in err


def test_non_python_target_file_exits_2(capsys, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("root:x:0:0:root:/root:/bin/bash\n")
    for target in [f"{notes}:make", *(["/etc/passwd:make"] if Path("/etc/passwd").is_file() else [])]:
        code, out, err = audit(capsys, target, "--input-shape", "8")
        _one_paragraph_error(code, out, err)
        assert "is not a Python source file" in err


def test_input_too_large_to_allocate_exits_2(capsys):
    code, out, err = audit(capsys, f"{MODELS}/cnn_bn.py:make_model", "--input-shape", "100000,100000,100000")
    _one_paragraph_error(code, out, err)
    assert "could not create an input of shape [32, 100000, 100000, 100000]" in err


@pytest.mark.parametrize("shape", ["3,,4", "8,", ",8", "8x", "x8", "3, ,4", "-3", "3.5"])
def test_malformed_input_shape_exits_2(capsys, shape):
    code, out, err = audit(capsys, f"{MODELS}/cnn_bn.py:make_model", "--input-shape", shape)
    _one_paragraph_error(code, out, err)
    assert "--input-shape must be comma-separated positive ints" in err and repr(shape) in err


def test_text_file_as_input_exits_2(capsys, tmp_path):
    text = tmp_path / "batch.txt"
    text.write_text("hello, this is not a tensor\n")
    code, out, err = audit(capsys, f"{MODELS}/cnn_bn.py:make_model", "--input", text)
    _one_paragraph_error(code, out, err)
    assert f"could not load --input {str(text)!r}: it must be a file written by torch.save" in err


def test_timeout_ends_a_model_that_never_returns(capsys):
    code, out, err = audit(capsys, f"{MODELS}/hostile.py:make_hang", "--input-shape", "8", "--timeout", "0.5")
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert "did not finish within --timeout 0.5 s" in err


def test_timeout_has_a_default_and_is_checked(capsys):
    import argparse

    from lnorm.audit import DEFAULT_TIMEOUT, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    assert parser.parse_args(["audit", "m.py:f"]).timeout == DEFAULT_TIMEOUT > 0
    code, out, err = audit(capsys, f"{MODELS}/cnn_bn.py:make_model", "--input-shape", "3,8,8", "--timeout", "-1")
    _one_paragraph_error(code, out, err)
    assert "--timeout must be" in err


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process")
def test_ctrl_c_prints_one_line_and_exits_2(tmp_path):
    import os
    import signal
    import time

    marker = tmp_path / "in_forward"
    proc = subprocess.Popen(interruptible([sys.executable, "-m", "lnorm", "audit", f"{MODELS}/hostile.py:make_hang",
                                           "--input-shape", "8"]), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True,
                            env={**os.environ, "LNORM_AUDIT_TEST_MARKER": str(marker),
                                 "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        for _ in range(6000):  # the model is running: its forward has started
            if marker.exists() or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert marker.exists(), proc.communicate()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 2 and out == "", (proc.returncode, out, err)
    assert err == "lnorm audit: interrupted (Ctrl-C); nothing was audited\n"


def test_help_and_readme_say_that_the_target_is_imported_and_run(capsys):
    with pytest.raises(SystemExit) as info:
        main(["audit", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "imports that file or module, which runs its code, and calls ``factory()``" in text
    assert "audit only code you trust" in text
    readme = " ".join((Path(__file__).parents[1] / "README.md").read_text().split())
    assert "imports the target's file or module, which runs its code, and calls the named callable" in readme


# advice follows the architecture and the batch size


class _Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return (self.bn2(self.conv2(self.bn1(self.conv1(x)).relu())) + x).relu()


def small_resnet() -> nn.Module:
    """resnet18's pattern (conv-BN stem, residual blocks with batch norm, pooled linear head), small."""
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         _Block(16), _Block(16), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def _advice(result) -> str:
    return " ".join(a for f in result["findings"] for a in f["advice"])


def test_cnn_with_batch_norm_at_normal_batch_size_is_not_advised_layer_norm():
    torch.manual_seed(0)
    r = audit_model(small_resnet(), torch.randn(32, 3, 16, 16))
    assert r["architecture"] == "CNN"
    advice = _advice(r)
    assert "target='layer'" not in advice and "add layer norm" not in advice, advice
    assert "Keep batch norm" in advice  # the train/eval gap of a fresh model: settle the statistics
    arch = next(f for f in r["findings"] if f["id"] == "architecture")
    assert arch["claims"] == ["C7"]


def test_cnn_with_small_batches_is_advised_group_norm():
    torch.manual_seed(0)
    r = audit_model(small_resnet(), torch.randn(4, 3, 16, 16))
    assert "small-batch" in r["flagged_ids"]
    advice = _advice(r)
    assert "target='group'" in advice and "target='layer'" not in advice, advice


def test_mlp_with_batch_norm_keeps_it_at_normal_batch_size_and_converts_when_small():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    big = audit_model(model, torch.randn(32, 8) * 3 + 1)
    assert "Keep batch norm" in _advice(big) and "(C6)" in _advice(big)
    small = audit_model(model, torch.randn(4, 8) * 3 + 1)
    assert "target='layer'" in _advice(small) and "Keep batch norm" not in _advice(small)


# regressions: the gradient check, values per channel, checked arguments, the help, LN-RNNs


class _DeadBranch(nn.Module):
    """``b``'s output is multiplied by zero: its weights get an all-zero gradient."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.c(self.a(x) + 0 * self.b(x))


def test_layer_with_zero_gradient_is_flagged_by_name():
    # regression: layers whose gradient was all zero were left out of the ratio and the check
    # said "ok": a layer that cannot train went unreported
    r = audit_model(_DeadBranch(), torch.randn(16, 8))
    f = next(f for f in r["findings"] if f["id"] == "gradient-scale")
    assert f["level"] == "flag" and "gradient-scale" in r["flagged_ids"]
    assert "b (all-zero gradient)" in f["summary"] and f["evidence"]["zero_gradient"] == ["b"]
    assert f["evidence"]["layers"]["b"]["problem"] == "all-zero gradient"
    assert f["evidence"]["largest"] in ("a", "c") and f["evidence"]["smallest"] in ("a", "c")


def test_no_gradient_at_all_is_flagged_not_dropped():
    class Detached(nn.Module):  # nothing reaches the weights: the check used to vanish
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 2)

        def forward(self, x):
            return self.lin(x).detach()

    r = audit_model(Detached(), torch.randn(16, 8))
    f = next(f for f in r["findings"] if f["id"] == "gradient-scale")
    assert f["level"] == "flag" and "lin (no gradient reaches it)" in f["summary"]
    assert f["evidence"]["ratio"] is None


class _TimeFoldedBatchNorm(nn.Module):
    """(T, B, C) with time folded into the batch: the batch norm sees T * B rows."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        T, B, C = x.shape
        return self.bn(x.reshape(T * B, C)).reshape(T, B, C)


class _PerSampleBatchNorm(nn.Module):
    """The batch norm runs on one sample at a time: it sees 1 * L values per channel."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        return torch.cat([self.bn(xi.unsqueeze(0)) for xi in x])


@pytest.mark.parametrize("model, x, batch_dim, expected", [
    (_TimeFoldedBatchNorm(), torch.randn(10, 2, 4), 1, 20),
    (_PerSampleBatchNorm(), torch.randn(4, 4, 3), 0, 3),
], ids=["time-folded", "per-sample"])
def test_values_per_channel_come_from_the_layers_own_input(model, x, batch_dim, expected):
    # regression: computed as the input's batch size times the layer input's spatial size, which
    # was 2 for the time-folded layer (it sees 20) and 12 for the per-sample one (it sees 3)
    r = audit_model(model, x, batch_dim=batch_dim)
    f = next(f for f in r["findings"] if f["id"] == "small-batch")
    assert [row["values_per_channel"] for row in f["evidence"]["layers"]] == [expected]
    assert f"the fewest values per channel: {expected} at bn" in f["summary"]


def test_masked_batch_norm_counts_the_valid_positions():
    from lnorm.nn import MaskedBatchNorm

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = MaskedBatchNorm(4)

        def forward(self, x):
            mask = torch.zeros(x.shape[:-1], dtype=torch.bool)
            mask[:, :2] = True  # 2 valid steps of 6
            return self.bn(x, mask=mask)

    r = audit_model(Masked(), torch.randn(4, 6, 4))
    f = next(f for f in r["findings"] if f["id"] == "small-batch")
    assert f["evidence"]["layers"][0]["values_per_channel"] == 4 * 2


@pytest.mark.parametrize("kwargs, exc, message", [
    ({"model": "net"}, TypeError, "model must be a torch.nn.Module, got str"),
    ({"x": [[1.0] * 8]}, TypeError, "x must be a torch.Tensor"),
    ({"batch_dim": 1.0}, TypeError, "batch_dim must be an int, got 1.0"),
    ({"batch_dim": 2}, ValueError, "batch_dim=2 is out of range for x of shape [8, 8]"),
    ({"small_batch": "16"}, TypeError, "small_batch must be an int, got '16'"),
    ({"small_batch": 0}, ValueError, "small_batch must be a positive number of samples, got 0"),
    ({"gap_tol": "0.1"}, TypeError, "gap_tol must be a number, got '0.1'"),
    ({"gap_tol": -0.5}, ValueError, "gap_tol must be a number >= 0, got -0.5"),
    ({"gap_tol": float("nan")}, ValueError, "gap_tol must be a number >= 0, got nan"),
    ({"grad_ratio": True}, TypeError, "grad_ratio must be a number, got True"),
    ({"grad_ratio": 0.5}, ValueError, "grad_ratio must be a number >= 1, got 0.5"),
    ({"grad_ratio": float("nan")}, ValueError, "grad_ratio must be a number >= 1, got nan"),
    ({"seed": 1.5}, TypeError, "seed must be an int, got 1.5"),
], ids=["model", "x", "batch_dim-float", "batch_dim-range", "small_batch-str", "small_batch-0", "gap_tol-str",
        "gap_tol-negative", "gap_tol-nan", "grad_ratio-bool", "grad_ratio-below-1", "grad_ratio-nan", "seed-float"])
def test_audit_model_checks_its_arguments(kwargs, exc, message):
    # regression: a NaN or negative threshold ran a misleading audit; other bad values failed deep
    # inside with messages that named neither the argument nor the value
    args = {"model": nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)), "x": torch.randn(8, 8), **kwargs}
    with pytest.raises(exc) as info:
        audit_model(args.pop("model"), args.pop("x"), **args)
    assert message in str(info.value)


def test_audit_model_leaves_the_global_rng_alone():
    class Noise(nn.Module):
        def forward(self, x):
            return x + 1e-3 * torch.randn_like(x) if self.training else x

    model, x = nn.Sequential(nn.Linear(8, 8), Noise(), nn.LayerNorm(8)), torch.randn(8, 8)
    state = torch.get_rng_state()
    audit_model(model, x)
    assert torch.equal(torch.get_rng_state(), state)


def test_grad_ratio_help_names_what_is_compared(capsys):
    # regression: the help said "gradient RMS"; the check compares ||dL/dW|| / ||W|| per layer
    with pytest.raises(SystemExit):
        main(["audit", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "||dL/dW|| / ||W||, spans more than this factor across layers" in text
    assert "gradient RMS" not in text


def test_layer_norm_lstm_counts_as_layer_normalization_in_the_architecture_line():
    # regression: "a recurrent model with normalization: none" for a LayerNormLSTM
    from lnorm.nn import LayerNormLSTM

    r = audit_model(LayerNormLSTM(4, 8, batch_first=True), torch.randn(8, 5, 4))
    arch = next(f for f in r["findings"] if f["id"] == "architecture")
    assert arch["summary"] == "a recurrent model with normalization: layer"
    assert arch["evidence"]["norm_kinds"] == ["layer"] and arch["claims"] == ["C11"]


# From a review: one NaN in the input file gave batch-dependence, gap and gradient findings, exit 1.


def test_a_non_finite_input_or_output_is_an_error_not_findings(capsys, tmp_path):
    x = torch.randn(8, 16)
    x[0, 0] = float("nan")
    torch.save(x, tmp_path / "x.pt")
    code, out, err = audit(capsys, f"{MODELS}/deep_mlp.py:make_ln_model", "--input", tmp_path / "x.pt")
    assert code == 2 and "the input holds 1 non-finite value(s)" in err and not out
    with pytest.raises(ValueError, match=r"x holds 1 non-finite value\(s\)"):
        audit_model(nn.Sequential(nn.Linear(16, 2)), x)
    (tmp_path / "nan_model.py").write_text(
        "import torch\nfrom torch import nn\n\ndef make():\n    m = nn.Linear(16, 2)\n"
        "    with torch.no_grad():\n        m.bias.fill_(float('nan'))\n    return m\n")
    code, out, err = audit(capsys, f"{tmp_path}/nan_model.py:make", "--input-shape", "16")
    assert code == 2 and "the model's output (eval mode) holds" in err and not out


def test_int_high_with_an_input_file_is_an_error_not_ignored(capsys, tmp_path):
    torch.save(torch.randn(8, 16), tmp_path / "x.pt")
    code, out, err = audit(capsys, f"{MODELS}/deep_mlp.py:make_ln_model", "--input", tmp_path / "x.pt",
                           "--int-high", "3")
    assert code == 2 and "--int-high draws a generated input's token ids" in err and not out
