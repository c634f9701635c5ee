import pytest
import torch

import fused_attn
from fused_attn import reference
from fused_attn.ops.add_layer_norm import add_layer_norm_keep_mask

from .conftest import assert_float32_parameters_unrounded, assert_parity, backend_params, supported_dtypes

BACKENDS = backend_params("add_layer_norm", exclude=("reference",))
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _args(shape, dtype, device, *, affine=True, input_bias=True, seed=0, size=1.0):
    """``size`` scales the summands (input, residual, input bias), and with them the rows' spread."""
    gen = torch.Generator().manual_seed(seed)
    hidden = shape[-1]
    make = lambda *s, scale=1.0, shift=0.0: (torch.randn(*s, generator=gen) * scale + shift).to(device=device, dtype=dtype)  # noqa: E731
    return {
        "input": make(*shape, scale=size),
        "residual": make(*shape, scale=2.0 * size, shift=0.5 * size),
        "weight": make(hidden, scale=0.5, shift=1.0) if affine else None,
        "bias": make(hidden, scale=0.1) if affine else None,
        "input_bias": make(hidden, scale=0.1 * size) if input_bias else None,
    }


def _check(backend, device, dtype, shape, *, affine=True, input_bias=True, dropout_p=0.0, keep=None, prenorm=False,
           eps=1e-5, size=1.0):
    if dtype not in supported_dtypes(backend, device):
        pytest.skip(f"{dtype} is not tested on {backend}-{device}")
    args = _args(shape, dtype, device, affine=affine, input_bias=input_bias, size=size)
    grads = tuple(k for k, v in args.items() if v is not None)

    def fused(input, residual, weight, bias, input_bias):
        torch.manual_seed(7)
        out = fused_attn.add_layer_norm(input, residual, weight, bias, eps, dropout_p, input_bias,
                                        return_prenorm=prenorm, backend=backend)
        # With the pre-norm sum returned, both outputs feed the loss (pre-LN models use both).
        return out[0] + 0.5 * out[1] if prenorm else out

    def plain(input, residual, weight, bias, input_bias):
        out = reference.add_layer_norm(input, residual, weight, bias, eps, dropout_p, input_bias,
                                       return_prenorm=prenorm, dropout_mask=keep)
        return out[0] + 0.5 * out[1] if prenorm else out

    assert_parity(fused, plain, args, grad_args=grads)
    assert fused_attn.last_backend("add_layer_norm") == backend


