"""LayerNorm and Add & Norm (``residual + dropout(input + input_bias)`` then LayerNorm) in Triton.

One kernel pair serves both ops: plain LayerNorm is Add & Norm with the residual, input bias and
dropout compiled away (constexpr flags), so the two cannot drift apart.

Forward: one program per row (launched in chunks of rows past the grid limit: ``_grid``). The
pre-norm sum is formed in the same pass that loads the row (rounded to the storage dtype, so the
forward normalises exactly what the backward will read) and stored when there is a residual. When
the row fits one block (``SINGLE_BLOCK``) it stays in registers; wider rows are streamed in
``BLOCK_N`` chunks three times (sum, centred sum of squares, normalise), re-reading the pre-norm
from L2. Statistics are two-pass in float32 (mean first, then the squared deviations), accurate when
|mean| >> std, and corrected by the sum of the deviations (``_refined_stats``): a constant row
normalises to exactly the bias, as in torch.

Backward: ``d_pre = rstd * (g - mean(g) - xhat * mean(g * xhat)) (+ grad_prenorm)`` with
``g = dy * w`` rounded on its own (``rounded_product``: contracted into ``g - mean(g)`` as one FMA,
the product left its rounding error where torch's difference cancels exactly, e.g. a width-1 row,
whose input gradient is exactly 0, got about rstd * ulp(g) in float32 on an H200); the input's
gradient is ``d_pre``
through the same dropout keep-mask, regenerated from the seed (Philox, element
``row * hidden + col``). Each program owns a contiguous run of
rows and accumulates ``dw = sum(dy * xhat)``, ``db = sum(dy)`` and the input bias's gradient in
float32; the ``[programs, hidden]`` partial sums are reduced afterwards. No atomics, so the
gradients are deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._env import MAX_EXTENT
from ._dropout import as_float32, dropout, keep_divisor, load_seed, seed_pointer
from ._grid import cdiv, next_power_of_2, row_chunks
from ._options import LAUNCH_OPTIONS
from ._rounding import rounded_product

# Widest block kept in registers: 64 KiB of the row per program (the Triton tutorial's bound);
# past it the kernels stream the row in chunks instead of spilling.
MAX_FUSED_BYTES = 65536
# The backward holds x, dy, w and up to three accumulators per element: a narrower cap avoids spills.
MAX_BWD_BLOCK = 4096


def _check_hidden(hidden: int) -> None:
    if hidden > MAX_EXTENT:
        # The column offsets are 32-bit in the kernels (the backend choice rejects such rows; a graph
        # traced for a dynamic hidden size meets them here).
        raise ValueError(f"the Triton LayerNorm kernels take rows up to {MAX_EXTENT} long, got hidden {hidden}")


def _block_n(hidden: int, element_size: int, cap: int | None = None) -> int:
    block = min(next_power_of_2(max(hidden, 1)), MAX_FUSED_BYTES // element_size)
    return min(block, cap) if cap else block


def _num_warps(block_n: int) -> int:
    # One warp per 256 elements of a row, between 1 and 8 warps: enough loads in flight to
    # cover memory latency without starving occupancy on short rows.
    return min(max(block_n // 256, 1), 8)


@triton.jit
def _per_element(total, hidden):
    """``total / hidden`` correctly rounded (div_rn: a plain / compiles to div.full.f32, within 2 ulp):
    every mean of these kernels. Once per row, so the exact form costs nothing."""
    return tl.math.div_rn(total, tl.cast(hidden, tl.float32))


@triton.jit
def _refined_stats(mean, sum_dev, sum_sq, hidden, eps):
    """(mean, rstd) of a row from its float32 mean and the sums of its deviations d = x - mean and
    of their squares: the corrected two-pass algorithm, var = (sum d^2 - (sum d)^2 / n) / n, which
    takes the rounding of the mean out of the variance, and the mean itself refined to
    mean + sum d / n. Where the variance is tiny this matters: in a constant row every d is the
    mean's rounding error, so var is 0 and rstd 1 / sqrt(eps), which would scale that error up
    (to about 1 at eps = 1e-12); with the refined mean, x - mean is 0. The variance is clamped at
    0 against rounding, NaN kept (a row holding NaN or inf normalises to NaN)."""
    var = _per_element(sum_sq - sum_dev * _per_element(sum_dev, hidden), hidden)
    # An overflowed sum of squares (|x| past ~1e19) is an infinite variance, as before the
    # correction, not inf - inf: the row normalises to the bias, as on the cpu backend.
    var = tl.where(var < 0.0, 0.0, tl.where(sum_sq == float("inf"), float("inf"), var))
    # sqrt_rn and div_rn: a plain tl.sqrt compiles to sqrt.approx.ftz.f32, which flushes a subnormal
    # variance (a row whose deviations are below 1e-19) to 0, so at eps = 0 rstd would be inf; and / to
    # div.full.f32. Once per row, so the exact forms cost nothing.
    return mean + _per_element(sum_dev, hidden), tl.math.div_rn(1.0, tl.sqrt_rn(var + eps))


@triton.jit
def _prenorm_chunk(
    x_ptr, res_ptr, xb_ptr, base, offs, in_row, seed, dropout_p, keep_prob,
    HAS_RESIDUAL: tl.constexpr, HAS_INPUT_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
):
    """``residual + dropout(x + input_bias)`` for one chunk of a row, rounded to the storage dtype."""
    h = tl.load(x_ptr + base + offs, mask=in_row, other=0.0).to(tl.float32)
    if HAS_INPUT_BIAS:
        h += tl.load(xb_ptr + offs, mask=in_row, other=0.0).to(tl.float32)
    if DROPOUT:
        h = dropout(h, seed, base + offs, dropout_p, keep_prob)
    if HAS_RESIDUAL:
        h += tl.load(res_ptr + base + offs, mask=in_row, other=0.0).to(tl.float32)
        h = h.to(x_ptr.dtype.element_ty).to(tl.float32)
    return h


@triton.jit(do_not_specialize=["seed_ptr"])  # nor must the address of each call's seed
def _norm_fwd_kernel(
    x_ptr, res_ptr, xb_ptr, w_ptr, b_ptr, y_ptr, pre_ptr, mean_ptr, rstd_ptr,
    first_row, hidden, eps, seed_ptr, dropout_p, keep_prob,
    HAS_RESIDUAL: tl.constexpr, HAS_INPUT_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
):
    seed = load_seed(seed_ptr, DROPOUT)
    row = tl.program_id(0).to(tl.int64) + first_row
    base = row * hidden
    cols = tl.arange(0, BLOCK_N)
    if SINGLE_BLOCK:
        in_row = cols < hidden
        h = _prenorm_chunk(x_ptr, res_ptr, xb_ptr, base, cols, in_row, seed, dropout_p, keep_prob,
                           HAS_RESIDUAL, HAS_INPUT_BIAS, DROPOUT)
        if HAS_RESIDUAL:
            if pre_ptr is not None:  # None in inference: the row stays in registers
                tl.store(pre_ptr + base + cols, h.to(pre_ptr.dtype.element_ty), mask=in_row)
        mean = _per_element(tl.sum(h, axis=0), hidden)
        centred = tl.where(in_row, h - mean, 0.0)
        mean, rstd = _refined_stats(mean, tl.sum(centred, axis=0), tl.sum(centred * centred, axis=0), hidden, eps)
        y = tl.where(in_row, h - mean, 0.0) * rstd
        if HAS_WEIGHT:
            y = y * tl.load(w_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y = y + tl.load(b_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        tl.store(y_ptr + base + cols, y.to(y_ptr.dtype.element_ty), mask=in_row)
    else:
        total = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, hidden, BLOCK_N):
            offs = start + cols
            in_row = offs < hidden
            h = _prenorm_chunk(x_ptr, res_ptr, xb_ptr, base, offs, in_row, seed, dropout_p, keep_prob,
                               HAS_RESIDUAL, HAS_INPUT_BIAS, DROPOUT)
            if HAS_RESIDUAL:
                tl.store(pre_ptr + base + offs, h.to(pre_ptr.dtype.element_ty), mask=in_row)
            total += h
        mean = _per_element(tl.sum(total, axis=0), hidden)
        # The later passes read the pre-norm sum back (the input itself when there is no residual).
        # Their loads need not map an element to the thread that stored it: a block-wide barrier
        # orders the stores before them. In inference pre_ptr is y_ptr: the last pass loads each
        # chunk before it stores the same chunk, element by element in the same layout.
        src = pre_ptr if HAS_RESIDUAL else x_ptr
        if HAS_RESIDUAL:
            tl.debug_barrier()
        dev = tl.zeros([BLOCK_N], dtype=tl.float32)
        sq = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, hidden, BLOCK_N):
            offs = start + cols
            h = tl.load(src + base + offs, mask=offs < hidden, other=0.0).to(tl.float32)
            centred = tl.where(offs < hidden, h - mean, 0.0)
            dev += centred
            sq += centred * centred
        mean, rstd = _refined_stats(mean, tl.sum(dev, axis=0), tl.sum(sq, axis=0), hidden, eps)
        for start in range(0, hidden, BLOCK_N):
            offs = start + cols
            in_row = offs < hidden
            h = tl.load(src + base + offs, mask=in_row, other=0.0).to(tl.float32)
            y = (h - mean) * rstd
            if HAS_WEIGHT:
                y = y * tl.load(w_ptr + offs, mask=in_row, other=0.0).to(tl.float32)
            if HAS_BIAS:
                y = y + tl.load(b_ptr + offs, mask=in_row, other=0.0).to(tl.float32)
            tl.store(y_ptr + base + offs, y.to(y_ptr.dtype.element_ty), mask=in_row)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _accumulate(partial_ptr, offs, in_row, value, SINGLE_BLOCK: tl.constexpr, acc):
    """Adds ``value`` to a partial sum: in registers for one block, else in this program's buffer row."""
    if SINGLE_BLOCK:
        return acc + value
    tl.store(partial_ptr + offs, tl.load(partial_ptr + offs, mask=in_row, other=0.0) + value, mask=in_row)
    return acc


@triton.jit(do_not_specialize=["seed_ptr"])  # nor must the address of each call's seed
def _norm_bwd_kernel(
    dy_ptr, dpre_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dinput_ptr,
    dw_partial_ptr, db_partial_ptr, dib_partial_ptr,
    rows, hidden, rows_per_program, seed_ptr, dropout_p, keep_prob,
    HAS_WEIGHT: tl.constexpr, HAS_DPRENORM: tl.constexpr, DROPOUT: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DINPUT: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    NEED_DIB: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
):
    """``x`` is what was normalised (the pre-norm sum for Add & Norm); ``dx`` its gradient and
    ``dinput`` the gradient through the dropout in front of it."""
    seed = load_seed(seed_ptr, DROPOUT)
    pid = tl.program_id(0).to(tl.int64)
    row_start = pid * rows_per_program
    num_rows = tl.minimum(row_start + rows_per_program, rows) - row_start
    cols = tl.arange(0, BLOCK_N)
    partial_offset = pid * hidden
    NEED_DPRE: tl.constexpr = NEED_DX or NEED_DINPUT or NEED_DIB
    # Single block: accumulators in registers, stored once. Otherwise each program's row of the
    # zero-initialised partial buffers is read-modify-written, without races.
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    dib_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for i in range(0, num_rows):
        row = row_start + i
        base = row * hidden
        mean = tl.load(mean_ptr + row)
        rstd = tl.load(rstd_ptr + row)
        mean_g = 0.0
        mean_gx = 0.0
        if NEED_DPRE:
            sum_g = tl.zeros([BLOCK_N], dtype=tl.float32)
            sum_gx = tl.zeros([BLOCK_N], dtype=tl.float32)
            for start in range(0, hidden, BLOCK_N):
                offs = start + cols
                in_row = offs < hidden
                x = tl.load(x_ptr + base + offs, mask=in_row, other=0.0).to(tl.float32)
                g = tl.load(dy_ptr + base + offs, mask=in_row, other=0.0).to(tl.float32)
                if HAS_WEIGHT:
                    g = rounded_product(g, tl.load(w_ptr + offs, mask=in_row, other=0.0).to(tl.float32))
                sum_g += g
                sum_gx += g * tl.where(in_row, (x - mean) * rstd, 0.0)
            mean_g = _per_element(tl.sum(sum_g, axis=0), hidden)
            mean_gx = _per_element(tl.sum(sum_gx, axis=0), hidden)
        for start in range(0, hidden, BLOCK_N):
            offs = start + cols
            in_row = offs < hidden
            x = tl.load(x_ptr + base + offs, mask=in_row, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + base + offs, mask=in_row, other=0.0).to(tl.float32)
            xhat = tl.where(in_row, (x - mean) * rstd, 0.0)
            if NEED_DPRE:
                g = dy
                if HAS_WEIGHT:
                    g = rounded_product(dy, tl.load(w_ptr + offs, mask=in_row, other=0.0).to(tl.float32))
                dpre = (g - mean_g - xhat * mean_gx) * rstd
                if HAS_DPRENORM:
                    dpre += tl.load(dpre_ptr + base + offs, mask=in_row, other=0.0).to(tl.float32)
                if NEED_DX:
                    tl.store(dx_ptr + base + offs, dpre.to(dx_ptr.dtype.element_ty), mask=in_row)
                dinput = dpre
                if DROPOUT:
                    dinput = dropout(dpre, seed, base + offs, dropout_p, keep_prob)
                if NEED_DINPUT:
                    tl.store(dinput_ptr + base + offs, dinput.to(dinput_ptr.dtype.element_ty), mask=in_row)
                if NEED_DIB:
                    dib_acc = _accumulate(dib_partial_ptr + partial_offset, offs, in_row, dinput, SINGLE_BLOCK, dib_acc)
            if NEED_DW:
                dw_acc = _accumulate(dw_partial_ptr + partial_offset, offs, in_row, dy * xhat, SINGLE_BLOCK, dw_acc)
            if NEED_DB:
                db_acc = _accumulate(db_partial_ptr + partial_offset, offs, in_row, dy, SINGLE_BLOCK, db_acc)
    if SINGLE_BLOCK:
        in_row = cols < hidden
        if NEED_DW:
            tl.store(dw_partial_ptr + partial_offset + cols, dw_acc, mask=in_row)
        if NEED_DB:
            tl.store(db_partial_ptr + partial_offset + cols, db_acc, mask=in_row)
        if NEED_DIB:
            tl.store(dib_partial_ptr + partial_offset + cols, dib_acc, mask=in_row)


