"""Public ops: validate the arguments, choose a backend, run a custom op with autograd."""

from .add_layer_norm import add_layer_norm
from .attention import scaled_dot_product_attention
from .ffn import ffn, linear_activation, linear_gelu
from .layer_norm import layer_norm
from .softmax import softmax

# linear_activation (not exported by the package): linear_gelu's kernels for any activation code,
# ReLU's included, for the fused layers and the reference models.
__all__ = ["add_layer_norm", "ffn", "layer_norm", "linear_gelu", "scaled_dot_product_attention", "softmax"]
