"""LayerNorm: every implementation side by side, per shape (pytest-benchmark groups).

    pytest benchmarks/test_layer_norm_bench.py --benchmark-enable --benchmark-group-by=param:shape,param:mode
"""

import pytest

from fused_attn.bench.suites import layer_norm_cases

from .conftest import IMPLS, run_case

HIDDEN = [768, 1024, 4096]


@pytest.mark.parametrize("impl", IMPLS + ["copy"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", HIDDEN, ids=lambda h: f"hidden{h}")
def test_layer_norm(timed, settings, shape, mode, impl):
    run_case(timed, layer_norm_cases, settings(mode, hiddens=[shape]), impl)
