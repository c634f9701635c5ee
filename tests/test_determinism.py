"""What the README's "Determinism" section states for the cpu backend: every op's forward and
backward give the same bits twice in a row (dropout included, with the same torch seed), and
the row-wise ops (LayerNorm, Add & Norm, softmax) give the same bits whatever the thread count.

Shapes are large enough that the backward splits its rows into several chunks and the attention
into several tasks, so the reductions across chunks and tasks are exercised.
"""

from __future__ import annotations

import pytest
import torch

import fused_attn

pytestmark = pytest.mark.skipif(
    "cpu" not in fused_attn.available_backends("cpu"), reason="the cpu backend is not available here"
)


def _leaves(*shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).requires_grad_(True) for s in shapes]


def _cases():
    """op -> (leaves, fn(*leaves) -> output), on the cpu backend."""
    pad = (torch.arange(300) < 250).view(1, 1, 1, 300)
    return {
        "scaled_dot_product_attention": (
            _leaves((2, 3, 300, 40), (2, 3, 300, 40), (2, 3, 300, 40), (1, 3, 300, 300)),
            lambda q, k, v, bias: fused_attn.scaled_dot_product_attention(
                q, k, v, bias.masked_fill(~pad, float("-inf")), dropout_p=0.1, is_causal=True, backend="cpu"),
        ),
        "layer_norm": (
            _leaves((3000, 96), (96,), (96,)),
            lambda x, w, b: fused_attn.layer_norm(x, (96,), w, b, backend="cpu"),
        ),
        "add_layer_norm": (
            _leaves((3000, 96), (3000, 96), (96,), (96,), (96,)),
            lambda x, r, w, b, ib: fused_attn.add_layer_norm(x, r, w, b, dropout_p=0.1, input_bias=ib, backend="cpu"),
        ),
        "softmax": (
            _leaves((8, 300, 200), (300, 200)),
            lambda x, bias: fused_attn.softmax(x, -1, bias, 0.3, backend="cpu"),
        ),
        "linear_gelu": (
            _leaves((3000, 64), (96, 64), (96,)),
            lambda x, w, b: fused_attn.linear_gelu(x, w, b, backend="cpu"),
        ),
        "ffn": (
            _leaves((3000, 64), (96, 64), (96,), (64, 96), (64,)),
            lambda x, w1, b1, w2, b2: fused_attn.ffn(x, w1, b1, w2, b2, dropout_p=0.1, backend="cpu"),
        ),
    }


def _run(op: str) -> list[torch.Tensor]:
    leaves, fn = _cases()[op]
    torch.manual_seed(7)
    out = fn(*leaves)
    upstream = torch.sin(torch.arange(out.numel(), dtype=torch.float32)).view(out.shape)
    return [out.detach(), *torch.autograd.grad(out, leaves, upstream)]


def _assert_bit_identical(a: list[torch.Tensor], b: list[torch.Tensor], what: str) -> None:
    names = ["output"] + [f"grad {i}" for i in range(len(a) - 1)]
    for name, x, y in zip(names, a, b):
        assert torch.equal(x, y), f"{what}: {name} differs by up to {(x - y).abs().max():.3g}"


@pytest.mark.parametrize("op", list(_cases()))
def test_cpu_forward_and_backward_are_bit_identical_twice(op):
    _assert_bit_identical(_run(op), _run(op), op)


@pytest.mark.parametrize("op", ["layer_norm", "add_layer_norm", "softmax"])
def test_cpu_row_wise_ops_do_not_depend_on_the_thread_count(op):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(op)
        torch.set_num_threads(max(2, threads))
        many = _run(op)
    finally:
        torch.set_num_threads(threads)
    _assert_bit_identical(one, many, f"{op} with 1 and {max(2, threads)} threads")
