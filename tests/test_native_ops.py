"""The extension's ops called directly (``torch.ops.fused_attn.*``), as a user composing them or a
graph compiler does: malformed arguments raise a message naming the argument, never a silently
wrong result; an output computed in place over an argument refuses an argument it would clobber;
and the fake kernels (which also serve a meta tensor among real ones) refuse what the kernels
refuse about devices and describe the kernels' outputs stride for stride.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fused_attn  # noqa: F401  (registers the fake kernels and loads the extension)
from fused_attn import _extension

pytestmark = pytest.mark.skipif(not _extension.loaded(), reason="the extension is not built")
ops = torch.ops.fused_attn
SEED = torch.tensor([7])


def _ffn_args(rows=6, d_in=8, hidden=12, d_out=5):
    gen = torch.Generator().manual_seed(0)
    make = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    return make(rows, d_in), make(hidden, d_in), make(hidden), make(d_out, hidden), make(d_out)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan"), float("inf")])
def test_ffn_ops_refuse_dropout_outside_unit_interval(p):
    x, w1, b1, w2, b2 = _ffn_args()
    with pytest.raises(RuntimeError, match=r"dropout_p must be in \[0, 1\)"):
        ops.ffn_fwd(x, w1, b1, w2, b2, "none", p, SEED)
    _, pre = ops.ffn_fwd(x, w1, b1, w2, b2, "none", 0.0, None)
    grad = torch.randn(6, 5)
    for bwd in (ops.ffn_bwd, ops.ffn_bwd_consuming):
        with pytest.raises(RuntimeError, match=r"dropout_p must be in \[0, 1\)"):
            bwd(grad, x, w1, w2, pre.clone(), "none", p, SEED, [True] * 5)


@pytest.mark.parametrize("w2_shape, b2_shape, dtype, message", [
    ((12,), (5,), torch.float32, r"w2 must have shape \[out_features, 12\]"),
    ((5, 11), (5,), torch.float32, r"w2 must have shape \[out_features, 12\]"),
    ((5, 12), (1,), torch.float32, r"b2 must have shape \[5\] \(out_features of w2\)"),
    ((5, 12), (1, 5), torch.float32, r"b2 must have shape \[5\] \(out_features of w2\)"),
    ((5, 12), (), torch.float32, r"b2 must have shape \[5\] \(out_features of w2\)"),
    ((5, 12), (6, 5), torch.float32, r"b2 must have shape \[5\] \(out_features of w2\)"),
    ((5, 12), (5,), torch.float64, "b2 must have dtype Float"),
])
@pytest.mark.parametrize("op", ["ffn_fwd", "ffn_inference"])
def test_ffn_ops_check_the_second_linear(op, w2_shape, b2_shape, dtype, message):
    """w2 and b2 were handed to the GEMM unchecked: a 1-D w2 gave a [rows] output, a b2 of the
    wrong shape was broadcast, and on a CPU without 16-bit GEMMs any dtype was widened."""
    x, w1, b1, _, _ = _ffn_args()
    w2, b2 = torch.randn(w2_shape), torch.randn(b2_shape, dtype=dtype)
    extra = ("none", 0.0, None) if op == "ffn_fwd" else ("none",)
    with pytest.raises(RuntimeError, match=message):
        getattr(ops, op)(x, w1, b1, w2, b2, *extra)
    with pytest.raises(RuntimeError, match="w2 must have dtype BFloat16"):
        getattr(ops, op)(x.bfloat16(), w1.bfloat16(), b1.bfloat16(), torch.randn(5, 12), None, *extra)


def test_ffn_bwd_names_a_grad_out_of_another_dtype():
    x, w1, b1, w2, b2 = _ffn_args()
    _, pre = ops.ffn_fwd(x, w1, b1, w2, b2, "none", 0.0, None)
    for p, seed in ((0.0, None), (0.5, SEED)):
        with pytest.raises(RuntimeError, match="grad_out must have dtype Float"):
            ops.ffn_bwd(torch.ones(6, 5, dtype=torch.long), x, w1, w2, pre, "none", p, seed, [True] * 5)
    with pytest.raises(RuntimeError, match=r"grad_out must have shape \[6, 5\]"):
        ops.ffn_bwd(torch.ones(6, 4), x, w1, w2, pre, "none", 0.0, None, [True] * 5)


def test_ffn_bwd_names_w1_and_the_second_linear_takes_any_strides():
    x, w1, b1, w2, b2 = _ffn_args()
    _, pre = ops.ffn_fwd(x, w1, b1, w2, b2, "none", 0.0, None)
    with pytest.raises(RuntimeError, match=r"w1 must have shape \[out_features, 8\] \(in_features of the input\), got \[12, 9\]"):
        ops.ffn_bwd(torch.randn(6, 5), x, torch.randn(12, 9), w2, pre, "none", 0.0, None, [True] * 5)
    # w2 and b2 only enter a GEMM: strided views are read as they are.
    w2_t, b2_s = w2.t().contiguous().t(), torch.stack([b2, b2], 1)[:, 0]
    assert not w2_t.is_contiguous() and not b2_s.is_contiguous()
    for op, extra in ((ops.ffn_fwd, ("none", 0.0, None)), (ops.ffn_inference, ("none",))):
        want, got = op(x, w1, b1, w2, b2, *extra), op(x, w1, b1, w2_t, b2_s, *extra)
        want, got = (want[0], got[0]) if isinstance(want, tuple) else (want, got)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_in_place_backwards_refuse_an_operand_they_would_overwrite(device):
    """The backward ops that write the pre-activation's gradient over an argument read input and
    weight afterwards: an argument sharing their memory gave wrong weight/input gradients. (On
    CUDA only the scratch form writes over an argument.)"""
    randn = lambda *shape: torch.randn(*shape, device=device)  # noqa: E731
    t = randn(6, 6)
    w, pre = randn(6, 6), randn(6, 6)
    with pytest.raises(RuntimeError, match="grad_out is overwritten .* must not share memory with input"):
        ops.linear_gelu_bwd_scratch(t, t, w, pre, "none", [True] * 3)
    x, w1, _, w2, _ = (a.to(device) for a in _ffn_args(d_in=12, hidden=12))
    g, go = randn(6, 6), randn(6, 5)
    if device == "cpu":
        with pytest.raises(RuntimeError, match="pre_activation is overwritten .* must not share memory with weight"):
            ops.linear_gelu_bwd_consuming(g, randn(6, 6), t, t, "none", [True] * 3)
        with pytest.raises(RuntimeError, match="pre_activation is overwritten .* must not share memory with input"):
            ops.ffn_bwd_consuming(go, x, w1, w2, x, "none", 0.0, None, [True] * 5)
    else:  # the consuming forms on CUDA overwrite nothing (csrc/ffn.cpp): the plain ops' results
        u = randn(6, 6)
        want = ops.linear_gelu_bwd(g, u, t.clone(), t.clone(), "none", [True] * 3)
        assert all(torch.equal(a, b) for a, b in zip(want, ops.linear_gelu_bwd_consuming(g, u, t, t, "none", [True] * 3)))
        want = ops.ffn_bwd(go, x, w1, w2, x.clone(), "none", 0.0, None, [True] * 5)
        assert all(torch.equal(a, b) for a, b in zip(want, ops.ffn_bwd_consuming(go, x, w1, w2, x, "none", 0.0, None, [True] * 5)))
    # Sharing memory with what is read before the write (grad_out, the pre-activation) is fine.
    pre_copy = pre.clone()
    want = ops.linear_gelu_bwd(pre_copy.clone(), randn(6, 6).copy_(t), w, pre_copy, "none", [True] * 3)
    got = ops.linear_gelu_bwd_consuming(pre.clone(), t, w, pre, "none", [True] * 3)
    assert all(torch.equal(a, b) for a, b in zip(want, got))


def _meta_among_cpu_calls():
    x, w1, b1, w2, b2 = _ffn_args()
    m = lambda t: t.to("meta")  # noqa: E731
    q = torch.randn(1, 2, 4, 8)
    return {
        "layer_norm_fwd": (lambda: ops.layer_norm_fwd(x, m(torch.ones(8)), None, 1e-5), "weight must be on cpu"),
        "add_layer_norm_fwd": (lambda: ops.add_layer_norm_fwd(x, m(x), None, None, None, 1e-5, 0.0, None),
                               "residual must be on cpu"),
        "attention_fwd": (lambda: ops.attention_fwd(q, m(q), q, None, 0.5, False, 0.0, None), "key must be on cpu"),
        "softmax_fwd": (lambda: ops.softmax_fwd(q, m(q > 0), 1.0, False), "mask must be on cpu"),
        "linear_gelu_fwd": (lambda: ops.linear_gelu_fwd(x, w1, m(b1), "none"), "bias must be on cpu"),
        "ffn_fwd": (lambda: ops.ffn_fwd(x, w1, b1, m(w2), b2, "none", 0.0, None), "w2 must be on cpu"),
        "ffn_inference": (lambda: ops.ffn_inference(m(x), w1, b1, w2, b2, "none"), "w1 must be on meta"),
    }


@pytest.mark.parametrize("name", sorted(_meta_among_cpu_calls()))
def test_a_meta_tensor_among_cpu_ones_is_refused(name):
    """The dispatcher sends a call with any meta argument to the fake kernel, which described
    outputs on the first argument's device: CPU tensors of uninitialised memory, and no error."""
    call, message = _meta_among_cpu_calls()[name]
    with pytest.raises(RuntimeError, match=message):
        call()


