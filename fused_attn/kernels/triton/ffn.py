"""GEMMs with the FFN's elementwise work fused into their prologues and epilogues, in Triton.

One tiled GEMM kernel ``C = A' @ B'`` serves the whole feed-forward block, forward and backward. The
activation ``act``, GELU or ReLU, is chosen by the ``approximate`` code ("none": erf GELU, "tanh":
tanh GELU, "relu"; a constexpr, each compiled on its own), and is what the GELU stages compute:

* epilogue ``bias``, ``bias + GELU`` (the pre-activation is stored alongside, for the backward,
  unless the call needs no gradient), ``bias + dropout`` or ``dGELU`` (``C = (A' @ B') * act'(P)``:
  the FFN's backward forms the gradient of its pre-activation in the GEMM that makes the hidden
  gradient, so act' is evaluated once per element, not in every tile of the two GEMMs after it);
* A prologue ``dGELU`` (``A' = A * act'(P)``, P the saved pre-activation, read tile by tile) or
  ``dropout`` (``A' = A * keep / (1 - p)``, the keep-mask regenerated from the seed);
* B prologue ``GELU`` (``B' = act(B)``: the backward recomputes the activation from the
  pre-activation instead of storing it);
* optional row sums of ``A'`` (a bias gradient) accumulated over the K loop, so the bias
  gradient costs no extra pass over memory.

Operands are addressed through strides, so transposes are free. Where every config's BLOCK_K
divides K (hidden sizes such as 768 and 3072: ``K_BOUNDS`` off, part of the tuning key) the K loop's
loads carry only the rows' and columns' bounds, the same at every step: in sm90 code the main loop of
a 128 x 128 x 64 tile with the bias + GELU epilogue is 147 instructions a step instead of 167, 177
instead of 206 without an epilogue. Tiles are visited in groups of
``GROUP_M`` rows of tiles so that neighbouring programs share B tiles in L2. Accumulation is
float32; float32 operands use IEEE products (not TF32), so float32 results match PyTorch's.
Dropout uses the package's Philox stream (``_dropout.uniform``) at element ``row * ld + col`` of the
dropped tensor, so forward and backward draw the same mask.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._env import MAX_EXTENT, triton_interpret_mode
from ._autotune import benchmark, pruner, size_bucket
from ._dropout import as_float32, dropout, keep_divisor, load_seed, seed_pointer
from ._grid import cdiv, partial_tiles
from ._options import LAUNCH_OPTIONS

SQRT_HALF = 0.7071067811865476
INV_SQRT_2PI = 0.3989422804014327
SQRT_2_OVER_PI = 0.7978845608028654

PROLOGUE_NONE, PROLOGUE_DGELU, PROLOGUE_DROPOUT, PROLOGUE_GELU = 0, 1, 2, 3
EPILOGUE_NONE, EPILOGUE_BIAS, EPILOGUE_BIAS_GELU, EPILOGUE_BIAS_DROPOUT, EPILOGUE_DGELU = 0, 1, 2, 3, 4
# The activation of the GELU prologues and epilogues (the kernel's ACTIVATION) by ``approximate`` code.
ACTIVATION_GELU, ACTIVATION_GELU_TANH, ACTIVATION_RELU = 0, 1, 2
ACTIVATIONS = {"none": ACTIVATION_GELU, "tanh": ACTIVATION_GELU_TANH, "relu": ACTIVATION_RELU}


# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps): tile shapes from the Triton matmul tutorial's
# H100/A100 sweep, large 128x128/128x256 tiles with 3-4 stages for big GEMMs (the FFN's), smaller
# ones for skinny shapes. tests/test_triton_gpu_tiles.py runs each of them.
GEMM_TILES = [
    (128, 128, 64, 4, 4), (128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 32, 4, 4),
    (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 32, 4, 4), (32, 64, 32, 5, 2),
]


def _configs(interpret: bool | None = None) -> list[triton.Config]:
    """The GPU's candidates (:data:`GEMM_TILES`); the autotuner keys on the shape (the token
    dimension, M or K, by power-of-two bucket: see gemm) and the prologues and epilogue. Under the
    interpreter (``interpret``, default: whether this process runs it) one small tile keeps CPU
    tests fast; with autotuning off, the first that fits the device's shared memory (the first,
    where it does: a safe all-rounder) is used."""
    if triton_interpret_mode() if interpret is None else interpret:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_stages=s, num_warps=w)
        for m, n, k, s, w in GEMM_TILES
    ]


@triton.jit
def _tanh_parts(u):
    # (1 + tanh(u), 1 - tanh(u)^2) from one exponential, free of the cancellation 1 + t and
    # 1 - t * t suffer where tanh(u) is near -1 or 1 (they lost most of their digits for
    # x < -4 in the tanh GELU): with E = exp(2u) and s = 2 / (E + 1) = 1 - t, 1 + t is 2 - s for
    # u >= 0 and E * s below, and 1 - t^2 = s * (1 + t). u is capped at 40 inside the exponential
    # (no overflow, no inf * 0 in the branch not taken): past it 1 + t rounds to 2, and 1 - t^2
    # (below 1e-34) is 0, as the gradient, which multiplies it by a square of x, needs.
    e = tl.exp(2.0 * tl.minimum(u, 40.0))
    s = tl.math.div_rn(2.0, e + 1.0)
    one_plus_t = tl.where(u >= 0.0, 2.0 - s, e * s)
    return one_plus_t, tl.where(u > 40.0, 0.0, s * one_plus_t)


@triton.jit
def _normal_parts(x):
    # (Phi(x), exp(-x^2 / 2)): the normal cdf from erfc, to a few ulps relative everywhere, where
    # 1 + erf(x / sqrt(2)) loses the negative tail to cancellation (no correct digit below x = -5),
    # and the density's exponential, both from one exponential: the scheme and fit of the cpu
    # kernels' normal_parts (csrc/cpu/ffn.cpp, whose comment gives the fit's error). With
    # a = |x| / sqrt(2) and t = 1 / (1 + a / 2), erfc(a) = t exp(-a^2) Q(t), Q of degree 8 fitted
    # for |x| in [1, 12.6]; Phi = erfc(a) / 2 below 0 and 1 - erfc(a) / 2 above, neither of which
    # cancels; for |x| <= 1, 1/2 + x R(x^2).
    # exp(-x^2 / 2) takes x^2 as hi + lo (an FMA gives lo exactly on a GPU; the interpreter's fma
    # rounds twice, leaving lo 0): exp(-hi / 2) (1 - lo / 2).
    # Past x^2 / 2 = 80 (|x| > 12.6, and +-inf, whose lo is NaN) Phi is 0 or 1 and the density 0;
    # NaN stays NaN.
    hi = x * x
    lo = tl.fma(x, x, -hi)
    half_hi = 0.5 * hi
    far = half_hi > 80.0
    t = tl.math.div_rn(1.0, 0.5 * (tl.abs(x) * 0.7071067811865476) + 1.0)
    q = -5.8046389371e-02
    q = q * t + 2.8627005219e-01
    q = q * t - 4.9919107556e-01
    q = q * t + 2.9719007015e-01
    q = q * t - 4.1489291936e-02
    q = q * t + 2.0911949873e-01
    q = q * t + 2.4153253436e-01
    q = q * t + 2.8257668018e-01
    q = q * t + 2.8207594156e-01
    density = tl.exp(-tl.where(far, 80.0, half_hi)) * (1.0 - 0.5 * lo)
    half_erfc = 0.5 * t * density * q
    negative = x < 0.0
    cdf = tl.where(negative, half_erfc, 1.0 - half_erfc)
    # |x| <= 1: Phi = 1/2 + x R(x^2).
    r = -7.65420646e-06
    r = r * hi + 1.13486363e-04
    r = r * hi - 1.18632999e-03
    r = r * hi + 9.97332297e-03
    r = r * hi - 6.64903596e-02
    r = r * hi + 3.98942292e-01
    cdf = tl.where(hi <= 1.0, x * r + 0.5, cdf)
    cdf = tl.where(far, tl.where(negative, 0.0, 1.0), cdf)
    return cdf, tl.where(far, 0.0, density)


@triton.jit
def _gelu(x, APPROX_TANH: tl.constexpr):
    if APPROX_TANH:
        one_plus_t, _ = _tanh_parts(0.7978845608028654 * (x + 0.044715 * x * x * x))
        return 0.5 * x * one_plus_t
    cdf, _ = _normal_parts(x)
    return x * cdf


@triton.jit
def _gelu_grad(x, APPROX_TANH: tl.constexpr):
    if APPROX_TANH:
        one_plus_t, one_minus_t2 = _tanh_parts(0.7978845608028654 * (x + 0.044715 * x * x * x))
        # Where 1 - t^2 is 0 the second term is too, even where x * x overflows (|x| > 1.8e19:
        # 0 * inf would be NaN); x * 0 keeps torch's NaN at x = +-inf.
        right = 0.5 * x * one_minus_t2 * 0.7978845608028654 * (1.0 + 0.134145 * x * x)
        return 0.5 * one_plus_t + tl.where(one_minus_t2 > 0.0, right, x * 0.0)
    cdf, density = _normal_parts(x)
    return cdf + x * (density * 0.3989422804014327)


@triton.jit
def _activation(x, ACTIVATION: tl.constexpr):
    # act(x) of float32 x (ACTIVATIONS). ReLU as torch's: x unless x < 0, so NaN stays NaN (where
    # tl.maximum could drop it).
    if ACTIVATION == 2:
        return tl.where(x < 0.0, 0.0, x)
    return _gelu(x, ACTIVATION == 1)


@triton.jit
def _activation_grad(g, x, ACTIVATION: tl.constexpr):
    # The gradient g of act(x) taken back through it, float32, as torch's backward forms it: the
    # GELU's g * gelu'(x); ReLU's threshold_backward, 0 where x <= 0 (x = 0 included) and g elsewhere
    # (NaN x included), a select, so that an infinite or NaN g where x <= 0 gives 0, not NaN.
    if ACTIVATION == 2:
        return tl.where(x <= 0.0, 0.0, g)
    return g * _gelu_grad(x, ACTIVATION == 1)


# The K tiles of every config, the GPU's and the interpreter's.
_BLOCK_KS = sorted({c.kwargs["BLOCK_K"] for interpret in (False, True) for c in _configs(interpret)})


def _k_bounds(k: int) -> bool:
    """K_BOUNDS: whether a K tile of any config may reach past ``k``. Where none may, the loads skip
    K's bounds."""
    return partial_tiles(k, _BLOCK_KS)


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K_BUCKET", "A_PROLOGUE", "B_PROLOGUE", "EPILOGUE",
                                          "K_BOUNDS"],
                 do_bench=benchmark, prune_configs_by={"early_config_prune": pruner(lambda: _gemm_kernel)})
