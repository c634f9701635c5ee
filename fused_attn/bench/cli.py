"""``fused-attn bench``: runs suites, prints a table, writes JSON."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from .harness import measure
from .suites import SUITES, Settings

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", choices=sorted(SUITES) + ["all"], default="all")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if present")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: float32 on cpu, bfloat16 on cuda")
    parser.add_argument("--batch", type=int, default=None, help="attention/softmax: batch (default: a fixed token count)")
    parser.add_argument("--heads", type=int, default=None, help="attention/softmax: heads")
    parser.add_argument("--head-dim", type=int, default=None, help="attention: head dim (default 64)")
    parser.add_argument("--seq", type=_ints, default=None, help="attention/softmax: comma-separated lengths")
    parser.add_argument("--causal", choices=["both", "true", "false"], default="both", help="attention")
    parser.add_argument("--rows", type=int, default=None, help="layer_norm: number of rows (tokens)")
    parser.add_argument("--hidden", type=_ints, default=None, help="layer_norm: comma-separated hidden sizes")
    parser.add_argument("--backends", type=str, default=None, help="comma-separated fused backends to include")
    parser.add_argument("--mode", choices=["fwd", "fwd+bwd"], default="fwd")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per implementation")
    parser.add_argument("--json", type=str, default=None, help="write the records to this path")


def _format_table(records: list[dict]) -> str:
    header = (f"{'suite':<11} {'shape':<26} {'dtype':<9} {'mode':<8} {'impl':<12} {'median ms':>10} {'min ms':>9} "
              f"{'rate':>14} {'vs torch':>9} {'peak MiB':>9}")
    lines = [header, "-" * len(header)]
    for r in records:
        shape = "x".join(str(v) if not isinstance(v, bool) else ("causal" if v else "full") for v in r["shape"].values())
        prefix = f"{r['suite']:<11} {shape:<26} {r['dtype']:<9} {r['mode']:<8} {r['impl']:<12}"
        if "skipped" in r:
            lines.append(f"{prefix} skipped: {r['skipped']}")
            continue
        rate = f"{r['tflops']:.2f} TFLOP/s" if "tflops" in r else f"{r['gbps']:.1f} GB/s"
        peak = f"{r['peak_mem_bytes'] / 2**20:.1f}" if r["peak_mem_bytes"] is not None else "-"
        lines.append(
            f"{prefix} {r['median_ms']:>10.3f} {r['min_ms']:>9.3f} {rate:>14} {r['speedup_vs_eager']:>8.2f}x {peak:>9}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("fused-attn bench: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    settings = Settings(
        device=device,
        dtype=DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")],
        mode=args.mode,
        batch=args.batch,
        heads=args.heads,
        head_dim=args.head_dim,
        seqs=args.seq,
        rows=args.rows,
        hiddens=args.hidden,
        causal=None if args.causal == "both" else [args.causal == "true"],
        backends=args.backends.split(",") if args.backends else None,
    )
    repeats = args.repeats or (30 if device.type == "cuda" else 5)
    suites = sorted(SUITES) if args.suite == "all" else [args.suite]
    records: list[dict] = []
    for suite in suites:
        for case in SUITES[suite](settings):
            base = {"suite": case.suite, "device": str(device), "dtype": str(case.dtype).replace("torch.", ""),
                    "mode": case.mode, "shape": case.shape}
            timings, failed = {}, {}
            for name, fn in case.impls.items():
                try:
                    timings[name] = measure(fn, device, repeats=repeats)
                except (RuntimeError, ValueError) as exc:  # e.g. out of memory, a kernel that refuses the shape
                    failed[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            eager = timings["torch"].median_ms if "torch" in timings else float("nan")
            for name, t in timings.items():
                record = {**base, "impl": name, "median_ms": t.median_ms, "min_ms": t.min_ms, "max_ms": t.max_ms,
                          "speedup_vs_eager": eager / t.median_ms, "peak_mem_bytes": t.peak_mem_bytes}
                if case.flops is not None:
                    record["tflops"] = case.flops / (t.median_ms * 1e9)
                if case.min_bytes is not None:
                    record["gbps"] = case.min_bytes / (t.median_ms * 1e6)
                records.append(record)
            records += [{**base, "impl": name, "skipped": why} for name, why in {**case.skipped, **failed}.items()]
            del case, timings
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(_format_table(records))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=2)
        print(f"wrote {len(records)} records to {args.json}")
    return 0
