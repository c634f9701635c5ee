"""fused-attn bench: runs suites side by side, prints a table, writes JSON, CSV and a plot.

Without --suite the run is sized to the device: on a CPU, a small BERT end to end (inference
and a training step, plain against optimize()d) and the attention's time and memory over
sequence length (forward + backward unless --mode), without torch.compile; on a GPU, every
suite's full sweep in both modes. A size or selection flag that no suite of the run takes is
noted, not used.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
from collections.abc import Callable

import torch

from .. import _extension, backends
from . import harness, workloads
from .suites import FFN_ACTIVATIONS, RATE_KEYS, SHAPES, SUITES, CaseSetupFailed, Settings, attention_heads, model_shapes

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MODES = ["fwd", "fwd+bwd"]

# On a CPU a call of a few milliseconds is slowed by page faults of its fresh output buffers and by
# what ran just before it: five samples gave medians 2x apart between runs. Sampling each such call
# for a quarter of a second (at most 200 calls) steadies them for little time; calls of 50 ms and
# more keep their 5 samples.
DEFAULT_CPU_MIN_TIME_S = 0.25
# On a GPU the baselines that materialise the scores (eager attention, the float32 reference) take
# 0.1-0.3 s per call at long sequences, 10-100x the kernels: 30 samples of each were most of a
# sweep's time on an H200. Past 2 s of timed calls they stop at 5 samples (their 30 spread less than
# 1% around the median but for one outlier of 6%, which a median of 5 also leaves out); a kernel's row
# keeps all 30.
DEFAULT_CUDA_MAX_TIME_S = 2.0


class UsageError(Exception):
    """A command-line argument that cannot be served; printed as one line, exit status 2."""


class RunError(Exception):
    """The run finished without a result (nothing could be measured); printed as one line after
    what was written, exit status 1."""


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


def _unit_interval(what: str) -> Callable[[str], float]:
    """An argument type: a number in [0, 1), described as ``what`` in the error."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} in [0, 1), got {text!r}") from None
        if not (0.0 <= value < 1.0):
            raise argparse.ArgumentTypeError(f"expected {what} in [0, 1), got {text}")
        return value

    return parse


padding_fraction = _unit_interval("a fraction of the keys")
dropout_rate = _unit_interval("a dropout probability")


def _items(text: str, expected: str) -> list[str]:
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return items


def _once(items: list, text: str) -> list:
    """``items`` when none of them repeats: a repeated one would run (or select) the same cases
    twice, as records that cannot be told apart, and is usually a typo for another value."""
    for i, item in enumerate(items):
        if item in items[:i]:
            raise argparse.ArgumentTypeError(f"{item} is repeated in {text!r}; expected each value once")
    return items


def names(text: str) -> list[str]:
    """The comma-separated items of ``text``, stripped; an empty one (``8,,16``, ``,``) or a repeated
    one is an error rather than dropped, since it is usually a typo for a value."""
    return _once(_items(text, "a comma-separated list without empty items"), text)


def positive_ints(text: str) -> list[int]:
    items = _items(text, "comma-separated positive integers")
    return _once([positive_int(v) for v in items], text)


PLOT_SUFFIXES = (".png", ".svg", ".pdf")


