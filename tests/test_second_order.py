"""Second-order autograd through the fused ops (fused_attn/ops/_second_order.py).

A backward run with ``create_graph=True`` gives gradients that autograd differentiates again:
each case's first-order gradients (taken with a graph) are checked against the float64 reference
as an output, and their gradients (the second derivatives) as that output's gradients, by
tests/conftest.py's assert_parity, for every op on every fused backend, with dropout replaying
the kernels' draw. Forward-over-reverse (a tangent on the incoming gradient) carries through, a
plain backward still runs the kernels, and the shared dropout stream in plain torch
(fused_attn/reference/_philox.py) draws the kernels' keep-masks.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.autograd import forward_ad

import fused_attn
from fused_attn import backends, reference
from fused_attn.ops import _second_order
from fused_attn.ops._random import draw_seed
from fused_attn.ops.attention import attention_with_keep_mask, repeat_kv_heads
from fused_attn.ops.ffn import ffn_keep_mask
from fused_attn.reference._philox import keep_mask

from .conftest import assert_parity, backend_params, supported_dtypes

# torch.manual_seed before each call that draws a dropout seed, so that its mask can be replayed.
DRAW_SEED = 11


def _replayed_keep(dropout_p: float, shape: tuple[int, ...], device: str) -> torch.Tensor | None:
    """The keep-mask a fused call draws after torch.manual_seed(DRAW_SEED)."""
    if not dropout_p:
        return None
    torch.manual_seed(DRAW_SEED)
    return keep_mask(draw_seed(dropout_p, torch.empty(0, device=device)), shape, dropout_p, device)


def _case(name: str, backend: str, device: str, dtype: torch.dtype):
    """(fused fn, plain fn, args, differentiated names) of case ``name``; small shapes."""
    gen = torch.Generator().manual_seed(sum(map(ord, name)))

    def t(*shape, scale=0.5):
        return (torch.randn(*shape, generator=gen) * scale).to(device, dtype)

    if name.startswith("layer_norm"):
        args = {"x": t(6, 16), "w": 1 + t(16), "b": t(16)}
        return (lambda x, w, b: fused_attn.layer_norm(x, (16,), w, b, backend=backend),
                lambda x, w, b: reference.layer_norm(x, (16,), w, b), args, ("x", "w", "b"))
    if name.startswith("add_layer_norm"):
        p = 0.3 if "dropout" in name else 0.0
        args = {"x": t(6, 16), "r": t(6, 16), "w": 1 + t(16), "b": t(16), "ib": t(16)}
        keep = _replayed_keep(p, (6, 16), device)

        def fused(x, r, w, b, ib):
            torch.manual_seed(DRAW_SEED)
            out, pre = fused_attn.add_layer_norm(x, r, w, b, dropout_p=p, input_bias=ib, return_prenorm=True,
                                                 backend=backend)
            return out + 0.5 * pre  # the pre-norm sum's own gradient reaches the backward too

        def plain(x, r, w, b, ib):
            out, pre = reference.add_layer_norm(x, r, w, b, dropout_p=p, input_bias=ib, return_prenorm=True,
                                                dropout_mask=keep)
            return out + 0.5 * pre

        return fused, plain, args, tuple(args)
    if name.startswith("attention"):
        p = 0.25 if "dropout" in name else 0.0
        kv_heads = 1 if "grouped" in name else 2
        args = {"q": t(1, 2, 5, 16), "k": t(1, kv_heads, 7, 16), "v": t(1, kv_heads, 7, 8)}
        causal = "causal" in name
        if "bias" in name:
            args["m"] = t(1, 2, 5, 7)
        keep = _replayed_keep(p, (1, 2, 5, 7), device)

        def fused(q, k, v, m=None):
            torch.manual_seed(DRAW_SEED)
            return fused_attn.scaled_dot_product_attention(q, k, v, m, dropout_p=p, is_causal=causal, scale=0.3,
                                                           enable_gqa=kv_heads != 2, backend=backend)

        def plain(q, k, v, m=None):
            k, v = repeat_kv_heads(k, 2), repeat_kv_heads(v, 2)
            return reference.scaled_dot_product_attention(q, k, v, m, dropout_p=p, is_causal=causal, scale=0.3,
                                                          dropout_mask=keep)

        return fused, plain, args, tuple(args)
    if name.startswith("softmax"):
        args = {"s": t(1, 2, 5, 7, scale=2.0), "m": t(1, 1, 5, 7)}
        return (lambda s, m: fused_attn.softmax(s, mask=m, scale=0.7, backend=backend),
                lambda s, m: reference.softmax(s, mask=m, scale=0.7), args, ("s", "m"))
    if name.startswith("linear_gelu"):
        approximate = "tanh" if "tanh" in name else "none"
        args = {"x": t(6, 16), "w": t(8, 16), "b": t(8)}
        return (lambda x, w, b: fused_attn.linear_gelu(x, w, b, approximate=approximate, backend=backend),
                lambda x, w, b: reference.linear_gelu(x, w, b, approximate), args, ("x", "w", "b"))
    if name.startswith("ffn"):
        p = 0.2 if "dropout" in name else 0.0
        activation = "relu" if "relu" in name else "gelu"
        args = {"x": t(6, 16), "w1": t(8, 16), "b1": t(8), "w2": t(16, 8), "b2": t(16)}
        keep = _replayed_keep(p, (6, 16), device)

        def fused(x, w1, b1, w2, b2):
            torch.manual_seed(DRAW_SEED)
            return fused_attn.ffn(x, w1, b1, w2, b2, dropout_p=p, activation=activation, backend=backend)

        def plain(x, w1, b1, w2, b2):
            return reference.ffn(x, w1, b1, w2, b2, dropout_p=p, activation=activation, dropout_mask=keep)

        return fused, plain, args, tuple(args)
    raise ValueError(name)


OPS = {
    "layer_norm": "layer_norm", "add_layer_norm": "add_layer_norm", "add_layer_norm-dropout": "add_layer_norm",
    "attention-causal-bias": "scaled_dot_product_attention", "attention-grouped": "scaled_dot_product_attention",
    "attention-dropout": "scaled_dot_product_attention", "softmax": "softmax", "linear_gelu": "linear_gelu",
    "linear_gelu-tanh": "linear_gelu", "ffn-dropout": "ffn", "ffn-relu-dropout": "ffn",
}
CASES = [pytest.param(name, *p.values, marks=p.marks, id=f"{name}-{p.id}")
         for name, op in OPS.items() for p in backend_params(op, exclude=("reference",))]


# Arguments whose first-order gradient is a sum of the incoming gradient alone (the bias added last):
# their second derivatives are zero, and no second-order gradient reaches them, fused or plain.
AFFINE_LAST = {"layer_norm": ("b",), "add_layer_norm": ("b",), "ffn": ("b2",)}


def _first_order(fn, names: tuple[str, ...]):
    """``fn``'s gradients with respect to ``names`` under a fixed upstream, taken with a graph and
    laid end to end: an output whose own gradients are ``fn``'s second derivatives."""

    def gradients(**args):
        for n in names:
            args[n].requires_grad_()
        out = fn(**args)
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        grads = torch.autograd.grad(out, [args[n] for n in names], upstream.to(out.device, out.dtype),
                                    create_graph=True)
        return torch.cat([g.flatten() for g in grads])

    return gradients


