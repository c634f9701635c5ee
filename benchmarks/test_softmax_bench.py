"""Masked softmax: every implementation side by side, per sequence length.

    pytest benchmarks/test_softmax_bench.py --benchmark-enable --benchmark-group-by=param:seq,param:mode
"""

import pytest
import torch

from fused_attn.bench.suites import softmax_cases

from .conftest import IMPLS, run_case

SEQS = [512, 1024, 2048, 4096] if torch.cuda.is_available() else [128, 512]


@pytest.mark.parametrize("impl", IMPLS + ["copy"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("seq", SEQS)
def test_softmax(timed, settings, seq, mode, impl):
    run_case(timed, softmax_cases, settings(mode, seqs=[seq]), impl)
