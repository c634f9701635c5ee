"""Attention: the plain eager form, torch SDPA (default and flash backends), the reference and
every fused backend, side by side per (seq, head_dim, causal, mode). TFLOP/s = 4*B*H*D per
(query, key) pair computed (L^2, or L(L+1)/2 causal; x3.5 with the backward) over the measured
time.

    pytest benchmarks/test_attention_bench.py --benchmark-enable --benchmark-group-by=param:seq,param:head_dim,param:causal,param:mode
"""

import pytest
import torch

from fused_attn.bench.suites import attention_cases

from .conftest import IMPLS, run_case

GPU = torch.cuda.is_available()
SEQS = [512, 1024, 2048, 4096, 8192, 16384] if GPU else [512, 1024]


@pytest.mark.parametrize("impl", ["eager"] + IMPLS + ["torch-flash"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("seq", SEQS)
def test_attention(timed, settings, seq, head_dim, causal, mode, impl):
    run_case(timed, attention_cases, settings(mode, seqs=[seq], head_dim=head_dim, causal=[causal]), impl)


@pytest.mark.parametrize("impl", ["eager"] + IMPLS + ["torch-flash"])
@pytest.mark.parametrize("seq", SEQS[:2])
def test_attention_training_with_dropout(timed, settings, seq, impl):
    """A training step's attention (forward + backward) with BERT's dropout of 0.1: the fused
    backends draw the keep-mask in their tiles; eager drops the probabilities it stores, and
    PyTorch's SDPA takes the kernel its backends have for dropout (on a CPU, the math path)."""
    run_case(timed, attention_cases, settings("fwd+bwd", seqs=[seq], head_dim=64, causal=[False], dropout=0.1), impl)
