"""``lnorm audit`` through the CLI on the example model files in tests/audit_models."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

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
    assert gap["claims"] == ["C2"] and "convert_norms" in gap["advice"][0]
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