def _leaf_case(name: str, backend: str, device: str):
    """Case ``name`` in the first dtype the backend takes, its differentiated arguments leaves that
    require grad: (fused fn, plain fn, args, differentiated names)."""
    fused, plain, args, names = _case(name, backend, device, supported_dtypes(backend, device, OPS[name])[0])
    return fused, plain, {k: v.requires_grad_(k in names) for k, v in args.items()}, names


@pytest.mark.parametrize("name, backend_device", CASES)
def test_second_order_parity(name, backend_device):
    backend, device = backend_device
    for dtype in supported_dtypes(backend, device, OPS[name]):
        fused, plain, args, names = _case(name, backend, device, dtype)
        second = tuple(n for n in names if n not in AFFINE_LAST.get(name.split("-")[0], ()))
        assert_parity(_first_order(fused, names), _first_order(plain, names), args, grad_args=second)


@pytest.mark.parametrize("name, backend_device", [c for c in CASES if "dropout" not in c.values[0]])
def test_forward_over_reverse(name, backend_device):
    """A forward-mode tangent on the gradient sent into the backward (forward-over-reverse, as
    Hessian-vector products by jvp of a gradient compute) comes out on the gradients: the
    gradients are linear in the incoming gradient, so the tangent is the gradient of the tangent."""
    fused, plain, leaves, names = _leaf_case(name, *backend_device)
    out = fused(**leaves)
    dtype = out.dtype
    direction = torch.randn(out.shape, generator=torch.Generator().manual_seed(6)).to(out.device, dtype)
    with forward_ad.dual_level():
        grad_out = forward_ad.make_dual(torch.ones_like(out), direction)
        grads = torch.autograd.grad(out, [leaves[n] for n in names], grad_out, retain_graph=True)
        tangents = [forward_ad.unpack_dual(g).tangent for g in grads]
    expected = torch.autograd.grad(plain(**leaves), [leaves[n] for n in names], direction)
    for n, tangent, want in zip(names, tangents, expected):
        assert tangent is not None, f"{n}: the tangent was dropped"
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(tangent, want, atol=tol * max(1.0, want.abs().max().item()), rtol=tol,
                                   msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("name, backend_device",
                         [c for c in CASES if c.values[0] in ("layer_norm", "attention-grouped")])
def test_second_order_backward_says_so_once(name, backend_device, monkeypatch):
    """The first backward per op and process that takes the second-order path says so (a
    FallbackWarning naming the op): it runs the reference's gradients, at plain speed and memory."""
    monkeypatch.setattr(backends, "_warned", set())
    fused, _, leaves, names = _leaf_case(name, *backend_device)
    for warns in (True, False):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.autograd.grad(fused(**leaves).square().sum(), [leaves[n] for n in names], create_graph=True)
        said = [w for w in caught
                if issubclass(w.category, backends.FallbackWarning) and "create_graph" in str(w.message)]
        assert len(said) == warns, [str(w.message) for w in caught]
        assert not said or f"fused_attn.{OPS[name]}:" in str(said[0].message)


def _refuse_second_order(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a second-order formula ran for a plain backward")

    for formula in _second_order.FORMULAS:
        monkeypatch.setattr(_second_order, formula, refuse)
        monkeypatch.setitem(_second_order.FORMULAS, formula, refuse)


@pytest.mark.parametrize("name, backend_device", CASES)
def test_plain_backward_runs_the_kernels(name, backend_device, monkeypatch):
    """Without create_graph (and without tangents) no second-order formula runs: the backward is
    the kernels'."""
    _refuse_second_order(monkeypatch)
    fused, _, leaves, names = _leaf_case(name, *backend_device)
    grads = torch.autograd.grad(fused(**leaves).square().sum(), [leaves[n] for n in names])
    assert all(g is not None for g in grads)
    with pytest.raises(AssertionError, match="second-order formula ran"):
        torch.autograd.grad(fused(**leaves).square().sum(), [leaves[n] for n in names], create_graph=True)


def test_compiled_backward_runs_the_kernels(monkeypatch):
    """torch.compile's backward graph (AOTAutograd traces it without a graph of its own) calls
    the kernels' backward, not the second-order formulas."""
    if "cpu" not in fused_attn.backends.available_backends("cpu"):
        pytest.skip("the extension is not built")
    _refuse_second_order(monkeypatch)
    x, w, q = torch.randn(6, 16), torch.randn(16), torch.randn(1, 2, 5, 16)
    for t in (x, w, q):
        t.requires_grad_()

    def f(x, w, q):
        return (fused_attn.layer_norm(x, (16,), w, None, backend="cpu").sum()
                + fused_attn.scaled_dot_product_attention(q, q, q, backend="cpu").sum())

    torch._dynamo.reset()
    torch.compile(f, fullgraph=True)(x, w, q).backward()
    assert all(t.grad is not None for t in (x, w, q))


@pytest.mark.parametrize("backend_device", backend_params("ffn", exclude=("reference",)))
@pytest.mark.parametrize("dropout_p", [0.1, 0.5, 0.93])
def test_plain_torch_dropout_stream_draws_the_kernels_masks(backend_device, dropout_p):
    """reference._philox.keep_mask gives, bit for bit, the masks the kernels draw from a seed:
    the FFN's [rows, features] and (Triton's, which returns it) attention's [B, H, Lq, Lk], with an
    odd key length, so that rows start mid-counter."""
    backend, device = backend_device
    torch.manual_seed(DRAW_SEED)
    drawn = ffn_keep_mask(37, 21, dropout_p, device, backend)
    assert torch.equal(drawn, _replayed_keep(dropout_p, (37, 21), device))
    if backend == "triton":
        q, k, v = (torch.randn(2, 3, n, 16, device=device) for n in (9, 13, 13))
        torch.manual_seed(DRAW_SEED)
        _, drawn = attention_with_keep_mask(q, k, v, dropout_p=dropout_p)
        assert torch.equal(drawn.bool(), _replayed_keep(dropout_p, (2, 3, 9, 13), device))
    kept = _replayed_keep(dropout_p, (1000, 100), device).float().mean().item()
    assert abs(kept - (1 - dropout_p)) < 0.01
