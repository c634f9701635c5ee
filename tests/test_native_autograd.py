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
from torch.autograd import forward_ad

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


def _op_calls(backend: str, device: str) -> dict:
    """name -> (fn of the differentiable tensors, those tensors) for every op, small sizes."""
    dtype = _dtype(device)
    gen = torch.Generator().manual_seed(0)

    def t(*shape):
        return (torch.randn(*shape, generator=gen) / 2).to(device, dtype).requires_grad_()

    x, w, b = t(6, 16), t(16), t(16)
    q = t(1, 2, 5, 16)
    return {
        "layer_norm": (lambda x, w, b: fused_attn.layer_norm(x, (16,), w, b, backend=backend), (x, w, b)),
        "add_layer_norm": (lambda x, r, w: fused_attn.add_layer_norm(x, r, w, None, backend=backend), (x, t(6, 16), w)),
        "scaled_dot_product_attention": (
            lambda q, k, v: fused_attn.scaled_dot_product_attention(q, k, v, backend=backend), (q, t(1, 2, 5, 16), t(1, 2, 5, 16))),
        "softmax": (lambda s: fused_attn.softmax(s, backend=backend), (t(1, 2, 5, 7),)),
        "linear_gelu": (lambda x, w: fused_attn.linear_gelu(x, w, backend=backend), (x, t(8, 16))),
        "ffn": (lambda x, w1, w2: fused_attn.ffn(x, w1, None, w2, None, backend=backend), (x, t(8, 16), t(16, 8))),
    }


NATIVE_OPS = ["layer_norm", "add_layer_norm", "scaled_dot_product_attention", "softmax", "linear_gelu", "ffn"]


def test_backward_ops_called_directly_have_no_derivative():
    """A `_bwd` op called directly (not through the ops' autograd formulas, which give
    differentiable gradients where a graph is asked for: tests/test_second_order.py) gives
    gradients whose derivative raises, naming the op and what to do instead, rather than being
    silently None or zero; a forward-mode tangent on its incoming gradient raises at once."""
    if not _native("layer_norm"):
        pytest.skip("the extension is not built")
    x, w = torch.randn(4, 16, requires_grad=True), torch.randn(16, requires_grad=True)
    _, mean, rstd = torch.ops.fused_attn.layer_norm_fwd(x.detach(), w.detach(), None, 1e-5)
    dx, _, _ = torch.ops.fused_attn.layer_norm_bwd(torch.ones(4, 16), x, mean, rstd, w, [True, True, False])
    with pytest.raises(RuntimeError, match=r"layer_norm_bwd is not implemented: it is the kernels' backward.*"
                                           r"create_graph=True.*backend='reference'"):
        dx.sum().backward()
    with forward_ad.dual_level():
        grad_out = forward_ad.make_dual(torch.ones(4, 16), torch.ones(4, 16))
        with pytest.raises(NotImplementedError, match="forward AD with fused_attn::layer_norm_bwd"):
            torch.ops.fused_attn.layer_norm_bwd(grad_out, x, mean, rstd, w, [True, True, False])


def test_inference_forms_have_no_derivative():
    """The inference forms (called by the ops only when no gradient is asked for) give outputs
    whose backward raises, saying what they are, if called directly with inputs that need one."""
    if not _native("linear_gelu"):
        pytest.skip("the extension is not built")
    x = torch.randn(4, 16, requires_grad=True)
    out = torch.ops.fused_attn.linear_gelu_inference(x, torch.randn(8, 16), None, "none")
    with pytest.raises(RuntimeError, match="linear_gelu_inference is not implemented: it is the forward without"):
        out.sum().backward()


@pytest.mark.parametrize("op", NATIVE_OPS)
@pytest.mark.parametrize("backend, device", [("cpu", "cpu"), pytest.param("cuda", "cuda", marks=pytest.mark.cuda)])
def test_compiled_autograd(op, backend, device):
    """The backward graph runs under compiled autograd and gives eager's gradients."""
    if not _native(op):
        pytest.skip("the extension is not built")
    from torch._dynamo import compiled_autograd

    fn, inputs = _op_calls(backend, device)[op]
    expected = torch.autograd.grad(fn(*inputs).float().sum(), inputs)
    torch._dynamo.reset()
    loss = fn(*inputs).float().sum()
    with compiled_autograd._enable(torch.compile(backend="eager")):
        loss.backward()
    for x, g in zip(inputs, expected):
        torch.testing.assert_close(x.grad, g, rtol=0, atol=0)
