"""The memory layout of the attention output: the Python twin of csrc/include/fused_attn/layout.h,
for the Triton launcher and the fake (meta) kernels, which must agree with the C++ kernels exactly."""

from __future__ import annotations

import torch


def empty_in_query_layout(query: torch.Tensor, dv: int) -> torch.Tensor:
    """An uninitialised [B, H, Lq, dv] tensor laid out in memory as ``query`` [B, H, Lq, D] is.

    Its first three dims nest in the order of query's strides (largest outermost, ties in dim
    order), the last dim innermost, as torch's SDPA lays out its output for the layouts
    projections give (torch nests expanded, stride-0 dims elsewhere): a query viewed from
    [B, Lq, H, D] gives an output whose transpose back to [B, Lq, H, dv] is contiguous, so merging
    the heads again copies nothing.
    """
    order = _nesting(query)
    strides = [0, 0, 0, 1]
    step = dv
    for d in reversed(order):
        strides[d] = step
        step = step * query.shape[d]
    # Allocated with its strides, not as a permuted view: a custom op's output must not be a view.
    return query.new_empty_strided((*query.shape[:3], dv), strides)


def as_query_layout(out: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """``out`` [B, H, Lq, dv] (the reference's result) laid out as :func:`empty_in_query_layout`
    lays out the kernels' output: a view of it when it already is, else a copy."""
    perm = (*_nesting(query), 3)
    inverse = tuple(perm.index(d) for d in range(4))
    return out.permute(perm).contiguous().permute(inverse)


def _nesting(query: torch.Tensor) -> list[int]:
    """query's first three dims, outermost first: by decreasing stride, ties in dim order (stable)."""
    return sorted(range(3), key=lambda d: -query.stride(d))
