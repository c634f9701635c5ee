"""Inputs one element past an aligned address, on every backend.

The GPU kernels load 16 bytes at a time where every pointer they vector-access allows it (the
CUDA LayerNorm, GELU and softmax kernels, the attention's cp.async tiles, cuBLASLt's epilogue
operands) and take a narrower path otherwise. A view at storage offset 1 is contiguous, so it
reaches the kernels as it is (validation copies nothing that needs no copy), with a data pointer
2 or 4 bytes past 16-byte alignment: each op must give the reference's result and gradients
from it, for every operand shifted at once and for one shifted among aligned ones.
"""

import pytest
import torch

import fused_attn
from fused_attn import reference

from .conftest import assert_parity, backend_params, work_dtype


def _shifted(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values in a contiguous view at storage offset 1 (differentiable: gradients reach ``t``)."""
    buffer = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = buffer[1:].view(t.shape).copy_(t)
    assert view.is_contiguous() and view.data_ptr() % 16 != 0
    return view


def _shifting(fn, names):
    """``fn`` with the keyword arguments in ``names`` shifted off alignment."""
    return lambda **a: fn(**{k: _shifted(v) if k in names else v for k, v in a.items()})


def _cases(op, backend, device, dtype):
    """(fused, plain, args, grad_args) of ``op`` at shapes whose rows are a multiple of 16 bytes."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    if op == "layer_norm":
        args = {"input": randn(3, 5, 64), "weight": randn(64), "bias": randn(64)}
        return (lambda **a: fused_attn.layer_norm(a["input"], (64,), a["weight"], a["bias"], backend=backend),
                lambda **a: reference.layer_norm(a["input"], (64,), a["weight"], a["bias"]), args)
    if op == "add_layer_norm":
        args = {"input": randn(7, 64), "residual": randn(7, 64), "weight": randn(64), "bias": randn(64),
                "input_bias": randn(64)}
        return (lambda **a: fused_attn.add_layer_norm(**a, backend=backend),
                lambda **a: reference.add_layer_norm(**a), args)
    if op == "softmax":
        args = {"input": randn(2, 3, 5, 40), "mask": randn(2, 3, 5, 40)}
        return (lambda **a: fused_attn.softmax(a["input"], -1, a["mask"], 0.5, backend=backend),
                lambda **a: reference.softmax(a["input"], -1, a["mask"], 0.5), args)
    if op == "scaled_dot_product_attention":
        args = {"query": randn(2, 2, 19, 64), "key": randn(2, 2, 23, 64), "value": randn(2, 2, 23, 64),
                "attn_mask": randn(2, 1, 19, 23)}
        return (lambda **a: fused_attn.scaled_dot_product_attention(**a, backend=backend),
                lambda **a: reference.scaled_dot_product_attention(**a), args)
    if op == "linear_gelu":
        args = {"input": randn(9, 32), "weight": randn(48, 32) * 0.2, "bias": randn(48)}
        return (lambda **a: fused_attn.linear_gelu(**a, backend=backend), lambda **a: reference.linear_gelu(**a),
                args)
    assert op == "ffn"
    args = {"input": randn(9, 32), "w1": randn(48, 32) * 0.2, "b1": randn(48), "w2": randn(32, 48) * 0.2,
            "b2": randn(32)}
    return lambda **a: fused_attn.ffn(**a, backend=backend), lambda **a: reference.ffn(**a), args


OPS = ["layer_norm", "add_layer_norm", "softmax", "scaled_dot_product_attention", "linear_gelu", "ffn"]


@pytest.mark.parametrize("op, backend_device", [
    pytest.param(op, param.values[0], marks=param.marks, id=f"{op}-{param.id}")
    for op in OPS for param in backend_params(op, exclude=("reference",))
])
@pytest.mark.parametrize("which", ["all", "first"])
def test_operands_past_alignment(op, backend_device, which):
    backend, device = backend_device
    fused, plain, args = _cases(op, backend, device, work_dtype(op, backend, device))
    names = set(args) if which == "all" else {next(iter(args))}
    assert_parity(_shifting(fused, names), plain, args, grad_args=tuple(args))
