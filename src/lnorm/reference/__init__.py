"""Float64 references: the specs of the norm ops, one short file each, plain PyTorch.

Each returns the same auxiliaries as the fast path (``mean``, ``rstd`` per row) so tests can
compare those too. ``upcast=True`` computes in float64 (the spec); ``upcast=False`` computes in
the input's dtype (what a naive implementation in that dtype would get).
"""

from lnorm.reference.add_layer_norm import add_layer_norm_ref
from lnorm.reference.add_rms_norm import add_rms_norm_ref
from lnorm.reference.layer_norm import layer_norm_ref
from lnorm.reference.rms_norm import rms_norm_ref

__all__ = ["layer_norm_ref", "rms_norm_ref", "add_layer_norm_ref", "add_rms_norm_ref"]
