import pytest
import torch

import fused_attn
from fused_attn import reference

from .conftest import assert_parity, backend_params, supported_dtypes

BACKENDS = backend_params("softmax", exclude=("reference",))
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _check(backend, device, dtype, shape, *, dim=-1, mask=None, scale=1.0, causal=False, mask_grad=False):
    if dtype not in supported_dtypes(backend, device):
        pytest.skip(f"{dtype} is not tested on {backend}-{device}")
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(*shape, generator=gen) * 3).to(device=device, dtype=dtype)
    if mask is not None:
        mask = mask.to(device)
        if mask.is_floating_point():
            mask = mask.to(dtype)
    assert_parity(
        lambda input, mask: fused_attn.softmax(input, dim, mask, scale, causal, backend=backend),
        lambda input, mask: reference.softmax(input, dim, mask, scale, causal),
        {"input": x, "mask": mask},
        grad_args=("input",) + (("mask",) if mask_grad else ()),
    )
    assert fused_attn.last_backend("softmax") == backend


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 7, 77, 128, 1000])
def test_parity_lengths(backend_device, dtype, n):
    _check(*backend_device, dtype, (2, 3, 5, n), scale=0.125)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parity_long_rows_stream(backend_device, dtype):
    _check(*backend_device, dtype, (3, 20000))


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [2, 3, 8, 300, 5000])
def test_backward_of_peaked_rows(backend_device, dtype, n):
    """Rows that put nearly all their weight on one element, where the backward's dy_k - sum(y dy)
    cancels: the stored probabilities' rounding (their sum misses 1 by it) must not enter it at dy's
    scale (it did in float16 on rows of a few elements, at many times the reference's error)."""
    backend, device = backend_device
    if dtype not in supported_dtypes(backend, device):
        pytest.skip(f"{dtype} is not tested on {backend}-{device}")
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(32, n, generator=gen)
    x[torch.arange(32), torch.randint(0, n, (32,), generator=gen)] += 9.0  # one element ~e^9 above the rest
    assert_parity(
        lambda input: fused_attn.softmax(input, backend=backend),
        lambda input: reference.softmax(input),
        {"input": x.to(device=device, dtype=dtype)},
        grad_args=("input",),
    )


