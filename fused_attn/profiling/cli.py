"""fused-attn profile-memory: peak and per-module memory of a model, plain vs optimize()d.

By default one BERT-base layer at batch 1, seq 2048, forward and backward (a minute on a CPU).
A workload whose bytes (a lower bound: inputs, parameters, hidden states) exceed the memory
available is refused before it is built.
"""

from __future__ import annotations

import argparse

import torch

from ..bench import workloads
from ..bench.cli import (
    DTYPES,
    PLOT_SUFFIXES,
    UsageError,
    check_outputs,
    positive_int,
    resolve_device,
    write_json,
    written,
)
from ..bench.harness import is_out_of_memory, is_size_overflow, one_line_reason, progress
from . import memory


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=workloads.MODELS, default="bert-base", help="default: %(default)s")
    parser.add_argument("--layers", type=positive_int, default=1,
                        help="encoder layers; transformer and nn-transformer: encoder and decoder layers, each "
                             "(default %(default)s)")
    parser.add_argument("--batch", type=positive_int, default=1, help="default: %(default)s")
    parser.add_argument("--seq", type=positive_int, default=2048, help="default: %(default)s")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if present")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: float32 on cpu, bfloat16 on cuda")
    parser.add_argument("--mode", choices=["fwd", "fwd+bwd"], default="fwd+bwd",
                        help="fwd: inference; fwd+bwd: forward and backward of a training step (default)")
    parser.add_argument("--json", type=str, default=None, help="write the measurements to this path")
    parser.add_argument("--plot", type=str, default=None,
                        help="write a bar plot to this path: .png, .svg or .pdf (needs matplotlib)")
    parser.add_argument("--snapshot", type=str, default=None,
                        help="CUDA only: write an allocator snapshot (open it at pytorch.org/memory_viz)")


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def format_table(result: dict) -> str:
    plain = {m["name"]: m for m in result["plain"]["modules"]}
    fused = {m["name"]: m for m in result["fused"]["modules"]}
    names = list(plain) + [n for n in fused if n not in plain]
    kinds = {}
    for name in names:
        kind = (plain.get(name) or fused.get(name))["type"]
        if name in fused and name in plain and fused[name]["type"] != kind:
            kind = f"{kind}->{fused[name]['type']}"
        kinds[name] = kind
    width = max(len(n) for n in names) + 2
    type_width = max(4, *(len(k) for k in kinds.values()))
    header = (f"{'module':<{width}} {'type':<{type_width}} {'activation MiB':>16} {'saved for bwd MiB':>18}\n"
              f"{'':<{width}} {'':<{type_width}} {'plain':>8} {'fused':>7} {'plain':>9} {'fused':>8}")
    rule = "-" * (width + type_width + 37)
    lines = [header, rule]
    empty = {"activation_bytes": 0, "saved_bytes": 0}
    for name in names:
        p, f = plain.get(name, empty), fused.get(name, empty)
        lines.append(
            f"{name:<{width}} {kinds[name]:<{type_width}} {_mib(p['activation_bytes']):>8} "
            f"{_mib(f['activation_bytes']):>7} {_mib(p['saved_bytes']):>9} {_mib(f['saved_bytes']):>8}"
        )
    lines.append(rule)
    if result["ratio"] is None:
        lines.append("peak: nothing was allocated")
        return "\n".join(lines)
    training = result["mode"] == "fwd+bwd"
    lines.append(_comparison("peak of the step" if training else "peak", result, "peak_bytes", "ratio"))
    if training:
        # The step's peak, reached in backward, holds the parameters' gradients: in a small model
        # at a short length they hide what fusion saves, which these two show.
        lines.append(_comparison("forward peak", result, "forward_peak_bytes", "forward_ratio"))
        lines.append(_comparison("saved for backward", result, "saved_bytes", "saved_ratio"))
    return "\n".join(lines)


def _comparison(label: str, result: dict, key: str, ratio_key: str) -> str:
    ratio = result[ratio_key]
    return (f"{label}: plain {_mib(result['plain'][key])} MiB, fused {_mib(result['fused'][key])} MiB"
            + (f", fused/plain {ratio:.3f}" if ratio is not None else ""))


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    if args.snapshot and device.type != "cuda":
        raise UsageError("--snapshot needs --device cuda (the snapshot is the CUDA caching allocator's)")
    check_outputs([(args.json, "--json", None), (args.plot, "--plot", PLOT_SUFFIXES),
                   (args.snapshot, "--snapshot", None)])
    if args.plot is not None:
        from ..bench import plots

        plots.require_matplotlib()
    training = args.mode == "fwd+bwd"
    try:
        workload = workloads.build(args.model, batch=args.batch, seq=args.seq, layers=args.layers, device=device,
                                   dtype=dtype, training=training)
        plain = workload.model.train(training)
        fused = workloads.optimized(workload).train(training)
        if args.snapshot:
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        profiles = {}
        with progress("fused-attn profile-memory", 2, unit="model") as bar:
            for label, model in (("plain", plain), ("fused", fused)):
                bar.start(label)
                profiles[label] = memory.profile_model(model, workload.step, device, training=training)
    except (workloads.WorkloadUnavailable, workloads.WorkloadTooLarge) as exc:
        raise UsageError(str(exc)) from None
    except Exception as exc:
        if is_size_overflow(exc):
            raise UsageError(f"{args.model} at batch {args.batch}, seq {args.seq}: sizes too large to set up: "
                             f"{one_line_reason(exc)}") from None
        if not is_out_of_memory(exc):
            raise
        raise UsageError(f"{args.model} at batch {args.batch}, seq {args.seq} does not fit in memory here: "
                         f"{one_line_reason(exc)}") from None
    failed: list[str] = []
    snapshot_written = False
    if args.snapshot:
        try:
            snapshot_written = written("--snapshot", args.snapshot,
                                       lambda: torch.cuda.memory._dump_snapshot(args.snapshot), failed)
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)
    result = {
        "model": args.model, "layers": workload.layers, "batch": args.batch, "seq": args.seq, "device": str(device),
        "dtype": str(dtype).replace("torch.", ""), "mode": args.mode,
        **memory.compare(profiles["plain"], profiles["fused"]),
    }
    layers = (f"{workload.layers} encoder + {workload.layers} decoder layer(s)" if args.model in workloads.SEQ2SEQ
              else f"{workload.layers} layer(s)")
    print(f"{args.model}, {layers}, batch {args.batch}, seq {args.seq}, {result['dtype']}, "
          f"{args.mode}, {device}")
    print(format_table(result))
    if args.json is not None and written("--json", args.json, lambda: write_json(result, args.json), failed):
        print(f"wrote {args.json}")
    if args.plot is not None:
        from ..bench import plots

        if written("--plot", args.plot, lambda: plots.plot_memory(result, args.plot), failed):
            print(f"wrote {args.plot}")
    if snapshot_written:
        print(f"wrote {args.snapshot}")
    if failed:
        raise OSError("; ".join(failed))
    return 0
