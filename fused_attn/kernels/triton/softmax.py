"""Scaled, masked softmax over the last dim in Triton, forward and backward.

Input viewed as [A, B, M, N] (leading dims folded into A and B) with any strides; the mask is read
through its own [A, B, M, N] strides (zero = broadcast), boolean (True = keep) or floating (added
after scaling). ``is_causal`` masks column j > row i of the last two dims (top-left). One program
per row (launched in chunks of rows past the grid limit: ``_grid``): a row that fits one block is
read once and kept in registers; longer rows are streamed twice (online max and sum, then
normalise). Rows whose every element is masked give 0. Divisions are correctly rounded (``div_rn``:
a plain ``/`` compiles to the approximate ``div.full.f32``, 2 ulp, which would spend most of
float32's parity margin against torch's softmax). The backward is
``dx = scale * y * (dy - sum(dy * y))``, one program per row, and can also write the gradient of
the (pre-scale) scores for a floating mask that requires grad.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._env import MAX_EXTENT
from ._grid import next_power_of_2, row_chunks
from ._options import LAUNCH_OPTIONS
from ._units import LOG2E

# Widest row kept in registers; longer rows take the streaming path.
MAX_SINGLE_BLOCK = 16384
STREAM_BLOCK = 4096


def _num_warps(block_n: int) -> int:
    return min(max(block_n // 256, 1), 16)


@triton.jit
def _masked_row(
    x_ptr, mask_ptr, offs, row_m, n_cols, scale,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, IS_CAUSAL: tl.constexpr, stride_xn, stride_mn,
):
    """Scores ``x * scale + mask`` of a chunk of one row in natural units (as the cpu kernel and the
    reference form them: converting to log2 units before the row max is subtracted would round
    every score at its own magnitude, e.g. 1e-3 absolute at |score| ~ 1e4), -inf where masked or
    outside the row. The callers take exp2((s - max) * log2(e)) of the shifted scores."""
    valid = offs < n_cols
    s = tl.load(x_ptr + offs.to(tl.int64) * stride_xn, mask=valid, other=0.0).to(tl.float32) * scale
    if HAS_MASK:
        m_ptrs = mask_ptr + offs.to(tl.int64) * stride_mn
        if MASK_IS_BOOL:
            valid = valid & (tl.load(m_ptrs, mask=valid, other=0) != 0)
        else:
            s += tl.load(m_ptrs, mask=valid, other=0.0).to(tl.float32)
    if IS_CAUSAL:
        valid = valid & (offs <= row_m)
    return tl.where(valid, s, float("-inf"))


@triton.jit
def _softmax_fwd_kernel(
    x_ptr, mask_ptr, y_ptr,
    first_row, dim_b, dim_m, n_cols, scale,
    stride_xa, stride_xb, stride_xm, stride_xn,
    stride_ma, stride_mb, stride_mm, stride_mn,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, IS_CAUSAL: tl.constexpr,
    BLOCK_N: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64) + first_row
    row_m = row % dim_m
    ab = row // dim_m
    a = ab // dim_b
    b = ab % dim_b
    x_row = x_ptr + a * stride_xa + b * stride_xb + row_m * stride_xm
    m_row = mask_ptr + a * stride_ma + b * stride_mb + row_m * stride_mm
    y_row = y_ptr + row * n_cols
    cols = tl.arange(0, BLOCK_N)
    if SINGLE_BLOCK:
        s = _masked_row(x_row, m_row, cols, row_m, n_cols, scale, HAS_MASK, MASK_IS_BOOL, IS_CAUSAL, stride_xn, stride_mn)
        row_max = tl.max(s, 0)
        shift = tl.where(row_max == float("-inf"), 0.0, row_max)
        p = tl.math.exp2((s - shift) * LOG2E)
        total = tl.sum(p, 0)
        y = tl.math.div_rn(p, tl.where(total == 0.0, 1.0, total))
        tl.store(y_row + cols, y.to(y_ptr.dtype.element_ty), mask=cols < n_cols)
    else:
        run_max = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
        run_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            s = _masked_row(x_row, m_row, start + cols, row_m, n_cols, scale, HAS_MASK, MASK_IS_BOOL, IS_CAUSAL,
                            stride_xn, stride_mn)
            new_max = tl.maximum(run_max, s)
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            run_sum = run_sum * tl.math.exp2((run_max - shift) * LOG2E) + tl.math.exp2((s - shift) * LOG2E)
            run_max = new_max
        row_max = tl.max(run_max, 0)
        shift = tl.where(row_max == float("-inf"), 0.0, row_max)
        total = tl.sum(run_sum * tl.math.exp2((run_max - shift) * LOG2E), 0)
        total = tl.where(total == 0.0, 1.0, total)
        for start in range(0, n_cols, BLOCK_N):
            offs = start + cols
            s = _masked_row(x_row, m_row, offs, row_m, n_cols, scale, HAS_MASK, MASK_IS_BOOL, IS_CAUSAL,
                            stride_xn, stride_mn)
            y = tl.math.div_rn(tl.math.exp2((s - shift) * LOG2E), total)
            tl.store(y_row + offs, y.to(y_ptr.dtype.element_ty), mask=offs < n_cols)


@triton.jit
def _row_term(dot, total):
    """The backward's row term: sum(y * dy) over the probabilities' own sum (0 for a row without
    weight). Where a row puts nearly all its weight on one element, dy - sum(y * dy) would cancel
    the stored probabilities' rounding into it at dy's scale (their sum misses 1 by it); divided by
    their sum it does not (see softmax_row_term in csrc/cpu/attention.cpp)."""
    return tl.where(total > 0.0, tl.math.div_rn(dot, tl.where(total > 0.0, total, 1.0)), 0.0)


@triton.jit
def _softmax_bwd_kernel(
    dy_ptr, y_ptr, dx_ptr, dscores_ptr, first_row, n_cols, scale,
    WRITE_DSCORES: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
):
    row = (tl.program_id(0).to(tl.int64) + first_row) * n_cols
    cols = tl.arange(0, BLOCK_N)
    if SINGLE_BLOCK:
        inside = cols < n_cols
        y = tl.load(y_ptr + row + cols, mask=inside, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row + cols, mask=inside, other=0.0).to(tl.float32)
        g = y * (dy - _row_term(tl.sum(dy * y, 0), tl.sum(y, 0)))
        tl.store(dx_ptr + row + cols, (g * scale).to(dx_ptr.dtype.element_ty), mask=inside)
        if WRITE_DSCORES:
            tl.store(dscores_ptr + row + cols, g.to(dscores_ptr.dtype.element_ty), mask=inside)
    else:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc_y = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            offs = start + cols
            inside = offs < n_cols
            y = tl.load(y_ptr + row + offs, mask=inside, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row + offs, mask=inside, other=0.0).to(tl.float32)
            acc += dy * y
            acc_y += y
        dot = _row_term(tl.sum(acc, 0), tl.sum(acc_y, 0))
        for start in range(0, n_cols, BLOCK_N):
            offs = start + cols
            inside = offs < n_cols
            y = tl.load(y_ptr + row + offs, mask=inside, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row + offs, mask=inside, other=0.0).to(tl.float32)
            g = y * (dy - dot)
            tl.store(dx_ptr + row + offs, (g * scale).to(dx_ptr.dtype.element_ty), mask=inside)
            if WRITE_DSCORES:
                tl.store(dscores_ptr + row + offs, g.to(dscores_ptr.dtype.element_ty), mask=inside)


def _block(n_cols: int) -> tuple[int, bool]:
    block = next_power_of_2(max(n_cols, 1))
    return (block, True) if block <= MAX_SINGLE_BLOCK else (STREAM_BLOCK, False)


def softmax_fwd(x: torch.Tensor, mask: torch.Tensor | None, scale: float, is_causal: bool) -> torch.Tensor:
    """x: [A, B, M, N] with any strides; mask: None or expanded to x's shape. Returns y contiguous."""
    dim_a, dim_b, dim_m, n_cols = x.shape
    if n_cols > MAX_EXTENT:
        # The row loop is 32-bit in the kernel (the backend choice rejects such rows; a graph traced for a
        # dynamic row length meets them here), refused before the output is allocated.
        raise ValueError(f"the Triton softmax kernel takes rows up to {MAX_EXTENT} long, got {n_cols}")
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    rows = dim_a * dim_b * dim_m
    if rows == 0 or n_cols == 0:
        return y
    if mask is not None and mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    block, single = _block(n_cols)
    for first, count in row_chunks(rows):
        _softmax_fwd_kernel[(count,)](
            x, mask if mask is not None else x, y, first, dim_b, dim_m, n_cols, scale,
            *x.stride(), *(mask.stride() if mask is not None else (0, 0, 0, 0)),
            HAS_MASK=mask is not None, MASK_IS_BOOL=mask is not None and mask.dtype == torch.uint8,
            IS_CAUSAL=is_causal, BLOCK_N=block, SINGLE_BLOCK=single, num_warps=_num_warps(block),
            **LAUNCH_OPTIONS,
        )
    return y


def softmax_bwd(
    dy: torch.Tensor, y: torch.Tensor, scale: float, scores_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dy, y: contiguous [..., N]. Returns (dx, d_scores or None); d_scores, the mask's gradient, is float32."""
    n_cols = y.shape[-1]
    rows = y.numel() // max(n_cols, 1)
    dx = torch.empty_like(y)
    # The scores' gradient (the mask's) is kept in float32, as the attention's.
    dscores = torch.empty(y.shape, device=y.device, dtype=torch.float32) if scores_grad else None
    if rows and n_cols:
        block, single = _block(n_cols)
        for first, count in row_chunks(rows):
            _softmax_bwd_kernel[(count,)](
                dy, y, dx, dscores if dscores is not None else dx, first, n_cols, scale,
                WRITE_DSCORES=scores_grad, BLOCK_N=block, SINGLE_BLOCK=single, num_warps=_num_warps(block),
                **LAUNCH_OPTIONS,
            )
    return dx, dscores