def check_output(path: str | None, flag: str, suffixes: tuple[str, ...] | None = None) -> None:
    """Before any work: ``path`` must be a file name that can be written (its folder exists; not a
    folder itself; opening it for writing succeeds, which permission bits alone do not tell, e.g.
    for root or under /proc: :func:`_probe_writable`) with one of ``suffixes`` when given."""
    if path is None:
        return
    if not path.strip():
        raise UsageError(f"{flag}: empty file name")
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a directory; expected a file name")
    if path.endswith(("/", os.sep)):
        raise UsageError(f"{flag} {path}: names a folder; expected a file name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"{flag} {path}: folder {folder} does not exist")
    if suffixes and not path.lower().endswith(suffixes):
        raise UsageError(f"{flag} {path}: expected a file name ending in {', '.join(suffixes)}")
    _probe_writable(path, flag)


def _probe_writable(path: str, flag: str) -> None:
    """Opens ``path`` for writing without changing what is there: a new file is made exclusively
    (never through a link) and removed again; an existing regular file is opened for appending;
    anything else (a device such as /dev/null, a FIFO, a dangling link) is left to the run's own
    open, which a probe could block on or create."""
    created = True
    try:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            created = False
            if not os.path.isfile(path):  # a device, a FIFO, a dangling link
                return
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    except OSError as exc:
        raise UsageError(f"{flag} {path}: cannot be written ({exc.strerror or exc})") from None
    os.close(fd)
    if created:
        os.remove(path)


def check_outputs(outputs: list[tuple[str | None, str, tuple[str, ...] | None]]) -> None:
    """:func:`check_output` for each (path, flag, suffixes), and no two flags naming one file
    (the later output would overwrite the earlier)."""
    flags: dict[str, str] = {}
    for path, flag, suffixes in outputs:
        check_output(path, flag, suffixes)
        if path is None:
            continue
        same = flags.setdefault(os.path.realpath(path), flag)
        if same == flag and os.path.exists(path):  # another name of an existing file (a hard link)
            same = next((f for p, f in flags.items() if f != flag and os.path.exists(p) and os.path.samefile(p, path)),
                        flag)
        if same != flag:
            raise UsageError(f"{same} and {flag} name the same file, {path}; give each its own")


def resolve_device(name: str | None) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here")
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    fused = ", ".join(sorted(b for b in backends.BACKENDS if b != "reference"))
    parser.add_argument("--suite", choices=sorted(SUITES) + ["all"], default=None,
                        help="default: sized to the device (see the command's description)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if present")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: float32 on cpu, bfloat16 on cuda")
    parser.add_argument("--batch", type=positive_int, default=None,
                        help="attention/softmax/model: batch (default: attention and softmax a fixed token count, "
                             "batch 1 in the default CPU run; models their own)")
    parser.add_argument("--heads", type=positive_int, default=None,
                        help="attention/softmax: heads (default 12; attention on a GPU: 2048 / --head-dim)")
    parser.add_argument("--kv-heads", type=positive_int, default=None,
                        help="attention: key/value heads, a divisor of --heads (grouped-query; default: --heads)")
    parser.add_argument("--queries", type=positive_int, default=None,
                        help="attention: queries per sequence against its --seq keys, as a decoding step with a "
                             "cache of keys has (default: --seq, self-attention; causal off unless --causal)")
    parser.add_argument("--head-dim", type=positive_int, default=None, help="attention: head dim (default 64)")
    parser.add_argument("--seq", type=positive_ints, default=None, help="attention/softmax/model: comma-separated lengths")
    parser.add_argument("--causal", choices=["both", "true", "false"], default=None,
                        help="attention (default: both; false in the default CPU run)")
    parser.add_argument("--padding", type=padding_fraction, default=None,
                        help="attention: a boolean key padding mask [B, 1, 1, L] hides this fraction of every "
                             "sequence's keys (its tail), as a padded batch has; TFLOP/s still count every score. "
                             "model: this fraction of every sequence is padding (default: the last eighth of "
                             "every other sequence)")
    parser.add_argument("--dropout", type=dropout_rate, default=None,
                        help="attention: every implementation drops the attention probabilities at this rate "
                             "(dropout_p), as in training, in either --mode (default: none)")
    parser.add_argument("--rows", type=positive_int, default=None, help="layer_norm/add_layer_norm/ffn: rows (tokens)")
    parser.add_argument("--hidden", type=positive_ints, default=None, help="layer_norm/add_layer_norm: hidden sizes; ffn: model widths")
    parser.add_argument("--activation", choices=list(FFN_ACTIVATIONS), default=None,
                        help="ffn: the activation between the GEMMs, for every implementation: gelu (erf), "
                             "gelu-tanh or relu (default: gelu)")
    parser.add_argument("--models", type=names, default=None,
                        help=f"model suite: comma-separated workloads, of {', '.join(workloads.MODELS)}")
    parser.add_argument("--layers", type=positive_int, default=None,
                        help="model suite: layers (default: each model's own); transformer and nn-transformer: "
                             "encoder and decoder layers, each")
    parser.add_argument("--backends", type=names, default=None,
                        help=f"op suites: comma-separated fused backends to include, of {fused} (default: all "
                             "that run here)")
    parser.add_argument("--mode", choices=MODES + ["both"], default=None,
                        help="fwd (inference), fwd+bwd (forward and backward; for models a training step) or both "
                             "(default: fwd with --suite; without it both, except attention on a CPU: fwd+bwd)")
    parser.add_argument("--repeats", type=positive_int, default=None,
                        help="the least number of timed calls per implementation (default 30 on cuda, 5 on a "
                             "cpu); --min-time can add more")
    parser.add_argument("--min-time", type=non_negative_float, default=None,
                        help="seconds: an implementation with --repeats timed calls that add up to less is called "
                             "in further rounds until they do, at most 200 calls (or --repeats, if more) "
                             f"(default {DEFAULT_CPU_MIN_TIME_S} on a cpu, 0 on cuda; 0: exactly --repeats calls)")
    parser.add_argument("--max-time", type=non_negative_float, default=None,
                        help="seconds: an implementation whose timed calls add up to more stops at 5 of them (or "
                             f"--repeats, if fewer) (default {DEFAULT_CUDA_MAX_TIME_S:g} on cuda, 0 on a cpu; 0: no "
                             "limit)")
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    parser.add_argument("--kernels", action="store_true",
                        help="after timing, profile one more call of each implementation and list where its time "
                             "goes: the device kernels on cuda, each op's own time on a cpu")
    parser.add_argument("--json", type=str, default=None, help="write the records to this path")
    parser.add_argument("--csv", type=str, default=None, help="write the records to this path as CSV")
    parser.add_argument("--plot", type=str, default=None,
                        help="write a plot of rate and peak memory to this path: .png, .svg or .pdf "
                             "(needs matplotlib)")


# ---------------------------------------------------------------------------------------------
# Running


def record(suite: str, impl: str, device: torch.device, dtype: torch.dtype, mode: str, shape: dict, *,
           skipped: str | None = None, extension_stale: str | None = None, **measured) -> dict:
    """A JSON record: every record has the same keys, those not measured (all of them for an
    implementation that did not run, whose ``skipped`` says why) null."""
    return {
        "suite": suite, "impl": impl, "device": str(device), "dtype": str(dtype).replace("torch.", ""), "mode": mode,
        "shape": shape, "median_ms": None, "min_ms": None, "max_ms": None, RATE_KEYS[suite]: None,
        "peak_fraction": None, "speedup_vs_eager": None, "speedup_vs_torch": None, "baseline": None,
        "peak_mem_bytes": None, "interpreted": impl == "triton" and backends.triton_interpret_mode(),
        "extension_stale": extension_stale, "kernels": None, **measured, "skipped": skipped,
    }


def _rate(case, ms: float) -> float:
    """The case's rate at ``ms`` a call, in the unit of its suite's :data:`RATE_KEYS` entry."""
    if case.flops is not None:
        return harness.tflops(case.flops, ms)
    if case.min_bytes is not None:
        return harness.gbps(case.min_bytes, ms)
    return case.tokens / (ms * 1e-3)


def _peak_fraction(rate_key: str, rate: float, dtype: str, peaks: dict[str, float] | None) -> float | None:
    if not peaks:
        return None
    if rate_key == "tflops" and dtype in peaks:
        return rate / peaks[dtype]
    if rate_key == "gbps":
        return rate / peaks["gbps"]
    return None


# Rows that only measure the machine (a device copy of the bytes a memory-bound op must move).
YARDSTICKS = frozenset({"copy"})


def _kernel_times(fn, device: torch.device) -> dict:
    """:func:`harness.kernel_times` of one call, or ``{"skipped": reason}`` where profiling it failed."""
    try:
        return harness.kernel_times(fn, device)
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        return {"skipped": harness.one_line_reason(exc)}


def run_case(case, device: torch.device, repeats: int, progress: harness.Progress | None = None,
             min_time_s: float = 0.0, extension_stale: str | None = None,
             max_time_s: float | None = None, kernels: bool = False) -> list[dict]:
    """Times every implementation of ``case`` and returns one record per implementation, those
    that could not run included; with ``kernels``, each timed one's record also says where the time
    of one more (profiled) call went."""
    label = f"{case.suite} {case.mode} {shape_text(case.shape)}"
    if progress is not None:
        progress.start(label)
    timings, failed = harness.measure_side_by_side(
        case.impls, device, repeats=repeats, warmup=2 if device.type == "cuda" else 1,
        status=progress.show if progress is not None else lambda label: None, min_time_s=min_time_s,
        max_time_s=max_time_s,
    )
    if device.type == "cuda":
        torch.cuda.empty_cache()
    baseline = timings[case.baseline].median_ms if case.baseline in timings else None
    torch_ms = timings["torch"].median_ms if "torch" in timings else None
    peaks = harness.device_peaks(device)
    rate_key = RATE_KEYS[case.suite]
    dtype = str(case.dtype).replace("torch.", "")
    records = []
    for name, t in timings.items():
        rate = _rate(case, t.median_ms)
        compared = name not in YARDSTICKS  # a yardstick computes nothing: no speed-up to claim
        records.append(record(
            case.suite, name, device, case.dtype, case.mode, case.shape, extension_stale=extension_stale,
            median_ms=t.median_ms, min_ms=t.min_ms, max_ms=t.max_ms, **{rate_key: rate},
            peak_fraction=_peak_fraction(rate_key, rate, dtype, peaks),
            speedup_vs_eager=None if baseline is None or not compared else baseline / t.median_ms,
            speedup_vs_torch=None if torch_ms is None or not compared else torch_ms / t.median_ms,
            baseline=case.baseline, peak_mem_bytes=t.peak_mem_bytes,
        ))
        if kernels:
            if progress is not None:
                progress.show(f"kernels {name}")
            records[-1]["kernels"] = _kernel_times(case.impls[name], device)
    records += [record(case.suite, name, device, case.dtype, case.mode, case.shape, skipped=why,
                       extension_stale=extension_stale, baseline=case.baseline)
                for name, why in {**case.skipped, **failed}.items()]
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
        queries=args.queries, head_dim=args.head_dim, padding=args.padding, dropout=args.dropout,
        seqs=args.seq, rows=args.rows, hiddens=args.hidden,
        causal={None: None, "both": [False, True], "true": [True], "false": [False]}[args.causal], backends=wanted,
        compile=not args.no_compile, models=models, layers=args.layers, activation=args.activation,
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
                                        seqs=args.seq or [256, 512, 1024, 2048],
                                        causal=base.causal or ([False] if args.causal is None else None))
        attention_modes = ["fwd+bwd"] if args.mode is None else modes
        return plan + [("attention", dataclasses.replace(attention, mode=m)) for m in attention_modes]
    suites = sorted(SUITES) if args.suite in (None, "all") else [args.suite]
    return [(suite, dataclasses.replace(base, mode=m)) for suite in suites for m in modes]


