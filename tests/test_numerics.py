"""Numerics every backend must keep: no fp16 overflow on large scores, bit-identical repeats,
correct results from several threads at once."""

import threading

import pytest
import torch

import fused_attn
from fused_attn import reference

from .conftest import backend_params, supported_dtypes, work_dtype

ATTENTION = backend_params("scaled_dot_product_attention", exclude=("reference",))
LAYER_NORM = backend_params("layer_norm", exclude=("reference",))


@pytest.mark.parametrize("backend_device", ATTENTION)
def test_fp16_scores_of_1e4_do_not_overflow(backend_device):
    backend, device = backend_device
    if torch.float16 not in supported_dtypes(backend, device, "scaled_dot_product_attention"):
        pytest.skip("float16 not tested here")
    gen = torch.Generator().manual_seed(0)
    # q . k reaches ~1e4 (far beyond what exp() of an fp16 score could hold without the max shift).
    q = (torch.randn(1, 2, 24, 64, generator=gen) * 12).to(device=device, dtype=torch.float16)
    k = (torch.randn(1, 2, 24, 64, generator=gen) * 12).to(device=device, dtype=torch.float16)
    v = torch.randn(1, 2, 24, 64, generator=gen).to(device=device, dtype=torch.float16)
    out = fused_attn.scaled_dot_product_attention(q, k, v, scale=1.0, backend=backend)
    expected = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=1.0)
    assert torch.isfinite(out).all()
    assert (out.double() - expected).abs().max() < 1e-2


@pytest.mark.parametrize("backend_device", LAYER_NORM)
def test_layer_norm_large_values_in_fp16(backend_device):
    backend, device = backend_device
    if torch.float16 not in supported_dtypes(backend, device):
        pytest.skip("float16 not tested here")
    # Squares of these overflow fp16 (max 65504): statistics must be accumulated in float32.
    x = (torch.randn(4, 512) * 3000).to(device=device, dtype=torch.float16)
    out = fused_attn.layer_norm(x, (512,), backend=backend)
    expected = reference.layer_norm(x.double(), (512,))
    assert torch.isfinite(out).all()
    assert (out.double() - expected).abs().max() < 1e-2


@pytest.mark.parametrize("backend_device", ATTENTION)
def test_forward_and_backward_are_bit_identical_twice(backend_device):
    backend, device = backend_device
    gen = torch.Generator().manual_seed(1)
    dtype = work_dtype("scaled_dot_product_attention", backend, device)
    q, k, v = (torch.randn(2, 2, 40, 32, generator=gen).to(device, dtype).requires_grad_(True) for _ in range(3))
    pad = torch.rand(2, 1, 1, 40, generator=gen).to(device) > 0.2

    def run():
        torch.manual_seed(3)
        out = fused_attn.scaled_dot_product_attention(q, k, v, pad, dropout_p=0.1, is_causal=True, backend=backend)
        return (out, *torch.autograd.grad(out.square().sum(), (q, k, v)))

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend_device", LAYER_NORM)
def test_layer_norm_bit_identical_twice(backend_device):
    backend, device = backend_device
    x = torch.randn(300, 96, device=device, requires_grad=True)
    w = torch.randn(96, device=device, requires_grad=True)

    def run():
        out = fused_attn.layer_norm(x, (96,), w, backend=backend)
        return (out, *torch.autograd.grad(out.square().sum(), (x, w)))

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend_device", ATTENTION)
def test_four_threads_at_once_get_correct_results(backend_device):
    backend, device = backend_device
    if backend == "triton" and device == "cpu":
        pytest.skip("the Triton interpreter (a test-only mode) is not thread-safe; compiled Triton is tested on CUDA")
    errors: list[str] = []

    def worker(seed: int) -> None:
        try:
            check(seed)
        except Exception as exc:  # an exception in a thread must fail the test, not vanish
            errors.append(f"thread {seed}: {type(exc).__name__}: {exc}")

    dtype = work_dtype("scaled_dot_product_attention", backend, device)
    # What each thread must get: the same backend's result computed here, alone (its parity with
    # the reference is what the parity tests check).
    inputs, wanted = {}, {}
    for seed in range(4):
        gen = torch.Generator().manual_seed(seed)
        inputs[seed] = [torch.randn(1, 2, 33, 16, generator=gen).to(device=device, dtype=dtype) for _ in range(3)]
        wanted[seed] = fused_attn.scaled_dot_product_attention(*inputs[seed], is_causal=True, backend=backend)

    def check(seed: int) -> None:
        gen = torch.Generator().manual_seed(100 + seed)
        q, k, v = inputs[seed]
        x = torch.randn(20, 48, generator=gen).to(device)
        for _ in range(5):
            out = fused_attn.scaled_dot_product_attention(q, k, v, is_causal=True, backend=backend)
            want = wanted[seed]
            if not torch.allclose(out, want, rtol=1e-4 if dtype == torch.float32 else 1e-3, atol=1e-5):
                errors.append(f"thread {seed}: attention differs by {(out - want).abs().max():.3g}")
            ln = fused_attn.layer_norm(x, (48,))
            if not torch.allclose(ln, torch.nn.functional.layer_norm(x, (48,)), rtol=1e-4, atol=1e-5):
                errors.append(f"thread {seed}: layer_norm differs")

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors
