"""The C++ CPU attention kernel against plain eager attention and torch's SDPA, on this machine.

Times the forward of ``fused_attn.scaled_dot_product_attention(..., backend="cpu")``,
the eager ``softmax(q @ k^T * scale) @ v`` a user writes without this package (``eager``) and
``torch.nn.functional.scaled_dot_product_attention`` at batch 1, 12 heads, head dim 64, float32,
seq 512..4096 (interleaved repetitions; min and median wall time, ratios of the mins), then
measures the peak extra memory of the same calls, forward and forward+backward.

Memory is measured so that every allocation counts, whichever allocator made it (torch's, MKL's,
OpenMP thread stacks, glibc): each (implementation, mode, seq) runs in a fresh subprocess that
allocates the inputs, makes one warm-up call (so that one-time library state, e.g. thread pools,
is part of the baseline rather than charged to the call), resets the kernel's peak-RSS counter
(``/proc/self/clear_refs``), records VmRSS, makes the measured call and reads VmHWM. The extra
memory is VmHWM - baseline; it includes the call's outputs (out; with the backward also the
input gradients). glibc is told to serve every allocation of 64 KiB or more with mmap and to give
it back on free (MALLOC_MMAP_THRESHOLD_), so freed memory from the warm-up cannot hide inside the
baseline and be reused unseen.

    python benchmarks/cpu_attention.py                 # the full table (a few minutes)
    python benchmarks/cpu_attention.py --seqs 512 1024 --no-memory

From pytest-benchmark: ``make_inputs`` and ``IMPLS`` give the calls, e.g.
``benchmark(IMPLS["cpu"], *make_inputs(1024))``; ``measure_memory(impl, mode, seq)`` returns the
subprocess measurement.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import fused_attn
from fused_attn.bench import harness

BATCH, HEADS, HEAD_DIM = 1, 12, 64
SEQS = (512, 1024, 2048, 4096)


def make_inputs(seq: int, *, requires_grad: bool = False, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(BATCH, HEADS, seq, HEAD_DIM, generator=gen).requires_grad_(requires_grad) for _ in range(3)
    )


def _cpu(q, k, v, causal=False):
    return fused_attn.scaled_dot_product_attention(q, k, v, is_causal=causal, backend="cpu")


def _eager(q, k, v, causal=False):
    scores = q @ k.transpose(-2, -1) * HEAD_DIM**-0.5
    if causal:
        scores = scores.masked_fill(torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(scores, -1) @ v


def _torch(q, k, v, causal=False):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


IMPLS: dict[str, Callable[..., torch.Tensor]] = {"cpu": _cpu, "eager": _eager, "torch": _torch}


# ---------------------------------------------------------------------------------------------
# Time


def time_forward(seq: int, reps: int, causal: bool) -> dict[str, list[float]]:
    """Wall times (s) of at least `reps` forward calls per implementation, interleaved so that a
    change in the machine's load hits all of them alike."""
    q, k, v = make_inputs(seq)
    with torch.no_grad():
        expected = _torch(q, k, v, causal)
        got = _cpu(q, k, v, causal)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        del expected, got
        slowest = 0.0
        for fn in IMPLS.values():  # warm-up, and how long a call takes
            start = time.perf_counter()
            fn(q, k, v, causal)
            slowest = max(slowest, time.perf_counter() - start)
        # Short calls get more repetitions (about 2 s of the slowest), for a steadier min.
        reps = max(reps, min(30, int(2.0 / slowest)))
        times: dict[str, list[float]] = {name: [] for name in IMPLS}
        for _ in range(reps):
            for name, fn in IMPLS.items():
                start = time.perf_counter()
                fn(q, k, v, causal)
                times[name].append(time.perf_counter() - start)
                gc.collect()
    return times


# ---------------------------------------------------------------------------------------------
# Memory


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _measure_in_this_process(impl: str, mode: str, seq: int, causal: bool) -> dict:
    backward = mode == "fwd+bwd"
    q, k, v = make_inputs(seq, requires_grad=backward)
    grad = torch.randn(BATCH, HEADS, seq, HEAD_DIM) if backward else None
    fn = IMPLS[impl]

    def call():
        if backward:
            fn(q, k, v, causal).backward(grad)
        else:
            with torch.no_grad():
                fn(q, k, v, causal)

    call()  # warm-up: one-time library state goes into the baseline
    for t in (q, k, v):
        t.grad = None
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = _status_kib("VmRSS")
    call()
    peak = _status_kib("VmHWM")
    return {"impl": impl, "mode": mode, "seq": seq, "base_kib": base, "peak_kib": peak, "extra_kib": peak - base}


def measure_memory(impl: str, mode: str, seq: int, causal: bool = False) -> dict:
    """Peak extra memory of one call, measured in a fresh subprocess (see the module docstring)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", impl, mode, str(seq)] + (["--causal"] if causal else [])
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"memory measurement {impl} {mode} {seq} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Report


def _mib(kib: float) -> str:
    return f"{kib / 1024:8.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=list(SEQS))
    parser.add_argument("--reps", type=int, default=5, help="timed calls per implementation and length (at least)")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-time", action="store_true")
    parser.add_argument("--_child", nargs=3, metavar=("IMPL", "MODE", "SEQ"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._child:
        impl, mode, seq = args._child
        print(json.dumps(_measure_in_this_process(impl, mode, int(seq), args.causal)))
        return 0

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"batch {BATCH}, heads {HEADS}, head_dim {HEAD_DIM}, float32, causal={args.causal}")
    if not args.no_time:
        print("\nforward time (ms: min / median of the interleaved repetitions; ratios of the mins)")
        print(f"{'seq':>6} {'cpu':>17} {'eager':>17} {'torch sdpa':>17} {'eager/cpu':>9} {'sdpa/cpu':>9} {'cpu GFLOP/s':>12}")
        for seq in args.seqs:
            times = time_forward(seq, args.reps, args.causal)
            best = {name: min(t) for name, t in times.items()}
            cells = [f"{best[n] * 1e3:7.1f} / {statistics.median(times[n]) * 1e3:7.1f}" for n in IMPLS]
            flops = harness.attention_flops(BATCH, HEADS, seq, seq, HEAD_DIM, causal=args.causal, mode="fwd")
            print(f"{seq:>6} {cells[0]:>17} {cells[1]:>17} {cells[2]:>17} "
                  f"{best['eager'] / best['cpu']:9.2f} {best['torch'] / best['cpu']:9.2f} "
                  f"{flops / best['cpu'] / 1e9:12.1f}")
            sys.stdout.flush()

    if not args.no_memory:
        out_mib = BATCH * HEADS * HEAD_DIM * 4 * 1024 / 2**20
        print("\npeak extra memory (MiB over the inputs; includes the outputs: out is "
              f"{out_mib:.3f} MiB per 1K of seq, the gradients 3x that)")
        print(f"{'mode':>8} {'seq':>6} {'cpu':>8} {'eager':>9} {'torch sdpa':>10} {'cpu/eager':>9}")
        for mode in ("fwd", "fwd+bwd"):
            previous = None
            for seq in args.seqs:
                extra = {name: measure_memory(name, mode, seq, args.causal)["extra_kib"] for name in IMPLS}
                growth = f"  cpu x{extra['cpu'] / previous:.2f} vs previous seq" if previous else ""
                previous = extra["cpu"]
                print(f"{mode:>8} {seq:>6} {_mib(extra['cpu'])} {_mib(extra['eager']):>9} "
                      f"{_mib(extra['torch']):>10} {extra['cpu'] / max(extra['eager'], 1):9.3f}{growth}")
                sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