# ---------------------------------------------------------------------------------------------
# Launchers


def norm_fwd(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    input_bias: torch.Tensor | None,
    eps: float,
    dropout_p: float,
    seed: torch.Tensor | int | None,
    keep_prenorm: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """x, residual: contiguous [rows, hidden]. Returns (y, prenorm or None, mean, rstd); prenorm is
    None without a residual, and without ``keep_prenorm`` (inference: the sum is kept in registers
    or, for rows wider than a block, formed in y's row and normalised there in place)."""
    rows, hidden = x.shape
    _check_hidden(hidden)
    y = torch.empty_like(x)
    prenorm = torch.empty_like(x) if residual is not None and keep_prenorm else None
    mean = torch.empty(rows, device=x.device, dtype=torch.float32)
    rstd = torch.empty(rows, device=x.device, dtype=torch.float32)
    if rows == 0 or hidden == 0:
        # Nothing to normalise: statistics of an empty row are defined as zero.
        return y, prenorm, mean.zero_(), rstd.zero_()
    block_n = _block_n(hidden, x.element_size())
    single_block = block_n >= hidden
    # Where the kernel stores the sum: the kept tensor, else nowhere (one block) or y as scratch.
    pre_out = prenorm if prenorm is not None or residual is None or single_block else y
    seed_ptr = seed_pointer(seed, dropout_p, x)
    for first, count in row_chunks(rows):
        _norm_fwd_kernel[(count,)](
            x, residual, input_bias, weight, bias, y, pre_out, mean, rstd,
            first, hidden, eps, seed_ptr, as_float32(dropout_p), keep_divisor(dropout_p),
            HAS_RESIDUAL=residual is not None, HAS_INPUT_BIAS=input_bias is not None, DROPOUT=dropout_p > 0.0,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            BLOCK_N=block_n, SINGLE_BLOCK=single_block, num_warps=_num_warps(block_n),
            **LAUNCH_OPTIONS,
        )
    return y, prenorm, mean, rstd


def _num_bwd_programs(rows: int, device: torch.device) -> int:
    # Enough programs to fill the GPU a few times over; each reduces its rows' partial sums
    # locally, so fewer programs also means a smaller partial buffer to sum afterwards.
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(rows, 4 * sms))
    return max(1, min(rows, 8))


