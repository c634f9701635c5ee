"""Hugging Face ``transformers``: fused BERT-family models (BERT, RoBERTa and models sharing their blocks).

:func:`fused_attn.optimize` on such a model (when ``transformers`` is installed):

* registers :func:`fused_attention_forward` as the attention function ``"fused_attn"`` (with
  the SDPA-style boolean mask) in transformers' ``AttentionInterface`` and switches the model's
  ``attn_implementation`` to it;
* turns each ``*SelfOutput`` / ``*Output`` block (``LayerNorm(dropout(dense(h)) + residual)``)
  into one GEMM plus one :func:`fused_attn.add_layer_norm` pass (the dense bias rides in it);
* turns each ``*Intermediate`` block with a GELU (``gelu``, ``gelu_new``, ``gelu_pytorch_tanh``)
  into :func:`fused_attn.linear_gelu`;
* converts the remaining ``LayerNorm`` modules (embeddings, prediction heads).

Parameters and ``state_dict`` are untouched; :func:`fused_attn.restore` undoes all of it.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

from .. import convert
from ..ops import add_layer_norm, linear_gelu, scaled_dot_product_attention

ATTENTION_NAME = "fused_attn"
_FUSED_CLASSES: dict[type, type] = {}
_ORIGINAL_ATTENTION = "_fused_attn_original_attn_implementation"


def fused_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface: [B, H, L, D] in, ([B, L, H, D], None) out."""
    causal = getattr(module, "is_causal", False) if is_causal is None else is_causal
    # As transformers' SDPA path: an explicit mask already carries any causal structure.
    causal = bool(causal and attention_mask is None and query.shape[2] > 1)
    if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[2] != query.shape[2]:
        attention_mask = attention_mask[:, :, -query.shape[2]:]
    backend = getattr(module.config, "fused_attn_backend", None) if hasattr(module, "config") else None
    out = scaled_dot_product_attention(query, key, value, attention_mask, dropout, causal, scaling, backend=backend)
    return out.transpose(1, 2).contiguous(), None


def _add_norm_forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
    p = self.dropout.p if self.training else 0.0
    h = F.linear(hidden_states, self.dense.weight)
    return add_layer_norm(
        h, input_tensor, self.LayerNorm.weight, self.LayerNorm.bias, self.LayerNorm.eps, p, self.dense.bias,
        backend=self.fused_attn_backend,
    )


def _gelu_approximation(activation: object) -> str | None:
    from transformers import activations

    if isinstance(activation, activations.GELUActivation) or activation is F.gelu:
        return "none"
    tanh_kinds = tuple(
        getattr(activations, name) for name in ("NewGELUActivation", "GELUTanh", "PytorchGELUTanh", "FastGELUActivation")
        if hasattr(activations, name)
    )
    if isinstance(activation, tanh_kinds):
        return "tanh"
    if isinstance(activation, nn.GELU):
        return activation.approximate
    return None


def _intermediate_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return linear_gelu(
        hidden_states, self.dense.weight, self.dense.bias, self.fused_attn_approximate, backend=self.fused_attn_backend
    )


def _fused_class(cls: type, forward) -> type:
    if cls not in _FUSED_CLASSES:
        _FUSED_CLASSES[cls] = type(f"Fused{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__})
    return _FUSED_CLASSES[cls]


def _is_add_norm_block(module: nn.Module) -> bool:
    name = type(module).__name__
    return (
        name.endswith("Output")
        and isinstance(getattr(module, "dense", None), nn.Linear)
        and isinstance(getattr(module, "LayerNorm", None), nn.LayerNorm)
        and isinstance(getattr(module, "dropout", None), nn.Dropout)
    )


def _is_intermediate_block(module: nn.Module) -> bool:
    return type(module).__name__.endswith("Intermediate") and isinstance(getattr(module, "dense", None), nn.Linear)


def _matches(module: nn.Module) -> bool:
    if importlib.util.find_spec("transformers") is None:
        return False
    from transformers import PreTrainedModel

    model_type = getattr(getattr(module, "config", None), "model_type", None)
    return isinstance(module, PreTrainedModel) and model_type in ("bert", "roberta", "xlm-roberta", "camembert")


def _convert(model: nn.Module, backend: str | None):
    """Fuses a BERT-family model in place; returns (replaced, kept) rows for the report."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, fused_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    replaced, kept = [], []
    config = model.config
    if _ORIGINAL_ATTENTION not in model.__dict__:
        setattr(model, _ORIGINAL_ATTENTION, config._attn_implementation)
    model.set_attn_implementation(ATTENTION_NAME)
    config.fused_attn_backend = backend
    replaced.append(("", f"attention {getattr(model, _ORIGINAL_ATTENTION)}", f"attention {ATTENTION_NAME}"))
    head_dim = config.hidden_size // config.num_attention_heads
    low, high = convert.HEAD_DIM_LIMITS["head_dim"]
    if not low <= head_dim <= high:
        kept.append(("", "attention", f"head_dim {head_dim} outside [{low}, {high}]: the fused op falls back"))
    for path, module in model.named_modules():
        if type(module) in _FUSED_CLASSES.values():
            continue
        if _is_add_norm_block(module):
            new_cls = _fused_class(type(module), _add_norm_forward)
        elif _is_intermediate_block(module):
            approximate = _gelu_approximation(getattr(module, "intermediate_act_fn", None))
            if approximate is None:
                kept.append((path, type(module).__name__, "activation is not a GELU"))
                continue
            module.fused_attn_approximate = approximate
            new_cls = _fused_class(type(module), _intermediate_forward)
        elif type(module) is nn.LayerNorm:
            new_cls = convert.FusedLayerNorm
            module.backend = backend
        else:
            continue
        setattr(module, convert.ORIGINAL_CLASS, type(module))
        module.fused_attn_backend = backend
        replaced.append((path, type(module).__name__, new_cls.__name__))
        module.__class__ = new_cls
    return replaced, kept


def _restore(model: nn.Module) -> None:
    original = model.__dict__.pop(_ORIGINAL_ATTENTION, None)
    if original is not None:
        model.set_attn_implementation(original)


convert.register_model_converter(_matches, _convert, _restore)
