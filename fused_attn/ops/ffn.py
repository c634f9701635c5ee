"""``fused_attn.linear_gelu`` and ``fused_attn.ffn``: the Transformer's position-wise feed-forward
block with the bias, GELU and dropout fused into the GEMMs. ``ffn(..., activation="relu")`` (torch's
Transformer layers' default) runs ReLU in the same kernels: the kernels take an activation code,
``ACTIVATIONS``, and ReLU's gradient is torch's threshold_backward (0 where the pre-activation is
<= 0). What follows says GELU for either.

``ffn`` keeps only the pre-activation ``x @ w1^T + b1`` for its backward (besides its inputs):
the activation ``gelu(pre)`` is recomputed inside the weight-gradient GEMM that needs it, which
costs a few flops per element of a GEMM operand and saves storing a second [tokens, hidden]
tensor, the largest activation of a Transformer layer. A call that needs no gradient (under
``torch.no_grad`` or ``torch.inference_mode``, or with no argument that requires grad) keeps no
pre-activation at all: the GELU is applied over the GEMM's result in place, so ``linear_gelu``
makes one [tokens, hidden] tensor fewer (README, "Inference": the paths where it does not), and
so does ``ffn`` without dropout; the output has the same bits as with a gradient.

On the ``cuda`` backend the GELU's epilogue fusion is cuBLASLt's where it has one (the tanh GELU in
float16/bfloat16, hidden size a multiple of 8): the forward GEMM applies bias and GELU and writes
the pre-activation as its auxiliary output, and in ``ffn``'s backward the GEMM that forms the
hidden gradient (``grad @ w2``) applies gelu' and reduces ``b1``'s gradient in its epilogue, so
no elementwise pass is left around either GEMM. Elsewhere one elementwise pass (forward: GELU;
backward: gelu' and the bias gradient) follows the library GEMM (``csrc/cuda/ffn.cu``).

On the ``cpu`` backend a backward that frees its graph (no ``retain_graph``) writes the
pre-activation's gradient over the saved pre-activation, which nothing reads again, instead of
into a buffer of its own (``linear_gelu_bwd_consuming`` / ``ffn_bwd_consuming``, chosen in
``csrc/autograd.cpp``), and ``ffn``'s backward forms the hidden gradient and the recomputed
activation a slab of rows at a time: its peak holds one [tokens, hidden] tensor where eager
PyTorch's holds three.
"""

from __future__ import annotations

import math

import torch

from .. import _extension, reference
from ..reference.ffn import ACTIVATION_CODES, activation_code
from ..backends import MAX_EXTENT, Inputs, Support, fast_entry, fast_path_open, register_op, select
from ._autocast import LOWER_PRECISION, autocast_inputs
from ._random import draw_seed, kernel_seed
from . import _op_checks as checks, _second_order as _second_order_grads
from ._registry import interpreter_serialized, register_fake, register_native_pair, register_pair
from ._validate import (
    KERNEL_DTYPES, check_dropout_p, check_param, check_same_device, check_tensor, dtype_name, transform_features,
    needs_grad, rows, unrows,
)

# The kernels' activation codes, their ``approximate`` argument: the GELU ("none": erf, "tanh") or
# ReLU ("relu"; public ffn's activation="relu"). The saved pre-activation means the same for each.
ACTIVATIONS = ACTIVATION_CODES
# gemm_dim: the largest dim of the op's GEMMs (rows, in/hidden/out features). The Triton GEMM's tile
# counts and K loop are 32-bit, and cuBLAS takes int dims.
GEMM_LIMITS = {"gemm_dim": (None, MAX_EXTENT)}

LINEAR_GELU = register_op(
    "linear_gelu",
    [
        Support("cuda", devices=("cuda",), dtypes=KERNEL_DTYPES, limits=GEMM_LIMITS, native_op="linear_gelu_fwd"),
        Support("triton", devices=("cuda", "cpu"), dtypes=KERNEL_DTYPES, limits=GEMM_LIMITS),
        Support("cpu", devices=("cpu",), dtypes=KERNEL_DTYPES, native_op="linear_gelu_fwd"),
        Support("reference", devices=None, dtypes=KERNEL_DTYPES + (torch.float64,)),
    ],
)
FFN = register_op(
    "ffn",
    [
        Support("cuda", devices=("cuda",), dtypes=KERNEL_DTYPES, limits=GEMM_LIMITS, native_op="ffn_fwd"),
        Support("triton", devices=("cuda", "cpu"), dtypes=KERNEL_DTYPES, limits=GEMM_LIMITS),
        Support("cpu", devices=("cpu",), dtypes=KERNEL_DTYPES, native_op="ffn_fwd"),
        Support("reference", devices=None, dtypes=KERNEL_DTYPES + (torch.float64,)),
    ],
)


