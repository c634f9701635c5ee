"""Reference models built from plain PyTorch layers, switchable to the fused ops.

* :mod:`fused_attn.models.bert`: ``BertModel``, ``BertForMaskedLM``,
  ``BertForSequenceClassification`` with Hugging Face's parameter names (a transformers BERT
  state_dict loads with ``strict=True``);
* :mod:`fused_attn.models.transformer`: an encoder-decoder ``Transformer`` (post-LN or pre-LN).

Each model's config has ``fused`` (run fused_attn's ops instead of plain PyTorch; the
parameters are the same) and ``backend`` (passed to every op call). With ``fused=False`` the
models are plain PyTorch and run in any dtype, float64 included (the oracle of the tests).
"""

from .bert import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertHeadOutput,
    BertModel,
    BertModelOutput,
)
from .transformer import Transformer, TransformerConfig, TransformerOutput

__all__ = [
    "BertConfig",
    "BertForMaskedLM",
    "BertForSequenceClassification",
    "BertHeadOutput",
    "BertModel",
    "BertModelOutput",
    "Transformer",
    "TransformerConfig",
    "TransformerOutput",
]
