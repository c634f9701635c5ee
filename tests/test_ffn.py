import functools
import math

import pytest
import torch

import fused_attn
from fused_attn import reference
from fused_attn.ops.ffn import ffn_keep_mask, linear_activation

from .conftest import assert_elementwise_parity, assert_parity, backend_params, supported_dtypes

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# ffn's (activation, approximate) pairs; the kernels' code of each is ACTIVATION_CODES'.
ACTIVATIONS = [("gelu", "none"), ("gelu", "tanh"), ("relu", "none")]
ACTIVATION_IDS = ["gelu", "gelu_tanh", "relu"]
LINEAR_GELU = backend_params("linear_gelu", exclude=("reference",))
FFN = backend_params("ffn", exclude=("reference",))


def _randn(*shape, dtype, device, gen, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)


def _skip_dtype(backend, device, dtype):
    if dtype not in supported_dtypes(backend, device):
        pytest.skip(f"{dtype} is not tested on {backend}-{device}")


@pytest.mark.parametrize("backend_device", LINEAR_GELU)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
# 4200 outputs: the CPU bias gradient visits rows of 8 KiB and more in groups (cpu_rows.h,
# backward_rows), narrower ones one at a time; 9 rows leave a partial group, 1031 rows run the
# narrow order's cascaded sums through several levels. In 64 x 128 -> 64 every GEMM's K (128, 64,
# 64 rows) is a multiple of every K tile (the Triton GEMM's loads then have no K bounds).
@pytest.mark.parametrize(
    "shape", [(1, 1, 1), (5, 7, 3), (64, 96, 80), (64, 128, 64), (33, 70, 130), (9, 16, 4200), (1031, 8, 24)],
    ids=lambda s: "x".join(map(str, s)))
def test_linear_gelu_parity(backend_device, dtype, approximate, shape):
    backend, device = backend_device
    _skip_dtype(backend, device, dtype)
    rows, in_features, out_features = shape
    gen = torch.Generator().manual_seed(0)
    args = {
        "input": _randn(rows, in_features, dtype=dtype, device=device, gen=gen),
        "weight": _randn(out_features, in_features, dtype=dtype, device=device, gen=gen, scale=in_features ** -0.5),
        "bias": _randn(out_features, dtype=dtype, device=device, gen=gen),
    }
    assert_parity(
        lambda input, weight, bias: fused_attn.linear_gelu(input, weight, bias, approximate, backend=backend),
        lambda input, weight, bias: reference.linear_gelu(input, weight, bias, approximate),
        args,
        grad_args=("input", "weight", "bias"),
    )
    assert fused_attn.last_backend("linear_gelu") == backend


@pytest.mark.parametrize("backend_device", LINEAR_GELU)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_linear_gelu_wide_pre_activation_range(backend_device, approximate):
    """Pre-activations from -40 to 40, where erf and the GELU's tails saturate (the CPU kernel
    caps exponents there, to stay clear of subnormal arithmetic), output and gradients."""
    backend, device = backend_device
    dtype = supported_dtypes(backend, device, "linear_gelu")[0]
    gen = torch.Generator().manual_seed(5)
    pre = torch.linspace(-40, 40, 96)
    args = {
        "input": torch.eye(96).to(device=device, dtype=dtype),
        "weight": (pre[:, None] * torch.ones(96) / 96 + torch.randn(96, 96, generator=gen) * 1e-3).to(device, dtype),
        "bias": (pre * (95 / 96)).to(device=device, dtype=dtype),
    }
    assert_parity(
        lambda input, weight, bias: fused_attn.linear_gelu(input, weight, bias, approximate, backend=backend),
        lambda input, weight, bias: reference.linear_gelu(input, weight, bias, approximate),
        args, grad_args=("input", "weight", "bias"),
    )


# Under the Triton interpreter numpy warns where the kernel meets inf (x^3 of the tanh GELU
# overflowing, inf * 0 in the GEMM); a GPU computes the same values silently.
@pytest.mark.parametrize("backend_device", LINEAR_GELU)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_linear_gelu_over_the_activation_range(backend_device, approximate):
    """GELU and its gradient on a dense grid of pre-activations from -10 to 10, the negative tail
    (where 1 + erf is small) included, within the parity bound of torch's own GELU."""
    backend, device = backend_device
    dtype = supported_dtypes(backend, device, "linear_gelu")[0]
    pre = torch.linspace(-10, 10, 4001)
    args = {"input": pre[:, None].to(device=device, dtype=dtype), "weight": torch.ones(1, 1, device=device, dtype=dtype)}
    assert_parity(
        lambda input, weight: fused_attn.linear_gelu(input, weight, None, approximate, backend=backend),
        lambda input, weight: reference.linear_gelu(input, weight, None, approximate),
        args, grad_args=("input",),
    )


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend_device", LINEAR_GELU)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_linear_gelu_gradient_at_huge_and_infinite_pre_activations(backend_device, approximate):
    """The gradient is the cdf (1 or 0) far out, not a capped exponential or tanh floor times a
    power of x, and NaN at +-inf as torch's."""
    backend, device = backend_device
    dtype = supported_dtypes(backend, device, "linear_gelu")[0]
    pre = torch.tensor([13.0, 50.0, 1e11, 1e18, 1e36, -13.0, -1e11, -1e36, float("inf"), float("-inf")])
    fused = _gelu_and_grad(lambda x: fused_attn.linear_gelu(x, torch.ones_like(x[:1]), None, approximate,
                                                            backend=backend), pre.to(device=device, dtype=dtype))
    plain = _gelu_and_grad(lambda x: reference.linear_gelu(x, torch.ones_like(x[:1]), None, approximate),
                           pre.to(device=device, dtype=dtype))
    # The truth without the reference's cancellation: its float64 1 + erf is 0 at -13, where the GELU
    # is -8e-38, a normal float32 that a kernel without flush-to-zero returns.
    truth = _true_gelu(pre.to(dtype), approximate)
    # Element by element: one bound for all, set by 1e36, would hold anything at the small ones.
    for name, got, plain_value, want in zip(("output", "grad input"), fused, plain, truth):
        assert_elementwise_parity(name, got, plain_value, want)


