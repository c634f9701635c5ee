import dataclasses

import pytest
import torch

from fused_attn.bench.harness import synchronized
from fused_attn.bench.suites import Settings

IMPLS = ["torch", "reference", "compiled", "cpu", "cuda", "triton"]


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def settings(device):
    """Settings for one case: bfloat16 on a GPU, float32 on a CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def make(mode: str, **sizes) -> Settings:
        return dataclasses.replace(Settings(device=device, dtype=dtype, mode=mode), **sizes)

    return make


@pytest.fixture
def timed(benchmark, device):
    """benchmark(fn) with the device synchronised after each call, so GPU work is counted."""

    def run(fn, extra_info: dict):
        benchmark.extra_info.update(extra_info)
        rounds = 20 if device.type == "cuda" else 5
        return benchmark.pedantic(synchronized(fn, device), rounds=rounds, iterations=3, warmup_rounds=2)

    return run


def run_case(timed, cases, settings: Settings, impl: str) -> None:
    """Benchmarks ``impl`` on the single case ``cases(settings)`` yields, or skips with the reason."""
    wanted = [impl] if impl in ("cpu", "cuda", "triton") else None
    (case,) = cases(dataclasses.replace(settings, backends=wanted))
    if impl not in case.impls:
        pytest.skip(case.skipped.get(impl, f"{impl} is not available here"))
    work = {"flops": case.flops} if case.flops else {"tokens": case.tokens} if case.tokens else {"bytes": case.min_bytes}
    timed(case.impls[impl], {**case.shape, **work})