@pytest.mark.parametrize("backend_device", backend_params("softmax"))
@pytest.mark.parametrize("mask_shape, dim", [((1,), -1), ((), -1), ((4, 1), -1), ((1, 6), 0), ((6,), 0), ((4, 6), -1)])
def test_mask_constant_along_dim_gets_exact_zero_gradient(backend_device, mask_shape, dim):
    """A learned mask of size 1 along dim shifts whole slices, which softmax ignores: its gradient
    is exactly 0 on every backend (a computed one is a sum cancelling only to rounding), and the
    input's gradient is the plain one; a mask that varies along dim gets its gradient."""
    backend, device = backend_device
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 6, generator=gen).to(device).requires_grad_()
    mask = torch.randn(mask_shape, generator=gen).to(device).requires_grad_()
    dy = torch.randn(4, 6, generator=gen).to(device)
    fused_attn.softmax(x, dim, mask, backend=backend).backward(dy)
    x_ref = x.detach().clone().requires_grad_()
    torch.softmax(x_ref + mask.detach(), dim).backward(dy)
    torch.testing.assert_close(x.grad, x_ref.grad)
    aligned = dim % 2 - 2 + len(mask_shape)  # the mask's dim that broadcasts along the input's dim
    if aligned < 0 or mask_shape[aligned] == 1:
        assert torch.equal(mask.grad, torch.zeros_like(mask))
    else:
        assert mask.grad.abs().max() > 0.1


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_huge_positive_mask_picks_its_element(backend_device):
    """A mask value above 2.36e38 overflowed to inf times log2(e) on triton and cuda, and the row
    to inf - inf = NaN; the plain softmax gives the element all the weight."""
    backend, device = backend_device
    if torch.float32 not in supported_dtypes(backend, device):
        pytest.skip(f"float32 is not tested on {backend}-{device}")
    x = torch.randn(4, 9).to(device)
    mask = torch.zeros(4, 9, device=device)
    mask[:, 3] = 3e38
    y = fused_attn.softmax(x, mask=mask, backend=backend)
    torch.testing.assert_close(y, reference.softmax(x, mask=mask), rtol=0, atol=0)
    assert (y[:, 3] == 1).all()


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("n", [257, 20000], ids=["row-in-registers", "row-streamed"])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_scores_far_from_zero_keep_their_digits(backend_device, n, scale):
    """Scores of 1e4 + 0.01 * randn: the row max is subtracted before anything rounds the scores at
    their magnitude (triton and cuda multiplied every score by log2(e) first: 1e-3 absolute error in
    the exponent, 2000x torch's in float32)."""
    backend, device = backend_device
    if torch.float32 not in supported_dtypes(backend, device):
        pytest.skip(f"float32 is not tested on {backend}-{device}")
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, n, generator=gen) * 0.01 + 1e4
    assert_parity(
        lambda input: fused_attn.softmax(input, scale=scale, backend=backend),
        lambda input: reference.softmax(input, scale=scale),
        {"input": x.to(device)},
        grad_args=("input",),
    )


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["padding", "bool4d", "bias", "causal", "causal+padding"])
@pytest.mark.parametrize("scale", [1.0, 0.125])
def test_parity_masks(backend_device, dtype, kind, scale):
    """A float mask is added after the scale (softmax(input * scale + mask)): scale 0.125 tells the two apart."""
    gen = torch.Generator().manual_seed(1)
    mask = None
    if kind.endswith("padding"):
        mask = torch.rand(2, 1, 1, 33, generator=gen) > 0.3
        mask[..., 0] = True
    elif kind == "bool4d":
        mask = torch.rand(2, 3, 17, 33, generator=gen) > 0.5
    elif kind == "bias":
        mask = torch.randn(1, 3, 17, 33, generator=gen)
    _check(*backend_device, dtype, (2, 3, 17, 33), mask=mask, scale=scale, causal=kind.startswith("causal"),
           mask_grad=kind == "bias")


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("kind", ["padding", "causal", "bias"])
def test_parity_long_rows_stream_with_masks(backend_device, kind):
    """Rows wider than one block are streamed in chunks: with a mask, whole chunks are masked (a
    padding row keeping 100 columns; causal rows keeping i + 1; a row masked everywhere)."""
    n = 20000
    mask, causal = None, kind == "causal"
    gen = torch.Generator().manual_seed(2)
    if kind == "padding":
        mask = torch.zeros(3, n, dtype=torch.bool)
        mask[0, :100] = True
        mask[1, 5000:5100] = True  # chunks masked on both sides
        mask[1, -3:] = True
    elif kind == "bias":
        mask = torch.randn(3, n, generator=gen) * 2
        mask[0, 100:] = float("-inf")
    _check(*backend_device, torch.float32, (3, n), mask=mask, scale=0.5, causal=causal, mask_grad=kind == "bias")
    backend, device = backend_device
    if kind == "padding":  # a row masked everywhere gives 0, and 0 gradients
        x = torch.randn(2, n, device=device, requires_grad=True)
        y = fused_attn.softmax(x, mask=torch.zeros(2, n, dtype=torch.bool, device=device), backend=backend)
        y.sum().backward()
        assert (y == 0).all() and (x.grad == 0).all()


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("shape, dim", [((6, 9, 4), 1), ((6, 9, 4), 0), ((5,), 0), ((2, 2, 2, 3, 4, 5), -1)])
def test_parity_dims_and_ranks(backend_device, shape, dim):
    _check(*backend_device, torch.float32, shape, dim=dim)
    # A mask along the same dim (moved with the input): bool, and a float one with its gradient,
    # broadcast along another dim.
    gen = torch.Generator().manual_seed(4)
    keep = torch.rand(shape, generator=gen) > 0.3
    _check(*backend_device, torch.float32, shape, dim=dim, mask=keep, scale=0.5)
    bias = torch.randn((1,) + shape[1:] if len(shape) > 1 and dim != 0 else shape, generator=gen)
    _check(*backend_device, torch.float32, shape, dim=dim, mask=bias, scale=0.5, mask_grad=True)
    x = torch.randn(shape, device=backend_device[1])
    want = torch.softmax(x, dim)
    got = fused_attn.softmax(x, dim, backend=backend_device[0])
    assert got.stride() == want.stride()  # torch's layout: e.g. .view(-1) works on both


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rows_masked_by_finfo_min_stay_uniform(backend_device, dtype):
    # finfo.min is a bias, not -inf: as in PyTorch a row carrying it everywhere stays a softmax.
    mask = torch.randn(2, 3, 5, 9)
    mask[:, :, 1] = torch.finfo(dtype).min
    mask[:, :, 2, ::3] = torch.finfo(dtype).min
    _check(*backend_device, dtype, (2, 3, 5, 9), mask=mask)


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_float32_mask_gradient_on_16_bit_scores_is_float32(backend_device):
    """The mask's gradient y * (dy - sum(dy * y) / sum(y)) is formed in float32 from the 16-bit y
    and dy and kept so (as the attention's): a float32 mask (a learned bias) gets no 16-bit rounding
    of it."""
    backend, device = backend_device
    dtype = torch.float16
    if dtype not in supported_dtypes(backend, device):
        pytest.skip(f"{dtype} is not tested on {backend}-{device}")
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(3, 5, 37, generator=gen) * 2).to(device=device, dtype=dtype)
    mask = torch.randn(3, 5, 37, generator=gen).to(device).requires_grad_()
    dy = torch.randn(3, 5, 37, generator=gen).to(device=device, dtype=dtype)
    y = fused_attn.softmax(x, mask=mask, backend=backend)
    y.backward(dy)
    y32, dy32 = y.detach().float(), dy.float()
    expected = y32 * (dy32 - (y32 * dy32).sum(-1, keepdim=True) / y32.sum(-1, keepdim=True))
    assert mask.grad.dtype == torch.float32
    torch.testing.assert_close(mask.grad, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("mask_dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mask_shape", [(1, 1, 37), (6, 8, 1), ()], ids=str)
def test_16_bit_broadcast_mask_gradient_is_rounded_once(backend_device, mask_dtype, mask_shape):
    """A learned 16-bit mask broadcast over a float32 input: its gradient is the float32 scores'
    gradient summed over the broadcast dims and rounded once to the mask's dtype, as torch's
    softmax(x + mask) gives it (each term was rounded to 16 bits before the sum: a 0-d or per-row
    mask, whose true gradient is 0, got errors of 1e-3)."""
    backend, device = backend_device
    if torch.float32 not in supported_dtypes(backend, device):
        pytest.skip(f"float32 is not tested on {backend}-{device}")
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(6, 8, 37, generator=gen) * 2).to(device)
    mask = torch.randn(mask_shape, generator=gen).to(device=device, dtype=mask_dtype).requires_grad_()
    dy = torch.randn(6, 8, 37, generator=gen).to(device)
    y = fused_attn.softmax(x, mask=mask, backend=backend)
    y.backward(dy)
    y64, dy64 = y.detach().double(), dy.double()
    full = y64 * (dy64 - (y64 * dy64).sum(-1, keepdim=True))
    expected = full.sum_to_size(mask_shape).to(mask_dtype)
    assert mask.grad.dtype == mask_dtype
    torch.testing.assert_close(mask.grad, expected, rtol=torch.finfo(mask_dtype).eps, atol=1e-6)


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_fully_masked_rows_are_zero(backend_device):
    backend, device = backend_device
    x = torch.randn(4, 10, device=device, requires_grad=True)
    mask = torch.ones(4, 10, dtype=torch.bool, device=device)
    mask[2] = False
    y = fused_attn.softmax(x, mask=mask, backend=backend)
    assert (y[2] == 0).all() and torch.isfinite(y).all()
    y.sum().backward()
    assert (x.grad[2] == 0).all()


