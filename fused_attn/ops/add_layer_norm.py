"""``fused_attn.add_layer_norm``: BERT's "Add & Norm" in one pass over memory.

``layer_norm(residual + dropout(input + input_bias))``: the bias add, dropout, residual add and
normalisation read each input once and write the output (and the pre-norm sum, which the backward
needs and pre-LN models use as their residual stream) once; a call that needs neither makes the
output alone.
"""

from __future__ import annotations

import math

import torch

from .. import _extension, reference
from ..backends import MAX_EXTENT, Inputs, Support, fast_entry, fast_path_open, register_op, select
from ._autocast import FLOAT32_ON_CUDA, autocast_inputs
from ._random import draw_seed, kernel_seed
from . import _op_checks as checks, _second_order as _second_order_grads
from ._registry import interpreter_serialized, register_fake, register_native_pair, register_pair
from ._validate import (
    KERNEL_DTYPES, affine_dtype, check_bool, check_dropout_p, check_eps, check_param, check_same_device, check_tensor,
    needs_grad, rows, transform_features, unrows,
)


SPEC = register_op(
    "add_layer_norm",
    [
        Support("cuda", devices=("cuda",), dtypes=KERNEL_DTYPES, limits={"hidden": (None, MAX_EXTENT)},
                native_op="add_layer_norm_fwd"),
        Support("triton", devices=("cuda", "cpu"), dtypes=KERNEL_DTYPES, limits={"hidden": (None, MAX_EXTENT)}),
        Support("cpu", devices=("cpu",), dtypes=KERNEL_DTYPES, native_op="add_layer_norm_fwd"),
        Support("reference", devices=None, dtypes=KERNEL_DTYPES + (torch.float64,)),
    ],
)


# The op named by the Triton ops' errors (kernel_seed).
_TRITON_OP = "fused_attn::triton_add_layer_norm"


