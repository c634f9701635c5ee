"""Building blocks shared by the reference models: attention and "Add & Norm", plain or fused.

Every function takes ``fused`` and ``backend``: with ``fused=False`` it is plain PyTorch (the
oracle the fused path is tested against, runnable in float64); with ``fused=True`` it calls the
public ops of :mod:`fused_attn` (looked up on :mod:`fused_attn.ops` at call time) and passes
``backend`` to every one of them.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.utils._pytree as pytree
import torch.nn.functional as F
from torch import nn

from .. import ops as fused_ops
from ..nn.transformer import must_call
from ..reference.attention import causal_keep
from ..reference.ffn import activate

# Activation names (Hugging Face spellings included) -> the fused kernels' activation code (a GELU's
# ``approximate``, or "relu").
ACTIVATIONS = {
    "gelu": "none",
    "gelu_new": "tanh",
    "gelu_pytorch_tanh": "tanh",
    "gelu_tanh": "tanh",
    "relu": "relu",
}


def model_output(cls: type) -> type:
    """A model's output: a dataclass that is also a pytree node (its fields the children, as
    Hugging Face's ``ModelOutput``), so that ``torch.export`` takes a model returning it whole,
    ``torch.export.save`` writes it by name, and ``torch.func`` transforms (``vjp``, ``jacrev``
    of ``functional_call``), which take only tensors and pytrees of them, take it."""
    cls = dataclasses.dataclass(cls)
    pytree.register_dataclass(cls, serialized_type_name=f"{cls.__module__}.{cls.__qualname__}")
    return cls


def activation_code(activation: str) -> str:
    try:
        return ACTIVATIONS[activation]
    except (KeyError, TypeError):
        raise ValueError(f"unsupported activation {activation!r}; expected one of {sorted(ACTIVATIONS)}") from None


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, L, H * D] -> [B, H, L, D] (a view; the fused attention reads it through its strides)."""
    batch, length, width = x.shape
    return x.view(batch, length, heads, width // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, L, D] -> [B, L, H * D]."""
    batch, heads, length, dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * dim)


def plain_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    keep: torch.Tensor | None,
    is_causal: bool,
    dropout_p: float,
) -> torch.Tensor:
    """``softmax(q k^T / sqrt(D) + mask) v`` in plain PyTorch, masks as the fused op reads them.

    ``keep`` is a bool mask (True = attend) broadcastable to [B, H, Lq, Lk]; ``is_causal`` lets
    query i see keys j <= i (top-left aligned). A query whose every key is masked gets 0 (as the
    fused kernels do), with zero gradients: the fully masked rows are neutralised before the
    softmax so that no NaN enters the graph.
    """
    scores = torch.matmul(query, key.transpose(-2, -1)) * (1.0 / math.sqrt(query.shape[-1]))
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    if is_causal:
        q_len, k_len = scores.shape[-2:]
        scores = scores.masked_fill(~causal_keep(q_len, k_len, scores.device), float("-inf"))
    fully_masked = (scores == float("-inf")).all(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(fully_masked, 0.0), dim=-1).masked_fill(fully_masked, 0.0)
    if dropout_p > 0.0:
        probs = F.dropout(probs, dropout_p, training=True)
    return torch.matmul(probs, value)


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    keep: torch.Tensor | None,
    *,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    fused: bool,
    backend: str | None,
) -> torch.Tensor:
    """Multi-head attention core on [B, H, L, D] tensors; ``keep`` [B, 1, 1, Lk] bool or None.

    The fused path hands the [B, 1, 1, Lk] mask to the op as it is (never expanded) and
    combines it with ``is_causal``.
    """
    if fused:
        return fused_ops.scaled_dot_product_attention(
            query, key, value, attn_mask=keep, dropout_p=dropout_p, is_causal=is_causal, backend=backend
        )
    return plain_attention(query, key, value, keep, is_causal, dropout_p)


def layer_norm(x: torch.Tensor, norm: nn.LayerNorm, *, fused: bool, backend: str | None) -> torch.Tensor:
    if fused:
        return fused_ops.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps, backend=backend)
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def linear_activation(
    x: torch.Tensor, dense: nn.Linear, code: str, *, fused: bool, backend: str | None
) -> torch.Tensor:
    """``act(dense(x))`` for an activation code (GELU or ReLU); fused, it reads ``dense``'s weights,
    unless ``dense`` must be called (:func:`~fused_attn.nn.transformer.must_call`: hooks on it, e.g.
    ``torch.nn.utils.prune``'s, or a linear other than ``nn.Linear``, e.g. a dynamically quantized
    one): then the plain path, with a FallbackWarning once."""
    if fused and not must_call(dense):
        return fused_ops.linear_activation(x, dense.weight, dense.bias, code, backend=backend)
    return activate(dense(x), code)


def add_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    dense: nn.Linear,
    norm: nn.LayerNorm,
    dropout_p: float,
    *,
    fused: bool,
    backend: str | None,
    return_prenorm: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``norm(residual + dropout(dense(x)))`` (and the pre-norm sum with ``return_prenorm``).

    Fused: the GEMM runs without its bias, and fused_attn.add_layer_norm adds the bias, applies
    the dropout, adds the residual and normalises in one pass; unless ``dense`` must be called
    (:func:`linear_gelu`).
    """
    if fused and not must_call(dense):
        return fused_ops.add_layer_norm(
            F.linear(x, dense.weight), residual, norm.weight, norm.bias, norm.eps, dropout_p,
            input_bias=dense.bias, return_prenorm=return_prenorm, backend=backend,
        )
    prenorm = residual + F.dropout(dense(x), dropout_p, training=dropout_p > 0.0)
    out = F.layer_norm(prenorm, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    return (out, prenorm) if return_prenorm else out


def key_keep_mask(mask: torch.Tensor | None, *, pad_is_true: bool) -> torch.Tensor | None:
    """A [B, L] padding mask -> the [B, 1, 1, L] bool mask (True = attend) the attention takes.

    ``pad_is_true``: True for torch's key_padding_mask convention (True = pad), False for
    Hugging Face's attention_mask (1 = attend, 0 = pad).
    """
    if mask is None:
        return None
    if mask.dim() != 2:
        raise ValueError(f"padding masks must have shape [batch, length], got {list(mask.shape)}")
    keep = mask.to(torch.bool)
    if pad_is_true:
        keep = ~keep
    return keep[:, None, None, :]