def check_models_fit(plan: list[tuple[str, Settings]]) -> None:
    """Before any work: every model workload of ``plan`` must fit in the memory available (a lower
    bound of its bytes; see :func:`.workloads.check_fits`). One that cannot would, at sizes the
    system still lets it allocate, end with the process killed, without a message."""
    for suite, settings in plan:
        if suite != "model":
            continue
        for shape in model_shapes(settings):
            try:
                workloads.check_fits(shape["model"], batch=shape["batch"], seq=shape["seq"], layers=shape["layers"],
                                     device=settings.device, dtype=settings.dtype, training=settings.mode == "fwd+bwd")
            except workloads.WorkloadTooLarge as exc:
                raise UsageError(f"{exc}; --batch, --seq and --layers set the model suite's sizes") from None


# The size and selection flags each suite takes (--dtype, --mode, --repeats, --min-time and the outputs apply
# to every suite; --no-compile to all that time torch.compile).
SUITE_FLAGS: dict[str, tuple[str, ...]] = {
    "attention": ("--batch", "--heads", "--kv-heads", "--queries", "--head-dim", "--seq", "--causal", "--padding", "--dropout",
                  "--backends"),
    "softmax": ("--batch", "--heads", "--seq", "--backends"),
    "layer_norm": ("--rows", "--hidden", "--backends"),
    "add_layer_norm": ("--rows", "--hidden", "--backends"),
    "ffn": ("--rows", "--hidden", "--activation", "--backends"),
    "model": ("--models", "--layers", "--batch", "--seq", "--padding"),
}


