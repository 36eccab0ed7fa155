"""Modules: norms, the norm factory and the layer-normalized recurrent layers."""

from lnorm.nn.factory import (
    ChannelBatchNorm,
    ChannelRMSNorm,
    GroupNorm,
    MaskedBatchNorm,
    NoNorm,
    make_norm,
)
from lnorm.nn.normalization import AddLayerNorm, AddRMSNorm, LayerNorm, RMSNorm

__all__ = [
    "AddLayerNorm",
    "AddRMSNorm",
    "ChannelBatchNorm",
    "ChannelRMSNorm",
    "GroupNorm",
    "LayerNorm",
    "MaskedBatchNorm",
    "NoNorm",
    "RMSNorm",
    "make_norm",
]

try:  # the recurrent layers live in their own module
    from lnorm.nn.rnn import (  # noqa: F401
        LayerNormGRU,
        LayerNormGRUCell,
        LayerNormLSTM,
        LayerNormLSTMCell,
        LayerNormRNN,
        LayerNormRNNCell,
    )

    __all__ += [
        "LayerNormGRU",
        "LayerNormGRUCell",
        "LayerNormLSTM",
        "LayerNormLSTMCell",
        "LayerNormRNN",
        "LayerNormRNNCell",
    ]
except ModuleNotFoundError as _exc:  # pragma: no cover - only while rnn.py does not exist
    if _exc.name != "lnorm.nn.rnn":
        raise
