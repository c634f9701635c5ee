import pytest
import torch


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def timed(benchmark, device):
    """benchmark(fn) with the device synchronised after each call, so GPU work is counted."""

    def run(fn):
        if device.type == "cuda":
            def call():
                fn()
                torch.cuda.synchronize(device)
        else:
            call = fn
        return benchmark.pedantic(call, rounds=20 if device.type == "cuda" else 5, iterations=5, warmup_rounds=2)

    return run
