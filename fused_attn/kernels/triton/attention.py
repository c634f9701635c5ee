"""Scaled dot-product attention in Triton: FlashAttention-2 forward and backward.

Layout: query [B, H, Lq, D], key [B, Hkv, Lk, D], value [B, Hkv, Lk, Dv], any strides with a
unit last-dim stride. Hkv is H, or a divisor of it (grouped-query attention): query head h reads
key/value head h // (H / Hkv) in place, nothing is repeated in memory, and a program of the dK/dV
kernel owns a key tile of a key/value head and walks the query heads of its group, summing their
contributions in its float32 accumulators (when that leaves too few programs to fill the GPU, the
group is split into chunks whose float32 sums are added after the kernel: ``_dkdv_splits``). The grid is one-dimensional, ``pid -> (tile,
batch*head)`` with the tile index varying fastest, so consecutive programs share one head's K/V
in L2; batch*heads times the tiles of the longer length must stay within the 2^31 - 1 programs a launch
takes (``_check_extents``: only an input far beyond a GPU's memory, or of 2^31 one-row heads, nears it).

Forward: a program owns ``BLOCK_M`` queries and streams ``BLOCK_N`` keys at a time, keeping the
running row max ``m`` and row sum ``l`` in float32 (online softmax, exp2). It writes the output
and the row statistics (the row max and log2 of the row sum, below) and nothing of size Lq x Lk.
Causal attention (top-left aligned: query i sees keys j <= i) stops the key loop at the diagonal,
so tiles above it are never loaded; only tiles that straddle it are masked. A boolean mask the
same for every query of a head (a key padding mask; ``KEY_RANGE``) cuts every pass's walk to the
key tiles holding a key it lets be seen (``_key_range``), so a padded tail is never loaded either.

Units. Only a score's difference from the row max is taken to log2 units for exp2. Folding
log2(e) into the scale first (s' = q k^T * (scale * log2 e), then s' - max s') rounds every score
at its own magnitude, an error the plain softmax, which subtracts the max exactly, does not make:
at head dim 2 with scores of ~18 the float32 output reached 3.3x the plain error. Where no
floating mask is added and the scale is positive (``RAW_SCORES``, ``_raw_scores``), the forward
keeps the raw products and their row max: P = exp2((qk - max qk) * (scale * log2 e)), one multiply
by a constant per score where natural scores take two (the scale's, rounded on its own, and
log2(e)'s), and no product rounded at its own magnitude: the difference is exact near the max.
The row max stored for the backward is then the raw one, and the backward kernels recompute P in
the same units. With a floating mask (added to natural scores) or a negative or extreme scale,
scores ``s = q k^T * scale + mask`` are natural and P = exp2((s - m) * log2(e)).

Tile bounds. Only the tiles that need it pay a per-element pass (``_scores``): those with a mask,
those on the causal diagonal, and, in the kernels that stream key tiles (forward, statistics,
dQ), every tile when k_len is not a multiple of the largest BLOCK_N of any config (``KEY_BOUNDS``,
fixed before the autotuner picks a tile). Elsewhere nothing is masked, and nothing needs it: a
query row past q_len has Q = 0 and dO = 0, its output and statistics are never stored, and in
the backward its row max reads as +inf, so its P is 0; a key past k_len in the dK/dV kernel's
tile only produces dK and dV rows that are never stored.

Transposed tiles. The dK/dV kernel needs P^T and dS^T as the A operands of dV += P^T dO and
dK += dS^T Q. Up to head dim 64 it forms the tile transposed, S^T = K Q^T and dP^T = V dO^T
(``_scores`` and ``_tile_p_dp`` take either orientation), so the products take them as they
come; a tile formed queries x keys and then transposed goes through shared memory, which in the
sm90 code (d64, bfloat16, 64 x 64 tiles) cost every query tile three barriers more and a wait
after each of its wgmma instructions. The transposed tile's row statistics (row max, log2 sum, corr, delta) vary along its
columns, 16 of them per thread instead of 2: 50 registers more, which above head dim 64 (wider
dK and dV accumulators) spill in the first configs, so wider heads keep the queries x keys tile.

Masks are read through their strides: a boolean mask (True = attend) or a floating bias added to
the scores, broadcast to [B, H, Lq, Lk] by zero strides, so a key-padding mask [B, 1, 1, Lk]
costs Lk bytes per batch, not Lq x Lk. A query whose every key is masked has ``l == 0``: its
output is 0 and its row max is stored as +inf, which makes every recomputed probability in the
backward exactly 0 (zero gradients, no NaN). A row masked with ``torch.finfo(...).min`` alone
stays finite (its differences from the row max are small) and averages its values as PyTorch does
rather than counting as fully masked.

Dropout: Philox (``_dropout.uniform``, the package's stream) keyed by a 64-bit seed at element
``(bh * Lq + i) * Lk + j``, so the backward regenerates the same keep-mask from the seed alone.
``DROPOUT`` is a constexpr: ``dropout_p == 0`` compiles the RNG away. P V takes P times the 0/1
keep-mask; the 1 / (1 - p) is applied in float32 to O, and in the backward to dV, dK, dQ and
the score gradient (see ``_kept`` and ``_tile_p_dp``).

Backward: a per-row pass first; then one kernel per key tile accumulates dK and dV over the
query tiles (from the diagonal on, when causal) and one kernel per query tile accumulates dQ over
the key tiles. Each recomputes the probabilities from the saved row statistics. Two kernels instead
of atomics on dQ: the gradients are deterministic, at the cost of computing Q K^T one more time.
With a floating mask that requires grad, the dQ kernel also writes dScores (the only Lq x Lk
buffer, allocated only then), summed to the mask's shape.

Row statistics. The forward keeps the row max m and log2(l) apart ([B, H, 2, Lq]) and the backward
forms P = exp2((s - m) * log2(e) - log2(l)): s - m is exact where P matters, whatever the size of
the scores. A single log-sum-exp would lose log2(l) altogether once |m| is large: a row whose
keys all carry a bias of -1e9 has m ~ -1e9, where float32's spacing is 64, and the backward's P
would be 1 for every key instead of 1 / Lk (gradients Lk times too large).

Backward precision. log2(l) is still rounded to float32: a relative error common to the whole
row of P, which adds up coherently in dV = P^T dO, and ``delta = rowsum(dO * O)`` carries the
forward's rounding (in 16 bits, that of the stored output) rather than this P's, so dS = P (dP -
delta) no longer cancels and dS amplifies the mismatch by |dP|. With large logits (a log-sum-exp
of ~50 at scale 3, head dim 16) float32 gradients reached 6.6x the plain float32 implementation's
error; in float16, with peaked rows (inputs of size 3 at head dim 16, or a scale of 1e4, where
the true dQ is 0 and the plain backward gives exactly 0), dQ and dK reached 2-6x at ordinary
scales and 0.0122, 0.122, inf at scales 1e4, 1e5, 1e30. So the per-row pass is a statistics
kernel (``RENORMALISE`` in the helpers, the scheme of the C++ CPU backend), in every dtype: from
the very S and dP the gradient kernels use (``_query_tile_terms``), ``corr = 1 / sum_j P_ij`` and
``delta = corr * sum_j P_ij dP_ij`` (in exact arithmetic 1 and rowsum(dO * O), times 1 - p with
dropout, whose dP is not scaled: see ``_tile_p_dp``); the gradient
kernels multiply P by ``corr``, so P sums to 1 to rounding and dS cancels as in the plain softmax
backward. Cost: one Q K^T and one dO V^T per tile more (9 tile GEMMs in the backward instead of
the 7 of a ``rowsum(dO * O)`` pass) and one multiply per element; the forward is unchanged.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._env import MAX_EXTENT, triton_interpret_mode
from ..layout import empty_in_query_layout
from ._autotune import benchmark, pruner, size_bucket
from ._dropout import as_float32, keep_scale, load_seed, seed_pointer, uniform
from ._grid import MAX_GRID, cdiv, next_power_of_2, partial_tiles
from ._options import LAUNCH_OPTIONS
from ._rounding import rounded_product
from ._units import LOG2E


# (BLOCK_M, BLOCK_N, num_warps, num_stages). BLOCK_M 128 x BLOCK_N 64 is the FA2 sweet spot on
# A100/H100 for head dims <= 128: enough reuse of the Q tile, accumulators in registers with 8
# warps, 3 stages hide the K/V loads behind the two MMAs. The backward holds dK and dV (or dQ)
# accumulators besides its operands, so it prefers smaller tiles.
_FWD_TILES = [(128, 64, 8, 3), (128, 64, 4, 3), (128, 32, 4, 4), (64, 64, 4, 3), (64, 32, 4, 4), (128, 128, 8, 2)]
_BWD_TILES = [(64, 64, 4, 2), (64, 64, 8, 3), (32, 64, 4, 2), (64, 32, 4, 3), (128, 64, 8, 2), (32, 32, 4, 3)]
# Head dims above 128 (tiles of 256 columns): Q, K and V tiles of 64 x 256 in 16 bits are 32 KiB
# each per stage, so only small tiles with 2 stages fit in shared memory.
_WIDE_TILES = [(64, 32, 4, 2), (32, 32, 4, 2)]


def _configs(stage: str, interpret: bool | None = None) -> list[triton.Config]:
    """Every tile config of a stage, the wide-head ones last; ``_tiles_for_head_dim`` picks per call.
    Under the interpreter (``interpret``, default: whether this process runs it), one small tile.
    tests/test_triton_gpu_tiles.py runs each of the GPU's."""
    if triton_interpret_mode() if interpret is None else interpret:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    tiles = (_FWD_TILES if stage == "fwd" else _BWD_TILES) + _WIDE_TILES
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in tiles]


