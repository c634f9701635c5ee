"""Drop-in modules: same constructors, parameters and ``state_dict`` as their ``torch.nn``
counterparts, computed by the fused kernels."""

from .attention import FusedMultiheadAttention
from .layer_norm import FusedLayerNorm
from .transformer import FusedFFN, FusedTransformerDecoderLayer, FusedTransformerEncoderLayer

__all__ = [
    "FusedFFN",
    "FusedLayerNorm",
    "FusedMultiheadAttention",
    "FusedTransformerDecoderLayer",
    "FusedTransformerEncoderLayer",
]
