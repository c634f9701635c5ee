"""An encoder-decoder Transformer (Vaswani et al. 2017) with GELU FFNs, post-LN or pre-LN.

Token embeddings (scaled by sqrt(d_model) unless ``scale_embedding=False``) plus sinusoidal or
learned positions; N encoder layers (self-attention, FFN), N decoder layers (causal
self-attention, cross-attention over the encoder output, FFN); ``norm_first=False`` is the
original post-LN ``x = norm(x + dropout(sublayer(x)))``, ``norm_first=True`` pre-LN
``x = x + dropout(sublayer(norm(x)))`` with a final LayerNorm after each stack; then a linear
projection to the target vocabulary (its weight tied to the target embedding when
``tie_output_embeddings``).

Padding masks are torch's ``key_padding_mask`` convention: bool [B, L], True = padding. A
query whose every key is masked (e.g. the first positions of a left-padded target under the
causal mask) attends to nothing and gets a zero attention output, in both paths.

``config.fused`` switches, at call time, to the fused ops of :mod:`fused_attn` (each called
with ``backend=config.backend``): attention through ``fused_attn.scaled_dot_product_attention``
(padding as a [B, 1, 1, L] bool mask, never expanded; the decoder's causal mask as
``is_causal=True`` combined with it; cross-attention with query and key lengths that differ);
post-LN: out-projections and the FFN's second GEMM without bias followed by
``fused_attn.add_layer_norm`` (bias, dropout, residual, norm in one pass), the FFN's first GEMM
``fused_attn.linear_gelu``'s kernels (GELU or ReLU); pre-LN: ``fused_attn.layer_norm`` for the
first norm of a layer, ``fused_attn.add_layer_norm(..., return_prenorm=True)`` for each residual
add that is followed by a norm, and ``fused_attn.ffn`` (both GEMMs, the activation and dropout) for
the FFN. The parameters
are the same either way.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops as fused_ops
from ..ops.ffn import ffn_activation
from ..reference.ffn import activate
from . import _common


@dataclasses.dataclass
class TransformerConfig:
    """Hyper-parameters; ``tgt_vocab_size=None`` means the source vocabulary's size.

    ``activation``: "gelu" (erf), "gelu_tanh"/"gelu_new" (tanh approximation) or "relu".
    ``positional``: "sinusoidal" (fixed, not a parameter) or "learned".
    ``attention_dropout=None`` uses ``dropout``.
    """

    src_vocab_size: int = 32000
    tgt_vocab_size: int | None = None
    d_model: int = 512
    nhead: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    attention_dropout: float | None = None
    activation: str = "gelu"
    norm_first: bool = False
    layer_norm_eps: float = 1e-5
    positional: str = "sinusoidal"
    max_position_embeddings: int = 1024
    pad_token_id: int = 0
    scale_embedding: bool = True
    share_embeddings: bool = False
    tie_output_embeddings: bool = True
    init_std: float = 0.02
    fused: bool = False
    backend: str | None = None

    def __post_init__(self) -> None:
        if self.tgt_vocab_size is None:
            self.tgt_vocab_size = self.src_vocab_size
        if self.d_model % self.nhead:
            raise ValueError(f"d_model {self.d_model} is not a multiple of nhead {self.nhead}")
        if self.positional not in ("sinusoidal", "learned"):
            raise ValueError(f"positional must be 'sinusoidal' or 'learned', got {self.positional!r}")
        if self.share_embeddings and self.src_vocab_size != self.tgt_vocab_size:
            raise ValueError("share_embeddings needs src_vocab_size == tgt_vocab_size")
        _common.activation_code(self.activation)

    @property
    def attn_dropout(self) -> float:
        return self.dropout if self.attention_dropout is None else self.attention_dropout


@_common.model_output
class TransformerOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    encoder_last_hidden_state: torch.Tensor | None = None


def sinusoidal_positions(length: int, d_model: int, device: torch.device | str | None = None) -> torch.Tensor:
    """[length, d_model] float32: sin on even channels, cos on odd ones, wavelengths 2*pi ..
    10000*2*pi; computed in float64 (float32 on MPS, which has no float64) on ``device``."""
    dtype = torch.float32 if torch.device(device or "cpu").type == "mps" else torch.float64
    position = torch.arange(length, dtype=dtype, device=device)[:, None]
    inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=dtype, device=device) * (-math.log(10000.0) / d_model))
    angles = position * inv_freq
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(1)[:, :d_model].float()


class MultiHeadAttention(nn.Module):
    """Projections q/k/v and the attention core; ``out_proj`` is applied by the layer (its GEMM
    runs without bias and the bias goes into the fused Add & Norm)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        d = config.d_model
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def context(
        self, x: torch.Tensor, memory: torch.Tensor, keep: torch.Tensor | None, is_causal: bool
    ) -> torch.Tensor:
        heads = self.config.nhead
        out = _common.attention(
            _common.split_heads(self.q_proj(x), heads),
            _common.split_heads(self.k_proj(memory), heads),
            _common.split_heads(self.v_proj(memory), heads),
            keep,
            is_causal=is_causal,
            dropout_p=self.config.attn_dropout if self.training else 0.0,
            fused=self.config.fused,
            backend=self.config.backend,
        )
        return _common.merge_heads(out)