@pytest.mark.parametrize("backend_device", BACKENDS + [("reference", "cpu")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("hidden", [256, 77, 5000])
@pytest.mark.parametrize("inference", [False, True], ids=["train", "inference"])
def test_float32_parameters_are_read_unrounded(backend_device, dtype, hidden, inference):
    """As LayerNorm's: float32 weight and bias with 16-bit activations are read unrounded, their
    gradients summed into float32 (the input bias, added before the norm, keeps the activations' dtype)."""
    backend, device = backend_device
    if dtype not in supported_dtypes(backend, device):
        pytest.skip(f"{dtype} is not tested on {backend}-{device}")
    gen = torch.Generator().manual_seed(1)
    inputs = {"input": torch.randn(48, hidden, generator=gen).to(device, dtype),
              "residual": (torch.randn(48, hidden, generator=gen) * 2 + 0.5).to(device, dtype)}

    def norm(input, residual, weight, bias):
        return fused_attn.add_layer_norm(input, residual, weight, bias, backend=backend)

    if inference:  # the no-grad form (its own kernel path) gives the training form's bits
        weight = (torch.randn(hidden, generator=gen) * 0.3 + 1).to(device).requires_grad_()
        bias = (torch.randn(hidden, generator=gen) * 0.3).to(device).requires_grad_()
        trained = norm(**inputs, weight=weight, bias=bias)
        with torch.no_grad():
            inferred = norm(**inputs, weight=weight, bias=bias)
        assert torch.equal(inferred, trained)
        with torch.no_grad():  # and the float32 parameters are not rounded on that path either
            rounded = norm(**inputs, weight=weight.to(dtype), bias=bias.to(dtype))
        assert not torch.equal(inferred, rounded)
    else:
        def plain(input, residual, weight, bias):  # the pre-norm sum is stored, so rounded, in dtype
            prenorm = (residual + input).to(dtype).to(input.dtype)
            return torch.nn.functional.layer_norm(prenorm, (hidden,), weight, bias)

        assert_float32_parameters_unrounded(norm, plain, inputs, hidden)
    assert fused_attn.last_backend("add_layer_norm") == backend


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [1, 77, 768, 1000, 5000])
def test_parity(backend_device, dtype, hidden):
    _check(*backend_device, dtype, (3, 7, hidden))


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parity_rows_wider_than_a_block(backend_device, dtype):
    # 40000 wide: the Triton forward streams the row (stores the pre-norm sum, reads it back twice).
    _check(*backend_device, dtype, (2, 40000), prenorm=True)


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_parity_many_rows(backend_device):
    # Parameter gradients summed over 1031 rows: several levels of the CPU kernel's cascaded
    # column sums (cpu_rows.h, ColumnSums), and a row count that divides nothing evenly.
    _check(*backend_device, torch.float32, (1031, 48), input_bias=True)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_parity_several_row_chunks(backend_device, dtype):
    # As LayerNorm's: 256 x 768 splits the CPU backward's rows into chunks, whose weight, bias and
    # input-bias partial sums are then added.
    _check(*backend_device, dtype, (256, 768), input_bias=True)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("eps", [1e-12, 1e-3])
def test_parity_eps_comparable_to_the_variance(backend_device, eps):
    # Rows of variance ~5e-5: eps 1e-3 dominates it, BERT's 1e-12 is negligible; either way the eps
    # given is the one used (every other test takes 1e-5).
    _check(*backend_device, torch.float32, (5, 96), eps=eps, size=3e-3)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("affine, input_bias", [(False, False), (True, False), (False, True)])
def test_parity_optional_parameters(backend_device, affine, input_bias):
    _check(*backend_device, torch.float32, (9, 64), affine=affine, input_bias=input_bias)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("hidden", [64, 5000])
def test_parity_with_prenorm_output(backend_device, hidden):
    _check(*backend_device, torch.float32, (6, hidden), prenorm=True)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("hidden", [96, 5000])
@pytest.mark.parametrize("prenorm", [False, True])
def test_dropout_matches_reference_with_kernel_mask(backend_device, hidden, prenorm):
    backend, device = backend_device
    torch.manual_seed(7)
    keep = add_layer_norm_keep_mask((4, 5, hidden), 0.3, device)
    _check(backend, device, torch.float32, (4, 5, hidden), dropout_p=0.3, keep=keep, prenorm=prenorm)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_fraction(backend_device, p):
    """The drop fraction of the backend's own keep-mask, read off the pre-norm sum of ones and a
    zero residual: keep / (1 - p)."""
    backend, device = backend_device
    torch.manual_seed(0)
    ones = torch.ones(64, 1024, device=device)
    _, prenorm = fused_attn.add_layer_norm(ones, torch.zeros_like(ones), ones[0], ones[0] * 0, 1e-5, p,
                                           return_prenorm=True, backend=backend)
    assert fused_attn.last_backend("add_layer_norm") == backend
    keep = prenorm != 0
    assert torch.equal(prenorm[keep], torch.full_like(prenorm[keep], 1.0) / torch.tensor(1 - p, dtype=torch.float32))
    assert abs((1 - keep.float().mean().item()) - p) < 0.01


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [96, 5001, 40000], ids=["one-block", "odd-wide", "streamed"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_inference_form_gives_the_same_bits(backend_device, dtype, hidden, dropout_p):
    # A call that needs no gradient and no pre-norm sum keeps no pre-norm tensor (the sum is formed in
    # the output, or in registers, and normalised in place); the output must not change, dropout draw
    # included. 40000 wide: the Triton forward streams the row through the output, the CUDA kernel
    # takes a block per row and re-reads the sum from the output row (5001: the same, element by
    # element, as an odd width takes no vector path).
    backend, device = backend_device
    if dtype not in supported_dtypes(backend, device):
        pytest.skip(f"{dtype} is not tested on {backend}-{device}")
    args = _args((3, hidden), dtype, device)
    grad_args = {k: v.clone().requires_grad_() for k, v in args.items()}

    def call(a):
        torch.manual_seed(11)
        return fused_attn.add_layer_norm(a["input"], a["residual"], a["weight"], a["bias"], 1e-5, dropout_p,
                                         a["input_bias"], backend=backend)

    with_grad = call(grad_args)
    assert with_grad.requires_grad
    with torch.no_grad():
        no_grad = call(grad_args)
    with torch.inference_mode():
        inference = call(args)
    for other in (no_grad, inference, call(args)):
        assert not other.requires_grad
        assert torch.equal(other, with_grad.detach())


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_inference_form_keeps_no_pre_norm_sum(backend_device):
    # Every allocation counted: without a gradient the call makes the output and the row statistics
    # (128 rows: each statistics tensor is 512 bytes, the CUDA allocator's granule, so the counts are
    # the same on a GPU), with one the pre-norm sum too.
    from fused_attn.bench.harness import peak_memory

    backend, device = backend_device
    if backend == "triton" and device == "cpu":
        pytest.skip("the Triton interpreter releases a launch's tensors at the next launch: the profiler's "
                    "count is not the call's own (on CUDA the allocator's is)")
    rows, hidden = 128, 256
    args = _args((rows, hidden), torch.float32, device, input_bias=False)
    grad_args = {k: None if v is None else v.clone().requires_grad_() for k, v in args.items()}

    def call(a):
        return fused_attn.add_layer_norm(a["input"], a["residual"], a["weight"], a["bias"], backend=backend)

    out_bytes, stats_bytes = rows * hidden * 4, 2 * rows * 4
    with torch.no_grad():
        call(args)
        assert peak_memory(lambda: call(args), torch.device(device)) == out_bytes + stats_bytes
    call(grad_args)  # what a first call sets up (autotuning on a GPU) is not the call's own memory
    assert peak_memory(lambda: call(grad_args), torch.device(device)) == 2 * out_bytes + stats_bytes


@pytest.mark.parametrize(
    "make_args, kwargs, error, fragment",
    [
        (lambda: (torch.randn(4, 8), torch.randn(4, 9), None, None), {}, ValueError, "residual shape [4, 9] does not match input shape [4, 8]"),
        (lambda: (torch.randn(4, 8), torch.ones(4, 8, dtype=torch.int64), None, None), {}, TypeError, "residual must be a floating tensor"),
        (lambda: (torch.randn(4, 8), torch.randn(4, 8), torch.randn(7), None), {}, ValueError, "weight must have shape [8]"),
        (lambda: (torch.randn(4, 8), torch.randn(4, 8), None, None), {"input_bias": torch.randn(3)}, ValueError, "input_bias must have shape [8]"),
        (lambda: (torch.randn(4, 8), torch.randn(4, 8), None, None), {"dropout_p": -0.5}, ValueError, "dropout_p must be a number in [0, 1]"),
        (lambda: (torch.randn(4, 8), torch.randn(4, 8), None, None), {"eps": -1.0}, ValueError, "eps must be a finite non-negative"),
        (lambda: (torch.randn(4, 8), torch.randn(4, 8), None, None), {"return_prenorm": "no"}, TypeError,
         "return_prenorm must be a Python bool, got 'no'"),
    ],
)
def test_bad_input(make_args, kwargs, error, fragment):
    with pytest.raises(error) as info:
        fused_attn.add_layer_norm(*make_args(), **kwargs)
    assert fragment in str(info.value)
