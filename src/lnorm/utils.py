"""Helpers shared by the tools (diagnostics, audit, convert) and the lab.

What a model is made of (:func:`is_norm_layer`, :func:`is_recurrent_layer`), how to run it without
leaving a trace (:class:`ModelState`, :func:`set_mode`, :func:`first_tensor`) and how to write
its numbers as strict JSON (:func:`json_safe`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lnorm.nn.factory import ChannelRMSNorm
from lnorm.nn.rnn import LayerNormGRU, LayerNormLSTM, LayerNormRNN

__all__ = ["ModelState", "first_tensor", "is_norm_layer", "is_recurrent_layer", "json_safe", "set_mode"]

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm,
               nn.LocalResponseNorm, ChannelRMSNorm)
_RECURRENT_TYPES = (nn.RNNBase, LayerNormLSTM, LayerNormGRU, LayerNormRNN)


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
    """Snapshot of everything a forward pass in train mode can change: modes and buffers."""

    def __init__(self, model: nn.Module) -> None:
        self.modes = [(m, m.training) for m in model.modules()]
        self.buffers = [(b, b.detach().clone()) for b in model.buffers()]

    def restore(self) -> None:
        for m, training in self.modes:
            m.training = training
        with torch.no_grad():
            for b, saved in self.buffers:
                b.copy_(saved)


def set_mode(model: nn.Module, mode: str, *, keep_dropout: bool = False) -> None:
    """``train`` or ``eval``; in train mode dropout is switched off unless ``keep_dropout``.

    Dropout draws a new mask for every call and every shape, which would show up as batch
    dependence or a train/eval gap that has nothing to do with normalization.
    """
    model.train(mode == "train")
    if mode == "train" and not keep_dropout:
        for m in model.modules():
            if isinstance(m, nn.modules.dropout._DropoutNd) or (
                    is_recurrent_layer(m) and getattr(m, "dropout", 0)):
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
