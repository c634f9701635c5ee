"""Whole models to measure: the package's reference BERT and Transformer, Hugging Face BERT and
GPT-2 (``hf-gpt2``: GPT-2 small, 12 layers of 768, a decoder whose attention is causal and whose
feed-forward block fuses whole), and ``torch.nn.Transformer`` (``nn-transformer``: the reference
Transformer's sizes, fed embeddings).

:func:`build` returns a model with random weights (built from a config; nothing is downloaded)
and a ``step(model)`` that runs it on fixed random token ids (embeddings for ``nn-transformer``,
whose decoder gets the causal mask as ``nn.Transformer.generate_square_subsequent_mask`` makes
it) with a padding mask and returns its last hidden state. The vocabulary projection of a
language-model head is left out on purpose: it is the same dense layer with or without fusion
and, at long sequence lengths, its logits would dominate both time and memory.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch
from torch import nn

MODELS = ("bert-tiny", "bert-mini", "bert-base", "bert-large", "transformer", "nn-transformer", "hf-bert", "hf-gpt2")
# Encoder-decoder models: ``layers`` counts each stack's.
SEQ2SEQ = ("transformer", "nn-transformer")


class WorkloadUnavailable(RuntimeError):
    """The workload cannot be built here (e.g. an optional dependency is missing)."""


class WorkloadTooLarge(MemoryError):
    """The workload's estimated bytes exceed the memory available on its device."""


@dataclasses.dataclass
class Workload:
    name: str
    model: nn.Module
    step: Callable[[nn.Module], torch.Tensor]
    batch: int
    seq: int
    layers: int  # as ``build`` takes it: the Transformer's per stack (encoder and decoder each)

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


def _bert_config(name: str, layers: int | None, seq: int):
    from ..models import BertConfig

    sizes = {
        "bert-tiny": BertConfig.bert_tiny,
        "bert-mini": lambda **kw: BertConfig(**{**dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                                      intermediate_size=1024), **kw}),
        "bert-base": BertConfig.bert_base,
        "bert-large": BertConfig.bert_large,
        "hf-bert": BertConfig.bert_base,
    }[name]
    overrides = {"max_position_embeddings": max(512, seq)}
    if layers is not None:
        overrides["num_hidden_layers"] = layers
    return sizes(**overrides)


def _transformers(name: str):
    try:
        import transformers
    except ImportError:
        raise WorkloadUnavailable(f"{name} needs the transformers package (pip install transformers)") from None
    return transformers


def _config(name: str, layers: int | None, seq: int):
    """The model's config: a BERT's, GPT-2's, or the Transformer's with ``layers`` in each stack."""
    if name == "hf-gpt2":
        return _transformers(name).GPT2Config(n_positions=max(1024, seq), **({"n_layer": layers} if layers else {}))
    if name not in SEQ2SEQ:
        return _bert_config(name, layers, seq)
    from ..models import TransformerConfig

    config = TransformerConfig(max_position_embeddings=max(1024, seq))
    if layers is not None:
        config.num_encoder_layers = config.num_decoder_layers = layers
    return config


def _model(name: str, config) -> nn.Module:
    if name == "nn-transformer":
        return nn.Transformer(config.d_model, config.nhead, config.num_encoder_layers, config.num_decoder_layers,
                              config.dim_feedforward, config.dropout, activation=config.activation,
                              layer_norm_eps=config.layer_norm_eps, batch_first=True, norm_first=config.norm_first)
    if name == "transformer":
        from ..models import Transformer

        return Transformer(config)
    if name == "hf-bert":
        transformers = _transformers(name)
        return transformers.BertModel(transformers.BertConfig(**config.to_hf_kwargs()), add_pooling_layer=False)
    if name == "hf-gpt2":
        return _transformers(name).GPT2Model(config)
    from ..models import BertModel

    return BertModel(config, add_pooling_layer=False)


@functools.lru_cache(maxsize=None)
def _sizes(name: str, layers: int | None, seq: int) -> tuple[int, int, int, int]:
    """(parameter elements, buffer elements, hidden width, layers in all) of the model, counted on
    the meta device (nothing allocated) for one and two layers (per stack) and extrapolated: a
    layer count a user mistyped costs no time here. hf-bert has the reference BERT's sizes:
    counted on it, so that no transformers import is needed."""
    config = _config(name, layers, seq)
    width = getattr(config, "hidden_size", None) or config.d_model
    per_stack = getattr(config, "num_hidden_layers", None) or config.num_encoder_layers
    depth = 2 * per_stack if name in SEQ2SEQ else per_stack
    one, two = _elements(name, 1, seq), _elements(name, 2, seq)
    params, buffers = (a + (per_stack - 1) * (b - a) for a, b in zip(one, two))
    return params, buffers, width, depth


def _elements(name: str, layers: int, seq: int) -> tuple[int, int]:
    """(parameter elements, buffer elements) of the model with ``layers`` layers (per stack)."""
    with torch.device("meta"):
        model = _model("bert-base" if name == "hf-bert" else name, _config(name, layers, seq))
    return sum(p.numel() for p in model.parameters()), sum(b.numel() for b in model.buffers())