def _given(args: argparse.Namespace, flag: str) -> bool:
    return getattr(args, flag[2:].replace("-", "_")) is not None


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


def _run_suite(suite: str, settings: Settings, device: torch.device, repeats: int, progress: harness.Progress,
               records: list[dict], min_time_s: float = 0.0, extension_stale: str | None = None,
               max_time_s: float | None = None, kernels: bool = False) -> None:
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
            shape, cause = (exc.shape, exc.cause) if isinstance(exc, CaseSetupFailed) else ({}, exc)
            if harness.is_out_of_memory(cause):
                why = "setting up this case ran out of memory; the rest of the suite was not run: "
            elif harness.is_size_overflow(cause):
                why = "this case's sizes are too large to set up; the rest of the suite was not run: "
            else:
                raise
            if device.type == "cuda":
                torch.cuda.empty_cache()
            records.append(record(suite, "all", device, settings.dtype, settings.mode, shape,
                                  skipped=why + harness.one_line_reason(cause), extension_stale=extension_stale))
            return
        records += run_case(case, device, repeats, progress, min_time_s, extension_stale, max_time_s, kernels)
        del case


def sampling(args: argparse.Namespace, device: torch.device) -> tuple[int, float, float | None]:
    """(the least number of timed calls per implementation, the seconds they should add up to, the
    seconds past which a slow implementation stops at 5 calls or None): ``--repeats``,
    ``--min-time`` and ``--max-time``, each defaulting by device independently of the others."""
    repeats = args.repeats or (30 if device.type == "cuda" else 5)
    min_time_s = args.min_time
    if min_time_s is None:
        min_time_s = DEFAULT_CPU_MIN_TIME_S if device.type == "cpu" else 0.0
    max_time_s = args.max_time
    if max_time_s is None:
        max_time_s = DEFAULT_CUDA_MAX_TIME_S if device.type == "cuda" else 0.0
    return repeats, min_time_s, max_time_s or None


