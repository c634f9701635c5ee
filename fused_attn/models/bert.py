"""BERT (Devlin et al. 2019) in plain PyTorch, with the parameter names of Hugging Face's BERT.

``BertModel``, ``BertForMaskedLM`` and ``BertForSequenceClassification`` have exactly the
``state_dict`` keys of ``transformers``' classes of the same names (``embeddings.word_embeddings``,
``encoder.layer.N.attention.self.query``, ``cls.predictions.decoder``, ...; transformers'
buffers ``embeddings.position_ids``/``token_type_ids`` are in neither (not persistent since
transformers 4.31; here made for each call, so that a model built on the meta device and loaded
with ``to_empty()`` + ``load_state_dict()`` reads nothing uninitialised), and an older checkpoint
that still holds them loads with ``strict=True``), so a Hugging Face
state_dict loads with ``strict=True`` and gives the same outputs, and ours loads into theirs.

``config.fused`` switches, at call time, to the fused ops of :mod:`fused_attn` (each called
with ``backend=config.backend``):

* embeddings LayerNorm: ``fused_attn.layer_norm``;
* self-attention: ``fused_attn.scaled_dot_product_attention`` with the padding mask passed as a
  [B, 1, 1, L] bool mask (never expanded) and the attention dropout inside;
* attention output and layer output blocks: the dense GEMM without its bias, then
  ``fused_attn.add_layer_norm`` (bias as ``input_bias``, hidden dropout inside, residual, norm);
* intermediate block and the MLM head's transform: ``fused_attn.linear_gelu``'s kernels
  (``approximate="tanh"`` for ``gelu_new``; ReLU for ``hidden_act="relu"``), the transform's
  LayerNorm ``fused_attn.layer_norm``.

The parameters are the same either way: a fused and a plain model share one state_dict.

Outputs: ``BertModel`` returns :class:`BertModelOutput` (``last_hidden_state`` [B, L, H],
``pooler_output`` [B, H] or None); the heads return :class:`BertHeadOutput` (``logits``,
``loss`` when ``labels`` are given, else None).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from . import _common


PROBLEM_TYPES = (None, "regression", "single_label_classification", "multi_label_classification")


@dataclasses.dataclass
class BertConfig:
    """BERT hyper-parameters (the defaults are bert-base-uncased's, as Hugging Face's BertConfig).

    ``hidden_act``: "gelu" (erf), "gelu_new" (tanh approximation; "gelu_pytorch_tanh" is
    accepted as its synonym) or "relu". ``fused``: run the fused ops of fused_attn; ``backend``: the
    ``backend=`` passed to every one of them (None: the usual precedence, see fused_attn.backends).
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    initializer_range: float = 0.02
    num_labels: int = 2
    problem_type: str | None = None
    classifier_dropout: float | None = None
    tie_word_embeddings: bool = True
    fused: bool = False
    backend: str | None = None

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )
        _common.activation_code(self.hidden_act)
        if self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"problem_type must be one of {PROBLEM_TYPES}, got {self.problem_type!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def bert_tiny(cls, **overrides) -> BertConfig:
        """google/bert_uncased_L-2_H-128_A-2: 2 layers, hidden 128, 2 heads, intermediate 512."""
        return cls(**{**dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512), **overrides})

    @classmethod
    def bert_base(cls, **overrides) -> BertConfig:
        """bert-base-uncased: 12 layers, hidden 768, 12 heads, intermediate 3072."""
        return cls(**overrides)

    @classmethod
    def bert_large(cls, **overrides) -> BertConfig:
        """bert-large-uncased: 24 layers, hidden 1024, 16 heads, intermediate 4096."""
        return cls(**{**dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096), **overrides})

    @classmethod
    def from_hf(cls, hf_config: object, **overrides) -> BertConfig:
        """From a ``transformers.BertConfig`` (or any object with its attribute names)."""
        names = [f.name for f in dataclasses.fields(cls) if f.name not in ("fused", "backend")]
        values = {n: getattr(hf_config, n) for n in names if getattr(hf_config, n, None) is not None}
        return cls(**{**values, **overrides})

    def to_hf_kwargs(self) -> dict[str, object]:
        """Keyword arguments for ``transformers.BertConfig(**kwargs)`` describing the same model."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("fused", "backend")}


@_common.model_output
class BertModelOutput:
    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor | None = None


@_common.model_output
class BertHeadOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None


def _dropout_p(module: nn.Module, p: float) -> float:
    """``p`` while ``module`` trains, else 0. As in transformers' BERT, the attention
    probabilities' dropout follows the attention module's mode and the hidden dropout its own
    ``nn.Dropout``'s (so a model trained with its dropout modules in eval mode has none)."""
    return p if module.training else 0.0


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints of transformers < 4.31 still hold these buffers; they are constants.
        for name in ("position_ids", "token_type_ids"):
            state_dict.pop(prefix + name, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        length = input_ids.shape[1]
        if position_ids is None:
            if length > self.config.max_position_embeddings:
                raise ValueError(
                    f"input_ids length {length} exceeds max_position_embeddings {self.config.max_position_embeddings}"
                )
            # Made for each call, not a buffer as in transformers: a model built on the meta device
            # and loaded with to_empty() + load_state_dict() has no uninitialised buffer to read.
            position_ids = torch.arange(length, device=input_ids.device)[None]
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        embeddings = (
            self.word_embeddings(input_ids)
            + self.token_type_embeddings(token_type_ids)
            + self.position_embeddings(position_ids)
        )
        embeddings = _common.layer_norm(embeddings, self.LayerNorm, fused=self.config.fused, backend=self.config.backend)
        return self.dropout(embeddings)


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.num_attention_heads = config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        heads = self.num_attention_heads
        context = _common.attention(
            _common.split_heads(self.query(hidden_states), heads),
            _common.split_heads(self.key(hidden_states), heads),
            _common.split_heads(self.value(hidden_states), heads),
            keep,
            dropout_p=_dropout_p(self, self.dropout.p),
            fused=self.config.fused,
            backend=self.config.backend,
        )
        return _common.merge_heads(context)


class BertSelfOutput(nn.Module):
    """``LayerNorm(input_tensor + dropout(dense(hidden_states)))``."""

    def __init__(self, config: BertConfig, in_features: int | None = None):
        super().__init__()
        self.config = config
        self.dense = nn.Linear(in_features or config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return _common.add_norm(
            hidden_states, input_tensor, self.dense, self.LayerNorm, _dropout_p(self.dropout, self.dropout.p),
            fused=self.config.fused, backend=self.config.backend,
        )


class BertOutput(BertSelfOutput):
    def __init__(self, config: BertConfig):
        super().__init__(config, in_features=config.intermediate_size)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, hidden_states: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(hidden_states, keep), hidden_states)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act_code = _common.activation_code(config.hidden_act)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return _common.linear_activation(
            hidden_states, self.dense, self.act_code, fused=self.config.fused, backend=self.config.backend
        )


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden_states: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        attention_output = self.attention(hidden_states, keep)
        return self.output(self.intermediate(attention_output), attention_output)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, hidden_states: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layer:
            hidden_states = layer(hidden_states, keep)
        return hidden_states


class BertPooler(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(hidden_states[:, 0]))


class BertPreTrainedModel(nn.Module):
    """Weight initialisation as Hugging Face's: N(0, initializer_range) for linear and embedding
    weights, zero biases (and padding row), LayerNorm weight 1 and bias 0."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, BertLMPredictionHead):
            nn.init.zeros_(module.bias)

    def post_init(self) -> None:
        self.apply(self._init_weights)


class BertModel(BertPreTrainedModel):
    """The BERT encoder: ``forward(input_ids, attention_mask=None, token_type_ids=None,
    position_ids=None)`` -> :class:`BertModelOutput`.

    ``attention_mask`` [B, L]: 1 (or True) = attend, 0 = padding; None attends everywhere.
    """

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> BertModelOutput:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape [batch, length], got {list(input_ids.shape)}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {list(attention_mask.shape)} does not match input_ids {list(input_ids.shape)}"
            )
        keep = _common.key_keep_mask(attention_mask, pad_is_true=False)
        hidden = self.embeddings(input_ids, token_type_ids, position_ids)
        hidden = self.encoder(hidden, keep)
        pooled = self.pooler(hidden) if self.pooler is not None else None
        return BertModelOutput(last_hidden_state=hidden, pooler_output=pooled)


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act_code = _common.activation_code(config.hidden_act)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        fused, backend = self.config.fused, self.config.backend
        hidden_states = _common.linear_activation(hidden_states, self.dense, self.act_code, fused=fused,
                                                  backend=backend)
        return _common.layer_norm(hidden_states, self.LayerNorm, fused=fused, backend=backend)


class BertLMPredictionHead(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        # One parameter under two names, as Hugging Face's (both keys are in the state_dict).
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.decoder.bias = self.bias

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden_states))


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)

    def forward(self, sequence_output: torch.Tensor) -> torch.Tensor:
        return self.predictions(sequence_output)


class BertForMaskedLM(BertPreTrainedModel):
    """BERT with the masked-LM head; ``cls.predictions.decoder.weight`` is the word embedding
    matrix when ``config.tie_word_embeddings`` (the default, as Hugging Face's).

    ``forward(input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
    labels=None)`` -> :class:`BertHeadOutput` with ``logits`` [B, L, vocab] and, given
    ``labels`` [B, L] (-100 = ignored), the mean cross-entropy ``loss``.
    """

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(config)
        self.post_init()
        if config.tie_word_embeddings:
            self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def get_output_embeddings(self) -> nn.Linear:
        return self.cls.predictions.decoder

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> BertHeadOutput:
        hidden = self.bert(input_ids, attention_mask, token_type_ids, position_ids).last_hidden_state
        logits = self.cls(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, self.config.vocab_size), labels.reshape(-1), ignore_index=-100)
        return BertHeadOutput(logits=logits, loss=loss)


class BertForSequenceClassification(BertPreTrainedModel):
    """BERT with a classifier on the pooled output.

    ``forward(...)`` -> :class:`BertHeadOutput` with ``logits`` [B, num_labels] and, given
    ``labels``, the loss Hugging Face picks: by ``config.problem_type`` ("regression": mean
    squared error, "single_label_classification": cross-entropy, "multi_label_classification":
    binary cross-entropy with logits), or when it is None, by the labels: regression when
    ``num_labels == 1``, single-label for integer labels, else multi-label. (Hugging Face also
    writes the type it inferred into its config; this model infers it on every call.)
    """

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> BertHeadOutput:
        pooled = self.bert(input_ids, attention_mask, token_type_ids, position_ids).pooler_output
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            problem = self.config.problem_type
            if problem is None:
                integer = labels.dtype in (torch.long, torch.int)
                problem = PROBLEM_TYPES[1 if self.num_labels == 1 else 2 if integer else 3]
            if problem == "regression":
                squeeze = self.num_labels == 1
                loss = F.mse_loss(logits.squeeze() if squeeze else logits,
                                  (labels.squeeze() if squeeze else labels).to(logits.dtype))
            elif problem == "single_label_classification":
                loss = F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
            else:
                loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
        return BertHeadOutput(logits=logits, loss=loss)


__all__ = [
    "BertConfig",
    "BertForMaskedLM",
    "BertForSequenceClassification",
    "BertHeadOutput",
    "BertModel",
    "BertModelOutput",
]
