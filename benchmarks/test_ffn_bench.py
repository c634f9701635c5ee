"""FFN (GEMM + bias + GELU or ReLU, GEMM + bias, dropout) at BERT-base and BERT-large widths.

    pytest benchmarks/test_ffn_bench.py --benchmark-enable \
        --benchmark-group-by=param:activation,param:width,param:tokens,param:mode
"""

import pytest
import torch

from fused_attn.bench.suites import ffn_cases

from .conftest import IMPLS, run_case

TOKENS = [4096, 8192, 16384, 32768] if torch.cuda.is_available() else [512, 2048]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("width", [768, 1024], ids=lambda w: f"model{w}")
@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_ffn(timed, settings, activation, width, tokens, mode, impl):
    run_case(timed, ffn_cases, settings(mode, rows=tokens, hiddens=[width], activation=activation), impl)
