"""``FusedMultiheadAttention``: ``torch.nn.MultiheadAttention`` running on the fused kernels."""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ..backends import warn_once
from ..ops import scaled_dot_product_attention, softmax
from ..reference.attention import causal_keep
from ._fused import Fused


def _keep_mask(mask: torch.Tensor | None, name: str, dtype: torch.dtype | None) -> torch.Tensor | None:
    """torch.nn's masks say True = masked out; the fused ops say True = attend. Floats pass, of
    ``dtype`` when one is given (torch's attention requires the query's)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return ~mask
    if not mask.is_floating_point():
        raise TypeError(f"{name} must be a bool or floating tensor, got {mask.dtype}")
    if dtype is not None and mask.dtype != dtype:
        raise TypeError(f"{name} must be bool or have the query's dtype {dtype}, got {mask.dtype}")
    return mask


def merge_masks(
    attn_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    batch: int,
    heads: int,
    q_len: int,
    k_len: int,
    dtype: torch.dtype,
    *,
    exact_dtype: bool = True,
) -> torch.Tensor | None:
    """One mask in the fused ops' convention, broadcastable to [batch, heads, q_len, k_len].

    ``attn_mask`` is [q_len, k_len] or [batch * heads, q_len, k_len] and ``key_padding_mask``
    [batch, k_len], in torch.nn's convention (bool True = masked, or floats added). A single
    mask stays a broadcast view; two masks are combined (AND of the keeps, or a sum of floats).
    A float mask must have ``dtype`` (the query's) when ``exact_dtype`` (False under autocast,
    which casts it with the rest).
    """
    mask_dtype = dtype if exact_dtype else None
    attn = _keep_mask(attn_mask, "attn_mask", mask_dtype)
    if attn is not None:
        if attn.dim() == 2 and attn.shape == (q_len, k_len):
            attn = attn.view(1, 1, q_len, k_len)
        elif attn.dim() == 3 and attn.shape == (batch * heads, q_len, k_len):
            attn = attn.view(batch, heads, q_len, k_len)
        else:
            raise ValueError(
                f"attn_mask must have shape [{q_len}, {k_len}] or [{batch * heads}, {q_len}, {k_len}], "
                f"got {list(attn_mask.shape)}"
            )
    pad = _keep_mask(key_padding_mask, "key_padding_mask", mask_dtype)
    if pad is not None:
        if pad.shape != (batch, k_len):
            raise ValueError(f"key_padding_mask must have shape [{batch}, {k_len}], got {list(pad.shape)}")
        pad = pad.view(batch, 1, 1, k_len)
    if attn is None or pad is None:
        return attn if pad is None else pad
    if attn.dtype == torch.bool and pad.dtype == torch.bool:
        return attn & pad

    def additive(m: torch.Tensor) -> torch.Tensor:
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, float("-inf"))
        return m.to(dtype)

    return additive(attn) + additive(pad)


# Masks found causal or not (_is_causal_mask), by id, with a weak reference and the version they had.
_causal_checks: dict[int, tuple[weakref.ref, int, bool]] = {}


def _is_causal_mask(attn_mask: torch.Tensor, q_len: int, k_len: int) -> bool:
    """Whether ``attn_mask`` (torch.nn's convention, [q_len, k_len] or [batch * heads, q_len,
    k_len]) is the top-left causal mask: True above the diagonal (bool), or -inf above it and 0
    elsewhere (``nn.Transformer.generate_square_subsequent_mask``). The answer is kept per mask
    tensor and version, so a mask handed to every layer of a model, call after call, is compared
    once (on a GPU the comparison waits for the device, as torch's own
    ``TransformerDecoder`` check does). Not checked (False: the mask applies as given) while
    torch.compile traces or a CUDA graph is captured, where no value can be read."""
    if torch.compiler.is_compiling() or (attn_mask.is_cuda and torch.cuda.is_current_stream_capturing()):
        return False
    versioned = not attn_mask.is_inference()  # inference tensors have no version counter
    seen = _causal_checks.get(id(attn_mask))
    if versioned and seen is not None and seen[0]() is attn_mask and seen[1] == attn_mask._version:
        return seen[2]
    hidden = ~causal_keep(q_len, k_len, attn_mask.device)
    if attn_mask.dtype == torch.bool:
        causal = torch.equal(attn_mask, hidden.expand_as(attn_mask))
    else:
        causal = bool(torch.where(hidden, attn_mask == float("-inf"), attn_mask == 0).all())
    if versioned:
        if len(_causal_checks) >= 16:
            _causal_checks.clear()
        _causal_checks[id(attn_mask)] = (weakref.ref(attn_mask), attn_mask._version, causal)
    return causal


def _same_views(query, key, value, view):
    """``view`` of each, keeping the identities between them: self-attention (query is key is
    value) is recognised after the layout change and projected by one GEMM, as torch's does."""
    q = view(query)
    k = q if key is query else view(key)
    v = k if value is key else q if value is query else view(value)
    return q, k, v


