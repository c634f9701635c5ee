"""Whole models to measure: the package's reference BERT and Transformer, and Hugging Face BERT.

:func:`build` returns a model with random weights (built from a config; nothing is downloaded)
and a ``step(model)`` that runs it on fixed random token ids with a padding mask and returns its
last hidden state. The vocabulary projection of a language-model head is left out on purpose:
it is the same dense layer with or without fusion and, at long sequence lengths, its logits
would dominate both time and memory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

MODELS = ("bert-tiny", "bert-mini", "bert-base", "bert-large", "transformer", "hf-bert")


class WorkloadUnavailable(RuntimeError):
    """The workload cannot be built here (e.g. an optional dependency is missing)."""


@dataclasses.dataclass
class Workload:
    name: str
    model: nn.Module
    step: Callable[[nn.Module], torch.Tensor]
    batch: int
    seq: int
    layers: int

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


def _padding_mask(batch: int, seq: int, device: torch.device) -> torch.Tensor:
    """1 = token, 0 = padding: every other sequence has its last eighth padded."""
    mask = torch.ones(batch, seq, dtype=torch.long, device=device)
    mask[1::2, seq - seq // 8:] = 0
    return mask


def build(
    name: str, *, batch: int, seq: int, layers: int | None = None, device: torch.device, dtype: torch.dtype,
    seed: int = 0,
) -> Workload:
    """The model ``name`` (one of :data:`MODELS`) and its step, on ``device`` in ``dtype``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    if batch < 1 or seq < 1 or (layers is not None and layers < 1):
        raise ValueError(f"batch, seq and layers must be positive, got batch={batch}, seq={seq}, layers={layers}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    device = torch.device(device)
    mask = _padding_mask(batch, seq, device)

    if name == "transformer":
        from ..models import Transformer, TransformerConfig

        config = TransformerConfig(max_position_embeddings=max(1024, seq))
        if layers is not None:
            config.num_encoder_layers = config.num_decoder_layers = layers
        model = Transformer(config)
        src = torch.randint(1, config.src_vocab_size, (batch, seq), generator=gen).to(device)
        pad = mask == 0

        def step(m: nn.Module) -> torch.Tensor:
            return m.decode(src, m.encode(src, pad), pad, pad)

        n_layers = config.num_encoder_layers + config.num_decoder_layers
    else:
        config = _bert_config(name, layers, seq)
        ids = torch.randint(1, config.vocab_size, (batch, seq), generator=gen).to(device)
        if name == "hf-bert":
            try:
                import transformers
            except ImportError:
                raise WorkloadUnavailable("hf-bert needs the transformers package (pip install transformers)") from None
            model = transformers.BertModel(transformers.BertConfig(**config.to_hf_kwargs()), add_pooling_layer=False)
        else:
            from ..models import BertModel

            model = BertModel(config, add_pooling_layer=False)

        def step(m: nn.Module) -> torch.Tensor:
            return m(input_ids=ids, attention_mask=mask).last_hidden_state

        n_layers = config.num_hidden_layers
    return Workload(name, model.to(device=device, dtype=dtype), step, batch, seq, n_layers)


def optimized(workload: Workload) -> nn.Module:
    """An ``optimize()``d copy of the workload's model (same weights)."""
    from ..convert import optimize

    return optimize(workload.model, inplace=False).model