class _Layer(nn.Module):
    """Shared sublayer plumbing of encoder and decoder layers."""

    config: TransformerConfig

    def _build_ffn(self, config: TransformerConfig) -> None:
        self.linear1 = nn.Linear(config.d_model, config.dim_feedforward)
        self.linear2 = nn.Linear(config.dim_feedforward, config.d_model)
        self.act_code = _common.activation_code(config.activation)

    @property
    def _p(self) -> float:
        return self.config.dropout if self.training else 0.0

    def _norm(self, x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
        return _common.layer_norm(x, norm, fused=self.config.fused, backend=self.config.backend)

    def _post_ln(self, x: torch.Tensor, residual: torch.Tensor, dense: nn.Linear, norm: nn.LayerNorm) -> torch.Tensor:
        """norm(residual + dropout(dense(x)))."""
        return _common.add_norm(x, residual, dense, norm, self._p, fused=self.config.fused, backend=self.config.backend)

    def _pre_ln(
        self, x: torch.Tensor, residual: torch.Tensor, dense: nn.Linear, next_norm: nn.LayerNorm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(next_norm(s), s) with s = residual + dropout(dense(x)): the residual stream and the
        next sublayer's normalised input."""
        return _common.add_norm(
            x, residual, dense, next_norm, self._p, fused=self.config.fused, backend=self.config.backend,
            return_prenorm=True,
        )

    def _ffn_post_ln(self, x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
        fused, backend = self.config.fused, self.config.backend
        hidden = _common.linear_activation(x, self.linear1, self.act_code, fused=fused, backend=backend)
        return self._post_ln(hidden, x, self.linear2, norm)

    def _ffn_pre_ln(self, normed: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + dropout(linear2(act(linear1(normed))))."""
        if self.config.fused and not _common.must_call(self.linear1, self.linear2):
            return residual + fused_ops.ffn(
                normed, self.linear1.weight, self.linear1.bias, self.linear2.weight, self.linear2.bias,
                dropout_p=self._p, **ffn_activation(self.act_code), backend=self.config.backend,
            )
        hidden = activate(self.linear1(normed), self.act_code)
        return residual + F.dropout(self.linear2(hidden), self._p, training=self._p > 0.0)


class TransformerEncoderLayer(_Layer):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.self_attn = MultiHeadAttention(config)
        self.norm1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.norm2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self._build_ffn(config)

    def forward(self, x: torch.Tensor, src_keep: torch.Tensor | None) -> torch.Tensor:
        attn = self.self_attn
        if self.config.norm_first:
            h = self._norm(x, self.norm1)
            h, x = self._pre_ln(attn.context(h, h, src_keep, False), x, attn.out_proj, self.norm2)
            return self._ffn_pre_ln(h, x)
        x = self._post_ln(attn.context(x, x, src_keep, False), x, attn.out_proj, self.norm1)
        return self._ffn_post_ln(x, self.norm2)


class TransformerDecoderLayer(_Layer):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.self_attn = MultiHeadAttention(config)
        self.cross_attn = MultiHeadAttention(config)
        self.norm1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.norm2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.norm3 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self._build_ffn(config)

    def forward(
        self, x: torch.Tensor, memory: torch.Tensor, tgt_keep: torch.Tensor | None, memory_keep: torch.Tensor | None
    ) -> torch.Tensor:
        sa, ca = self.self_attn, self.cross_attn
        if self.config.norm_first:
            h = self._norm(x, self.norm1)
            h, x = self._pre_ln(sa.context(h, h, tgt_keep, True), x, sa.out_proj, self.norm2)
            h, x = self._pre_ln(ca.context(h, memory, memory_keep, False), x, ca.out_proj, self.norm3)
            return self._ffn_pre_ln(h, x)
        x = self._post_ln(sa.context(x, x, tgt_keep, True), x, sa.out_proj, self.norm1)
        x = self._post_ln(ca.context(x, memory, memory_keep, False), x, ca.out_proj, self.norm2)
        return self._ffn_post_ln(x, self.norm3)


class TransformerEncoder(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList([TransformerEncoderLayer(config) for _ in range(config.num_encoder_layers)])
        self.norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps) if config.norm_first else None

    def forward(self, x: torch.Tensor, src_keep: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, src_keep)
        if self.norm is not None:
            x = _common.layer_norm(x, self.norm, fused=self.config.fused, backend=self.config.backend)
        return x


class TransformerDecoder(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList([TransformerDecoderLayer(config) for _ in range(config.num_decoder_layers)])
        self.norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps) if config.norm_first else None

    def forward(
        self, x: torch.Tensor, memory: torch.Tensor, tgt_keep: torch.Tensor | None, memory_keep: torch.Tensor | None
    ) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, memory, tgt_keep, memory_keep)
        if self.norm is not None:
            x = _common.layer_norm(x, self.norm, fused=self.config.fused, backend=self.config.backend)
        return x


class Transformer(nn.Module):
    """``forward(src, tgt, src_key_padding_mask=None, tgt_key_padding_mask=None, labels=None)``
    -> :class:`TransformerOutput` (``logits`` [B, Lt, tgt_vocab]; ``loss``, the mean
    cross-entropy against ``labels`` [B, Lt] with -100 ignored, when given; the encoder output).

    ``src`` [B, Ls] and ``tgt`` [B, Lt] are token ids (``tgt`` is the decoder input, i.e. the
    shifted target); the padding masks are bool [B, L], True = padding. The source padding mask
    masks the keys of the encoder self-attention and of every cross-attention.
    """

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        d = config.d_model
        self.src_embed = nn.Embedding(config.src_vocab_size, d, padding_idx=config.pad_token_id)
        self.tgt_embed = (
            self.src_embed
            if config.share_embeddings
            else nn.Embedding(config.tgt_vocab_size, d, padding_idx=config.pad_token_id)
        )
        if config.positional == "learned":
            self.src_pos_embed = nn.Embedding(config.max_position_embeddings, d)
            self.tgt_pos_embed = nn.Embedding(config.max_position_embeddings, d)
        self.embed_dropout = nn.Dropout(config.dropout)
        self.encoder = TransformerEncoder(config)
        self.decoder = TransformerDecoder(config)
        self.output_proj = nn.Linear(d, config.tgt_vocab_size)
        self._init_weights()
        if config.tie_output_embeddings:
            self.output_proj.weight = self.tgt_embed.weight

    def _init_weights(self) -> None:
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                # With scaled embeddings the token table is N(0, 1/d) so that scaled rows are O(1).
                scaled_tokens = self.config.scale_embedding and module in (self.src_embed, self.tgt_embed)
                nn.init.normal_(module.weight, std=self.config.d_model**-0.5 if scaled_tokens else std)
                if module.padding_idx is not None:
                    with torch.no_grad():
                        module.weight[module.padding_idx].zero_()

    def _embed(self, tokens: torch.Tensor, table: nn.Embedding, pos_table: nn.Embedding | None) -> torch.Tensor:
        length = tokens.shape[1]
        if length > self.config.max_position_embeddings:
            raise ValueError(f"length {length} exceeds max_position_embeddings {self.config.max_position_embeddings}")
        x = table(tokens)
        if self.config.scale_embedding:
            x = x * math.sqrt(self.config.d_model)
        if pos_table is not None:
            x = x + pos_table.weight[:length]
        else:  # computed for each call rather than held in a buffer, which a model built on the meta
            # device and loaded with to_empty() + load_state_dict() would leave uninitialised
            x = x + sinusoidal_positions(length, self.config.d_model, x.device).to(x.dtype)
        return self.embed_dropout(x)

    def encode(self, src: torch.Tensor, src_key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder output ("memory") [B, Ls, d_model]."""
        src_keep = _common.key_keep_mask(src_key_padding_mask, pad_is_true=True)
        return self.encoder(self._embed(src, self.src_embed, getattr(self, "src_pos_embed", None)), src_keep)

    def decode(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        tgt_key_padding_mask: torch.Tensor | None = None,
        memory_key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The decoder's last hidden state [B, Lt, d_model] (before the vocabulary projection)."""
        tgt_keep = _common.key_keep_mask(tgt_key_padding_mask, pad_is_true=True)
        memory_keep = _common.key_keep_mask(memory_key_padding_mask, pad_is_true=True)
        x = self._embed(tgt, self.tgt_embed, getattr(self, "tgt_pos_embed", None))
        return self.decoder(x, memory, tgt_keep, memory_keep)

    def forward(
        self,
        src: torch.Tensor,
        tgt: torch.Tensor,
        src_key_padding_mask: torch.Tensor | None = None,
        tgt_key_padding_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> TransformerOutput:
        for name, tokens, mask in (("src", src, src_key_padding_mask), ("tgt", tgt, tgt_key_padding_mask)):
            if tokens.dim() != 2:
                raise ValueError(f"{name} must have shape [batch, length], got {list(tokens.shape)}")
            if mask is not None and mask.shape != tokens.shape:
                raise ValueError(f"{name}_key_padding_mask shape {list(mask.shape)} does not match {name} {list(tokens.shape)}")
        if src.shape[0] != tgt.shape[0]:
            raise ValueError(f"src batch {src.shape[0]} != tgt batch {tgt.shape[0]}")
        memory = self.encode(src, src_key_padding_mask)
        hidden = self.decode(tgt, memory, tgt_key_padding_mask, src_key_padding_mask)
        logits = self.output_proj(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        return TransformerOutput(logits=logits, loss=loss, encoder_last_hidden_state=memory)


__all__ = ["Transformer", "TransformerConfig", "TransformerOutput", "sinusoidal_positions"]