@torch.library.custom_op("fused_attn::triton_add_layer_norm_fwd", mutates_args=())
@interpreter_serialized
def _triton_fwd(
    input: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    input_bias: torch.Tensor | None,
    eps: float,
    dropout_p: float,
    seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels.triton import layer_norm as kernels

    checks.add_norm_inputs(input, residual, weight, bias, input_bias, eps, dropout_p)
    return kernels.add_layer_norm_fwd(
        input, residual, weight, bias, input_bias, eps, dropout_p, kernel_seed(seed, dropout_p, input, _TRITON_OP)
    )


@torch.library.custom_op("fused_attn::triton_add_layer_norm_inference", mutates_args=())
@interpreter_serialized
def _triton_inference(
    input: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    input_bias: torch.Tensor | None,
    eps: float,
    dropout_p: float,
    seed: torch.Tensor | None,
) -> torch.Tensor:
    from ..kernels.triton import layer_norm as kernels

    checks.add_norm_inputs(input, residual, weight, bias, input_bias, eps, dropout_p)
    return kernels.add_layer_norm_inference(
        input, residual, weight, bias, input_bias, eps, dropout_p, kernel_seed(seed, dropout_p, input, _TRITON_OP)
    )


@torch.library.custom_op("fused_attn::triton_add_layer_norm_bwd", mutates_args=())
@interpreter_serialized
def _triton_bwd(
    grad_out: torch.Tensor,
    grad_prenorm: torch.Tensor | None,
    prenorm: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor | None,
    dropout_p: float,
    seed: torch.Tensor | None,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels.triton import layer_norm as kernels

    checks.norm_grads(grad_out, prenorm, "prenorm", mean, rstd, weight, output_mask, weight_grad=2)
    if grad_prenorm is not None:
        checks.same_as(grad_prenorm, "grad_prenorm", prenorm, "prenorm")
    checks.dropout_p(dropout_p)
    return kernels.add_layer_norm_bwd(
        grad_out, grad_prenorm, prenorm, mean, rstd, weight, dropout_p,
        kernel_seed(seed, dropout_p, prenorm, _TRITON_OP), output_mask,
    )


def _fake_fwd(input, residual, weight, bias, input_bias, eps, dropout_p, seed):
    stats = input.new_empty(input.shape[0], dtype=torch.float32)
    return torch.empty_like(input), torch.empty_like(input), stats, torch.empty_like(stats)


def _fake_inference(input, residual, weight, bias, input_bias, eps, dropout_p, seed):
    return torch.empty_like(input)


def _fake_bwd(grad_out, grad_prenorm, prenorm, mean, rstd, weight, dropout_p, seed, output_mask):
    hidden = prenorm.shape[1]
    full = [torch.empty_like(prenorm) if output_mask[i] else prenorm.new_empty(0) for i in (0, 1)]
    # weight and bias gradients in the parameters' dtype (the weight's; the bias shares it), input_bias's in the input's.
    param_dtype = prenorm.dtype if weight is None else weight.dtype
    vectors = [
        prenorm.new_empty(hidden, dtype=param_dtype if i in (2, 3) else prenorm.dtype)
        if output_mask[i]
        else prenorm.new_empty(0)
        for i in (2, 3, 4)
    ]
    return (*full, *vectors)


def _setup_context(ctx, inputs, output):
    _input, _residual, weight, _bias, _input_bias, eps, dropout_p, seed = inputs
    _out, prenorm, mean, rstd = output
    ctx.save_for_backward(prenorm, mean, rstd, weight, seed)
    ctx.dropout_p, ctx.eps = dropout_p, eps
    # Gradients of outputs nobody used arrive as None instead of materialised zeros.
    ctx.set_materialize_grads(False)


def _autograd_for(bwd_op):
    def backward(ctx, grad_out, grad_prenorm, _grad_mean, _grad_rstd):
        prenorm, mean, rstd, weight, seed = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(prenorm)
        mask = list(ctx.needs_input_grad[:5])
        mask[2] = mask[2] and weight is not None
        # Without dropout the input's gradient is the residual's: compute and write it once.
        shared = ctx.dropout_p == 0.0 and mask[0]
        asked = [False, mask[1] or shared, *mask[2:]] if shared else mask
        grads = list(bwd_op(
            grad_out.contiguous(), None if grad_prenorm is None else grad_prenorm.contiguous(),
            prenorm, mean, rstd, weight, ctx.dropout_p, seed, asked,
        ))
        if shared:
            grads[0] = grads[1]
        return (*(g if m else None for g, m in zip(grads, mask)), None, None, None)

    return backward


def _second_order(ctx, grad_out, grad_prenorm, _grad_mean, _grad_rstd):
    prenorm, _, _, weight, seed = ctx.saved_tensors
    grads = _second_order_grads.add_layer_norm(
        (grad_out, grad_prenorm, prenorm, weight, seed), (ctx.eps, ctx.dropout_p), ctx.needs_input_grad[:5]
    )
    return (*grads, None, None, None)


def _register(fwd: str, bwd: str) -> object:
    return register_pair(
        fwd, bwd, fake_fwd=_fake_fwd, fake_bwd=_fake_bwd, setup_context=_setup_context, backward_for=_autograd_for,
        second_order=_second_order,
    )


_FWD_OPS = {"triton": _register("triton_add_layer_norm_fwd", "triton_add_layer_norm_bwd")}
# Calls that need no gradient and no pre-norm sum take the inference form: the same output bits, no
# pre-norm tensor.
register_fake("triton_add_layer_norm_inference", _fake_inference)
_INFERENCE_OPS = {"triton": torch.ops.fused_attn.triton_add_layer_norm_inference}
if _extension.loaded():
    _FWD_OPS["cpu"] = _FWD_OPS["cuda"] = register_native_pair(
        "add_layer_norm_fwd", "add_layer_norm_bwd", fake_fwd=_fake_fwd, fake_bwd=_fake_bwd
    )
    register_fake("add_layer_norm_inference", _fake_inference)
    for _device in ("cpu", "cuda"):
        if _extension.has_kernel("add_layer_norm_inference", _device):
            _INFERENCE_OPS[_device] = torch.ops.fused_attn.add_layer_norm_inference

# The C++ entry for the plain call (fused_attn.backends.fast_entry; csrc/fast.cpp), or None.
_FAST = fast_entry("add_layer_norm")


def add_layer_norm(
    input: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    dropout_p: float = 0.0,
    input_bias: torch.Tensor | None = None,
    *,
    return_prenorm: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``layer_norm(residual + dropout(input + input_bias))`` over the last dim, fused.

    ``input`` and ``residual`` share a shape [..., hidden] (any leading dims, any strides) and a
    device; ``weight``, ``bias`` and ``input_bias`` are optional [hidden] vectors. As in the
    unfused expression, ``input``, ``residual`` and ``input_bias`` of different floating dtypes
    are promoted to a common one (e.g. a bfloat16 sublayer output under autocast added to a
    float32 residual stream gives a float32 sum and output); ``weight`` and ``bias`` take the
    sum's dtype, except that float32 ones with a float16/bfloat16 sum (norms kept in float32)
    are read unrounded and get float32 gradients.
    ``dropout_p`` drops elements of ``input + input_bias`` (inverted dropout, seeded from torch's
    default generator). With ``return_prenorm`` also returns the sum that was normalised (the
    residual stream of pre-LN models). Differentiable in every tensor argument; the backward is
    deterministic on every backend (vector gradients from partial sums added in a fixed order).
    A call that needs neither a gradient nor the pre-norm sum keeps no pre-norm tensor (the sum is
    normalised in place; the same output).

    float16, bfloat16 and float32 run fused, statistics in float32 (float64 runs the reference
    implementation, with a :class:`~fused_attn.FallbackWarning`).

    Raises ``TypeError``/``ValueError`` naming the argument for a non-floating tensor, shapes or
    devices that do not match, or ``dropout_p`` outside [0, 1] (1 drops the whole sublayer
    output: the reference's ``layer_norm(residual)``, no kernel);
    :class:`~fused_attn.BackendNotSupportedError` when a named ``backend`` cannot serve the call.

    Under ``torch.autocast`` it follows its unfused expression: on CPU nothing is cast (the sum
    promotes, ``F.layer_norm`` keeps its input's dtype); on CUDA, where ``F.layer_norm`` runs in
    float32, every floating input is cast to float32, so the output and the pre-norm sum are
    float32.
    """
    if backend is None and _FAST is not None and fast_path_open():
        out = _FAST(input, residual, weight, bias, eps, dropout_p, input_bias, return_prenorm)
        if out is not None:
            return out
    input, residual, weight, bias, input_bias = autocast_inputs(
        FLOAT32_ON_CUDA, input, input, residual, weight, bias, input_bias
    )
    input = check_tensor(input, "input", min_dim=1)
    check_bool(return_prenorm, "return_prenorm")
    residual = check_tensor(residual, "residual", min_dim=1)
    if residual.shape != input.shape:
        raise ValueError(f"residual shape {list(residual.shape)} does not match input shape {list(input.shape)}")
    check_same_device(residual, "residual", input, "input")
    hidden = input.shape[-1]
    dtype = input.dtype if residual.dtype == input.dtype else torch.promote_types(input.dtype, residual.dtype)
    if input_bias is not None and check_tensor(input_bias, "input_bias").dtype != dtype:
        dtype = torch.promote_types(dtype, input_bias.dtype)
    if input.dtype != dtype:
        input = input.to(dtype)
    if residual.dtype != dtype:
        residual = residual.to(dtype)
    param_dtype = affine_dtype(input, weight, bias)
    weight = check_param(weight, "weight", input, (hidden,), param_dtype)
    bias = check_param(bias, "bias", input, (hidden,), param_dtype)
    input_bias = check_param(input_bias, "input_bias", input, (hidden,))
    eps = check_eps(eps)
    dropout_p = check_dropout_p(dropout_p)
    features = {"hidden": hidden, **transform_features(input, residual, weight, bias, input_bias)}
    chosen = select("add_layer_norm", Inputs(input.device, input.dtype, features), backend,
                    operands=(input,), dropout_p=dropout_p)
    if chosen == "reference":
        return reference.add_layer_norm(
            input, residual, weight, bias, eps, dropout_p, input_bias, return_prenorm=return_prenorm
        )
    args = (rows(input, hidden), rows(residual, hidden), weight, bias, input_bias, eps, dropout_p,
            draw_seed(dropout_p, input))
    if not return_prenorm and chosen in _INFERENCE_OPS and not needs_grad(input, residual, weight, bias, input_bias):
        return unrows(_INFERENCE_OPS[chosen](*args), input.shape)
    out, prenorm, _, _ = _FWD_OPS[chosen](*args)
    out = unrows(out, input.shape)
    return (out, unrows(prenorm, input.shape)) if return_prenorm else out


def add_layer_norm_keep_mask(shape: tuple[int, ...], dropout_p: float, device: torch.device | str) -> torch.Tensor:
    """The dropout keep-mask the Triton kernel draws for an input of ``shape`` after the current
    RNG state (it draws the seed as the op does), for tests that replay the kernel's draw."""
    from ..kernels.triton import layer_norm as kernels

    ones = torch.ones(math.prod(shape[:-1]), shape[-1], device=device)
    seed = draw_seed(dropout_p, ones)
    _, prenorm, _, _ = kernels.add_layer_norm_fwd(ones, torch.zeros_like(ones), None, None, None, 0.0, dropout_p, seed)
    return (prenorm != 0).view(shape)
