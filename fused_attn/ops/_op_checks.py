"""The Triton custom ops' checks of their own arguments (``torch.ops.fused_attn.triton_*`` called
directly, by a user composing them or a graph compiler), as the extension's ops check theirs
(csrc/include/fused_attn/checks.h and the launchers): a RuntimeError, what ``TORCH_CHECK`` raises,
whose message names the argument and what was expected, in the same words. Each runs before any
allocation or launch: the kernels index their operands through the shapes and strides they are
given, so an argument of the wrong shape would be read out of bounds or computed silently wrong.

The public ops validate their arguments first (``_validate``) and call these ops only with
well-formed ones; these checks cost a few microseconds a call beside the launches.
"""

from __future__ import annotations

import math

import torch

from .. import backends
from ._validate import FLOATING, KERNEL_DTYPES, affine_dtype, dtype_name


def fail(*message: object) -> None:
    """Raises the RuntimeError of a failed check (called only then: the message's parts, shapes and
    dtype names, are formed only for an error, the checks themselves are plain comparisons)."""
    raise RuntimeError("".join(str(part) for part in message))


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def kernel_device(t: torch.Tensor, name: str) -> None:
    """A tensor the Triton kernels can read: on a GPU, or where the backend's declaration says they
    run (``backends.backend_unavailable_reasons``: the CPU under ``TRITON_INTERPRET=1``)."""
    if not t.is_cuda and (reasons := backends.backend_unavailable_reasons("triton", t.device)):
        fail(name, " is on ", t.device, ", where the Triton kernels do not run: ", reasons[0])


def supported_float(t: torch.Tensor, name: str) -> None:
    if t.dtype not in KERNEL_DTYPES:
        fail(name, " must be float32, float16 or bfloat16, got ", dtype_name(t.dtype))


def rows_input(t: torch.Tensor, name: str) -> tuple[int, int]:
    """A [rows, hidden] row-major input; returns (rows, hidden)."""
    if t.dim() != 2:
        fail(name, " must be 2-D [rows, hidden], got ", t.dim(), " dimensions")
    if not t.is_contiguous():
        fail(name, " must be contiguous")
    supported_float(t, name)
    kernel_device(t, name)
    return t.shape[0], t.shape[1]


def on_device_of(t: torch.Tensor, name: str, like: torch.Tensor) -> None:
    if t.device != like.device:
        fail(name, " must be on ", like.device, ", got ", t.device)


def dtype_of(t: torch.Tensor, name: str, dtype: torch.dtype, why: str = " like the input") -> None:
    if t.dtype != dtype:
        fail(name, " must have dtype ", dtype_name(dtype), why, ", got ", dtype_name(t.dtype))


def affine_param(
    param: torch.Tensor | None, name: str, like: torch.Tensor, hidden: int, dtype: torch.dtype | None = None,
    what: str = "",
) -> None:
    """An optional contiguous [hidden] vector on ``like``'s device, of ``dtype`` (default: like's);
    ``what``, if given, says whose size ``hidden`` is (in parentheses after it, as checks.h does)."""
    if param is None:
        return
    if param.shape != (hidden,):
        fail(name, " must have shape [", hidden, "]", f" ({what})" if what else "", ", got ", _shape(param))
    if not param.is_contiguous():
        fail(name, " must be contiguous")
    if dtype is None:
        dtype_of(param, name, like.dtype)
    else:
        dtype_of(param, name, dtype, " (the input's, or float32 for weight and bias with a float16/bfloat16 input)")
    on_device_of(param, name, like)


def linear_weight(weight: torch.Tensor, name: str, like: torch.Tensor, in_features: int, in_what: str) -> int:
    """A linear layer's weight [out_features, in_features] (any strides: a GEMM reads it) of ``like``'s
    dtype and device; ``in_what`` says whose size in_features is. Returns out_features."""
    if weight.dim() != 2 or weight.shape[1] != in_features:
        fail(name, " must have shape [out_features, ", in_features, "] (", in_what, "), got ", _shape(weight))
    dtype_of(weight, name, like.dtype)
    on_device_of(weight, name, like)
    return weight.shape[0]


def same_as(t: torch.Tensor, name: str, like: torch.Tensor, like_name: str) -> None:
    if t.shape != like.shape:
        fail(name, " must have the shape of ", like_name, " ", _shape(like), ", got ", _shape(t))
    dtype_of(t, name, like.dtype, "")
    on_device_of(t, name, like)
    if not t.is_contiguous():
        fail(name, " must be contiguous")


def row_stats(stat: torch.Tensor, name: str, like: torch.Tensor, rows: int) -> None:
    """mean/rstd statistics: contiguous float32 [rows] on the input's device."""
    if stat.shape != (rows,):
        fail(name, " must have shape [", rows, "], got ", _shape(stat))
    if stat.dtype != torch.float32:
        fail(name, " must be float32, got ", dtype_name(stat.dtype))
    if not stat.is_contiguous():
        fail(name, " must be contiguous")
    on_device_of(stat, name, like)