def norm_bwd(
    dy: torch.Tensor,
    dprenorm: torch.Tensor | None,
    x: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor | None,
    dropout_p: float,
    seed: torch.Tensor | int | None,
    need: dict[str, bool],
) -> dict[str, torch.Tensor]:
    """Gradients selected by ``need`` (keys dx, dinput, dweight, dbias, dinput_bias) of norm_fwd,
    where ``x`` is what was normalised. Unselected ones are empty [0] tensors (distinct objects:
    outputs of a custom op must not alias)."""
    rows, hidden = x.shape
    _check_hidden(hidden)
    if need["dweight"] and weight is None:
        raise ValueError("the weight gradient was requested but weight is None")
    programs = _num_bwd_programs(rows, x.device)
    block_n = _block_n(hidden, x.element_size(), cap=MAX_BWD_BLOCK)
    single = block_n >= hidden
    alloc = torch.empty if single else torch.zeros
    partial = {
        k: alloc(programs, hidden, device=x.device, dtype=torch.float32) if need[k] else None
        for k in ("dweight", "dbias", "dinput_bias")
    }
    out = {k: torch.empty_like(x) if need[k] else x.new_empty(0) for k in ("dx", "dinput")}
    rows_per_program = cdiv(max(rows, 1), programs)
    launched = cdiv(rows, rows_per_program)
    if launched > 0 and hidden > 0 and any(need.values()):
        _norm_bwd_kernel[(launched,)](
            dy, dprenorm, x, weight, mean, rstd, out["dx"], out["dinput"],
            partial["dweight"], partial["dbias"], partial["dinput_bias"],
            rows, hidden, rows_per_program, seed_pointer(seed, dropout_p, x), as_float32(dropout_p),
            keep_divisor(dropout_p),
            HAS_WEIGHT=weight is not None, HAS_DPRENORM=dprenorm is not None, DROPOUT=dropout_p > 0.0,
            NEED_DX=need["dx"], NEED_DINPUT=need["dinput"], NEED_DW=need["dweight"], NEED_DB=need["dbias"],
            NEED_DIB=need["dinput_bias"], BLOCK_N=block_n, SINGLE_BLOCK=single, num_warps=_num_warps(block_n),
            **LAUNCH_OPTIONS,
        )
    # weight and bias in one dtype (the input's, or float32 for a 16-bit input: ops._validate.affine_dtype).
    param_dtype = x.dtype if weight is None else weight.dtype
    dtypes = {"dweight": param_dtype, "dbias": param_dtype, "dinput_bias": x.dtype}
    for k, buf in partial.items():
        out[k] = buf[:launched].sum(0).to(dtypes[k]) if buf is not None else x.new_empty(0)
    return out


