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

from ..backends import triton_interpret_mode
from ._validate import FLOATING, dtype_name

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The largest head dim the Triton attention kernels tile (ops.attention.HEAD_DIM_LIMITS).
MAX_HEAD_DIM = 256


def require(ok: bool, *message: object) -> None:
    if not ok:
        raise RuntimeError("".join(str(part) for part in message))


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def kernel_device(t: torch.Tensor, name: str) -> None:
    """A tensor the Triton kernels can read: on a GPU, or on the CPU under ``TRITON_INTERPRET=1``."""
    require(t.is_cuda or (t.device.type == "cpu" and triton_interpret_mode()), name,
            " must be a CUDA tensor (the Triton kernels run on the CPU only under TRITON_INTERPRET=1), got ", t.device)


def supported_float(t: torch.Tensor, name: str) -> None:
    require(t.dtype in KERNEL_DTYPES, name, " must be float32, float16 or bfloat16, got ", dtype_name(t.dtype))


def rows_input(t: torch.Tensor, name: str) -> tuple[int, int]:
    """A [rows, hidden] row-major input; returns (rows, hidden)."""
    require(t.dim() == 2, name, " must be 2-D [rows, hidden], got ", t.dim(), " dimensions")
    require(t.is_contiguous(), name, " must be contiguous")
    supported_float(t, name)
    kernel_device(t, name)
    return t.shape[0], t.shape[1]


def on_device_of(t: torch.Tensor, name: str, like: torch.Tensor) -> None:
    require(t.device == like.device, name, " must be on ", like.device, ", got ", t.device)


def dtype_of(t: torch.Tensor, name: str, dtype: torch.dtype, why: str = " like the input") -> None:
    require(t.dtype == dtype, name, " must have dtype ", dtype_name(dtype), why, ", got ", dtype_name(t.dtype))


def affine_dtype(weight: torch.Tensor | None, like: torch.Tensor) -> torch.dtype:
    """The norms' parameter dtype: float32 for a 16-bit input with a float32 weight, else the input's
    (``_validate.affine_dtype``, the public op's rule)."""
    half = like.dtype in (torch.float16, torch.bfloat16)
    return torch.float32 if half and weight is not None and weight.dtype == torch.float32 else like.dtype


def affine_param(
    param: torch.Tensor | None, name: str, like: torch.Tensor, hidden: int, dtype: torch.dtype | None = None,
    what: str = "",
) -> None:
    """An optional contiguous [hidden] vector on ``like``'s device, of ``dtype`` (default: like's);
    ``what`` says whose size ``hidden`` is."""
    if param is None:
        return
    require(param.dim() == 1 and param.shape[0] == hidden, name, " must have shape [", hidden, "]", what, ", got ",
            _shape(param))
    require(param.is_contiguous(), name, " must be contiguous")
    if dtype is None:
        dtype_of(param, name, like.dtype)
    else:
        dtype_of(param, name, dtype, " (the input's, or float32 for weight and bias with a float16/bfloat16 input)")
    on_device_of(param, name, like)


def linear_weight(weight: torch.Tensor, name: str, like: torch.Tensor, in_features: int, in_what: str) -> int:
    """A linear layer's weight [out_features, in_features] (any strides: a GEMM reads it) of ``like``'s
    dtype and device; ``in_what`` says whose size in_features is. Returns out_features."""
    require(weight.dim() == 2 and weight.shape[1] == in_features, name, " must have shape [out_features, ",
            in_features, "] (", in_what, "), got ", _shape(weight))
    dtype_of(weight, name, like.dtype)
    on_device_of(weight, name, like)
    return weight.shape[0]


def same_as(t: torch.Tensor, name: str, like: torch.Tensor, like_name: str) -> None:
    require(t.shape == like.shape, name, " must have the shape of ", like_name, " ", _shape(like), ", got ", _shape(t))
    dtype_of(t, name, like.dtype, "")
    on_device_of(t, name, like)
    require(t.is_contiguous(), name, " must be contiguous")


def row_stats(stat: torch.Tensor, name: str, like: torch.Tensor, rows: int) -> None:
    """mean/rstd statistics: contiguous float32 [rows] on the input's device."""
    require(stat.dim() == 1 and stat.shape[0] == rows, name, " must have shape [", rows, "], got ", _shape(stat))
    require(stat.dtype == torch.float32, name, " must be float32, got ", dtype_name(stat.dtype))
    require(stat.is_contiguous(), name, " must be contiguous")
    on_device_of(stat, name, like)


