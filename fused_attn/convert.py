"""``fused_attn.optimize(model)``: swap fused implementations into a model, keeping every weight.

Modules are converted in place by switching their class to the fused subclass (``LayerNorm`` ->
``FusedLayerNorm``, ``MultiheadAttention`` -> ``FusedMultiheadAttention``,
``TransformerEncoderLayer`` / ``DecoderLayer`` -> their fused versions): parameters, buffers,
hooks and ``state_dict`` stay exactly as they were, and :func:`restore` switches them back.
Models that know how to fuse themselves (the package's reference models, Hugging Face models via
:mod:`fused_attn.integrations.hf`) are handled by their own converters. Such a model switches a
copy of its config (:func:`own_config`): other models built from the same config object are left
as they are, and :func:`restore` puts the original object back.
"""

from __future__ import annotations

import copy
import dataclasses
import weakref
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from .backends import BACKENDS
from .nn import (
    FusedLayerNorm,
    FusedMultiheadAttention,
    FusedTransformerDecoderLayer,
    FusedTransformerEncoderLayer,
)
from .nn._fused import Fused
from .nn.transformer import activation_code, foreign_child
from .ops._validate import KERNEL_DTYPES, check_bool
from .ops.attention import HEAD_DIM_LIMITS

ORIGINAL_CLASS = "_fused_attn_original"
# On a module built fused (not converted by optimize): the backend it had before optimize set one.
BACKEND_BEFORE = "_fused_attn_backend_before"


@dataclasses.dataclass
class OptimizeReport:
    """What :func:`optimize` did: ``replaced`` (path, from, to), ``kept`` (path, type, why), and
    ``built_fused`` (path, type): fused modules the model was built with, which take the backend."""

    model: nn.Module
    replaced: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    kept: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    built_fused: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"fused_attn.optimize: {len(self.replaced)} replaced, {len(self.kept)} kept as they were"
                 + (f", {len(self.built_fused)} built fused" if self.built_fused else "")]
        lines += [f"  replaced {path or '<model>'}: {old} -> {new}" for path, old, new in self.replaced]
        lines += [f"  kept     {path or '<model>'}: {kind} ({why})" for path, kind, why in self.kept]
        lines += [f"  fused    {path or '<model>'}: {kind} (built fused)" for path, kind in self.built_fused]
        return "\n".join(lines)


def dtype_reason(model: nn.Module) -> str | None:
    """Why no fused kernel serves ``model``'s parameters (e.g. float64), or None."""
    dtypes = {p.dtype for p in model.parameters()}
    bad = sorted(str(d).replace("torch.", "") for d in dtypes if d not in KERNEL_DTYPES)
    return f"parameters in {', '.join(bad)}: the fused kernels take float16, bfloat16 and float32" if bad else None


def _attention_reason(module: nn.MultiheadAttention) -> str | None:
    low, high = HEAD_DIM_LIMITS["head_dim"]
    if not low <= module.head_dim <= high:
        return f"head_dim {module.head_dim} outside the fused kernels' [{low}, {high}]"
    if module.bias_k is not None or module.add_zero_attn:
        return "add_bias_kv/add_zero_attn: no fused kernel serves them"
    return dtype_reason(module)


def _layer_reason(layer: nn.Module) -> str | None:
    """Why a torch Transformer layer cannot be fused: its attention's reason, a linear/norm/dropout
    submodule the fused forward would read but not compute as it does (nn.transformer.foreign_child),
    or its dtype. Attention modules of other classes are called as they are."""
    for name in ("self_attn", "multihead_attn"):
        attention = layer._modules.get(name)
        if isinstance(attention, nn.MultiheadAttention):
            reason = _attention_reason(attention)
            if reason is not None:
                return reason
    return foreign_child(layer) or dtype_reason(layer)


def _unfused_feed_forward(path: str, module: nn.Module) -> list[tuple[str, str, str]]:
    """The report's row for a fused layer or FusedFFN whose feed-forward runs unfused: one whose
    activation is none of F.gelu, nn.GELU, F.relu (torch's layers' default), torch.relu and nn.ReLU,
    the activations the fused FFN computes (a wrapper of one, e.g. a functools.partial, is not
    recognised)."""
    activation = getattr(module, "activation", None)
    if not isinstance(module._modules.get("linear1"), nn.Linear) or activation is None:
        return []
    if activation_code(activation) is not None:
        return []
    name = getattr(activation, "__name__", type(activation).__name__)
    return [(join_path(path, "linear1"), "feed-forward",
             f"activation {name} is not a GELU or ReLU (F.gelu, nn.GELU, F.relu, nn.ReLU): linear1, the "
             "activation and linear2 run unfused")]


# Exact torch.nn class -> (fused subclass, why it cannot be converted or None).
_SWAPS: dict[type, tuple[type, Callable[[nn.Module], str | None]]] = {
    nn.LayerNorm: (FusedLayerNorm, dtype_reason),
    nn.MultiheadAttention: (FusedMultiheadAttention, _attention_reason),
    nn.TransformerEncoderLayer: (FusedTransformerEncoderLayer, _layer_reason),
    nn.TransformerDecoderLayer: (FusedTransformerDecoderLayer, _layer_reason),
}


