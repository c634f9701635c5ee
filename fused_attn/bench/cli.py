"""``fused-attn bench``: runs suites side by side, prints a table, writes JSON, CSV and a plot.

Without ``--suite`` the run is sized to the device: on a CPU, a small BERT end to end (inference
and a training step, plain against ``optimize()``d) and the attention's time and memory over
sequence length (forward + backward unless ``--mode``), without torch.compile; on a GPU, every
suite's full sweep. A size or selection flag that no suite of the run takes is noted, not used.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os

import torch

from .. import backends
from . import harness
from .suites import SUITES, Settings, attention_heads

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MODES = ["fwd", "fwd+bwd"]


class UsageError(Exception):
    """A command-line argument that cannot be served; printed as one line, exit status 2."""


# The largest size a flag takes, 2**31 - 1 (the int32 limit many kernels index with): far past
# any size that fits in memory, and it keeps values that cannot even become a tensor size (past
# int64) a usage error instead of a traceback.
MAX_SIZE = 2**31 - 1


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    if value > MAX_SIZE:
        raise argparse.ArgumentTypeError(f"expected a positive integer up to 2**31 - 1 ({MAX_SIZE}), got {value}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (0.0 <= value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds >= 0, got {text}")
    return value


def names(text: str) -> list[str]:
    """The comma-separated items of ``text``, stripped; an empty one (``8,,16``, ``,``) is an error
    rather than dropped, since it is usually a typo for a value."""
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list without empty items, got {text!r}")
    return items


def positive_ints(text: str) -> list[int]:
    try:
        items = names(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    return [positive_int(v) for v in items]


PLOT_SUFFIXES = (".png", ".svg", ".pdf")


def check_output(path: str | None, flag: str, suffixes: tuple[str, ...] | None = None) -> None:
    """Before any work: ``path`` must be a file name that can be written (its folder exists and
    is writable; not a folder itself) with one of ``suffixes`` when given."""
    if path is None:
        return
    if not path.strip():
        raise UsageError(f"{flag}: empty file name")
    if os.path.isdir(path) or path.endswith(("/", os.sep)):
        raise UsageError(f"{flag} {path}: is a directory; expected a file name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"{flag} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UsageError(f"{flag} {path}: not writable")
    if suffixes and not path.lower().endswith(suffixes):
        raise UsageError(f"{flag} {path}: expected a file name ending in {', '.join(suffixes)}")


def resolve_device(name: str | None) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here")
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", choices=sorted(SUITES) + ["all"], default=None,
                        help="default: sized to the device (see the command's description)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if present")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: float32 on cpu, bfloat16 on cuda")
    parser.add_argument("--batch", type=positive_int, default=None, help="batch (default: a fixed token count)")
    parser.add_argument("--heads", type=positive_int, default=None, help="attention/softmax: heads")
    parser.add_argument("--kv-heads", type=positive_int, default=None,
                        help="attention: key/value heads, a divisor of --heads (grouped-query; default: --heads)")
    parser.add_argument("--head-dim", type=positive_int, default=None, help="attention: head dim (default 64)")
    parser.add_argument("--seq", type=positive_ints, default=None, help="attention/softmax/model: comma-separated lengths")
    parser.add_argument("--causal", choices=["both", "true", "false"], default="both", help="attention")
    parser.add_argument("--rows", type=positive_int, default=None, help="layer_norm/add_layer_norm/ffn: rows (tokens)")
    parser.add_argument("--hidden", type=positive_ints, default=None, help="layer_norm/add_layer_norm: hidden sizes; ffn: model widths")
    parser.add_argument("--models", type=names, default=None, help="model suite: comma-separated workloads")
    parser.add_argument("--layers", type=positive_int, default=None, help="model suite: encoder layers")
    parser.add_argument("--backends", type=names, default=None,
                        help="op suites: comma-separated fused backends to include")
    parser.add_argument("--mode", choices=MODES + ["both"], default=None, help="default: fwd, both for the default run")
    parser.add_argument("--repeats", type=positive_int, default=None,
                        help="timed calls per implementation (default: 30 on cuda; on a cpu at least 5, "
                             "more for fast calls, see --min-time)")
    parser.add_argument("--min-time", type=non_negative_float, default=None,
                        help="seconds: an implementation is called in further rounds until its timed calls "
                             "add up to this, at most 200 calls (default 0.25 on a cpu unless --repeats is "
                             "given, else 0)")
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    parser.add_argument("--json", type=str, default=None, help="write the records to this path")
    parser.add_argument("--csv", type=str, default=None, help="write the records to this path as CSV")
    parser.add_argument("--plot", type=str, default=None, help="write a PNG plot (needs matplotlib) to this path")


# ---------------------------------------------------------------------------------------------
# Running


def _peak_fraction(record: dict, peaks: dict[str, float] | None) -> float | None:
    if not peaks:
        return None
    if "tflops" in record and record["dtype"] in peaks:
        return record["tflops"] / peaks[record["dtype"]]
    if "gbps" in record:
        return record["gbps"] / peaks["gbps"]
    return None


def run_case(case, device: torch.device, repeats: int, step=lambda label: None, min_time_s: float = 0.0) -> list[dict]:
    """Times every implementation of ``case`` and returns one record per implementation."""
    base = {"suite": case.suite, "device": str(device), "dtype": str(case.dtype).replace("torch.", ""),
            "mode": case.mode, "shape": case.shape}
    label = f"{case.suite} {case.mode} {shape_text(case.shape)}"
    timings, failed = harness.measure_side_by_side(
        case.impls, device, repeats=repeats, warmup=2 if device.type == "cuda" else 1,
        step=lambda name: step(f"{label} {name}"), min_time_s=min_time_s,
    )
    if device.type == "cuda":
        torch.cuda.empty_cache()
    baseline = timings[case.baseline].median_ms if case.baseline in timings else None
    torch_ms = timings["torch"].median_ms if "torch" in timings else None
    peaks = harness.device_peaks(device)
    records = []
    for name, t in timings.items():
        record = {**base, "impl": name, "median_ms": t.median_ms, "min_ms": t.min_ms, "max_ms": t.max_ms,
                  "speedup_vs_eager": None if baseline is None else baseline / t.median_ms, "baseline": case.baseline,
                  "peak_mem_bytes": t.peak_mem_bytes}
        if torch_ms is not None:
            record["speedup_vs_torch"] = torch_ms / t.median_ms
        if case.flops is not None:
            record["tflops"] = harness.tflops(case.flops, t.median_ms)
        if case.min_bytes is not None:
            record["gbps"] = harness.gbps(case.min_bytes, t.median_ms)
        if case.tokens is not None:
            record["tokens_per_s"] = case.tokens / (t.median_ms * 1e-3)
        fraction = _peak_fraction(record, peaks)
        if fraction is not None:
            record["peak_fraction"] = fraction
        records.append(record)
    records += [{**base, "impl": name, "skipped": why} for name, why in {**case.skipped, **failed}.items()]
    return records


def _plan(args: argparse.Namespace, device: torch.device) -> list[tuple[str, Settings]]:
    """(suite, settings) pairs to run, in order."""
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    wanted = args.backends
    if wanted:
        known = sorted(b for b in backends.BACKENDS if b != "reference")
        if "reference" in wanted:
            raise UsageError("--backends: 'reference' is not a fused backend (the package's plain PyTorch oracle, "
                             f"timed as its own row in every op suite); expected some of {', '.join(known)}")
        unknown = [b for b in wanted if b not in known]
        if unknown:
            raise UsageError(f"--backends: unknown backend {unknown[0]!r}; expected some of {', '.join(known)}")
        for name in wanted:
            reasons = backends.backend_unavailable_reasons(name, device)
            if reasons:
                raise UsageError(f"--backends: {name!r} cannot run on {device.type} here: {'; '.join(reasons)}")
    models = args.models
    if models:
        from .workloads import MODELS

        bad = [m for m in models if m not in MODELS]
        if bad:
            raise UsageError(f"--models: unknown model {bad[0]!r}; expected some of {', '.join(MODELS)}")
    base = Settings(
        device=device, dtype=dtype, mode="fwd", batch=args.batch, heads=args.heads, kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        seqs=args.seq, rows=args.rows, hiddens=args.hidden,
        causal=None if args.causal == "both" else [args.causal == "true"], backends=wanted,
        compile=not args.no_compile, models=models, layers=args.layers,
    )
    if args.kv_heads is not None and args.suite in (None, "all", "attention"):
        heads = args.heads or (12 if args.suite is None and device.type == "cpu" else attention_heads(base))
        if heads % args.kv_heads:
            raise UsageError(f"--kv-heads {args.kv_heads} must divide the attention heads, {heads}"
                             + ("" if args.heads else " (the default; --heads sets them)"))
    if args.mode == "both" or (args.mode is None and args.suite is None):
        modes = MODES
    else:
        modes = [args.mode or "fwd"]
    if args.suite is None and device.type == "cpu":
        # A newcomer's first run on a CPU, in about two minutes: a small BERT end to end, then
        # how attention's time and memory grow with the sequence (batch 1, BERT-base heads),
        # forward + backward unless --mode says otherwise. torch.compile is left out for time.
        def left_out(suite: str) -> str | None:
            if args.no_compile:
                return None
            return ("left out of the default CPU run for time (compiling is slow on a CPU); "
                    f"`fused-attn bench --suite {suite}` includes it")

        plan = [("model", dataclasses.replace(base, mode=m, compile=False, compile_skipped=left_out("model")))
                for m in modes]
        attention = dataclasses.replace(base, compile=False, compile_skipped=left_out("attention"),
                                        batch=args.batch or 1, heads=args.heads or 12,
                                        seqs=args.seq or [256, 512, 1024, 2048], causal=base.causal or [False])
        attention_modes = ["fwd+bwd"] if args.mode is None else modes
        return plan + [("attention", dataclasses.replace(attention, mode=m)) for m in attention_modes]
    suites = sorted(SUITES) if args.suite in (None, "all") else [args.suite]
    return [(suite, dataclasses.replace(base, mode=m)) for suite in suites for m in modes]


# On a CPU a call of a few milliseconds is slowed by page faults of its fresh output buffers and by
# what ran just before it: five samples gave medians 2x apart between runs. Sampling each such call
# for a quarter of a second (at most 200 calls) steadies them for little time; calls of 50 ms and
# more keep their 5 samples.
DEFAULT_CPU_MIN_TIME_S = 0.25


# The size and selection flags each suite takes (--dtype, --mode, --repeats, --min-time and the outputs apply
# to every suite; --no-compile to all that time torch.compile).
SUITE_FLAGS: dict[str, tuple[str, ...]] = {
    "attention": ("--batch", "--heads", "--kv-heads", "--head-dim", "--seq", "--causal", "--backends"),
    "softmax": ("--batch", "--heads", "--seq", "--backends"),
    "layer_norm": ("--rows", "--hidden", "--backends"),
    "add_layer_norm": ("--rows", "--hidden", "--backends"),
    "ffn": ("--rows", "--hidden", "--backends"),
    "model": ("--models", "--layers", "--batch", "--seq"),
}


def _given(args: argparse.Namespace, flag: str) -> bool:
    value = getattr(args, flag[2:].replace("-", "_"))
    return value != "both" if flag == "--causal" else value is not None


def unused_flag_notes(args: argparse.Namespace, plan: list[tuple[str, Settings]]) -> list[str]:
    """One line per size or selection flag given that no suite of ``plan`` takes: accepted, so
    that one command line can serve several suites, but said, since it changes nothing."""
    suites = list(dict.fromkeys(suite for suite, _ in plan))
    taken = {flag for suite in suites for flag in SUITE_FLAGS[suite]}
    flags = dict.fromkeys(flag for suite in SUITE_FLAGS for flag in SUITE_FLAGS[suite])
    notes = []
    for flag in flags:
        if flag in taken or not _given(args, flag):
            continue
        if len(suites) == 1:
            takes = SUITE_FLAGS[suites[0]]
            takes_text = ", ".join(takes[:-1]) + " and " + takes[-1]
            notes.append(f"note: {flag} has no effect on suite {suites[0]} (it takes {takes_text})")
        else:
            notes.append(f"note: {flag} has no effect on suites {', '.join(suites)} (none of them takes it)")
    return notes


def _run_suite(suite: str, settings: Settings, device: torch.device, repeats: int, step, records: list[dict],
               min_time_s: float = 0.0) -> None:
    """Appends the suite's records to ``records`` case by case (an interrupt keeps those done)."""
    cases = SUITES[suite](settings)
    while True:
        try:
            case = next(cases)
        except StopIteration:
            return
        except Exception as exc:
            # Setting a case up (its inputs, its model) ran out of memory, or its sizes overflow
            # the integer types: the suite's later, larger cases would too. Recorded, and the sweep
            # goes on with the next suite.
            if harness.is_out_of_memory(exc):
                why = "setting up the next case ran out of memory; the rest of the suite was not run: "
            elif harness.is_size_overflow(exc):
                why = "the next case's sizes are too large to set up; the rest of the suite was not run: "
            else:
                raise
            if device.type == "cuda":
                torch.cuda.empty_cache()
            records.append({"suite": suite, "impl": "all", "device": str(device),
                            "dtype": str(settings.dtype).replace("torch.", ""), "mode": settings.mode, "shape": {},
                            "skipped": why + harness.one_line_reason(exc)})
            return
        records += run_case(case, device, repeats, step, min_time_s)
        del case


