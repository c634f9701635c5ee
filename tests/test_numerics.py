"""Numerics every backend must keep: no fp16 overflow on large scores, bit-identical repeats,
correct results from several threads at once."""

import ctypes
import ctypes.util
import platform
import threading

import numpy as np
import pytest
import torch

import fused_attn
from fused_attn import reference

from .conftest import assert_parity, backend_params, supported_dtypes, work_dtype

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
    upstream = torch.randn(1, 2, 24, 64, generator=gen).to(device=device, dtype=torch.float16)
    inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = fused_attn.scaled_dot_product_attention(*inputs, scale=1.0, backend=backend)
    grads = torch.autograd.grad(out, inputs, upstream)
    inputs64 = [t.double().requires_grad_(True) for t in (q, k, v)]
    expected = reference.scaled_dot_product_attention(*inputs64, scale=1.0)
    expected_grads = torch.autograd.grad(expected, inputs64, upstream.double())
    # torch's own float16 attention errs by 0.09 in the output and 2 in dQ/dK here (its fp16
    # scores and probabilities), which would make the usual factor-of-torch bound vacuous: the
    # fused results must instead be within a few float16 ulps of each tensor's scale, per backend
    # (measured: output 0.2 ulp; dQ/dK/dV 0.2-0.4 ulp on cpu, float32 throughout; up to 1.3 under
    # the Triton interpreter; 3.7-4.6 from Triton on a GPU, whose fp16 probabilities and dS feed the
    # tensor-core products, as the cuda kernels' do).
    allowed = {"cpu": 1.0, "triton": 2.0 if device == "cpu" else 6.0, "cuda": 6.0}[backend]
    for name, got, truth in zip(("output", "grad query", "grad key", "grad value"), (out, *grads),
                                (expected, *expected_grads)):
        assert torch.isfinite(got).all(), name
        ulps = float((got.double() - truth).abs().max() / (torch.finfo(torch.float16).eps * truth.abs().max()))
        assert ulps <= allowed, f"{name}: {ulps:.2f} float16 ulps (allowed {allowed})"


SOFTMAX = backend_params("softmax")
ATTENTION_ALL = backend_params("scaled_dot_product_attention")


@pytest.mark.parametrize("backend_device", SOFTMAX)
def test_bool_mask_drops_non_finite_scores_in_softmax(backend_device):
    # A bool mask removes a score whatever it is: inf or NaN where the mask is False leaves the
    # rest of the row a softmax (an additive -inf would make inf - inf = NaN of the whole row).
    backend, device = backend_device
    dtype = work_dtype("softmax", backend, device)
    x = torch.tensor([[[[0.0, float("inf"), 1.0], [float("nan"), 2.0, float("-inf")]]]], device=device, dtype=dtype)
    mask = torch.tensor([[True, False, True], [False, True, True]], device=device)
    x.requires_grad_(True)
    out = fused_attn.softmax(x, -1, mask, backend=backend)
    e = torch.tensor([1.0, 1.0]).exp()
    expected = torch.tensor([[[[1 / (1 + e[0]), 0.0, e[0] / (1 + e[0])], [0.0, 1.0, 0.0]]]])
    torch.testing.assert_close(out.float().cpu(), expected, atol=2 * torch.finfo(dtype).eps, rtol=0)
    (grad,) = torch.autograd.grad(out, x, torch.randn_like(out))
    assert torch.isfinite(grad).all()
    assert (grad[..., 0, 1] == 0).all() and (grad[..., 1, 0] == 0).all()


def _dtypes(op, backend, device):
    return [d for d in (torch.float32, torch.float16) if d in supported_dtypes(backend, device, op)]


@pytest.mark.parametrize("backend_device", SOFTMAX)
def test_softmax_saturates_at_huge_scales(backend_device):
    """A scale up to float32's largest, or one that takes 16-bit scores past their range, gives
    the limit softmax (one-hot at the largest scaled score), not NaN from inf - inf or 0 * inf."""
    backend, device = backend_device
    for dtype in _dtypes("softmax", backend, device):
        x = torch.tensor([[0.0, 0.5, -0.5, 0.1]], device=device, dtype=dtype)
        for scale, hot in ((3e38, 1), (-3e38, 2), (1e5, 1)):
            expected = torch.zeros(1, 4)
            expected[0, hot] = 1
            out = fused_attn.softmax(x, scale=scale, backend=backend)
            assert torch.equal(out.float().cpu(), expected), (dtype, scale, out)


