"""Timing, work counting and memory measurement shared by every benchmark front end.

``fused-attn bench``, ``fused-attn profile-memory`` and the pytest-benchmark suites in
``benchmarks/`` all go through this module, so there is one definition of a timed call, of the
work an op does and of the memory it takes.

Time: on CUDA from CUDA events around each call after warm-up (the device synchronised before
the first and after each one); on CPU from ``time.perf_counter``. Each repeat is timed on its
own, so the median, min and max are all reported; the implementations of one case are timed in
interleaved rounds (:func:`measure_side_by_side`).

Memory is measured, never estimated. On CUDA from the caching allocator's statistics
(``torch.cuda.max_memory_allocated`` relative to what was allocated before the call). On CPU
from the allocation events that PyTorch's profiler records for every tensor allocation and free
(``profile_memory=True``): replaying them in order gives the bytes live at any moment, hence
the peak of a call, and the bytes live at the markers :class:`MemoryMeter` drops (which is how
per-module figures are taken). Allocations that bypass PyTorch's allocator (a BLAS library's
private scratch buffers) are not seen on CPU; every tensor is.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import torch

# ---------------------------------------------------------------------------------------------
# Work counts


def causal_pairs(q_len: int, k_len: int) -> int:
    """(query, key) pairs a top-left-aligned causal mask keeps: query i sees keys 0..i, so
    sum over i < Lq of min(i + 1, Lk). Lq(Lq+1)/2 when Lq == Lk, about half of Lq*Lk; far from
    half when the lengths differ (a single query sees one key)."""
    full = min(q_len, k_len)
    return full * (full + 1) // 2 + (q_len - full) * k_len


def attention_flops(batch: int, heads: int, q_len: int, k_len: int, head_dim: int, *, causal: bool, mode: str) -> float:
    """Forward 4*B*H*D per (query, key) pair computed (two GEMMs): Lq*Lk pairs, or the ones the
    causal mask keeps (:func:`causal_pairs`); backward 2.5x forward."""
    pairs = causal_pairs(q_len, k_len) if causal else q_len * k_len
    forward = 4.0 * batch * heads * pairs * head_dim
    return forward * (3.5 if mode == "fwd+bwd" else 1.0)


def ffn_flops(tokens: int, model: int, hidden: int, *, mode: str) -> float:
    """Two GEMMs of 2*T*M*N each; the backward has twice the forward's GEMM work."""
    return 4.0 * tokens * model * hidden * (3.0 if mode == "fwd+bwd" else 1.0)


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e9)


def gbps(moved_bytes: float, ms: float) -> float:
    return moved_bytes / (ms * 1e6)


# Published peaks of the GPUs (TFLOP/s, no sparsity; memory bandwidth in GB/s), matched against
# ``torch.cuda.get_device_name``. float16/bfloat16: dense tensor cores. float32: the FP32 units,
# not TF32 tensor cores, since neither PyTorch's float32 matmul (by default) nor the package's
# kernels (IEEE float32 dots) use TF32.
DEVICE_PEAKS: dict[str, dict[str, float]] = {
    "H200": {"float16": 989.0, "bfloat16": 989.0, "float32": 67.0, "gbps": 4800.0},
    "H100 SXM": {"float16": 989.0, "bfloat16": 989.0, "float32": 67.0, "gbps": 3350.0},
    "H100 PCIe": {"float16": 756.0, "bfloat16": 756.0, "float32": 51.0, "gbps": 2000.0},
    "H100": {"float16": 989.0, "bfloat16": 989.0, "float32": 67.0, "gbps": 3350.0},
    "A100": {"float16": 312.0, "bfloat16": 312.0, "float32": 19.5, "gbps": 2039.0},
}


