"""Public ops: validate the arguments, choose a backend, run a custom op with autograd."""

from .layer_norm import layer_norm

__all__ = ["layer_norm"]
