"""LayerNorm forward and backward in Triton.

Forward: one program per row. When the row fits one block (``SINGLE_BLOCK``) it is loaded once
and kept in registers; wider rows are streamed in ``BLOCK_N`` chunks three times (mean, centred
sum of squares, normalise), the re-reads hitting L2. Statistics are two-pass in float32
(mean first, then the sum of squared deviations), which stays accurate when |mean| >> std.

Backward: ``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))`` with ``g = dy * w``. Each
program owns a contiguous run of rows and accumulates ``dw = sum(dy * xhat)`` and ``db = sum(dy)``
for them in float32; the ``[programs, hidden]`` partial sums are reduced afterwards. No atomics,
so the gradients are deterministic for a given grid.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Widest block kept in registers: 64 KiB of the row per program (the Triton tutorial's bound);
# past it the kernels stream the row in chunks instead of spilling.
MAX_FUSED_BYTES = 65536
# The backward holds x, dy, w and two accumulators per element: a narrower cap avoids spills.
MAX_BWD_BLOCK = 4096


def _block_n(hidden: int, element_size: int, cap: int | None = None) -> int:
    block = min(triton.next_power_of_2(max(hidden, 1)), MAX_FUSED_BYTES // element_size)
    return min(block, cap) if cap else block


def _num_warps(block_n: int) -> int:
    # One warp per 256 elements of a row, between 1 and 8 warps: enough loads in flight to
    # cover memory latency without starving occupancy on short rows.
    return min(max(block_n // 256, 1), 8)


@triton.jit
def _layer_norm_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr,
    hidden, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * hidden
    y_row = y_ptr + row * hidden
    cols = tl.arange(0, BLOCK_N)
    if SINGLE_BLOCK:
        in_row = cols < hidden
        x = tl.load(x_row + cols, mask=in_row, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) / hidden
        centred = tl.where(in_row, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / hidden + eps)
        y = centred * rstd
        if HAS_WEIGHT:
            y = y * tl.load(w_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y = y + tl.load(b_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        tl.store(y_row + cols, y.to(y_ptr.dtype.element_ty), mask=in_row)
    else:
        total = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, hidden, BLOCK_N):
            offs = start + cols
            total += tl.load(x_row + offs, mask=offs < hidden, other=0.0).to(tl.float32)
        mean = tl.sum(total, axis=0) / hidden
        sq = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, hidden, BLOCK_N):
            offs = start + cols
            x = tl.load(x_row + offs, mask=offs < hidden, other=0.0).to(tl.float32)
            centred = tl.where(offs < hidden, x - mean, 0.0)
            sq += centred * centred
        rstd = 1.0 / tl.sqrt(tl.sum(sq, axis=0) / hidden + eps)
        for start in range(0, hidden, BLOCK_N):
            offs = start + cols
            in_row = offs < hidden
            x = tl.load(x_row + offs, mask=in_row, other=0.0).to(tl.float32)
            y = (x - mean) * rstd
            if HAS_WEIGHT:
                y = y * tl.load(w_ptr + offs, mask=in_row, other=0.0).to(tl.float32)
            if HAS_BIAS:
                y = y + tl.load(b_ptr + offs, mask=in_row, other=0.0).to(tl.float32)
            tl.store(y_row + offs, y.to(y_ptr.dtype.element_ty), mask=in_row)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _layer_norm_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, db_partial_ptr,
    rows, hidden, rows_per_program,
    HAS_WEIGHT: tl.constexpr, NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    BLOCK_N: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row_start = pid * rows_per_program
    num_rows = tl.minimum(row_start + rows_per_program, rows) - row_start
    cols = tl.arange(0, BLOCK_N)
    partial_offset = pid * hidden
    if SINGLE_BLOCK:
        in_row = cols < hidden
        if HAS_WEIGHT:
            w = tl.load(w_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for i in range(0, num_rows):
            row = row_start + i
            base = row * hidden
            x = tl.load(x_ptr + base + cols, mask=in_row, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + base + cols, mask=in_row, other=0.0).to(tl.float32)
            mean = tl.load(mean_ptr + row)
            rstd = tl.load(rstd_ptr + row)
            xhat = tl.where(in_row, (x - mean) * rstd, 0.0)
            if NEED_DX:
                g = dy * w if HAS_WEIGHT else dy
                mean_g = tl.sum(g, axis=0) / hidden
                mean_gx = tl.sum(g * xhat, axis=0) / hidden
                dx = (g - mean_g - xhat * mean_gx) * rstd
                tl.store(dx_ptr + base + cols, dx.to(dx_ptr.dtype.element_ty), mask=in_row)
            if NEED_DW:
                dw_acc += dy * xhat
            if NEED_DB:
                db_acc += dy
        if NEED_DW:
            tl.store(dw_partial_ptr + partial_offset + cols, dw_acc, mask=in_row)
        if NEED_DB:
            tl.store(db_partial_ptr + partial_offset + cols, db_acc, mask=in_row)
    else:
        # Rows wider than a block: the partial sums live in this program's own row of the
        # partial buffers (zero-initialised by the launcher), read-modify-written without races.
        for i in range(0, num_rows):
            row = row_start + i
            base = row * hidden
            mean = tl.load(mean_ptr + row)
            rstd = tl.load(rstd_ptr + row)
            if NEED_DX:
                sum_g = tl.zeros([BLOCK_N], dtype=tl.float32)
                sum_gx = tl.zeros([BLOCK_N], dtype=tl.float32)
                for start in range(0, hidden, BLOCK_N):
                    offs = start + cols
                    in_row = offs < hidden
                    x = tl.load(x_ptr + base + offs, mask=in_row, other=0.0).to(tl.float32)
                    dy = tl.load(dy_ptr + base + offs, mask=in_row, other=0.0).to(tl.float32)
                    if HAS_WEIGHT:
                        dy = dy * tl.load(w_ptr + offs, mask=in_row, other=0.0).to(tl.float32)
                    xhat = tl.where(in_row, (x - mean) * rstd, 0.0)
                    sum_g += dy
                    sum_gx += dy * xhat
                mean_g = tl.sum(sum_g, axis=0) / hidden
                mean_gx = tl.sum(sum_gx, axis=0) / hidden
            for start in range(0, hidden, BLOCK_N):
                offs = start + cols
                in_row = offs < hidden
                x = tl.load(x_ptr + base + offs, mask=in_row, other=0.0).to(tl.float32)
                dy = tl.load(dy_ptr + base + offs, mask=in_row, other=0.0).to(tl.float32)
                xhat = tl.where(in_row, (x - mean) * rstd, 0.0)
                if NEED_DX:
                    g = dy
                    if HAS_WEIGHT:
                        g = dy * tl.load(w_ptr + offs, mask=in_row, other=0.0).to(tl.float32)
                    dx = (g - mean_g - xhat * mean_gx) * rstd
                    tl.store(dx_ptr + base + offs, dx.to(dx_ptr.dtype.element_ty), mask=in_row)
                if NEED_DW:
                    dw_p = dw_partial_ptr + partial_offset + offs
                    tl.store(dw_p, tl.load(dw_p, mask=in_row, other=0.0) + dy * xhat, mask=in_row)
                if NEED_DB:
                    db_p = db_partial_ptr + partial_offset + offs
                    tl.store(db_p, tl.load(db_p, mask=in_row, other=0.0) + dy, mask=in_row)


def layer_norm_fwd(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: contiguous [rows, hidden]. Returns (y, mean, rstd); mean and rstd are float32 [rows]."""
    rows, hidden = x.shape
    y = torch.empty_like(x)
    mean = torch.empty(rows, device=x.device, dtype=torch.float32)
    rstd = torch.empty(rows, device=x.device, dtype=torch.float32)
    if rows == 0 or hidden == 0:
        # Nothing to normalise: statistics of an empty row are defined as zero.
        return y, mean.zero_(), rstd.zero_()
    block_n = _block_n(hidden, x.element_size())
    _layer_norm_fwd_kernel[(rows,)](
        x, weight, bias, y, mean, rstd, hidden, eps,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        BLOCK_N=block_n, SINGLE_BLOCK=block_n >= hidden, num_warps=_num_warps(block_n),
    )
    return y, mean, rstd


