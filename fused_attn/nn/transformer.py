"""Fused FFN and Transformer encoder/decoder layers matching ``torch.nn``'s.

The layers subclass their ``torch.nn`` counterparts, so constructors, parameter names and
``state_dict`` are the same; their attention runs in :class:`FusedMultiheadAttention` and every
"dropout + residual add + LayerNorm" in one :func:`fused_attn.add_layer_norm` pass. A GELU or
ReLU feed-forward (torch's layers default to ReLU) runs :func:`fused_attn.ffn`, which keeps only
the pre-activation for the backward, when its inner dropout is inactive, else the first linear and
its activation fused (:func:`fused_attn.linear_gelu`'s kernels), the dropout and the second linear;
another activation runs as plain ``linear -> activation -> linear``.

The fused path reads the weights of the layer's linear, norm and dropout submodules instead of
calling them, so hooks registered on those submodules would not run. A layer whose bypassed
submodules carry forward or backward hooks (e.g. ``torch.nn.utils.prune`` or the old
``weight_norm``, which recompute the weight in a pre-hook) runs torch's own forward for the call
instead, with a :class:`fused_attn.FallbackWarning` once per class; hooks on the attention modules
and on the layer itself run either way. Hooks marked with :func:`observer` (the package's memory
profiler) only watch and do not count.

The encoder layer also takes the nested tensors that ``torch.nn.TransformerEncoder`` hands its
layers in inference with a padding mask, and returns one, so the encoder gives what it gives with
torch's layers (zeros at the padded positions).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module
from torch.nn.utils import parametrize

from ..backends import warn_once
from ..ops import add_layer_norm, ffn
from ..ops.ffn import ffn_activation, linear_activation
from ._fused import Fused, FusedLayer
from .attention import FusedMultiheadAttention
from .layer_norm import FusedLayerNorm


_OBSERVER = "_fused_attn_observer"


def observer(hook):
    """Marks ``hook`` as one that only watches: a fused layer keeps its fused path when the
    submodules it bypasses carry no other hooks."""
    setattr(hook, _OBSERVER, True)
    return hook


def _hooks_of(*dicts) -> bool:
    # Empty dicts first: this runs on every forward of a fused layer.
    return any(d and any(not getattr(hook, _OBSERVER, False) for hook in d.values()) for d in dicts)


def _global_hooks() -> bool:
    return _hooks_of(_module._global_forward_pre_hooks, _module._global_forward_hooks,
                     _module._global_backward_pre_hooks, _module._global_backward_hooks)


def _own_hooks(module: nn.Module) -> bool:
    hooks = (module._forward_pre_hooks, module._forward_hooks, module._backward_pre_hooks, module._backward_hooks)
    return bool(hooks[0] or hooks[1] or hooks[2] or hooks[3]) and _hooks_of(*hooks)


def _bypassed_hooks(layer: nn.Module, called: tuple[str, ...] = ()) -> bool:
    """Whether a hook would miss a call the fused path does not make: one on a child of ``layer``
    other than those in ``called`` (which the fused path calls), or a global module hook."""
    if _global_hooks():
        return True
    called_children = [layer._modules.get(name) for name in called]
    for name, child in layer._modules.items():
        # A called child under another name too (an alias) is called all the same.
        if child is None or name in called or any(child is c for c in called_children):
            continue
        if _own_hooks(child):
            return True
    return False


def must_call(*linears: nn.Module) -> bool:
    """Whether the reference models' fused path must call ``linears`` rather than read their
    weights: a hook would miss the call (one on them, or a global module hook), or one is not a
    ``torch.nn.Linear`` (a dynamically quantized linear, whose ``weight`` is a method, a LoRA
    wrapper), whose computation the fused kernels do not reproduce. A FallbackWarning says so once."""
    if _global_hooks() or any(_own_hooks(m) for m in linears):
        warn_once("fused_attn reference model: hooks on a linear layer its fused path reads run the unfused "
                  "path, which calls it", 3)
        return True
    for linear in linears:
        why = _foreign(linear, (nn.Linear,))
        if why is not None:
            warn_once(f"fused_attn reference model: a linear layer is {why}: the unfused path calls it", 3)
            return True
    return False


def _warn_hooks(layer: nn.Module) -> None:
    warn_once(f"{type(layer).__name__}: hooks on its linear/norm/dropout submodules run torch's unfused forward, "
              "which calls them", 5)


# The submodules a fused layer reads (weights, eps, p) rather than calls, by name prefix (torch's
# layers, then transformers' BERT blocks), and the classes whose computation the fused kernels
# reproduce from what they read.
_READ_KINDS = (
    ("linear", (nn.Linear,)), ("norm", (nn.LayerNorm, FusedLayerNorm)), ("dropout", (nn.Dropout,)),
    ("dense", (nn.Linear,)), ("LayerNorm", (nn.LayerNorm, FusedLayerNorm)),
)
_KINDS_OF_NAME: dict[str, tuple[type, ...] | None] = {}


def _read_kinds(name: str) -> tuple[type, ...] | None:
    """The classes a submodule named ``name`` must be, or None for a name the fused forward does not read."""
    return next((kinds for prefix, kinds in _READ_KINDS if name.startswith(prefix)), None)


def _kinds_of(name: str) -> tuple[type, ...] | None:
    """``_read_kinds(name)``, remembered per name in eager calls. While torch.compile traces, looked
    up without the record: filled inside a trace, it would change under that trace's guard on it,
    and the compiled layer would recompile at its next call."""
    if torch.compiler.is_compiling():
        return _read_kinds(name)
    if name not in _KINDS_OF_NAME:
        _KINDS_OF_NAME[name] = _read_kinds(name)
    return _KINDS_OF_NAME[name]


def foreign_child(layer: nn.Module, reads: dict[str, tuple[type, ...]] | None = None) -> str | None:
    """Why the fused forward cannot stand for ``layer``'s: a linear, norm or dropout submodule that
    is not exactly the torch class whose computation the fused kernels reproduce (a LoRA linear,
    an RMSNorm, an Identity in place of a dropout), or None. ``reads`` names further submodules the
    fused forward reads, with the classes each must be. A parametrized submodule
    (``torch.nn.utils.parametrize``, e.g. weight_norm) counts as the class it was made from: its
    ``weight`` attribute, which the fused forward reads, is the parametrized weight."""
    for name, child in layer._modules.items():
        kinds = reads.get(name) if reads else None
        kinds = _kinds_of(name) if kinds is None else kinds
        if kinds is None:
            continue
        why = _foreign(child, kinds)
        if why is not None:
            return f"{name} is {why}"
    return None


def _foreign(module: nn.Module, kinds: tuple[type, ...]) -> str | None:
    """How ``module`` is not exactly one of ``kinds`` ("RMSNorm, not LayerNorm"), or None. A
    parametrized module counts as the class it was made from."""
    cls = type(module)
    if parametrize.is_parametrized(module):
        cls = cls.__bases__[0]  # register_parametrization derives one class from the module's own
    if cls in kinds:
        return None
    found, wanted = type(module), kinds[0]
    if found.__name__ == wanted.__name__:  # e.g. a quantized Linear: name the classes in full
        return f"{found.__module__}.{found.__qualname__}, not {wanted.__module__}.{wanted.__qualname__}"
    return f"{found.__name__}, not {wanted.__name__}"


def _unfused(layer: nn.Module, called: tuple[str, ...] = (), reads: dict[str, tuple[type, ...]] | None = None) -> bool:
    """Whether this call must run the unfused forward: hooks the fused one would bypass, or a foreign
    submodule (``foreign_child``'s, with ``reads``) (both with a FallbackWarning once)."""
    if _bypassed_hooks(layer, called):
        _warn_hooks(layer)
        return True
    why = foreign_child(layer, reads)
    if why is not None:
        warn_once(f"{type(layer).__name__}: {why}: torch's unfused forward serves it", 5)
        return True
    return False


def _gelu_approximation(activation: object) -> str | None:
    """'none'/'tanh' when ``activation`` is a GELU the fused kernels compute, else None."""
    if activation is F.gelu:
        return "none"
    if type(activation) is nn.GELU:  # exactly: a subclass may compute something else
        return activation.approximate
    return None


def activation_code(activation: object) -> str | None:
    """The kernels' code of ``activation`` (fused_attn.reference.ffn.ACTIVATION_CODES): a GELU's
    approximation, "relu" for F.relu, torch.relu or an nn.ReLU (exactly the class), else None."""
    approximate = _gelu_approximation(activation)
    if approximate is not None:
        return approximate
    if activation is F.relu or activation is torch.relu or type(activation) is nn.ReLU:
        return "relu"
    return None


def feed_forward(
    x: torch.Tensor, linear1: nn.Linear, dropout: nn.Dropout, linear2: nn.Linear, activation, backend: str | None
) -> torch.Tensor:
    """``linear2(dropout(activation(linear1(x))))`` — fused where the activation is a GELU or ReLU."""
    code = activation_code(activation)
    if code is None:
        return linear2(dropout(activation(linear1(x))))
    if not (dropout.training and dropout.p > 0.0):
        return ffn(x, linear1.weight, linear1.bias, linear2.weight, linear2.bias, **ffn_activation(code),
                   backend=backend)
    return linear2(dropout(linear_activation(x, linear1.weight, linear1.bias, code, backend=backend)))


def _add_norm(
    x: torch.Tensor, residual: torch.Tensor, norm: nn.LayerNorm, dropout: nn.Dropout, backend: str | None, **kwargs
):
    """``norm(residual + dropout(x))`` in one pass."""
    p = dropout.p if dropout.training else 0.0
    return add_layer_norm(x, residual, norm.weight, norm.bias, norm.eps, p, backend=backend, **kwargs)


def _drop(x: torch.Tensor, dropout: nn.Dropout) -> torch.Tensor:
    return dropout(x) if dropout.training and dropout.p > 0.0 else x


class FusedFFN(Fused, nn.Module):
    """Position-wise feed-forward block ``linear2(dropout(activation(linear1(x))))``.

    Parameters ``linear1`` and ``linear2`` as in :class:`torch.nn.TransformerEncoderLayer`.
    ``activation`` is "gelu" (default), "gelu_tanh", "relu" or a callable; GELUs and ReLU run fused.
    """

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
        if _unfused(self):
            return self.linear2(self.dropout(self.activation(self.linear1(x))))
        return feed_forward(x, self.linear1, self.dropout, self.linear2, self.activation, self.backend)


def _fuse_children(layer: nn.Module, attention: tuple[str, ...], norms: tuple[str, ...]) -> None:
    """Turns a freshly built torch layer's attention and norms into their fused subclasses in place."""
    for name in attention:
        getattr(layer, name).__class__ = FusedMultiheadAttention
    for name in norms:
        getattr(layer, name).__class__ = FusedLayerNorm


class FusedTransformerEncoderLayer(FusedLayer, nn.TransformerEncoderLayer):
    """:class:`torch.nn.TransformerEncoderLayer` on the fused kernels (same constructor and weights).

    Post-LN: ``norm1(x + dropout1(attn(x)))`` and ``norm2(x + dropout2(ffn(x)))`` are each one
    add_layer_norm pass. Pre-LN: the residual add after attention is fused with ``norm2``
    (add_layer_norm returns both the normalised and the pre-norm sum).
    """

    _fused_children = ("self_attn", "norm1", "norm2")

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
        if src.is_nested:
            return self._forward_nested(src, src_mask, is_causal)
        if _unfused(self, ("self_attn",)):
            return super().forward(src, src_mask, src_key_padding_mask, is_causal)
        x = src
        if self.norm_first:
            attended = self._attend(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            normed, x = _add_norm(attended, x, self.norm2, self.dropout1, self.backend, return_prenorm=True)
            return x + _drop(self._ff(normed), self.dropout2)
        x = _add_norm(self._attend(x, src_mask, src_key_padding_mask, is_causal), x, self.norm1, self.dropout1, self.backend)
        return _add_norm(self._ff(x), x, self.norm2, self.dropout2, self.backend)

    def _forward_nested(self, src: torch.Tensor, src_mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
        # torch.nn.TransformerEncoder's inference path packs the unpadded sequences into a nested
        # tensor and drops the padding mask: run them padded, masking the padding again as keys.
        if not self.self_attn.batch_first:
            raise ValueError(
                "src is a nested tensor (its sequences along dim 0, as batch_first) but this layer has "
                "batch_first=False; torch's layer does not take one either"
            )
        lengths = [t.shape[0] for t in src.unbind()]
        padded = src.to_padded_tensor(0.0)
        positions = torch.arange(padded.shape[1], device=padded.device)
        padding = positions[None, :] >= torch.tensor(lengths, device=padded.device)[:, None]
        out = self.forward(padded, src_mask, padding, is_causal)
        return torch.nested.as_nested_tensor([out[i, :n] for i, n in enumerate(lengths)])


class FusedTransformerDecoderLayer(FusedLayer, nn.TransformerDecoderLayer):
    """:class:`torch.nn.TransformerDecoderLayer` on the fused kernels (same constructor and weights)."""

    _fused_children = ("self_attn", "multihead_attn", "norm1", "norm2", "norm3")

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
        if _unfused(self, ("self_attn", "multihead_attn")):
            return super().forward(tgt, memory, tgt_mask, memory_mask, tgt_key_padding_mask, memory_key_padding_mask,
                                   tgt_is_causal, memory_is_causal)

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
