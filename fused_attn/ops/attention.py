"""``fused_attn.scaled_dot_product_attention``: fused softmax attention, forward and backward.

Layers, bottom up: the Triton kernels (``fused_attn/kernels/triton/attention.py``) behind the
custom ops ``fused_attn::triton_attention_fwd/bwd`` (fake kernels and autograd registered here),
and the extension's ``fused_attn::attention_fwd/bwd`` (CPU and CUDA kernels; fake kernels here,
autograd in csrc/autograd.cpp); the public function offers a plain call to the extension's C++
entry (csrc/fast.cpp) and otherwise validates, expands the mask to [B, H, Lq, Lk] as a zero-stride
view (never a copy) and picks the backend.
"""

from __future__ import annotations

import math

import torch

from .. import _extension, reference
from ..backends import MAX_EXTENT, Inputs, Support, fast_entry, fast_path_open, is_empty, register_op, select
from ..kernels.layout import as_query_layout, empty_in_query_layout
from ..reference.attention import causal_keep
from ._autocast import LOWER_PRECISION, autocast_inputs
from ._random import draw_seed, kernel_seed
from . import _op_checks as checks, _second_order as _second_order_grads
from ._registry import interpreter_serialized, register_native_pair, register_pair
from ._validate import (
    KERNEL_DTYPES, broadcast_mask, check_bool, check_dropout_p, check_same_device, check_tensor, dtype_name,
    is_finite_number, transform_features, under_transform,
)

# Backends whose kernels read grouped key/value heads in place (enable_gqa); the reference is given
# key and value repeated to the query's heads.
NATIVE_GQA = ("triton", "cpu", "cuda")
# Head dims a kernel tile holds: padded (to a power of two >= 16 in Triton; to 32, 64, 96, 128 or 256
# in CUDA C++) and masked, up to 256.
HEAD_DIM_LIMITS = {"head_dim": (1, 256), "head_dim_v": (1, 256)}
GPU_LIMITS = {**HEAD_DIM_LIMITS, "q_len": (None, MAX_EXTENT), "k_len": (None, MAX_EXTENT)}
# The CUDA C++ kernels multiply on tensor cores (mma.sync with fp16/bf16 operands, cp.async): sm80+,
# no float32 (which the policy then gives to Triton).
CUDA_DTYPES = (torch.float16, torch.bfloat16)
# Shared memory per block that the CUDA C++ kernels need for head dims over 128 (the backward's dK/dV
# and dQ kernels at padded head dim 256: bwd_dkdv_smem_bytes<256> in csrc/cuda/attention.cu). Up to
# head dim 128 they need at most 68 KB, which every sm80+ GPU offers; this much only the data-centre
# parts do (A100 163 KB, H100 227 KB), not sm86/sm89/sm120 (99 KB), where the policy gives such head
# dims to Triton rather than run a forward whose backward could not.
CUDA_WIDE_HEAD_SMEM_BYTES = 135168


def _cuda_shared_memory_reasons(inputs: Inputs) -> list[str]:
    head_dim = max(inputs.features.get("head_dim", 0), inputs.features.get("head_dim_v", 0))
    if head_dim <= 128:
        return []
    props = torch.cuda.get_device_properties(inputs.device)
    offered = getattr(props, "shared_memory_per_block_optin", None)
    if offered is None or offered >= CUDA_WIDE_HEAD_SMEM_BYTES:
        return []
    return [
        f"head dims over 128 need {CUDA_WIDE_HEAD_SMEM_BYTES} bytes of shared memory per block; "
        f"{props.name} offers {offered}"
    ]


SPEC = register_op(
    "scaled_dot_product_attention",
    [
        Support(
            "cuda", devices=("cuda",), dtypes=CUDA_DTYPES, limits=GPU_LIMITS, min_compute_capability=(8, 0),
            check=_cuda_shared_memory_reasons, native_op="attention_fwd",
            check_doc="head dims over 128 where the GPU has 132 KiB of shared memory per block",
        ),
        Support("triton", devices=("cuda", "cpu"), dtypes=KERNEL_DTYPES, limits=GPU_LIMITS),
        Support("cpu", devices=("cpu",), dtypes=KERNEL_DTYPES, limits=HEAD_DIM_LIMITS, native_op="attention_fwd"),
        Support("reference", devices=None, dtypes=KERNEL_DTYPES + (torch.float64,)),
    ],
)


