"""Hugging Face ``transformers``: fused attention for its models, fused blocks for BERT's.

:func:`fused_attn.optimize` on a transformers model (when ``transformers`` is installed):

* if the model's attention goes through transformers' ``AttentionInterface`` (an attention
  module whose forward looks its function up in ``ALL_ATTENTION_FUNCTIONS``: BERT, RoBERTa,
  ELECTRA, DistilBERT, ViT, GPT-2, Llama, Mistral, T5, BART, ...), registers
  :func:`fused_attention_forward` as the attention function ``"fused_attn"`` (with the SDPA-style
  boolean mask) and switches the model's ``attn_implementation`` to it; a model whose attention
  does not (DeBERTa, Longformer) keeps it, with a line in the report;
* turns each block whose forward is BERT's ``BertSelfOutput`` / ``BertOutput`` forward
  (``LayerNorm(dropout(dense(h)) + residual)``: BERT, RoBERTa, ELECTRA and the many models that
  copy the block) into one GEMM plus one :func:`fused_attn.add_layer_norm` pass (the dense bias
  rides in it), and each block whose forward is ``BertIntermediate``'s, with a GELU (``gelu``,
  ``gelu_new``, ``gelu_pytorch_tanh``), into :func:`fused_attn.linear_gelu`. A block is
  recognised by its forward's bytecode being BERT's, not by its name, so a block that computes
  anything else (a pre-LN variant, another activation) is never taken for one;
* converts the remaining ``torch.nn.LayerNorm`` modules (embeddings, prediction heads, GPT-2's
  and ViT's pre-norms).

A model is converted as a whole when the transformers models inside it share its config (a task
head and its base model); a composite one (T5's two stacks, an encoder-decoder pair, a vision
tower next to a language model) is converted model by model. The switch is made on the model's
own copy of its config (other models built from the same config object keep theirs); the backend
is held by the model's modules, not by the config, so ``save_pretrained`` writes the config as it
was. Parameters and ``state_dict`` are untouched; :func:`fused_attn.restore` undoes all of it.
An optimized model pickles (``torch.save(model)``) and loads in a fresh process. With
``output_attentions`` the probabilities come from :func:`fused_attn.softmax` and are returned,
as the eager implementation returns them. :func:`register_attention` lets a model select the
fused attention itself, without :func:`fused_attn.optimize`.
"""

from __future__ import annotations

import functools
import inspect
import sys

import torch
import torch.nn.functional as F
from torch import nn

from .. import convert
from ..nn.transformer import _gelu_approximation, _unfused, foreign_child
from ..ops import add_layer_norm, linear_gelu, scaled_dot_product_attention, softmax
from ..ops.attention import repeat_kv_heads

ATTENTION_NAME = "fused_attn"
_FUSED_CLASSES: dict[tuple[type, str], type] = {}


# Arguments of transformers' attention interface that change the attention itself and that the
# fused path does not implement (as transformers' own sdpa path does not): refused, never ignored.
_UNSUPPORTED_KWARGS = {
    "softcap": "logit soft-capping",
    "s_aux": "attention sinks",
    "sinks": "attention sinks",
}