def _num_bwd_programs(rows: int, device: torch.device) -> int:
    # Enough programs to fill the GPU a few times over; each reduces its rows' dw/db locally,
    # so fewer programs also means a smaller partial buffer to sum afterwards.
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(rows, 4 * sms))
    return max(1, min(rows, 8))


def layer_norm_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor | None,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of layer_norm_fwd; an unselected one is returned as an empty [0] tensor."""
    rows, hidden = x.shape
    need_dx, need_dw, need_db = output_mask
    if need_dw and weight is None:
        raise ValueError("layer_norm_bwd: grad_weight was requested but weight is None")
    dx = torch.empty_like(x) if need_dx else x.new_empty(0)
    programs = _num_bwd_programs(rows, x.device)
    block_n = _block_n(hidden, x.element_size(), cap=MAX_BWD_BLOCK)
    single = block_n >= hidden
    alloc = torch.empty if single else torch.zeros
    dw_partial = alloc(programs, hidden, device=x.device, dtype=torch.float32) if need_dw else None
    db_partial = alloc(programs, hidden, device=x.device, dtype=torch.float32) if need_db else None
    rows_per_program = triton.cdiv(max(rows, 1), programs)
    launched = triton.cdiv(rows, rows_per_program)
    if launched > 0 and hidden > 0 and (need_dx or need_dw or need_db):
        _layer_norm_bwd_kernel[(launched,)](
            dy, x, weight, mean, rstd, dx, dw_partial, db_partial,
            rows, hidden, rows_per_program,
            HAS_WEIGHT=weight is not None, NEED_DX=need_dx, NEED_DW=need_dw, NEED_DB=need_db,
            BLOCK_N=block_n, SINGLE_BLOCK=single, num_warps=_num_warps(block_n),
        )
    # Separate empty tensors: outputs of a custom op must not alias each other.
    dw = dw_partial[:launched].sum(0).to(weight.dtype) if need_dw else x.new_empty(0)
    db = db_partial[:launched].sum(0).to(x.dtype) if need_db else x.new_empty(0)
    return dx, dw, db