def one_line_reason(exc: BaseException) -> str:
    """``exc`` as a one-line reason for a table or a record: its type and its message's first line."""
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure (CUDA or CPU), which a sweep reports and survives."""
    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(exc)


def is_size_overflow(exc: BaseException) -> bool:
    """Whether ``exc`` says a size does not fit the integer types (a tensor's element or byte
    count past int64): the case cannot be set up at all, which a sweep reports and survives."""
    if isinstance(exc, OverflowError):
        return True
    return isinstance(exc, (RuntimeError, ValueError, TypeError)) and "overflow" in str(exc).lower()


def device_peaks(device: torch.device) -> dict[str, float] | None:
    """The published peaks of ``device`` (None for a CPU or an unlisted GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in DEVICE_PEAKS.items():
        if all(part in name for part in key.split()):
            return peaks
    return None


# ---------------------------------------------------------------------------------------------
# Memory


def available_bytes(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device`` (None when the system does not say): on a
    GPU the driver's free memory; on a CPU the kernel's MemAvailable (free memory plus the caches
    it can drop), else the free physical pages."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def size_text(n: float) -> str:
    """``n`` bytes in binary units: ``1.5 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """The profiler's tracing library writes progress lines to the process's stderr from C++ at
    start and stop, whatever its log level; they would interleave with the tables."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class MemoryMeter:
    """Bytes allocated on ``device`` over a region, with named markers inside it.

    ``with meter: ...`` measures; inside, ``meter.mark(label)`` records the bytes live at that
    moment. Afterwards ``meter.peak_bytes`` is the highest number of bytes live during the region
    minus those live at its start, ``meter.at(label)`` the bytes live at a marker and
    ``meter.peak_until(label)`` the highest number live from the start up to the marker, both
    relative to the same start. CUDA reads the allocator's counters; CPU replays the profiler's allocation
    events (see the module docstring).
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.peak_bytes = 0
        self._marks: dict[str, int] = {}
        self._peaks: dict[str, int] = {}
        self._base = 0
        self._profiler = None

    def __enter__(self) -> MemoryMeter:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            from torch.profiler import ProfilerActivity, profile

            self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            with _native_stderr_silenced():
                self._profiler.__enter__()
        return self

    def mark(self, label: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._marks[label] = torch.cuda.memory_allocated(self.device) - self._base
            self._peaks[label] = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            with torch.profiler.record_function(_MARK_PREFIX + label):
                pass

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
            return
        with _native_stderr_silenced():
            self._profiler.__exit__(*exc)
        if exc[0] is None:
            self._replay(self._profiler.profiler.kineto_results.events())
        self._profiler = None

    def _replay(self, events) -> None:
        allocations = sorted(
            (e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]" and e.device_type().name == "CPU"
        )
        times, live, peaks, current, peak = [], [], [], 0, 0
        for t, nbytes in allocations:
            current += nbytes
            peak = max(peak, current)
            times.append(t)
            live.append(current)
            peaks.append(peak)
        self.peak_bytes = peak
        for e in events:
            if e.name().startswith(_MARK_PREFIX):
                i = bisect.bisect_right(times, e.start_ns())
                label = e.name()[len(_MARK_PREFIX):]
                self._marks[label] = live[i - 1] if i else 0
                self._peaks[label] = peaks[i - 1] if i else 0

    def at(self, label: str) -> int:
        return self._marks[label]

    def peak_until(self, label: str) -> int:
        return self._peaks[label]


_MARK_PREFIX = "fused_attn.memory_mark::"


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated during one call of ``fn`` beyond what was live before it."""
    with MemoryMeter(device) as meter:
        fn()
    return meter.peak_bytes


# ---------------------------------------------------------------------------------------------
# Where the time goes


def kernel_name(name: str, width: int = 64) -> str:
    """A kernel's (or op's) name, short enough for a table: a C++ kernel's signature loses its
    return type, namespaces and parameter list but keeps its template arguments
    (``attn_bwd_dkdv_kernel<BFloat16, 64, 2>``), and anything longer than ``width`` is cut."""
    name = name.strip()
    signature = name.startswith("void ") or "<" in name or "(anonymous namespace)" in name
    if name.startswith("void "):
        name = name[len("void "):]
    name = name.replace("(anonymous namespace)::", "")
    depth = 0
    for i, ch in enumerate(name):
        depth += {"<": 1, ">": -1}.get(ch, 0)
        if ch == "(" and depth == 0 and i > 0:
            name = name[:i].rstrip()
            break
    if signature:  # an op's name (aten::mm, fused_attn::attention_bwd) keeps its namespace
        name = re.sub(r"\b\w+::", "", name)
    return name if len(name) <= width else name[:width - 3] + "..."


def kernel_times(fn: Callable[[], object], device: torch.device, top: int = 6) -> dict:
    """Where one call of ``fn`` spends its time, from PyTorch's profiler: on CUDA each device
    kernel's (and copy's) time on the GPU, on CPU each op's own time (``self`` CPU time: the ops
    nested in it counted apart), summed per name. Returns ``{"total_ms": ..., "top": [{"name",
    "ms", "calls"}, ...]}``, the ``top`` names by time, the rest summed into one ``other`` entry."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(device)
    cuda = device.type == "cuda"
    call = synchronized(fn, device)
    if cuda:
        torch.cuda.synchronize(device)
    with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        call()
    totals: dict[str, list[float]] = {}
    for event in prof.events():
        if cuda:
            if event.device_type != DeviceType.CUDA:
                continue
            us = event.time_range.elapsed_us()
        else:
            if event.device_type != DeviceType.CPU:
                continue
            us = event.self_cpu_time_total
        entry = totals.setdefault(kernel_name(event.name), [0.0, 0])
        entry[0] += us / 1e3
        entry[1] += 1
    ranked = sorted(totals.items(), key=lambda item: -item[1][0])
    listed = [{"name": name, "ms": ms, "calls": calls} for name, (ms, calls) in ranked[:top]]
    rest = ranked[top:]
    if rest:
        listed.append({"name": "other", "ms": sum(ms for _, (ms, _) in rest), "calls": sum(n for _, (_, n) in rest)})
    return {"total_ms": sum(ms for ms, _ in totals.values()), "top": listed}


# ---------------------------------------------------------------------------------------------
# Time


@dataclasses.dataclass
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    peak_mem_bytes: int | None


def synchronized(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """``fn`` followed by a device synchronisation (so that a wall-clock timer counts GPU work)."""
    if torch.device(device).type != "cuda":
        return fn

    def call() -> object:
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return call


def _timed_call(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call: CUDA events around it on a GPU, ``perf_counter`` on a CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


# The fewest timed calls of an implementation that ``max_time_s`` stops early.
CAPPED_REPEATS = 5


def measure_side_by_side(
    fns: dict[str, Callable[[], object]], device: torch.device, *, repeats: int, warmup: int = 2,
    status: Callable[[str], None] = lambda label: None, min_time_s: float = 0.0, max_repeats: int = 200,
    max_time_s: float | None = None,
) -> tuple[dict[str, Timing], dict[str, str]]:
    """Times several implementations of one computation in interleaved rounds.

    Each implementation is warmed up, then every round calls each of them once in turn, so a
    drift of the machine (clock frequency, other load) reaches all of them alike instead of
    whichever ran last. An implementation takes part in a round while it has fewer than
    ``repeats`` timed calls or, with ``min_time_s``, while its timed calls add up to less than
    that (at most ``max_repeats`` calls): a fast call gets more samples, so that its median is
    not at the mercy of a few page faults, and a slow one does not hold up the run. With
    ``max_time_s``, an implementation whose timed calls add up to more than that stops once it
    has ``CAPPED_REPEATS`` of them (or ``repeats``, if fewer): a baseline that takes a tenth of
    a second per call (eager attention at long sequences) gets 5 samples, not 30, whose median
    is as steady, and the kernels' own rows keep every repeat. Then the
    peak memory of one untimed call each. ``status(label)`` is told what runs now (for a progress
    display). Returns the timings and, for an implementation that raised (out of memory, a kernel
    or a library refusing the shape), the one-line reason instead.
    """
    device = torch.device(device)
    failed: dict[str, str] = {}

    def attempt(name: str, action: Callable[[], object]) -> object:
        try:
            return action()
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            failed[name] = one_line_reason(exc)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return None

    for name, fn in fns.items():
        status(f"warm-up {name}")
        attempt(name, lambda: [fn() for _ in range(warmup)])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}

    def wants_more(name: str) -> bool:
        done = times[name]
        if name in failed or len(done) >= max(repeats, max_repeats):
            return False
        if max_time_s and len(done) >= min(repeats, CAPPED_REPEATS) and sum(done) >= max_time_s * 1e3:
            return False
        return len(done) < repeats or sum(done) < min_time_s * 1e3

    rounds = 0
    while any(wants_more(name) for name in fns):
        rounds += 1
        status(f"timed round {rounds}")  # per round, not per call: a refresh between fast calls would add up
        for name, fn in fns.items():
            if wants_more(name):
                elapsed = attempt(name, lambda: _timed_call(fn, device))
                if elapsed is not None:
                    times[name].append(elapsed)
    timings = {}
    for name, fn in fns.items():
        if name not in failed:
            status(f"peak memory {name}")
            peak = attempt(name, lambda: peak_memory(fn, device))
            if name not in failed:
                timings[name] = Timing(statistics.median(times[name]), min(times[name]), max(times[name]), peak)
    return timings, failed


class Progress:
    """A progress bar's handle: ``start(label)`` as each unit of work starts (the previous one
    counts as done), ``show(label)`` to say what runs within it now."""

    def __init__(self, bar):
        self._bar = bar
        self._started = False
        self._unit = ""

    def start(self, label: str) -> None:
        if self._started:
            self._bar.update(1)
        self._started = True
        self._unit = label
        self._bar.set_postfix_str(label)

    def show(self, label: str) -> None:
        self._bar.set_postfix_str(f"{self._unit}: {label}" if self._unit else label)

    def finish(self) -> None:
        if self._started:
            self._bar.update(1)
            self._started = False


@contextlib.contextmanager
def progress(description: str, total: int | None = None, *, unit: str = "run",
             enabled: bool | None = None) -> Iterator[Progress]:
    """A progress bar on stderr (tqdm; shown only on a terminal unless ``enabled``) counting
    ``total`` units of work (a count, percentage and time left when ``total`` is known)."""
    from tqdm import tqdm

    disable = None if enabled is None else not enabled  # None: tqdm's own test, shown on a terminal only
    with tqdm(total=total, desc=description, unit=unit, leave=False, disable=disable) as bar:
        handle = Progress(bar)
        yield handle
        handle.finish()