def estimate_bytes(name: str, *, batch: int, seq: int, layers: int | None = None, dtype: torch.dtype,
                   training: bool) -> dict[str, int]:
    """A lower bound of the bytes a run of the workload holds at once on its device, by part:
    ``inputs`` (the int64 token ids and padding mask), ``parameters`` (the model's parameters and
    buffers, counted on the meta device, for the plain model and its ``optimize()``d copy, which
    ``fused-attn bench`` and ``profile-memory`` both hold; with ``training`` also one model's
    gradients) and ``activations`` (two [batch, seq, width] hidden states, the least a forward
    holds, and with ``training`` one more per layer, saved for backward). The real peak is
    higher (attention scores, the FFN's hidden layer, workspaces): a size this refuses cannot fit."""
    params, buffers, width, depth = _sizes(name, layers, seq)
    element = torch.empty((), dtype=dtype).element_size()
    hidden = batch * seq * width * element
    return {
        "inputs": 2 * batch * seq * 8,
        "parameters": ((2 + training) * params + 2 * buffers) * element,
        "activations": (2 + (depth if training else 0)) * hidden,
    }


def check_fits(name: str, *, batch: int, seq: int, layers: int | None = None, device: torch.device,
               dtype: torch.dtype, training: bool) -> None:
    """Raises :class:`WorkloadTooLarge` when the workload's lower-bound estimate exceeds the memory
    available on ``device``: said before anything is allocated, where an attempt could end with
    the process killed by the system's out-of-memory handler, without a message."""
    from .harness import available_bytes, size_text

    available = available_bytes(device)
    if available is None:
        return
    try:
        parts = estimate_bytes(name, batch=batch, seq=seq, layers=layers, dtype=dtype, training=training)
    except WorkloadUnavailable:
        return  # building it says why
    total = sum(parts.values())
    if total > available:
        detail = ", ".join(f"{part} {size_text(n)}" for part, n in parts.items())
        raise WorkloadTooLarge(f"{name} at batch {batch}, seq {seq} needs at least {size_text(total)} ({detail}), "
                               f"more than the {size_text(available)} available on {torch.device(device).type}")


def _padding_mask(batch: int, seq: int, device: torch.device, padding: float | None = None) -> torch.Tensor:
    """1 = token, 0 = padding: every other sequence has its last eighth padded; with ``padding``,
    every sequence its last fraction ``padding`` (at least one token kept)."""
    mask = torch.ones(batch, seq, dtype=torch.long, device=device)
    if padding is None:
        mask[1::2, seq - seq // 8:] = 0
    else:
        mask[:, max(1, seq - round(padding * seq)):] = 0
    return mask


def build(
    name: str, *, batch: int, seq: int, layers: int | None = None, device: torch.device, dtype: torch.dtype,
    seed: int = 0, training: bool = False, padding: float | None = None,
) -> Workload:
    """The model ``name`` (one of :data:`MODELS`) and its step, on ``device`` in ``dtype``;
    ``layers`` for the Transformer is its encoder's and its decoder's, each; ``padding`` the
    fraction of every sequence that is padding (default: the last eighth of every other). Refused
    (:class:`WorkloadTooLarge`) when it cannot fit (:func:`check_fits`; ``training`` for a
    training step)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    if batch < 1 or seq < 1 or (layers is not None and layers < 1):
        raise ValueError(f"batch, seq and layers must be positive, got batch={batch}, seq={seq}, layers={layers}")
    check_fits(name, batch=batch, seq=seq, layers=layers, device=device, dtype=dtype, training=training)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    device = torch.device(device)
    mask = _padding_mask(batch, seq, device, padding)
    config = _config(name, layers, seq)
    model = _model(name, config)

    if name == "transformer":
        src = torch.randint(1, config.src_vocab_size, (batch, seq), generator=gen).to(device)
        pad = mask == 0

        def step(m: nn.Module) -> torch.Tensor:
            return m.decode(src, m.encode(src, pad), pad, pad)

        n_layers = config.num_encoder_layers
    elif name == "nn-transformer":
        src = torch.randn(batch, seq, config.d_model, generator=gen).to(device=device, dtype=dtype)
        pad = mask == 0
        causal = nn.Transformer.generate_square_subsequent_mask(seq, device=device, dtype=dtype)

        def step(m: nn.Module) -> torch.Tensor:
            return m(src, src, tgt_mask=causal, src_key_padding_mask=pad, tgt_key_padding_mask=pad,
                     memory_key_padding_mask=pad)

        n_layers = config.num_encoder_layers
    else:
        ids = torch.randint(1, config.vocab_size, (batch, seq), generator=gen).to(device)

        def step(m: nn.Module) -> torch.Tensor:
            return m(input_ids=ids, attention_mask=mask).last_hidden_state

        n_layers = config.num_hidden_layers
    return Workload(name, model.to(device=device, dtype=dtype), step, batch, seq, n_layers)


def optimized(workload: Workload) -> nn.Module:
    """An ``optimize()``d copy of the workload's model (same weights)."""
    from ..convert import optimize

    return optimize(workload.model, inplace=False).model
