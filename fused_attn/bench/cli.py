"""``fused-attn bench``: runs suites, prints a table, writes JSON."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from .harness import measure
from .suites import SUITES

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# rows x hidden: BERT-base/large and wider hidden sizes at 4096 tokens (batch 8 x seq 512).
DEFAULT_LAYER_NORM_SIZES = {"cpu": [(4096, 768), (4096, 1024), (4096, 4096)], "cuda": [(16384, 768), (16384, 1024), (16384, 4096), (16384, 8192)]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", choices=sorted(SUITES) + ["all"], default="all")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if present")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: float32 on cpu, bfloat16 on cuda")
    parser.add_argument("--rows", type=int, default=None, help="layer_norm: number of rows (tokens)")
    parser.add_argument("--hidden", type=str, default=None, help="layer_norm: comma-separated hidden sizes")
    parser.add_argument("--backends", type=str, default=None, help="comma-separated fused backends to include")
    parser.add_argument("--mode", choices=["fwd", "fwd+bwd"], default="fwd")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per implementation")
    parser.add_argument("--json", type=str, default=None, help="write the records to this path")


def _sizes(args: argparse.Namespace, device: str) -> list[tuple[int, int]]:
    defaults = DEFAULT_LAYER_NORM_SIZES[device]
    rows = args.rows or defaults[0][0]
    if args.hidden:
        return [(rows, int(h)) for h in args.hidden.split(",")]
    return [(rows, h) for _, h in defaults]


def _format_table(records: list[dict]) -> str:
    header = f"{'suite':<11} {'shape':<22} {'dtype':<9} {'mode':<8} {'impl':<10} {'median ms':>10} {'min ms':>9} {'GB/s':>8} {'vs torch':>9}"
    lines = [header, "-" * len(header)]
    for r in records:
        shape = "x".join(str(v) for v in r["shape"].values())
        if "skipped" in r:
            lines.append(f"{r['suite']:<11} {shape:<22} {r['dtype']:<9} {r['mode']:<8} {r['impl']:<10} skipped: {r['skipped']}")
            continue
        lines.append(
            f"{r['suite']:<11} {shape:<22} {r['dtype']:<9} {r['mode']:<8} {r['impl']:<10} "
            f"{r['median_ms']:>10.3f} {r['min_ms']:>9.3f} {r['gbps']:>8.1f} {r['speedup_vs_eager']:>8.2f}x"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("fused-attn bench: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    repeats = args.repeats or (50 if device.type == "cuda" else 10)
    wanted = args.backends.split(",") if args.backends else None
    suites = sorted(SUITES) if args.suite == "all" else [args.suite]
    records: list[dict] = []
    for suite in suites:
        for case in SUITES[suite](device, dtype, args.mode, _sizes(args, device.type), wanted):
            base = {"suite": case.suite, "device": str(device), "dtype": str(dtype).replace("torch.", ""), "mode": case.mode, "shape": case.shape}
            timings = {name: measure(fn, device, repeats=repeats) for name, fn in case.impls.items()}
            eager = timings["torch"].median_ms
            for name, t in timings.items():
                records.append({
                    **base, "impl": name, "median_ms": t.median_ms, "min_ms": t.min_ms, "max_ms": t.max_ms,
                    "gbps": case.min_bytes / (t.median_ms * 1e6), "speedup_vs_eager": eager / t.median_ms,
                    "peak_mem_bytes": t.peak_mem_bytes,
                })
            records += [{**base, "impl": name, "skipped": why} for name, why in case.skipped.items()]
    print(_format_table(records))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=2)
        print(f"wrote {len(records)} records to {args.json}")
    return 0