def own_class(module: nn.Module) -> type:
    """``module``'s class, or for a module parametrized by ``torch.nn.utils.parametrize`` (which
    gives it a class derived from its own, holding the parametrized tensors' properties) the class
    it was made from."""
    cls = type(module)
    return cls.__bases__[0] if parametrize.is_parametrized(module) else cls


def set_class(module: nn.Module, cls: type) -> None:
    """Switches ``module`` to ``cls``. A parametrized module keeps its parametrizations: when ``cls``
    does not hold their properties (it is not the class parametrize derived), the module gets a class
    derived from ``cls`` with what parametrize put on the class it derived, as parametrize itself
    would have made it (``remove_parametrizations`` then leaves ``cls``)."""
    if parametrize.is_parametrized(module) and not all(
            isinstance(getattr(cls, name, None), property) for name in module.parametrizations):
        derived = next(c for c in type(module).__mro__ if any(name in vars(c) for name in module.parametrizations))
        members = {k: v for k, v in vars(derived).items() if k not in ("__dict__", "__weakref__")}
        cls = type(f"Parametrized{cls.__name__}", (cls,), members)
    module.__class__ = cls


# Converters for whole models that fuse themselves: (predicate, convert(module, backend) ->
# (replaced, kept) rows with paths relative to the module, restore(module)). The integrations
# register theirs here.
_MODEL_CONVERTERS: list[tuple[Callable[[nn.Module], bool], Callable, Callable]] = []
def register_model_converter(matches: Callable[[nn.Module], bool], convert: Callable, restore: Callable) -> None:
    """Lets a model family (e.g. Hugging Face models) take part in :func:`optimize` / :func:`restore`."""
    _MODEL_CONVERTERS.append((matches, convert, restore))


_ORIGINAL_CONFIG = "_fused_attn_original_config"
_COPIES: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # id -> a config copy own_config made
_ORIGINALS: dict[int, object] = {}  # id of such a copy -> the config it was copied from


def own_config(model: nn.Module):
    """``model``'s config, made the model's own on first use: a deep copy that the model and every
    submodule holding the same config object now refer to, so that switching it leaves other
    models built from that object alone. :func:`restore_config` puts the original back."""
    config = model.config
    original = model.__dict__.get(_ORIGINAL_CONFIG)
    if original is not None:
        # Already this model's own; a submodel restored on its own since (restore_config) rejoins it.
        for module in model.modules():
            if module.__dict__.get("config") is original:
                module.config = config
        return config
    if _COPIES.get(id(config)) is config:
        return config  # its optimized parent's
    for module in model.modules():
        # A submodel optimized before: it goes back to the shared config, and copies with the rest.
        if module is not model and _ORIGINAL_CONFIG in module.__dict__:
            restore_config(module)
    config = model.config
    copied = copy.deepcopy(config)
    _COPIES[id(copied)] = copied
    _ORIGINALS[id(copied)] = config
    weakref.finalize(copied, _ORIGINALS.pop, id(copied), None)
    for module in model.modules():
        if module.__dict__.get("config") is config:
            module.config = copied
    model.__dict__[_ORIGINAL_CONFIG] = config
    return copied


def base_config(config: object) -> object:
    """The config object a copy made by :func:`own_config` was made from; any other config itself."""
    return _ORIGINALS.get(id(config), config) if _COPIES.get(id(config)) is config else config


def original_config(model: nn.Module):
    """The config ``model`` was built with: the one :func:`own_config` replaced, or its current one."""
    return model.__dict__.get(_ORIGINAL_CONFIG, model.config)


def restore_config(model: nn.Module) -> None:
    """Puts back the config :func:`own_config` replaced, on ``model`` and its submodules; on a
    submodel of an optimized model (which holds its parent's copy), on that submodel alone."""
    current = model.config
    original = model.__dict__.pop(_ORIGINAL_CONFIG, None)
    if original is None and _COPIES.get(id(current)) is current:
        original = _ORIGINALS.get(id(current))
    if original is None:
        return
    for module in model.modules():
        if module.__dict__.get("config") is current:
            module.config = original


def _is_package_model(module: nn.Module) -> bool:
    from .models.bert import BertPreTrainedModel
    from .models.transformer import Transformer

    return isinstance(module, (BertPreTrainedModel, Transformer))


def _convert_package_model(model: nn.Module, backend: str | None):
    """The package's reference models switch themselves: ``config.fused`` and ``config.backend``."""
    name = type(model).__name__
    reason = dtype_reason(model)
    if reason is not None:
        return [], [("", name, reason)]
    config = own_config(model)
    config.fused, config.backend = True, backend
    return [("", f"{name}(fused=False)", f"{name}(fused=True)")], []


register_model_converter(_is_package_model, _convert_package_model, restore_config)