@pytest.mark.parametrize("backend_device", ATTENTION_ALL)
def test_attention_16_bit_with_float32_bias_beyond_its_range(backend_device):
    """A float32 bias of -1e9 on every key of a row (a row that PyTorch averages) and one of 7e4 on
    one key (beyond float16's range) are added to float32 scores: the row averages the values, the
    other takes the biased key's value."""
    backend, device = backend_device
    if torch.float16 not in supported_dtypes(backend, device, "scaled_dot_product_attention"):
        pytest.skip("float16 not tested here")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 3, 16, generator=gen).to(device, torch.float16) for _ in range(3))
    bias = torch.zeros(3, 3, device=device)
    bias[0, :] = -1e9
    bias[1, 2] = 7e4
    out = fused_attn.scaled_dot_product_attention(q, k, v, attn_mask=bias, backend=backend).float().cpu()
    values = v.float().cpu()[0, 0]
    torch.testing.assert_close(out[0, 0, 0], values.mean(0), atol=2e-3, rtol=0)
    torch.testing.assert_close(out[0, 0, 1], values[2], atol=2e-3, rtol=0)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, under the interpreter
@pytest.mark.parametrize("backend_device", ATTENTION_ALL)
@pytest.mark.parametrize("q_len", [5, 2])
def test_bool_mask_drops_non_finite_scores_in_attention(backend_device, q_len):
    # Keys hidden by a bool (key padding) mask may hold inf or NaN: their scores are dropped, so
    # the output is that of the visible keys alone (with two queries, the cpu kernels' few-query
    # products).
    backend, device = backend_device
    dtype = work_dtype("scaled_dot_product_attention", backend, device)
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, length, 16, generator=gen) for length in (q_len, 5, 5))
    keep = torch.tensor([True, True, False, True, False])
    k[:, :, 2] = float("inf")
    k[:, :, 4] = float("nan")
    expected = reference.scaled_dot_product_attention(q.double(), k[:, :, keep].double(), v[:, :, keep].double())
    q, k, v = (t.to(device, dtype) for t in (q, k, v))
    out = fused_attn.scaled_dot_product_attention(q, k, v, keep.to(device).view(1, 1, 1, 5), backend=backend)
    assert torch.isfinite(out).all()
    ulps = float((out.double().cpu() - expected).abs().max() / (torch.finfo(dtype).eps * expected.abs().max()))
    assert ulps <= 4, f"{ulps:.2f} ulps"


@pytest.mark.parametrize("backend_device", LAYER_NORM)
def test_layer_norm_large_values_in_fp16(backend_device):
    backend, device = backend_device
    if torch.float16 not in supported_dtypes(backend, device):
        pytest.skip("float16 not tested here")
    # Squares of these overflow fp16 (max 65504): statistics must be accumulated in float32.
    x = (torch.randn(4, 512) * 3000).to(device=device, dtype=torch.float16)
    assert_parity(
        lambda input: fused_attn.layer_norm(input, (512,), backend=backend),
        lambda input: reference.layer_norm(input, (512,)),
        {"input": x}, grad_args=("input",),
    )


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
    """Also under the Triton interpreter, whose launches are serialised (its grid is process-wide)."""
    backend, device = backend_device
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


def _kept_values_are(values: torch.Tensor, unit: float) -> None:
    """Every non-zero entry of ``values`` is a whole multiple of ``unit`` to float32 rounding."""
    got = values.detach().double().cpu().flatten()
    got = got[got != 0]
    assert got.numel() > 0, "nothing was kept: pick another seed"
    multiples = (got / unit).round()
    assert (multiples >= 1).all()
    rel = float(((got - multiples * unit) / got).abs().max())
    assert rel < 1e-6, rel


# Dropout keeps an element when its uniform draw is >= p as a float32, and divides what it keeps by
# that keep rate, 1 - float32(p): the expected value of an element is itself (as in torch's CUDA
# dropout). At p = 0.9999 the keep rate is 1.0001659e-4, 1.66e-4 above 1 - p. A p that rounds to 1
# in float32 keeps nothing and gives 0 (not 0 / 0).
DROPOUT_NEAR_ONE = 0.9999
INV_KEEP = float(1 / (1 - np.float32(DROPOUT_NEAR_ONE)))
ROUNDS_TO_ONE = 1 - 1e-8


@pytest.mark.parametrize("p", [DROPOUT_NEAR_ONE, ROUNDS_TO_ONE])
@pytest.mark.parametrize("backend_device", ATTENTION)
def test_attention_dropout_scale_near_one(backend_device, p):
    backend, device = backend_device
    dtype = work_dtype("scaled_dot_product_attention", backend, device)
    # k = 0: every probability is 1/8 exactly; v = 1: O is (kept keys) * 1/8 * scale, dV likewise.
    q = torch.randn(1, 1, 8192, 8, device=device, dtype=dtype)
    k = torch.zeros(1, 1, 8, 8, device=device, dtype=dtype)
    v = torch.ones(1, 1, 8, 8, device=device, dtype=dtype, requires_grad=True)
    torch.manual_seed(0)
    out = fused_attn.scaled_dot_product_attention(q, k, v, dropout_p=p, backend=backend)
    (dv,) = torch.autograd.grad(out, v, torch.ones_like(out))
    if p == ROUNDS_TO_ONE:
        assert not out.any() and not dv.any()
    else:
        _kept_values_are(out, INV_KEEP / 8)
        _kept_values_are(dv, INV_KEEP / 8)