@triton.jit(do_not_specialize=["seed_ptr", "M_BUCKET", "K_BUCKET"])
def _gemm_kernel(
    a_ptr, b_ptr, c_ptr, aux_ptr, bias_ptr, pre_ptr, rowsum_ptr,
    M, N, K, M_BUCKET, K_BUCKET,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    rng_stride_m, rng_stride_k, seed_ptr, dropout_p, keep_prob,
    A_PROLOGUE: tl.constexpr, B_PROLOGUE: tl.constexpr, EPILOGUE: tl.constexpr, ACTIVATION: tl.constexpr,
    ROW_SUMS: tl.constexpr, FP32_DOT: tl.constexpr, STORE_PRE: tl.constexpr, K_BOUNDS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    DROPOUT: tl.constexpr = A_PROLOGUE == 2 or EPILOGUE == 3
    seed = load_seed(seed_ptr, DROPOUT)
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.maximum(tl.cdiv(N, BLOCK_N), 1)  # N == 0: one column of programs, for the row sums
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_rows
    pid_n = (pid % group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = offs_m[:, None].to(tl.int64)
    cols = offs_n[None, :].to(tl.int64)
    in_m = offs_m[:, None] < M
    in_n = offs_n[None, :] < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    row_sums = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        # Without K_BOUNDS (BLOCK_K divides K) every K tile is whole: the loads' masks are the rows'
        # and columns' alone, the same at every step.
        if K_BOUNDS:
            a_mask = in_m & (ks[None, :] < K)
            b_mask = (ks[:, None] < K) & in_n
        else:
            a_mask = in_m  # broadcast by the loads over the tile's K columns / rows
            b_mask = in_n
        a_offs = rows * stride_am + ks[None, :].to(tl.int64) * stride_ak
        a = tl.load(a_ptr + a_offs, mask=a_mask, other=0.0)
        if A_PROLOGUE == 1:
            pre = tl.load(aux_ptr + a_offs, mask=a_mask, other=0.0).to(tl.float32)
            a = _activation_grad(a.to(tl.float32), pre, ACTIVATION).to(a_ptr.dtype.element_ty)
        elif A_PROLOGUE == 2:
            element = rows * rng_stride_m + ks[None, :].to(tl.int64) * rng_stride_k
            a = dropout(a.to(tl.float32), seed, element, dropout_p, keep_prob).to(a_ptr.dtype.element_ty)
        if ROW_SUMS:
            row_sums += tl.sum(a.to(tl.float32), axis=1)
        b = tl.load(b_ptr + ks[:, None].to(tl.int64) * stride_bk + cols * stride_bn, mask=b_mask, other=0.0)
        if B_PROLOGUE == 3:
            b = _activation(b.to(tl.float32), ACTIVATION).to(b_ptr.dtype.element_ty)
        if FP32_DOT:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)

    c_mask = in_m & in_n
    c_offs = rows * stride_cm + cols * stride_cn
    if EPILOGUE >= 1:
        if bias_ptr is not None:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if EPILOGUE == 2:
        # The activation is computed from the pre-activation rounded to the storage dtype, the value
        # the backward reads; it is stored for the backward unless STORE_PRE is off (inference).
        pre = acc.to(c_ptr.dtype.element_ty)
        if STORE_PRE:
            tl.store(pre_ptr + c_offs, pre, mask=c_mask)
        acc = _activation(pre.to(tl.float32), ACTIVATION)
    elif EPILOGUE == 3:
        acc = dropout(acc, seed, rows * N + cols, dropout_p, keep_prob)
    elif EPILOGUE == 4:
        pre = tl.load(aux_ptr + c_offs, mask=c_mask, other=0.0).to(tl.float32)
        acc = _activation_grad(acc, pre, ACTIVATION)
    tl.store(c_ptr + c_offs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)
    if ROW_SUMS:
        if pid_n == 0:
            tl.store(rowsum_ptr + offs_m, row_sums, mask=offs_m < M)


def gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    *,
    a_prologue: int = PROLOGUE_NONE,
    b_prologue: int = PROLOGUE_NONE,
    epilogue: int = EPILOGUE_NONE,
    aux: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    pre: torch.Tensor | None = None,
    row_sums: torch.Tensor | None = None,
    approximate: str = "none",
    seed: torch.Tensor | int | None = None,
    dropout_p: float = 0.0,
    rng_strides: tuple[int, int] = (0, 0),
) -> torch.Tensor:
    """``out = epilogue(a' @ b')`` for 2-D views a [M, K], b [K, N], out [M, N] (any strides).

    ``aux`` is the pre-activation read by the dGELU prologue (a's shape and strides) or epilogue
    (out's); ``approximate`` the activation of the GELU prologues and epilogue: "none" (erf GELU),
    "tanh" (tanh GELU) or "relu";
    ``rng_strides`` map (row, col) of ``a`` to the dropout element index for the dropout
    prologue; ``row_sums`` ([M] float32) receives the row sums of ``a'``.
    """
    activation = ACTIVATIONS.get(approximate) if isinstance(approximate, str) else None
    if activation is None:
        raise ValueError(f'approximate must be "none", "tanh" or "relu", got "{approximate}"')
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or (N == 0 and row_sums is None):
        return out  # with N == 0 the kernel still runs for the row sums (the bias gradient)
    if max(M, N, K) > MAX_EXTENT:
        # Tile counts and the K loop are 32-bit in the kernel: a dim within a tile of 2^31 wraps them.
        raise ValueError(f"the Triton FFN GEMM takes dims up to {MAX_EXTENT}, got [{M}, {K}] x [{K}, {N}]")
    # The token count is M (forward, input gradient) or K (weight gradients): keyed by power-of-two
    # bucket, a batch of a new length reuses the tuning of its bucket instead of timing every config
    # again (N is always a feature size). The buckets are plain ints the kernel ignores.
    m_bucket, k_bucket = size_bucket(M, 16384), size_bucket(K, 16384)
    if epilogue == EPILOGUE_DGELU and (aux is None or aux.shape != out.shape or aux.stride() != out.stride()):
        raise ValueError("the dGELU epilogue reads aux at out's offsets: aux must have out's shape and strides")
    if epilogue == EPILOGUE_DGELU and bias is not None:
        raise ValueError("the dGELU epilogue takes no bias (it would be added before the act' product)")
    # The autotuner keys on every tensor argument's dtype: a call without a pre-activation to store
    # (inference) passes the output in its place, so that it shares the tuning (the config, hence the
    # summation order and the bits) of the call that stores one.
    store_pre = pre is not None
    if epilogue == EPILOGUE_BIAS_GELU and pre is None:
        pre = out
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * max(cdiv(N, meta["BLOCK_N"]), 1),)  # noqa: E731
    _gemm_kernel[grid](
        a, b, out, aux, bias, pre, row_sums,
        M, N, K, m_bucket, k_bucket, a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        rng_strides[0], rng_strides[1], seed_pointer(seed, dropout_p, out), as_float32(dropout_p), keep_divisor(dropout_p),
        A_PROLOGUE=a_prologue, B_PROLOGUE=b_prologue, EPILOGUE=epilogue, ACTIVATION=activation,
        ROW_SUMS=row_sums is not None, FP32_DOT=a.dtype == torch.float32, STORE_PRE=store_pre,
        K_BOUNDS=_k_bounds(K),
        **LAUNCH_OPTIONS,
    )
    return out


