"""``fused_attn.softmax``: one-pass scaled, masked softmax, forward and backward.

For users who need the probabilities themselves (e.g. attention weights returned to the caller).
The input is viewed as [A, B, M, N] with the softmax dim last; masks are expanded as zero-stride
views and read in place by the kernel (an input of more than 4 dims has its leading dims merged, and
a mask broadcast over some of those but not others is then copied whole: _as_4d).
"""

from __future__ import annotations

import torch

from .. import _extension, reference
from ..backends import MAX_EXTENT, Inputs, Support, fast_entry, fast_path_open, register_op, select
from ._autocast import FLOAT32_ON_CUDA, autocast_inputs
from . import _op_checks as checks, _second_order as _second_order_grads
from ._registry import interpreter_serialized, register_native_pair, register_pair
from ._validate import (
    KERNEL_DTYPES, broadcast_mask, check_bool, check_tensor, transform_features, is_finite_number, python_scalar,
    under_transform,
)
from .attention import RowShift


# Rows up to MAX_EXTENT long (32-bit loop counters in the Triton and CUDA kernels; the Triton
# kernel streams long rows 4096 elements a step).
_LIMITS = {"n_cols": (None, MAX_EXTENT)}

SPEC = register_op(
    "softmax",
    [
        Support("cuda", devices=("cuda",), dtypes=KERNEL_DTYPES, limits=_LIMITS, native_op="softmax_fwd"),
        Support("triton", devices=("cuda", "cpu"), dtypes=KERNEL_DTYPES, limits=_LIMITS),
        Support("cpu", devices=("cpu",), dtypes=KERNEL_DTYPES, native_op="softmax_fwd"),
        Support("reference", devices=None, dtypes=KERNEL_DTYPES + (torch.float64,)),
    ],
)


@torch.library.custom_op("fused_attn::triton_softmax_fwd", mutates_args=())
@interpreter_serialized
def _triton_fwd(input: torch.Tensor, mask: torch.Tensor | None, scale: float, is_causal: bool) -> torch.Tensor:
    from ..kernels.triton import softmax as kernels

    checks.softmax_input(input, mask, scale)
    return kernels.softmax_fwd(input, mask, scale, is_causal)


