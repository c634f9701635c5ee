"""LayerNorm: every implementation side by side, per shape (pytest-benchmark groups).

    pytest benchmarks/test_layer_norm_bench.py --benchmark-enable --benchmark-group-by=param:shape
"""

import pytest
import torch

from fused_attn.bench.suites import layer_norm_cases

SHAPES = [(4096, 768), (4096, 1024), (4096, 4096)]
IMPLS = ["torch", "reference", "cpu", "cuda", "triton"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_layer_norm(timed, device, shape, mode, impl):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    wanted = None if impl in ("torch", "reference") else [impl]
    (case,) = layer_norm_cases(device, dtype, mode, [shape], wanted)
    if impl not in case.impls:
        pytest.skip(case.skipped.get(impl, f"{impl} is not available"))
    timed(case.impls[impl])