def _strides(out) -> list:
    return [(tuple(t.shape), t.stride()) for t in (out if isinstance(out, tuple) else (out,))]


def test_fake_kernels_describe_the_outputs_stride_for_stride():
    """Fake kernels (torch.compile, FakeTensorMode) and kernels agree on shapes and strides, for
    the cases where they did not: linear_gelu_bwd_scratch had no fake kernel, softmax_bwd of a
    permuted (dense) output and ffn_bwd of zero rows with transposed weights gave other strides."""
    y = torch.softmax(torch.randn(2, 3, 4, 5), -1).permute(0, 2, 1, 3)
    x, w1, b1, w2, b2 = _ffn_args(rows=0)
    w1t, w2t = w1.t().contiguous().t(), w2.t().contiguous().t()
    pre = torch.randn(6, 12)
    calls = [
        lambda: ops.softmax_bwd(torch.randn_like(y), y, 1.0, True),
        lambda: ops.ffn_bwd(torch.randn(0, 5), x, w1t, w2t, torch.randn(0, 12), "none", 0.0, None, [True] * 5),
        lambda: ops.linear_gelu_bwd_scratch(torch.randn(6, 12), torch.randn(6, 8), w1, pre, "tanh", [True] * 3),
    ]
    for call in calls:
        want = _strides(call())
        with FakeTensorMode(allow_non_fake_inputs=True):
            got = _strides(call())
        assert got == want


def test_messages_name_the_argument_at_fault():
    q = torch.randn(1, 2, 4, 8, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="query must be float32, float16 or bfloat16, got Double"):
        ops.attention_fwd(q, q, q, None, 0.5, False, 0.0, None)
    q = q.float()
    mask = torch.zeros(1, 2, 4, 4).to(torch.float8_e4m3fn)
    with pytest.raises(RuntimeError, match="attn_mask must be bool, float32, float16, bfloat16 or float64, got"):
        ops.attention_fwd(q, q, q, mask, 0.5, False, 0.0, None)
    with pytest.raises(RuntimeError, match="mask must be bool, float32, float16, bfloat16 or float64, got"):
        ops.softmax_fwd(q, torch.zeros(1, 2, 4, 8).to(torch.float8_e4m3fn), 1.0, False)