def output_mask(mask: list[bool], count: int) -> None:
    require(len(mask) == count, "output_mask must have ", count, " entries, got ", len(mask))


def eps(value: float) -> None:
    require(math.isfinite(value) and value >= 0, "eps must be finite and >= 0, got ", value)


def finite_scale(scale: float) -> None:
    require(math.isfinite(scale), "scale must be finite, got ", scale)


def dropout_p(p: float) -> None:
    require(0.0 <= p < 1.0, "dropout_p must be in [0, 1), got ", p)  # NaN fails too


def approximate(value: str) -> None:
    require(value in ("none", "tanh"), 'approximate must be "none" or "tanh", got "', value, '"')


def mask_dtype(mask: torch.Tensor, name: str) -> None:
    require(mask.dtype == torch.bool or mask.dtype in FLOATING, name,
            " must be bool, float32, float16, bfloat16 or float64, got ", dtype_name(mask.dtype))


# ---------------------------------------------------------------------------------------------
# Per op family


def attention_inputs(query, key, value, attn_mask, scale, dropout) -> None:
    """query [B, H, Lq, D], key [B, Hkv, Lk, D], value [B, Hkv, Lk, Dv] (Hkv = H or a divisor: grouped)
    of one dtype and device with a unit stride along the head dim, head dims up to 256; attn_mask
    expanded to [B, H, Lq, Lk]; scale finite; dropout_p in [0, 1)."""
    supported_float(query, "query")
    for t, name in ((query, "query"), (key, "key"), (value, "value")):
        require(t.dim() == 4, name, " must be 4-D [batch, heads, seq, head_dim], got ", t.dim(), " dimensions")
        kernel_device(t, name)
        require(t.device == query.device, name, " must be on ", query.device, " like query, got ", t.device)
        dtype_of(t, name, query.dtype, " like query")
        require(t.shape[-1] <= 1 or t.stride(-1) == 1, name, " must have a unit stride along head_dim, got strides ",
                list(t.stride()))
    kv_heads = key.shape[1]
    require(
        key.shape[0] == query.shape[0] and value.shape[0] == query.shape[0] and value.shape[1] == kv_heads
        and (kv_heads == query.shape[1] or (kv_heads > 0 and query.shape[1] % kv_heads == 0)),
        "key and value must have query's batch and heads ", _shape(query)[:2],
        " (or, grouped, the same divisor of query's heads), got key ", _shape(key), " and value ", _shape(value),
    )
    require(key.shape[3] == query.shape[3], "key head_dim ", key.shape[3], " must equal query head_dim ", query.shape[3])
    require(value.shape[2] == key.shape[2], "value length ", value.shape[2], " must equal key length ", key.shape[2])
    require(query.shape[3] <= MAX_HEAD_DIM and value.shape[3] <= MAX_HEAD_DIM,
            "the Triton attention kernels serve head dims up to ", MAX_HEAD_DIM, ", got head_dim ", query.shape[3],
            " and value head_dim ", value.shape[3])
    if attn_mask is not None:
        on_device_of(attn_mask, "attn_mask", query)
        mask_dtype(attn_mask, "attn_mask")
        expected = [*query.shape[:3], key.shape[2]]
        require(_shape(attn_mask) == expected, "attn_mask must be expanded to [batch, heads, q_len, k_len] = ",
                expected, ", got ", _shape(attn_mask))
    finite_scale(scale)
    dropout_p(dropout)