def layer_norm_fwd(x, weight, bias, eps):
    y, _, mean, rstd = norm_fwd(x, None, weight, bias, None, eps, 0.0, 0)
    return y, mean, rstd


def layer_norm_bwd(dy, x, mean, rstd, weight, output_mask):
    need = dict(zip(("dx", "dweight", "dbias"), output_mask), dinput=False, dinput_bias=False)
    g = norm_bwd(dy, None, x, mean, rstd, weight, 0.0, 0, need)
    return g["dx"], g["dweight"], g["dbias"]


def add_layer_norm_fwd(x, residual, weight, bias, input_bias, eps, dropout_p, seed):
    return norm_fwd(x, residual, weight, bias, input_bias, eps, dropout_p, seed)


def add_layer_norm_inference(x, residual, weight, bias, input_bias, eps, dropout_p, seed):
    """add_layer_norm_fwd's output alone (the same bits), without a pre-norm tensor."""
    return norm_fwd(x, residual, weight, bias, input_bias, eps, dropout_p, seed, keep_prenorm=False)[0]


def add_layer_norm_bwd(dy, dprenorm, prenorm, mean, rstd, weight, dropout_p, seed, output_mask):
    """output_mask selects (input, residual, weight, bias, input_bias); the residual's gradient is
    the pre-norm's, the input's is that through the dropout."""
    need = dict(zip(("dinput", "dx", "dweight", "dbias", "dinput_bias"), output_mask))
    g = norm_bwd(dy, dprenorm, prenorm, mean, rstd, weight, dropout_p, seed, need)
    return g["dinput"], g["dx"], g["dweight"], g["dbias"], g["dinput_bias"]
