"""Host time per call: each public op on tiny inputs, where the time is the host's, not the kernel's.

For each op, three implementations of the same computation are timed side by side in interleaved
rounds (``fused_attn.bench.harness.measure_side_by_side``), each timed unit a loop of ``--calls``
calls, reported in microseconds per call (median over the rounds):

- ``entry``: the op called as a user calls it (no backend named), served by the extension's C++
  entry for the plain call (csrc/fast.cpp) once the first call has approved its kind;
- ``python``: the same op with the device's own backend named (``backend="cpu"`` or ``"cuda"``),
  which takes the Python path (validation and backend choice in Python) to the same kernel;
- ``torch``: PyTorch's own functions for the same work;
- on a GPU, ``triton``: the op with ``backend="triton"`` (the Python path to the Triton kernels:
  validation, the ``torch.library`` custom op, Triton's launcher and autotuner lookup). Its
  kernels are as small as the others', so the column is the host's cost of that path, which a
  benchmark that times single calls with CUDA events counts in the call's time.

Without ``--grad`` the inputs need no gradient (the ops' inference forms); with it they do, and
autograd records each call (no backward is run). One CPU thread by default (``--threads``), since
the work of such calls is too small to share. On a GPU (``--device cuda``, float16 by default)
the loop's time is taken with CUDA events: where launches bound it, as here, that is the host's
time per call; ``make gpu-check`` reports it.

    python benchmarks/host_time.py            # the README's table, columns without gradient
    python benchmarks/host_time.py --grad     # the same while autograd records
    python benchmarks/host_time.py --device cuda --both --json host.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: the package may be built in place in the repository, not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fused_attn  # noqa: E402
from fused_attn.bench import harness  # noqa: E402


def cases(grad: bool, device: torch.device, dtype: torch.dtype) -> dict[str, tuple[Callable[..., object],
                                                                                   Callable[[], object]]]:
    """op label -> (the fused call taking ``backend=``, PyTorch's own functions for the same work)."""
    gen = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).requires_grad_(grad)

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


def measure(device: torch.device, dtype: torch.dtype, grad: bool, *, calls: int, repeats: int) -> list[dict]:
    """One record per op: microseconds per call of the entry, the Python path (the device's own
    backend named) and torch's functions, timed side by side."""
    records = []
    for name, (fused, plain) in cases(grad, device, dtype).items():
        fns = {
            "entry": looped(fused, calls),
            "python": looped(lambda fused=fused: fused(backend=device.type), calls),
            "torch": looped(plain, calls),
        }
        if device.type == "cuda" and fused_attn.backends.backend_unavailable_reasons("triton", device) == []:
            fns["triton"] = looped(lambda fused=fused: fused(backend="triton"), calls)
        timings, failed = harness.measure_side_by_side(fns, device, repeats=repeats)
        if failed:
            raise SystemExit(f"{name}: {failed}")
        us = {impl: timing.median_ms * 1e3 / calls for impl, timing in timings.items()}
        records.append({"op": name, "grad": grad, "device": device.type, "dtype": str(dtype).replace("torch.", ""),
                        **{f"{impl}_us": value for impl, value in us.items()}})
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grad", action="store_true", help="inputs that require grad (autograd records each call)")
    parser.add_argument("--both", action="store_true", help="without and then with --grad")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="default: float32 on cpu, float16 on cuda (the dtypes the cuda backend serves)")
    parser.add_argument("--calls", type=int, default=2000, help="calls per timed unit")
    parser.add_argument("--repeats", type=int, default=15, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads")
    parser.add_argument("--json", default=None, help="write the records here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    records = []
    for grad in ([False, True] if args.both else [args.grad]):
        print(f"microseconds per call on {device.type} ({str(dtype).replace('torch.', '')}), "
              f"{'with' if grad else 'without'} autograd recording, {args.threads} CPU thread(s), "
              f"median of {args.repeats} interleaved loops of {args.calls}")
        print(f"{'op':<30} {'entry':>8} {'python':>8} {'torch':>8}  entry/torch  triton")
        for r in measure(device, dtype, grad, calls=args.calls, repeats=args.repeats):
            records.append(r)
            triton_us = f"{r['triton_us']:8.1f}" if "triton_us" in r else ""
            print(f"{r['op']:<30} {r['entry_us']:8.1f} {r['python_us']:8.1f} {r['torch_us']:8.1f}  "
                  f"{r['entry_us'] / r['torch_us']:11.2f}  {triton_us}")
    if fused_attn.backends.fast_entry("layer_norm") is None:
        print("note: the extension has no C++ entry here (fused-attn info): 'entry' took the Python path")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=2)


if __name__ == "__main__":
    main()
