import pytest
import torch
import torch.nn.functional as F

import fused_attn
from fused_attn import _extension, reference
from fused_attn.backends import BackendNotSupportedError

from .conftest import assert_float32_parameters_unrounded, assert_parity, backend_params, supported_dtypes

BACKENDS = backend_params("layer_norm")
FUSED_BACKENDS = backend_params("layer_norm", exclude=("reference",))


def _inputs(shape, hidden, dtype, device, *, affine=(True, True), seed=0):
    gen = torch.Generator().manual_seed(seed)
    # A non-zero mean and a spread of scales, as real activations have.
    x = (torch.randn(*shape, hidden, generator=gen) * 2 + 0.5).to(device=device, dtype=dtype)
    w = (torch.randn(hidden, generator=gen) * 0.5 + 1).to(device=device, dtype=dtype) if affine[0] else None
    b = (torch.randn(hidden, generator=gen) * 0.1).to(device=device, dtype=dtype) if affine[1] else None
    return x, w, b


def _check(backend, device, dtype, shape, hidden, affine=(True, True), eps=1e-5, size=1.0):
    if dtype not in supported_dtypes(backend, device):
        pytest.skip(f"{dtype} is not tested on {backend}-{device}")
    x, w, b = _inputs(shape, hidden, dtype, device, affine=affine)
    args = {"input": x * size, "weight": w, "bias": b}
    grads = ("input",) + (("weight",) if w is not None else ()) + (("bias",) if b is not None else ())
    assert_parity(
        lambda input, weight, bias: fused_attn.layer_norm(input, (hidden,), weight, bias, eps, backend=backend),
        lambda input, weight, bias: reference.layer_norm(input, (hidden,), weight, bias, eps),
        args,
        grad_args=grads,
    )
    assert fused_attn.last_backend("layer_norm") == backend


