"""Hugging Face ``transformers``: fused attention for its models, fused blocks for its feed-forward
and BERT's blocks.

:func:`fused_attn.optimize` on a transformers model (when ``transformers`` is installed):

* registers :func:`fused_attention_forward` as the attention function ``"fused_attn"`` (with
  sdpa's boolean mask) and switches the model's ``attn_implementation`` to it where that
  function can stand for what the model runs: its attention modules look their function up in
  ``ALL_ATTENTION_FUNCTIONS`` (BERT, RoBERTa, ELECTRA, DistilBERT, ViT, GPT-2, Llama, Mistral,
  T5, BART, ...), it runs on sdpa or eager (not on another kernel chosen for it), transformers
  runs it on sdpa (whose semantics the fused function has: no soft-capping, no sinks, masks it
  builds for sdpa), its own code does not name sdpa to run differently under it (Gemma 4), its
  attention hands the function nothing it refuses (e.g. DeepSeek-V3.2's top-k ``indices``), its
  head dims, read from the attention modules, are ones the kernels serve, and its attention
  modules read the config that is switched. Otherwise the model keeps its attention, with the
  reason in the report;
* turns each block whose forward is BERT's ``BertSelfOutput`` / ``BertOutput`` forward
  (``LayerNorm(dropout(dense(h)) + residual)``: BERT, RoBERTa, ELECTRA and the many models that
  copy the block) into one GEMM plus one :func:`fused_attn.add_layer_norm` pass (the dense bias
  rides in it), and each block whose forward is ``BertIntermediate``'s, with a GELU (``gelu``,
  ``gelu_new``, ``gelu_pytorch_tanh``) or ReLU, into :func:`fused_attn.linear_gelu`'s kernels. A block is
  recognised by its forward compiling to the code the fused forward stands for
  (:func:`_bert_add_norm_forward`, :func:`_bert_intermediate_forward`), not by its name, so a
  block that computes anything else (a pre-LN variant, another activation) is not taken for one;
* runs each feed-forward block whose forward (DistilBERT's: ``ff_chunk``) chains two linear layers
  (torch's Linear, or transformers' Conv1D) around a GELU or ReLU, and a dropout after them or
  none, as one :func:`fused_attn.ffn` call: GPT-2's, GPT-NeoX's, GPT-J's and DistilBERT's, the
  MLPs of ViT, SigLIP, SAM, ... (the chain is read from the code's shape, whatever its names:
  :func:`_call_chain`);
* converts the remaining ``torch.nn.LayerNorm`` modules (embeddings, prediction heads, GPT-2's
  and ViT's pre-norms).

A model is converted as a whole when the transformers models inside it share its config (a task
head and its base model); a composite one (T5's two stacks, an encoder-decoder pair, a vision
tower next to a language model) is converted model by model, and its own layers get their blocks
and LayerNorms fused (an attention of its own, which would need its config switched, is kept and
reported). The switch is made on the model's own copy of its config (other models built from the
same config object keep theirs); the backend is held by the model's modules, not by the config,
so ``save_pretrained`` writes the config as it was. Parameters and ``state_dict`` are untouched;
:func:`fused_attn.restore` undoes all of it. An optimized model pickles (``torch.save(model)``)
and loads in a fresh process (a switched model carries a marker whose unpickling registers the
fused attention). When ``output_attentions`` reaches the attention function, or transformers'
output capture collects the attention modules' weights (GPT-2 tells the function nothing), the
probabilities come from :func:`fused_attn.softmax` and are returned, as the eager implementation
returns them. :func:`register_attention` lets a model select the fused attention itself, without
:func:`fused_attn.optimize`.
"""

from __future__ import annotations

import dis
import functools
import inspect
import sys
import types
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import convert
from ..nn.transformer import _unfused, activation_code, foreign_child
from ..ops import add_layer_norm, scaled_dot_product_attention, softmax
from ..ops.ffn import ffn, ffn_activation, linear_activation
from ..ops.attention import repeat_kv_heads
from ..reference.attention import causal_keep

ATTENTION_NAME = "fused_attn"
_FUSED_CLASSES: dict[tuple[type, str], type] = {}