# The op named by the Triton ops' errors (kernel_seed).
_TRITON_OP = "fused_attn::triton_attention"


@torch.library.custom_op("fused_attn::triton_attention_fwd", mutates_args=())
@interpreter_serialized
def _triton_fwd(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    scale: float,
    is_causal: bool,
    dropout_p: float,
    seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels.triton import attention as kernels

    checks.attention_inputs(query, key, value, attn_mask, scale, dropout_p, GPU_LIMITS)
    out, stats, _ = kernels.attention_fwd(
        query, key, value, attn_mask, scale, is_causal, dropout_p, kernel_seed(seed, dropout_p, query, _TRITON_OP)
    )
    return out, stats


@torch.library.custom_op("fused_attn::triton_attention_bwd", mutates_args=())
@interpreter_serialized
def _triton_bwd(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    stats: torch.Tensor,
    scale: float,
    is_causal: bool,
    dropout_p: float,
    seed: torch.Tensor | None,
    mask_needs_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels.triton import attention as kernels

    checks.attention_inputs(query, key, value, attn_mask, scale, dropout_p, GPU_LIMITS)
    checks.attention_grads(grad_out, query, value, attn_mask, stats, mask_needs_grad)
    dq, dk, dv, dscores = kernels.attention_bwd(
        grad_out, query, key, value, attn_mask, stats, scale, is_causal, dropout_p,
        kernel_seed(seed, dropout_p, query, _TRITON_OP), mask_needs_grad,
    )
    return dq, dk, dv, dscores if dscores is not None else query.new_empty(0)


def _fake_fwd_for(stats_shape):
    def fake_fwd(query, key, value, attn_mask, scale, is_causal, dropout_p, seed):
        out = empty_in_query_layout(query, value.shape[-1])
        return out, query.new_empty(*stats_shape(query), dtype=torch.float32)

    return fake_fwd


# The row statistics the forward saves for its backward: the Triton and CUDA kernels keep the row
# max and log2 of the row sum apart, [B, H, 2, Lq] (see fused_attn/kernels/triton/attention.py);
# the C++ CPU kernel the log-sum-exp [B, H, Lq], which its backward's renormalisation makes exact.
def _split_stats(query):
    return (*query.shape[:2], 2, query.shape[2])


def _native_stats(query):
    return query.shape[:3] if query.device.type == "cpu" else _split_stats(query)


def _fake_bwd(grad_out, query, key, value, attn_mask, stats, scale, is_causal, dropout_p, seed, mask_needs_grad):
    dscores = (
        query.new_empty(*query.shape[:3], key.shape[2], dtype=torch.float32) if mask_needs_grad else query.new_empty(0)
    )
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value), dscores


def _setup_context(ctx, inputs, output):
    query, key, value, attn_mask, scale, is_causal, dropout_p, seed = inputs
    # The output is not kept: every backward forms its row terms from the statistics (corr, delta).
    ctx.save_for_backward(query, key, value, attn_mask, output[1], seed)
    ctx.scale, ctx.is_causal, ctx.dropout_p = scale, is_causal, dropout_p
    ctx.set_materialize_grads(False)  # the statistics are an output only to be saved: no zero gradient for it


def _autograd_for(bwd_op):
    def backward(ctx, grad_out, _grad_stats):
        query, key, value, attn_mask, stats, seed = ctx.saved_tensors
        mask_needs_grad = bool(ctx.needs_input_grad[3])
        dq, dk, dv, dmask = bwd_op(
            _no_last_dim_stride(grad_out), query, key, value, attn_mask, stats,
            ctx.scale, ctx.is_causal, ctx.dropout_p, seed, mask_needs_grad,
        )
        return dq, dk, dv, (dmask.to(attn_mask.dtype) if mask_needs_grad else None), None, None, None, None

    return backward


def _second_order(ctx, grad_out, _grad_stats):
    query, key, value, attn_mask, _, seed = ctx.saved_tensors
    grads = _second_order_grads.attention(
        (grad_out, query, key, value, attn_mask, seed), (ctx.scale, ctx.is_causal, ctx.dropout_p),
        ctx.needs_input_grad[:4],
    )
    dmask = grads[3]
    return (*grads[:3], None if dmask is None else dmask.to(attn_mask.dtype), None, None, None, None)


def _register(fwd: str, bwd: str, stats_shape) -> object:
    return register_pair(
        fwd, bwd, fake_fwd=_fake_fwd_for(stats_shape), fake_bwd=_fake_bwd, setup_context=_setup_context,
        backward_for=_autograd_for, second_order=_second_order,
    )


_FWD_OPS = {"triton": _register("triton_attention_fwd", "triton_attention_bwd", _split_stats)}
if _extension.loaded():
    _FWD_OPS["cpu"] = _FWD_OPS["cuda"] = register_native_pair(
        "attention_fwd", "attention_bwd", fake_fwd=_fake_fwd_for(_native_stats), fake_bwd=_fake_bwd
    )

# The C++ entry for the plain call (fused_attn.backends.fast_entry; csrc/fast.cpp), or None.
_FAST = fast_entry("scaled_dot_product_attention")


class RowShift(torch.autograd.Function):
    """``out`` unchanged, and a zero gradient for ``bias``: a bias of key size 1 (per query, per
    head or a scalar) adds the same value to every score of a row, which softmax ignores, so its
    gradient is exactly 0 (``fused_attn.softmax`` applies it too, to a mask of size 1 along
    ``dim``). The kernels get it detached: computed, that zero would be a sum of Lk terms that
    cancel only to rounding, and it would cost an Lq x Lk buffer. Under forward-mode
    AD or a torch.func transform (served by the reference, plain differentiable torch) the bias is
    taken as it is: this function has no forward formula, as Dynamo traces none that has one."""

    @staticmethod
    def forward(out, bias):
        return out.view_as(out)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.bias_meta = (inputs[1].shape, inputs[1].dtype, inputs[1].device)

    @staticmethod
    def backward(ctx, grad_out):
        shape, dtype, device = ctx.bias_meta
        return grad_out, torch.zeros(shape, dtype=dtype, device=device)


def _expand_mask(attn_mask: object, shape: tuple[int, int, int, int], query: torch.Tensor) -> torch.Tensor | None:
    if attn_mask is None:
        return None
    return broadcast_mask(attn_mask, "attn_mask", query, "query", shape, "[batch, heads, q_len, k_len] =")


def _is_causal_bias(attn_mask: object) -> bool:
    """Whether ``attn_mask`` is one of torch's causal variants (torch.nn.attention.bias:
    causal_upper_left / causal_lower_right), asked without importing that module for a plain tensor
    or None (the call's first test): it imports torch._dynamo, half a second at the package's
    import. A user who made one has imported it."""
    try:
        from torch.nn.attention.bias import CausalBias
    except ImportError:  # pragma: no cover - torch without them
        return False
    return isinstance(attn_mask, CausalBias)


def _from_causal_bias(bias, query, key, value, is_causal: object, enable_gqa: bool):
    """The ``(attn_mask, is_causal)`` that gives what a :class:`torch.nn.attention.bias.CausalBias`
    asks for, checked against the inputs (torch's SDPA takes one without comparing its lengths).
    Top-left alignment, and bottom-right where the lengths are equal (the same mask), is the causal
    flag: the kernels skip the tiles above the diagonal. Bottom-right with Lq != Lk (query i sees
    keys j <= i + Lk - Lq, as in decoding with a key/value cache) is a [Lq, Lk] boolean mask read
    with zero batch and head strides: with Lq < Lk it hides at most the last Lq x Lq triangle, so
    little is left to skip."""
    check_bool(is_causal, "is_causal")
    if is_causal:
        raise ValueError("is_causal must be False when attn_mask is a CausalBias (the bias is the causal mask)")
    _validate(query, key, value, enable_gqa)
    q_len, k_len = query.shape[2], key.shape[2]
    if (bias.seq_len_q, bias.seq_len_kv) != (q_len, k_len):
        raise ValueError(
            f"attn_mask is a CausalBias for {bias.seq_len_q} queries and {bias.seq_len_kv} keys; "
            f"query has {q_len} and key {k_len}"
        )
    from torch.nn.attention.bias import CausalVariant

    if bias.variant == CausalVariant.UPPER_LEFT or q_len == k_len:
        return None, True
    if bias.variant != CausalVariant.LOWER_RIGHT:
        raise ValueError(f"attn_mask is a CausalBias of unknown variant {bias.variant!r}")
    return causal_keep(q_len, k_len, query.device, diagonal=k_len - q_len), False


def _validate(query, key, value, enable_gqa: bool = False) -> None:
    shapes = {}
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(t, name)
        shapes[name] = shape = t.shape  # one torch.Size per tensor: each .shape builds a new one
        if len(shape) != 4:
            raise ValueError(f"{name} must be 4-D [batch, heads, seq, head_dim], got shape {list(shape)}")
    q_shape, dtype = shapes["query"], query.dtype
    for name, t in (("key", key), ("value", value)):
        if t.dtype != dtype:
            raise TypeError(f"{name} dtype {dtype_name(t.dtype)} does not match query dtype {dtype_name(dtype)}")
        check_same_device(t, name, query, "query")
        shape = shapes[name]
        divides = shape[1] > 0 and q_shape[1] % shape[1] == 0
        if shape[0] != q_shape[0] or (shape[1] != q_shape[1] and not (enable_gqa and divides)):
            hint = (" (with enable_gqa=True, query heads must be a multiple of key and value heads)" if enable_gqa
                    else " (grouped-query attention needs enable_gqa=True)" if shape[0] == q_shape[0] and divides
                    else "")
            raise ValueError(
                f"{name} batch and heads {list(shape[:2])} do not match query's {list(q_shape[:2])}{hint}"
            )
    if shapes["key"][3] != q_shape[3]:
        raise ValueError(f"key head_dim {shapes['key'][3]} does not match query head_dim {q_shape[3]}")
    if shapes["value"][2] != shapes["key"][2]:
        raise ValueError(f"value length {shapes['value'][2]} does not match key length {shapes['key'][2]}")


def repeat_kv_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Key or value [B, Hkv, L, D] of grouped-query attention repeated to ``heads`` heads (head h
    is t's head h // (heads / Hkv)), a copy; ``t`` itself when it has them already. For code that
    indexes key/value by the query's head (repeat_interleave, not expand)."""
    return t if t.shape[1] == heads else t.repeat_interleave(heads // t.shape[1], dim=1)


def _check_scale(scale: object, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim) if head_dim else 1.0
    if not is_finite_number(scale):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")
    return float(scale)


def _no_last_dim_stride(t: torch.Tensor) -> torch.Tensor:
    # Kernels take any batch/head/sequence strides but need unit stride along head_dim.
    return t if t.stride(-1) == 1 else t.contiguous()


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Fused ``softmax(query @ key^T * scale + mask) @ value``, as torch's SDPA.

    Shapes: query [B, H, Lq, D], key [B, Hkv, Lk, D], value [B, Hkv, Lk, Dv] (Hkv = H unless
    grouped, below; Lq and Lk may differ: cross-attention); any strides. The output [B, H, Lq, Dv]
    is laid out in memory as the query is (as torch's SDPA does): for heads split off a [B, Lq, H *
    D] projection, merging them back, ``out.transpose(1, 2).reshape(B, Lq, H * Dv)``, is a view, not
    a copy. ``attn_mask``: bool (True = attend) or floating (added to the scores), broadcastable to
    [B, H, Lq, Lk] and read through its strides (a [B, 1, 1, Lk] padding mask is never expanded in
    memory); a floating mask that requires grad receives its gradient. ``is_causal``: query i
    attends to keys j <= i (top-left aligned, as PyTorch); may be combined with ``attn_mask``.
    ``attn_mask`` may instead be torch's ``causal_upper_left(Lq, Lk)`` or ``causal_lower_right(Lq,
    Lk)`` (``torch.nn.attention.bias``; is_causal False): the lower-right one lets query i see keys
    j <= i + Lk - Lq (the last query sees every key, as when decoding with a key/value cache).
    ``scale`` defaults to 1/sqrt(D). ``dropout_p`` drops attention probabilities with a
    counter-based RNG seeded from torch's default generator (``torch.manual_seed`` reproduces it). A
    query whose every key is masked gets 0 and zero gradients. ``enable_gqa=True`` (grouped-query
    attention, as torch): key and value may have fewer heads than query, each a divisor of query's;
    query head h reads key/value head h // (H / Hkv). The kernels read the grouped key and value in
    place (nothing is repeated in memory); each key/value head's gradient is the sum over its group
    (the cpu and Triton kernels sum in float32 and round once; the cuda backend stores
    per-query-head dK/dV in a [B, H, Lk, D] buffer of the input dtype and sums it after its kernel).
    The reference, and key and value with different head counts, get them repeated to H heads first
    (a copy of K and V, never of the scores). float16, bfloat16 and float32 run fused, head dims up
    to 256 (the cuda backend: float16 and bfloat16 on compute capability 8.0+; float32 goes to
    Triton).

    Raises ``TypeError``/``ValueError`` naming the argument for a wrong rank, mismatched
    batch/heads/head_dim/lengths, dtypes or devices, a mask that does not broadcast, ``dropout_p``
    outside [0, 1] (1 drops every probability: the reference's zero output, no kernel);
    :class:`~fused_attn.BackendNotSupportedError` when a named backend cannot serve.

    Under ``torch.autocast`` query, key, value and a floating mask are cast to the autocast dtype,
    as torch's SDPA casts them. Forward and backward are deterministic (dQ has its own pass, no
    atomics); the cpu backend's bits depend on the thread count, Triton's on the autotuned tile
    configuration (README, "Determinism").
    """
    if attn_mask is not None and type(attn_mask) is not torch.Tensor and _is_causal_bias(attn_mask):
        attn_mask, is_causal = _from_causal_bias(attn_mask, query, key, value, is_causal, enable_gqa)
    if backend is None and _FAST is not None and fast_path_open():
        out = _FAST(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        if out is not None:
            return out
    query, key, value, attn_mask = autocast_inputs(LOWER_PRECISION, query, query, key, value, attn_mask)
    check_bool(enable_gqa, "enable_gqa")
    _validate(query, key, value, enable_gqa)
    batch, heads, q_len, head_dim = query.shape
    k_len = key.shape[2]
    dropout_p = check_dropout_p(dropout_p)
    scale = _check_scale(scale, head_dim)
    mask = _expand_mask(attn_mask, (batch, heads, q_len, k_len), query)
    check_bool(is_causal, "is_causal")
    # An empty input launches no kernel (select answers "reference"): the kernels' size limits do not
    # apply to it (a zero head dim, say, is then no reason to warn or refuse).
    empty = is_empty(query, key, value)
    sizes = {} if empty else {"head_dim": head_dim, "head_dim_v": value.shape[-1], "q_len": q_len, "k_len": k_len}
    features = {**sizes, "dropout": dropout_p > 0, **transform_features(query, key, value, mask)}
    inputs = Inputs(query.device, query.dtype, features)
    chosen = select("scaled_dot_product_attention", inputs, backend, dropout_p=dropout_p, empty=empty)
    in_reference = chosen == "reference"
    row_shift = (not under_transform(inputs.features) and mask is not None and mask.requires_grad
                 and (attn_mask.dim() == 0 or attn_mask.shape[-1] == 1))
    if row_shift:
        mask = mask.detach()
    if enable_gqa and (key.shape[1] != heads or value.shape[1] != heads):
        if in_reference or chosen not in NATIVE_GQA or key.shape[1] != value.shape[1]:
            key, value = repeat_kv_heads(key, heads), repeat_kv_heads(value, heads)
    if in_reference:
        out = as_query_layout(
            reference.scaled_dot_product_attention(query, key, value, mask, dropout_p, is_causal, scale), query
        )
    else:
        out, _ = _FWD_OPS[chosen](
            _no_last_dim_stride(query), _no_last_dim_stride(key), _no_last_dim_stride(value), mask, scale, is_causal,
            dropout_p, draw_seed(dropout_p, query),
        )
    return RowShift.apply(out, attn_mask) if row_shift else out


def attention_with_keep_mask(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward that also returns the dropout keep-mask [B, H, Lq, Lk] it drew (for tests).

    It draws its seed exactly as the op does, so after the same ``torch.manual_seed`` the mask
    is the one the op used.
    """
    from ..kernels.triton import attention as kernels

    _validate(query, key, value)
    scale = _check_scale(scale, query.shape[-1])
    mask = _expand_mask(attn_mask, (*query.shape[:3], key.shape[2]), query)
    seed = draw_seed(dropout_p, query)
    out, _, keep = kernels.attention_fwd(query, key, value, mask, scale, is_causal, dropout_p, seed, return_keep_mask=True)
    return out, keep
