"""Long runs: 10,000 forward + backward calls of an op do not grow the process's memory.

A leak in a kernel, a launcher or the autograd registration (a saved tensor kept alive, a
scratch buffer never freed, a reference cycle through the autograd context) shows as memory
that grows with the number of calls. The shapes are tiny so that 10,000 calls take about a
second per op, but each call's output and gradients are at least 1 KiB, so that leaking even
one of them per call (10 MiB over the run) exceeds the slack.

CPU: the resident set size from /proc/self/statm, measured after a warm-up (thread pools, the
allocator's arenas, lazily built dispatch tables and kernel caches settle in the first calls).
Slack 8 MiB: below the 10 MiB that the smallest per-call leak would add, above the few MiB by
which glibc's arenas drift over a run of this length. CUDA: ``torch.cuda.memory_allocated``,
which counts live tensors exactly, so no slack is needed there.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch

import fused_attn

from .conftest import HAS_CUDA, work_dtype

CALLS, WARM_UP = 10_000, 500
RSS_SLACK_BYTES = 8 * 2**20


def _ops(device: str, dtype: torch.dtype = torch.float32):
    """op name -> (inputs that require grad, fn(*inputs) -> output), each output >= 1 KiB."""
    gen = torch.Generator().manual_seed(0)

    def leaves(*shapes):
        return [torch.randn(s, generator=gen).to(device, dtype).requires_grad_(True) for s in shapes]

    pad = (torch.arange(16) < 12).view(1, 1, 1, 16).to(device)
    return {
        "scaled_dot_product_attention": (
            leaves((1, 2, 16, 16), (1, 2, 16, 16), (1, 2, 16, 16)),
            lambda backend, q, k, v: fused_attn.scaled_dot_product_attention(
                q, k, v, pad, dropout_p=0.1, is_causal=True, backend=backend),
        ),
        "layer_norm": (
            leaves((8, 64), (64,), (64,)),
            lambda backend, x, w, b: fused_attn.layer_norm(x, (64,), w, b, backend=backend),
        ),
        "add_layer_norm": (
            leaves((8, 64), (8, 64), (64,), (64,), (64,)),
            lambda backend, x, r, w, b, ib: fused_attn.add_layer_norm(
                x, r, w, b, dropout_p=0.1, input_bias=ib, backend=backend),
        ),
        "softmax": (
            leaves((4, 8, 16), (8, 16)),
            lambda backend, x, bias: fused_attn.softmax(x, -1, bias, 0.5, backend=backend),
        ),
        "linear_gelu": (
            leaves((8, 32), (32, 32), (32,)),
            lambda backend, x, w, b: fused_attn.linear_gelu(x, w, b, backend=backend),
        ),
    }


def _calls(op: str, backend: str, device: str, n: int) -> None:
    # In a dtype the backend serves (the cuda attention takes 16-bit inputs only).
    inputs, fn = _ops(device, work_dtype(op, backend, device))[op]
    for _ in range(n):
        out = fn(backend, *inputs)
        torch.autograd.grad(out, inputs, torch.ones_like(out))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the RSS from /proc/self/statm (Linux)")
@pytest.mark.parametrize("op", list(_ops("cpu")))
def test_cpu_memory_does_not_grow(op):
    if "cpu" not in fused_attn.available_backends("cpu"):
        pytest.skip("the cpu backend is not available here")
    # Warm-up, then a measured run of CALLS calls on the same inputs.
    _calls(op, "cpu", "cpu", WARM_UP)
    gc.collect()
    before = _rss_bytes()
    _calls(op, "cpu", "cpu", CALLS)
    gc.collect()
    growth = _rss_bytes() - before
    assert growth < RSS_SLACK_BYTES, f"{op}: RSS grew by {growth / 2**20:.1f} MiB over {CALLS} calls"


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("op", list(_ops("cpu")))
def test_cuda_memory_does_not_grow(op, backend):
    if not HAS_CUDA or backend not in fused_attn.available_backends("cuda"):
        pytest.skip(f"{backend} is not available on CUDA here")
    from fused_attn.backends import registered_ops

    reasons = registered_ops()[op].supports[backend].unavailable_reasons(torch.device("cuda"))
    if reasons:
        pytest.skip("; ".join(reasons))
    _calls(op, backend, "cuda", WARM_UP)
    torch.cuda.synchronize()
    gc.collect()
    before = torch.cuda.memory_allocated()
    _calls(op, backend, "cuda", CALLS)
    torch.cuda.synchronize()
    gc.collect()
    assert torch.cuda.memory_allocated() == before, (
        f"{op} on {backend}: {torch.cuda.memory_allocated() - before} bytes still allocated after {CALLS} calls"
    )