# The key tiles of every config, the GPU's and the interpreter's, forward and backward.
_BLOCK_NS = sorted({c.kwargs["BLOCK_N"] for stage in ("fwd", "bwd") for interpret in (False, True)
                    for c in _configs(stage, interpret)})


def _tiles_for_head_dim(configs, args):
    """Wide heads (padded head dims above 128) get the wide tiles, the others the rest."""
    wide = max(args["BLOCK_D"], args["BLOCK_DV"]) > 128
    wide_tiles = set(_WIDE_TILES)
    return [
        c for c in configs
        if ((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in wide_tiles) == wide
    ]


# The tile choice depends on the head dims, the kind of call and the scale of the lengths: Q_BUCKET and
# K_BUCKET are the lengths rounded up to a power of two (up to 4096), plain ints the kernels ignore,
# so a new bucket retunes without recompiling; nor do they, nor the per-call seed, specialise the
# compiled kernel (do_not_specialize: Triton would otherwise compile a variant for values divisible
# by 16).
# Every constexpr that changes a kernel's shared memory or code is in its key: the dQ kernel writing
# the score gradient needs more shared memory than without, and with float32 inputs the argument
# dtypes Triton adds to the key do not tell them apart, so a tile config chosen without it could be
# reused where it no longer fits (sm80, head dim 128). A key names only its kernel's arguments
# (Triton 3.9 refuses any other name; earlier versions skipped it).
_AUTOTUNE_KEY = ["BLOCK_D", "BLOCK_DV", "IS_CAUSAL", "Q_BUCKET", "K_BUCKET", "HAS_MASK", "MASK_IS_BOOL", "KEY_RANGE",
                 "DROPOUT", "RAW_SCORES"]
_NOT_SPECIALIZED = ["seed_ptr", "Q_BUCKET", "K_BUCKET"]


@triton.jit
def _dropout_keep(seed, bh, q_idx, k_idx, q_len, k_len, dropout_p):
    """Keep-mask (True = kept) of the elements (query q_idx, key k_idx) of head ``bh``, the index
    tensors broadcast to the tile's shape (either orientation, see ``_scores``); same draw in the
    forward and both backward kernels."""
    counter = (bh * q_len + q_idx.to(tl.int64)) * k_len + k_idx
    return uniform(seed, counter) >= dropout_p


@triton.jit
def _mm(a, b, FP32_DOT: tl.constexpr):
    """a @ b with float32 accumulation; float32 operands multiply in IEEE float32 (the default
    would round them to TF32 on tensor cores, 10 bits of mantissa, far above the parity bound)."""
    if FP32_DOT:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _kept(keep):
    """1 where kept, else 0: a factor to multiply by (as torch's dropout does), so a NaN or inf
    that dropout drops stays NaN rather than vanishing. The 1 / (1 - p) of the kept elements is
    applied apart, in float32: folded into P before its cast to fp16 it would overflow there
    for p > 1 - 1/65504 (P * 1e5 is inf in fp16 though the output P V / (1 - p) may be small)."""
    return tl.where(keep, 1.0, 0.0)


@triton.jit
def _inv_keep(inv_keep, DROPOUT: tl.constexpr):
    """The dropout scale 1 / (1 - p) (``inv_keep``, from ``_dropout.keep_scale``); 1 without dropout."""
    if DROPOUT:
        return inv_keep
    return 1.0


@triton.jit
def _to_log2(qk_scale, RAW_SCORES: tl.constexpr):
    """The factor that takes a difference of scores to log2 units: scale * log2(e) for raw products
    (``RAW_SCORES``), log2(e) for natural scores ("Units" in the module docstring)."""
    if RAW_SCORES:
        return qk_scale * LOG2E
    else:
        return LOG2E


@triton.jit
def _scores(
    a, b, q_idx, k_idx, mask_base, stride_mm, stride_mn, q_len, k_len, qk_scale,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, APPLY_CAUSAL: tl.constexpr, FP32_DOT: tl.constexpr,
    KEY_BOUNDS: tl.constexpr, RAW_SCORES: tl.constexpr,
):
    """Masked scores ``a b^T * scale + mask`` of a tile, in natural units (see "Units" in the module
    docstring), in either orientation: queries x keys (a = Q tile, b = K tile, q_idx = the query
    indices as a column [BLOCK_M, 1], k_idx = the key indices as a row [1, BLOCK_N]) or keys x
    queries (a = K, b = Q, k_idx a column, q_idx a row: the transpose, which the dK/dV kernel
    forms so that P^T and dS^T are its products' A operands as they are, with no transpose).
    Without a mask, a causal diagonal or ``KEY_BOUNDS`` (keys past k_len in the tile) the scores
    are returned as they are, with no per-element pass (see "Tile bounds" in the module docstring).
    ``RAW_SCORES`` (no floating mask, a positive scale: "Units" in the module docstring) leaves the
    products unscaled."""
    s = _mm(a, tl.trans(b), FP32_DOT)
    if not RAW_SCORES:
        # Rounded on its own: the callers subtract the row max from these very scores, which must give
        # exactly 0 at the max (a product contracted into that subtraction would not; _rounding).
        s = rounded_product(s, qk_scale)
    if HAS_MASK:
        # Both bounds, which keep the mask's loads within it.
        valid = (q_idx < q_len) & (k_idx < k_len)
        m_ptrs = mask_base + q_idx.to(tl.int64) * stride_mm + k_idx.to(tl.int64) * stride_mn
        if MASK_IS_BOOL:
            valid = valid & (tl.load(m_ptrs, mask=valid, other=0) != 0)
        else:
            s += tl.load(m_ptrs, mask=valid, other=0.0).to(tl.float32)
        if APPLY_CAUSAL:
            valid = valid & (q_idx >= k_idx)
        s = tl.where(valid, s, float("-inf"))
    elif APPLY_CAUSAL or KEY_BOUNDS:
        # No query bound: a row past q_len needs none ("Tile bounds" in the module docstring).
        if APPLY_CAUSAL and KEY_BOUNDS:
            valid = (q_idx >= k_idx) & (k_idx < k_len)
        elif APPLY_CAUSAL:
            valid = q_idx >= k_idx
        else:
            valid = k_idx < k_len
        s = tl.where(valid, s, float("-inf"))
    return s


@triton.jit
def _key_range(mask_base, stride_mn, k_len, BLOCK_N: tl.constexpr):
    """For a boolean mask that is the same for every query of a head (a key padding mask: a zero
    query stride; KEY_RANGE), the key tiles that hold a key it lets be seen: [lo, hi), lo the
    first such key rounded down to a tile, hi one past the last (lo >= hi: none). The kernels
    walk only these, so a sequence's padded tail costs nothing, like the tiles above the causal
    diagonal; the tiles left out would only add probabilities of exactly 0. The mask row is read
    1024 keys at a time: a few steps before the main loop, whatever the tile."""
    first = tl.zeros([], dtype=tl.int32) + k_len  # tensors, whatever k_len's specialisation
    last = tl.zeros([], dtype=tl.int32)
    for start in range(0, k_len, 1024):
        offs = start + tl.arange(0, 1024)
        seen = tl.load(mask_base + offs.to(tl.int64) * stride_mn, mask=offs < k_len, other=0) != 0
        first = tl.minimum(first, tl.min(tl.where(seen, offs, k_len), 0))
        last = tl.maximum(last, tl.max(tl.where(seen, offs + 1, 0), 0))
    return (first // BLOCK_N) * BLOCK_N, last


@triton.jit
def _key_tiles(start_m, mask_base, stride_mn, k_len, IS_CAUSAL: tl.constexpr, KEY_RANGE: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The key tiles the query tile at ``start_m`` walks (forward, statistics and dQ kernels), as
    (lo, full_hi, diag_lo, diag_hi): [lo, full_hi) need no causal mask; causal, [diag_lo, diag_hi)
    straddle the diagonal (the tiles up to the query tile's last row) and the tiles beyond are
    skipped altogether. With KEY_RANGE only the keys the mask lets be seen (``_key_range``)."""
    lo = 0
    hi = k_len
    if KEY_RANGE:
        lo, hi = _key_range(mask_base, stride_mn, k_len, BLOCK_N)
    full_hi = hi
    diag_lo = hi
    diag_hi = hi
    if IS_CAUSAL:
        first = (start_m // BLOCK_N) * BLOCK_N  # the tile holding the query tile's first row
        full_hi = tl.minimum(first, hi)
        diag_lo = tl.maximum(first, lo)
        diag_hi = tl.minimum(tl.minimum(start_m + BLOCK_M, k_len), hi)
    return lo, full_hi, diag_lo, diag_hi


@triton.jit
def _tile_ptrs(base, rows, stride, BLOCK: tl.constexpr):
    """Pointers to the rows ``rows`` (a block of indices) of the row-major matrix at ``base`` with
    row stride ``stride``, ``BLOCK`` columns each: a [rows, BLOCK] tile of Q, K, V, dO or a
    gradient. Row offsets in int64: a head's rows times their stride may pass 2^31 elements."""
    return base + rows.to(tl.int64)[:, None] * stride + tl.arange(0, BLOCK)[None, :]


@triton.jit
def _tile_mask(rows, length, WIDTH: tl.constexpr, BLOCK: tl.constexpr):
    """The elements of a ``_tile_ptrs`` tile that exist: rows below ``length``, columns below ``WIDTH``."""
    return (rows < length)[:, None] & (tl.arange(0, BLOCK) < WIDTH)[None, :]


@triton.jit
def _load_tile(base, rows, stride, length, WIDTH: tl.constexpr, BLOCK: tl.constexpr, ROW_BOUNDS: tl.constexpr):
    """The tile of rows ``rows`` at ``base`` (``_tile_ptrs``), zero past ``length`` and ``WIDTH``.
    Without ``ROW_BOUNDS`` (the key tiles where KEY_BOUNDS is off: "Tile bounds" in the module
    docstring) every row lies within length: no per-row predicate. The pointers are formed from the
    row indices at each step of a loop: pointers carried across the steps (one add each) saved 5%
    of the forward's instructions in sm90 code but took up to 90 registers more, a block per SM
    fewer in 4 of the forward's 32 configurations and 25 of the backward's 96."""
    ptrs = _tile_ptrs(base, rows, stride, BLOCK)
    if ROW_BOUNDS:
        return tl.load(ptrs, mask=_tile_mask(rows, length, WIDTH, BLOCK), other=0.0)
    else:
        return tl.load(ptrs, mask=(tl.arange(0, BLOCK) < WIDTH)[None, :], other=0.0)


@triton.jit
def _store_tile(base, rows, stride, value, length, WIDTH: tl.constexpr, BLOCK: tl.constexpr):
    """Stores ``value`` (converted to the matrix's type) as the tile of rows ``rows`` at ``base``
    (``_tile_ptrs``), leaving out the rows past ``length`` and the columns past ``WIDTH``."""
    tl.store(_tile_ptrs(base, rows, stride, BLOCK), value.to(base.dtype.element_ty),
             mask=_tile_mask(rows, length, WIDTH, BLOCK))


@triton.jit
def _attn_fwd_inner(
    acc, m_i, l_i, q, k_base, v_base, offs_m, mask_base, dmask_base,
    lo, hi, stride_kn, stride_vn, stride_mm, stride_mn, stride_dmm,
    q_len, k_len, qk_scale, seed, bh, dropout_p,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, APPLY_CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr, WRITE_KEEP: tl.constexpr, FP32_DOT: tl.constexpr, KEY_BOUNDS: tl.constexpr,
    RAW_SCORES: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
):
    to_log2 = _to_log2(qk_scale, RAW_SCORES)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, offs_n, stride_kn, k_len, HEAD_DIM, BLOCK_D, KEY_BOUNDS)
        s = _scores(q, k, offs_m[:, None], offs_n[None, :], mask_base, stride_mm, stride_mn, q_len, k_len, qk_scale,
                    HAS_MASK, MASK_IS_BOOL, APPLY_CAUSAL, FP32_DOT, KEY_BOUNDS, RAW_SCORES)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no visible key so far keeps m = -inf; shift by 0 instead so exp2 gives 0, not NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2((s - m_shift[:, None]) * to_log2)
        alpha = tl.math.exp2((m_i - m_shift) * to_log2)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], q_len, k_len, dropout_p)
            if WRITE_KEEP:
                tl.store(dmask_base + offs_m[:, None].to(tl.int64) * stride_dmm + offs_n[None, :], keep.to(tl.int8),
                         mask=(offs_m[:, None] < q_len) & (offs_n[None, :] < k_len))
            p = p * _kept(keep)
        v = _load_tile(v_base, offs_n, stride_vn, k_len, HEAD_DIM_V, BLOCK_DV, KEY_BOUNDS)
        acc += _mm(p.to(v.dtype), v, FP32_DOT)
        m_i = m_new
    return acc, m_i, l_i


@triton.autotune(configs=_configs("fwd"), key=_AUTOTUNE_KEY + ["KEY_BOUNDS", "WRITE_KEEP"], do_bench=benchmark,
                 prune_configs_by={"early_config_prune": pruner(lambda: _attn_fwd_kernel, _tiles_for_head_dim)})
@triton.jit(do_not_specialize=_NOT_SPECIALIZED)
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, stats_ptr, keep_ptr,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ob, stride_oh, stride_om,
    heads, kv_group, q_len, k_len, qk_scale, seed_ptr, dropout_p, inv_keep, Q_BUCKET, K_BUCKET,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, KEY_RANGE: tl.constexpr,
    DROPOUT: tl.constexpr, WRITE_KEEP: tl.constexpr, FP32_DOT: tl.constexpr, KEY_BOUNDS: tl.constexpr,
    RAW_SCORES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    seed = load_seed(seed_ptr, DROPOUT)
    num_m = tl.cdiv(q_len, BLOCK_M)
    pid = tl.program_id(0)
    tile_m = pid % num_m
    bh = (pid // num_m).to(tl.int64)
    b = bh // heads
    h = bh % heads
    start_m = tile_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    in_queries = offs_m < q_len

    q = _load_tile(q_ptr + b * stride_qb + h * stride_qh, offs_m, stride_qm, q_len, HEAD_DIM, BLOCK_D, True)
    k_base = k_ptr + b * stride_kb + (h // kv_group) * stride_kh
    v_base = v_ptr + b * stride_vb + (h // kv_group) * stride_vh
    mask_base = mask_ptr + b * stride_mb + h * stride_mh
    keep_base = keep_ptr + bh * q_len * k_len

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    lo, full_hi, diag_lo, diag_hi = _key_tiles(start_m, mask_base, stride_mn, k_len, IS_CAUSAL, KEY_RANGE,
                                               BLOCK_M, BLOCK_N)
    acc, m_i, l_i = _attn_fwd_inner(
        acc, m_i, l_i, q, k_base, v_base, offs_m, mask_base, keep_base,
        lo, full_hi, stride_kn, stride_vn, stride_mm, stride_mn, k_len,
        q_len, k_len, qk_scale, seed, bh, dropout_p,
        HAS_MASK, MASK_IS_BOOL, False, DROPOUT, WRITE_KEEP, FP32_DOT, KEY_BOUNDS, RAW_SCORES,
        BLOCK_N, BLOCK_D, BLOCK_DV, HEAD_DIM, HEAD_DIM_V,
    )
    if IS_CAUSAL:
        acc, m_i, l_i = _attn_fwd_inner(
            acc, m_i, l_i, q, k_base, v_base, offs_m, mask_base, keep_base,
            diag_lo, diag_hi, stride_kn, stride_vn, stride_mm, stride_mn, k_len,
            q_len, k_len, qk_scale, seed, bh, dropout_p,
            HAS_MASK, MASK_IS_BOOL, True, DROPOUT, WRITE_KEEP, FP32_DOT, KEY_BOUNDS, RAW_SCORES,
            BLOCK_N, BLOCK_D, BLOCK_DV, HEAD_DIM, HEAD_DIM_V,
        )
    empty_row = l_i == 0.0
    out = acc * tl.math.div_rn(_inv_keep(inv_keep, DROPOUT), tl.where(empty_row, 1.0, l_i))[:, None]
    _store_tile(out_ptr + b * stride_ob + h * stride_oh, offs_m, stride_om, out, q_len, HEAD_DIM_V, BLOCK_DV)
    # The row statistics for the backward, kept apart (see the module docstring): the row max in
    # the units of the scores (+inf for a row that sees no key, so that its P is 0) and log2 of the row sum.
    stats = stats_ptr + bh * 2 * q_len
    tl.store(stats + offs_m, tl.where(empty_row, float("inf"), m_i), mask=in_queries)
    tl.store(stats + q_len + offs_m, tl.math.log2(tl.where(empty_row, 1.0, l_i)), mask=in_queries)


@triton.jit
def _probabilities(
    a, b, q_idx, k_idx, row_max, log2_sum, corr, mask_base, stride_mm, stride_mn, q_len, k_len, qk_scale,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, APPLY_CAUSAL: tl.constexpr, FP32_DOT: tl.constexpr,
    RENORMALISE: tl.constexpr, KEY_BOUNDS: tl.constexpr, RAW_SCORES: tl.constexpr,
):
    """Softmax probabilities of a tile (oriented as ``_scores``: scores a b^T) recomputed from the
    forward's row statistics (the row max, log2 of the row sum, shaped to broadcast along the
    tile's key dimension), P = exp2((s - row_max) * log2(e) - log2_sum), or with ``RAW_SCORES``
    P = exp2((qk - row_max) * scale * log2(e) - log2_sum) ("Units" in the module docstring); with
    ``RENORMALISE`` renormalised by the row factor ``corr`` of the statistics pass."""
    s = _scores(a, b, q_idx, k_idx, mask_base, stride_mm, stride_mn, q_len, k_len, qk_scale,
                HAS_MASK, MASK_IS_BOOL, APPLY_CAUSAL, FP32_DOT, KEY_BOUNDS, RAW_SCORES)
    # At most 1: a score recomputed with other tile shapes than the forward's may exceed the row max
    # by an ulp, which at |s| ~ 1e30 would give exp2 of ~1e23 (inf) where P is 1. NaN stays NaN.
    p = tl.math.exp2(tl.minimum((s - row_max) * _to_log2(qk_scale, RAW_SCORES) - log2_sum, 0.0,
                                propagate_nan=tl.PropagateNan.ALL))
    if RENORMALISE:
        p = p * corr
    return p


@triton.jit
def _tile_p_dp(
    a, b, c, d, row_max, log2_sum, corr, q_idx, k_idx, mask_base, stride_mm, stride_mn, q_len, k_len,
    qk_scale, seed, bh, dropout_p, inv_keep,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, APPLY_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    FP32_DOT: tl.constexpr, RENORMALISE: tl.constexpr, KEY_BOUNDS: tl.constexpr, RAW_SCORES: tl.constexpr,
):
    """One tile of the backward, whichever side streams, in either orientation (``_scores``):
    queries x keys from (a, b, c, d) = (Q, K, dO, V), keys x queries (the transposes) from
    (K, Q, V, dO). Returns (P, dP = c d^T dropped as P was, the tile's keep-mask as 0/1, 1 without
    dropout). dS takes the undropped P, dV the kept P. Neither
    dP nor dV carries the 1 / (1 - p) (see ``_kept``): the callers apply it in float32 to dV, dK,
    dQ and the score gradient, so that dS = P (dP - delta), the fp16/bf16 operand of the dK and
    dQ products, stays at the scale of dO V^T (scaled, it would overflow fp16 for p near 1 where
    the gradients themselves do not)."""
    p = _probabilities(a, b, q_idx, k_idx, row_max, log2_sum, corr, mask_base, stride_mm, stride_mn, q_len, k_len,
                       qk_scale, HAS_MASK, MASK_IS_BOOL, APPLY_CAUSAL, FP32_DOT, RENORMALISE, KEY_BOUNDS, RAW_SCORES)
    dp = _mm(c, tl.trans(d), FP32_DOT)
    kept = 1.0
    if DROPOUT:
        kept = _kept(_dropout_keep(seed, bh, q_idx, k_idx, q_len, k_len, dropout_p))
        dp = dp * kept
    return p, dp, kept


@triton.jit
def _query_tile_terms(
    q, do, row_max, log2_sum, corr, offs_m, start_n, k_base, v_base, mask_base,
    stride_kn, stride_vn, stride_mm, stride_mn, q_len, k_len, qk_scale, seed, bh, dropout_p, inv_keep,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, APPLY_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    FP32_DOT: tl.constexpr, RENORMALISE: tl.constexpr, KEY_BOUNDS: tl.constexpr, RAW_SCORES: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
):
    """For a query tile and the key tile at ``start_n``: (K tile, P, dP = dO V^T dropped as P was).
    The statistics pass and the dQ pass share it, so they see the very same P and dP."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_tile(k_base, offs_n, stride_kn, k_len, HEAD_DIM, BLOCK_D, KEY_BOUNDS)
    v = _load_tile(v_base, offs_n, stride_vn, k_len, HEAD_DIM_V, BLOCK_DV, KEY_BOUNDS)
    p, dp, _ = _tile_p_dp(
        q, k, do, v, row_max[:, None], log2_sum[:, None], corr[:, None], offs_m[:, None], offs_n[None, :],
        mask_base, stride_mm, stride_mn, q_len, k_len,
        qk_scale, seed, bh, dropout_p, inv_keep, HAS_MASK, MASK_IS_BOOL, APPLY_CAUSAL, DROPOUT, FP32_DOT, RENORMALISE,
        KEY_BOUNDS, RAW_SCORES,
    )
    return k, p, dp


@triton.jit
def _attn_bwd_stats_inner(
    p_sum, pdp_sum, q, do, row_max, log2_sum, offs_m, k_base, v_base, mask_base, lo, hi,
    stride_kn, stride_vn, stride_mm, stride_mn, q_len, k_len, qk_scale, seed, bh, dropout_p, inv_keep,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, APPLY_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    FP32_DOT: tl.constexpr, KEY_BOUNDS: tl.constexpr, RAW_SCORES: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
):
    """Row sums of P (as recomputed from the row statistics) and of P * dP over the key tiles [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        _, p, dp = _query_tile_terms(
            q, do, row_max, log2_sum, row_max, offs_m, start_n, k_base, v_base, mask_base,
            stride_kn, stride_vn, stride_mm, stride_mn, q_len, k_len, qk_scale, seed, bh, dropout_p, inv_keep,
            HAS_MASK, MASK_IS_BOOL, APPLY_CAUSAL, DROPOUT, FP32_DOT, False, KEY_BOUNDS, RAW_SCORES, BLOCK_N, BLOCK_D,
            BLOCK_DV, HEAD_DIM, HEAD_DIM_V,
        )
        p_sum += tl.sum(p, 1)
        pdp_sum += tl.sum(p * dp, 1)
    return p_sum, pdp_sum


@triton.jit
def _row_stats(stats, offs_m, in_queries, q_len):
    """The forward's statistics of the rows offs_m of one head (``stats`` = its [2, q_len] block)."""
    row_max = tl.load(stats + offs_m, mask=in_queries, other=float("inf"))
    log2_sum = tl.load(stats + q_len + offs_m, mask=in_queries, other=0.0)
    return row_max, log2_sum


@triton.jit
def _query_tile(
    q_ptr, dout_ptr, stats_ptr, stride_qb, stride_qh, stride_qm, stride_dob, stride_doh, stride_dom,
    heads, q_len, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """The query tile a program of the per-query backward kernels (statistics, dQ) owns:
    (bh, b, h, start_m, offs_m, in_queries, Q tile, dO tile, row max, log2 of the row sum)."""
    num_m = tl.cdiv(q_len, BLOCK_M)
    pid = tl.program_id(0)
    bh = (pid // num_m).to(tl.int64)
    b = bh // heads
    h = bh % heads
    start_m = (pid % num_m) * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    in_queries = offs_m < q_len
    q = _load_tile(q_ptr + b * stride_qb + h * stride_qh, offs_m, stride_qm, q_len, HEAD_DIM, BLOCK_D, True)
    do = _load_tile(dout_ptr + b * stride_dob + h * stride_doh, offs_m, stride_dom, q_len, HEAD_DIM_V, BLOCK_DV, True)
    row_max, log2_sum = _row_stats(stats_ptr + bh * 2 * q_len, offs_m, in_queries, q_len)
    return bh, b, h, start_m, offs_m, in_queries, q, do, row_max, log2_sum


@triton.autotune(configs=_configs("bwd"), key=_AUTOTUNE_KEY + ["KEY_BOUNDS"], do_bench=benchmark,
                 prune_configs_by={"early_config_prune": pruner(lambda: _attn_bwd_stats_kernel, _tiles_for_head_dim)})
@triton.jit(do_not_specialize=_NOT_SPECIALIZED)
def _attn_bwd_stats_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, dout_ptr, stats_ptr, corr_ptr, delta_ptr,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dob, stride_doh, stride_dom,
    heads, kv_group, q_len, k_len, qk_scale, seed_ptr, dropout_p, inv_keep, Q_BUCKET, K_BUCKET,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, KEY_RANGE: tl.constexpr,
    DROPOUT: tl.constexpr, FP32_DOT: tl.constexpr, KEY_BOUNDS: tl.constexpr, RAW_SCORES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Per query row: ``corr = 1 / sum_j P_ij`` and ``delta = corr * sum_j P_ij dP_ij`` with P as
    the gradient kernels recompute it (0 and 0 for a row that sees no key)."""
    seed = load_seed(seed_ptr, DROPOUT)
    bh, b, h, start_m, offs_m, in_queries, q, do, row_max, log2_sum = _query_tile(
        q_ptr, dout_ptr, stats_ptr, stride_qb, stride_qh, stride_qm, stride_dob, stride_doh, stride_dom,
        heads, q_len, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M,
    )
    p_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    pdp_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    k_base = k_ptr + b * stride_kb + (h // kv_group) * stride_kh
    v_base = v_ptr + b * stride_vb + (h // kv_group) * stride_vh
    mask_base = mask_ptr + b * stride_mb + h * stride_mh
    lo, full_hi, diag_lo, diag_hi = _key_tiles(start_m, mask_base, stride_mn, k_len, IS_CAUSAL, KEY_RANGE,
                                               BLOCK_M, BLOCK_N)
    p_sum, pdp_sum = _attn_bwd_stats_inner(
        p_sum, pdp_sum, q, do, row_max, log2_sum, offs_m, k_base, v_base, mask_base, lo, full_hi,
        stride_kn, stride_vn, stride_mm, stride_mn, q_len, k_len, qk_scale, seed, bh, dropout_p, inv_keep,
        HAS_MASK, MASK_IS_BOOL, False, DROPOUT, FP32_DOT, KEY_BOUNDS, RAW_SCORES, BLOCK_N, BLOCK_D, BLOCK_DV,
        HEAD_DIM, HEAD_DIM_V,
    )
    if IS_CAUSAL:
        p_sum, pdp_sum = _attn_bwd_stats_inner(
            p_sum, pdp_sum, q, do, row_max, log2_sum, offs_m, k_base, v_base, mask_base, diag_lo, diag_hi,
            stride_kn, stride_vn, stride_mm, stride_mn, q_len, k_len, qk_scale, seed, bh, dropout_p, inv_keep,
            HAS_MASK, MASK_IS_BOOL, True, DROPOUT, FP32_DOT, KEY_BOUNDS, RAW_SCORES, BLOCK_N, BLOCK_D, BLOCK_DV,
            HEAD_DIM, HEAD_DIM_V,
        )
    sees_keys = p_sum > 0.0
    safe_sum = tl.where(sees_keys, p_sum, 1.0)
    # Correctly rounded (div_rn; a plain / compiles to the 2-ulp div.full.f32): dS = P corr (dP - delta)
    # cancels at the scale of delta, where these errors would pass straight into dQ and dK.
    tl.store(corr_ptr + bh * q_len + offs_m, tl.where(sees_keys, tl.math.div_rn(1.0, safe_sum), 0.0), mask=in_queries)
    tl.store(delta_ptr + bh * q_len + offs_m, tl.where(sees_keys, tl.math.div_rn(pdp_sum, safe_sum), 0.0),
             mask=in_queries)


@triton.jit
def _attn_bwd_dkdv_inner(
    dk, dv, k, v, offs_n, q_base, do_base, mask_base, stats_base, corr_base, delta_base, lo, hi,
    stride_qm, stride_dom, stride_mm, stride_mn, q_len, k_len, qk_scale, seed, bh, dropout_p, inv_keep,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, APPLY_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    FP32_DOT: tl.constexpr, RAW_SCORES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
):
    """dK and dV of one key tile, accumulated over the query tiles [lo, hi)."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        in_queries = offs_m < q_len
        q = _load_tile(q_base, offs_m, stride_qm, q_len, HEAD_DIM, BLOCK_D, True)
        do = _load_tile(do_base, offs_m, stride_dom, q_len, HEAD_DIM_V, BLOCK_DV, True)
        row_max, log2_sum = _row_stats(stats_base, offs_m, in_queries, q_len)
        delta = tl.load(delta_base + offs_m, mask=in_queries, other=0.0)
        corr = tl.load(corr_base + offs_m, mask=in_queries, other=0.0)
        if BLOCK_D <= 64 and BLOCK_DV <= 64:
            # The tile transposed, keys x queries ("Transposed tiles" in the module docstring): P^T
            # and dS^T are the A operands of dV += P^T dO and dK += dS^T Q as they come.
            p_t, dp_t, kept_t = _tile_p_dp(
                k, q, v, do, row_max[None, :], log2_sum[None, :], corr[None, :], offs_m[None, :], offs_n[:, None],
                mask_base, stride_mm, stride_mn, q_len, k_len, qk_scale, seed, bh, dropout_p, inv_keep,
                HAS_MASK, MASK_IS_BOOL, APPLY_CAUSAL, DROPOUT, FP32_DOT, True, False, RAW_SCORES,
            )
            ds_t = p_t * (dp_t - delta[None, :])
            p_used = p_t * kept_t if DROPOUT else p_t
            dv += _mm(p_used.to(do.dtype), do, FP32_DOT)
            dk += _mm(ds_t.to(q.dtype), q, FP32_DOT)
        else:
            p, dp, kept = _tile_p_dp(
                q, k, do, v, row_max[:, None], log2_sum[:, None], corr[:, None], offs_m[:, None], offs_n[None, :],
                mask_base, stride_mm, stride_mn, q_len, k_len, qk_scale, seed, bh, dropout_p, inv_keep,
                HAS_MASK, MASK_IS_BOOL, APPLY_CAUSAL, DROPOUT, FP32_DOT, True, False, RAW_SCORES,
            )
            ds = p * (dp - delta[:, None])
            p_used = p * kept if DROPOUT else p
            dv += _mm(tl.trans(p_used.to(do.dtype)), do, FP32_DOT)
            dk += _mm(tl.trans(ds.to(q.dtype)), q, FP32_DOT)
    return dk, dv


@triton.jit
def _attn_bwd_dq_inner(
    dq, q, do, row_max, log2_sum, corr, delta, offs_m, k_base, v_base, mask_base, dscores_base, lo, hi,
    stride_kn, stride_vn, stride_mm, stride_mn, q_len, k_len, qk_scale, seed, bh, dropout_p, inv_keep,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, APPLY_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    FP32_DOT: tl.constexpr, KEY_BOUNDS: tl.constexpr, WRITE_DSCORES: tl.constexpr, RAW_SCORES: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
):
    """dQ of one query tile, accumulated over the key tiles [lo, hi)."""
    in_queries = offs_m < q_len
    rows = offs_m[:, None].to(tl.int64)
    for start_n in range(lo, hi, BLOCK_N):
        k, p, dp = _query_tile_terms(
            q, do, row_max, log2_sum, corr, offs_m, start_n, k_base, v_base, mask_base,
            stride_kn, stride_vn, stride_mm, stride_mn, q_len, k_len, qk_scale, seed, bh, dropout_p, inv_keep,
            HAS_MASK, MASK_IS_BOOL, APPLY_CAUSAL, DROPOUT, FP32_DOT, True, KEY_BOUNDS, RAW_SCORES, BLOCK_N, BLOCK_D,
            BLOCK_DV, HEAD_DIM, HEAD_DIM_V,
        )
        ds = p * (dp - delta[:, None])
        if WRITE_DSCORES:
            offs_n = start_n + tl.arange(0, BLOCK_N)
            tl.store(dscores_base + rows * k_len + offs_n[None, :], ds * _inv_keep(inv_keep, DROPOUT),
                     mask=in_queries[:, None] & (offs_n[None, :] < k_len))
        dq += _mm(ds.to(k.dtype), k, FP32_DOT)
    return dq


@triton.autotune(configs=_configs("bwd"), key=_AUTOTUNE_KEY, do_bench=benchmark,
                 prune_configs_by={"early_config_prune": pruner(lambda: _attn_bwd_dkdv_kernel, _tiles_for_head_dim)})
@triton.jit(do_not_specialize=_NOT_SPECIALIZED)
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, dout_ptr, stats_ptr, corr_ptr, delta_ptr, dk_ptr, dv_ptr,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    heads, kv_heads, kv_group, kv_splits, q_len, k_len, qk_scale, seed_ptr, dropout_p, inv_keep, Q_BUCKET, K_BUCKET,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, KEY_RANGE: tl.constexpr,
    DROPOUT: tl.constexpr, FP32_DOT: tl.constexpr, RAW_SCORES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    seed = load_seed(seed_ptr, DROPOUT)
    num_n = tl.cdiv(k_len, BLOCK_N)
    pid = tl.program_id(0)
    tile_n = pid % num_n
    # A program owns a key tile of one key/value head and walks the query heads that read it (one
    # without grouping), so a grouped head's dK/dV is summed in the float32 accumulators. With
    # kv_splits > 1 (few programs otherwise: _dkdv_splits) a program walks one chunk of the group
    # and stores its float32 sum as head hk * kv_splits + split of a buffer the launcher sums.
    slot = (pid // num_n).to(tl.int64)
    split = slot % kv_splits
    bkv = slot // kv_splits
    b = bkv // kv_heads
    hk = bkv % kv_heads
    chunk = tl.cdiv(kv_group, kv_splits)
    g_begin = split * chunk
    g_end = tl.minimum(g_begin + chunk, kv_group)
    out_h = hk * kv_splits + split
    start_n = tile_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    in_keys = offs_n < k_len
    k = _load_tile(k_ptr + b * stride_kb + hk * stride_kh, offs_n, stride_kn, k_len, HEAD_DIM, BLOCK_D, True)
    v = _load_tile(v_ptr + b * stride_vb + hk * stride_vh, offs_n, stride_vn, k_len, HEAD_DIM_V, BLOCK_DV, True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    # Causal: query tiles ending before this key tile see none of it and are skipped; those that
    # straddle the diagonal, [lo, straddle_hi), are masked; the rest see the whole tile.
    lo = (start_n // BLOCK_M) * BLOCK_M
    straddle_hi = tl.minimum(tl.cdiv(start_n + BLOCK_N, BLOCK_M) * BLOCK_M, q_len)
    full_lo = 0
    if IS_CAUSAL:
        full_lo = tl.maximum(straddle_hi, lo)
    for g in range(g_begin, g_end):
        h = hk * kv_group + g
        bh = b * heads + h
        q_base = q_ptr + b * stride_qb + h * stride_qh
        do_base = dout_ptr + b * stride_dob + h * stride_doh
        mask_base = mask_ptr + b * stride_mb + h * stride_mh
        stats_base = stats_ptr + bh * 2 * q_len
        corr_base = corr_ptr + bh * q_len
        delta_base = delta_ptr + bh * q_len
        straddle_end = straddle_hi
        q_end = q_len
        if KEY_RANGE:  # a key tile the head's (query-independent) mask hides wholly gets nothing: skipped
            seen = tl.load(mask_base + offs_n.to(tl.int64) * stride_mn, mask=in_keys, other=0) != 0
            any_seen = tl.max(seen.to(tl.int32), 0) > 0
            straddle_end = tl.where(any_seen, straddle_hi, lo)
            q_end = tl.where(any_seen, q_len, 0)
        if IS_CAUSAL:
            dk, dv = _attn_bwd_dkdv_inner(
                dk, dv, k, v, offs_n, q_base, do_base, mask_base, stats_base, corr_base, delta_base, lo, straddle_end,
                stride_qm, stride_dom, stride_mm, stride_mn, q_len, k_len, qk_scale, seed, bh, dropout_p, inv_keep,
                HAS_MASK, MASK_IS_BOOL, True, DROPOUT, FP32_DOT, RAW_SCORES, BLOCK_M, BLOCK_D, BLOCK_DV, HEAD_DIM,
                HEAD_DIM_V,
            )
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, offs_n, q_base, do_base, mask_base, stats_base, corr_base, delta_base, full_lo, q_end,
            stride_qm, stride_dom, stride_mm, stride_mn, q_len, k_len, qk_scale, seed, bh, dropout_p, inv_keep,
            HAS_MASK, MASK_IS_BOOL, False, DROPOUT, FP32_DOT, RAW_SCORES, BLOCK_M, BLOCK_D, BLOCK_DV, HEAD_DIM,
            HEAD_DIM_V,
        )
    # One factor after the other: their product overflows where both are finite (a huge scale).
    dk = dk * _inv_keep(inv_keep, DROPOUT) * qk_scale
    dv = dv * _inv_keep(inv_keep, DROPOUT)
    _store_tile(dk_ptr + b * stride_dkb + out_h * stride_dkh, offs_n, stride_dkn, dk, k_len, HEAD_DIM, BLOCK_D)
    _store_tile(dv_ptr + b * stride_dvb + out_h * stride_dvh, offs_n, stride_dvn, dv, k_len, HEAD_DIM_V, BLOCK_DV)


@triton.autotune(configs=_configs("bwd"), key=_AUTOTUNE_KEY + ["KEY_BOUNDS", "WRITE_DSCORES"], do_bench=benchmark,
                 prune_configs_by={"early_config_prune": pruner(lambda: _attn_bwd_dq_kernel, _tiles_for_head_dim)})
@triton.jit(do_not_specialize=_NOT_SPECIALIZED)
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, dout_ptr, stats_ptr, corr_ptr, delta_ptr, dq_ptr, dscores_ptr,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    heads, kv_group, q_len, k_len, qk_scale, seed_ptr, dropout_p, inv_keep, Q_BUCKET, K_BUCKET,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, KEY_RANGE: tl.constexpr,
    DROPOUT: tl.constexpr, FP32_DOT: tl.constexpr, KEY_BOUNDS: tl.constexpr,
    WRITE_DSCORES: tl.constexpr, RAW_SCORES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    seed = load_seed(seed_ptr, DROPOUT)
    bh, b, h, start_m, offs_m, in_queries, q, do, row_max, log2_sum = _query_tile(
        q_ptr, dout_ptr, stats_ptr, stride_qb, stride_qh, stride_qm, stride_dob, stride_doh, stride_dom,
        heads, q_len, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M,
    )
    delta = tl.load(delta_ptr + bh * q_len + offs_m, mask=in_queries, other=0.0)
    corr = tl.load(corr_ptr + bh * q_len + offs_m, mask=in_queries, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = k_ptr + b * stride_kb + (h // kv_group) * stride_kh
    v_base = v_ptr + b * stride_vb + (h // kv_group) * stride_vh
    mask_base = mask_ptr + b * stride_mb + h * stride_mh
    dscores_base = dscores_ptr + bh * q_len * k_len
    lo, full_hi, diag_lo, diag_hi = _key_tiles(start_m, mask_base, stride_mn, k_len, IS_CAUSAL, KEY_RANGE,
                                               BLOCK_M, BLOCK_N)
    dq = _attn_bwd_dq_inner(
        dq, q, do, row_max, log2_sum, corr, delta, offs_m, k_base, v_base, mask_base, dscores_base, lo, full_hi,
        stride_kn, stride_vn, stride_mm, stride_mn, q_len, k_len, qk_scale, seed, bh, dropout_p, inv_keep,
        HAS_MASK, MASK_IS_BOOL, False, DROPOUT, FP32_DOT, KEY_BOUNDS, WRITE_DSCORES, RAW_SCORES, BLOCK_N, BLOCK_D,
        BLOCK_DV, HEAD_DIM, HEAD_DIM_V,
    )
    if IS_CAUSAL:
        dq = _attn_bwd_dq_inner(
            dq, q, do, row_max, log2_sum, corr, delta, offs_m, k_base, v_base, mask_base, dscores_base,
            diag_lo, diag_hi,
            stride_kn, stride_vn, stride_mm, stride_mn, q_len, k_len, qk_scale, seed, bh, dropout_p, inv_keep,
            HAS_MASK, MASK_IS_BOOL, True, DROPOUT, FP32_DOT, KEY_BOUNDS, WRITE_DSCORES, RAW_SCORES, BLOCK_N, BLOCK_D,
            BLOCK_DV, HEAD_DIM, HEAD_DIM_V,
        )
    dq = dq * _inv_keep(inv_keep, DROPOUT) * qk_scale  # as dK's: one factor after the other
    _store_tile(dq_ptr + b * stride_dqb + h * stride_dqh, offs_m, stride_dqm, dq, q_len, HEAD_DIM, BLOCK_D)


# ---------------------------------------------------------------------------------------------
# Launchers


def _block_dim(head_dim: int) -> int:
    # tl.dot needs every dimension >= 16; other head dims are padded up to a power of two and masked.
    return max(16, next_power_of_2(head_dim))


def _kv_group(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    """Query heads per key/value head (grouped-query attention; 1 without grouping): query head h
    reads key/value head h // group. Key and value have the same number of heads, a divisor of query's."""
    heads, kv_heads = q.shape[1], k.shape[1]
    if v.shape[1] == kv_heads == heads:
        return 1
    if v.shape[1] != kv_heads or kv_heads == 0 or heads % kv_heads:
        raise ValueError(
            f"key and value must have the same number of heads, a divisor of query's {heads}; "
            f"got key {list(k.shape)} and value {list(v.shape)}"
        )
    return heads // kv_heads


# The dK/dV kernel's programs a launch should have at least (per multiprocessor: two), before a
# key/value head's group of query heads is split across programs. Under the interpreter, on CPU
# tensors, a stand-in small enough that the tests' grouped shapes take the split path too.
_PROGRAMS_PER_SM = 2
_INTERPRETED_PROGRAMS = 4


def _dkdv_splits(q: torch.Tensor, batch: int, kv_heads: int, kv_group: int, k_len: int) -> int:
    """Chunks each key/value head's group of query heads is split into for the dK/dV kernel: 1
    (a program walks the whole group) unless the key/value heads alone give fewer programs than
    the device runs at once (multi-query attention at small batch), then as many as fill it, at
    most one query head each. Counted with 64-key tiles (the autotuner picks the real size)."""
    if kv_group == 1:
        return 1
    programs = batch * kv_heads * cdiv(k_len, 64)
    if q.device.type == "cuda":
        target = _PROGRAMS_PER_SM * torch.cuda.get_device_properties(q.device).multi_processor_count
    else:
        target = _INTERPRETED_PROGRAMS
    wanted = min(kv_group, max(1, cdiv(target, max(programs, 1))))
    chunk = cdiv(kv_group, wanted)
    return cdiv(kv_group, chunk)  # no empty chunk


def _mask_args(mask: torch.Tensor | None, like: torch.Tensor):
    """Pointer and [B, H, Lq, Lk] strides of a mask already expanded (stride 0 = broadcast)."""
    if mask is None:
        return like, (0, 0, 0, 0), False
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    return mask, tuple(mask.stride()), mask.dtype == torch.uint8


def _key_bounds(k_len: int) -> bool:
    """KEY_BOUNDS of the kernels that stream key tiles (forward, statistics, dQ): whether a key
    tile of any config may reach past k_len. Where none may, tiles skip the bounds pass."""
    return partial_tiles(k_len, _BLOCK_NS)


def _raw_scores(mask: torch.Tensor | None, scale: float) -> bool:
    """RAW_SCORES of the four attention kernels ("Units" in the module docstring): no floating mask, and a
    positive scale within [2^-100, 2^100], so that scale * log2(e) is finite and normal, and a
    difference of products beyond float32's range (which gives 0, not the exact exp2) is one whose
    exp2 underflows anyway."""
    return (mask is None or mask.dtype == torch.bool) and 2.0**-100 <= scale <= 2.0**100


def _common_meta(q: torch.Tensor, v: torch.Tensor, mask, scale: float, is_causal: bool, dropout_p: float) -> dict:
    # KEY_RANGE (_key_range): a boolean mask the same for every query of a head, e.g. a key padding mask.
    key_range = mask is not None and mask.dtype == torch.bool and (mask.stride(2) == 0 or mask.shape[2] == 1)
    return dict(
        HEAD_DIM=q.shape[-1], HEAD_DIM_V=v.shape[-1], BLOCK_D=_block_dim(q.shape[-1]), BLOCK_DV=_block_dim(v.shape[-1]),
        IS_CAUSAL=is_causal, HAS_MASK=mask is not None, KEY_RANGE=key_range, DROPOUT=dropout_p > 0.0,
        RAW_SCORES=_raw_scores(mask, scale),
        FP32_DOT=q.dtype == torch.float32, Q_BUCKET=size_bucket(q.shape[2], 4096),
        K_BUCKET=size_bucket(v.shape[2], 4096),
    )


def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    is_causal: bool,
    dropout_p: float,
    seed: torch.Tensor | int | None,
    return_keep_mask: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Returns (out [B, H, Lq, Dv] in the query's layout, stats [B, H, 2, Lq] float32, keep-mask or None).

    ``stats`` holds, per query row, the largest score (masked; a raw product q.k under
    ``RAW_SCORES``, else scaled: "Units" in the module docstring) and log2 of the row sum of the
    exponentials, kept apart for the backward; a row that sees no key has +inf and 0.

    ``mask`` must already be expanded to [B, H, Lq, Lk] (a view; zero strides broadcast).
    ``return_keep_mask`` also returns the dropout keep-mask the kernel drew (for tests).
    """
    batch, heads, q_len, _ = q.shape
    k_len = k.shape[2]
    _check_extents(batch, heads, q_len, k_len)
    out = empty_in_query_layout(q, v.shape[-1])
    stats = torch.empty(batch, heads, 2, q_len, device=q.device, dtype=torch.float32)
    write_keep = return_keep_mask and dropout_p > 0.0
    keep = torch.zeros(batch, heads, q_len, k_len, device=q.device, dtype=torch.int8) if write_keep else None
    mask_t, mask_strides, mask_is_bool = _mask_args(mask, q)
    seed_ptr = seed_pointer(seed, dropout_p, q)
    grid = lambda meta: (cdiv(q_len, meta["BLOCK_M"]) * batch * heads,)  # noqa: E731
    _attn_fwd_kernel[grid](
        q, k, v, mask_t, out, stats, keep if keep is not None else out,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *mask_strides, *out.stride()[:3],
        heads, _kv_group(q, k, v), q_len, k_len, scale, seed_ptr, as_float32(dropout_p), keep_scale(dropout_p),
        MASK_IS_BOOL=mask_is_bool, WRITE_KEEP=write_keep, KEY_BOUNDS=_key_bounds(k_len),
        **_common_meta(q, v, mask, scale, is_causal, dropout_p),
        **LAUNCH_OPTIONS,
    )
    return out, stats, (keep.bool() if keep is not None else None)


def _check_extents(batch: int, heads: int, q_len: int, k_len: int) -> None:
    """Refuses, before any allocation or launch, what the kernels cannot index or launch."""
    if max(q_len, k_len) > MAX_EXTENT:
        # Tile counts and loop counters are 32-bit in the kernels: a length within a tile of 2^31 wraps them.
        # (The backend choice rejects such lengths; a graph traced for a dynamic length meets them here.)
        raise ValueError(
            f"the Triton attention kernels take lengths up to {MAX_EXTENT}, got q_len {q_len}, k_len {k_len}"
        )
    # Each kernel's one-dimensional grid has a program per (tile, batch * head): counted with the smallest
    # tile any config has (32 rows), so that no tile choice of the autotuner can exceed it.
    programs = batch * heads * cdiv(max(q_len, k_len, 1), 32)
    if programs > MAX_GRID:
        raise ValueError(
            f"the Triton attention kernels launch a program per 32 rows of each of batch * heads = {batch * heads} "
            f"heads ({programs} for length {max(q_len, k_len)}), more than the {MAX_GRID} a launch takes: "
            "split the batch"
        )


def attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    stats: torch.Tensor,
    scale: float,
    is_causal: bool,
    dropout_p: float,
    seed: torch.Tensor | int | None,
    mask_needs_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Returns (dq, dk, dv, dscores); dscores is [B, H, Lq, Lk] float32 when ``mask_needs_grad``."""
    batch, heads, q_len, _ = q.shape
    k_len, kv_heads, kv_group = k.shape[2], k.shape[1], _kv_group(q, k, v)
    _check_extents(batch, heads, q_len, k_len)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    mask_t, mask_strides, mask_is_bool = _mask_args(mask, q)
    seed_ptr = seed_pointer(seed, dropout_p, q)
    meta = _common_meta(q, v, mask, scale, is_causal, dropout_p)
    common = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *mask_strides, *dout.stride()[:3])
    # The row statistics (corr, delta) from the very P and dP the gradient kernels use (module docstring),
    # [B * H * Lq] each, in one allocation.
    corr, delta = torch.empty(2, batch * heads * q_len, device=q.device, dtype=torch.float32).unbind(0)
    _attn_bwd_stats_kernel[lambda m: (cdiv(q_len, m["BLOCK_M"]) * batch * heads,)](
        q, k, v, mask_t, dout, stats, corr, delta, *common,
        heads, kv_group, q_len, k_len, scale, seed_ptr, as_float32(dropout_p), keep_scale(dropout_p),
        MASK_IS_BOOL=mask_is_bool, KEY_BOUNDS=_key_bounds(k_len), **meta,
        **LAUNCH_OPTIONS,
    )
    dscores = torch.zeros(batch, heads, q_len, k_len, device=q.device, dtype=torch.float32) if mask_needs_grad else None
    kv_splits = _dkdv_splits(q, batch, kv_heads, kv_group, k_len)
    if kv_splits > 1:
        # Each chunk of a group stores its float32 sum apart; summed over the chunks below, rounded once.
        dk_parts = torch.empty(batch, kv_heads * kv_splits, k_len, k.shape[-1], device=q.device, dtype=torch.float32)
        dv_parts = torch.empty(batch, kv_heads * kv_splits, k_len, v.shape[-1], device=q.device, dtype=torch.float32)
    else:
        dk_parts, dv_parts = dk, dv
    _attn_bwd_dkdv_kernel[lambda m: (cdiv(k_len, m["BLOCK_N"]) * batch * kv_heads * kv_splits,)](
        q, k, v, mask_t, dout, stats, corr, delta, dk_parts, dv_parts,
        *common, *dk_parts.stride()[:3], *dv_parts.stride()[:3],
        heads, kv_heads, kv_group, kv_splits, q_len, k_len, scale, seed_ptr, as_float32(dropout_p), keep_scale(dropout_p),
        MASK_IS_BOOL=mask_is_bool, **meta,
        **LAUNCH_OPTIONS,
    )
    if kv_splits > 1:
        for grad, parts in ((dk, dk_parts), (dv, dv_parts)):
            grad.copy_(parts.unflatten(1, (kv_heads, kv_splits)).sum(2))
    _attn_bwd_dq_kernel[lambda m: (cdiv(q_len, m["BLOCK_M"]) * batch * heads,)](
        q, k, v, mask_t, dout, stats, corr, delta, dq, dscores if dscores is not None else dq,
        *common, *dq.stride()[:3],
        heads, kv_group, q_len, k_len, scale, seed_ptr, as_float32(dropout_p), keep_scale(dropout_p),
        MASK_IS_BOOL=mask_is_bool, KEY_BOUNDS=_key_bounds(k_len), WRITE_DSCORES=mask_needs_grad, **meta,
        **LAUNCH_OPTIONS,
    )
    return dq, dk, dv, dscores
