"""lnorm: layer normalization for PyTorch.

Flat API: ``lnorm.LayerNorm``, ``lnorm.RMSNorm``, ``lnorm.AddLayerNorm``, ``lnorm.AddRMSNorm``,
``lnorm.functional`` (``layer_norm``, ``rms_norm``, ``add_layer_norm``, ``add_rms_norm``),
``lnorm.nn`` (the same modules, ``make_norm`` and the layer-normalized recurrent layers).
Backends: :func:`set_backend`, :func:`get_backend`, :func:`use_backend` (see ``lnorm.ops.backend``).
"""

__version__ = "0.1.0"

from lnorm import functional  # noqa: E402
from lnorm.functional import add_layer_norm, add_rms_norm, layer_norm, rms_norm  # noqa: E402
from lnorm.nn.normalization import AddLayerNorm, AddRMSNorm, LayerNorm, RMSNorm  # noqa: E402
from lnorm.nn.rnn import (  # noqa: E402
    LayerNormGRU,
    LayerNormGRUCell,
    LayerNormLSTM,
    LayerNormLSTMCell,
    LayerNormRNN,
    LayerNormRNNCell,
)
from lnorm.ops.backend import (  # noqa: E402
    get_backend,
    numba_available,
    set_backend,
    triton_available,
    use_backend,
)

__all__ = [
    "AddLayerNorm",
    "AddRMSNorm",
    "LayerNorm",
    "LayerNormGRU",
    "LayerNormGRUCell",
    "LayerNormLSTM",
    "LayerNormLSTMCell",
    "LayerNormRNN",
    "LayerNormRNNCell",
    "RMSNorm",
    "add_layer_norm",
    "add_rms_norm",
    "functional",
    "get_backend",
    "layer_norm",
    "numba_available",
    "rms_norm",
    "set_backend",
    "triton_available",
    "use_backend",
]