def run(args: argparse.Namespace) -> int:
    for path, flag, suffixes in ((args.json, "--json", None), (args.csv, "--csv", None),
                                 (args.plot, "--plot", PLOT_SUFFIXES)):
        check_output(path, flag, suffixes)
    if args.plot is not None:
        from . import plots

        plots.require_matplotlib()
    device = resolve_device(args.device)
    plan = _plan(args, device)
    for note in unused_flag_notes(args, plan):
        print(note)
    repeats = args.repeats or (30 if device.type == "cuda" else 5)
    min_time_s = args.min_time if args.min_time is not None else (
        DEFAULT_CPU_MIN_TIME_S if device.type == "cpu" and args.repeats is None else 0.0)
    records: list[dict] = []
    interrupted = False
    try:
        with harness.progress("fused-attn bench") as step:
            for suite, settings in plan:
                _run_suite(suite, settings, device, repeats, step, records, min_time_s)
    except KeyboardInterrupt:  # Ctrl-C (or a caller's time limit): report the cases that finished
        interrupted = True
        print(f"\ninterrupted: reporting the {len(records)} records measured so far")
    print(format_table(records))
    if args.json is not None:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=2)
        print(f"wrote {len(records)} records to {args.json}")
    if args.csv is not None:
        write_csv(records, args.csv)
        print(f"wrote {args.csv}")
    if args.plot is not None:
        from . import plots

        if any("skipped" not in r for r in records):
            plots.plot_bench(records, args.plot)
            print(f"wrote {args.plot}")
        else:
            print(f"--plot {args.plot}: no timed records to plot; nothing written")
    return 130 if interrupted else 0