class FusedMultiheadAttention(Fused, nn.MultiheadAttention):
    """:class:`torch.nn.MultiheadAttention` with the attention computed by the fused kernels.

    Same constructor, parameters (``in_proj_weight`` / ``q_proj_weight``..., ``in_proj_bias``,
    ``out_proj``), ``state_dict`` and forward. ``need_weights=True`` (torch's default) computes
    the probabilities with the fused masked softmax and returns them (averaged over heads unless
    ``average_attn_weights=False``); ``need_weights=False`` runs the fused FlashAttention kernel,
    which never materialises them. Differences from torch: a query whose keys are all masked
    gets 0 where torch's gets NaN (where torch's computes the weights, ``need_weights=True``, or
    takes its inference fast path; elsewhere it gets 0 too). ``add_bias_kv`` / ``add_zero_attn``
    are served by torch's own implementation (a warning says so once), and so are nested-tensor
    inputs (which torch takes in inference). As in torch, ``is_causal`` replaces ``attn_mask`` by
    causal masking when neither ``need_weights`` nor a ``key_padding_mask`` needs the mask itself;
    where one does, torch applies the ``attn_mask`` given, and so does this module unless the mask
    is the causal mask itself (checked once per mask tensor and version; not while torch.compile
    traces or a CUDA graph is captured), which then runs as causal masking with the key padding
    mask alone: the same result, with the tiles above the diagonal skipped and no merged mask
    built. The output projection reads ``out_proj``'s parameters, as torch's does, rather than
    calling the module.
    ``backend`` (attribute) picks the kernel backend.
    """

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        extra_kv = self.bias_k is not None or self.add_zero_attn
        if extra_kv:
            warn_once("FusedMultiheadAttention: add_bias_kv/add_zero_attn run torch's MultiheadAttention", 4)
        if extra_kv or query.is_nested or key.is_nested or value.is_nested:
            return super().forward(
                query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
            )
        is_causal = bool(is_causal)  # None and numpy bools too, as torch takes them
        if is_causal and attn_mask is None:
            raise RuntimeError("FusedMultiheadAttention: is_causal=True needs attn_mask (as torch's): it is a hint")
        self._check_inputs(query, key, value)
        batched = query.dim() == 3
        if not batched:
            if key_padding_mask is not None and key_padding_mask.dim() != 1:
                raise ValueError("key_padding_mask must be 1-D [key length] for an unbatched (2-D) query, "
                                 f"got shape {list(key_padding_mask.shape)}")
            query, key, value = _same_views(query, key, value, lambda t: t.unsqueeze(1))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        # The inputs stay in the caller's layout, [seq, batch, embed] or (batch_first) [batch, seq,
        # embed]: the projections run on them as they are, the heads are strided views of the
        # projections, and the attention output comes back in the query's layout, so the heads
        # merge again, and the output projection lands in the caller's layout, with no copy.
        seq_dim = 1 if batched and self.batch_first else 0
        # [.., .., embed] -> [batch, heads, seq, head_dim], and back
        split_heads, merge_heads = ((0, 2, 1, 3), (0, 2, 1, 3)) if seq_dim == 1 else ((1, 2, 0, 3), (2, 0, 1, 3))
        q_len, k_len, batch = query.shape[seq_dim], key.shape[seq_dim], query.shape[1 - seq_dim]
        heads, head_dim = self.num_heads, self.head_dim
        q, k, v = self._project(query, key, value)
        q, k, v = (t.unflatten(-1, (heads, head_dim)).permute(*split_heads) for t in (q, k, v))
        # With is_causal the attn_mask is only a hint (torch's convention): the kernel's own causal
        # masking replaces it. Where the weights or a key padding mask need the mask itself, torch
        # applies the attn_mask given; so does this, unless the mask is the causal one
        # (_is_causal_mask), whose causal masking (skipping the tiles above the diagonal) with the
        # key padding mask alone gives the same result without the merged [B, 1, Lq, Lk] mask.
        exact_dtype = not torch.is_autocast_enabled(query.device.type)
        if is_causal:
            merge_masks(attn_mask, None, batch, heads, q_len, k_len, q.dtype, exact_dtype=exact_dtype)  # checked
            if key_padding_mask is not None or need_weights:
                is_causal = not attn_mask.requires_grad and _is_causal_mask(attn_mask, q_len, k_len)
        mask = merge_masks(None if is_causal else attn_mask, key_padding_mask, batch, heads, q_len, k_len, q.dtype,
                           exact_dtype=exact_dtype)
        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = torch.matmul(q, k.transpose(-2, -1))
            probs = softmax(scores, -1, mask, 1.0 / math.sqrt(head_dim), is_causal, backend=self.backend)
            if dropout_p > 0.0:
                probs = F.dropout(probs, dropout_p)
            out = torch.matmul(probs, v)
            weights = probs.mean(dim=1) if average_attn_weights else probs
            if not batched:
                weights = weights.squeeze(0)
        else:
            out = scaled_dot_product_attention(q, k, v, mask, dropout_p, is_causal, backend=self.backend)
        out = out.permute(*merge_heads).flatten(-2)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        return (out if batched else out.squeeze(1)), weights

    def _check_inputs(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Shapes as torch's MultiheadAttention asserts them, as ValueErrors naming the argument."""
        if query.dim() not in (2, 3):
            raise ValueError(
                f"query must be unbatched 2-D [seq, embed] or batched 3-D, got shape {list(query.shape)}"
            )
        for name, t, width in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if t.dim() != query.dim():
                raise ValueError(f"{name} must have {query.dim()} dims as query has, got shape {list(t.shape)}")
            if t.shape[-1] != width:
                raise ValueError(f"{name} must have embedding dim {width}, got shape {list(t.shape)}")
        if query.dim() == 3:
            batch_dim = 0 if self.batch_first else 1
            for name, t in (("key", key), ("value", value)):
                if t.shape[batch_dim] != query.shape[batch_dim]:
                    raise ValueError(
                        f"{name} batch {t.shape[batch_dim]} does not match query batch {query.shape[batch_dim]}"
                    )
        seq_dim = 1 if query.dim() == 3 and self.batch_first else 0
        if key.shape[seq_dim] != value.shape[seq_dim]:
            raise ValueError(f"value length {value.shape[seq_dim]} does not match key length {key.shape[seq_dim]}")

    def _project(self, query, key, value):
        if self._qkv_same_embed_dim:
            # One GEMM for what shares an input: Q, K and V in self-attention, K and V when the
            # memory serves as both (cross-attention), as torch's own projection does.
            if query is key and key is value:
                return F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
            if key is value:
                w_q, w_kv = self.in_proj_weight.split([self.embed_dim, 2 * self.embed_dim])
                b_q, b_kv = (self.in_proj_bias.split([self.embed_dim, 2 * self.embed_dim])
                             if self.in_proj_bias is not None else (None, None))
                return (F.linear(query, w_q, b_q), *F.linear(key, w_kv, b_kv).chunk(2, dim=-1))
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