@torch.library.custom_op("fused_attn::triton_softmax_bwd", mutates_args=())
@interpreter_serialized
def _triton_bwd(
    grad_out: torch.Tensor, output: torch.Tensor, scale: float, mask_needs_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (grad_input, grad of the masked scores in float32, or empty [0] unless ``mask_needs_grad``)."""
    from ..kernels.triton import softmax as kernels

    checks.softmax_grads(grad_out, output, scale)
    # The kernel reads rows contiguously: a strided argument is copied first (the op's own backward
    # passes contiguous tensors).
    dx, dscores = kernels.softmax_bwd(grad_out.contiguous(), output.contiguous(), scale, mask_needs_grad)
    return dx, dscores if dscores is not None else output.new_empty(0)


def _fake_fwd(input, mask, scale, is_causal):
    return input.new_empty(input.shape)


def _fake_bwd(grad_out, output, scale, mask_needs_grad):
    dscores = output.new_empty(output.shape, dtype=torch.float32) if mask_needs_grad else output.new_empty(0)
    return output.new_empty(output.shape), dscores  # contiguous, as every backend's


def _setup_context(ctx, inputs, output):
    _input, mask, scale, _is_causal = inputs
    ctx.save_for_backward(output)
    ctx.scale = scale
    ctx.mask_dtype = None if mask is None else mask.dtype


def _autograd_for(bwd_op):
    def backward(ctx, grad_out):
        (output,) = ctx.saved_tensors
        mask_needs_grad = bool(ctx.needs_input_grad[1])
        dx, dscores = bwd_op(grad_out.contiguous(), output, ctx.scale, mask_needs_grad)
        return dx, (dscores.to(ctx.mask_dtype) if mask_needs_grad else None), None, None

    return backward


def _second_order(ctx, grad_out):
    (output,) = ctx.saved_tensors
    dx, dscores = _second_order_grads.softmax((grad_out, output), (ctx.scale,), ctx.needs_input_grad[:2])
    return dx, (None if dscores is None else dscores.to(ctx.mask_dtype)), None, None


def _register(fwd: str, bwd: str) -> object:
    return register_pair(
        fwd, bwd, fake_fwd=_fake_fwd, fake_bwd=_fake_bwd, setup_context=_setup_context, backward_for=_autograd_for,
        second_order=_second_order,
    )


_FWD_OPS = {"triton": _register("triton_softmax_fwd", "triton_softmax_bwd")}
if _extension.loaded():
    _FWD_OPS["cpu"] = _FWD_OPS["cuda"] = register_native_pair(
        "softmax_fwd", "softmax_bwd", fake_fwd=_fake_fwd, fake_bwd=_fake_bwd
    )

# The C++ entry for the plain call (fused_attn.backends.fast_entry; csrc/fast.cpp), or None.
_FAST = fast_entry("softmax")


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    if t.dim() <= 4:
        return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))
    return t.reshape(-1, 1, *t.shape[-2:])


def _shifts_whole_slices(mask: torch.Tensor, dim: int, rank: int) -> bool:
    """Whether ``mask`` (as given, broadcasting to a rank-``rank`` input) is constant along the
    softmax dim ``dim`` (non-negative): it then shifts whole slices, which softmax ignores."""
    given_dim = dim - rank + mask.dim()  # dim in the mask as given
    return given_dim < 0 or mask.shape[given_dim] == 1


def softmax(
    input: torch.Tensor,
    dim: int = -1,
    mask: torch.Tensor | None = None,
    scale: float = 1.0,
    is_causal: bool = False,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``softmax(input * scale + mask, dim)`` in one pass, differentiable in input and a floating mask.

    ``mask`` is bool (True = keep) or floating (added after scaling), broadcastable to
    ``input``'s shape. ``is_causal`` masks element j > i of the last two dims (top-left aligned;
    ``dim`` must then be the last). Slices whose every element is masked give 0 (and zero
    gradients), not NaN. float16, bfloat16 and float32 run fused with float32 arithmetic. The
    result has ``input``'s dtype whatever the mask's (the probabilities of the scores given; a
    float32 mask on bfloat16 scores does not promote them as ``input * scale + mask`` would). A
    floating mask of size 1 along ``dim`` shifts whole slices, which softmax ignores: its gradient is
    exactly 0 on every backend.

    Raises ``TypeError``/``ValueError`` naming the argument for a bad dim, a mask that does not
    broadcast or has a non-bool, non-floating dtype, a non-finite scale, or a device mismatch;
    :class:`~fused_attn.BackendNotSupportedError` when a named ``backend`` cannot serve the call
    (float64 runs the reference implementation, with a :class:`~fused_attn.FallbackWarning`).

    Under ``torch.autocast`` it runs in float32 on CUDA and in the input's dtype on CPU, as
    ``torch.softmax`` does.
    """
    if backend is None and _FAST is not None and fast_path_open():
        out = _FAST(input, dim, mask, scale, is_causal)
        if out is not None:
            return out
    input, mask = autocast_inputs(FLOAT32_ON_CUDA, input, input, mask)
    input = check_tensor(input, "input", min_dim=1)
    dim = python_scalar(dim)
    if isinstance(dim, bool) or not isinstance(dim, int) or not -input.dim() <= dim < input.dim():
        raise ValueError(f"dim must be an int in [{-input.dim()}, {input.dim() - 1}] for input of shape {list(input.shape)}, got {dim!r}")
    dim = dim % input.dim()
    check_bool(is_causal, "is_causal")
    if is_causal and (input.dim() < 2 or dim != input.dim() - 1):
        raise ValueError("is_causal=True needs dim to be the last dim of an input with at least 2 dims")
    if not is_finite_number(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    given = mask
    if mask is not None:
        mask = broadcast_mask(mask, "mask", input, "input", input.shape, "input shape")
    features = {"n_cols": input.shape[dim], **transform_features(input, mask)}
    chosen = select("softmax", Inputs(input.device, input.dtype, features), backend, operands=(input,))
    # A learned mask of size 1 along dim shifts whole slices, which softmax ignores: its gradient is
    # exactly 0 (RowShift), not a sum of terms cancelling to rounding in a float32 buffer of the
    # input's size.
    row_shift = (mask is not None and mask.requires_grad and not under_transform(features)
                 and _shifts_whole_slices(given, dim, input.dim()))
    if row_shift:
        mask = mask.detach()
    if chosen == "reference":
        out = reference.softmax(input, dim, mask, float(scale), is_causal)
        return RowShift.apply(out, given) if row_shift else out
    last = dim == input.dim() - 1
    moved = input if last else input.movedim(dim, -1)
    m = mask if mask is None or last else mask.movedim(dim, -1)
    reshaped = moved.dim() != 4
    if reshaped:
        moved_shape = moved.shape
        moved, m = _as_4d(moved), (None if m is None else _as_4d(m))
    y = _FWD_OPS[chosen](moved, m, float(scale), is_causal)
    if reshaped:
        y = y.reshape(moved_shape)
    if not last:
        # torch's softmax keeps the input's layout: a contiguous input gives a contiguous result.
        y = y.movedim(-1, dim)
        y = y.contiguous() if input.is_contiguous() else y
    return RowShift.apply(y, given) if row_shift else y
