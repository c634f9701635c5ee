"""Timing and memory measurement shared by every suite.

On CUDA, times come from CUDA events around each call, after warm-up, with the device
synchronised; on CPU from ``time.perf_counter``. Each repeat is timed on its own so that the
median, min and max are all reported.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

import torch


@dataclasses.dataclass
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    peak_mem_bytes: int | None


def measure(fn: Callable[[], object], device: torch.device, *, repeats: int, warmup: int = 2) -> Timing:
    """Runs ``fn`` ``warmup`` times, then times ``repeats`` calls one by one."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    peak = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return Timing(statistics.median(times), min(times), max(times), peak)