def extension_note(stale: str | None) -> str | None:
    """The note for a compiled extension that did not load or is out of date, whose figures
    would otherwise pass for the current sources'."""
    if stale is None:
        return None
    if not _extension.loaded():
        return f"note: the compiled extension did not load, so its backends (cpu, cuda) are not run: {stale}"
    return (f"note: the compiled extension should be rebuilt ({stale}): what runs its kernels (the cpu and cuda "
            "backends, optimized models) is timed as built, not as the sources are now")


def run(args: argparse.Namespace) -> int:
    check_outputs([(args.json, "--json", None), (args.csv, "--csv", None), (args.plot, "--plot", PLOT_SUFFIXES)])
    if args.plot is not None:
        from . import plots

        plots.require_matplotlib()
    device = resolve_device(args.device)
    plan = _plan(args, device)
    check_models_fit(plan)
    stale = _extension.stale_reason()
    for note in [extension_note(stale), *unused_flag_notes(args, plan)]:
        if note:
            print(note)
    repeats, min_time_s, max_time_s = sampling(args, device)
    total = sum(len(SHAPES[suite](settings)) for suite, settings in plan)
    records: list[dict] = []
    interrupted = False
    try:
        with harness.progress("fused-attn bench", total, unit="case") as progress:
            for suite, settings in plan:
                _run_suite(suite, settings, device, repeats, progress, records, min_time_s, stale, max_time_s,
                           args.kernels)
    except KeyboardInterrupt:  # Ctrl-C (or a caller's time limit): report the cases that finished
        interrupted = True
        print(f"\ninterrupted: reporting the {len(records)} records measured so far")
    print(format_table(records))
    for note in load_notes():
        print(note)
    failed: list[str] = []
    if args.json is not None and written("--json", args.json, lambda: write_json(records, args.json), failed):
        print(f"wrote {len(records)} records to {args.json}")
    if args.csv is not None and written("--csv", args.csv, lambda: write_csv(records, args.csv), failed):
        print(f"wrote {args.csv}")
    ran = any(r["skipped"] is None for r in records)
    if args.plot is not None:
        from . import plots

        if not ran:
            print(f"--plot {args.plot}: no timed records to plot; nothing written")
        elif written("--plot", args.plot, lambda: plots.plot_bench(records, args.plot), failed):
            print(f"wrote {args.plot}")
    if failed:
        raise OSError("; ".join(failed))
    if interrupted:
        return 130
    if not ran:
        raise RunError("no implementation ran; the reasons are under \"not run\" above")
    return 0


# ---------------------------------------------------------------------------------------------
# Output


_SHAPE_KEYS = {"batch": "B", "heads": "H", "kv_heads": "Hkv", "queries": "Lq", "seq": "L", "head_dim": "D", "rows": "rows ", "hidden": "N", "tokens": "T",
               "d_model": "M", "d_ff": "F", "model": "", "layers": "layers ",
               "padding": "padding ", "dropout": "dropout ", "activation": ""}


