"""Registration shared by every op: fake kernels and the autograd formula of a (fwd, bwd) pair."""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable

import torch

from ..backends import triton_interpret_mode
from . import _second_order

_INTERPRETER_LOCK = threading.Lock()


def interpreter_serialized(fn: Callable) -> Callable:
    """A Triton op's implementation, run one call at a time under ``TRITON_INTERPRET=1``: the
    interpreter keeps a launch's grid in process-wide state, so two threads launching at once
    fail ("x >= grid_dim[0]"). On a GPU, calls run concurrently as any op's. Placed under
    ``torch.library.custom_op``, which reads the signature through ``functools.wraps``."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if not triton_interpret_mode():
            return fn(*args, **kwargs)
        with _INTERPRETER_LOCK:
            return fn(*args, **kwargs)

    return run


def register_pair(
    fwd: str,
    bwd: str,
    *,
    fake_fwd: Callable,
    fake_bwd: Callable,
    setup_context: Callable,
    backward_for: Callable[[object], Callable],
    second_order: Callable,
) -> object:
    """Registers ``fused_attn::{fwd}`` and ``fused_attn::{bwd}``'s fake kernels and makes the
    forward differentiable through ``backward_for(bwd op)``, or, where the backward must give
    gradients autograd can differentiate again (``_second_order.wanted``: create_graph=True, or a
    forward-mode tangent on the incoming gradient), through ``second_order(ctx, *grads)`` (the op's
    reference recomputed, ``_second_order``), as the extension's ops do. The backward op itself has
    no derivative: called directly, differentiating its outputs raises. Returns the forward op."""
    register_native_pair(fwd, bwd, fake_fwd=fake_fwd, fake_bwd=fake_bwd)
    formula = backward_for(getattr(torch.ops.fused_attn, bwd))

    @functools.wraps(formula)
    def backward(ctx, *grads):
        if _second_order.wanted(grads):
            return second_order(ctx, *grads)
        return formula(ctx, *grads)

    torch.library.register_autograd(f"fused_attn::{fwd}", backward, setup_context=setup_context)
    torch.library.register_autograd(f"fused_attn::{bwd}", _no_second_derivative(bwd))
    return getattr(torch.ops.fused_attn, fwd)


def _no_second_derivative(bwd: str) -> Callable:
    """The autograd formula of a backward op: its kernels have no derivative, so differentiating
    the gradients it gave when called directly raises here, with what to do instead, rather than
    with torch's advice to register a formula. (The public ops never need it: their backward
    takes the differentiable path when a graph is asked for.)"""

    def backward(ctx, *grads):
        raise RuntimeError(
            f"derivative for fused_attn::{bwd} is not implemented: it is the kernels' backward, whose gradients "
            "have no derivative of their own; the fused ops' own backward gives differentiable gradients "
            "(create_graph=True), or call the op with backend='reference'"
        )

    return backward


def register_native_pair(fwd: str, bwd: str, *, fake_fwd: Callable, fake_bwd: Callable) -> object:
    """The fake kernels of a pair of ``fused_attn._C`` ops, whose autograd formula the extension
    registers in C++ (csrc/autograd.cpp: no trip through Python per call). Returns the forward op."""
    register_fake(fwd, fake_fwd)
    register_fake(bwd, fake_bwd)
    return getattr(torch.ops.fused_attn, fwd)


def register_fake(op: str, fake: Callable) -> None:
    """Registers ``fused_attn::{op}``'s fake kernel, which also serves a meta tensor among real ones
    (the dispatcher sends such a call to it): it refuses tensors on different devices, as every
    kernel does, instead of describing outputs on the first argument's device. ``seed`` is the one
    argument that may be on the CPU with tensors on another device (a direct call's)."""
    names = tuple(inspect.signature(fake).parameters)

    @functools.wraps(fake)
    def checked(*args, **kwargs):
        first = None
        for name, value in (*zip(names, args), *kwargs.items()):
            if not isinstance(value, torch.Tensor) or name == "seed":
                continue
            if first is None:
                first = (name, value.device)
            elif value.device != first[1]:
                raise RuntimeError(
                    f"fused_attn::{op}: {name} must be on {first[1]} like {first[0]}, got {value.device}"
                )
        return fake(*args, **kwargs)

    torch.library.register_fake(f"fused_attn::{op}", checked)