def attention_grads(grad_out, query, value, attn_mask, stats, mask_needs_grad) -> None:
    """The backward's own arguments besides attention_inputs': grad_out shaped as the output;
    the forward's row statistics [B, H, 2, Lq] float32."""
    expected = [*query.shape[:3], value.shape[3]]
    require(grad_out.dim() == 4 and _shape(grad_out) == expected, "grad_out must have shape ", expected, ", got ",
            _shape(grad_out))
    dtype_of(grad_out, "grad_out", query.dtype, "")
    on_device_of(grad_out, "grad_out", query)
    require(grad_out.shape[-1] <= 1 or grad_out.stride(-1) == 1,
            "grad_out must have a unit stride along its last dim, got strides ", list(grad_out.stride()))
    expected = [*query.shape[:2], 2, query.shape[2]]
    require(_shape(stats) == expected, "stats must have shape ", expected, " (the Triton forward's row statistics), got ",
            _shape(stats))
    require(stats.dtype == torch.float32, "stats must be float32, got ", dtype_name(stats.dtype))
    require(stats.is_contiguous() and stats.device == query.device, "stats must be a contiguous tensor on ",
            query.device)
    require(not mask_needs_grad or attn_mask is not None, "mask_needs_grad is true but attn_mask is None")


def softmax_input(input, mask, scale) -> None:
    """input [A, B, M, N] (any strides); mask expanded to its shape."""
    require(input.dim() == 4, "input must be 4-D [A, B, M, N], got ", input.dim(), " dimensions")
    kernel_device(input, "input")
    supported_float(input, "input")
    finite_scale(scale)
    if mask is not None:
        on_device_of(mask, "mask", input)
        mask_dtype(mask, "mask")
        require(mask.shape == input.shape, "mask must be expanded to the input's shape ", _shape(input), ", got ",
                _shape(mask))


def softmax_grads(grad_out, output, scale) -> None:
    require(output.dim() >= 1, "output must have at least 1 dimension")
    kernel_device(output, "output")
    supported_float(output, "output")
    require(grad_out.shape == output.shape, "grad_out must have the shape of output ", _shape(output), ", got ",
            _shape(grad_out))
    dtype_of(grad_out, "grad_out", output.dtype, "")
    on_device_of(grad_out, "grad_out", output)
    finite_scale(scale)


def norm_params(input, weight, bias, hidden) -> None:
    """The norms' weight and bias, [hidden] in affine_dtype."""
    dtype = affine_dtype(weight, input)
    affine_param(weight, "weight", input, hidden, dtype)
    affine_param(bias, "bias", input, hidden, dtype)


def norm_grads(grad_out, input, input_name, mean, rstd, weight, mask, weight_grad: int) -> int:
    """A norm backward's grad_out, statistics, weight and output_mask (whose entry ``weight_grad``
    asks for the weight's gradient) against its saved input; returns hidden."""
    rows, hidden = rows_input(input, input_name)
    same_as(grad_out, "grad_out", input, input_name)
    row_stats(mean, "mean", input, rows)
    row_stats(rstd, "rstd", input, rows)
    affine_param(weight, "weight", input, hidden, affine_dtype(weight, input))
    output_mask(mask, 3 if weight_grad == 1 else 5)
    require(weight is not None or not mask[weight_grad], "output_mask[", weight_grad,
            "] asks for grad_weight, which requires a weight, but weight is None")
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
    require(grad_out.dim() == 2 and _shape(grad_out) == [rows, out_features], "grad_out must have shape [", rows, ", ",
            out_features, "] ([rows of input, out_features of ", whose, "]), got ", _shape(grad_out))
    dtype_of(grad_out, "grad_out", input.dtype)
    on_device_of(grad_out, "grad_out", input)
    require(grad_out.is_contiguous(), "grad_out must be contiguous")


def pre_activation(pre, input, rows, hidden) -> None:
    require(_shape(pre) == [rows, hidden], "pre_activation must have shape [", rows, ", ", hidden, "], got ",
            _shape(pre))
    dtype_of(pre, "pre_activation", input.dtype)
    on_device_of(pre, "pre_activation", input)
    require(pre.is_contiguous(), "pre_activation must be contiguous")


def ffn_weights(input, w1, b1, w2, b2) -> tuple[int, int, int]:
    """input [rows, in], w1 [hidden, in], b1 [hidden], w2 [out, hidden], b2 [out]; returns
    (rows, hidden, out)."""
    rows, in_features = rows_input(input, "input")
    hidden = linear_weight(w1, "w1", input, in_features, "in_features of the input")
    affine_param(b1, "b1", input, hidden, what=" (hidden features of w1)")
    out_features = linear_weight(w2, "w2", input, hidden, "hidden features of w1")
    affine_param(b2, "b2", input, out_features, what=" (out_features of w2)")
    return rows, hidden, out_features
