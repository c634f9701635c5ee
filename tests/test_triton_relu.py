"""The Triton FFN kernels' ReLU (``approximate="relu"``) at the kernel level
(fused_attn.kernels.triton.ffn): linear_gelu_fwd / linear_gelu_inference / linear_gelu_bwd against
float64 torch (torch.relu(F.linear(...)) and autograd) within the parity bound of the same
computation in the inputs' precision (tests/conftest.py assert_parity), and torch's semantics at
ReLU's kink (pre exactly 0, where the gradient is 0), NaN and infinities, exactly, in each stage the
FFN uses (the A prologue, the dGELU epilogue, the B prologue). The FFN through the public op, ReLU
included, is tests/test_ffn.py's. Float32 and float16 (the interpreter computes bfloat16 dots
wrongly).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fused_attn  # noqa: F401  (registers the ops)
from fused_attn._env import triton_interpret_mode

from .conftest import assert_parity

triton = pytest.importorskip("triton")

from fused_attn.kernels.triton import ffn as kernels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not triton_interpret_mode(),
                                reason="the Triton kernels run on the CPU under TRITON_INTERPRET=1")
DTYPES = [torch.float32, torch.float16]
# rows, in, out: tiles' partial edges (77, 40, 72 against 32 x 32 x 32
# under the interpreter), a single element, and K a multiple of every K tile (no K bounds).
SHAPES = [(77, 40, 72), (1, 1, 1), (64, 64, 64), (33, 70, 130)]
_ids = lambda s: "x".join(map(str, s))  # noqa: E731


def _randn(*shape, dtype, gen, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(device=DEVICE, dtype=dtype)


def _with_kinks(x: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Zeroes some rows of x and some bias entries (in place): those rows' pre-activation is the
    bias, exactly, in every precision: 0 at the zeroed entries (ReLU's kink, gradient 0) and
    negative or positive elsewhere."""
    x[::5] = 0
    if bias is not None:
        bias[::3] = 0


class _LinearRelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        out, pre = kernels.linear_gelu_fwd(x, weight, bias, "relu")
        # The inference form: the same bits, no pre-activation kept.
        assert torch.equal(out, kernels.linear_gelu_inference(x, weight, bias, "relu"))
        ctx.save_for_backward(x, weight, pre)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, pre = ctx.saved_tensors
        dx, dw, db = kernels.linear_gelu_bwd(grad_out.contiguous(), x, weight, pre, "relu", ctx.needs_input_grad)
        return dx, dw, db if ctx.needs_input_grad[2] else None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_linear_relu_parity(dtype, bias, shape):
    rows, in_features, out_features = shape
    gen = torch.Generator().manual_seed(0)
    args = {
        "input": _randn(rows, in_features, dtype=dtype, gen=gen),
        "weight": _randn(out_features, in_features, dtype=dtype, gen=gen, scale=in_features ** -0.5),
        "bias": _randn(out_features, dtype=dtype, gen=gen) if bias else None,
    }
    _with_kinks(args["input"], args["bias"])
    grad_args = ("input", "weight", "bias") if bias else ("input", "weight")
    assert_parity(
        lambda input, weight, bias: _LinearRelu.apply(input, weight, bias),
        lambda input, weight, bias: torch.relu(F.linear(input, weight, bias)),
        args, grad_args=grad_args,
    )


