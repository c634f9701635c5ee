"""Host time per call: each public op on tiny inputs, where the time is the host's, not the kernel's.

For each op, three implementations of the same computation are timed side by side in interleaved
rounds (``fused_attn.bench.harness.measure_side_by_side``), each timed unit a loop of ``--calls``
calls, reported in microseconds per call (median over the rounds):

- ``entry``: the op called as a user calls it (no backend named), served by the extension's C++
  entry for the plain call (csrc/fast.cpp) once the first call has approved its kind;
- ``python``: the same op with ``backend="cpu"`` named, which takes the Python path (validation and
  backend choice in Python) to the same kernel;
- ``torch``: PyTorch's own functions for the same work.

Without ``--grad`` the inputs need no gradient (the ops' inference forms); with it they do, and
autograd records each call (no backward is run). One thread by default (``--threads``), since
the work of such calls is too small to share.

    python benchmarks/host_time.py            # the README's table, columns without gradient
    python benchmarks/host_time.py --grad     # the same while autograd records
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F

import fused_attn
from fused_attn.bench import harness


def cases(grad: bool) -> dict[str, tuple[Callable[..., object], Callable[[], object]]]:
    """op label -> (the fused call taking ``backend=``, PyTorch's own functions for the same work)."""
    gen = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=gen).requires_grad_(grad)

    x, r, w, b = t(4, 64), t(4, 64), t(64), t(64)
    q, s4 = t(1, 2, 8, 16), t(1, 1, 4, 64)
    w1, b1, w2, b2 = t(128, 64), t(128), t(64, 128), t(64)
    return {
        "layer_norm": (lambda **k: fused_attn.layer_norm(x, (64,), w, b, **k), lambda: F.layer_norm(x, (64,), w, b)),
        "add_layer_norm": (lambda **k: fused_attn.add_layer_norm(x, r, w, b, **k),
                           lambda: F.layer_norm(x + r, (64,), w, b)),
        "softmax, 4 x 64": (lambda **k: fused_attn.softmax(x, **k), lambda: torch.softmax(x, -1)),
        "softmax, 1 x 1 x 4 x 64": (lambda **k: fused_attn.softmax(s4, **k), lambda: torch.softmax(s4, -1)),
        "scaled_dot_product_attention": (lambda **k: fused_attn.scaled_dot_product_attention(q, q, q, **k),
                                         lambda: F.scaled_dot_product_attention(q, q, q)),
        "linear_gelu": (lambda **k: fused_attn.linear_gelu(x, w1, b1, **k), lambda: F.gelu(F.linear(x, w1, b1))),
        "ffn": (lambda **k: fused_attn.ffn(x, w1, b1, w2, b2, **k),
                lambda: F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)),
    }


def looped(fn: Callable[[], object], calls: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(calls):
            fn()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grad", action="store_true", help="inputs that require grad (autograd records each call)")
    parser.add_argument("--calls", type=int, default=2000, help="calls per timed unit")
    parser.add_argument("--repeats", type=int, default=15, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    print(f"microseconds per call, {'with' if args.grad else 'without'} autograd recording, "
          f"{args.threads} thread(s), median of {args.repeats} interleaved loops of {args.calls}")
    print(f"{'op':<30} {'entry':>8} {'python':>8} {'torch':>8}  entry/torch")
    for name, (fused, plain) in cases(args.grad).items():
        fns = {
            "entry": looped(fused, args.calls),
            "python": looped(lambda fused=fused: fused(backend="cpu"), args.calls),
            "torch": looped(plain, args.calls),
        }
        timings, failed = harness.measure_side_by_side(fns, device, repeats=args.repeats)
        if failed:
            raise SystemExit(f"{name}: {failed}")
        us = {impl: timing.median_ms * 1e3 / args.calls for impl, timing in timings.items()}
        print(f"{name:<30} {us['entry']:8.1f} {us['python']:8.1f} {us['torch']:8.1f}  {us['entry'] / us['torch']:.2f}")
    if fused_attn.backends.fast_entry("layer_norm") is None:
        print("note: the extension has no C++ entry here (fused-attn info): 'entry' took the Python path")


if __name__ == "__main__":
    main()
