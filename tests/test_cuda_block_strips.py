"""The cuda kernels' two layouts of rows, 64 per block (one 16-row strip per warp) and 128 (two), give
the same bits (csrc/cuda/attention.cu: block_strips): the forward's, and up to head dim 64 the
backward's statistics and dQ kernels' (rows of queries) and dK/dV kernel's (rows of keys).

The launchers pick 128 where the rows are many enough to fill the GPU, so the parity tests' small
shapes run the 64-row layout; here ``FUSED_ATTN_CUDA_BLOCK_ROWS`` (read once per process) pins
each in its own process over cases that reach every branch of those kernels (partial query and key
tiles, causal with its per-warp skip of tiles past a warp's rows, cross lengths, bool and float
masks with the float mask's gradient, key padding spans, dropout, grouped heads, head dims up to
128 and the 256 that keeps one strip), and the outputs and the gradients must be equal. The 64-row
layout is the one the parity tests check against the reference.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.cuda

SCRIPT = r"""
import sys, torch, fused_attn
torch.manual_seed(0)
out = []
def run(q_len, k_len, d, dtype, heads=3, kv_heads=3, dv=None, **kw):
    q = torch.randn(2, heads, q_len, d, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(2, kv_heads, k_len, d, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(2, kv_heads, k_len, dv or d, device="cuda", dtype=dtype, requires_grad=True)
    o = fused_attn.scaled_dot_product_attention(q, k, v, enable_gqa=kv_heads != heads, backend="cuda", **kw)
    # The backward reads the forward's row statistics: equal gradients, equal statistics.
    o.backward(torch.randn_like(o))
    mask = kw.get("attn_mask")
    grads = (q.grad, k.grad, v.grad) + ((mask.grad,) if mask is not None and mask.requires_grad else ())
    out.append([t.detach().cpu() for t in (o, *grads)])
keys = torch.arange(300, device="cuda")
for dtype in (torch.float16, torch.bfloat16):
    for d in (32, 64, 96, 128):
        run(200, 200, d, dtype)
        run(200, 200, d, dtype, is_causal=True)
    run(300, 77, 64, dtype, is_causal=True)
    run(77, 300, 64, dtype, is_causal=True)
    run(129, 150, 40, dtype, attn_mask=torch.rand(2, 3, 129, 150, device="cuda") > 0.3)
    run(129, 150, 64, dtype, attn_mask=torch.randn(1, 3, 129, 150, device="cuda", dtype=dtype, requires_grad=True))
    run(250, 300, 64, dtype, attn_mask=((keys >= 40) & (keys < 170)).view(1, 1, 1, 300), is_causal=True)
    run(256, 256, 64, dtype, dropout_p=0.2)
    run(256, 256, 64, dtype, heads=6, kv_heads=2, is_causal=True)
    run(200, 200, 64, dtype, dv=100)
    run(200, 200, 200, dtype)
assert fused_attn.last_backend("scaled_dot_product_attention") == "cuda"
torch.save(out, sys.argv[1])
"""


def _forward_outputs(tmp_path: Path, rows: str) -> list:
    path = tmp_path / f"rows{rows}.pt"
    env = {**os.environ, "FUSED_ATTN_CUDA_BLOCK_ROWS": rows}
    subprocess.run([sys.executable, "-c", SCRIPT, str(path)], env=env, check=True, timeout=600,
                   cwd=Path(__file__).resolve().parent.parent)
    return torch.load(path)


def test_one_and_two_strips_per_warp_give_the_same_bits(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from fused_attn import _extension

    if not _extension.has_kernel("attention_fwd", "cuda"):
        pytest.skip("the extension's CUDA kernels are not built")
    one, two = _forward_outputs(tmp_path, "64"), _forward_outputs(tmp_path, "128")
    assert len(one) == len(two) == 34
    for case, (first, second) in enumerate(zip(one, two)):
        assert len(first) == len(second)
        for name, a, b in zip(("output", "grad query", "grad key", "grad value", "grad attn_mask"), first, second):
            assert torch.equal(a, b), f"case {case}: {name}"


def test_a_pinned_layout_other_than_64_or_128_is_refused(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from fused_attn import _extension

    if not _extension.has_kernel("attention_fwd", "cuda"):
        pytest.skip("the extension's CUDA kernels are not built")
    code = ("import torch, fused_attn\n"
            "q = torch.randn(1, 1, 8, 64, device='cuda', dtype=torch.float16)\n"
            "try:\n    fused_attn.scaled_dot_product_attention(q, q, q, backend='cuda')\n"
            "except RuntimeError as e:\n    print(str(e).splitlines()[0])\n")
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, "FUSED_ATTN_CUDA_BLOCK_ROWS": "96"},
                            capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parent.parent)
    assert "FUSED_ATTN_CUDA_BLOCK_ROWS must be 64 or 128, got '96'" in result.stdout, result.stdout + result.stderr