def shape_text(shape: dict) -> str:
    """``{"batch": 8, "heads": 12, "seq": 512, "causal": True}`` -> ``B8 H12 L512 causal``."""
    parts = []
    for key, value in shape.items():
        if isinstance(value, bool):
            parts.append("causal" if value else "full")
        elif value is not None:
            parts.append(f"{_SHAPE_KEYS.get(key, key + '=')}{value}")
    return " ".join(parts)


_SI_PREFIXES = ["", "k", "M", "G", "T", "P"]


def _si(value: float, unit: str) -> str:
    """``value`` (in ``unit``) with the largest SI prefix that leaves it at least 1: 2.05e10 -> 20.5 G."""
    step = 0
    while abs(value) >= 1000 and step < len(_SI_PREFIXES) - 1:
        value /= 1000
        step += 1
    return f"{value:.3g} {_SI_PREFIXES[step]}{unit}"


def rate_text(r: dict) -> str:
    """The record's rate in readable units: a CPU's attention runs at GFLOP/s, a GPU's at TFLOP/s."""
    if r.get("tflops") is not None:
        return _si(r["tflops"] * 1e12, "FLOP/s")
    if r.get("gbps") is not None:
        return _si(r["gbps"] * 1e9, "B/s")
    if r.get("tokens_per_s") is not None:
        return f"{r['tokens_per_s']:,.0f} tok/s"
    return "-"


EAGER_NOTE = ("vs eager: speed-up against the code a user writes without this package (attention: `eager`, "
              "softmax(QK^T*scale)V; models: `plain`; others: `torch`); vs torch: against PyTorch's own "
              "implementation (SDPA, F.layer_norm, ...)")
INTERPRETED_NOTE = ("*: run by Triton's interpreter (TRITON_INTERPRET=1): the times, rate and speed-ups (in "
                    "parentheses) are the Python interpreter's, not the kernel's")

# Above this max/min ratio a row's timings are too spread to trust its median.
NOISY_RATIO = 3.0


def _speedup_text(value: float | None, interpreted: bool) -> str:
    if value is None:
        return "-"
    return f"({value:.2f}x)" if interpreted else f"{value:.2f}x"


def noise_note(records: list[dict], listed: int = 4) -> str | None:
    """A note naming the rows whose slowest timed call took over :data:`NOISY_RATIO` times their
    fastest: other work on the machine, or too few calls to settle."""
    noisy = [r for r in records if r["skipped"] is None and r["min_ms"] > 0 and r["max_ms"] / r["min_ms"] > NOISY_RATIO]
    if not noisy:
        return None
    noisy.sort(key=lambda r: -r["max_ms"] / r["min_ms"])
    rows = ", ".join(f"{r['suite']} {shape_text(r['shape'])} {r['mode']} {r['impl']} ({r['max_ms'] / r['min_ms']:.0f}x)"
                     for r in noisy[:listed])
    more = f" and {len(noisy) - listed} more" if len(noisy) > listed else ""
    return (f"note: {len(noisy)} row(s) have noisy timings, max/min over {NOISY_RATIO:g}x: {rows}{more}; "
            "their medians are unreliable: rerun on an idle machine with more --repeats or a longer --min-time")


