"""The autograd formulas of the cpu/cuda ops (csrc/autograd.cpp) for every combination of
optional tensors given or absent and of inputs that require grad or not.

The C++ autograd node numbers its input edges over the tensors a call was given, so an absent
optional argument shifts the edges of those after it; each formula maps them back to argument
positions. A mistake there gives a gradient to the wrong argument, or none, or fails outright,
only for some combinations: every combination is run here, each against the float64 reference
(tests/conftest.py, assert_parity), and an argument that does not require grad must get none.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import fused_attn
from fused_attn import reference

from .conftest import assert_parity, backend_params


def _native(op: str) -> list:
    return [p for p in backend_params(op) if p.values[0][0] in ("cpu", "cuda")]


def _subsets(names: tuple[str, ...]):
    """Every non-empty subset of ``names``."""
    for r in range(1, len(names) + 1):
        yield from itertools.combinations(names, r)


def _dtype(device: str) -> torch.dtype:
    # The cuda attention kernels take float16/bfloat16 only; float16 everywhere on CUDA keeps one rule.
    return torch.float32 if device == "cpu" else torch.float16


def _check(fused, plain, args: dict, grad_args: tuple[str, ...]) -> None:
    assert_parity(fused, plain, args, grad_args=grad_args)
    # assert_parity makes its own leaves; check here that arguments left out get no gradient.
    leaves = {k: v.detach().clone().requires_grad_(k in grad_args) if isinstance(v, torch.Tensor) and
              v.is_floating_point() else v for k, v in args.items()}
    fused(**leaves).sum().backward()
    for k, v in leaves.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            assert (v.grad is not None) == (k in grad_args), f"{k}: gradient {'missing' if k in grad_args else 'given'}"


@pytest.mark.parametrize("backend_device", _native("layer_norm"))
@pytest.mark.parametrize("has_weight, has_bias", [(True, True), (False, True), (True, False), (False, False)])
def test_layer_norm(backend_device, has_weight, has_bias):
    backend, device = backend_device
    dtype = _dtype(device)
    args = {"input": torch.randn(6, 40, device=device, dtype=dtype)}
    if has_weight:
        args["weight"] = torch.randn(40, device=device, dtype=dtype)
    if has_bias:
        args["bias"] = torch.randn(40, device=device, dtype=dtype)
    for grad_args in _subsets(tuple(args)):
        _check(
            lambda **a: fused_attn.layer_norm(a["input"], (40,), a.get("weight"), a.get("bias"), backend=backend),
            lambda **a: reference.layer_norm(a["input"], (40,), a.get("weight"), a.get("bias")),
            args, grad_args,
        )


@pytest.mark.parametrize("backend_device", _native("add_layer_norm"))
@pytest.mark.parametrize("present", [("weight", "bias", "input_bias"), ("bias", "input_bias"), ("input_bias",), ()],
                         ids=lambda p: "+".join(p) or "none")
def test_add_layer_norm(backend_device, present):
    backend, device = backend_device
    dtype = _dtype(device)
    args = {"input": torch.randn(6, 40, device=device, dtype=dtype),
            "residual": torch.randn(6, 40, device=device, dtype=dtype)}
    for name in present:
        args[name] = torch.randn(40, device=device, dtype=dtype)

    def call(op, **extra):
        return lambda **a: op(a["input"], a["residual"], a.get("weight"), a.get("bias"), 1e-5, 0.0,
                              a.get("input_bias"), **extra)

    for grad_args in _subsets(tuple(args)):
        _check(call(fused_attn.add_layer_norm, backend=backend), call(reference.add_layer_norm), args, grad_args)


@pytest.mark.parametrize("backend_device", _native("scaled_dot_product_attention"))
@pytest.mark.parametrize("mask", [None, "bias"])
def test_attention(backend_device, mask):
    backend, device = backend_device
    dtype = _dtype(device)
    args = {name: torch.randn(2, 2, 9, 16, device=device, dtype=dtype) for name in ("query", "key", "value")}
    if mask == "bias":
        args["attn_mask"] = torch.randn(2, 2, 9, 9, device=device, dtype=dtype)
    for grad_args in _subsets(tuple(args)):
        _check(
            lambda **a: fused_attn.scaled_dot_product_attention(
                a["query"], a["key"], a["value"], a.get("attn_mask"), backend=backend),
            lambda **a: reference.scaled_dot_product_attention(a["query"], a["key"], a["value"], a.get("attn_mask")),
            args, grad_args,
        )


@pytest.mark.parametrize("backend_device", _native("softmax"))
def test_softmax(backend_device):
    backend, device = backend_device
    dtype = _dtype(device)
    args = {"input": torch.randn(2, 3, 5, 7, device=device, dtype=dtype),
            "mask": torch.randn(2, 3, 5, 7, device=device, dtype=dtype)}
    for grad_args in _subsets(tuple(args)):
        _check(
            lambda **a: fused_attn.softmax(a["input"], mask=a["mask"], scale=0.5, backend=backend),
            lambda **a: reference.softmax(a["input"], mask=a["mask"], scale=0.5),
            args, grad_args,
        )


@pytest.mark.parametrize("backend_device", _native("linear_gelu"))
@pytest.mark.parametrize("has_bias", [True, False])
def test_linear_gelu(backend_device, has_bias):
    backend, device = backend_device
    dtype = _dtype(device)
    args = {"input": torch.randn(10, 16, device=device, dtype=dtype),
            "weight": torch.randn(24, 16, device=device, dtype=dtype)}
    if has_bias:
        args["bias"] = torch.randn(24, device=device, dtype=dtype)
    for grad_args in _subsets(tuple(args)):
        _check(
            lambda **a: fused_attn.linear_gelu(a["input"], a["weight"], a.get("bias"), backend=backend),
            lambda **a: reference.linear_gelu(a["input"], a["weight"], a.get("bias")),
            args, grad_args,
        )


@pytest.mark.parametrize("backend_device", _native("ffn"))
@pytest.mark.parametrize("has_b1, has_b2", [(True, True), (False, True), (True, False), (False, False)])
def test_ffn(backend_device, has_b1, has_b2):
    backend, device = backend_device
    dtype = _dtype(device)
    args = {"input": torch.randn(10, 16, device=device, dtype=dtype),
            "w1": torch.randn(24, 16, device=device, dtype=dtype) / 4}
    if has_b1:
        args["b1"] = torch.randn(24, device=device, dtype=dtype)
    args["w2"] = torch.randn(16, 24, device=device, dtype=dtype) / 4
    if has_b2:
        args["b2"] = torch.randn(16, device=device, dtype=dtype)
    for grad_args in _subsets(tuple(args)):
        _check(
            lambda **a: fused_attn.ffn(a["input"], a["w1"], a.get("b1"), a["w2"], a.get("b2"), backend=backend),
            lambda **a: reference.ffn(a["input"], a["w1"], a.get("b1"), a["w2"], a.get("b2")),
            args, grad_args,
        )