def output_mask(mask: list[bool], count: int) -> None:
    if len(mask) != count:
        fail("output_mask must have ", count, " entries, got ", len(mask))


def eps(value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        fail("eps must be finite and >= 0, got ", value)


def finite_scale(scale: float) -> None:
    if not math.isfinite(scale):
        fail("scale must be finite, got ", scale)


def dropout_p(p: float) -> None:
    if not 0.0 <= p < 1.0:  # NaN fails too
        fail("dropout_p must be in [0, 1), got ", p)


def approximate(value: str, allowed: tuple[str, ...]) -> None:
    """The kernels' activation code (the ops' ``approximate`` argument: reference.ACTIVATION_CODES)."""
    if value not in allowed:
        quoted = [f'"{a}"' for a in allowed]
        fail("approximate must be ", ", ".join(quoted[:-1]), " or ", quoted[-1], ', got "', value, '"')


def mask_dtype(mask: torch.Tensor, name: str) -> None:
    if mask.dtype != torch.bool and mask.dtype not in FLOATING:
        fail(name, " must be bool, float32, float16, bfloat16 or float64, got ", dtype_name(mask.dtype))


def unit_last_stride(t: torch.Tensor, name: str, dim_name: str) -> None:
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        fail(name, " must have a unit stride along ", dim_name, ", got strides ", list(t.stride()))


# ---------------------------------------------------------------------------------------------
# Per op family


def attention_inputs(query, key, value, attn_mask, scale, dropout, head_dims: dict) -> None:
    """query [B, H, Lq, D], key [B, Hkv, Lk, D], value [B, Hkv, Lk, Dv] (Hkv = H or a divisor: grouped)
    of one dtype and device with a unit stride along the head dim, D and Dv within ``head_dims`` (the
    backend's declared limits, ``{"head_dim": (low, high), "head_dim_v": ...}``); attn_mask expanded
    to [B, H, Lq, Lk]; scale finite; dropout_p in [0, 1)."""
    supported_float(query, "query")
    for t, name in ((query, "query"), (key, "key"), (value, "value")):
        if t.dim() != 4:
            fail(name, " must be 4-D [batch, heads, seq, head_dim], got ", t.dim(), " dimensions")
        kernel_device(t, name)
        if t.device != query.device:
            fail(name, " must be on ", query.device, " like query, got ", t.device)
        dtype_of(t, name, query.dtype, " like query")
        unit_last_stride(t, name, "head_dim")
    batch, heads, q_len, head_dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    grouped = kv_heads == heads or (kv_heads > 0 and heads % kv_heads == 0)
    if key.shape[0] != batch or value.shape[0] != batch or value.shape[1] != kv_heads or not grouped:
        fail("key and value must have query's batch and heads ", [batch, heads],
             " (or, grouped, the same divisor of query's heads), got key ", _shape(key), " and value ", _shape(value))
    if key.shape[3] != head_dim:
        fail("key head_dim ", key.shape[3], " must equal query head_dim ", head_dim)
    if value.shape[2] != k_len:
        fail("value length ", value.shape[2], " must equal key length ", k_len)
    for feature, size in (("head_dim", head_dim), ("head_dim_v", value.shape[3])):
        low, high = head_dims[feature]
        if not low <= size <= high:
            fail("the Triton attention kernels serve head dims ", low, " to ", high, ", got head_dim ", head_dim,
                 " and value head_dim ", value.shape[3])
    if attn_mask is not None:
        on_device_of(attn_mask, "attn_mask", query)
        mask_dtype(attn_mask, "attn_mask")
        if attn_mask.shape != (batch, heads, q_len, k_len):
            fail("attn_mask must be expanded to [batch, heads, q_len, k_len] = ", [batch, heads, q_len, k_len],
                 ", got ", _shape(attn_mask))
    finite_scale(scale)
    dropout_p(dropout)


def attention_grads(grad_out, query, value, attn_mask, stats, mask_needs_grad) -> None:
    """The backward's own arguments besides attention_inputs': grad_out shaped as the output;
    the forward's row statistics [B, H, 2, Lq] float32."""
    batch, heads, q_len, _ = query.shape
    if grad_out.shape != (batch, heads, q_len, value.shape[3]):
        fail("grad_out must have shape ", [batch, heads, q_len, value.shape[3]], ", got ", _shape(grad_out))
    dtype_of(grad_out, "grad_out", query.dtype, "")
    on_device_of(grad_out, "grad_out", query)
    unit_last_stride(grad_out, "grad_out", "its last dim")
    if stats.shape != (batch, heads, 2, q_len):
        fail("stats must have shape ", [batch, heads, 2, q_len], " (the Triton forward's row statistics), got ",
             _shape(stats))
    if stats.dtype != torch.float32:
        fail("stats must be float32, got ", dtype_name(stats.dtype))
    if not stats.is_contiguous() or stats.device != query.device:
        fail("stats must be a contiguous tensor on ", query.device)
    if mask_needs_grad and attn_mask is None:
        fail("mask_needs_grad is true but attn_mask is None")


def softmax_input(input, mask, scale) -> None:
    """input [A, B, M, N] (any strides); mask expanded to its shape."""
    if input.dim() != 4:
        fail("input must be 4-D [A, B, M, N], got ", input.dim(), " dimensions")
    kernel_device(input, "input")
    supported_float(input, "input")
    finite_scale(scale)
    if mask is not None:
        on_device_of(mask, "mask", input)
        mask_dtype(mask, "mask")
        if mask.shape != input.shape:
            fail("mask must be expanded to the input's shape ", _shape(input), ", got ", _shape(mask))


def softmax_grads(grad_out, output, scale) -> None:
    if output.dim() < 1:
        fail("output must have at least 1 dimension")
    kernel_device(output, "output")
    supported_float(output, "output")
    if grad_out.shape != output.shape:
        fail("grad_out must have the shape of output ", _shape(output), ", got ", _shape(grad_out))
    dtype_of(grad_out, "grad_out", output.dtype, "")
    on_device_of(grad_out, "grad_out", output)
    finite_scale(scale)


def norm_params(input, weight, bias, hidden) -> None:
    """The norms' weight and bias, [hidden] in the dtype the kernels take them in (affine_dtype)."""
    dtype = affine_dtype(input, weight, bias)
    affine_param(weight, "weight", input, hidden, dtype)
    affine_param(bias, "bias", input, hidden, dtype)


def norm_grads(grad_out, input, input_name, mean, rstd, weight, mask, weight_grad: int) -> int:
    """A norm backward's grad_out, statistics, weight and output_mask (whose entry ``weight_grad``
    asks for the weight's gradient) against its saved input; returns hidden."""
    rows, hidden = rows_input(input, input_name)
    same_as(grad_out, "grad_out", input, input_name)
    row_stats(mean, "mean", input, rows)
    row_stats(rstd, "rstd", input, rows)
    affine_param(weight, "weight", input, hidden, affine_dtype(input, weight, None))
    output_mask(mask, 3 if weight_grad == 1 else 5)
    if weight is None and mask[weight_grad]:
        fail("output_mask[", weight_grad, "] asks for grad_weight, which requires a weight, but weight is None")
    return hidden


def add_norm_inputs(input, residual, weight, bias, input_bias, eps_value, p) -> None:
    """Add & Norm's input and residual [rows, hidden], parameters, input_bias [hidden] in the
    input's dtype, eps and dropout_p."""
    hidden = rows_input(input, "input")[1]
    same_as(residual, "residual", input, "input")
    norm_params(input, weight, bias, hidden)
    affine_param(input_bias, "input_bias", input, hidden)
    eps(eps_value)
    dropout_p(p)


def linear_grad_out(grad_out, input, rows, out_features, whose) -> None:
    """The gradient of a linear layer's output: contiguous [rows, out_features] of the input's dtype
    and device; ``whose`` names out_features' owner."""
    if grad_out.shape != (rows, out_features):
        fail("grad_out must have shape [", rows, ", ", out_features, "] ([rows of input, out_features of ", whose,
             "]), got ", _shape(grad_out))
    dtype_of(grad_out, "grad_out", input.dtype)
    on_device_of(grad_out, "grad_out", input)
    if not grad_out.is_contiguous():
        fail("grad_out must be contiguous")


def pre_activation(pre, input, rows, hidden) -> None:
    if pre.shape != (rows, hidden):
        fail("pre_activation must have shape [", rows, ", ", hidden, "], got ", _shape(pre))
    dtype_of(pre, "pre_activation", input.dtype)
    on_device_of(pre, "pre_activation", input)
    if not pre.is_contiguous():
        fail("pre_activation must be contiguous")


def linear_input(input, weight, bias, names=("weight", "bias"), bias_what: str = "") -> tuple[int, int]:
    """A first linear layer's input [rows, in_features], weight [out_features, in_features] and
    optional bias [out_features] (``bias_what`` says whose size that is), the weight and bias called
    ``names``; returns (rows, out_features)."""
    rows, in_features = rows_input(input, "input")
    out_features = linear_weight(weight, names[0], input, in_features, "in_features of the input")
    affine_param(bias, names[1], input, out_features, what=bias_what)
    return rows, out_features


def ffn_weights(input, w1, b1, w2, b2) -> tuple[int, int, int]:
    """input [rows, in], w1 [hidden, in], b1 [hidden], w2 [out, hidden], b2 [out]; returns
    (rows, hidden, out)."""
    rows, hidden = linear_input(input, w1, b1, ("w1", "b1"), "hidden features of w1")
    out_features = linear_weight(w2, "w2", input, hidden, "hidden features of w1")
    affine_param(b2, "b2", input, out_features, what="out_features of w2")
    return rows, hidden, out_features
