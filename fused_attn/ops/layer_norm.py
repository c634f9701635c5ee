"""``fused_attn.layer_norm``: LayerNorm over the trailing dims, forward and backward.

Layers, bottom up: the kernels (``torch.ops.fused_attn.layer_norm_fwd/bwd`` from the C++
extension for CPU and CUDA tensors; ``torch.ops.fused_attn.triton_layer_norm_fwd/bwd`` wrapping
the Triton kernels), each forward op with a fake kernel and an autograd formula (in C++ for the
extension's ops, csrc/autograd.cpp; registered here for the Triton ones); then the public
function, which offers a plain call to the extension's C++ entry (csrc/fast.cpp) and otherwise
validates, flattens to [rows, hidden] and picks the backend.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .. import _extension, reference
from ..backends import MAX_EXTENT, Inputs, Support, fast_entry, fast_path_open, register_op, select
from ._autocast import FLOAT32_ON_CUDA, autocast_inputs
from . import _op_checks as checks, _second_order as _second_order_grads
from ._registry import interpreter_serialized, register_native_pair, register_pair
from ._validate import (
    KERNEL_DTYPES, affine_dtype, check_eps, check_param, check_tensor, python_scalar, rows, transform_features,
)


SPEC = register_op(
    "layer_norm",
    [
        Support("cuda", devices=("cuda",), dtypes=KERNEL_DTYPES, limits={"hidden": (None, MAX_EXTENT)},
                native_op="layer_norm_fwd"),
        Support("triton", devices=("cuda", "cpu"), dtypes=KERNEL_DTYPES, limits={"hidden": (None, MAX_EXTENT)}),
        Support("cpu", devices=("cpu",), dtypes=KERNEL_DTYPES, native_op="layer_norm_fwd"),
        Support("reference", devices=None, dtypes=KERNEL_DTYPES + (torch.float64,)),
    ],
)


@torch.library.custom_op("fused_attn::triton_layer_norm_fwd", mutates_args=())
@interpreter_serialized
def _triton_fwd(
    input: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels.triton import layer_norm as kernels

    hidden = checks.rows_input(input, "input")[1]
    checks.norm_params(input, weight, bias, hidden)
    checks.eps(eps)
    return kernels.layer_norm_fwd(input, weight, bias, eps)


@torch.library.custom_op("fused_attn::triton_layer_norm_bwd", mutates_args=())
@interpreter_serialized
def _triton_bwd(
    grad_out: torch.Tensor,
    input: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor | None,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels.triton import layer_norm as kernels

    checks.norm_grads(grad_out, input, "input", mean, rstd, weight, output_mask, weight_grad=1)
    return kernels.layer_norm_bwd(grad_out, input, mean, rstd, weight, output_mask)


def _fake_fwd(input, weight, bias, eps):
    rows = input.shape[0]
    stats = input.new_empty(rows, dtype=torch.float32)
    return torch.empty_like(input), stats, torch.empty_like(stats)


def _fake_bwd(grad_out, input, mean, rstd, weight, output_mask):
    hidden = input.shape[1]
    dx = torch.empty_like(input) if output_mask[0] else input.new_empty(0)
    dw = input.new_empty(hidden, dtype=weight.dtype) if output_mask[1] else input.new_empty(0)
    # The parameter gradients have the parameters' dtype: the weight's (the bias shares it), else the input's.
    db = input.new_empty(hidden, dtype=input.dtype if weight is None else weight.dtype) if output_mask[2] else input.new_empty(0)
    return dx, dw, db


def _setup_context(ctx, inputs, output):
    input, weight, _bias, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(input, weight, mean, rstd)
    ctx.eps = eps
    ctx.set_materialize_grads(False)  # mean and rstd are outputs only to be saved


def _autograd_for(bwd_op):
    def backward(ctx, grad_out, _grad_mean, _grad_rstd):
        input, weight, mean, rstd = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        mask = [need_dx, need_dw and weight is not None, need_db]
        dx, dw, db = bwd_op(grad_out.contiguous(), input, mean, rstd, weight, mask)
        return dx if mask[0] else None, dw if mask[1] else None, db if mask[2] else None, None

    return backward


def _second_order(ctx, grad_out, _grad_mean, _grad_rstd):
    input, weight, _, _ = ctx.saved_tensors
    if grad_out is None:
        return None, None, None, None
    return (*_second_order_grads.layer_norm((grad_out, input, weight), (ctx.eps,), ctx.needs_input_grad[:3]), None)


def _register(fwd: str, bwd: str) -> object:
    return register_pair(
        fwd, bwd, fake_fwd=_fake_fwd, fake_bwd=_fake_bwd, setup_context=_setup_context, backward_for=_autograd_for,
        second_order=_second_order,
    )


_FWD_OPS = {"triton": _register("triton_layer_norm_fwd", "triton_layer_norm_bwd")}
if _extension.loaded():
    _FWD_OPS["cpu"] = _FWD_OPS["cuda"] = register_native_pair(
        "layer_norm_fwd", "layer_norm_bwd", fake_fwd=_fake_fwd, fake_bwd=_fake_bwd
    )


# The C++ entry for the plain call (fused_attn.backends.fast_entry; csrc/fast.cpp), or None.
_FAST = fast_entry("layer_norm")


def _normalized_shape(normalized_shape: object) -> tuple[int, ...]:
    if type(normalized_shape) is tuple and all(type(d) is int for d in normalized_shape):
        return normalized_shape  # the common case, without the abstract-class checks below
    normalized_shape = python_scalar(normalized_shape)
    if isinstance(normalized_shape, int) and not isinstance(normalized_shape, bool):
        return (normalized_shape,)
    if isinstance(normalized_shape, (Sequence, torch.Size)):
        dims = tuple(python_scalar(d) for d in normalized_shape)
        if all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
            return dims
    raise TypeError(f"normalized_shape must be an int or a sequence of ints, got {normalized_shape!r}")


def layer_norm(
    input: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Layer normalisation, as :func:`torch.nn.functional.layer_norm`.

    Normalises ``input`` over its trailing ``normalized_shape`` dims (mean and biased variance in
    float32), then scales by ``weight`` and shifts by ``bias`` (both of shape ``normalized_shape``,
    optional). ``input`` may have any leading shape and any strides; float16, bfloat16 and
    float32 run fused, accumulating in float32 (float64 runs the reference implementation).
    float32 ``weight`` and ``bias`` with a float16/bfloat16 input (norms kept in float32) are read
    unrounded and get float32 gradients; any other mix is cast to the input's dtype.
    Differentiable in ``input``, ``weight`` and ``bias``; the backward is deterministic on every
    backend (weight and bias gradients from partial sums added in a fixed order, no atomics).

    Raises ``TypeError``/``ValueError`` naming the argument when shapes, dtypes or devices do not
    match, and :class:`~fused_attn.BackendNotSupportedError` when a named ``backend`` cannot serve
    the call.

    Under ``torch.autocast`` it runs in float32 on CUDA (input, weight and bias cast) and in the
    input's dtype on CPU, as ``F.layer_norm`` does.
    """
    if backend is None and _FAST is not None and fast_path_open():
        out = _FAST(input, normalized_shape, weight, bias, eps)
        if out is not None:
            return out
    input, weight, bias = autocast_inputs(FLOAT32_ON_CUDA, input, input, weight, bias)
    input = check_tensor(input, "input", min_dim=1)
    shape = _normalized_shape(normalized_shape)
    if not shape or input.dim() < len(shape) or tuple(input.shape[-len(shape):]) != shape:
        raise ValueError(
            f"normalized_shape {list(shape)} must equal the trailing dims of input, whose shape is {list(input.shape)}"
        )
    param_dtype = affine_dtype(input, weight, bias)
    weight = check_param(weight, "weight", input, shape, param_dtype)
    bias = check_param(bias, "bias", input, shape, param_dtype)
    eps = check_eps(eps)
    hidden = math.prod(shape)
    inputs = Inputs(input.device, input.dtype, {"hidden": hidden, **transform_features(input, weight, bias)})
    chosen = select("layer_norm", inputs, backend, operands=(input,))
    if chosen == "reference":
        return reference.layer_norm(input, shape, weight, bias, eps)
    flat = rows(input, hidden)
    if len(shape) > 1:  # the kernels take the parameters flat, as the rows
        weight = None if weight is None else weight.view(-1)
        bias = None if bias is None else bias.view(-1)
    out, _, _ = _FWD_OPS[chosen](flat, weight, bias, eps)
    return out if len(shape) == 1 and input.dim() == 2 else out.view(*input.shape)
