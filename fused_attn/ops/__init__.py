"""Public ops: validate the arguments, choose a backend, run a custom op with autograd."""

from .add_layer_norm import add_layer_norm
from .attention import scaled_dot_product_attention
from .ffn import ffn, linear_gelu
from .layer_norm import layer_norm
from .softmax import softmax

__all__ = ["add_layer_norm", "ffn", "layer_norm", "linear_gelu", "scaled_dot_product_attention", "softmax"]