@pytest.mark.parametrize(
    "kwargs, error, fragment",
    [
        ({"dim": 2}, ValueError, "dim must be an int in [-2, 1]"),
        ({"mask": torch.ones(3, dtype=torch.bool)}, ValueError, "mask of shape [3] does not broadcast to input shape [4, 5]"),
        ({"mask": torch.ones(4, 5, dtype=torch.int64)}, TypeError, "mask must be a bool or floating tensor (float16, bfloat16, float32 or float64), got int64"),
        ({"scale": float("inf")}, ValueError, "scale must be a finite number"),
        ({"dim": 0, "is_causal": True}, ValueError, "is_causal=True needs dim to be the last dim"),
    ],
)
def test_bad_input(kwargs, error, fragment):
    with pytest.raises(error) as info:
        fused_attn.softmax(torch.randn(4, 5), **kwargs)
    assert fragment in str(info.value)


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_very_long_row_keeps_torch_accuracy(backend_device):
    # A row of 2^20: its normaliser and the backward's sum(dy * y) are long sums, whose float32
    # rounding would shift every probability and gradient alike. Normwise relative errors against
    # float64 stay within 3x of torch's own float32 softmax.
    backend, device = backend_device
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2**20, generator=gen, dtype=torch.float64) * 3
    dy = torch.randn(1, 2**20, generator=gen, dtype=torch.float64) + 5

    def run(fn, dtype):
        xi = x.to(device, dtype).requires_grad_(True)
        y = fn(xi)
        (dx,) = torch.autograd.grad(y, xi, dy.to(device, dtype))
        return y.detach().double().cpu(), dx.double().cpu()

    truth = run(lambda t: torch.softmax(t, -1), torch.float64)
    plain = run(lambda t: torch.softmax(t, -1), torch.float32)
    fused = run(lambda t: fused_attn.softmax(t, -1, backend=backend), torch.float32)
    for name, f, p, t in zip(("output", "grad"), fused, plain, truth):
        err = lambda v: float((v - t).abs().max() / t.abs().max())  # noqa: E731
        assert err(f) <= 3 * err(p) + 1e-7, (name, err(f), err(p))
