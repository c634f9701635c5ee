"""Plain PyTorch implementations of every fused op: the oracles the kernels are tested against.

They favour clarity over speed and import nothing but torch. Ops with dropout accept an explicit
``dropout_mask`` (True = keep) so that a test can replay a kernel's own random draw.
"""

from .attention import scaled_dot_product_attention, softmax
from .ffn import ffn, linear_activation, linear_gelu
from .layer_norm import add_layer_norm, layer_norm

__all__ = [
    "add_layer_norm",
    "ffn",
    "layer_norm",
    "linear_activation",
    "linear_gelu",
    "scaled_dot_product_attention",
    "softmax",
]
