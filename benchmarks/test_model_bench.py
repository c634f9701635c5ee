"""Whole models: the reference BERT and Hugging Face BERT, plain, optimize()d, torch.compile()d.

    pytest benchmarks/test_model_bench.py --benchmark-enable --benchmark-group-by=param:model,param:mode
"""

import pytest

from fused_attn.bench.suites import model_cases

from .conftest import run_case


@pytest.mark.parametrize("impl", ["plain", "optimized", "compiled"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("model", ["bert-mini", "hf-bert"])
def test_model(timed, settings, model, mode, impl):
    run_case(timed, model_cases, settings(mode, models=[model]), impl)


@pytest.mark.parametrize("impl", ["plain", "optimized", "compiled"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_model_single_sequence(timed, settings, device, mode, impl):
    """One short sequence (online serving): small kernels, so the host's time per op call bounds it."""
    model, seq = ("bert-base", 128) if device.type == "cuda" else ("bert-tiny", 32)
    run_case(timed, model_cases, settings(mode, models=[model], batch=1, seqs=[seq]), impl)
