"""Add & Norm (bias + dropout + residual + LayerNorm): every implementation side by side.

    pytest benchmarks/test_add_layer_norm_bench.py --benchmark-enable --benchmark-group-by=param:shape,param:mode
"""

import pytest

from fused_attn.bench.suites import add_layer_norm_cases

from .conftest import IMPLS, run_case


@pytest.mark.parametrize("impl", IMPLS + ["copy"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", [768, 1024], ids=lambda h: f"hidden{h}")
def test_add_layer_norm(timed, settings, shape, mode, impl):
    run_case(timed, add_layer_norm_cases, settings(mode, hiddens=[shape]), impl)
