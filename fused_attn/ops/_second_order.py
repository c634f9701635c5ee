"""Gradients autograd can differentiate again: the fused ops' backward for second-order autograd.

The fused backward kernels give first-order gradients with no derivative of their own. A backward
that must give more, one run with ``create_graph=True`` (gradient penalties, double-backward
Hessian-vector products, second-order meta-learning) or one whose incoming gradient carries a
forward-mode tangent (forward-over-reverse), takes this path instead, in every op's autograd
formula (csrc/autograd.cpp for the cpu and cuda kernels, ``_registry.register_pair`` for the
Triton ones): the gradients of the op's plain-torch reference, formed from what the forward saved
with a graph (attention, linear_gelu and ffn by autograd through their recomputed reference, the
norms and softmax in closed form), which autograd differentiates to any order. They are the
reference backend's gradients; the forward's output stays the kernel's. Such a backward costs what
the reference's costs (attention's holds its ``[Lq, Lk]`` probabilities), and says so once per op
(a FallbackWarning); every other backward is the kernels'. With dropout the reference is given
the keep-mask the kernels drew, regenerated from the call's seed (``reference._philox``).

Each formula takes ``(tensors, scalars, needs)``: the tensors the op's autograd formula holds (the
incoming gradient first), its scalar arguments, and which of the forward's tensor arguments want a
gradient; it returns one gradient (or None) per such argument. The cpu and cuda formulas, in C++,
reach them through the op ``fused_attn::differentiable_backward`` (CompositeImplicitAutograd, so
autograd records what it runs).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence

import torch

from .. import reference
from ..backends import warn_once
from ..reference._dropout import apply_dropout
from ..reference.ffn import ACTIVATION_CODES
from ..reference._philox import keep_mask

Tensors = Sequence[torch.Tensor | None]
Grads = list[torch.Tensor | None]


@contextlib.contextmanager
def _recomputing(device: torch.device) -> Iterator[None]:
    """Where a formula records its graph: grad mode on (a forward-over-reverse backward runs with
    it off) and autocast off, as the fused ops run their kernels (csrc/autocast.cpp), so that a
    backward called under autocast recomputes in the dtypes the forward computed in."""
    with torch.enable_grad(), torch.autocast(device.type, enabled=False):
        yield


def _noted(op: str) -> Callable:
    """A formula that says once per process (a FallbackWarning) that ``op``'s backward ran it, the
    reference's gradients, instead of the fused kernels'."""

    def wrap(formula: Callable) -> Callable:
        @functools.wraps(formula)
        def noted(*args):
            warn_once(f"fused_attn.{op}: a backward with create_graph=True (or a forward-mode tangent on its incoming "
                      "gradient) runs the reference's differentiable gradients, not the fused backward kernels")
            return formula(*args)

        return noted

    return wrap


def _grads(output: torch.Tensor, grad_output: torch.Tensor, inputs: Tensors, needs: Sequence[bool]) -> Grads:
    """d output / d inputs[i], contracted with ``grad_output``, with a graph, for each needed input."""
    wanted = [t for t, need in zip(inputs, needs) if need]
    got = iter(torch.autograd.grad(output, wanted, grad_output, create_graph=True, allow_unused=True) if wanted else ())
    grads = [next(got) if need else None for need in needs]
    # An input the output does not depend on gets a zero gradient, not None (which C++ cannot return).
    return [torch.zeros_like(t) if need and g is None else g for g, t, need in zip(grads, inputs, needs)]


def _keep(seed: torch.Tensor | None, shape: tuple[int, ...], dropout_p: float, device: torch.device):
    return keep_mask(seed, shape, dropout_p, device) if dropout_p > 0.0 else None


def _rows_sum(t: torch.Tensor) -> torch.Tensor:
    return t.float().sum(0)


@_noted("scaled_dot_product_attention")
def attention(tensors: Tensors, scalars: Sequence[float], needs: Sequence[bool]) -> Grads:
    """scaled_dot_product_attention: tensors (grad_out, query, key, value, attn_mask, seed), scalars
    (scale, is_causal, dropout_p); gradients of query, key, value, attn_mask."""
    from .attention import repeat_kv_heads

    grad_out, query, key, value, attn_mask, seed = tensors
    scale, is_causal, dropout_p = scalars
    batch, heads, q_len, _ = query.shape
    keep = _keep(seed, (batch, heads, q_len, key.shape[2]), dropout_p, query.device)
    with _recomputing(query.device):
        out = reference.scaled_dot_product_attention(
            query, repeat_kv_heads(key, heads), repeat_kv_heads(value, heads), attn_mask, dropout_p,
            bool(is_causal), scale, dropout_mask=keep,
        )
        return _grads(out, grad_out, (query, key, value, attn_mask), needs)


@_noted("softmax")
def softmax(tensors: Tensors, scalars: Sequence[float], needs: Sequence[bool]) -> Grads:
    """softmax over the last dim: tensors (grad_out, output), scalars (scale,); gradients of the
    input and (float32) of the mask. In closed form on the saved output, through which autograd
    reaches the input again."""
    grad_out, out = tensors
    (scale,) = scalars
    with _recomputing(out.device):
        y, g = out.float(), grad_out.float()
        grad_scores = y * (g - (g * y).sum(-1, keepdim=True))
        return [(grad_scores * scale).to(out.dtype) if needs[0] else None, grad_scores if needs[1] else None]


def _layer_norm_grads(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, eps: float,
                      need_weight: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The input and weight gradients of layer_norm over the last dim, in closed form on ``x`` (in
    at least float32, as the reference): differentiable in x, weight and grad_out without a nested
    backward, so ``x`` may be an output of the node whose backward this is (add_layer_norm's saved
    pre-norm sum), whose own backward a nested one would wait for."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    centred = x.to(dtype) - x.to(dtype).mean(-1, keepdim=True)
    rstd = torch.rsqrt((centred * centred).mean(-1, keepdim=True) + eps)
    x_hat = centred * rstd
    g = grad_out.to(dtype)
    gw = g if weight is None else g * weight.to(dtype)
    grad_x = rstd * (gw - gw.mean(-1, keepdim=True) - x_hat * (gw * x_hat).mean(-1, keepdim=True))
    return grad_x.to(x.dtype), ((g * x_hat).sum(0) if need_weight else None)


@_noted("layer_norm")
def layer_norm(tensors: Tensors, scalars: Sequence[float], needs: Sequence[bool]) -> Grads:
    """layer_norm over the rows of a 2-D input: tensors (grad_out, input, weight), scalars (eps,);
    gradients of input, weight, bias."""
    grad_out, input, weight = tensors
    with _recomputing(input.device):
        grad_input, grad_weight = _layer_norm_grads(grad_out, input, weight, scalars[0], needs[1])
    return [grad_input if needs[0] else None, grad_weight, _rows_sum(grad_out) if needs[2] else None]


@_noted("add_layer_norm")
def add_layer_norm(tensors: Tensors, scalars: Sequence[float], needs: Sequence[bool]) -> Grads:
    """layer_norm(residual + dropout(input + input_bias)): tensors (grad_out, grad_prenorm, prenorm,
    weight, seed), scalars (eps, dropout_p); gradients of input, residual, weight, bias, input_bias.
    The norm's gradient is formed from the saved pre-norm sum, through which autograd reaches input
    and residual again (the sum's own gradient, grad_prenorm, is that of a linear function)."""
    grad_out, grad_prenorm, prenorm, weight, seed = tensors
    eps, dropout_p = scalars
    if grad_out is None:
        grad_out = torch.zeros_like(prenorm)
    with _recomputing(prenorm.device):
        grad_sum, grad_weight = _layer_norm_grads(grad_out, prenorm, weight, eps, needs[2])
        if grad_prenorm is not None:
            grad_sum = grad_sum + grad_prenorm
        grad_input = apply_dropout(grad_sum, dropout_p, _keep(seed, tuple(prenorm.shape), dropout_p, prenorm.device))
    return [
        grad_input if needs[0] else None,
        grad_sum if needs[1] else None,
        grad_weight,
        _rows_sum(grad_out) if needs[3] else None,
        _rows_sum(grad_input) if needs[4] else None,
    ]


@_noted("linear_gelu")
def linear_gelu(tensors: Tensors, scalars: Sequence[float], needs: Sequence[bool]) -> Grads:
    """act(input @ weight.T + bias): tensors (grad_out, input, weight, bias), scalars (activation,),
    the activation code's index in ACTIVATION_CODES (0 erf GELU, 1 tanh GELU, 2 ReLU); gradients
    of input, weight, bias."""
    grad_out, input, weight, bias = tensors
    with _recomputing(input.device):
        out = reference.linear_activation(input, weight, bias, ACTIVATION_CODES[int(scalars[0])])
        return _grads(out, grad_out, (input, weight, bias), needs)


@_noted("ffn")
def ffn(tensors: Tensors, scalars: Sequence[float], needs: Sequence[bool]) -> Grads:
    """dropout(linear(act(linear(input, w1, b1)), w2, b2)): tensors (grad_out, input, w1, b1, w2,
    seed), scalars (activation, dropout_p), the activation as in linear_gelu; gradients of input,
    w1, b1, w2, b2 (b2's depends on no tensor but grad_out, so it is not saved)."""
    grad_out, input, w1, b1, w2, seed = tensors
    activation, dropout_p = scalars
    keep = _keep(seed, tuple(grad_out.shape), dropout_p, grad_out.device)
    with _recomputing(input.device):
        code = ACTIVATION_CODES[int(activation)]
        hidden = reference.linear_activation(input, w1, b1, code)
        out = apply_dropout(torch.nn.functional.linear(hidden, w2), dropout_p, keep)
        grads = _grads(out, grad_out, (input, w1, b1, w2), needs[:4])
        return [*grads, _rows_sum(apply_dropout(grad_out, dropout_p, keep)) if needs[4] else None]


FORMULAS: dict[str, Callable[[Tensors, Sequence[float], Sequence[bool]], Grads]] = {
    "attention": attention,
    "softmax": softmax,
    "layer_norm": layer_norm,
    "add_layer_norm": add_layer_norm,
    "linear_gelu": linear_gelu,
    "ffn": ffn,
}


def wanted(grads: Sequence[torch.Tensor | None]) -> bool:
    """Whether a backward called with ``grads`` must give differentiable gradients: grad mode is on
    (the backward of a ``create_graph=True`` call), or a gradient carries a forward-mode tangent."""
    if torch.is_grad_enabled():
        return True
    return any(
        isinstance(g, torch.Tensor) and torch.autograd.forward_ad.unpack_dual(g).tangent is not None for g in grads
    )


def _differentiable_backward(op: str, tensors: list, scalars: list[float], needs: list[int]) -> list[torch.Tensor]:
    grads = FORMULAS[op](tensors, scalars, [bool(n) for n in needs])
    # A Tensor[] cannot hold None: an empty tensor stands for a gradient not asked for.
    return [torch.empty(0) if g is None else g for g in grads]


_LIB = torch.library.Library("fused_attn", "FRAGMENT")
_LIB.define("differentiable_backward(str op, Tensor?[] tensors, float[] scalars, int[] needs) -> Tensor[]")
_LIB.impl("differentiable_backward", _differentiable_backward, "CompositeImplicitAutograd")
