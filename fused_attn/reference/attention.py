import math

import torch

from ._dropout import apply_dropout


def causal_keep(q_len: int, k_len: int, device: torch.device, diagonal: int = 0) -> torch.Tensor:
    """The [q_len, k_len] bool mask (True = attend) in which query i sees keys j <= i + diagonal:
    top-left aligned for 0, as torch.nn.functional.scaled_dot_product_attention's is_causal;
    bottom-right for k_len - q_len."""
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril_(diagonal)


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the softmax is computed in: float32 for 16-bit inputs, as the kernels compute it
    (and as Hugging Face's eager attention does), so that a large scale or mask value (e.g.
    -1e9, beyond float16's range) saturates the softmax instead of overflowing it into inf - inf."""
    return torch.promote_types(dtype, torch.float32)


def _masked_scores(
    scores: torch.Tensor, mask: torch.Tensor | None, is_causal: bool
) -> torch.Tensor:
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.to(scores.dtype)
    if is_causal:
        scores = scores.masked_fill(~causal_keep(*scores.shape[-2:], scores.device), float("-inf"))
    return scores


def _safe_softmax(scores: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax whose fully masked slices (every score -inf) are 0, with zero gradients.

    The -inf rows are replaced before the softmax, not after, so that no NaN ever enters the
    graph (NaN * 0 in the backward would still be NaN).
    """
    # == -inf rather than isneginf: the same test, which both ONNX exporters translate.
    fully_masked = (scores == float("-inf")).all(dim=dim, keepdim=True)
    probs = torch.softmax(scores.masked_fill(fully_masked, 0.0), dim=dim)
    return probs.masked_fill(fully_masked, 0.0)


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    *,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``softmax(q @ k^T * scale + mask) @ v`` with the semantics of torch's SDPA.

    query [..., Lq, D], key [..., Lk, D], value [..., Lk, Dv]. A boolean ``attn_mask`` is True
    where attention is allowed, a floating one is added to the scores; it broadcasts to
    [..., Lq, Lk]. ``is_causal`` masks keys after the query's position (top-left aligned).
    A query whose every key is masked gets a zero output. For 16-bit inputs the scores are
    formed (from the exact products of the 16-bit values), scaled, masked and normalised in
    float32, and the probabilities rounded to the value's dtype (after dropout) for their product
    with it.
    """
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    dtype = _softmax_dtype(query.dtype)
    scores = torch.matmul(query.to(dtype), key.to(dtype).transpose(-2, -1)) * scale
    probs = _safe_softmax(_masked_scores(scores, attn_mask, is_causal), dim=-1)
    probs = apply_dropout(probs, dropout_p, dropout_mask)
    return torch.matmul(probs.to(value.dtype), value)


def softmax(
    input: torch.Tensor,
    dim: int = -1,
    mask: torch.Tensor | None = None,
    scale: float = 1.0,
    is_causal: bool = False,
) -> torch.Tensor:
    """``softmax(input * scale + mask, dim)``; a boolean ``mask`` is True where kept.

    ``is_causal`` masks the upper triangle of the last two dims (it needs ``dim`` to be the last).
    Slices whose every element is masked give 0. For 16-bit inputs the softmax is computed in
    float32 and rounded once to the input's dtype.
    """
    scores = _masked_scores(input.to(_softmax_dtype(input.dtype)) * scale, mask, is_causal)
    return _safe_softmax(scores, dim=dim).to(input.dtype)
