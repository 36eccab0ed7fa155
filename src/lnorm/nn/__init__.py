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
from lnorm.nn.rnn import (
    LayerNormGRU,
    LayerNormGRUCell,
    LayerNormLSTM,
    LayerNormLSTMCell,
    LayerNormRNN,
    LayerNormRNNCell,
)

__all__ = [
    "AddLayerNorm",
    "AddRMSNorm",
    "ChannelBatchNorm",
    "ChannelRMSNorm",
    "GroupNorm",
    "LayerNorm",
    "LayerNormGRU",
    "LayerNormGRUCell",
    "LayerNormLSTM",
    "LayerNormLSTMCell",
    "LayerNormRNN",
    "LayerNormRNNCell",
    "MaskedBatchNorm",
    "NoNorm",
    "RMSNorm",
    "make_norm",
]