@pytest.mark.parametrize("backend_device", FUSED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("hidden", [1, 7, 64, 77, 768, 1000])
def test_parity_hidden_sizes(backend_device, dtype, hidden):
    _check(*backend_device, dtype, (3, 11), hidden)


@pytest.mark.parametrize("backend_device", FUSED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("hidden", [4096, 5000, 16384])
def test_parity_wide_rows(backend_device, dtype, hidden):
    _check(*backend_device, dtype, (4,), hidden)


@pytest.mark.parametrize("backend_device", FUSED_BACKENDS)
@pytest.mark.parametrize("eps", [1e-12, 1e-3])
def test_parity_eps_comparable_to_the_variance(backend_device, eps):
    """Rows of variance ~4e-5: eps 1e-3 dominates it, BERT's 1e-12 is negligible; either way the
    eps given is the one used (the other tests take the default 1e-5)."""
    _check(*backend_device, torch.float32, (5,), 96, eps=eps, size=3e-3)


@pytest.mark.parametrize("backend_device", FUSED_BACKENDS)
@pytest.mark.parametrize("affine", [(False, False), (True, False), (False, True)], ids=["none", "weight", "bias"])
def test_parity_without_affine(backend_device, affine):
    _check(*backend_device, torch.float32, (5,), 96, affine=affine)


@pytest.mark.parametrize("backend_device", FUSED_BACKENDS)
def test_many_rows(backend_device):
    # More rows than backward programs, with a row count that divides nothing evenly.
    _check(*backend_device, torch.float32, (1031,), 48)


@pytest.mark.parametrize("backend_device", FUSED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_parity_several_row_chunks(backend_device, dtype):
    # BERT-base width over 256 rows: the CPU backward splits the rows into chunks (at 32 rows and
    # 65536 elements and more), whose weight and bias partial sums are then added.
    _check(*backend_device, dtype, (256,), 768)


@pytest.mark.parametrize("backend_device", FUSED_BACKENDS)
@pytest.mark.parametrize("shape", [(), (2, 3, 4)], ids=["1d", "4d"])
def test_leading_shapes(backend_device, shape):
    _check(*backend_device, torch.float32, shape, 40)


@pytest.mark.parametrize("backend_device", FUSED_BACKENDS)
def test_multi_dim_normalized_shape(backend_device):
    backend, device = backend_device
    x, _, _ = _inputs((3,), 4 * 20, torch.float32, device)
    x = x.view(3, 4, 20)
    w = torch.rand(4, 20, device=device) + 0.5
    b = torch.randn(4, 20, device=device)
    out = fused_attn.layer_norm(x, (4, 20), w, b, backend=backend)
    torch.testing.assert_close(out, F.layer_norm(x, (4, 20), w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend_device", FUSED_BACKENDS)
def test_non_contiguous_input(backend_device):
    backend, device = backend_device
    gen = torch.Generator().manual_seed(0)
    view = lambda base: base.transpose(0, 2)[:, ::2]  # noqa: E731  [10, 3, 64], strided in every dim
    args = {"base": torch.randn(64, 6, 10, generator=gen).to(device), "weight": torch.randn(64, generator=gen).to(device)}
    assert not view(args["base"]).is_contiguous()
    assert_parity(
        lambda base, weight: fused_attn.layer_norm(view(base), (64,), weight, None, backend=backend),
        lambda base, weight: F.layer_norm(view(base), (64,), weight, None),
        args, grad_args=("base", "weight"),
    )


@pytest.mark.parametrize("backend_device", FUSED_BACKENDS)
def test_matches_torch_layer_norm(backend_device):
    """Same results as torch.nn.functional.layer_norm, not only as our own reference."""
    backend, device = backend_device
    x, w, b = _inputs((7,), 300, torch.float32, device)
    torch.testing.assert_close(
        fused_attn.layer_norm(x, 300, w, b, eps=1e-6, backend=backend), F.layer_norm(x, (300,), w, b, eps=1e-6)
    )


@pytest.mark.parametrize("backend_device", FUSED_BACKENDS)
def test_large_mean_small_spread(backend_device):
    """Two-pass statistics: |mean| >> std must not cancel catastrophically."""
    backend, device = backend_device
    x = (1000.0 + 1e-2 * torch.randn(6, 256)).to(device)
    expected = reference.layer_norm(x.double(), (256,))
    out = fused_attn.layer_norm(x, (256,), backend=backend)
    # The float32 mean alone costs ~5e-3 here (torch's own kernel included); E[x^2] - E[x]^2
    # would lose the variance entirely and be off by O(1).
    torch_err = (F.layer_norm(x, (256,)).double() - expected).abs().max()
    assert (out.double() - expected).abs().max() <= 3 * torch_err


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("hidden", [768, 1024, 20000])
@pytest.mark.parametrize("op", ["layer_norm", "add_layer_norm"])
def test_constant_rows_normalise_to_the_bias(backend_device, hidden, op):
    """A constant row has variance 0, so rstd = 1 / sqrt(eps) (1e6 at BERT's eps of 1e-12): a
    mean off by its float32 rounding would come out scaled by it, where torch gives the bias.
    20000 streams the row in chunks in the Triton kernel."""
    backend, device = backend_device
    x = torch.tensor([123.4, 0.1, -2.7, 1.0], device=device)[:, None].expand(4, hidden).contiguous()
    gen = torch.Generator().manual_seed(0)
    w, b = (torch.randn(hidden, generator=gen).to(device).requires_grad_() for _ in range(2))
    dy = torch.randn(4, hidden, generator=gen).to(device)
    for eps in (1e-12, 1e-5):
        if op == "layer_norm":
            out = fused_attn.layer_norm(x, (hidden,), w, b, eps, backend=backend)
        else:
            out = fused_attn.add_layer_norm(torch.zeros_like(x), x, w, b, eps, backend=backend)
        assert torch.equal(out, b.detach().expand_as(out)), float((out - b).abs().max())
        grad_w, grad_b = torch.autograd.grad(out, (w, b), dy)
        assert torch.equal(grad_w, torch.zeros_like(grad_w))
        torch.testing.assert_close(grad_b, dy.sum(0))


@pytest.mark.parametrize("backend_device", FUSED_BACKENDS)
@pytest.mark.parametrize("op", ["layer_norm", "add_layer_norm"])
def test_subnormal_variance_without_eps(backend_device, op):
    """eps = 0 and rows of size 1e-20: the variance (~1e-40) is subnormal in float32, and rstd
    (~1e20) is finite. A flush to zero on the way (GPU fast-math squares, sums or square root)
    would make it inf and the output inf or NaN where torch gives values of order 1."""
    backend, device = backend_device
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 96, generator=gen) * 1e-20).to(device)
    want = F.layer_norm(x.double(), (96,), eps=0.0)
    if op == "layer_norm":
        out = fused_attn.layer_norm(x, (96,), eps=0.0, backend=backend)
    else:
        out = fused_attn.add_layer_norm(x, torch.zeros_like(x), None, None, eps=0.0, backend=backend)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("eps", [1e-12, 1e-5])
def test_nearly_constant_rows(backend_device, eps):
    """Rows a few float32 ulps wide around 123.4: the rounding of the mean is comparable to the
    spread, and takes the output and the weight gradient far off unless the statistics remove it
    (torch's Welford statistics do)."""
    backend, device = backend_device
    gen = torch.Generator().manual_seed(0)
    x = (123.4 + 1e-5 * torch.randn(6, 1024, generator=gen)).to(device)
    w, b = (torch.randn(1024, generator=gen).to(device) for _ in range(2))
    assert_parity(
        lambda input, weight, bias: fused_attn.layer_norm(input, (1024,), weight, bias, eps, backend=backend),
        lambda input, weight, bias: F.layer_norm(input, (1024,), weight, bias, eps),
        {"input": x, "weight": w, "bias": b},
        grad_args=("input", "weight", "bias"),
    )


@pytest.mark.parametrize("backend_device", FUSED_BACKENDS)
def test_mixed_precision_parameters(backend_device):
    """float32 weight/bias with a float16 input, as F.layer_norm accepts; gradients keep their dtype."""
    backend, device = backend_device
    if torch.float16 not in supported_dtypes(backend, device):
        pytest.skip("float16 not tested here")
    x = torch.randn(4, 32, device=device, dtype=torch.float16)
    w = torch.randn(32, device=device, requires_grad=True)
    out = fused_attn.layer_norm(x, (32,), w, backend=backend)
    assert out.dtype == torch.float16
    out.float().sum().backward()
    assert w.grad is not None and w.grad.dtype == torch.float32
    # Values: against F.layer_norm's own mixed-precision path, with the float64 truth.
    gen = torch.Generator().manual_seed(3)
    args = {"input": (torch.randn(4, 32, generator=gen) * 2 + 1).to(device, torch.float16),
            "weight": torch.randn(32, generator=gen).to(device), "bias": torch.randn(32, generator=gen).to(device)}
    assert_parity(
        lambda input, weight, bias: fused_attn.layer_norm(input, (32,), weight, bias, backend=backend),
        lambda input, weight, bias: F.layer_norm(input, (32,), weight, bias),
        args, grad_args=("input", "weight", "bias"),
    )


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("hidden", [256, 77, 5000])
def test_float32_parameters_are_read_unrounded(backend_device, dtype, hidden):
    """Norms kept in float32 with a 16-bit input (and CPU autocast's LayerNorm): the parameters
    enter the float32 arithmetic as they are, their gradients are summed into float32."""
    backend, device = backend_device
    if dtype not in supported_dtypes(backend, device):
        pytest.skip(f"{dtype} is not tested on {backend}-{device}")
    x = (torch.randn(48, hidden, generator=torch.Generator().manual_seed(1)) * 2 + 0.5).to(device, dtype)
    assert_float32_parameters_unrounded(
        lambda input, weight, bias: fused_attn.layer_norm(input, (hidden,), weight, bias, backend=backend),
        lambda input, weight, bias: F.layer_norm(input, (hidden,), weight, bias),
        {"input": x}, hidden,
    )
    assert fused_attn.last_backend("layer_norm") == backend


@pytest.mark.parametrize("backend_device", FUSED_BACKENDS)
def test_nan_passes_through_like_reference(backend_device):
    backend, device = backend_device
    x = torch.randn(3, 16, device=device)
    x[1, 5] = float("nan")
    out = fused_attn.layer_norm(x, (16,), backend=backend)
    expected = F.layer_norm(x, (16,))
    assert torch.isnan(out[1]).all()
    torch.testing.assert_close(out, expected, equal_nan=True)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 16), (4, 0, 16)])
