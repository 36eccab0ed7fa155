"""Helpers shared by the tools (diagnostics, audit, convert) and the lab.

What a model is made of (:func:`is_norm_layer`, :func:`is_recurrent_layer`), how to run it without
leaving a trace (:class:`ModelState`, :func:`set_mode`, :func:`preserved_rng`, :func:`first_tensor`),
how to write its numbers as strict JSON (:func:`json_safe`) and which CPU measured them
(:func:`cpu_model`, for ``lnorm bench`` and the lab's ``env.json``; :func:`instruction_sets`, the
vector instructions the libraries used, for ``lnorm bench rnn``).
"""

from __future__ import annotations

import contextlib
import math
import platform

import torch
from torch import Tensor, nn

from lnorm.nn.factory import ChannelRMSNorm
from lnorm.nn.rnn import (
    LayerNormGRU,
    LayerNormGRUCell,
    LayerNormLSTM,
    LayerNormLSTMCell,
    LayerNormRNN,
    LayerNormRNNCell,
)

__all__ = ["ISA_LIMITS", "ModelState", "cpu_model", "first_tensor", "instruction_sets", "is_norm_layer", "is_recurrent_layer", "json_safe",
           "preserved_rng", "set_mode", "stochastic_off"]

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm,
               nn.LocalResponseNorm, ChannelRMSNorm)
_RECURRENT_TYPES = (nn.RNNBase, LayerNormLSTM, LayerNormGRU, LayerNormRNN)
# the modules with zoneout: random in training mode (like dropout), its expectation in eval mode
_ZONEOUT_TYPES = (LayerNormLSTM, LayerNormGRU, LayerNormRNN, LayerNormLSTMCell, LayerNormGRUCell, LayerNormRNNCell)


def nonfinite_count(t: Tensor) -> int:
    """How many NaN or inf values a floating-point (or complex) tensor holds; 0 for other dtypes."""
    if not (t.is_floating_point() or t.is_complex()):
        return 0
    return t.numel() - int(torch.isfinite(t).sum())


def is_norm_layer(module: nn.Module) -> bool:
    """True for torch's and lnorm's normalization modules (batch, layer, group, instance, RMS)."""
    return isinstance(module, _NORM_TYPES)


def is_recurrent_layer(module: nn.Module) -> bool:
    """True for ``nn.RNN/LSTM/GRU`` and lnorm's layer-normalized recurrent layers (not cells)."""
    return isinstance(module, _RECURRENT_TYPES)


def first_tensor(obj) -> Tensor | None:
    """The first tensor in a module's input or output: ``y``, ``(y, state)``; None for packed data."""
    if isinstance(obj, Tensor):
        return obj
    if isinstance(obj, nn.utils.rnn.PackedSequence):
        return None  # the packed layout has no batch dim to compare along
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        for item in obj:
            t = first_tensor(item)
            if t is not None:
                return t
    return None


class ModelState:
    """Snapshot of everything a forward pass in train mode can change: modes and buffers.

    Buffers are saved per module and name, with the tensor object each name held: a forward may
    update a buffer in place (torch's batch norm) or rebind the name to a new tensor (a
    hand-written ``self.running_mean = ...``), and :meth:`restore` undoes both. It puts the
    original object back under its name and copies the saved values into it, so the model ends
    up exactly as it was, buffers shared between modules (``convert_sync_batchnorm`` shares them)
    and tensors the caller holds a reference to included. Buffers a forward registered are
    removed again.
    """

    def __init__(self, model: nn.Module) -> None:
        self.modes = [(m, m.training) for m in model.modules()]
        # (module, its _buffers dict as it was: name -> (tensor object, saved copy)), ...
        self.buffers = [(m, {name: (b, None if b is None else b.detach().clone()) for name, b in m._buffers.items()},
                         set(m._non_persistent_buffers_set)) for m in model.modules()]

    def restore(self) -> None:
        for m, training in self.modes:
            m.training = training
        with torch.no_grad():
            for m, saved, non_persistent in self.buffers:
                for original, copy in saved.values():
                    if original is None:
                        continue
                    if original.shape == copy.shape and original.dtype == copy.dtype and \
                            original.device == copy.device:
                        original.copy_(copy)
                    else:  # resized or converted in place: copy_ would broadcast or fail
                        original.data = copy
                # rebuilt in place and in the saved order, so state_dict() keeps its key order
                m._buffers.clear()
                m._buffers.update({name: original for name, (original, _) in saved.items()})
                m._non_persistent_buffers_set.clear()
                m._non_persistent_buffers_set.update(non_persistent)


def _cuda_devices(objs) -> list[int]:
    devices = set()
    for obj in objs:
        tensors = [obj] if isinstance(obj, Tensor) else \
            [*obj.parameters(), *obj.buffers()] if isinstance(obj, nn.Module) else []
        devices.update(t.device.index for t in tensors if t.is_cuda)
    return sorted(d for d in devices if d is not None)