def optimize(model: nn.Module, *, backend: str = "auto", inplace: bool = True) -> OptimizeReport:
    """Swaps fused implementations into ``model`` and returns a report (``report.model`` is the model).

    Converts ``torch.nn.LayerNorm``, ``MultiheadAttention``, ``TransformerEncoderLayer`` and
    ``TransformerDecoderLayer`` (the fused encoder layer also serves ``TransformerEncoder``'s
    nested-tensor inference path), the package's reference models and Hugging Face models (when
    :mod:`transformers` is installed: the attention of those whose attention goes through its
    attention interface, BERT's Add & Norm and intermediate blocks and feed-forward blocks of two
    linear layers around a GELU or ReLU wherever a model has them; see
    :mod:`fused_attn.integrations.hf`). Weights, ``state_dict`` keys and outputs stay
    the same. Modules that cannot be served (e.g. an unsupported head dim, float64 parameters)
    are kept, with the reason in ``report.kept``, as is the feed-forward of a layer whose
    activation is neither a GELU nor ReLU (torch's default): its attention and norms are fused.
    ``backend`` is stored on the fused modules ("auto" leaves the choice to the package's policy);
    optimizing again switches every fused module to the new backend. ``inplace=False`` converts a
    deep copy. A model that fuses itself through its config (the reference models, Hugging Face
    models) gets a copy of its config, so other models sharing that config object are not
    switched with it.
    """
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_bool(inplace, "inplace")
    from .integrations import hf  # noqa: F401  (registers the Hugging Face converter when available)

    if not inplace:
        model = _copy_model(model)
    report = OptimizeReport(model)
    chosen = None if backend == "auto" else backend
    # Modules built fused keep the backend they had, for restore to give back: recorded for all of
    # them before any is set (a fused layer's backend is also its fused children's).
    for module in model.modules():
        if (isinstance(module, Fused) and ORIGINAL_CLASS not in module.__dict__
                and BACKEND_BEFORE not in module.__dict__):
            module.__dict__[BACKEND_BEFORE] = module.backend
    handled: set[str] = set()
    for path, module in model.named_modules():
        if any(h == "" or path == h or path.startswith(h + ".") for h in handled):
            continue
        converter = next((c for c in _MODEL_CONVERTERS if c[0](module)), None)
        if converter is not None:
            replaced, kept = converter[1](module, chosen)
            report.replaced += [(join_path(path, p), old, new) for p, old, new in replaced]
            report.kept += [(join_path(path, p), kind, why) for p, kind, why in kept]
            handled.add(path)
            continue
        if isinstance(module, Fused):
            # Already fused (by an earlier optimize, or built fused): it takes this call's backend.
            module.backend = chosen
            original = module.__dict__.get(ORIGINAL_CLASS)
            if original is None:
                report.built_fused.append((path, type(module).__name__))
            else:
                report.replaced.append((path, original.__name__, own_class(module).__name__))
            report.kept += _unfused_feed_forward(path, module)
            continue
        swap = _SWAPS.get(own_class(module))
        if swap is None:
            continue
        fused_cls, reason_of = swap
        reason = reason_of(module)
        if reason is not None:
            report.kept.append((path, own_class(module).__name__, reason))
            continue
        setattr(module, ORIGINAL_CLASS, own_class(module))
        set_class(module, fused_cls)
        module.backend = chosen
        report.replaced.append((path, getattr(module, ORIGINAL_CLASS).__name__, fused_cls.__name__))
        report.kept += _unfused_feed_forward(path, module)
    return report


def restore(model: nn.Module) -> nn.Module:
    """Undoes :func:`optimize` in place: every converted module gets its original class back, and
    a module built fused the backend it had before."""
    from .integrations import hf  # noqa: F401

    for module in model.modules():
        if BACKEND_BEFORE in module.__dict__:
            module.backend = module.__dict__.pop(BACKEND_BEFORE)
        original = module.__dict__.pop(ORIGINAL_CLASS, None)
        if isinstance(original, type):
            set_class(module, original)
            for attr in ("backend", "fused_attn_backend", "fused_attn_activation_code", "fused_attn_activation"):
                module.__dict__.pop(attr, None)
        for matches, _convert, restore_model in _MODEL_CONVERTERS:
            if matches(module):
                restore_model(module)
    return model


def _copy_model(model: nn.Module) -> nn.Module:
    """A deep copy that computes what ``model`` computes. torch's TransformerDecoderLayer.__setstate__
    hides an activation held as a module (e.g. nn.GELU()) behind F.relu on every copy: undone
    where the original layer does not have it hidden (a TransformerDecoder's own layers, copied
    by torch at construction, do, and keep it)."""
    copied = copy.deepcopy(model)
    for original, new in zip(model.modules(), copied.modules()):
        if (isinstance(original, nn.TransformerDecoderLayer) and "activation" in new._modules
                and "activation" not in original.__dict__):
            new.__dict__.pop("activation", None)
    return copied


def join_path(prefix: str, suffix: str) -> str:
    return ".".join(p for p in (prefix, suffix) if p)
