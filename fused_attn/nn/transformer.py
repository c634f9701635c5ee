"""Fused FFN and Transformer encoder/decoder layers matching ``torch.nn``'s.

The layers subclass their ``torch.nn`` counterparts, so constructors, parameter names and
``state_dict`` are the same; their attention runs in :class:`FusedMultiheadAttention` and every
"dropout + residual add + LayerNorm" in one :func:`fused_attn.add_layer_norm` pass. A GELU
feed-forward uses :func:`fused_attn.linear_gelu` (and :func:`fused_attn.ffn`, which keeps only the
pre-activation for the backward, when its inner dropout is inactive); another activation runs
as plain ``linear -> activation -> linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import add_layer_norm, ffn, linear_gelu
from .attention import FusedMultiheadAttention
from .layer_norm import FusedLayerNorm


def _gelu_approximation(activation: object) -> str | None:
    """'none'/'tanh' when ``activation`` is a GELU the fused kernels compute, else None."""
    if activation is F.gelu:
        return "none"
    if isinstance(activation, nn.GELU):
        return activation.approximate
    return None


def feed_forward(
    x: torch.Tensor, linear1: nn.Linear, dropout: nn.Dropout, linear2: nn.Linear, activation, backend: str | None
) -> torch.Tensor:
    """``linear2(dropout(activation(linear1(x))))`` — fused where the activation is a GELU."""
    approximate = _gelu_approximation(activation)
    if approximate is None:
        return linear2(dropout(activation(linear1(x))))
    if not (dropout.training and dropout.p > 0.0):
        return ffn(x, linear1.weight, linear1.bias, linear2.weight, linear2.bias, approximate, backend=backend)
    return linear2(dropout(linear_gelu(x, linear1.weight, linear1.bias, approximate, backend=backend)))


def _add_norm(
    x: torch.Tensor, residual: torch.Tensor, norm: nn.LayerNorm, dropout: nn.Dropout, backend: str | None, **kwargs
):
    """``norm(residual + dropout(x))`` in one pass."""
    p = dropout.p if dropout.training else 0.0
    return add_layer_norm(x, residual, norm.weight, norm.bias, norm.eps, p, backend=backend, **kwargs)


def _drop(x: torch.Tensor, dropout: nn.Dropout) -> torch.Tensor:
    return dropout(x) if dropout.training and dropout.p > 0.0 else x


class FusedFFN(nn.Module):
    """Position-wise feed-forward block ``linear2(dropout(activation(linear1(x))))``.

    Parameters ``linear1`` and ``linear2`` as in :class:`torch.nn.TransformerEncoderLayer`.
    ``activation`` is "gelu" (default), "gelu_tanh", "relu" or a callable; GELUs run fused.
    """

    backend: str | None = None

    def __init__(
        self,
        d_model: int,
        dim_feedforward: int,
        dropout: float = 0.1,
        activation: str | object = "gelu",
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias, **factory)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias, **factory)
        activations = {"gelu": F.gelu, "gelu_tanh": nn.GELU(approximate="tanh"), "relu": F.relu}
        if isinstance(activation, str) and activation not in activations:
            raise ValueError(f"activation must be one of {sorted(activations)} or a callable, got {activation!r}")
        self.activation = activations.get(activation, activation) if isinstance(activation, str) else activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return feed_forward(x, self.linear1, self.dropout, self.linear2, self.activation, self.backend)


def _fuse_children(layer: nn.Module, attention: tuple[str, ...], norms: tuple[str, ...]) -> None:
    """Turns a freshly built torch layer's attention and norms into their fused subclasses in place."""
    for name in attention:
        getattr(layer, name).__class__ = FusedMultiheadAttention
    for name in norms:
        getattr(layer, name).__class__ = FusedLayerNorm


class FusedTransformerEncoderLayer(nn.TransformerEncoderLayer):
    """:class:`torch.nn.TransformerEncoderLayer` on the fused kernels (same constructor and weights).

    Post-LN: ``norm1(x + dropout1(attn(x)))`` and ``norm2(x + dropout2(ffn(x)))`` are each one
    add_layer_norm pass. Pre-LN: the residual add after attention is fused with ``norm2``
    (add_layer_norm returns both the normalised and the pre-norm sum).
    """

    backend: str | None = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _fuse_children(self, ("self_attn",), ("norm1", "norm2"))

    def _attend(self, x, attn_mask, key_padding_mask, is_causal):
        return self.self_attn(
            x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask, is_causal=is_causal, need_weights=False
        )[0]

    def _ff(self, x):
        return feed_forward(x, self.linear1, self.dropout, self.linear2, self.activation, self.backend)

    def forward(
        self,
        src: torch.Tensor,
        src_mask: torch.Tensor | None = None,
        src_key_padding_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        x = src
        if self.norm_first:
            attended = self._attend(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            normed, x = _add_norm(attended, x, self.norm2, self.dropout1, self.backend, return_prenorm=True)
            return x + _drop(self._ff(normed), self.dropout2)
        x = _add_norm(self._attend(x, src_mask, src_key_padding_mask, is_causal), x, self.norm1, self.dropout1, self.backend)
        return _add_norm(self._ff(x), x, self.norm2, self.dropout2, self.backend)


class FusedTransformerDecoderLayer(nn.TransformerDecoderLayer):
    """:class:`torch.nn.TransformerDecoderLayer` on the fused kernels (same constructor and weights)."""

    backend: str | None = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _fuse_children(self, ("self_attn", "multihead_attn"), ("norm1", "norm2", "norm3"))

    def _ff(self, x):
        return feed_forward(x, self.linear1, self.dropout, self.linear2, self.activation, self.backend)

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        tgt_mask: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        tgt_key_padding_mask: torch.Tensor | None = None,
        memory_key_padding_mask: torch.Tensor | None = None,
        tgt_is_causal: bool = False,
        memory_is_causal: bool = False,
    ) -> torch.Tensor:
        def self_attend(h):
            return self.self_attn(h, h, h, attn_mask=tgt_mask, key_padding_mask=tgt_key_padding_mask,
                                  is_causal=tgt_is_causal, need_weights=False)[0]

        def cross_attend(h):
            return self.multihead_attn(h, memory, memory, attn_mask=memory_mask,
                                       key_padding_mask=memory_key_padding_mask, is_causal=memory_is_causal,
                                       need_weights=False)[0]

        x = tgt
        if self.norm_first:
            normed, x = _add_norm(self_attend(self.norm1(x)), x, self.norm2, self.dropout1, self.backend,
                                  return_prenorm=True)
            normed, x = _add_norm(cross_attend(normed), x, self.norm3, self.dropout2, self.backend,
                                  return_prenorm=True)
            return x + _drop(self._ff(normed), self.dropout3)
        x = _add_norm(self_attend(x), x, self.norm1, self.dropout1, self.backend)
        x = _add_norm(cross_attend(x), x, self.norm2, self.dropout2, self.backend)
        return _add_norm(self._ff(x), x, self.norm3, self.dropout3, self.backend)
