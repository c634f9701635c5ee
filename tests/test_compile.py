"""The public ops under torch.compile(fullgraph=True): one graph, same results as eager."""

import pytest
import torch

import fused_attn


def _compiled_matches_eager(fn, *args):
    torch._dynamo.reset()
    eager = fn(*args)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(*args)
    torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_layer_norm_and_attention_compile_without_graph_breaks(backend):
    if backend not in fused_attn.available_backends("cpu"):
        pytest.skip(f"{backend} is not available here")
    x = torch.randn(4, 32)
    w, b = torch.randn(32), torch.randn(32)
    _compiled_matches_eager(lambda x, w, b: fused_attn.layer_norm(x, (32,), w, b, backend=backend), x, w, b)


def test_triton_ops_compile_without_graph_breaks():
    if "triton" not in fused_attn.available_backends("cpu"):
        pytest.skip("triton is not available on CPU tensors here")
    q, k, v = (torch.randn(1, 2, 16, 16) for _ in range(3))
    pad = torch.rand(1, 1, 1, 16) > 0.2
    _compiled_matches_eager(
        lambda q, k, v: fused_attn.scaled_dot_product_attention(q, k, v, pad, is_causal=True, backend="triton"), q, k, v
    )
    x = torch.randn(8, 16)
    w1, w2 = torch.randn(32, 16), torch.randn(16, 32)
    _compiled_matches_eager(lambda x: fused_attn.ffn(x, w1, None, w2, None, backend="triton"), x)
    _compiled_matches_eager(lambda x: fused_attn.add_layer_norm(x, x * 2, None, None, backend="triton"), x)
    _compiled_matches_eager(lambda x: fused_attn.softmax(x, -1, None, 0.5, backend="triton"), x)