# Arguments of transformers' attention interface that change the attention itself and that the
# fused path does not implement (as transformers' own sdpa path does not): refused, never ignored.
_UNSUPPORTED_KWARGS = {
    "softcap": "logit soft-capping",
    "s_aux": "attention sinks",
    "sinks": "attention sinks",
    "indices": "sparse attention over selected keys",
    "block_indices": "sparse attention over selected key blocks",
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
    ``output_attentions`` asks for them (or transformers' output capture collects them), else
    None. Key and value may have fewer heads than the query (grouped-query models hand them over
    unrepeated): they go to the kernels as they are.
    ``position_bias`` (T5's relative attention bias, added to the scores) joins the mask as a
    floating mask, and receives its gradient (a query whose every key is masked gets 0, as
    everywhere in this package, where transformers' finite fill averages the bias). ``head_mask``
    (transformers before 5 pass the one of ``model(head_mask=...)``, which eager attention
    multiplies the probabilities by) is taken where it is one factor per head (its last two dims
    1, as ``get_head_mask`` makes it): ``(P m) V = m (P V)``, so the output is scaled; any other
    raises a ValueError, as do ``softcap``,
    attention sinks (``s_aux``, ``sinks``) and sparse key selections (``indices``,
    ``block_indices``) raise a ValueError naming them (never ignored)."""
    for name, what in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"the fused_attn attention does not support {what} ({name}); use 'eager' for this model")
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal  # sdpa's default
    # As transformers' SDPA path: an explicit mask already carries any causal structure.
    causal = bool(causal and attention_mask is None and query.shape[2] > 1)
    row = getattr(attention_mask, _CAUSAL_ROW, None)
    if row is not None and query.shape[2] == key.shape[2] == row.shape[-1]:
        # The mask is causal within one padding row ([B, 1, 1, Lk], _compact_masks): the same with is_causal.
        attention_mask, causal = row, True
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
    head_mask = kwargs.get("head_mask")
    if head_mask is not None and (head_mask.dim() < 2 or head_mask.shape[-2:] != (1, 1)):
        raise ValueError(
            f"the fused_attn attention takes a head_mask of one factor per head (its last two dims 1), got shape "
            f"{list(head_mask.shape)}; use 'eager' for this model"
        )
    backend = getattr(module, "fused_attn_backend", None)
    if (kwargs.get("output_attentions") or getattr(getattr(module, "config", None), "output_attentions", False)
            or _attentions_captured()):
        # The caller wants the probabilities: one fused softmax pass over the scores, then P V.
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        key, value = repeat_kv_heads(key, query.shape[1]), repeat_kv_heads(value, query.shape[1])
        weights = softmax(query @ key.transpose(-1, -2), -1, attention_mask, scale, causal, backend=backend)
        weights = F.dropout(weights, dropout) if dropout > 0.0 else weights
        weights = weights if head_mask is None else weights * head_mask
        return (weights @ value).transpose(1, 2).contiguous(), weights
    out = scaled_dot_product_attention(query, key, value, attention_mask, dropout, causal, scaling,
                                       enable_gqa=key.shape[1] != query.shape[1], backend=backend)
    out = out if head_mask is None else out * head_mask
    return out.transpose(1, 2).contiguous(), None


def _attentions_captured() -> bool:
    """Whether transformers' output capture is collecting attention weights in this call: a model
    asked for ``output_attentions`` records them from its attention modules' outputs without
    telling the attention function (GPT-2 removes the argument), and the eager attention, which
    always returns them, has them recorded."""
    collector = _output_collector()
    if collector is None:
        return False
    if torch.compiler.is_compiling():
        # Dynamo (of older torch) cannot trace ContextVar.get: a model compiled whole keeps its
        # collector in transformers' compile-time global, read here; a part compiled alone does
        # not see the capture of an eager caller (as before transformers recorded outputs).
        collected = collector.global_var if collector.compiling else None
    else:
        collected = collector.get()
    return bool(collected) and any(key.endswith("attentions") for key in collected)


_COLLECTOR: list = []  # transformers' output-capture collector, or None: looked up once


def _output_collector():
    if not _COLLECTOR:
        try:
            from transformers.utils.output_capturing import _active_collector
        except ImportError:  # a transformers without output capture passes output_attentions on
            _active_collector = None
        _COLLECTOR.append(_active_collector if hasattr(_active_collector, "global_var") else None)
    return _COLLECTOR[0]


def _add_norm_forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
    if _unfused(self):
        return self._fused_attn_of[0].forward(self, hidden_states, input_tensor)
    p = self.dropout.p if self.dropout.training else 0.0  # as nn.Dropout decides, not the block
    h = F.linear(hidden_states, self.dense.weight)
    return add_layer_norm(
        h, input_tensor, self.LayerNorm.weight, self.LayerNorm.bias, self.LayerNorm.eps, p, self.dense.bias,
        backend=self.fused_attn_backend,
    )


def _hf_activation_code(activation: object) -> str | None:
    """The fused kernels' activation code of ``activation``: 'none'/'tanh' for one of transformers'
    GELUs (or torch's), 'relu' for ReLU (transformers' is torch's nn.ReLU), else None. By exact type,
    as for torch's: a subclass may compute something else."""
    from transformers import activations

    kinds = {"GELUActivation": "none", "NewGELUActivation": "tanh", "GELUTanh": "tanh", "PytorchGELUTanh": "tanh",
             "FastGELUActivation": "tanh"}
    for name, approximate in kinds.items():
        if type(activation) is getattr(activations, name, None):
            return approximate
    return activation_code(activation)


def _remember_activation(module: nn.Module, activation: object) -> None:
    """Marks the activation the fused forward was set up for. Kept in the instance's ``__dict__``:
    assigned as an attribute, a module would become a second child (in ``repr``, ``named_modules``,
    and, with parameters of its own, as duplicate ``state_dict`` keys)."""
    module.__dict__["fused_attn_activation"] = activation


def _current_activation_code(module: nn.Module, activation: object) -> str | None:
    """The activation code of ``activation``, which the module holds now: the one found when it was
    fused, or, for an activation replaced since optimize(), its own (None when it is not a GELU or
    ReLU: transformers' forward then serves the block)."""
    if activation is not getattr(module, "fused_attn_activation", None):
        module.fused_attn_activation_code = _hf_activation_code(activation)
        _remember_activation(module, activation)
    return module.fused_attn_activation_code


def _intermediate_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if _current_activation_code(self, self.intermediate_act_fn) is None or _unfused(self):
        return self._fused_attn_of[0].forward(self, hidden_states)
    return linear_activation(hidden_states, self.dense.weight, self.dense.bias, self.fused_attn_activation_code,
                             backend=self.fused_attn_backend)


# The feed-forward blocks fused whole: a method that chains three or four of the module's children,
# ``second(act(first(x)))`` and then, where there is one, a dropout, in any of these words (ViT's
# and CLIP's MLP: fc1, activation_fn, fc2; GPT-2's: c_fc, act, c_proj, dropout; GPT-NeoX's, GPT-J's,
# SAM's, LLaVA's projector ...; DistilBERT's FFN.ff_chunk: lin1, activation, lin2, dropout). The
# chain is read from the method's code with the names abstracted (_call_chain); first and second
# must be torch Linear layers or transformers' Conv1D (GPT-2's, its weight stored transposed), the
# fourth a torch Dropout, and the activation a GELU or ReLU, which fused_attn.ffn computes.
def _chain_in_place(self, x):
    x = self.first(x)
    x = self.activation(x)
    x = self.second(x)
    return x


def _chain_in_place_with_dropout(self, x):
    x = self.first(x)
    x = self.activation(x)
    x = self.second(x)
    x = self.dropout(x)
    return x


def _chain(self, x):
    h = self.first(x)
    h = self.activation(h)
    h = self.second(h)
    return h


def _chain_with_dropout(self, x):
    h = self.first(x)
    h = self.activation(h)
    h = self.second(h)
    h = self.dropout(h)
    return h


def _code_shape(fn: object) -> tuple[tuple, tuple[str, ...]] | None:
    """A function's code with its local variables numbered and the attributes it loads replaced by
    their order of first use, and those attribute names in that order; None for what has no code."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return None
    attributes: list[str] = []
    shape = []
    for i in dis.get_instructions(code):
        value = i.argval
        if i.opname in ("LOAD_ATTR", "LOAD_METHOD") and isinstance(value, str):
            if value not in attributes:
                attributes.append(value)
            value = ("attribute", attributes.index(value))
        elif "FAST" in i.opname:  # LOAD_FAST, STORE_FAST and their fused pairs (LOAD_FAST_LOAD_FAST, ...)
            names = value if isinstance(value, tuple) else (value,)
            value = tuple(code.co_varnames.index(n) if n in code.co_varnames else n for n in names)
        shape.append((i.opname, repr(value)))
    kind = code.co_flags & _CALL_FLAGS  # not the __future__ flags of the module it was compiled in
    return (code.co_argcount, code.co_kwonlyargcount, kind, tuple(shape)), tuple(attributes)


_CALL_FLAGS = (inspect.CO_VARARGS | inspect.CO_VARKEYWORDS | inspect.CO_GENERATOR | inspect.CO_COROUTINE
               | inspect.CO_ASYNC_GENERATOR)


_CHAIN_SHAPES = [_code_shape(chain)[0]
                 for chain in (_chain_in_place, _chain_in_place_with_dropout, _chain, _chain_with_dropout)]
# The methods a feed-forward block's chain may be in: the fused class overrides that method alone.
_MLP_METHODS = ("forward", "ff_chunk")


@functools.lru_cache(maxsize=None)
def _call_chain(fn: object) -> tuple[str, ...] | None:
    """(first, activation, second[, dropout]): the children ``fn`` chains, when its code is one of
    the chains above with other names, else None."""
    found = _code_shape(fn)
    if found is None or found[0] not in _CHAIN_SHAPES:
        return None
    return found[1]


def _linear_kinds() -> tuple[type, ...]:
    """The linear layers whose weights a fused feed-forward reads: torch's Linear, transformers' Conv1D."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return (nn.Linear,)
    return (nn.Linear, Conv1D)


def _mlp_reads(chain: tuple[str, ...]) -> dict[str, tuple[type, ...]]:
    """The classes the children of a feed-forward chain must be for the fused forward to read them."""
    linears = _linear_kinds()
    reads = {chain[0]: linears, chain[2]: linears}
    if len(chain) == 4:
        reads[chain[3]] = (nn.Dropout,)
    return reads


def _mlp_form(module: nn.Module) -> tuple[str, tuple[str, ...]] | None:
    """(method, chain) for a feed-forward block whose ``method`` is a chain (:func:`_call_chain`)
    of two linear layers (Linear or Conv1D) around an activation (and a dropout after them), else
    None."""
    for method in _MLP_METHODS:
        chain = _call_chain(getattr(type(module), method, None))
        if chain is None:
            continue
        first, activation, second, *dropout = (getattr(module, name, None) for name in chain)
        linears = _linear_kinds()
        if (isinstance(first, linears) and isinstance(second, linears)
                and not isinstance(activation, (*linears, nn.Dropout))
                and all(isinstance(d, nn.Module) for d in dropout)):
            return method, chain
    return None


def _linear_weight(linear: nn.Module) -> torch.Tensor:
    """A linear layer's weight as [out_features, in_features]: Conv1D stores it transposed."""
    return linear.weight if isinstance(linear, nn.Linear) else linear.weight.t()


def _mlp_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    original, kind = self._fused_attn_of
    chain = self._fused_attn_chain
    if (_current_activation_code(self, getattr(self, chain[1])) is None
            or _unfused(self, reads=self._fused_attn_reads)):
        return getattr(original, kind.partition(":")[2])(self, hidden_states)
    first, second = getattr(self, chain[0]), getattr(self, chain[2])
    dropout = getattr(self, chain[3]) if len(chain) == 4 else None
    p = dropout.p if dropout is not None and dropout.training else 0.0  # as nn.Dropout decides
    return ffn(hidden_states, _linear_weight(first), first.bias, _linear_weight(second), second.bias,
               dropout_p=p, backend=self.fused_attn_backend, **ffn_activation(self.fused_attn_activation_code))


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
        namespace = {"__module__": __name__, "__reduce_ex__": _reduce_fused, "_fused_attn_of": (cls, kind)}
        if kind.startswith("mlp:"):
            method = kind.partition(":")[2]
            chain = _call_chain(getattr(cls, method))
            namespace.update({method: _mlp_forward, "_fused_attn_chain": chain, "_fused_attn_reads": _mlp_reads(chain)})
        else:
            namespace["forward"] = _FORWARDS[kind]
        _FUSED_CLASSES[cls, kind] = type(f"Fused{cls.__name__}", (cls,), namespace)
    return _FUSED_CLASSES[cls, kind]


def _code_identity(fn: object) -> tuple | None:
    """What a function computes, as far as its own code says: its instructions with their
    arguments (names, constants, jump targets), without its name, docstring or line numbers;
    None for what has no code (a builtin). A decorated function gives its wrapper's code."""
    # Not unwrapped: a decorator (torch.no_grad, a hook) is part of what a forward computes.
    code = getattr(fn, "__code__", None)
    if code is None:
        return None
    return code.co_argcount, tuple((i.opname, repr(i.argval)) for i in dis.get_instructions(code))


# The forwards the fused blocks stand for, in BERT's own words (transformers' BertSelfOutput and
# BertOutput, BertIntermediate): a block is fused when its forward compiles to the same code as one
# of these, whatever transformers' BERT does in the installed version.
def _bert_add_norm_forward(self, hidden_states, input_tensor):
    hidden_states = self.dense(hidden_states)
    hidden_states = self.dropout(hidden_states)
    hidden_states = self.LayerNorm(hidden_states + input_tensor)
    return hidden_states


def _bert_intermediate_forward(self, hidden_states):
    hidden_states = self.dense(hidden_states)
    hidden_states = self.intermediate_act_fn(hidden_states)
    return hidden_states


_ADD_NORM_CODE = _code_identity(_bert_add_norm_forward)
_INTERMEDIATE_CODE = _code_identity(_bert_intermediate_forward)


def _is_add_norm_block(module: nn.Module) -> bool:
    """A block that computes BERT's ``LayerNorm(dropout(dense(h)) + residual)``: BertSelfOutput's
    forward (BertOutput's is the same code, _bert_add_norm_forward) over torch's Linear, LayerNorm
    and Dropout."""
    return (
        isinstance(getattr(module, "dense", None), nn.Linear)
        and isinstance(getattr(module, "LayerNorm", None), nn.LayerNorm)
        and isinstance(getattr(module, "dropout", None), nn.Dropout)
        and _code_identity(type(module).forward) == _ADD_NORM_CODE
    )


def _is_intermediate_block(module: nn.Module) -> bool:
    """A block that computes BERT's ``act(dense(h))`` (BertIntermediate's forward,
    _bert_intermediate_forward)."""
    return (
        isinstance(getattr(module, "dense", None), nn.Linear)
        and _code_identity(type(module).forward) == _INTERMEDIATE_CODE
    )


def _is_pretrained_model(module: nn.Module) -> bool:
    if "transformers" not in sys.modules:
        return False  # then no module is one of its models
    from transformers import PreTrainedModel

    return isinstance(module, PreTrainedModel)


def _matches(module: nn.Module) -> bool:
    return _is_pretrained_model(module)


def _parts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The transformers submodels of ``model`` with configs of their own (T5's stacks, the halves of
    an encoder-decoder pair, a vision tower), outermost first: each is converted as a model of its
    own. Submodels sharing ``model``'s config (a task head's base model) are part of it."""
    own = convert.base_config(model.config)
    parts: list[tuple[str, nn.Module]] = []
    for path, module in model.named_modules():
        if module is model or any(path.startswith(p + ".") for p, _ in parts):
            continue
        if _is_pretrained_model(module) and convert.base_config(module.config) is not own:
            parts.append((path, module))
    return parts


def _outside(model: nn.Module, parts: list[tuple[str, nn.Module]]):
    """``model.named_modules()`` without the modules of ``parts``."""
    for path, module in model.named_modules():
        if not any(path == p or path.startswith(p + ".") for p, _ in parts):
            yield path, module


def _interface_attention(module: nn.Module) -> object | None:
    """The code of ``module``'s forward where it looks its attention function up in transformers'
    ``ALL_ATTENTION_FUNCTIONS`` (so that ``attn_implementation`` selects what it runs), else None."""
    code = getattr(inspect.unwrap(getattr(type(module), "forward", None)), "__code__", None)
    return code if code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names else None


def _code_strings(code) -> set[str]:
    """The strings among a code object's constants (keyword argument names included), nested
    functions' included."""
    found = set()
    for const in code.co_consts:
        for item in const if isinstance(const, tuple) else (const,):
            if isinstance(item, str):
                found.add(item)
            elif isinstance(item, types.CodeType):
                found |= _code_strings(item)
    return found


def _treats_sdpa_apart(model: nn.Module) -> str | None:
    """``Class.method`` of a model's own code in ``model`` (transformers' model files, remote code,
    a user's subclass: anything but torch and transformers' shared machinery) that names the sdpa
    implementation (e.g. ``_attn_implementation == "sdpa"``): the model then runs differently
    under any other name, the fused attention's included. None when there is none."""
    seen = set()
    for module in model.modules():
        cls = type(module)
        if cls in seen:
            continue
        seen.add(cls)
        for name, fn in inspect.getmembers(cls, inspect.isfunction):
            where = getattr(fn, "__module__", None) or ""
            if where.split(".")[0] == "torch" or (where.startswith("transformers.")
                                                  and not where.startswith("transformers.models.")):
                continue  # transformers' shared machinery (modeling_utils) names every implementation
            code = getattr(inspect.unwrap(fn), "__code__", None)
            if code is not None and "sdpa" in _code_strings(code):
                return f"{cls.__name__}.{name}"
    return None


def _implementations(model: nn.Module) -> list[tuple[object, object]]:
    """(config, its _attn_implementation_internal) for every config ``model`` and its modules
    hold, sub-configs included: what set_attn_implementation may change."""
    found, queue = {}, [m.config for m in model.modules() if hasattr(m, "config")]
    while queue:
        config = queue.pop()
        if id(config) in found or not hasattr(config, "_attn_implementation_internal"):
            continue
        found[id(config)] = (config, config._attn_implementation_internal)
        queue += [getattr(config, key, None) for key in getattr(config, "sub_configs", {})]
    return list(found.values())


def _model_above(model: nn.Module, path: str) -> nn.Module:
    """The innermost transformers model holding the submodule at ``path`` of ``model``."""
    owner = model
    parts = path.split(".") if path else []
    module = model
    for part in parts:
        module = getattr(module, part)
        if _is_pretrained_model(module):
            owner = module
    return owner


def _head_dims(modules: list[nn.Module], config: object) -> set[int]:
    """The head dims of attention modules, as they declare them (else as the config does)."""
    dims = set()
    for module in modules:
        found = [getattr(module, name, None) for name in ("qk_head_dim", "head_dim", "attention_head_size",
                                                           "key_value_proj_dim", "v_head_dim")]
        dims.update(d for d in found if isinstance(d, int) and d > 0)
    if not dims:
        for name in ("head_dim", "d_kv", "attention_head_size"):
            value = getattr(config, name, None)
            if isinstance(value, int) and value > 0:
                return {value}
        hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
        if isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
            dims.add(hidden // heads)
    return dims


def _attention_reason(model: nn.Module, attention: list[tuple[str, nn.Module]], config: object) -> str | None:
    """Why ``model``'s attention cannot run on the fused function, or None."""
    name = type(model).__name__
    if not attention:
        return f"{name}'s attention does not go through transformers' attention interface"
    current = config._attn_implementation
    if current not in ("sdpa", "eager", ATTENTION_NAME):
        # Another kernel chosen for the model (flex attention, flash attention, ...), whose masks the
        # model builds in that kernel's own form.
        return f"attn_implementation {current!r} was chosen for it"
    owners = {type(_model_above(model, path)) for path, _ in attention}
    no_sdpa = sorted(c.__name__ for c in owners if not getattr(c, "_supports_sdpa", False))
    if no_sdpa:
        # The fused function has sdpa's semantics (and its mask); transformers does not run these
        # models on sdpa (soft-capping, sinks, masks built for eager only, ...).
        return f"transformers does not run {', '.join(no_sdpa)} on sdpa, whose semantics the fused attention has"
    for _, module in attention:
        passed = _code_strings(_interface_attention(module)) & set(_UNSUPPORTED_KWARGS)
        if passed:
            key = sorted(passed)[0]
            return f"{type(module).__name__} hands the attention function {key} ({_UNSUPPORTED_KWARGS[key]})"
    apart = _treats_sdpa_apart(model)
    if apart is not None:
        return f"{apart} runs the model differently on sdpa than on any other attention implementation"
    dims = _head_dims([m for _, m in attention], config)
    low, high = convert.HEAD_DIM_LIMITS["head_dim"]
    if not dims:
        return "its attention modules and config declare no head dim"
    if not all(low <= d <= high for d in dims):
        return f"head_dim {max(dims) if max(dims) > high else min(dims)} outside [{low}, {high}]"
    return None


def register_attention() -> str:
    """Registers the fused attention with transformers' attention interface (with the sdpa mask
    function) as ``"fused_attn"`` and returns that name, for models that :func:`fused_attn.optimize`
    does not convert whole: ``model.set_attn_implementation(register_attention())``. It serves what
    transformers' sdpa implementation serves, grouped key/value heads and T5's position bias
    included, and refuses soft-capping, attention sinks and sparse key selections
    (:func:`fused_attention_forward`). Raises RuntimeError with a transformers that has no
    attention and mask function interfaces."""
    why = _register()
    if why is not None:
        raise RuntimeError(f"cannot register the fused attention: {why}")
    return ATTENTION_NAME


def _register() -> str | None:
    """Registers the fused attention (and sdpa's mask function) under ATTENTION_NAME; returns why
    it cannot be, with a transformers that has no attention and mask interfaces, else None."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as error:
        return f"this transformers has no attention and mask function interfaces ({error})"
    AttentionInterface.register(ATTENTION_NAME, fused_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, _compact_masks(sdpa_mask))
    # Looked up now, not in the first call: filled inside a torch.compile trace, the record would
    # change under the trace's guard on it, and the compiled model would recompile at its next call.
    _output_collector()
    return None


# The attribute of a mask built by the fused attention's mask function that is causal (top-left)
# within one key padding row: that row broadcast over the queries (see _compact_masks).
_CAUSAL_ROW = "_fused_attn_causal_padding_row"


def _compact_masks(mask_function: Callable) -> Callable:
    """sdpa's mask function, with the two masks transformers builds whole for padded batches handed
    to the kernels in the form they skip work for. A boolean mask that is the same for every query
    (an encoder's padding mask, built as a whole [B, 1, Lq, Lk] tensor) comes out as one row per
    sequence broadcast over the queries (stride 0): the kernels read Lk mask values per sequence
    instead of Lq x Lk, and every fused backend walks only the key tiles the row leaves (as for a
    [B, 1, 1, Lk] padding mask). A mask that is top-left causal within one padding row (a decoder's
    padded batch, Lq = Lk) is returned as built, carrying a copy of that row ([B, 1, 1, Lk],
    attribute ``_CAUSAL_ROW``), which the fused attention takes with ``is_causal`` instead: the
    kernels then skip the key tiles above the diagonal, as they do without a mask. Other masks
    (sliding windows, packed sequences, a cache's offset queries) are returned as built. One or
    two comparisons of the built mask per forward (transformers builds it once for all layers),
    none under tracing."""

    @functools.wraps(mask_function)
    def build(*args, **kwargs):
        mask = mask_function(*args, **kwargs)
        if (not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[2] < 2
                or mask.stride(2) == 0 or torch.compiler.is_compiling()):
            return mask
        first = mask[:, :, :1]
        if torch.equal(mask, first.expand_as(mask)):
            return first.expand_as(mask)
        q_len, k_len = mask.shape[2:]
        if q_len == k_len:
            last = mask[:, :, -1:]
            if torch.equal(mask, last & causal_keep(q_len, k_len, mask.device)):
                # A copy, not a view: a view would hold the mask it hangs on (a cycle, freed late).
                setattr(mask, _CAUSAL_ROW, last.clone())
        return mask

    return build


class _Registration:
    """Held by a model switched to the fused attention: pickled with it, it registers the
    attention function again where the model is loaded (a fresh process has not), before the
    model runs."""

    def __reduce__(self):
        return _registered, ()


def _registered() -> _Registration:
    _register()
    return _Registration()


_REGISTRATION = "_fused_attn_registration"


def _convert(model: nn.Module, backend: str | None):
    """Fuses a transformers model in place (see the module docstring); returns (replaced, kept) rows
    for the report."""
    reason = convert.dtype_reason(model)
    if reason is not None:
        return [], [("", type(model).__name__, reason)]
    return _convert_model(model, backend, _register())


def _convert_model(model: nn.Module, backend: str | None, unregistered: str | None):
    replaced, kept = [], []
    parts = _parts(model)
    for prefix, part in parts:
        rows = _convert_model(part, backend, unregistered)
        replaced += [(convert.join_path(prefix, p), old, new) for p, old, new in rows[0]]
        kept += [(convert.join_path(prefix, p), what, why) for p, what, why in rows[1]]
    attention = [(p, m) for p, m in _outside(model, parts) if _interface_attention(m) is not None]
    original_attention = convert.original_config(model)._attn_implementation
    if parts:
        # A composite model's own layers follow its own config, which its parts do not share:
        # switching it would reach into theirs. Its attention modules keep their implementation.
        for path, module in attention:
            kept.append((path, type(module).__name__,
                         f"attention of the composite {type(model).__name__} itself: left on {original_attention}"))
    elif attention or any("Attention" in type(m).__name__ for m in model.modules()):
        config = convert.own_config(model)
        # Where the fused function cannot stand for it, the model keeps the attention it was built with.
        why = unregistered or _attention_reason(model, attention, config)
        if why is None:
            before = _implementations(model)
            model.set_attn_implementation(ATTENTION_NAME)
            stale = [p for p, m in attention
                     if getattr(getattr(m, "config", config), "_attn_implementation", None) != ATTENTION_NAME]
            if config._attn_implementation != ATTENTION_NAME:
                why = f"transformers did not switch {type(model).__name__}'s attention implementation"
            elif stale:
                # e.g. transformers' EncoderDecoderModel gives the encoder a config object of its own
                # after its layers were built with another one, which they still read.
                more = ", ..." if len(stale) > 1 else ""
                why = f"its attention modules ({stale[0]}{more}) read another config object than the model's"
            if why is not None:
                for cfg, value in before:
                    cfg._attn_implementation_internal = value  # exactly as they were, sub-configs included
        if why is None:
            # Pickled with the model or any submodel holding an attention, the marker registers the
            # fused attention again where it is loaded.
            for module in [model] + [m for _, m in attention]:
                module.__dict__[_REGISTRATION] = _Registration()
            replaced.append(("", f"attention {original_attention}", f"attention {ATTENTION_NAME}"))
        else:
            kept.append(("", f"attention {original_attention}", why))
    blocks = 0
    for path, module in _outside(model, parts):
        module.fused_attn_backend = backend  # read by fused_attention_forward and the fused blocks
        if convert.ORIGINAL_CLASS in module.__dict__:
            # Fused by an earlier optimize: it only takes this call's backend.
            if isinstance(module, convert.FusedLayerNorm):
                module.backend = backend
            else:
                blocks += 1
            replaced.append((path, module.__dict__[convert.ORIGINAL_CLASS].__name__,
                             convert.own_class(module).__name__))
            continue
        mlp = None
        if _is_add_norm_block(module):
            kind = "add_norm"
        elif _is_intermediate_block(module):
            kind = "intermediate"
        else:
            mlp = _mlp_form(module)
            kind = None if mlp is None else f"mlp:{mlp[0]}"
        why = foreign_child(module, mlp and _mlp_reads(mlp[1])) if kind is not None else None
        blocks += kind is not None
        if why is not None:
            kept.append((path, type(module).__name__, why))
            continue
        original = convert.own_class(module)  # a parametrized module keeps its parametrizations
        if kind == "add_norm":
            new_cls = _fused_class(original, "add_norm")
        elif kind is not None:
            activation = getattr(module, "intermediate_act_fn" if mlp is None else mlp[1][1], None)
            code = _hf_activation_code(activation)
            if code is None:
                kept.append((path, type(module).__name__,
                             f"activation {type(activation).__name__} is not a GELU or ReLU"))
                continue
            module.fused_attn_activation_code = code
            _remember_activation(module, activation)
            new_cls = _fused_class(original, kind)
        elif original is nn.LayerNorm:
            new_cls = convert.FusedLayerNorm
            module.backend = backend
        else:
            continue
        setattr(module, convert.ORIGINAL_CLASS, original)
        replaced.append((path, original.__name__, new_cls.__name__))
        convert.set_class(module, new_cls)
    if not parts and not blocks:
        kept.append(("", type(model).__name__, "no feed-forward, intermediate or Add & Norm block of a form "
                     "fused_attn fuses (BERT's blocks, or two linear layers around an activation)"))
    return replaced, kept


def _restore(model: nn.Module) -> None:
    convert.restore_config(model)
    for module in model.modules():
        module.__dict__.pop("fused_attn_backend", None)
        module.__dict__.pop(_REGISTRATION, None)


convert.register_model_converter(_matches, _convert, _restore)
