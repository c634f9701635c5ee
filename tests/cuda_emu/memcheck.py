"""Runs the emulated CUDA kernels built with AddressSanitizer over cases that reach every load path
(partial tiles, odd head dims and lengths, unaligned views, masks through their strides, grouped heads,
dropout, the LayerNorm row mappings, the FFN's GEMM descriptors): a read or write past any tensor's
allocation aborts with AddressSanitizer's report. Run by tests/test_cuda_emulated.py in a process of its
own, with the runtime preloaded; prints the number of cases on success."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.cuda_emu import emu_build  # noqa: E402


def tensor(*shape, dtype=torch.float16, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# (batch, heads, key/value heads, q_len, k_len, head dim, value head dim)
ATTENTION_SHAPES = [(1, 2, 2, 1, 1, 8, 8), (2, 3, 3, 17, 77, 40, 40), (1, 4, 2, 130, 65, 64, 64),
                    (1, 2, 1, 70, 70, 96, 96), (1, 1, 1, 37, 45, 256, 64), (1, 2, 2, 33, 200, 128, 200)]


def attention_cases():
    for b, h, hkv, lq, lk, d, dv in ATTENTION_SHAPES:
        for dtype in (torch.float16, torch.bfloat16):
            q = tensor(b, h, lq, d, dtype=dtype)
            k, v = tensor(b, hkv, lk, d, dtype=dtype, seed=1), tensor(b, hkv, lk, dv, dtype=dtype, seed=2)
            padding = (torch.arange(lk) < max(1, lk // 2)).view(1, 1, 1, lk).expand(b, h, lq, lk)
            bias = tensor(lq, lk, dtype=dtype, seed=3).expand(b, h, lq, lk)
            for mask, causal, p in [(None, False, 0.0), (None, True, 0.0), (padding, False, 0.2), (bias, True, 0.0)]:
                yield q, k, v, mask, causal, p
    # Unaligned rows: head dim 36 read from a packed buffer one element past a 16-byte boundary.
    packed = tensor(2, 51, 3 * 3 * 36 + 1)
    q, k, v = (packed[..., 1 + i * 108: 1 + (i + 1) * 108].unflatten(-1, (3, 36)).transpose(1, 2) for i in range(3))
    yield q, k, v, None, True, 0.0


def main() -> None:
    emu_build.build(ROOT / "build" / "cuda_emu_memcheck", memcheck=True)
    ops = torch.ops.fused_attn_emu
    ops.configure(1, True, 1)  # one multiprocessor: the 128-row blocks wherever the rows reach them
    cases = 0
    for q, k, v, mask, causal, p in attention_cases():
        seed = torch.tensor(5) if p > 0 else None
        out, stats = ops.attention_fwd(q, k, v, mask, q.shape[-1] ** -0.5, causal, p, seed)
        grads = ops.attention_bwd(torch.ones_like(out), q, k, v, mask, stats, q.shape[-1] ** -0.5, causal, p, seed,
                                  mask is not None and mask.is_floating_point())
        assert all(torch.isfinite(g).all() for g in grads[:3])
        cases += 1
    for n in (1, 7, 100, 1025, 3000):
        x, bias = tensor(3, 5, 7, n), tensor(5, 7, n, seed=1).expand(3, 5, 7, n)
        y = ops.softmax_fwd(x, bias, 0.5, False)
        ops.softmax_bwd(torch.ones_like(y), y, 0.5, True)
        cases += 1
    for rows, hidden in [(1, 1), (37, 7), (40, 768), (5, 1025), (300, 40)]:
        for dtype in (torch.float32, torch.float16):
            buffer = tensor(rows * hidden + 1, dtype=dtype)
            for x in (buffer[:-1].view(rows, hidden), buffer[1:].view(rows, hidden)):  # aligned, one element past
                w, b = tensor(hidden, dtype=dtype, seed=1), tensor(hidden, dtype=dtype, seed=2)
                y, mean, rstd = ops.layer_norm_fwd(x, w, b, 1e-5)
                ops.layer_norm_bwd(torch.ones_like(y), x, mean, rstd, w, [True, True, True])
                out, pre, mean, rstd = ops.add_layer_norm_fwd(x, x.clone(), w, b, b, 1e-5, 0.1, torch.tensor(3))
                ops.add_layer_norm_bwd(torch.ones_like(out), pre, pre, mean, rstd, w, 0.1, torch.tensor(3),
                                       [True, True, True, True, True])
                cases += 1
    for rows, inp, outf in [(1, 8, 16), (9, 1, 24), (37, 50, 77), (40, 96, 128)]:
        for dtype in (torch.float32, torch.float16):
            for approximate in ("none", "tanh", "relu"):
                x, w, b = tensor(rows, inp, dtype=dtype), tensor(outf, inp, dtype=dtype, seed=1), \
                    tensor(outf, dtype=dtype, seed=2)
                out, pre = ops.linear_gelu_fwd(x, w, b, approximate)
                ops.linear_gelu_bwd(torch.ones_like(out), x, w, pre, approximate, [True, True, True])
                cases += 1
    print(cases)


if __name__ == "__main__":
    main()