def linear_gelu_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, approximate: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, in], weight [out, in] -> (act(x @ weight^T + bias), pre-activation), act the GELU
    (``approximate`` "none" or "tanh") or ReLU ("relu")."""
    rows, out_features = x.shape[0], weight.shape[0]
    out = x.new_empty(rows, out_features)
    pre = x.new_empty(rows, out_features)
    gemm(x, weight.t(), out, epilogue=EPILOGUE_BIAS_GELU, bias=bias, pre=pre, approximate=approximate)
    return out, pre


def linear_gelu_inference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, approximate: str
) -> torch.Tensor:
    """linear_gelu_fwd's output alone (the same bits), without the pre-activation tensor."""
    out = x.new_empty(x.shape[0], weight.shape[0])
    gemm(x, weight.t(), out, epilogue=EPILOGUE_BIAS_GELU, bias=bias, approximate=approximate)
    return out


def linear_gelu_bwd(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    pre: torch.Tensor,
    approximate: str,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of linear_gelu_fwd. dGELU (act') is applied as the prologue of both gradient GEMMs
    (no grad-pre-activation tensor is written) and the bias gradient is the row sums of the
    weight-gradient GEMM's A operand."""
    return _input_weight_grads(grad_out, x, weight, output_mask, pre=pre, approximate=approximate)


def linear_grads(
    grad_pre: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, output_mask: list[bool]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_input, grad_weight, grad_bias) of ``x @ weight^T + bias`` given the gradient of its
    result, as selected by output_mask (the bias gradient from the weight-gradient GEMM's row sums)."""
    return _input_weight_grads(grad_pre, x, weight, output_mask)


def _input_weight_grads(grad, x, weight, output_mask, pre=None, approximate="none"):
    # grad is the gradient of the activation's output when pre is given (dGELU applied as each GEMM's
    # A prologue), else of the pre-activation itself.
    prologue = PROLOGUE_DGELU if pre is not None else PROLOGUE_NONE
    need_dx, need_dw, need_db = output_mask
    dx = x.new_empty(0)
    dw = x.new_empty(0)
    db = x.new_empty(0)
    if need_dx:
        dx = gemm(grad, weight, torch.empty_like(x), a_prologue=prologue, aux=pre, approximate=approximate)
    if need_dw or need_db:
        # dW [out, in] = dPre^T [out, rows] @ x [rows, in]; row sums of dPre^T are the bias gradient.
        sums = torch.empty(weight.shape[0], device=x.device, dtype=torch.float32) if need_db else None
        dw_buf = torch.empty_like(weight) if need_dw else weight.new_empty(weight.shape)
        gemm(grad.t(), x, dw_buf, a_prologue=prologue, aux=None if pre is None else pre.t(), row_sums=sums,
             approximate=approximate)
        if need_dw:
            dw = dw_buf
        if need_db:
            db = sums.to(x.dtype)
    return dx, dw, db