def load_notes() -> list[str]:
    """A note when other work shared the machine during the run, which slows and spreads every
    timing: the load average, less the threads of this run's own ops, at one CPU or more."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return []
    own = torch.get_num_threads()
    if load - own < 1:
        return []
    return [f"note: other work shared the machine (load average {load:.1f} on {os.cpu_count()} CPUs, this run "
            f"using up to {own} threads): the times are slower and noisier than on an idle machine"]


def format_table(records: list[dict]) -> str:
    """One line per timed record, then notes; skipped implementations show their reason."""
    header = (f"{'suite':<14} {'shape':<28} {'dtype':<8} {'mode':<7} {'impl':<12} {'median ms':>10} {'min ms':>9} "
              f"{'max ms':>9} {'rate':>15} {'% peak':>6} {'vs eager':>8} {'vs torch':>8} {'peak MiB':>9}")
    lines = [header, "-" * len(header)]
    for r in records:
        if r["skipped"] is not None:
            continue
        impl = r["impl"] + ("*" if r["interpreted"] else "")
        prefix = f"{r['suite']:<14} {shape_text(r['shape']):<28} {r['dtype']:<8} {r['mode']:<7} {impl:<12}"
        peak = f"{r['peak_mem_bytes'] / 2**20:.1f}" if r["peak_mem_bytes"] is not None else "-"
        fraction = f"{100 * r['peak_fraction']:.0f}" if r["peak_fraction"] is not None else "-"
        rate = f"({rate_text(r)})" if r["interpreted"] else rate_text(r)
        vs_eager = _speedup_text(r["speedup_vs_eager"], r["interpreted"])
        vs_torch = _speedup_text(r["speedup_vs_torch"], r["interpreted"])
        lines.append(
            f"{prefix} {r['median_ms']:>10.3f} {r['min_ms']:>9.3f} {r['max_ms']:>9.3f} {rate:>15} {fraction:>6} "
            f"{vs_eager:>8} {vs_torch:>8} {peak:>9}"
        )
    lines.append(EAGER_NOTE)
    lines += kernel_lines(records)
    if any(r["interpreted"] and r["skipped"] is None for r in records):
        lines.append(INTERPRETED_NOTE)
    noise = noise_note(records)
    if noise:
        lines.append(noise)
    not_run = not_run_counts(records)
    if not_run:
        lines.append("not run:")
        lines += [f"  {suite} {impl} ({n} case{'s' * (n > 1)}): {why}" for (suite, impl, why), n in not_run.items()]
    return "\n".join(lines)


KERNELS_NOTE = ("where the time goes (--kernels: one more call of each, profiled; on cuda the device kernels' "
                "time, on a cpu each op's own time)")


def kernel_text(kernels: dict) -> str:
    """One record's ``kernels`` as text: the total, then each name's time (and calls, where more than one)."""
    if "skipped" in kernels:
        return f"not profiled: {kernels['skipped']}"
    parts = [f"{k['name']} {k['ms']:.3f}" + (f" ({k['calls']} calls)" if k["calls"] > 1 else "") for k in kernels["top"]]
    return f"{kernels['total_ms']:.3f} ms: " + "; ".join(parts)


def kernel_lines(records: list[dict]) -> list[str]:
    """The --kernels section of the table: a line per profiled record."""
    profiled = [r for r in records if r["skipped"] is None and r.get("kernels") is not None]
    if not profiled:
        return []
    lines = [KERNELS_NOTE + ":"]
    for r in profiled:
        lines.append(f"  {r['suite']} {shape_text(r['shape'])} {r['mode']} {r['impl']}: {kernel_text(r['kernels'])}")
    return lines


def not_run_counts(records: list[dict]) -> dict[tuple[str, str, str], int]:
    """How many cases each (suite, implementation, reason) was skipped for, in record order."""
    counts: dict[tuple[str, str, str], int] = {}
    for r in records:
        if r.get("skipped"):
            key = (r["suite"], r["impl"], r["skipped"])
            counts[key] = counts.get(key, 0) + 1
    return counts


def written(flag: str, path: str, write, failed: list[str]) -> bool:
    """Whether ``write()`` wrote the output of ``flag``: one that fails after the run (a full disk,
    a path removed meanwhile) adds its flag, path and reason to ``failed`` and leaves the other
    outputs to be written, the measurements being in them too."""
    try:
        write()
    except OSError as exc:
        failed.append(f"{flag} {path}: could not be written ({exc.strerror or exc})")
        return False
    return True


def write_json(records: list[dict] | dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(records, f, indent=2)
        f.write("\n")


CSV_FIELDS = ["suite", "impl", "device", "dtype", "mode", "shape", "median_ms", "min_ms", "max_ms", "tflops", "gbps",
              "tokens_per_s", "peak_fraction", "speedup_vs_eager", "speedup_vs_torch", "baseline", "peak_mem_bytes",
              "interpreted", "extension_stale", "kernels", "skipped"]


def write_csv(records: list[dict], path: str) -> None:
    """The records as CSV: one column per key of any suite (a suite's other rate keys, and the
    values not measured, empty), the shape and ``kernels`` (where profiled) as JSON text."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in records:
            kernels = r.get("kernels")
            writer.writerow({**r, "shape": json.dumps(r["shape"], sort_keys=False),
                             "kernels": None if kernels is None else json.dumps(kernels)})