@pytest.mark.parametrize("p", [DROPOUT_NEAR_ONE, ROUNDS_TO_ONE])
@pytest.mark.parametrize("backend_device", backend_params("add_layer_norm", exclude=("reference",)))
def test_add_layer_norm_dropout_scale_near_one(backend_device, p):
    backend, device = backend_device
    x = torch.ones(64, 1024, device=device, requires_grad=True)
    torch.manual_seed(0)
    out, prenorm = fused_attn.add_layer_norm(
        x, torch.zeros_like(x), None, None, dropout_p=p, return_prenorm=True, backend=backend
    )
    (dx,) = torch.autograd.grad(prenorm, x, torch.ones_like(prenorm))
    if p == ROUNDS_TO_ONE:
        assert not prenorm.any() and not out.any() and not dx.any()
    else:
        _kept_values_are(prenorm, INV_KEEP)
        _kept_values_are(dx, INV_KEEP)


@pytest.mark.parametrize("p", [DROPOUT_NEAR_ONE, ROUNDS_TO_ONE])
@pytest.mark.parametrize("backend_device", backend_params("ffn", exclude=("reference",)))
def test_ffn_dropout_scale_near_one(backend_device, p):
    backend, device = backend_device
    x = torch.randn(256, 16, device=device)
    w1, b1 = torch.randn(32, 16, device=device), torch.zeros(32, device=device)
    w2 = torch.zeros(256, 32, device=device, requires_grad=True)
    b2 = torch.ones(256, device=device, requires_grad=True)
    torch.manual_seed(0)
    out = fused_attn.ffn(x, w1, b1, w2, b2, "none", p, backend=backend)
    (db2,) = torch.autograd.grad(out, b2, torch.ones_like(out))
    if p == ROUNDS_TO_ONE:
        assert not out.any() and not db2.any()
    else:
        _kept_values_are(out, INV_KEEP)
        _kept_values_are(db2, INV_KEEP)


# glibc's <fenv.h> on x86-64: the underflow flag, in both the x87 and the SSE status words.
_FE_UNDERFLOW = 0x10


def _libm():
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
    except OSError:
        return None


@pytest.mark.skipif(_libm() is None, reason="reads the x86-64 floating-point status flags through glibc")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_masked_exponentials_raise_no_underflow(dtype):
    """Masked scores (-inf: causal tiles' hidden half, a boolean mask, a ragged tile's padding lanes)
    become exact zeros, and the GELU's far negative tail 0, without any float result below the
    normal range: such a result sets the underflow flag and, while flush-to-zero is off (torch's
    default), costs a microcode assist per vector lane. An AVX-512 exponential that let -inf
    underflow made the causal attention forward slower than the full one. On one thread, so that
    the kernels run, forward and backward, on the thread whose flags are read."""
    if dtype not in supported_dtypes("cpu", "cpu", "scaled_dot_product_attention"):
        pytest.skip("the cpu backend is not available")
    libm = _libm()
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 150, 64, generator=gen).to(dtype).requires_grad_() for _ in range(3))
    mask = torch.rand(2, 1, 150, 150, generator=gen) > 0.3
    x = torch.randn(2, 3, 100, 70, generator=gen).to(dtype).requires_grad_()

    def attention(**kwargs):
        out = fused_attn.scaled_dot_product_attention(q, k, v, backend="cpu", **kwargs)
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out))

    def softmax(**kwargs):
        y = fused_attn.softmax(x, backend="cpu", **kwargs)
        torch.autograd.grad(y, x, torch.ones_like(y))

    pre = torch.linspace(-30, 5, 701).to(dtype)[:, None].requires_grad_()

    def gelu():  # the far negative tail, where Phi and the density fall below 1e-35 and then to 0
        for approximate in ("none", "tanh"):
            y = fused_attn.linear_gelu(pre, torch.ones(1, 1, dtype=dtype), None, approximate, backend="cpu")
            torch.autograd.grad(y, pre, torch.ones_like(y))

    calls = {
        "causal attention": lambda: attention(is_causal=True),
        "masked attention": lambda: attention(attn_mask=mask),
        "causal softmax": lambda: softmax(is_causal=True),
        "masked softmax": lambda: softmax(mask=mask[..., :100, :70]),
    }
    if dtype == torch.float32:  # the package's own GELU pass (16-bit ones may run torch's: see GELU)
        calls["gelu"] = gelu
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, call in calls.items():
            call()  # first calls (lazy set-up) outside the window the flags are read in
            libm.feclearexcept(_FE_UNDERFLOW)
            call()
            assert libm.fetestexcept(_FE_UNDERFLOW) == 0, f"{name} ({dtype}): a float result underflowed"
    finally:
        torch.set_num_threads(threads)