# ---------------------------------------------------------------------------------------------
# Output


_SHAPE_KEYS = {"batch": "B", "heads": "H", "kv_heads": "Hkv", "seq": "L", "head_dim": "D", "rows": "rows ", "hidden": "N", "tokens": "T",
               "d_model": "M", "model": "", "layers": "layers "}


def shape_text(shape: dict) -> str:
    """``{"batch": 8, "heads": 12, "seq": 512, "causal": True}`` -> ``B8 H12 L512 causal``."""
    parts = []
    for key, value in shape.items():
        if isinstance(value, bool):
            parts.append("causal" if value else "full")
        elif value is not None:
            parts.append(f"{_SHAPE_KEYS.get(key, key + '=')}{value}")
    return " ".join(parts)


def rate_text(record: dict) -> str:
    if "tflops" in record:
        return f"{record['tflops']:.3g} TFLOP/s"
    if "gbps" in record:
        return f"{record['gbps']:.3g} GB/s"
    if "tokens_per_s" in record:
        return f"{record['tokens_per_s']:.4g} tok/s"
    return "-"


EAGER_NOTE = ("vs eager: speed-up against the code a user writes without this package (attention: `eager`, "
              "softmax(QK^T*scale)V; models: `plain`; others: `torch`); vs torch: against PyTorch's own "
              "implementation (SDPA, F.layer_norm, ...)")


def format_table(records: list[dict]) -> str:
    """One line per record; skipped implementations show their reason."""
    header = (f"{'suite':<14} {'shape':<28} {'dtype':<8} {'mode':<7} {'impl':<12} {'median ms':>10} {'min ms':>9} "
              f"{'max ms':>9} {'rate':>15} {'% peak':>6} {'vs eager':>8} {'vs torch':>8} {'peak MiB':>9}")
    lines = [header, "-" * len(header)]
    for r in records:
        if "skipped" in r:
            continue
        prefix = f"{r['suite']:<14} {shape_text(r['shape']):<28} {r['dtype']:<8} {r['mode']:<7} {r['impl']:<12}"
        peak = f"{r['peak_mem_bytes'] / 2**20:.1f}" if r.get("peak_mem_bytes") is not None else "-"
        fraction = f"{100 * r['peak_fraction']:.0f}" if "peak_fraction" in r else "-"
        vs_torch = f"{r['speedup_vs_torch']:.2f}x" if "speedup_vs_torch" in r else "-"
        vs_eager = f"{r['speedup_vs_eager']:.2f}x" if r["speedup_vs_eager"] is not None else "-"
        lines.append(
            f"{prefix} {r['median_ms']:>10.3f} {r['min_ms']:>9.3f} {r['max_ms']:>9.3f} {rate_text(r):>15} {fraction:>6} "
            f"{vs_eager:>8} {vs_torch:>8} {peak:>9}"
        )
    lines.append(EAGER_NOTE)
    not_run = not_run_counts(records)
    if not_run:
        lines.append("not run:")
        lines += [f"  {suite} {impl} ({n} case{'s' * (n > 1)}): {why}" for (suite, impl, why), n in not_run.items()]
    return "\n".join(lines)


def not_run_counts(records: list[dict]) -> dict[tuple[str, str, str], int]:
    """How many cases each (suite, implementation, reason) was skipped for, in record order."""
    counts: dict[tuple[str, str, str], int] = {}
    for r in records:
        if "skipped" in r:
            key = (r["suite"], r["impl"], r["skipped"])
            counts[key] = counts.get(key, 0) + 1
    return counts


CSV_FIELDS = ["suite", "impl", "device", "dtype", "mode", "shape", "median_ms", "min_ms", "max_ms", "tflops", "gbps",
              "tokens_per_s", "peak_fraction", "speedup_vs_eager", "speedup_vs_torch", "baseline", "peak_mem_bytes", "skipped"]


def write_csv(records: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in records:
            writer.writerow({**r, "shape": json.dumps(r["shape"], sort_keys=False)})