@contextlib.contextmanager
def preserved_rng(*objs):
    """Run the block on a fork of torch's global random number generators.

    A forward in training mode draws random numbers (dropout, zoneout, a model's own noise), so
    a diagnostic that runs the model would otherwise move the caller's random stream: the next
    ``torch.rand`` the caller draws, and so its experiment, would depend on whether it ran a
    diagnostic. The CPU generator is restored on exit, and that of every CUDA device holding one
    of ``objs`` (tensors or modules).
    """
    with torch.random.fork_rng(devices=_cuda_devices(objs)):
        yield


def _stochastic_in_training(m: nn.Module) -> bool:
    """Dropout, a recurrent layer with dropout between its layers, a layer or cell with zoneout."""
    return isinstance(m, nn.modules.dropout._DropoutNd) or (
        is_recurrent_layer(m) and bool(getattr(m, "dropout", 0))) or (
        isinstance(m, _ZONEOUT_TYPES) and bool(m.zoneout or getattr(m, "zoneout_cell", 0)))


def set_mode(model: nn.Module, mode: str, *, keep_dropout: bool = False) -> None:
    """``train`` or ``eval``; in train mode dropout and zoneout are switched off unless ``keep_dropout``.

    Dropout and zoneout draw a new random mask for every call and every shape, which would show
    up as batch dependence or a train/eval gap that has nothing to do with normalization. Both
    are decided by the module's own ``training`` flag, so such modules are put in eval mode:
    dropout is then the identity and zoneout its expectation ``p * old + (1 - p) * new``, both
    deterministic. The rest of the model (batch norm above all) stays in train mode.
    """
    if mode not in ("train", "eval"):
        raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
    model.train(mode == "train")
    if mode == "train" and not keep_dropout:
        stochastic_off(model)


def stochastic_off(model: nn.Module) -> None:
    """Put every dropout module and every recurrent layer or cell with dropout or zoneout in eval
    mode (see :func:`set_mode`), leaving every other module's mode as it is."""
    for m in model.modules():
        if _stochastic_in_training(m):
            m.training = False


def json_safe(obj):
    """Strict JSON: a NaN or infinite float becomes the string "nan", "inf" or "-inf".

    Containers are walked (tuples become lists); everything else is returned as it is.
    """
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def cpu_model(path: str = "/proc/cpuinfo") -> dict:
    """The CPU as /proc/cpuinfo names it (model name, vendor, family, model), or what ``platform``
    knows elsewhere: the strings of the first processor's block, e.g. ``{"model_name": "AMD EPYC
    9R14 96-Core Processor", "vendor": "AuthenticAMD", "family": "25", "model": "17"}``, with
    ``vendor``/``family``/``model`` absent where the file lacks them. Family and model tell apart
    CPU generations sold under one name (AMD EPYC: Zen 3 is family 25 model 1, Zen 4 family 25
    model 17, Zen 5 family 26 model 2). Shared by ``lnorm bench`` and the lab's ``env.json``."""
    info = {"model_name": platform.processor() or platform.machine()}
    try:
        with open(path) as fh:
            text = fh.read()
    except OSError:
        return info
    keys = {"model name": "model_name", "vendor_id": "vendor", "cpu family": "family", "model": "model"}
    for line in text.splitlines():
        if not line.strip():
            break  # the first processor's block is enough
        key, _, value = line.partition(":")
        if key.strip() in keys:
            info[keys[key.strip()]] = value.strip()
    return info


# The environment variables that make torch's own kernels, oneDNN, MKL and Numba use fewer vector
# instructions than the CPU has: how an AVX2 CPU is timed on an AVX-512 one (the README's speed
# section). oneDNN and MKL read theirs when they load, so they must be set before the process starts.
ISA_LIMITS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS",
              "NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES")


def instruction_sets(path: str = "/proc/cpuinfo", environ: dict | None = None) -> dict:
    """The vector instructions a timing ran with: ``cpu``, the widest x86 extension the first
    processor reports ("AVX-512", "AVX2", "AVX", or None where /proc/cpuinfo lists no flags);
    ``torch``, what torch's own kernels dispatch to (``torch.backends.cpu.get_cpu_capability()``);
    ``numba``, the CPU Numba compiles for (``NUMBA_CPU_NAME``, else the host's, None without
    Numba); ``limits``, the :data:`ISA_LIMITS` set in ``environ`` (default ``os.environ``), by name."""
    import os

    environ = os.environ if environ is None else environ
    flags: set[str] = set()
    try:
        with open(path) as fh:
            for line in fh:
                if not line.strip():
                    break  # the first processor's block
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    cpu = next((name for name, flag in (("AVX-512", "avx512f"), ("AVX2", "avx2"), ("AVX", "avx")) if flag in flags),
               None)
    from lnorm.ops.backend import numba_available

    numba_cpu = None
    if numba_available():  # else no kernel of lnorm's is compiled here, whatever llvmlite says
        try:
            import importlib

            numba_cpu = environ.get("NUMBA_CPU_NAME") or importlib.import_module("llvmlite.binding").get_host_cpu_name()
        except Exception:  # ImportError, or a broken llvmlite (OSError loading its library)
            numba_cpu = None
    return {"cpu": cpu, "torch": torch.backends.cpu.get_cpu_capability(), "numba": numba_cpu,
            "limits": {name: environ[name] for name in ISA_LIMITS if environ.get(name)}}