# ---------------------------------------------------------------------------------------------
# linear_gelu


@torch.library.custom_op("fused_attn::triton_linear_gelu_fwd", mutates_args=())
@interpreter_serialized
def _triton_linear_gelu_fwd(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, approximate: str
) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels.triton import ffn as kernels

    _check_linear_gelu(input, weight, bias, approximate)
    return kernels.linear_gelu_fwd(input, weight, bias, approximate)


@torch.library.custom_op("fused_attn::triton_linear_gelu_bwd", mutates_args=())
@interpreter_serialized
def _triton_linear_gelu_bwd(
    grad_out: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor,
    pre_activation: torch.Tensor,
    approximate: str,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels.triton import ffn as kernels

    rows, out_features = checks.linear_input(input, weight, None)
    checks.linear_grad_out(grad_out, input, rows, out_features, "weight")
    checks.same_as(pre_activation, "pre_activation", grad_out, "grad_out")
    checks.approximate(approximate, ACTIVATIONS)
    checks.output_mask(output_mask, 3)
    return kernels.linear_gelu_bwd(grad_out, input, weight, pre_activation, approximate, output_mask)


@torch.library.custom_op("fused_attn::triton_linear_gelu_inference", mutates_args=())
@interpreter_serialized
def _triton_linear_gelu_inference(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, approximate: str
) -> torch.Tensor:
    from ..kernels.triton import ffn as kernels

    _check_linear_gelu(input, weight, bias, approximate)
    return kernels.linear_gelu_inference(input, weight, bias, approximate)


def _check_linear_gelu(input, weight, bias, approximate):
    checks.linear_input(input, weight, bias)
    checks.approximate(approximate, ACTIVATIONS)


def _fake_linear_gelu_fwd(input, weight, bias, approximate):
    out = input.new_empty(input.shape[0], weight.shape[0])
    return out, torch.empty_like(out)


def _fake_linear_gelu_inference(input, weight, bias, approximate):
    return input.new_empty(input.shape[0], weight.shape[0])


def _fake_linear_gelu_bwd(grad_out, input, weight, pre_activation, approximate, output_mask):
    return (
        torch.empty_like(input) if output_mask[0] else input.new_empty(0),
        torch.empty_like(weight) if output_mask[1] else input.new_empty(0),
        input.new_empty(weight.shape[0]) if output_mask[2] else input.new_empty(0),
    )


def _setup_linear_gelu(ctx, inputs, output):
    input, weight, bias, approximate = inputs
    ctx.save_for_backward(input, weight, output[1], bias)  # the bias for the second-order path alone
    ctx.approximate = approximate
    # The pre-activation is an output only to be saved: no zero gradient of its size is made for it.
    ctx.set_materialize_grads(False)


def _linear_gelu_backward_for(bwd_op):
    def backward(ctx, grad_out, _grad_pre):
        input, weight, pre, _ = ctx.saved_tensors
        mask = list(ctx.needs_input_grad[:3])
        grads = bwd_op(grad_out.contiguous(), input, weight, pre, ctx.approximate, mask)
        return (*(g if m else None for g, m in zip(grads, mask)), None)

    return backward


def _linear_gelu_second_order(ctx, grad_out, _grad_pre):
    input, weight, _, bias = ctx.saved_tensors
    grads = _second_order_grads.linear_gelu(
        (grad_out, input, weight, bias), (ACTIVATIONS.index(ctx.approximate),), ctx.needs_input_grad[:3]
    )
    return (*grads, None)


def _register_linear_gelu(fwd: str, bwd: str) -> object:
    return register_pair(
        fwd, bwd, fake_fwd=_fake_linear_gelu_fwd, fake_bwd=_fake_linear_gelu_bwd,
        setup_context=_setup_linear_gelu, backward_for=_linear_gelu_backward_for,
        second_order=_linear_gelu_second_order,
    )


_LINEAR_GELU_OPS = {"triton": _register_linear_gelu("triton_linear_gelu_fwd", "triton_linear_gelu_bwd")}
# Calls that need no gradient take the inference form: the output alone, with the same bits, and no
# pre-activation kept (the GELU is applied over the GEMM's result in place where the backend can),
# so the call's peak holds one [rows, out_features] tensor instead of two.
register_fake("triton_linear_gelu_inference", _fake_linear_gelu_inference)
_LINEAR_GELU_INFERENCE = {"triton": torch.ops.fused_attn.triton_linear_gelu_inference}
if _extension.loaded():
    _LINEAR_GELU_OPS["cpu"] = _LINEAR_GELU_OPS["cuda"] = register_native_pair(
        "linear_gelu_fwd", "linear_gelu_bwd", fake_fwd=_fake_linear_gelu_fwd, fake_bwd=_fake_linear_gelu_bwd
    )
    register_fake("linear_gelu_inference", _fake_linear_gelu_inference)
    # What the CPU autograd formula calls in a backward that frees its graph: linear_gelu_bwd, writing
    # grad_pre over the saved pre-activation (csrc/autograd.cpp, may_consume).
    register_fake("linear_gelu_bwd_consuming", _fake_linear_gelu_bwd)
    # What the FFN's backward calls on the hidden gradient, its own temporary (csrc/ffn.cpp).
    register_fake("linear_gelu_bwd_scratch", _fake_linear_gelu_bwd)
    _LINEAR_GELU_INFERENCE["cpu"] = _LINEAR_GELU_INFERENCE["cuda"] = torch.ops.fused_attn.linear_gelu_inference


# ---------------------------------------------------------------------------------------------
# ffn


# The op named by the Triton ops' errors (kernel_seed).
_TRITON_FFN = "fused_attn::triton_ffn"


@torch.library.custom_op("fused_attn::triton_ffn_fwd", mutates_args=())
@interpreter_serialized
def _triton_ffn_fwd(
    input: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    approximate: str,
    dropout_p: float,
    seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (output [rows, out], pre-activation [rows, hidden])."""
    from ..kernels.triton import ffn as kernels

    checks.ffn_weights(input, w1, b1, w2, b2)
    checks.approximate(approximate, ACTIVATIONS)
    checks.dropout_p(dropout_p)
    seed = kernel_seed(seed, dropout_p, input, _TRITON_FFN)  # checked before the GEMMs; the dropout comes last
    hidden, pre = kernels.linear_gelu_fwd(input, w1, b1, approximate)
    out = input.new_empty(input.shape[0], w2.shape[0])
    epilogue = kernels.EPILOGUE_BIAS_DROPOUT if dropout_p > 0.0 else kernels.EPILOGUE_BIAS
    kernels.gemm(hidden, w2.t(), out, epilogue=epilogue, bias=b2, seed=seed, dropout_p=dropout_p)
    return out, pre


@torch.library.custom_op("fused_attn::triton_ffn_inference", mutates_args=())
@interpreter_serialized
def _triton_ffn_inference(
    input: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor, b2: torch.Tensor | None,
    approximate: str,
) -> torch.Tensor:
    """triton_ffn_fwd's output without dropout (the same bits), keeping no pre-activation."""
    from ..kernels.triton import ffn as kernels

    checks.ffn_weights(input, w1, b1, w2, b2)
    checks.approximate(approximate, ACTIVATIONS)
    hidden = kernels.linear_gelu_inference(input, w1, b1, approximate)
    out = input.new_empty(input.shape[0], w2.shape[0])
    return kernels.gemm(hidden, w2.t(), out, epilogue=kernels.EPILOGUE_BIAS, bias=b2)


def _fake_ffn_inference(input, w1, b1, w2, b2, approximate):
    return input.new_empty(input.shape[0], w2.shape[0])


register_fake("triton_ffn_inference", _fake_ffn_inference)


@torch.library.custom_op("fused_attn::triton_ffn_bwd", mutates_args=())
@interpreter_serialized
def _triton_ffn_bwd(
    grad_out: torch.Tensor,
    input: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    pre_activation: torch.Tensor,
    approximate: str,
    dropout_p: float,
    seed: torch.Tensor | None,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (d_input, d_w1, d_b1, d_w2, d_b2) as selected by output_mask."""
    from ..kernels.triton import ffn as kernels

    rows, hidden = checks.linear_input(input, w1, None, ("w1", "b1"))
    out_features = checks.linear_weight(w2, "w2", input, hidden, "hidden features of w1")
    checks.linear_grad_out(grad_out, input, rows, out_features, "w2")
    checks.pre_activation(pre_activation, input, rows, hidden)
    checks.approximate(approximate, ACTIVATIONS)
    checks.dropout_p(dropout_p)
    checks.output_mask(output_mask, 5)
    drop = dict(
        a_prologue=kernels.PROLOGUE_DROPOUT if dropout_p > 0.0 else kernels.PROLOGUE_NONE,
        seed=kernel_seed(seed, dropout_p, input, _TRITON_FFN), dropout_p=dropout_p,
    )
    need_dx, need_dw1, need_db1, need_dw2, need_db2 = output_mask
    # A gradient not asked for is an empty tensor of its own: outputs of a custom op may not alias.
    dw2, db2 = input.new_empty(0), input.new_empty(0)
    if need_dw2 or need_db2:
        # dW2 [out, hidden] = dY'^T @ act(pre): dropout regenerated on A, the activation recomputed on B.
        sums = torch.empty(out_features, device=input.device, dtype=torch.float32) if need_db2 else None
        dw2_buf = torch.empty_like(w2)
        kernels.gemm(grad_out.t(), pre_activation, dw2_buf, b_prologue=kernels.PROLOGUE_GELU, row_sums=sums,
                     approximate=approximate, rng_strides=(1, out_features), **drop)
        dw2 = dw2_buf if need_dw2 else dw2
        db2 = sums.to(input.dtype) if need_db2 else db2
    dx, dw1, db1 = input.new_empty(0), input.new_empty(0), input.new_empty(0)
    if need_dx or need_dw1 or need_db1:
        # dPre = (dY' @ W2) * act'(pre), act' in the epilogue: once per element, and rounded once.
        grad_pre = kernels.gemm(grad_out, w2, pre_activation.new_empty(pre_activation.shape),
                                epilogue=kernels.EPILOGUE_DGELU, aux=pre_activation, approximate=approximate,
                                rng_strides=(out_features, 1), **drop)
        dx, dw1, db1 = kernels.linear_grads(grad_pre, input, w1, [need_dx, need_dw1, need_db1])
    return dx, dw1, db1, dw2, db2


def _fake_ffn_fwd(input, w1, b1, w2, b2, approximate, dropout_p, seed):
    return input.new_empty(input.shape[0], w2.shape[0]), input.new_empty(input.shape[0], w1.shape[0])


def _fake_ffn_bwd(grad_out, input, w1, w2, pre_activation, approximate, dropout_p, seed, output_mask):
    shapes = [input.shape, w1.shape, (w1.shape[0],), w2.shape, (w2.shape[0],)]
    return tuple(input.new_empty(s) if m else input.new_empty(0) for s, m in zip(shapes, output_mask))


def _setup_ffn(ctx, inputs, output):
    input, w1, b1, w2, _b2, approximate, dropout_p, seed = inputs
    ctx.save_for_backward(input, w1, w2, output[1], seed, b1)  # b1 for the second-order path alone
    ctx.approximate, ctx.dropout_p = approximate, dropout_p
    ctx.set_materialize_grads(False)  # as in _setup_linear_gelu


def _ffn_backward_for(bwd_op):
    def backward(ctx, grad_out, _grad_pre):
        input, w1, w2, pre, seed, _ = ctx.saved_tensors
        mask = list(ctx.needs_input_grad[:5])
        grads = bwd_op(grad_out.contiguous(), input, w1, w2, pre, ctx.approximate, ctx.dropout_p, seed, mask)
        return (*(g if m else None for g, m in zip(grads, mask)), None, None, None)

    return backward


def _ffn_second_order(ctx, grad_out, _grad_pre):
    input, w1, w2, _, seed, b1 = ctx.saved_tensors
    grads = _second_order_grads.ffn(
        (grad_out, input, w1, b1, w2, seed), (ACTIVATIONS.index(ctx.approximate), ctx.dropout_p),
        ctx.needs_input_grad[:5]
    )
    return (*grads, None, None, None)


def _register_ffn(fwd: str, bwd: str) -> object:
    return register_pair(
        fwd, bwd, fake_fwd=_fake_ffn_fwd, fake_bwd=_fake_ffn_bwd, setup_context=_setup_ffn,
        backward_for=_ffn_backward_for, second_order=_ffn_second_order,
    )


# The CPU and CUDA backends compose their fused linear_gelu kernels with a library GEMM for the
# second linear (fused_attn::ffn_fwd/ffn_bwd, csrc/ffn.cpp, autograd in C++). Their dropout draws
# from the package's Philox stream at the element the Triton GEMM epilogue uses (row * out + col),
# so every backend drops the same elements for the same seed, and the backward regenerates it.


_FFN_OPS = {"triton": _register_ffn("triton_ffn_fwd", "triton_ffn_bwd")}
# The inference form without dropout (see linear_gelu): the same bits as the ffn_fwd output.
_FFN_INFERENCE = {"triton": torch.ops.fused_attn.triton_ffn_inference}
if _extension.loaded():
    _FFN_OPS["cpu"] = _FFN_OPS["cuda"] = register_native_pair(
        "ffn_fwd", "ffn_bwd", fake_fwd=_fake_ffn_fwd, fake_bwd=_fake_ffn_bwd
    )
    register_fake("ffn_inference", _fake_ffn_inference)
    # What the CPU autograd formula calls in a backward that frees its graph: ffn_bwd, writing the
    # pre-activation's gradient over the saved pre-activation (csrc/autograd.cpp, may_consume).
    register_fake("ffn_bwd_consuming", _fake_ffn_bwd)
    _FFN_INFERENCE["cpu"] = _FFN_INFERENCE["cuda"] = torch.ops.fused_attn.ffn_inference


# ---------------------------------------------------------------------------------------------
# Public functions

# Their C++ entries for the plain call (fused_attn.backends.fast_entry; csrc/fast.cpp), or None.
_FAST_LINEAR_GELU = fast_entry("linear_gelu")
_FAST_FFN = fast_entry("ffn")


def _gemm_dim(input: torch.Tensor, *weights: torch.Tensor) -> int:
    """The largest dim of the GEMMs of ``input`` [..., in] through ``weights`` [out, in] in turn.
    ``torch.sym_max``: under torch.export a dynamic dim is symbolic, and comparing it, as ``max``
    would, adds a guard that a dynamic dim's range violates."""
    shape = input.shape
    dims = [math.prod(shape[:-1]), shape[-1]]
    for w in weights:
        dims.append(w.shape[0])
    for dim in dims:  # a loop, not all() of a generator: this runs on every eager call
        if type(dim) is not int:
            break
    else:
        return max(dims)  # eager calls: a third of sym_max's host time
    largest = dims[0]
    for dim in dims[1:]:
        largest = torch.sym_max(largest, dim)
    return largest


def _check_linear(input: torch.Tensor, weight: object, bias: object, names: tuple[str, str], in_features: int):
    weight = check_tensor(weight, names[0])
    if weight.dim() != 2 or weight.shape[1] != in_features:
        raise ValueError(f"{names[0]} must have shape [out_features, {in_features}], got {list(weight.shape)}")
    if weight.dtype != input.dtype:
        raise TypeError(f"{names[0]} dtype {dtype_name(weight.dtype)} does not match input dtype {dtype_name(input.dtype)}")
    check_same_device(weight, names[0], input, "input")
    return weight, check_param(bias, names[1], input, (weight.shape[0],))


# (activation, approximate) -> the kernels' code, for the plain call's C++ entry (which takes a code).
_CODES = {("gelu", "none"): "none", ("gelu", "tanh"): "tanh", ("relu", "none"): "relu"}
_ARGUMENTS = {code: {"activation": activation, "approximate": approximate}
              for (activation, approximate), code in _CODES.items()}


def ffn_activation(code: str) -> dict[str, str]:
    """ffn's ``activation`` and ``approximate`` for one of the kernels' activation codes."""
    return dict(_ARGUMENTS[code])


def _weight_operand(weight: torch.Tensor, backend: str) -> torch.Tensor:
    """A weight as ``backend``'s kernels take it: the CPU GEMMs read any strides (a weight stored
    transposed, as transformers' Conv1D stores it, is read in place, and the backward saves that
    view of the parameter, not a copy of it), the cuda and triton kernels a contiguous one."""
    return weight if backend == "cpu" else weight.contiguous()


def linear_gelu(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    approximate: str = "none",
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``gelu(input @ weight^T + bias)`` with the bias and GELU in the GEMM's epilogue.

    ``input`` [..., in_features] (any leading dims), ``weight`` [out_features, in_features] of
    the input's dtype, ``bias`` [out_features] or None; ``approximate`` "none" (erf) or "tanh".
    Returns [..., out_features] in the input's dtype. float16, bfloat16 and float32 run fused,
    accumulating in float32 (float64 runs the reference implementation, with a
    :class:`~fused_attn.FallbackWarning`); a bias of another floating dtype is cast to the input's.
    The backward applies dGELU inside the gradient GEMMs and reduces the bias gradient in the
    same pass; a call that needs no gradient keeps no pre-activation (the GELU is applied in
    place over the GEMM's result: one [rows, out_features] tensor fewer, the same output). On CPU,
    a backward that frees the graph writes the pre-activation's gradient over the saved
    pre-activation instead of a buffer of its own (the same bits).
    Raises ``TypeError``/``ValueError`` naming the argument on mismatched shapes, dtypes or
    devices, :class:`~fused_attn.BackendNotSupportedError` when a named ``backend``
    cannot serve the call. Under ``torch.autocast`` input, weight and bias are cast to the
    autocast dtype, as ``F.linear``'s.
    """
    if approximate == "relu":  # a code of the kernels, not a GELU
        activation_code("gelu", approximate)  # raises, naming approximate
    return linear_activation(input, weight, bias, approximate, backend=backend)


def linear_activation(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, code: str, *, backend: str | None = None
) -> torch.Tensor:
    """``act(input @ weight^T + bias)``, ``act`` given by the kernels' activation code (ACTIVATIONS:
    "none" and "tanh" the GELUs of :func:`linear_gelu`, "relu" ReLU), fused as linear_gelu is (the
    op ``linear_gelu`` of the backend policy and of ``last_backend``). For the fused layers, whose
    feed-forward with an active inner dropout runs the first linear and its activation fused."""
    if backend is None and _FAST_LINEAR_GELU is not None and fast_path_open():
        out = _FAST_LINEAR_GELU(input, weight, bias, code)
        if out is not None:
            return out
    input, weight, bias = autocast_inputs(LOWER_PRECISION, input, input, weight, bias)
    input = check_tensor(input, "input", min_dim=1)
    weight, bias = _check_linear(input, weight, bias, ("weight", "bias"), input.shape[-1])
    if code not in ACTIVATIONS:
        activation_code("gelu", code)  # raises, naming approximate
    features = {**transform_features(input, weight, bias), "gemm_dim": _gemm_dim(input, weight)}
    chosen = select("linear_gelu", Inputs(input.device, input.dtype, features), backend, operands=(input, weight))
    if chosen == "reference":
        return reference.linear_activation(input, weight, bias, code)
    args = (rows(input, input.shape[-1]), _weight_operand(weight, chosen), bias, code)
    if needs_grad(input, weight, bias):
        out, _ = _LINEAR_GELU_OPS[chosen](*args)
    else:
        out = _LINEAR_GELU_INFERENCE[chosen](*args)
    return unrows(out, input.shape)


def ffn(
    input: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    approximate: str = "none",
    dropout_p: float = 0.0,
    *,
    activation: str = "gelu",
    backend: str | None = None,
) -> torch.Tensor:
    """The position-wise feed-forward block ``dropout(linear(act(linear(input, w1, b1)), w2, b2))``.

    ``act`` is the GELU (``approximate`` "none": erf, or "tanh"), or ReLU with
    ``activation="relu"`` (``approximate`` then "none"; torch's ``TransformerEncoderLayer``
    default), fused the same way on every backend.

    ``input`` [..., model], ``w1`` [hidden, model] and ``w2`` [model_out, hidden] of the input's
    dtype (any strides: the CPU kernels read a weight stored transposed in place, the cuda and
    triton kernels take a contiguous copy), biases optional (cast to the input's dtype); returns
    [..., model_out] in the input's dtype. float16, bfloat16 and float32 run fused, accumulating
    in float32 (float64 runs the reference implementation, with a
    :class:`~fused_attn.FallbackWarning`). Only the
    pre-activation is kept for the backward (the activation is recomputed inside the GEMM that
    needs it), and none when the call needs no gradient and has no dropout. On CPU the backward
    forms the hidden gradient a slab of rows at a time and, when it frees the graph, writes the
    pre-activation's gradient over the saved pre-activation; where the CPU lacks native
    float16/bfloat16 GEMMs, every GEMM runs on float32 operands (README, "Results"). ``dropout_p`` in
    [0, 1) drops output elements (seeded from torch's default generator; README, "Dropout"); 1 drops
    them all (the reference's zeros, no kernel).
    Raises ``TypeError``/``ValueError`` naming the argument on mismatched shapes, dtypes or
    devices, :class:`~fused_attn.BackendNotSupportedError` when a named ``backend`` cannot serve
    the call. Under ``torch.autocast`` every floating tensor is cast to the autocast dtype, as
    ``F.linear``'s.
    """
    if backend is None and _FAST_FFN is not None and fast_path_open():
        # An unknown pair (or one of other types) is checked, and named, below.
        code = _CODES.get((activation, approximate)) if type(activation) is str and type(approximate) is str else None
        if code is not None:
            out = _FAST_FFN(input, w1, b1, w2, b2, code, dropout_p)
            if out is not None:
                return out
    input, w1, b1, w2, b2 = autocast_inputs(LOWER_PRECISION, input, input, w1, b1, w2, b2)
    input = check_tensor(input, "input", min_dim=1)
    w1, b1 = _check_linear(input, w1, b1, ("w1", "b1"), input.shape[-1])
    w2, b2 = _check_linear(input, w2, b2, ("w2", "b2"), w1.shape[0])
    code = activation_code(activation, approximate)
    dropout_p = check_dropout_p(dropout_p)
    features = {**transform_features(input, w1, b1, w2, b2), "gemm_dim": _gemm_dim(input, w1, w2)}
    chosen = select("ffn", Inputs(input.device, input.dtype, features), backend,
                    operands=(input, w1, w2), dropout_p=dropout_p)
    if chosen == "reference":
        return reference.ffn(input, w1, b1, w2, b2, approximate, dropout_p, activation=activation)
    flat, w1, w2 = rows(input, input.shape[-1]), _weight_operand(w1, chosen), _weight_operand(w2, chosen)
    if dropout_p == 0.0 and not needs_grad(input, w1, b1, w2, b2):
        out = _FFN_INFERENCE[chosen](flat, w1, b1, w2, b2, code)
    else:
        out, _ = _FFN_OPS[chosen](flat, w1, b1, w2, b2, code, dropout_p, draw_seed(dropout_p, flat))
    return unrows(out, input.shape)


def ffn_keep_mask(rows: int, out_features: int, dropout_p: float, device: torch.device | str, backend: str) -> torch.Tensor:
    """The dropout keep-mask [rows, out_features] that ``ffn`` on ``backend`` draws after the
    current RNG state (the seed is drawn as the op draws it), for tests that replay the draw: the
    backend's own kernel run on an FFN whose output is gelu(1) everywhere."""
    from ..kernels.triton import ffn as kernels

    if backend not in ("cpu", "cuda", "triton"):
        raise ValueError(f"backend must be 'cpu', 'cuda' or 'triton' (the FFN's kernels), got {backend!r}")
    ones = torch.ones(rows, 1, device=device)
    seed = draw_seed(dropout_p, ones)
    if backend != "triton":
        w2 = torch.ones(out_features, 1, device=device)
        out, _ = torch.ops.fused_attn.ffn_fwd(ones, torch.ones(1, 1, device=device), None, w2, None, "none",
                                              dropout_p, seed)
        return out != 0
    out = torch.empty(rows, out_features, device=device)
    kernels.gemm(ones, torch.ones(1, out_features, device=device), out, epilogue=kernels.EPILOGUE_BIAS_DROPOUT,
                 seed=seed, dropout_p=dropout_p)
    return out != 0
