"""``lnorm audit TARGET``: what normalization a model uses, and what the article says about it.

TARGET is ``path/to/file.py:factory`` or ``package.module:factory``. Audit imports that file or
module, which runs its code, and calls ``factory()`` (any callable taking no arguments: a
function or a module class) for the ``nn.Module`` to audit: audit only code you trust, as you
would run it. The input is random (``--input-shape``, the shape of one sample) or a saved tensor
(``--input FILE.pt``).

Findings, each with the evidence behind it and the advice that applies (claims C1-C13 of the
product map):

* normalization and recurrent layers found, with the input shape each one sees;
* batch dependence at inference (flagged: a sample's prediction depends on its batch) and in
  training (reported: batch norm's nature; flagged only when something else mixes samples);
* the train/eval gap of the output, per normalization layer (flagged above ``--gap-tol``);
* batch norm layers that will see small batches (flagged below ``--small-batch`` samples);
* recurrent layers without normalization (flagged); batch norm next to attention (flagged);
* the per-layer gradient scale ``||dL/dW|| / ||W||``, flagged when it spans more than
  ``--grad-ratio`` or when a layer's weights get a zero or non-finite gradient;
* norm gains that are not 1 or biases that are not 0 (reported).

Exit status: 0 the audit ran and flagged nothing, 1 it flagged something, 2 anything else (bad
arguments, a TARGET that fails to import or load, a factory that is missing, fails, calls
``sys.exit`` or returns something else, an input the model rejects or that cannot be allocated,
a model that fails in a probe, ``--timeout``, Ctrl-C). Errors are one paragraph; ``--debug``
shows the traceback. A model that runs in evaluation but fails in training mode (batch norm on
one sample) is a finding, not an error.

``audit_model(model, x)`` is the same audit as a function returning plain data;
``format_report`` turns that into the text the CLI prints.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import math
import numbers
import os
import re
import signal
import sys
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from lnorm.diagnostics import ActivationStats, check_batch_independence, train_eval_gap
from lnorm.nn import MaskedBatchNorm
from lnorm.utils import (
    ModelState,
    first_tensor,
    is_norm_layer,
    is_recurrent_layer,
    json_safe,
    nonfinite_count,
    preserved_rng,
    set_mode,
)

__all__ = ["AuditError", "audit_model", "format_report", "load_target", "register", "run"]


class AuditError(Exception):
    """A usage or loading problem: printed as one paragraph, exit status 2."""


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def load_target(target: str) -> nn.Module:
    """``path/to/file.py:factory`` or ``package.module:factory`` -> the module ``factory()`` returns."""
    where, sep, attr = target.rpartition(":")
    if not sep or not where or not attr:
        raise AuditError(f"TARGET must be path/to/file.py:factory or package.module:factory, got {target!r}")
    is_file = where.endswith(".py") or os.sep in where or "/" in where
    if is_file:
        path = Path(where)
        if not path.is_file():
            raise AuditError(f"no such file: {where!r} (from TARGET {target!r})")
        name = f"_lnorm_audit_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise AuditError(f"{where} is not a Python source file (.py) (from TARGET {target!r})")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and pickling look modules up by name
        sys.path.insert(0, str(path.resolve().parent))  # so the file can import its neighbours
        try:
            spec.loader.exec_module(module)
        except (Exception, SystemExit) as exc:
            sys.modules.pop(name, None)
            raise AuditError(f"importing {where} failed: {_describe(exc)}") from exc
        finally:
            sys.path.remove(str(path.resolve().parent))
    else:
        try:
            module = importlib.import_module(where)
        except (Exception, SystemExit) as exc:
            raise AuditError(f"importing module {where!r} failed: {_describe(exc)}") from exc
    factory = getattr(module, attr, None)
    if factory is None:
        candidates = sorted(n for n, v in vars(module).items()
                            if callable(v) and not n.startswith("_") and getattr(v, "__module__", None) == module.__name__)
        raise AuditError(f"{where} has no {attr!r}; callables defined there: {', '.join(candidates) or 'none'}")
    if isinstance(factory, nn.Module):
        model = factory
    elif callable(factory):
        try:
            model = factory()
        except (Exception, SystemExit) as exc:
            raise AuditError(f"calling {attr}() from {where} failed: {_describe(exc)}") from exc
    else:
        raise AuditError(f"{where}:{attr} is a {type(factory).__name__}, not a callable returning an nn.Module")
    if not isinstance(model, nn.Module):
        raise AuditError(f"{attr}() from {where} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"the code called sys.exit({exc.code!r})"
    text = f"{type(exc).__name__}: {exc}".strip()
    return " ".join(text.split())  # one paragraph


def parse_shape(text: str) -> tuple[int, ...]:
    """``"3,32,32"`` (or ``"3x32x32"``) -> ``(3, 32, 32)``; every part a positive int."""
    parts = [p.strip() for p in re.split(r"[,x]", text)]
    if not all(p.isdigit() and int(p) > 0 for p in parts):
        raise AuditError(f"--input-shape must be comma-separated positive ints, the shape of one sample "
                         f"without the batch dim (e.g. 3,32,32), got {text!r}")
    return tuple(int(p) for p in parts)


def make_input(args) -> Tensor:
    if args.input is not None:
        return _load_input(args)
    if args.input_shape is None:
        raise AuditError("give the input: --input-shape (the shape of one sample, e.g. 3,32,32) or "
                         "--input FILE.pt (a saved batch)")
    shape = list(parse_shape(args.input_shape))
    B = args.batch_size if args.batch_size is not None else 32
    shape.insert(args.batch_dim if args.batch_dim >= 0 else len(shape) + 1 + args.batch_dim, B)
    g = torch.Generator().manual_seed(args.seed)
    try:
        if args.int_high is not None:
            return torch.randint(0, args.int_high, shape, generator=g)
        return torch.randn(shape, generator=g)
    except (RuntimeError, MemoryError) as exc:  # an allocation failure, or a size torch cannot represent
        raise AuditError(f"could not create an input of shape {shape} ({math.prod(shape):,} values): "
                         f"{_describe(exc)}") from exc


def _load_input(args) -> Tensor:
    try:
        x = torch.load(args.input, weights_only=True)
    except Exception as exc:
        raise AuditError(f"could not load --input {args.input!r}: it must be a file written by torch.save "
                         f"({_describe(exc)})") from exc
    if not isinstance(x, Tensor):
        raise AuditError(f"--input {args.input!r} must hold a single tensor (a batch), got {type(x).__name__}")
    if x.dim() == 0:
        raise AuditError(f"--input {args.input!r} holds a scalar; it must be a batch with the batch dim "
                         f"at --batch-dim {args.batch_dim}")
    if args.batch_size is not None:
        if not -x.dim() <= args.batch_dim < x.dim():
            raise AuditError(f"--batch-dim {args.batch_dim} is out of range for an input of shape {list(x.shape)}")
        if x.shape[args.batch_dim] < args.batch_size:
            raise AuditError(f"--input holds {x.shape[args.batch_dim]} samples, fewer than "
                             f"--batch-size {args.batch_size}")
        x = x.narrow(args.batch_dim, 0, args.batch_size)
    return x


# --------------------------------------------------------------------------------------------
# the audit
# --------------------------------------------------------------------------------------------

_ADVICE = {
    "C2": "Batch norm normalizes with the batch's statistics in training and with running averages "
          "in evaluation, so the two modes compute different functions; layer norm computes the "
          "same thing in both.",
    "C1": "An output that depends on the other samples of the batch makes inference results depend "
          "on how requests are batched. Find the module named in the evidence: per-sample "
          "normalization (layer, group, RMS norm) never does this.",
    "C3": "Batch norm's statistics are noisy with small batches and it cannot train at batch size "
          "1; layer norm works at any batch size. Train with larger batches or convert:",
    "C4": "Recurrent nets benefit from layer normalization: it stabilizes the hidden-state "
          "dynamics and speeds up convergence (Ba et al. 2016). Convert with "
          "lnorm.convert.lstm_to_layernorm(model) (weights kept; LN starts at gain 1, bias 0).",
    "C5": "Transformers want layer norm: batch norm is rarely used there and works poorly with "
          "attention over variable-length, padded batches. convert_norms(model, target='layer').",
    "C6": "In feed-forward nets batch norm is often as good as or better than layer norm at normal "
          "batch sizes; prefer layer norm when batches are small or vary.",
    "C7": "In CNNs batch norm usually beats layer norm at normal batch sizes; layer norm still beats "
          "no normalization. With small batches use group norm: convert_norms(model, target='group').",
    "C9": "Layer normalization speeds up convergence and helps generalization compared with no "
          "normalization, in recurrent nets and transformers most of all.",
    "C10": "The article's default is gain 1 and bias 0 at initialisation. If this is a freshly built "
           "model, a gain that is not 1 (or a bias that is not 0) is a deliberate choice; check it.",
    "C11": "Layer-normalized nets may want a higher learning rate than the unnormalized net.",
    "C13": "Normalization keeps gradients well scaled in deep nets. Gradient scales that span orders "
           "of magnitude across layers mean vanishing or exploding gradients:",
}

# The remedy the article supports for what the audit saw: in a CNN or a feed-forward net at
# normal batch sizes batch norm is the better choice (C6, C7), so the advice keeps it there.
_KEEP_BN = ("Keep batch norm: at this batch size it is the usual choice in a {arch} ({claim}). "
            "Evaluate only after its running statistics have settled on real data (train longer, or "
            "recompute them with forward passes in train mode over training batches).")
_TO_GROUP = "Convert: lnorm.convert.convert_norms(model, target='group') (per-sample, good in CNNs)."
_TO_LAYER = "Convert: lnorm.convert.convert_norms(model, target='layer')."


@dataclass(frozen=True)
class _Seen:
    """What the advice follows: the architecture and whether batches are small."""

    arch: str  # "CNN", "transformer", "recurrent" or "feed-forward"
    small_batch: bool

    def advice(self, claim: str) -> str:
        text = _ADVICE[claim]
        if claim == "C2":
            if self.arch in ("CNN", "feed-forward") and not self.small_batch:
                remedy = _KEEP_BN.format(arch=self.arch, claim="C7" if self.arch == "CNN" else "C6")
            else:
                remedy = _TO_GROUP if self.arch == "CNN" else _TO_LAYER
            text += " " + remedy
        elif claim == "C3":
            text += " " + ("convert_norms(model, target='group')" if self.arch == "CNN"
                           else "convert_norms(model, target='layer')") + "."
        elif claim == "C13":
            text += (" add batch norm after the convolutions (group norm with small batches)" if self.arch == "CNN"
                     else " add layer norm between the layers") + ", or check the initialisation."
        return f"({claim}) {text}"


def _norm_kind(m: nn.Module) -> str:
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return "batch"
    if isinstance(m, nn.GroupNorm):
        return "layer" if m.num_groups == 1 else "group"
    if isinstance(m, nn.modules.instancenorm._InstanceNorm):
        return "instance"
    if isinstance(m, nn.LayerNorm):
        return "layer"
    if is_norm_layer(m) and "RMS" in type(m).__name__:
        return "rms"
    return "other"


def _rnn_normalized(m: nn.Module) -> bool:
    return not isinstance(m, nn.RNNBase) and bool(getattr(m, "layer_norm", False))


def _values_per_channel(m: nn.Module, t: Tensor, args: tuple, kwargs: dict) -> int:
    """How many values of each channel one call of batch norm ``m`` on ``t`` normalizes over."""
    last = isinstance(m, MaskedBatchNorm) or getattr(m, "layout", None) == "last"  # features last
    if t.dim() < 2:
        return t.numel()
    mask = kwargs.get("mask", args[1] if len(args) > 1 else None)
    if last and isinstance(mask, Tensor) and mask.dtype == torch.bool and mask.shape == t.shape[:-1]:
        return int(mask.sum())  # padded positions do not count
    channels = t.shape[-1] if last else t.shape[1]
    return t.numel() // channels if channels else 0


def _watch_shapes(model: nn.Module, x: Tensor, modules: dict) -> tuple[dict[str, list[int]], dict[str, int]]:
    """The input shape each of ``modules`` first receives (and the output's, as ``"<output>"``),
    and for each batch norm the fewest values per channel it normalizes over in one call.

    Counted from what the layer itself receives, not from ``x``: a model may fold time into the
    batch, run the layer on one sample at a time, or on a slice of the batch.
    """
    seen: dict[str, list[int]] = {}
    per_channel: dict[str, int] = {}

    def hook(mod, args, kwargs):
        t = first_tensor(args)
        if t is None:
            return
        name = modules[mod]
        seen.setdefault(name, list(t.shape))
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            n = _values_per_channel(mod, t, args, kwargs)
            per_channel[name] = min(per_channel.get(name, n), n)

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in modules]
    state = ModelState(model)
    try:
        model.eval()
        with torch.no_grad():
            out = model(x)
    finally:
        state.restore()
        for h in handles:
            h.remove()
    seen["<output>"] = list(first_tensor(out).shape) if first_tensor(out) is not None else []
    return seen, per_channel


def _train_mode_error(model: nn.Module, x: Tensor) -> str | None:
    """Why the model cannot run a training-mode forward on ``x`` (None if it can)."""
    state = ModelState(model)
    try:
        set_mode(model, "train")
        with torch.no_grad():
            model(x)
    except Exception as exc:  # noqa: BLE001 - failing in training mode is a finding
        return _describe(exc)
    finally:
        state.restore()
    return None


def _finding(fid: str, level: str, title: str, summary: str, evidence: dict, claims=(), seen: _Seen | None = None) -> dict:
    seen = seen or _Seen("feed-forward", False)
    return {"id": fid, "level": level, "title": title, "summary": summary, "evidence": evidence,
            "claims": list(claims), "advice": [seen.advice(c) for c in claims]}


def _gradient_scale(model: nn.Module, x: Tensor, seed: int) -> dict[str, dict]:
    """Per layer: ||dL/dW|| / ||W|| over its weights (a scale comparable across layer sizes) and
    the RMS of dL/d(output), for a loss whose gradient at the model output is N(0, 1)."""
    # embeddings are lookup tables: their relative gradient follows token counts, not depth
    layers = [(n or "<model>", m) for n, m in model.named_modules()
              if not is_norm_layer(m) and not isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and any(p.requires_grad for p in m.parameters(recurse=False))]
    params = [p for _, m in layers for p in m.parameters(recurse=False) if p.requires_grad]
    if not params:
        return {}
    state = ModelState(model)
    try:
        set_mode(model, "train")
        with ActivationStats(model, modules=[n if n != "<model>" else "" for n, _ in layers]) as stats:
            out = first_tensor(model(x))
            if out is None:
                return {}
            if out.requires_grad:
                g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
                # autograd.grad, not backward(): the model's .grad fields stay untouched
                grads = torch.autograd.grad(out, params, grad_outputs=g, allow_unused=True)
            else:  # detached or integer output: no gradient reaches any layer, which is a finding
                grads = (None,) * len(params)
    finally:
        state.restore()
    by_param = dict(zip(map(id, params), grads, strict=True))
    act = stats.summary()
    return {name: _gradient_row(m, by_param, act.get(name if name != "<model>" else "", {})) for name, m in layers}


def _gradient_row(m: nn.Module, by_param: dict, s: dict) -> dict:
    ps = [p for pn, p in m.named_parameters(recurse=False) if p.requires_grad and not pn.startswith(("bias", "ln_"))]
    gs = [by_param[id(p)] for p in ps]
    w_norm = math.sqrt(sum(p.detach().double().square().sum().item() for p in ps))
    g_norm = math.sqrt(sum(0.0 if gr is None else gr.double().square().sum().item() for gr in gs))
    row = {"type": type(m).__name__, "weight_norm": w_norm, "grad_norm": g_norm,
           "relative_grad": g_norm / w_norm if w_norm > 0 else math.nan}
    if ps:  # a layer with weights that get no usable gradient does not train: never dropped silently
        problem = (_NO_GRADIENT if all(gr is None for gr in gs) else _NONFINITE if not math.isfinite(g_norm)
                   else _ZERO_GRADIENT if g_norm == 0 else None)
        if problem:
            row["problem"] = problem
    if "grad_rms" in s:
        row["output_grad_rms"] = s["grad_rms"]
    if "time" in s and s["time"].get("grad_rms"):
        steps = s["time"]["grad_rms"]
        row["output_grad_rms_first_step"], row["output_grad_rms_last_step"] = steps[0], steps[-1]
    return row


_NO_GRADIENT = "no gradient reaches it"
_ZERO_GRADIENT = "all-zero gradient"
_NONFINITE = "non-finite gradient"


# the audit, one named step per finding


def audit_model(model: nn.Module, x: Tensor, *, batch_dim: int = 0, small_batch: int = 16,
                gap_tol: float = 0.01, grad_ratio: float = 100.0, seed: int = 0) -> dict:
    """Audit ``model`` on the batch ``x``; returns plain data (the CLI's ``--json`` output).

    ``x``'s batch size stands for the batch size you train with (it decides the small-batch
    finding and the advice). The model is left as it was: modes, buffers and ``.grad`` are untouched,
    and so is torch's global random number generator. Bad arguments raise ``TypeError`` or
    ``ValueError`` naming the argument: an audit that ran on a misread threshold would mislead.

    Example::

        >>> model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 2))
        >>> result = audit_model(model, torch.randn(32, 8))
        >>> result["flagged"], [f["id"] for f in result["findings"] if f["level"] == "flag"]
        (False, [])
    """
    batch_dim = _check_audit_args(model, x, batch_dim, small_batch, gap_tol, grad_ratio, seed)
    with preserved_rng(model, x):  # training-mode forwards may draw (the model's own noise)
        named = list(model.named_modules())
        norms = [(n or "<model>", m) for n, m in named if is_norm_layer(m)]
        rnns = [(n or "<model>", m) for n, m in named if is_recurrent_layer(m)]
        shapes, per_channel = _watch_shapes(model, x, {m: n for n, m in norms + rnns})
        B = x.shape[batch_dim]
        norm_rows = [_norm_row(n, m, shapes.get(n)) for n, m in norms]
        rnn_rows = [{"name": n, "type": type(m).__name__, "normalized": _rnn_normalized(m),
                     "input_shape": shapes.get(n)} for n, m in rnns]
        has_conv = any(isinstance(m, nn.modules.conv._ConvNd) for _, m in named)
        has_attention = any(isinstance(m, nn.MultiheadAttention) for _, m in named)
        seen = _Seen("CNN" if has_conv else "transformer" if has_attention else "recurrent" if rnn_rows
                     else "feed-forward", B < small_batch)
        bns = [r for r in norm_rows if r["kind"] == "batch"]
        train_error = _train_mode_error(model, x)

        findings = _batch_dependence(model, x, batch_dim, seed, seen, train_ok=train_error is None)
        if train_error is None:
            findings.append(_train_eval_gap(model, x, gap_tol, seen, norms))
        else:
            findings.append(_finding("train-mode-fails", "flag", "the model fails in training mode",
                                     f"a training-mode forward on a batch of {B} fails: {train_error}; the train-mode "
                                     "checks (batch dependence, train/eval gap, gradient scale) could not run",
                                     {"error": train_error, "batch_size": B}, ("C3",) if bns else (), seen))
        findings += _small_batches(bns, per_channel, B, small_batch, seen)
        findings += _recurrent(rnn_rows)
        if has_attention and bns:
            findings.append(_finding("bn-in-transformer", "flag", "batch norm in an attention model",
                                     f"{len(bns)} batch norm layer(s) in a model with attention: "
                                     + ", ".join(r["name"] for r in bns),
                                     {"layers": [r["name"] for r in bns]}, ("C5",), seen))
        if train_error is None:
            findings += _gradient_spread(model, x, seed, grad_ratio, seen)
        findings += _init_and_architecture(norm_rows, rnn_rows, seen)

    flagged = [f["id"] for f in findings if f["level"] == "flag"]
    return {
        "model": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
        "input_shape": list(x.shape), "input_dtype": str(x.dtype).replace("torch.", ""),
        "output_shape": shapes.get("<output>"), "batch_size": B, "architecture": seen.arch,
        "norm_layers": norm_rows, "recurrent_layers": rnn_rows,
        "findings": findings, "flagged": bool(flagged), "flagged_ids": flagged,
    }


def _check_audit_args(model, x, batch_dim, small_batch, gap_tol, grad_ratio, seed) -> int:
    """:func:`audit_model`'s arguments, checked; returns ``batch_dim`` as a dim >= 0."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor (a batch of inputs), got {type(x).__name__}")
    for name, value in (("batch_dim", batch_dim), ("small_batch", small_batch), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if not -x.dim() <= batch_dim < x.dim():
        raise ValueError(f"batch_dim={batch_dim} is out of range for x of shape {list(x.shape)}")
    if x.shape[batch_dim] < 1:
        raise ValueError(f"x must hold at least one sample along batch_dim={batch_dim}, got shape {list(x.shape)}")
    if small_batch < 1:
        raise ValueError(f"small_batch must be a positive number of samples, got {small_batch!r}")
    bad = nonfinite_count(x)
    if bad:  # the probes compare outputs: a NaN would read as batch dependence and a gap
        raise ValueError(f"x holds {bad} non-finite value(s) (NaN or inf); audit on a finite batch")
    for name, value, low in (("gap_tol", gap_tol, 0), ("grad_ratio", grad_ratio, 1)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
        if not value >= low:  # NaN too: every comparison with it is False, nothing would be flagged
            raise ValueError(f"{name} must be a number >= {low}, got {value!r}")
    return batch_dim % x.dim()


def _norm_row(name: str, m: nn.Module, shape) -> dict:
    w, b = getattr(m, "weight", None), getattr(m, "bias", None)
    return {"name": name, "type": type(m).__name__, "kind": _norm_kind(m), "input_shape": shape,
            "gain_is_1": None if w is None else bool(torch.all(w == 1)),
            "bias_is_0": None if b is None else bool(torch.all(b == 0))}


def _batch_dependence(model, x: Tensor, batch_dim: int, seed: int, seen: _Seen, train_ok: bool) -> list[dict]:
    B = x.shape[batch_dim]
    if B < 4:  # the probes need two halves of two samples
        x = torch.cat([x] * math.ceil(4 / B), batch_dim).narrow(batch_dim, 0, 4)
    return [_batch_dependence_in(model, x, batch_dim, seed, mode, seen) for mode in ("eval", "train")
            if mode == "eval" or train_ok]


def _batch_dependence_in(model, x: Tensor, batch_dim: int, seed: int, mode: str, seen: _Seen) -> dict:
    r = check_batch_independence(model, x, batch_dim=batch_dim, mode=mode, seed=seed)
    evidence = {"mode": mode, "batch_size": r.batch_size, "max_relative_change": r.max_relative_change,
                "max_change": r.max_change, "probes": r.probes,
                "sources": [{"name": s.name, "type": s.type, "relative_change": s.output_relative}
                            for s in r.sources], "errors": r.errors}
    if r.independent:
        return _finding(f"batch-independence-{mode}", "ok", f"batch independence ({mode} mode)",
                        f"no sample's output moved when the rest of the batch changed "
                        f"(largest relative change {r.max_relative_change:.1e})", evidence)
    names = ", ".join(f"{s.name} ({s.type})" for s in r.sources) or "no single module"
    only_bn = r.sources and all(s.type.startswith(("BatchNorm", "ChannelBatchNorm", "MaskedBatchNorm",
                                                   "SyncBatchNorm")) for s in r.sources)
    if mode == "eval":
        level, claims = "flag", ("C1",)
        summary = (f"at inference a sample's output depends on the rest of its batch: largest "
                   f"relative change {r.max_relative_change:.3g}, caused by {names}")
    elif only_bn:
        level, claims = "info", ()
        summary = (f"in training, outputs depend on the batch through batch norm ({names}): "
                   f"largest relative change {r.max_relative_change:.3g}; expected of batch norm")
    else:
        level, claims = "flag", ("C1",)
        summary = (f"in training a sample's output depends on the rest of its batch through "
                   f"{names}: largest relative change {r.max_relative_change:.3g}")
    if r.errors:
        summary += "; the model failed on part of the batch: " + "; ".join(f"{k}: {v}" for k, v in r.errors.items())
    return _finding(f"batch-dependence-{mode}", level, f"batch dependence ({mode} mode)", summary, evidence,
                    claims, seen)


def _train_eval_gap(model, x: Tensor, gap_tol: float, seen: _Seen, norms) -> dict:
    gap = train_eval_gap(model, x)
    evidence = {"relative_gap": gap.relative_gap, "max_gap": gap.max_gap, "tolerance": gap_tol,
                "layers": [{"name": g.name, "type": g.type, "input_gap": g.input_gap,
                            "output_gap": g.output_gap, "output_relative": g.output_relative}
                           for g in gap.layers]}
    if gap.relative_gap <= gap_tol:
        return _finding("train-eval-gap", "ok", "train/eval gap",
                        f"train and eval mode agree (relative gap {gap.relative_gap:.1e})", evidence)
    starts = [g.name for g in gap.layers if g.output_relative > gap_tol and g.input_relative <= gap_tol]
    summary = (f"train and eval mode outputs differ by {gap.relative_gap:.1%} of the output's "
               f"largest value (max abs {gap.max_gap:.3g})"
               + (f"; the gap starts at {', '.join(starts)}" if starts else ""))
    fresh = [n for n, m in norms if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.num_batches_tracked is not None and int(m.num_batches_tracked) == 0]
    if fresh:
        summary += f"; {len(fresh)} batch norm layer(s) never updated their running statistics (a fresh model)"
    return _finding("train-eval-gap", "flag", "train/eval gap", summary, evidence, ("C2",), seen)


def _small_batches(bns: list[dict], per_channel: dict[str, int], B: int, small_batch: int,
                   seen: _Seen) -> list[dict]:
    """``per_channel``: the fewest values per channel each layer received in one call (None: never
    called), from the layer's own input."""
    if not bns:
        return []
    rows = [{"name": r["name"], "type": r["type"], "input_shape": r["input_shape"],
             "values_per_channel": per_channel.get(r["name"])} for r in bns]
    evidence = {"batch_size": B, "threshold": small_batch, "layers": rows}
    if B >= small_batch:
        return [_finding("small-batch", "ok", "batch norm with small batches",
                         f"batch size {B} >= {small_batch} for {len(rows)} batch norm layer(s)", evidence)]
    called = [r for r in rows if r["values_per_channel"] is not None]
    summary = f"{len(rows)} batch norm layer(s) will see batches of {B} samples (below {small_batch})"
    if called:
        worst = min(called, key=lambda r: r["values_per_channel"])
        summary += f"; the fewest values per channel: {worst['values_per_channel']} at {worst['name']}"
    if any(r["values_per_channel"] <= 1 for r in called):
        summary += "; with one value per channel batch norm cannot train at all"
    return [_finding("small-batch", "flag", "batch norm with small batches", summary, evidence, ("C3",), seen)]


def _recurrent(rnn_rows: list[dict]) -> list[dict]:
    plain = [r for r in rnn_rows if not r["normalized"]]
    if plain:
        return [_finding("rnn-without-norm", "flag", "recurrent layers without normalization",
                         f"{len(plain)} recurrent layer(s) without layer norm: "
                         + ", ".join(f"{r['name']} ({r['type']})" for r in plain), {"layers": plain}, ("C4",))]
    if rnn_rows:
        return [_finding("rnn-without-norm", "ok", "recurrent layers without normalization",
                         f"all {len(rnn_rows)} recurrent layer(s) are layer-normalized", {"layers": rnn_rows})]
    return []


def _gradient_spread(model, x: Tensor, seed: int, grad_ratio: float, seen: _Seen) -> list[dict]:
    """The spread of ||dL/dW|| / ||W|| over the layers, flagged above ``grad_ratio``; a layer whose
    weights get a zero, missing or non-finite gradient is flagged by name (it has no place in a
    ratio, and leaving it out would report a model that cannot train as fine)."""
    grads = _gradient_scale(model, x, seed)
    problems = {n: r["problem"] for n, r in grads.items() if "problem" in r}
    positive = {n: r["relative_grad"] for n, r in grads.items()
                if n not in problems and r["relative_grad"] > 0 and math.isfinite(r["relative_grad"])}
    if not positive and not problems:
        return []
    evidence = {"ratio": None, "threshold": grad_ratio, "largest": None, "smallest": None, "layers": grads,
                "zero_gradient": sorted(n for n, p in problems.items() if p != _NONFINITE),
                "nonfinite_gradient": sorted(n for n, p in problems.items() if p == _NONFINITE)}
    parts, level = [], "ok"
    if positive:
        hi, lo = max(positive, key=positive.get), min(positive, key=positive.get)
        ratio = positive[hi] / positive[lo]
        evidence.update(ratio=ratio, largest=hi, smallest=lo)
        parts.append(f"the weight gradient relative to the weight, ||dL/dW|| / ||W||, spans {ratio:.3g}x "
                     f"across layers, from {positive[lo]:.3g} at {lo} to {positive[hi]:.3g} at {hi} "
                     "(loss whose gradient at the output is N(0, 1))")
        level = "flag" if ratio > grad_ratio else "ok"
    if problems:
        level = "flag"
        parts.append(f"{len(problems)} layer(s) get no usable weight gradient: "
                     + ", ".join(f"{n} ({p})" for n, p in problems.items()))
    summary = "; ".join(parts)
    return [_finding("gradient-scale", level, "per-layer gradient scale", summary, evidence,
                     ("C13",) if level == "flag" else (), seen)]


def _init_and_architecture(norm_rows: list[dict], rnn_rows: list[dict], seen: _Seen) -> list[dict]:
    out = []
    off = [r["name"] for r in norm_rows if r["gain_is_1"] is False or r["bias_is_0"] is False]
    if off:
        out.append(_finding("norm-init", "info", "norm gains and biases",
                            f"{len(off)} of {len(norm_rows)} norm layer(s) have a gain that is not 1 or a "
                            f"bias that is not 0: {', '.join(off[:8])}" + (" ..." if len(off) > 8 else ""),
                            {"layers": off}, ("C10",), seen))
    # the layer-normalized recurrent layers normalize inside: no norm module of their own shows it
    kinds = {r["kind"] for r in norm_rows} | ({"layer"} if any(r["normalized"] for r in rnn_rows) else set())
    claims = []
    if seen.arch == "CNN":
        claims.append("C7")
    elif seen.arch == "feed-forward" and "batch" in kinds:
        claims.append("C6")
    if not norm_rows and not any(r["normalized"] for r in rnn_rows):
        claims.append("C9")
    if "layer" in kinds or any(r["normalized"] for r in rnn_rows):
        claims.append("C11")
    if claims:
        out.append(_finding("architecture", "info", "advice for this architecture",
                            f"a {seen.arch} model with normalization: {', '.join(sorted(kinds)) or 'none'}",
                            {"architecture": seen.arch, "norm_kinds": sorted(kinds)}, claims, seen))
    return out


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def format_report(result: dict, target: str = "") -> str:
    """The human-readable report of :func:`audit_model`'s result."""
    out = []
    out.append(f"lnorm audit {target}".rstrip())
    out.append(f"model {result['model']} ({result['parameters']:,} parameters), input "
               f"{result['input_shape']} {result['input_dtype']} -> output {result['output_shape']}")
    out.append("")
    out.append(f"normalization layers ({len(result['norm_layers'])})")
    for r in result["norm_layers"]:
        out.append(f"  {r['name']:<24} {r['type']:<18} {r['kind']:<9} input {r['input_shape']}")
    if not result["norm_layers"]:
        out.append("  none")
    out.append(f"recurrent layers ({len(result['recurrent_layers'])})")
    for r in result["recurrent_layers"]:
        out.append(f"  {r['name']:<24} {r['type']:<18} {'layer-normalized' if r['normalized'] else 'no normalization'}"
                   f"  input {r['input_shape']}")
    if not result["recurrent_layers"]:
        out.append("  none")
    out.append("")
    tags = {"flag": "FLAG", "info": "info", "ok": "ok  "}
    for f in result["findings"]:
        out.append(f"{tags[f['level']]}  {f['title']}" + (f"  [{', '.join(f['claims'])}]" if f["claims"] else ""))
        out.append(f"      {f['summary']}")
        ev = f["evidence"]
        if f["id"] == "train-eval-gap" and f["level"] == "flag":
            out.append(f"      {'layer':<24} {'type':<18} {'input gap':>10} {'output gap':>11}")
            for g in ev["layers"]:
                out.append(f"      {g['name']:<24} {g['type']:<18} {g['input_gap']:>10.3g} {g['output_gap']:>11.3g}")
        if f["id"].startswith("batch-dependence") and ev["probes"]:
            out.append("      relative change per probe: " + ", ".join(f"{k} {v:.2g}" for k, v in ev["probes"].items()))
        if f["id"] == "small-batch" and f["level"] == "flag":
            for r in ev["layers"]:
                out.append(f"      {r['name']:<24} input {r['input_shape']}, " + (
                    "not called" if r["values_per_channel"] is None else f"{r['values_per_channel']} values per channel"))
        if f["id"] == "gradient-scale":
            out.append(f"      {'layer':<24} {'type':<18} {'|dW|/|W|':>10} {'|dW|':>9} {'dL/dy RMS':>10}")
            for name, r in ev["layers"].items():
                out.append(f"      {name:<24} {r['type'][:18]:<18} {r['relative_grad']:>10.3g} {r['grad_norm']:>9.3g} "
                           f"{r.get('output_grad_rms', math.nan):>10.3g}")
        for a in f["advice"]:
            out.append(f"      advice {a}")
    out.append("")
    if result["flagged"]:
        out.append(f"{len(result['flagged_ids'])} finding(s) flagged: {', '.join(result['flagged_ids'])} (exit status 1)")
    else:
        out.append("nothing flagged (exit status 0)")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "audit", help="audit a model's normalization: batch dependence, train/eval gap, gradients, advice",
        description=__doc__.split("\n\n")[0] + " " + __doc__.split("\n\n")[1],
        epilog="exit status: 0 the audit ran and flagged nothing, 1 it flagged something, 2 anything else "
               "(usage, loading or model error, allocation failure, --timeout, Ctrl-C)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", metavar="TARGET", help="path/to/file.py:factory or package.module:factory. "
                   "TARGET's file or module is imported, which runs its code, and factory() is called: "
                   "audit only code you trust")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--input-shape", metavar="SHAPE",
                     help="shape of ONE sample without the batch dim, comma-separated (e.g. 3,32,32); "
                          "inputs are drawn from N(0, 1)")
    src.add_argument("--input", metavar="FILE.pt", help="a saved tensor holding a batch of inputs (torch.save)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="the batch size you train with, in samples (default 32; with --input, the file's "
                        "first samples)")
    p.add_argument("--batch-dim", type=int, default=0,
                   help="the input's batch dim (1 for nn.LSTM without batch_first); default 0")
    p.add_argument("--int-high", type=int, default=None, metavar="N",
                   help="draw integer inputs in [0, N) (token ids for an embedding) instead of floats")
    p.add_argument("--small-batch", type=int, default=16,
                   help="flag batch norm when the batch size is below this many samples (default 16)")
    p.add_argument("--gap-tol", type=float, default=0.01,
                   help="flag a train/eval output gap above this fraction of the output's max abs value "
                        "(default 0.01)")
    p.add_argument("--grad-ratio", type=float, default=100.0,
                   help="flag when the per-layer weight gradient relative to the weight, ||dL/dW|| / ||W||, "
                        "spans more than this factor across layers (largest over smallest; default 100)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help=f"give up (exit 2) when loading and auditing take longer than this many seconds "
                        f"(default {DEFAULT_TIMEOUT:g}; 0: no limit)")
    p.add_argument("--seed", type=int, default=0, help="seed for the random input and probes")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    p.set_defaults(func=run)


DEFAULT_TIMEOUT = 600.0


def _check_args(args) -> None:
    if args.batch_size is not None and args.batch_size < 1:
        raise AuditError(f"--batch-size must be a positive number of samples, got {args.batch_size}")
    if args.int_high is not None and args.int_high < 1:
        raise AuditError(f"--int-high must be a positive int, got {args.int_high}")
    if args.int_high is not None and getattr(args, "input", None):
        raise AuditError("--int-high draws a generated input's token ids; with --input the file's values are used "
                         "as they are: drop one of the two")
    if args.small_batch < 1:
        raise AuditError(f"--small-batch must be a positive number of samples, got {args.small_batch}")
    if not args.gap_tol >= 0:
        raise AuditError(f"--gap-tol must be >= 0, got {args.gap_tol}")
    if not args.grad_ratio >= 1:
        raise AuditError(f"--grad-ratio must be >= 1, got {args.grad_ratio}")
    if not (args.timeout >= 0 and math.isfinite(args.timeout)):
        raise AuditError(f"--timeout must be a number of seconds >= 0 (0: no limit), got {args.timeout}")


class _TimedOut(BaseException):
    """Raised in the main thread by the --timeout alarm; a BaseException so that the model's own
    ``except Exception`` cannot swallow it."""


@contextlib.contextmanager
def _time_limit(seconds: float):
    """Interrupt the block after ``seconds`` (0: never). The alarm needs the main thread and
    SIGALRM; elsewhere the block runs unbounded."""
    if not seconds or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGALRM"):
        yield
        return

    def alarm(signum, frame):
        raise _TimedOut

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _load_and_audit(args) -> dict:
    model = load_target(args.target)
    x = make_input(args)
    if not -x.dim() <= args.batch_dim < x.dim():
        raise AuditError(f"--batch-dim {args.batch_dim} is out of range for an input of shape {list(x.shape)}")
    args.batch_dim %= x.dim()
    bad = nonfinite_count(x)
    if bad:
        raise AuditError(f"the input holds {bad} non-finite value(s) (NaN or inf): the audit compares outputs, "
                         "and a NaN would read as batch dependence and a train/eval gap; pass a finite batch")
    state = ModelState(model)
    try:
        model.eval()
        with torch.no_grad():
            out = first_tensor(model(x))
    except (Exception, SystemExit) as exc:
        raise AuditError(
            f"the model rejected an input of shape {list(x.shape)} ({str(x.dtype).replace('torch.', '')}): "
            f"{_describe(exc)}. --input-shape is the shape of one sample without the batch dim; "
            "use --int-high for token ids, --batch-dim for time-first sequences") from exc
    finally:
        state.restore()
    bad = 0 if out is None else nonfinite_count(out)
    if bad:
        raise AuditError(f"the model's output (eval mode) holds {bad} non-finite value(s) (NaN or inf) on a finite "
                         "input: there is nothing to compare; fix the model or its weights first")
    try:
        return audit_model(model, x, batch_dim=args.batch_dim, small_batch=args.small_batch,
                           gap_tol=args.gap_tol, grad_ratio=args.grad_ratio, seed=args.seed)
    except (Exception, SystemExit) as exc:  # the model ran once in eval mode, then failed in a probe
        raise AuditError(f"the audit could not run the model: {_describe(exc)}") from exc


def run(args) -> int:
    """``lnorm audit``: 0 the audit ran and flagged nothing, 1 it flagged something, 2 anything else."""
    try:
        _check_args(args)
        with _time_limit(args.timeout):
            result = _load_and_audit(args)
    except AuditError as exc:
        if args.debug:
            traceback.print_exception(exc.__cause__ or exc)
        print(f"lnorm audit: error: {exc}" + ("" if args.debug else " (run with --debug for the traceback)"),
              file=sys.stderr)
        return 2
    except _TimedOut:
        print(f"lnorm audit: error: the audit did not finish within --timeout {args.timeout:g} s (a model that "
              "never returns, or one too large for the time limit: raise --timeout)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lnorm audit: interrupted (Ctrl-C); nothing was audited", file=sys.stderr)
        return 2
    result["target"] = args.target
    if args.json:
        print(json.dumps(json_safe(result), indent=2, allow_nan=False))
    else:
        print(format_report(result, args.target))
    return 1 if result["flagged"] else 0