def _relu_backward(grad: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """torch's gradient of relu(pre) given grad: threshold_backward, 0 where pre <= 0, grad elsewhere."""
    pre = pre.detach().requires_grad_()
    torch.relu(pre).backward(grad)
    return pre.grad


def _exact(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want.to(got.dtype), rtol=0, atol=0, equal_nan=True)


# The interpreter's numpy warns at inf - inf in the GEMMs (row 3 below); a GPU computes it silently.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_relu_semantics_at_the_kink_nan_and_infinities(dtype):
    """Small integers, so that every sum is exact and the kernels must give torch's values bit for
    bit: relu(pre) is pre unless pre < 0 (NaN stays NaN), the gradient threshold_backward's select,
    0 where pre <= 0 (an infinite upstream gradient there included: no inf * 0) and grad elsewhere
    (NaN pre included), in the A prologue (linear_gelu_bwd), the dGELU epilogue and the B prologue."""
    gen = torch.Generator().manual_seed(2)
    rows, in_features, out_features = 37, 6, 45
    ints = lambda *shape: torch.randint(-2, 3, shape, generator=gen).to(DEVICE, dtype)  # noqa: E731
    x, w, b = ints(rows, in_features), ints(out_features, in_features), ints(out_features)
    b[7] = float("nan")
    out, pre = kernels.linear_gelu_fwd(x, w, b, "relu")
    want_pre = F.linear(x.double(), w.double(), b.double())
    assert bool((want_pre == 0).any()) and bool((want_pre < 0).any())
    _exact(pre, want_pre)
    _exact(out, torch.relu(want_pre))
    assert bool(out[:, 7].isnan().all())
    _exact(kernels.linear_gelu_inference(x, w, b, "relu"), torch.relu(want_pre))

    # The backward on a given pre-activation: exact zeros, negatives, NaN (which passes the
    # gradient); infinite upstream gradients only where pre <= 0 (a whole row of such pre in row 3).
    pre = ints(rows, out_features)
    pre[3] = -pre[3].abs()
    pre[5, 2] = pre[6, 4] = float("nan")
    grad = ints(rows, out_features)
    grad[3] = float("inf")
    grad[(pre == 0) & (torch.arange(out_features, device=DEVICE) % 2 == 0)] = float("-inf")
    grad[5, 2] = 2
    grad_pre = _relu_backward(grad.double(), pre.double())
    assert bool(torch.isfinite(grad_pre).all()) and grad_pre[5, 2] == 2 and bool((grad_pre[pre == 0] == 0).all())
    dx, dw, db = kernels.linear_gelu_bwd(grad, x, w, pre, "relu", [True, True, True])
    _exact(dx, grad_pre @ w.double())
    _exact(dw, grad_pre.t() @ x.double())
    _exact(db, grad_pre.sum(0))

    # The FFN backward's GEMMs: dPre = (g @ W2) relu'(pre) in the epilogue (row 3 of g @ W2 is
    # +-inf or NaN, all of it where pre <= 0), dW2 = dY^T relu(pre) with ReLU on B.
    g, w2 = ints(rows, in_features), ints(in_features, out_features)
    g[3] = float("inf")
    got = kernels.gemm(g, w2, torch.empty_like(pre), epilogue=kernels.EPILOGUE_DGELU, aux=pre, approximate="relu")
    h = g.double() @ w2.double()
    assert not bool(torch.isfinite(h[3]).any())
    _exact(got, _relu_backward(h, pre.double()))
    dy = ints(rows, in_features)
    dw2 = kernels.gemm(dy.t(), pre, torch.empty(in_features, out_features, device=DEVICE, dtype=dtype),
                       b_prologue=kernels.PROLOGUE_GELU, approximate="relu")
    _exact(dw2, dy.double().t() @ torch.relu(pre.double()))
    assert bool(dw2[:, 2].isnan().all()) and bool(dw2[:, 4].isnan().all())
    # A NaN pre-activation in the epilogue passes (g @ W2)'s value, as torch.
    assert got[5, 2] == h[5, 2] and got[6, 4] == h[6, 4]


@pytest.mark.parametrize("approximate", ["gelu", "exact", "", "RELU", None])
def test_unknown_activation_codes_are_refused(approximate):
    x, w = torch.randn(4, 8, device=DEVICE), torch.randn(5, 8, device=DEVICE)
    message = 'approximate must be "none", "tanh" or "relu"'
    with pytest.raises(ValueError, match=message):
        kernels.linear_gelu_fwd(x, w, None, approximate)
    with pytest.raises(ValueError, match=message):
        kernels.gemm(x, w.t(), torch.empty(4, 5, device=DEVICE), epilogue=kernels.EPILOGUE_BIAS_GELU,
                     approximate=approximate)