def test_empty_input(backend_device, shape):
    backend, device = backend_device
    x = torch.randn(*shape, device=device, requires_grad=True)
    w = torch.randn(16, device=device, requires_grad=True)
    out = fused_attn.layer_norm(x, (16,), w, backend=backend)
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad.shape == x.shape
    torch.testing.assert_close(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("backend_device", FUSED_BACKENDS)
@pytest.mark.parametrize("rows", [0, 3])
def test_kernels_define_empty_row_statistics_as_zero(backend_device, rows):
    # The row statistics the forward kernels save are the same on every backend, for layer_norm and
    # add_layer_norm alike, also where a row has no elements (the public functions route such
    # input to the reference, but the ops are callable on their own).
    backend, device = backend_device
    prefix = "triton_" if backend == "triton" else ""
    x = torch.randn(rows, 0, device=device)
    empty = torch.empty(0, device=device)
    _, mean, rstd = getattr(torch.ops.fused_attn, prefix + "layer_norm_fwd")(x, empty, empty, 1e-5)
    _, _, mean2, rstd2 = getattr(torch.ops.fused_attn, prefix + "add_layer_norm_fwd")(
        x, x, empty, empty, None, 1e-5, 0.0, None)
    for stat in (mean, rstd, mean2, rstd2):
        assert stat.dtype == torch.float32
        torch.testing.assert_close(stat, torch.zeros(rows, device=device), rtol=0, atol=0)


@pytest.mark.parametrize(
    "make_args, error, fragment",
    [
        (lambda: (torch.randn(4, 8), (7,)), ValueError, "normalized_shape [7] must equal the trailing dims"),
        (lambda: (torch.randn(8), (2, 8)), ValueError, "normalized_shape [2, 8]"),
        (lambda: (torch.randn(4, 8), ()), ValueError, "normalized_shape [] must equal"),
        (lambda: (torch.randn(4, 8), "8"), TypeError, "normalized_shape must be an int"),
        (lambda: ([1.0, 2.0], (2,)), TypeError, "input must be a torch.Tensor"),
        (lambda: (torch.arange(8).view(1, 8), (8,)), TypeError, "input must be a floating tensor"),
        (lambda: (torch.randn(4, 8), (8,), torch.randn(7)), ValueError, "weight must have shape [8]"),
        (lambda: (torch.randn(4, 8), (8,), None, torch.randn(2, 8)), ValueError, "bias must have shape [8]"),
        (lambda: (torch.randn(4, 8), (8,), torch.ones(8, dtype=torch.int64)), TypeError, "weight must be a floating"),
        (lambda: (torch.randn(4, 8), (8,), torch.ones(8, device="meta")), ValueError, "weight is on meta but input is on cpu"),
        (lambda: (torch.randn(4, 8), (8,), None, None, -1.0), ValueError, "eps must be a finite non-negative"),
        (lambda: (torch.randn(4, 8), (8,), None, None, float("nan")), ValueError, "eps must be a finite"),
    ],
)
def test_bad_input(make_args, error, fragment):
    with pytest.raises(error) as info:
        fused_attn.layer_norm(*make_args())
    assert fragment in str(info.value)


def test_forced_backend_that_cannot_serve_raises_with_reasons():
    x = torch.randn(2, 8, dtype=torch.float64)
    with pytest.raises(BackendNotSupportedError) as info:
        fused_attn.layer_norm(x, (8,), backend="cpu")
    assert "dtype float64 not in" in str(info.value)


@pytest.mark.skipif(not _extension.loaded(), reason="the C++ extension is not built")
def test_native_ops_take_parameters_in_the_input_dtype_or_float32():
    """The kernels' own checks: weight and bias share one dtype, the input's or (for a 16-bit
    input) float32; the public op casts any other mix to the input's dtype before calling them."""
    fwd = torch.ops.fused_attn.layer_norm_fwd
    x = torch.randn(3, 8, dtype=torch.float16)
    w32, w16, wbf = torch.randn(8), torch.randn(8, dtype=torch.float16), torch.randn(8, dtype=torch.bfloat16)
    out, _, _ = fwd(x, w32, w32, 1e-5)
    torch.testing.assert_close(out, F.layer_norm(x.float(), (8,), w32, w32).half())
    with pytest.raises(RuntimeError, match=r"bias must have dtype Float \(the input's, or float32 for weight and bias"):
        fwd(x, w32, w16, 1e-5)
    with pytest.raises(RuntimeError, match=r"bias must have dtype Half \(the input's"):
        fwd(x, w16, w32, 1e-5)
    with pytest.raises(RuntimeError, match=r"weight must have dtype Half \(the input's"):
        fwd(x, wbf, None, 1e-5)
    with pytest.raises(RuntimeError, match=r"weight must have dtype Float \(the input's"):
        fwd(x.float(), w16, None, 1e-5)
    # Through the public op every mix is served, the gradients in each parameter's own dtype.
    w, b = w32.clone().requires_grad_(), w16.clone().requires_grad_()
    fused_attn.layer_norm(x, (8,), w, b, backend="cpu").float().sum().backward()
    assert (w.grad.dtype, b.grad.dtype) == (torch.float32, torch.float16)