def _gelu_and_grad(gelu, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GELU of the column ``x`` and its derivative (a ones upstream gradient), both flat."""
    x = x[:, None].clone().requires_grad_()
    y = gelu(x)
    y.backward(torch.ones_like(y))
    return y.detach().flatten(), x.grad.flatten()


def _true_gelu(x: torch.Tensor, approximate: str) -> tuple[torch.Tensor, torch.Tensor]:
    """GELU and its derivative in float64 without cancellation in the negative tail (the usual
    ``1 + erf`` or ``1 + tanh`` in float64 rounds to 0 below about -8)."""
    x = x.double()
    if approximate == "none":
        cdf = 0.5 * torch.special.erfc(-x / math.sqrt(2))
        return x * cdf, cdf + x * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    c = math.sqrt(2 / math.pi)
    s = torch.sigmoid(2 * c * (x + 0.044715 * x**3))  # (1 + tanh(u)) / 2
    return x * s, s + x * s * (1 - s) * 2 * c * (1 + 3 * 0.044715 * x * x)


def _condition(x: torch.Tensor, f) -> torch.Tensor:
    """|x f'(x) / f(x)|, by a central difference in float64: how much a relative rounding of x (or
    of an intermediate linear in it) is magnified in f."""
    h = 1e-6 * x.abs()
    return (x * (f(x + h) - f(x - h)) / (2 * h) / f(x)).abs()


# The accuracy the README states for the negative tail, where torch's float32 GELU has no correct
# digit: the cpu exact GELU within a few ulps (normal_parts); the cuda one (erfcf of a rounded
# x / sqrt(2)), Triton's (the cpu kernels' erfc fit, its exponential's argument rounded on a GPU,
# and under the interpreter, whose fma rounds twice, without the low part of x^2) and the tanh
# approximation on every backend within a few roundings of their argument, magnified by the
# function's condition number there (about x^2 for the exact GELU, |2u| ~ x^3 for the tanh one).
@pytest.mark.parametrize("backend_device", LINEAR_GELU)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_negative_tail_keeps_its_digits(backend_device, approximate):
    backend, device = backend_device
    pre = torch.linspace(-10, -3, 701, dtype=torch.float32)
    got = _gelu_and_grad(lambda x: fused_attn.linear_gelu(x, torch.ones_like(x[:1]), None, approximate,
                                                          backend=backend), pre.to(device))
    eps = torch.finfo(torch.float32).eps
    x = pre.double()
    for i, name in enumerate(("output", "grad input")):
        want = _true_gelu(x, approximate)[i]
        rel = ((got[i].cpu().double() - want) / want).abs()
        if approximate == "none" and backend == "cpu":
            allowed = torch.full_like(rel, 8 * eps)
        else:
            allowed = 4 * eps * (1 + _condition(x, lambda t, i=i: _true_gelu(t, approximate)[i]))
        worst = int((rel / allowed).argmax())
        assert rel[worst] <= allowed[worst], (
            f"{name} at x={float(x[worst]):.4g}: relative error {float(rel[worst]):.3g} > {float(allowed[worst]):.3g}"
        )


@pytest.mark.parametrize("backend_device", LINEAR_GELU)
def test_exact_gelu_near_zero_as_accurate_as_torch(backend_device):
    """Where most pre-activations fall, |x| <= 1, the float32 exact GELU is not less accurate,
    value by value in ulps, than torch's own: within twice torch's worst error on the grid."""
    backend, device = backend_device
    if torch.float32 not in supported_dtypes(backend, device, "linear_gelu"):
        pytest.skip(f"{backend} has no float32 linear_gelu")
    pre = torch.linspace(-1, 1, 20001, dtype=torch.float32)
    pre = pre[pre != 0]
    got = fused_attn.linear_gelu(pre[:, None].to(device), torch.ones(1, 1, device=device), None, "none",
                                 backend=backend).flatten().cpu()
    plain = torch.nn.functional.gelu(pre)
    want = _true_gelu(pre, "none")[0]
    ulp = torch.nextafter(want.float().abs(), torch.tensor(math.inf)).double() - want.float().abs().double()
    fused_ulps, plain_ulps = ((v.double() - want).abs() / ulp for v in (got, plain))
    worst = int(fused_ulps.argmax())
    assert fused_ulps[worst] <= 2 * plain_ulps.max(), (
        f"GELU at x={float(pre[worst]):.6g}: {float(fused_ulps[worst]):.2f} ulps, torch's worst {float(plain_ulps.max()):.2f}"
    )


@pytest.mark.parametrize("backend_device", LINEAR_GELU)
def test_linear_gelu_leading_dims_and_no_bias(backend_device):
    backend, device = backend_device
    gen = torch.Generator().manual_seed(1)
    x = _randn(2, 3, 5, 24, dtype=torch.float32, device=device, gen=gen)
    w = _randn(40, 24, dtype=torch.float32, device=device, gen=gen, scale=0.2)
    assert_parity(
        lambda input, weight: fused_attn.linear_gelu(input, weight, backend=backend),
        lambda input, weight: reference.linear_gelu(input, weight),
        {"input": x, "weight": w},
        grad_args=("input", "weight"),
    )


@pytest.mark.parametrize("backend_device", FFN)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation, approximate", ACTIVATIONS, ids=ACTIVATION_IDS)
# 37 x 64 -> 128: whole K tiles in the forward's GEMMs and the input gradient's, partial in the weights'.
@pytest.mark.parametrize("shape", [(3, 8, 16), (40, 48, 96), (37, 50, 130), (37, 64, 128)],
                         ids=lambda s: "x".join(map(str, s)))
def test_ffn_parity(backend_device, dtype, activation, approximate, shape):
    backend, device = backend_device
    _skip_dtype(backend, device, dtype)
    rows, model, hidden = shape
    gen = torch.Generator().manual_seed(2)
    args = {
        "input": _randn(rows, model, dtype=dtype, device=device, gen=gen),
        "w1": _randn(hidden, model, dtype=dtype, device=device, gen=gen, scale=model ** -0.5),
        "b1": _randn(hidden, dtype=dtype, device=device, gen=gen),
        "w2": _randn(model, hidden, dtype=dtype, device=device, gen=gen, scale=hidden ** -0.5),
        "b2": _randn(model, dtype=dtype, device=device, gen=gen),
    }
    assert_parity(
        lambda input, w1, b1, w2, b2: fused_attn.ffn(input, w1, b1, w2, b2, approximate, activation=activation,
                                                     backend=backend),
        lambda input, w1, b1, w2, b2: reference.ffn(input, w1, b1, w2, b2, approximate, activation=activation),
        args,
        grad_args=("input", "w1", "b1", "w2", "b2"),
    )
    assert fused_attn.last_backend("ffn") == backend


@pytest.mark.parametrize("backend_device", LINEAR_GELU)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_relu_at_its_kink_and_beyond(backend_device, dtype):
    """ReLU as torch computes it, where it differs from a smooth activation: pre-activations exactly
    0 (gradient 0, as torch's threshold_backward), negative and positive ones, and NaN ones (kept in
    the output; the gradient passes them, threshold_backward zeroing only where pre <= 0), through
    linear_activation (the fused layers' first linear with an active inner dropout) and ffn; exact,
    the operands being small integers."""
    backend, device = backend_device
    _skip_dtype(backend, device, dtype)
    x = torch.tensor([[1.0, 2.0, -1.0], [0.0, 1.0, 1.0], [2.0, -2.0, 0.0], [1.0, 1.0, 1.0]])
    w1 = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, -1.0], [1.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [2.0, -1.0, 1.0]])
    b1 = torch.tensor([0.0, 0.0, -3.0, 1.0, 0.0])
    w2 = torch.tensor([[1.0, -1.0, 2.0, 1.0, 1.0], [0.0, 1.0, 1.0, -2.0, 1.0]])
    b2 = torch.tensor([0.5, -0.5])
    pre = torch.nn.functional.linear(x, w1, b1)
    assert (pre[:3] == 0).any(0)[:4].all() and (pre < 0).any() and (pre > 0).any()
    x[3, 0] = float("nan")  # row 3's pre-activations, and outputs, are NaN
    grad = torch.tensor([[1.0, -2.0], [0.5, 1.0], [-1.0, 3.0], [2.0, 2.0]])

    def run(fn, *tensors):
        leaves = [t.to(device=device, dtype=dtype, copy=True).requires_grad_() for t in tensors]
        out = fn(*leaves)
        g = grad if out.shape[-1] == 2 else torch.arange(out.numel(), dtype=torch.float32).view(out.shape) - 7
        out.backward(g.to(device=device, dtype=dtype))
        return [t.detach().cpu().double() for t in (out, *(leaf.grad for leaf in leaves))]

    def same(got, want, what):
        for i, (a, b) in enumerate(zip(got, want)):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}, tensor {i}: {m}")
        assert got[0][3].isnan().all() and not got[0][:3].isnan().any()

    same(run(lambda x, w, b: linear_activation(x, w, b, "relu", backend=backend), x, w1, b1),
         run(lambda x, w, b: torch.relu(torch.nn.functional.linear(x, w, b)), x, w1, b1), "linear_activation")
    assert fused_attn.last_backend("linear_gelu") == backend
    same(run(lambda *t: fused_attn.ffn(*t, activation="relu", backend=backend), x, w1, b1, w2, b2),
         run(lambda *t: reference.ffn(*t, activation="relu"), x, w1, b1, w2, b2), "ffn")
    assert fused_attn.last_backend("ffn") == backend


@pytest.mark.parametrize("backend_device", FFN)
def test_weights_stored_transposed(backend_device):
    """Weights stored [in_features, out_features] and passed transposed, as transformers' Conv1D
    stores them: the results of contiguous ones, forward and every gradient, on every backend. The
    CPU GEMMs read them in place: the backward saves views of the stored weights, never copies,
    whether the backend is named or the plain call's C++ entry serves the call."""
    from fused_attn import backends

    backend, device = backend_device
    dtype = supported_dtypes(backend, device, "ffn")[0]
    gen = torch.Generator().manual_seed(5)
    args = {
        "input": _randn(9, 16, dtype=dtype, device=device, gen=gen),
        "w1_stored": _randn(16, 24, dtype=dtype, device=device, gen=gen, scale=0.25),
        "b1": _randn(24, dtype=dtype, device=device, gen=gen),
        "w2_stored": _randn(24, 16, dtype=dtype, device=device, gen=gen, scale=0.2),
        "b2": _randn(16, dtype=dtype, device=device, gen=gen),
    }
    assert_parity(lambda input, w1_stored, b1, w2_stored, b2: fused_attn.ffn(
                      input, w1_stored.t(), b1, w2_stored.t(), b2, "tanh", backend=backend),
                  lambda input, w1_stored, b1, w2_stored, b2: reference.ffn(
                      input, w1_stored.t(), b1, w2_stored.t(), b2, "tanh"), args)
    linear = {k: args[k] for k in ("input", "w1_stored", "b1")}
    assert_parity(lambda input, w1_stored, b1: fused_attn.linear_gelu(input, w1_stored.t(), b1, backend=backend),
                  lambda input, w1_stored, b1: reference.linear_gelu(input, w1_stored.t(), b1), linear)
    with torch.no_grad():  # the inference forms
        x, w1, b1, w2, b2 = args.values()
        torch.testing.assert_close(fused_attn.ffn(x, w1.t(), b1, w2.t(), b2, backend=backend),
                                   fused_attn.ffn(x, w1.t().contiguous(), b1, w2.t().contiguous(), b2, backend=backend))
        torch.testing.assert_close(fused_attn.linear_gelu(x, w1.t(), b1, backend=backend),
                                   fused_attn.linear_gelu(x, w1.t().contiguous(), b1, backend=backend))
    if backend != "cpu":
        return
    leaves = {k: v.requires_grad_() for k, v in args.items()}
    stored = {leaves["w1_stored"].untyped_storage().data_ptr(), leaves["w2_stored"].untyped_storage().data_ptr()}
    served = backends._FAST.served()["ffn"] if backends.fast_entry("ffn") is not None else None
    for named in ("cpu", None, None):  # the plain call's C++ entry serves a shape from its second call
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            fused_attn.ffn(leaves["input"], leaves["w1_stored"].t(), leaves["b1"], leaves["w2_stored"].t(),
                           leaves["b2"], backend=named).sum().backward()
        weights = [t for t in saved if sorted(t.shape) == [16, 24]]
        assert len(weights) == 2 and {t.untyped_storage().data_ptr() for t in weights} == stored, named
    if served is not None:
        assert backends._FAST.served()["ffn"] > served


@pytest.mark.parametrize("backend_device", FFN)
@pytest.mark.parametrize("wanted", ["input", "w1", "b1", "w2", "b2", "input+w2", "w1+b1+w2+b2"])
def test_ffn_gradients_of_some_inputs(backend_device, wanted):
    """Frozen weights (an adapter, partial fine-tuning) or a frozen input: the gradients asked for,
    and none other."""
    backend, device = backend_device
    dtype = supported_dtypes(backend, device, "ffn")[0]
    gen = torch.Generator().manual_seed(3)
    args = {
        "input": _randn(9, 16, dtype=dtype, device=device, gen=gen),
        "w1": _randn(24, 16, dtype=dtype, device=device, gen=gen, scale=0.25),
        "b1": _randn(24, dtype=dtype, device=device, gen=gen),
        "w2": _randn(16, 24, dtype=dtype, device=device, gen=gen, scale=0.2),
        "b2": _randn(16, dtype=dtype, device=device, gen=gen),
    }
    wanted = tuple(wanted.split("+"))
    assert_parity(
        lambda input, w1, b1, w2, b2: fused_attn.ffn(input, w1, b1, w2, b2, backend=backend),
        lambda input, w1, b1, w2, b2: reference.ffn(input, w1, b1, w2, b2),
        args,
        grad_args=wanted,
    )


@pytest.mark.parametrize("backend_device", FFN)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b1", ["none", "frozen"])
def test_ffn_parity_without_a_first_bias_gradient(backend_device, dtype, b1):
    # No b1, or one that needs no gradient: on cuda the tanh GELU in 16 bits then takes cuBLASLt's
    # DGELU epilogue without its bias reduction (DGELU_BGRAD otherwise, in test_ffn_parity).
    backend, device = backend_device
    _skip_dtype(backend, device, dtype)
    args = _ffn_args(24, 16, 40, dtype, device, seed=5)
    if b1 == "none":
        args["b1"] = None
    grad_args = ("input", "w1", "w2", "b2")
    assert_parity(
        lambda input, w1, b1, w2, b2: fused_attn.ffn(input, w1, b1, w2, b2, "tanh", backend=backend),
        lambda input, w1, b1, w2, b2: reference.ffn(input, w1, b1, w2, b2, "tanh"),
        args,
        grad_args=grad_args,
    )


@pytest.mark.parametrize("backend_device", FFN)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_ffn_dropout_matches_reference_with_kernel_mask(backend_device, dtype, activation):
    backend, device = backend_device
    _skip_dtype(backend, device, dtype)
    gen = torch.Generator().manual_seed(3)
    rows, model, hidden, p = 48, 32, 64, 0.25
    args = {
        "input": _randn(2, rows // 2, model, dtype=dtype, device=device, gen=gen),
        "w1": _randn(hidden, model, dtype=dtype, device=device, gen=gen, scale=0.2),
        "b1": _randn(hidden, dtype=dtype, device=device, gen=gen),
        "w2": _randn(model, hidden, dtype=dtype, device=device, gen=gen, scale=0.2),
        "b2": _randn(model, dtype=dtype, device=device, gen=gen),
    }
    torch.manual_seed(11)
    keep = ffn_keep_mask(rows, model, p, device, backend).view(2, rows // 2, model)

    def fused(input, w1, b1, w2, b2):
        torch.manual_seed(11)
        return fused_attn.ffn(input, w1, b1, w2, b2, "none", p, activation=activation, backend=backend)

    assert_parity(
        fused,
        lambda input, w1, b1, w2, b2: reference.ffn(input, w1, b1, w2, b2, "none", p, activation=activation,
                                                    dropout_mask=keep),
        args,
        grad_args=("input", "w1", "b1", "w2", "b2"),
    )


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("backend_device", FFN)
def test_ffn_dropout_fraction(backend_device, p):
    backend, device = backend_device
    torch.manual_seed(0)
    keep = ffn_keep_mask(256, 256, p, device, backend)
    assert abs((1 - keep.float().mean().item()) - p) < 0.01


@pytest.mark.parametrize(
    "fn, make_args, error, fragment",
    [
        ("linear_gelu", lambda: (torch.randn(4, 8), torch.randn(5, 7)), ValueError, "weight must have shape [out_features, 8], got [5, 7]"),
        ("linear_gelu", lambda: (torch.randn(4, 8), torch.randn(5, 8), torch.randn(4)), ValueError, "bias must have shape [5], got [4]"),
        ("linear_gelu", lambda: (torch.randn(4, 8), torch.randn(5, 8, dtype=torch.float16)), TypeError, "weight dtype float16 does not match input dtype float32"),
        ("linear_gelu", lambda: (torch.randn(4, 8), torch.randn(5, 8), None, "fast"), ValueError, "approximate must be 'none' or 'tanh'"),
        ("linear_gelu", lambda: (torch.randn(4, 8), torch.randn(5, 8, device="meta")), ValueError, "weight is on meta but input is on cpu"),
        ("ffn", lambda: (torch.randn(4, 8), torch.randn(16, 8), None, torch.randn(8, 15), None), ValueError, "w2 must have shape [out_features, 16]"),
        ("ffn", lambda: (torch.randn(4, 8), torch.randn(16, 8), None, torch.randn(8, 16), None, "none", 1.5), ValueError, "dropout_p must be a number in [0, 1]"),
        ("linear_gelu", lambda: (torch.randn(4, 8), torch.randn(5, 8), None, "relu"), ValueError, "approximate must be 'none' or 'tanh', got 'relu'"),
        ("ffn", lambda: (torch.randn(4, 8), torch.randn(16, 8), None, torch.randn(8, 16), None, "relu"), ValueError, "approximate must be 'none' or 'tanh', got 'relu'"),
        ("ffn", lambda: ((torch.randn(4, 8), torch.randn(16, 8), None, torch.randn(8, 16), None), {"activation": "silu"}), ValueError, "activation must be 'gelu' or 'relu', got 'silu'"),
        ("ffn", lambda: ((torch.randn(4, 8), torch.randn(16, 8), None, torch.randn(8, 16), None, "tanh"), {"activation": "relu"}), ValueError, "with activation='relu' it must be 'none', got 'tanh'"),
    ],
)
def test_bad_input(fn, make_args, error, fragment):
    args = make_args()
    args, kwargs = args if isinstance(args[-1], dict) else (args, {})
    with pytest.raises(error) as info:
        getattr(fused_attn, fn)(*args, **kwargs)
    assert fragment in str(info.value)


@pytest.mark.parametrize("backend_device", backend_params("linear_gelu"))
def test_empty_rows(backend_device):
    backend, device = backend_device
    x = torch.randn(0, 8, device=device, requires_grad=True)
    w = torch.randn(4, 8, device=device, requires_grad=True)
    out = fused_attn.linear_gelu(x, w, backend=backend)
    assert out.shape == (0, 4)
    out.sum().backward()
    assert w.grad is not None and (w.grad == 0).all()


NATIVE = [b for b in backend_params("ffn") if b.values[0][0] in ("cpu", "cuda")]


@pytest.mark.parametrize("backend_device", FFN)
def test_raw_backward_ops_with_an_empty_inner_dim_give_the_bias_gradients(backend_device):
    """The custom ops themselves (the public functions send empty operands to the reference): with
    no input features (linear_gelu) or no hidden units (ffn) a GEMM has nothing to multiply, yet the
    bias gradient is still the column sum of the gradient it follows; the weight gradients are
    zeros of the weights' shapes."""
    backend, device = backend_device
    ops = torch.ops.fused_attn
    prefix = "triton_" if backend == "triton" else ""
    gen = torch.Generator().manual_seed(0)
    grad, pre = (torch.randn(5, 3, generator=gen).to(device) for _ in range(2))
    x, w = torch.randn(5, 0, device=device), torch.randn(3, 0, device=device)
    dx, dw, db = getattr(ops, prefix + "linear_gelu_bwd")(grad, x, w, pre, "none", [True, True, True])
    pre64 = pre.double().requires_grad_()
    torch.nn.functional.gelu(pre64).backward(grad.double())
    torch.testing.assert_close(db.double(), pre64.grad.sum(0), rtol=1e-6, atol=1e-6)
    assert dx.shape == (5, 0) and dw.shape == (3, 0)

    grad_out, x = torch.randn(5, 4, generator=gen).to(device), torch.randn(5, 3, generator=gen).to(device)
    w1, w2, pre = torch.randn(0, 3, device=device), torch.randn(4, 0, device=device), torch.randn(5, 0, device=device)
    dx, dw1, db1, dw2, db2 = getattr(ops, prefix + "ffn_bwd")(grad_out, x, w1, w2, pre, "none", 0.0, None, [True] * 5)
    torch.testing.assert_close(db2.double(), grad_out.double().sum(0), rtol=1e-6, atol=1e-6)
    assert torch.equal(dx, torch.zeros_like(x))
    assert dw1.shape == (0, 3) and db1.shape == (0,) and dw2.shape == (4, 0)


@pytest.mark.parametrize("backend_device", NATIVE)
@pytest.mark.parametrize("op", ["linear_gelu", "ffn"])
def test_backward_makes_no_zero_gradient_for_the_saved_pre_activation(op, backend_device):
    """The pre-activation is an output of the custom op only to be saved: autograd must not
    allocate a [rows, hidden] zero gradient for it in backward (that would be a whole extra
    activation-sized buffer at the backward's peak)."""
    from fused_attn.bench.harness import MemoryMeter

    backend, device = backend_device
    rows, model, hidden = 256, 128, 512

    def step():
        x = torch.randn(rows, model, device=device, requires_grad=True)
        w1 = torch.randn(hidden, model, device=device, requires_grad=True)
        w2 = torch.randn(model, hidden, device=device, requires_grad=True)
        b1, b2 = (torch.randn(n, device=device, requires_grad=True) for n in (hidden, model))
        if op == "linear_gelu":
            out = fused_attn.linear_gelu(x, w1, b1, backend=backend)
        else:
            out = fused_attn.ffn(x, w1, b1, w2, b2, backend=backend)
        return out, torch.randn_like(out), (x, w1, b1, w2, b2)

    out, grad, _ = step()
    out.backward(grad)  # what a first call sets up (a GEMM library's workspace) is not the call's own
    out, grad, (x, w1, b1, w2, b2) = step()
    with MemoryMeter(device) as meter:
        out.backward(grad)
    activation = rows * hidden * 4
    grads = sum(t.numel() * 4 for t in (x, w1, b1, w2, b2) if t.grad is not None)
    # One activation-sized temporary: grad_pre (in ffn written over the hidden gradient, which it
    # owns); a zero gradient for the pre-activation, or a separate grad_pre, would be a second.
    budget = grads + activation + activation // 2
    assert meter.peak_bytes < budget, (meter.peak_bytes, budget)


@pytest.mark.parametrize("backend_device", NATIVE)
def test_scratch_backward_equals_linear_gelu_bwd_and_consumes_grad_out(backend_device):
    """linear_gelu_bwd_scratch (what ffn's backward calls on its own hidden gradient) gives the
    bits of linear_gelu_bwd, and its schema declares that it writes grad_out."""
    _, device = backend_device
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(37, 24, generator=gen).to(device), torch.randn(40, 24, generator=gen).to(device)
    _, pre = torch.ops.fused_attn.linear_gelu_fwd(x, w, None, "tanh")
    grad = torch.randn(37, 40, generator=gen).to(device)
    want = torch.ops.fused_attn.linear_gelu_bwd(grad, x, w, pre, "tanh", [True, True, True])
    scratch = grad.clone()
    got = torch.ops.fused_attn.linear_gelu_bwd_scratch(scratch, x, w, pre, "tanh", [True, True, True])
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert not torch.equal(scratch, grad)  # overwritten with grad_pre
    torch.library.opcheck(torch.ops.fused_attn.linear_gelu_bwd_scratch.default,
                          (grad.clone(), x, w, pre, "tanh", [True, True, True]), test_utils="test_schema")


@pytest.mark.parametrize("backend_device", [b for b in FFN if b.values[0] == ("cuda", "cuda")])
def test_cuda_ffn_backward_takes_the_dgelu_epilogue_where_it_applies(backend_device):
    """With the tanh GELU in 16 bits (hidden % 8 == 0) the hidden gradient's GEMM applies gelu' and
    reduces b1's gradient in cuBLASLt's DGELU_BGRAD epilogue: the package's own gelu-backward kernel
    does not run. With the exact GELU, which cuBLASLt lacks, it does."""
    from torch.profiler import ProfilerActivity, profile

    def gelu_bwd_launches(approximate):
        args = {k: v.clone().requires_grad_() for k, v in _ffn_args(64, 32, 128, torch.float16, "cuda").items()}
        out = fused_attn.ffn(**args, approximate=approximate, backend="cuda")
        grad = torch.randn_like(out)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            out.backward(grad)
            torch.cuda.synchronize()
        names = [e.name for e in prof.events()]
        if not names:
            pytest.skip("the profiler records no CUDA kernels here")
        return sum("gelu_bwd_kernel" in name for name in names)

    assert gelu_bwd_launches("none") > 0
    assert gelu_bwd_launches("tanh") == 0


def _ffn_args(rows, model, hidden, dtype, device, *, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        "input": _randn(rows, model, dtype=dtype, device=device, gen=gen),
        "w1": _randn(hidden, model, dtype=dtype, device=device, gen=gen, scale=model ** -0.5),
        "b1": _randn(hidden, dtype=dtype, device=device, gen=gen) if bias else None,
        "w2": _randn(model, hidden, dtype=dtype, device=device, gen=gen, scale=hidden ** -0.5),
        "b2": _randn(model, dtype=dtype, device=device, gen=gen) if bias else None,
    }


def _linear_gelu_of(args):
    return {"input": args["input"], "weight": args["w1"], "bias": args["b1"]}


@pytest.mark.parametrize("backend_device", FFN)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation, approximate", ACTIVATIONS, ids=ACTIVATION_IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_inference_form_gives_the_same_bits(backend_device, dtype, activation, approximate, bias):
    # A call that needs no gradient keeps no pre-activation; its output must not change with that.
    backend, device = backend_device
    _skip_dtype(backend, device, dtype)
    # On a GPU, K of several tiles: Triton's autotuner picks among tile configs whose summation orders
    # differ, so the two forms must share the tuning.
    args = _ffn_args(*((37, 24, 72) if device == "cpu" else (300, 512, 1024)), dtype, device, bias=bias)
    grad_args = {k: None if v is None else v.clone().requires_grad_() for k, v in args.items()}
    code = "relu" if activation == "relu" else approximate
    first = functools.partial(linear_activation, code=code)
    first.__name__ = "linear_activation"
    second = functools.partial(fused_attn.ffn, approximate=approximate, activation=activation)
    second.__name__ = "ffn"
    for op, pick in ((first, _linear_gelu_of), (second, dict)):
        with_grad = op(**pick(grad_args), backend=backend)
        assert with_grad.requires_grad
        with torch.no_grad():
            no_grad = op(**pick(grad_args), backend=backend)
        with torch.inference_mode():
            inference = op(**pick(args), backend=backend)
        plain = op(**pick(args), backend=backend)  # nothing requires grad
        for other in (no_grad, inference, plain):
            assert not other.requires_grad
            assert torch.equal(other, with_grad.detach()), f"{op.__name__}: the inference form differs"


@pytest.mark.parametrize("backend_device", FFN)
def test_inference_form_keeps_no_pre_activation(backend_device):
    # Every allocation of the call counted: the inference form makes the output alone (linear_gelu)
    # or the hidden activation and the output (ffn), where the forward of a call that needs a
    # gradient also keeps the pre-activation for its backward.
    from fused_attn.bench.harness import peak_memory

    backend, device = backend_device
    if backend == "triton" and device == "cpu":
        pytest.skip("the Triton interpreter releases a launch's tensors at the next launch: the profiler's "
                    "count is not the call's own (on CUDA the allocator's is)")
    rows, model, hidden = 64, 32, 256
    args = _ffn_args(rows, model, hidden, torch.float32, device)
    grad_args = {k: v.clone().requires_grad_() for k, v in args.items()}
    hidden_bytes, out_bytes = rows * hidden * 4, rows * model * 4
    for op, pick, inference_bytes in ((fused_attn.linear_gelu, _linear_gelu_of, hidden_bytes),
                                      (fused_attn.ffn, dict, hidden_bytes + out_bytes)):
        # Each form called once first: what a first call sets up (a library's workspace, autotuning
        # on a GPU) is not the call's own memory.
        with torch.no_grad():
            op(**pick(args), backend=backend)
            assert peak_memory(lambda: op(**pick(args), backend=backend), torch.device(device)) == inference_bytes
        op(**pick(grad_args), backend=backend)
        training = peak_memory(lambda: op(**pick(grad_args), backend=backend), torch.device(device))
        assert training >= inference_bytes + hidden_bytes


def test_inference_op_has_no_gradient():
    if not fused_attn._extension.has_kernel("linear_gelu_fwd", "cpu"):
        pytest.skip("the extension's cpu kernels are not built")
    x = torch.randn(3, 4, requires_grad=True)
    out = torch.ops.fused_attn.linear_gelu_inference(x, torch.randn(5, 4), None, "none")
    with pytest.raises(RuntimeError, match="linear_gelu_inference"):
        out.sum().backward()


def test_triton_dgelu_epilogue_rejects_what_it_would_misread():
    pytest.importorskip("triton")
    from fused_attn.kernels.triton import ffn as kernels

    a, b = torch.randn(8, 16), torch.randn(16, 24)
    out = torch.empty(8, 24)
    with pytest.raises(ValueError, match="aux must have out's shape and strides"):
        kernels.gemm(a, b, out, epilogue=kernels.EPILOGUE_DGELU, aux=torch.randn(24, 8).t())
    with pytest.raises(ValueError, match="takes no bias"):
        kernels.gemm(a, b, out, epilogue=kernels.EPILOGUE_DGELU, aux=torch.randn(8, 24), bias=torch.randn(24))


CPU_FFN = [b for b in FFN if b.values[0] == ("cpu", "cpu")]


@pytest.mark.parametrize("backend_device", CPU_FFN)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_cpu_ffn_backward_in_row_slabs(backend_device, dtype, dropout_p):
    """The CPU backward forms the hidden gradient and sums dW2 slab by slab of rows (at 8192 hidden
    units, slabs of 256 rows: 600 rows make three, the last partial): output and every gradient
    against the reference, the dropout given by the kernel's own keep-mask."""
    backend, device = backend_device
    rows, model, hidden = 600, 16, 8192
    args = _ffn_args(rows, model, hidden, dtype, device, seed=3)
    torch.manual_seed(11)
    keep = ffn_keep_mask(rows, model, dropout_p, device, backend)

    def fused(input, w1, b1, w2, b2):
        torch.manual_seed(11)  # the draw ffn_keep_mask replayed
        return fused_attn.ffn(input, w1, b1, w2, b2, dropout_p=dropout_p, backend=backend)

    def plain(input, w1, b1, w2, b2):
        out = reference.ffn(input, w1, b1, w2, b2)
        return out * keep.to(out.dtype) / (1 - dropout_p)

    assert_parity(fused, plain, args, grad_args=("input", "w1", "b1", "w2", "b2"))


@pytest.mark.parametrize("backend_device", CPU_FFN)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", ["linear_gelu", "ffn"])
def test_cpu_backward_that_frees_the_graph_gives_the_bits_of_one_that_keeps_it(backend_device, dtype, op):
    """A backward that frees its graph writes the pre-activation's gradient over the saved
    pre-activation (linear_gelu_bwd_consuming, ffn_bwd_consuming); one with retain_graph=True leaves
    it intact (a second backward gives the same gradients). All three give the same bits."""
    backend, device = backend_device
    a = _ffn_args(*((600, 16, 8192) if op == "ffn" else (300, 24, 1000)), dtype, device, seed=4)
    args = {k: v.requires_grad_() for k, v in (a if op == "ffn" else _linear_gelu_of(a)).items()}
    params = list(args.values())
    out = getattr(fused_attn, op)(**args, approximate="tanh", backend=backend)
    grad = torch.randn_like(out)
    kept = torch.autograd.grad(out, params, grad, retain_graph=True)
    again = torch.autograd.grad(out, params, grad, retain_graph=True)
    freed = torch.autograd.grad(out, params, grad)
    for k, g, f in zip(kept, again, freed):
        assert torch.equal(k, g) and torch.equal(k, f)


def test_consuming_backward_equals_ffn_bwd_and_declares_that_it_writes_the_pre_activation():
    if not fused_attn._extension.has_kernel("ffn_fwd", "cpu"):
        pytest.skip("the extension's cpu kernels are not built")
    a = _ffn_args(37, 24, 40, torch.float32, "cpu", seed=6)
    _, pre = torch.ops.fused_attn.ffn_fwd(a["input"], a["w1"], a["b1"], a["w2"], a["b2"], "tanh", 0.0, None)
    grad = torch.randn(37, 24)
    call = (a["input"], a["w1"], a["w2"])
    want = torch.ops.fused_attn.ffn_bwd(grad, *call, pre, "tanh", 0.0, None, [True] * 5)
    scratch = pre.clone()
    got = torch.ops.fused_attn.ffn_bwd_consuming(grad, *call, scratch, "tanh", 0.0, None, [True] * 5)
    assert all(torch.equal(x, y) for x, y in zip(got, want))
    assert not torch.equal(scratch, pre)  # overwritten with the pre-activation's gradient
    torch.library.opcheck(torch.ops.fused_attn.ffn_bwd_consuming.default,
                          (grad, *call, pre.clone(), "tanh", 0.0, None, [True] * 5))


def test_cpu_ffn_backward_leaves_a_pre_activation_someone_holds():
    """The op's second output is the saved pre-activation: a caller that keeps it (the raw op) finds
    it unchanged after the backward, which then forms the gradient in a buffer of its own."""
    if not fused_attn._extension.has_kernel("ffn_fwd", "cpu"):
        pytest.skip("the extension's cpu kernels are not built")
    args = {k: v.requires_grad_() for k, v in _ffn_args(300, 16, 8192, torch.float32, "cpu", seed=5).items()}
    out, pre = torch.ops.fused_attn.ffn_fwd(args["input"], args["w1"], args["b1"], args["w2"], args["b2"], "none",
                                            0.0, None)
    before = pre.detach().clone()
    out.backward(torch.randn_like(out))
    assert torch.equal(pre.detach(), before)
    want = torch.nn.functional.linear(args["input"], args["w1"], args["b1"]).detach()
    assert torch.equal(before, want)


@pytest.mark.parametrize("backend_device", CPU_FFN)
@pytest.mark.parametrize("op", ["linear_gelu", "ffn"])
def test_cpu_backward_holds_no_second_hidden_sized_tensor(backend_device, op):
    """A backward that frees its graph allocates no [rows, hidden] tensor: the pre-activation's
    gradient takes the saved pre-activation's memory, and in ffn the hidden gradient and the
    recomputed activation exist a slab of rows at a time. (Eager PyTorch's GELU backward allocates
    its gradient; before it, the FFN's holds the activation and its gradient too.) With
    retain_graph=True, the gradient takes a buffer of its own."""
    from fused_attn.bench.harness import MemoryMeter

    backend, device = backend_device
    rows, model, hidden = (2048, 32, 4096) if op == "ffn" else (1024, 32, 2048)  # ffn: slabs of 512 rows
    activation = rows * hidden * 4

    def backward_peak(retain_graph):
        a = _ffn_args(rows, model, hidden, torch.float32, device)
        args = {k: v.requires_grad_() for k, v in (a if op == "ffn" else _linear_gelu_of(a)).items()}
        out = getattr(fused_attn, op)(**args, backend=backend)
        grad = torch.randn_like(out)
        with MemoryMeter(torch.device(device)) as meter:
            grads = torch.autograd.grad(out, list(args.values()), grad, retain_graph=retain_graph)
        return meter.peak_bytes - sum(g.numel() * 4 for g in grads)

    backward_peak(False)  # what a first call sets up (a BLAS workspace) is not the call's own
    assert backward_peak(False) < activation // 2
    assert backward_peak(True) > activation


def test_consuming_linear_gelu_backward_equals_linear_gelu_bwd_and_leaves_a_held_pre_activation():
    if not fused_attn._extension.has_kernel("linear_gelu_fwd", "cpu"):
        pytest.skip("the extension's cpu kernels are not built")
    a = _ffn_args(37, 24, 40, torch.float32, "cpu", seed=8)
    x, w, b = a["input"], a["w1"], a["b1"]
    _, pre = torch.ops.fused_attn.linear_gelu_fwd(x, w, b, "tanh")
    grad = torch.randn(37, 40)
    want = torch.ops.fused_attn.linear_gelu_bwd(grad, x, w, pre, "tanh", [True] * 3)
    scratch = pre.clone()
    got = torch.ops.fused_attn.linear_gelu_bwd_consuming(grad, x, w, scratch, "tanh", [True] * 3)
    assert all(torch.equal(p, q) for p, q in zip(got, want))
    assert not torch.equal(scratch, pre)  # overwritten with grad_pre
    torch.library.opcheck(torch.ops.fused_attn.linear_gelu_bwd_consuming.default,
                          (grad, x, w, pre.clone(), "tanh", [True] * 3))
    # Through autograd, with the op's second output held by the caller: left as it was.
    args = [t.clone().requires_grad_() for t in (x, w, b)]
    out, held = torch.ops.fused_attn.linear_gelu_fwd(*args, "tanh")
    before = held.detach().clone()
    out.backward(grad)
    assert torch.equal(held.detach(), before)


def _raw_forward(op, a):
    if op == "ffn":
        return torch.ops.fused_attn.ffn_fwd(a["input"], a["w1"], a["b1"], a["w2"], a["b2"], "none", 0.0, None)
    return torch.ops.fused_attn.linear_gelu_fwd(a["input"], a["w1"], a["b1"], "none")


def _public_forward(op, a):
    if op == "ffn":
        return fused_attn.ffn(**a, backend="cpu")
    return fused_attn.linear_gelu(**_linear_gelu_of(a), backend="cpu")


@pytest.mark.parametrize("op", ["linear_gelu", "ffn"])
def test_cpu_backward_leaves_saved_pre_activations_a_hook_keeps(op):
    """Under saved-tensor hooks the pre-activation goes to the pack hook, which may keep it (identity
    hooks, save_on_cpu): the backward then forms the gradient in a buffer of its own, leaving what the
    hook kept, and what a caller of the raw op holds, as it was."""
    if not fused_attn._extension.has_kernel("ffn_fwd", "cpu"):
        pytest.skip("the extension's cpu kernels are not built")
    kept = []

    def pack(t):
        kept.append((t, t.detach().clone()))
        return t

    for hooks in (lambda: torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
                  lambda: torch.autograd.graph.save_on_cpu(pin_memory=False)):
        a = {k: v.requires_grad_() for k, v in _ffn_args(64, 16, 96, torch.float32, "cpu", seed=9).items()}
        with hooks():
            out, pre = _raw_forward(op, a)
        before = pre.detach().clone()
        out.backward(torch.ones_like(out))
        assert torch.equal(pre.detach(), before)
        with hooks():
            out = _public_forward(op, a)
        out.backward(torch.ones_like(out))
    assert kept and all(torch.equal(t.detach(), copy) for t, copy in kept)


@pytest.mark.parametrize("op", ["linear_gelu", "ffn"])
def test_cpu_backward_leaves_a_held_pre_activation_under_compiled_autograd(op):
    """Compiled autograd runs the C++ backward as an opaque call, holding the saved tensors otherwise:
    a raw caller's pre-activation (or a view of it) stays as it was over repeated, cached calls."""
    if not fused_attn._extension.has_kernel("ffn_fwd", "cpu"):
        pytest.skip("the extension's cpu kernels are not built")
    compiled_autograd = pytest.importorskip("torch._dynamo.compiled_autograd")
    if not hasattr(compiled_autograd, "_enable"):
        pytest.skip("this torch has no compiled_autograd._enable")
    torch._dynamo.reset()
    compiler = torch.compile(backend="eager")
    for _ in range(3):
        a = {k: v.requires_grad_() for k, v in _ffn_args(64, 16, 96, torch.float32, "cpu", seed=10).items()}
        out, pre = _raw_forward(op, a)
        view = pre.detach()[:8]
        before = pre.detach().clone()
        with compiled_autograd._enable(compiler):
            out.backward(torch.ones_like(out))
        assert torch.equal(pre.detach(), before)
        del pre
        out, pre = _raw_forward(op, a)
        view = pre[:8]
        del pre
        view_before = view.detach().clone()
        with compiled_autograd._enable(compiler):
            out.backward(torch.ones_like(out))
        assert torch.equal(view.detach(), view_before)
    torch._dynamo.reset()


@pytest.mark.parametrize("op", ["linear_gelu_bwd_consuming", "ffn_bwd_consuming", "linear_gelu_bwd_scratch"])
def test_ops_that_write_an_argument_bump_its_version(op):
    """A tensor another node saved, overwritten by a raw call of an op that writes it, raises at that
    node's backward instead of giving a wrong gradient."""
    if not fused_attn._extension.has_kernel("ffn_fwd", "cpu"):
        pytest.skip("the extension's cpu kernels are not built")
    a = _ffn_args(8, 4, 12, torch.float32, "cpu", seed=12)
    x, w1, w2 = a["input"], a["w1"], a["w2"]
    _, pre = torch.ops.fused_attn.ffn_fwd(x, w1, None, w2, None, "none", 0.0, None)
    leaf = torch.randn(8, 12, requires_grad=True)
    written = pre.clone() if op != "linear_gelu_bwd_scratch" else torch.randn(8, 12)
    saved_by_mul = leaf * written  # mul saves `written` for its backward
    version = written._version
    if op == "ffn_bwd_consuming":
        torch.ops.fused_attn.ffn_bwd_consuming(torch.randn(8, 4), x, w1, w2, written, "none", 0.0, None, [True] * 5)
    elif op == "linear_gelu_bwd_consuming":
        torch.ops.fused_attn.linear_gelu_bwd_consuming(torch.randn(8, 12), x, w1, written, "none", [True] * 3)
    else:
        torch.ops.fused_attn.linear_gelu_bwd_scratch(written, x, w1, pre, "none", [True] * 3)
    assert written._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved_by_mul.sum().backward()
