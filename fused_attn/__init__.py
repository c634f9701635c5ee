"""fused-attn: fused Transformer kernels (Triton, CUDA C++, C++ CPU) behind PyTorch-shaped ops.

``fused_attn.layer_norm(...)`` and the other ops take the arguments of their PyTorch
counterparts plus a keyword-only ``backend=`` ("auto", "cuda", "triton", "cpu", "reference").
"""

from . import nn, reference
from .backends import (
    BackendNotSupportedError,
    FallbackWarning,
    available_backends,
    last_backend,
    use_backend,
)
from .convert import OptimizeReport, optimize, restore
from .ops import add_layer_norm, ffn, layer_norm, linear_gelu, scaled_dot_product_attention, softmax

__version__ = "0.1.0"

from ._compile_cache import tag_compile_caches  # noqa: E402 (needs __version__)

tag_compile_caches()

__all__ = [
    "add_layer_norm",
    "BackendNotSupportedError",
    "FallbackWarning",
    "available_backends",
    "ffn",
    "last_backend",
    "layer_norm",
    "linear_gelu",
    "nn",
    "optimize",
    "OptimizeReport",
    "restore",
    "reference",
    "scaled_dot_product_attention",
    "softmax",
    "use_backend",
]