def fused_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    is_causal: bool | None = None,
    position_bias: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface: [B, H, L, D] in, ([B, L, H, D], weights) out;
    the weights ([B, H, L, S], after dropout as eager returns them) only when
    ``output_attentions`` asks for them, else None. Key and value may have fewer heads than the
    query (grouped-query models hand them over unrepeated): they go to the kernels as they are.
    ``position_bias`` (T5's relative attention bias, added to the scores) joins the mask as a
    floating mask, and receives its gradient (a query whose every key is masked gets 0, as
    everywhere in this package, where transformers' finite fill averages the bias); ``softcap``
    and attention sinks (``s_aux``, ``sinks``) raise a ValueError, as transformers' sdpa path does
    for the first."""
    for name, what in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"the fused_attn attention does not support {what} ({name}); use 'eager' for this model")
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal  # sdpa's default
    # As transformers' SDPA path: an explicit mask already carries any causal structure.
    causal = bool(causal and attention_mask is None and query.shape[2] > 1)
    if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[2] != query.shape[2]:
        attention_mask = attention_mask[:, :, -query.shape[2]:]
    if position_bias is not None:
        # Added to the scores under the mask: a boolean mask hides keys (-inf), a floating one adds.
        if attention_mask is None:
            attention_mask = position_bias
        elif attention_mask.dtype == torch.bool:
            attention_mask = position_bias.masked_fill(~attention_mask, float("-inf"))
        else:
            attention_mask = position_bias + attention_mask
    backend = getattr(module, "fused_attn_backend", None)
    if kwargs.get("output_attentions") or getattr(getattr(module, "config", None), "output_attentions", False):
        # The caller wants the probabilities: one fused softmax pass over the scores, then P V.
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        key, value = repeat_kv_heads(key, query.shape[1]), repeat_kv_heads(value, query.shape[1])
        weights = softmax(query @ key.transpose(-1, -2), -1, attention_mask, scale, causal, backend=backend)
        weights = F.dropout(weights, dropout) if dropout > 0.0 else weights
        return (weights @ value).transpose(1, 2).contiguous(), weights
    out = scaled_dot_product_attention(query, key, value, attention_mask, dropout, causal, scaling,
                                       enable_gqa=key.shape[1] != query.shape[1], backend=backend)
    return out.transpose(1, 2).contiguous(), None


def _add_norm_forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
    if _unfused(self):
        return self._fused_attn_of[0].forward(self, hidden_states, input_tensor)
    p = self.dropout.p if self.dropout.training else 0.0  # as nn.Dropout decides, not the block
    h = F.linear(hidden_states, self.dense.weight)
    return add_layer_norm(
        h, input_tensor, self.LayerNorm.weight, self.LayerNorm.bias, self.LayerNorm.eps, p, self.dense.bias,
        backend=self.fused_attn_backend,
    )


def _hf_gelu_approximation(activation: object) -> str | None:
    """'none'/'tanh' when ``activation`` is one of transformers' GELUs (or torch's) that the fused
    kernels compute, else None. By exact type, as for torch's: a subclass may compute something else."""
    from transformers import activations

    kinds = {"GELUActivation": "none", "NewGELUActivation": "tanh", "GELUTanh": "tanh", "PytorchGELUTanh": "tanh",
             "FastGELUActivation": "tanh"}
    for name, approximate in kinds.items():
        if type(activation) is getattr(activations, name, None):
            return approximate
    return _gelu_approximation(activation)


def _intermediate_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    activation = self.intermediate_act_fn
    if activation is not getattr(self, "fused_attn_activation", None):
        # Replaced since optimize(): fused again if it is a GELU too, else transformers' forward.
        self.fused_attn_approximate = _hf_gelu_approximation(activation)
        self.fused_attn_activation = activation
    if self.fused_attn_approximate is None or _unfused(self):
        return self._fused_attn_of[0].forward(self, hidden_states)
    return linear_gelu(
        hidden_states, self.dense.weight, self.dense.bias, self.fused_attn_approximate, backend=self.fused_attn_backend
    )


_FORWARDS = {"add_norm": _add_norm_forward, "intermediate": _intermediate_forward}


def _reduce_fused(self, protocol):
    # The fused classes are made at run time, so pickle cannot find them by name: an instance
    # pickles as (its original class, its kind) and is remade through _fused_class on loading.
    original, kind = self._fused_attn_of
    return _new_fused, (original, kind), self.__getstate__()


def _new_fused(original: type, kind: str) -> nn.Module:
    _register()
    return object.__new__(_fused_class(original, kind))


def _fused_class(cls: type, kind: str) -> type:
    if (cls, kind) not in _FUSED_CLASSES:
        _FUSED_CLASSES[cls, kind] = type(f"Fused{cls.__name__}", (cls,), {
            "forward": _FORWARDS[kind], "__module__": __name__, "__reduce_ex__": _reduce_fused,
            "_fused_attn_of": (cls, kind),
        })
    return _FUSED_CLASSES[cls, kind]


def _code_identity(fn: object) -> tuple | None:
    """What a function computes, as far as its own code says: its bytecode with the names and
    constants it uses (not its docstring, name or line numbers); None for what has no code."""
    code = getattr(inspect.unwrap(fn), "__code__", None) if fn is not None else None
    if code is None:
        return None
    doc = getattr(fn, "__doc__", None)
    consts = tuple(c for c in code.co_consts if not (doc is not None and c is doc))
    return code.co_code, code.co_names, code.co_varnames, code.co_freevars, code.co_argcount, consts


@functools.cache
def _bert_forward(block: str) -> tuple | None:
    from transformers.models.bert import modeling_bert

    return _code_identity(getattr(modeling_bert, block).forward)


def _is_add_norm_block(module: nn.Module) -> bool:
    """A block that computes BERT's ``LayerNorm(dropout(dense(h)) + residual)``: BertSelfOutput's
    forward (BertOutput's is the same code) over torch's Linear, LayerNorm and Dropout."""
    return (
        isinstance(getattr(module, "dense", None), nn.Linear)
        and isinstance(getattr(module, "LayerNorm", None), nn.LayerNorm)
        and isinstance(getattr(module, "dropout", None), nn.Dropout)
        and _code_identity(type(module).forward) == _bert_forward("BertSelfOutput")
    )


def _is_intermediate_block(module: nn.Module) -> bool:
    """A block that computes BERT's ``act(dense(h))`` (BertIntermediate's forward)."""
    return (
        isinstance(getattr(module, "dense", None), nn.Linear)
        and _code_identity(type(module).forward) == _bert_forward("BertIntermediate")
    )


def _is_pretrained_model(module: nn.Module) -> bool:
    if "transformers" not in sys.modules:
        return False  # then no module is one of its models
    from transformers import PreTrainedModel

    return isinstance(module, PreTrainedModel)


def _matches(module: nn.Module) -> bool:
    """A transformers model whose transformers submodels all share its config (a task head and
    its base model): converted whole. A composite one (submodels with configs of their own, as
    T5's stacks or an encoder-decoder pair) is not: its submodels are, one by one."""
    if not _is_pretrained_model(module):
        return False
    own = convert.base_config(module.config)
    return all(convert.base_config(m.config) is own for m in module.modules() if _is_pretrained_model(m))


def _attention_through_interface(model: nn.Module) -> bool:
    """Whether an attention module of ``model`` looks its function up in transformers'
    ``ALL_ATTENTION_FUNCTIONS`` (so that ``attn_implementation`` selects what it runs)."""
    for module in model.modules():
        code = getattr(inspect.unwrap(getattr(type(module), "forward", None)), "__code__", None)
        if code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names:
            return True
    return False


def _head_dim(config: object) -> int | None:
    """The attention head dim a transformers config declares, None where it declares none."""
    for name in ("head_dim", "d_kv", "attention_head_size"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
        return hidden // heads
    return None


def register_attention() -> str:
    """Registers the fused attention with transformers' attention interface (with the sdpa mask
    function) as ``"fused_attn"`` and returns that name, for models that :func:`fused_attn.optimize`
    does not convert whole: ``model.set_attn_implementation(register_attention())``. It serves what
    transformers' sdpa implementation serves, grouped key/value heads and T5's position bias
    included, and refuses soft-capping and attention sinks (:func:`fused_attention_forward`)."""
    _register()
    return ATTENTION_NAME


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, fused_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def _convert(model: nn.Module, backend: str | None):
    """Fuses a transformers model in place (see the module docstring); returns (replaced, kept) rows
    for the report."""
    reason = convert.dtype_reason(model)
    if reason is not None:
        return [], [("", type(model).__name__, reason)]
    _register()
    replaced, kept = [], []
    original_attention = convert.original_config(model)._attn_implementation
    config = convert.own_config(model)
    head_dim = _head_dim(config)
    low, high = convert.HEAD_DIM_LIMITS["head_dim"]
    # Where no fused kernel serves it, the model keeps the attention it was built with.
    if not _attention_through_interface(model):
        if any("Attention" in type(m).__name__ for m in model.modules()):
            kept.append(("", f"attention {original_attention}",
                         f"{type(model).__name__}'s attention does not go through transformers' attention interface"))
    elif head_dim is None:
        kept.append(("", f"attention {original_attention}", "the config declares no head dim"))
    elif low <= head_dim <= high:
        model.set_attn_implementation(ATTENTION_NAME)
        replaced.append(("", f"attention {original_attention}", f"attention {ATTENTION_NAME}"))
    else:
        kept.append(("", f"attention {original_attention}", f"head_dim {head_dim} outside [{low}, {high}]"))
    for path, module in model.named_modules():
        module.fused_attn_backend = backend  # read by fused_attention_forward and the fused blocks
        if convert.ORIGINAL_CLASS in module.__dict__:
            # Fused by an earlier optimize: it only takes this call's backend.
            if isinstance(module, convert.FusedLayerNorm):
                module.backend = backend
            replaced.append((path, module.__dict__[convert.ORIGINAL_CLASS].__name__, type(module).__name__))
            continue
        kind = "add_norm" if _is_add_norm_block(module) else "intermediate" if _is_intermediate_block(module) else None
        why = foreign_child(module) if kind is not None else None
        if why is not None:
            kept.append((path, type(module).__name__, why))
            continue
        if kind == "add_norm":
            new_cls = _fused_class(type(module), "add_norm")
        elif kind == "intermediate":
            approximate = _hf_gelu_approximation(getattr(module, "intermediate_act_fn", None))
            if approximate is None:
                kept.append((path, type(module).__name__, "activation is not a GELU"))
                continue
            module.fused_attn_approximate = approximate
            module.fused_attn_activation = module.intermediate_act_fn
            new_cls = _fused_class(type(module), "intermediate")
        elif type(module) is nn.LayerNorm:
            new_cls = convert.FusedLayerNorm
            module.backend = backend
        else:
            continue
        setattr(module, convert.ORIGINAL_CLASS, type(module))
        replaced.append((path, type(module).__name__, new_cls.__name__))
        module.__class__ = new_cls
    if not any(new.startswith("Fused") and new != "FusedLayerNorm" for _, _, new in replaced):
        kept.append(("", type(model).__name__, "no feed-forward or Add & Norm block computes BERT's (the forms "
                     "fused_attn fuses): attention and LayerNorm modules only"))
    return replaced, kept


def _restore(model: nn.Module) -> None:
    convert.restore_config(model)
    for module in model.modules():
        module.__dict__.pop("fused_attn_backend", None)


convert.register_model_converter(_matches, _convert, _restore)
