"""Choosing a tile config when the autotuner does not: the first one whose shared memory fits.

With autotuning on, Triton's autotuner drops the configs a device cannot launch (they raise
``OutOfResources`` while it times them). With ``FUSED_ATTN_TRITON_AUTOTUNE=0`` a kernel would
take its first config untried, and the first (the fastest where it fits) needs more shared memory
than an A100 has for float32 tiles or wide heads. So the kernels' config pruning compiles the
candidates in order (the compilation the launch would do anyway; Triton caches it) and keeps the
first whose shared memory fits the device, by the compiler's own count rather than an estimate.
"""

from __future__ import annotations

from collections.abc import Callable

import triton

from ..._env import triton_autotune_enabled
from ._grid import next_power_of_2


def shared_memory_limit() -> int | None:
    """Per-block shared memory (the opt-in maximum) of the current device, as Triton's launcher
    checks it; None where no device driver answers (e.g. under the interpreter)."""
    try:
        from triton.runtime import driver

        active = driver.active
        return int(active.utils.get_device_properties(active.get_current_device())["max_shared_mem"])
    except (RuntimeError, AttributeError, KeyError, TypeError):
        return None


def first_that_fits(kernel: triton.runtime.JITFunction, configs: list[triton.Config], named_args: dict,
                    launch_kwargs: dict) -> list[triton.Config]:
    """The first of ``configs`` whose compiled kernel fits the device's shared memory; the first
    config when none does or the limit is unknown (its launch then names the shortfall)."""
    limit = shared_memory_limit()
    if limit is None or len(configs) == 1:
        return configs[:1]
    kwargs = {k: v for k, v in launch_kwargs.items() if k not in ("grid", "warmup")}
    for config in configs:
        compiled = kernel.warmup(*named_args.values(), grid=(1,), **kwargs, **config.all_kwargs())
        if compiled.metadata.shared <= limit:
            return [config]
    return configs[:1]


def size_bucket(n: int, cap: int) -> int:
    """``n`` rounded up to a power of two, at most ``cap``: an autotune key that retunes only when
    a size changes scale (lengths and token counts vary per batch; the best tile does not)."""
    return min(next_power_of_2(max(n, 1)), cap)


def benchmark(kernel_call: Callable[[], None], quantiles: tuple[float, ...]) -> list[float]:
    """The autotuner's timing of a candidate: Triton's benchmarker; with autotuning off the
    pruning has left one candidate, so there is nothing to time (the autotuner would otherwise
    spend ~0.1 s per new shape running it)."""
    if not triton_autotune_enabled():
        return [0.0] * len(quantiles)
    from triton.runtime import driver

    return driver.active.get_benchmarker()(kernel_call, quantiles=quantiles)


def pruner(kernel_of: Callable[[], object], keep: Callable[..., list] | None = None) -> Callable:
    """An ``early_config_prune`` for an autotuned kernel: ``keep(configs, args)`` narrows the
    candidates (args: the launch's positional and keyword arguments by name); with autotuning
    off, the first candidate that fits the device is the one used. ``kernel_of()`` returns the
    autotuned kernel (called at launch time, once the module has defined it)."""

    def prune(configs, named_args, **kwargs):
        kept = keep(configs, {**named_args, **kwargs}) if keep is not None else list(configs)
        if triton_autotune_enabled() or len(kept) <= 1:
            return kept
        return first_that_fits(kernel_of().fn, kept, named_args, kwargs)

    return prune
