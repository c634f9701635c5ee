"""torch.library.opcheck on every custom op: schema, fake kernel, autograd registration."""

import pytest
import torch

from fused_attn import _extension, backends

from .conftest import HAS_CUDA


def _devices_for(backend):
    devices = []
    if backend == "cpu" and _extension.loaded():
        devices.append("cpu")
    if backend == "triton" and backends.triton_interpret_mode():
        devices.append("cpu")
    if backend in ("cuda", "triton") and HAS_CUDA:
        devices.append("cuda")
    return devices


LAYER_NORM_OPS = {"cpu": "layer_norm", "cuda": "layer_norm", "triton": "triton_layer_norm"}
CASES = [
    pytest.param(backend, device, id=f"{backend}-{device}")
    for backend in ("cpu", "cuda", "triton")
    for device in (_devices_for(backend) or ["unavailable"])
]


@pytest.mark.parametrize("backend, device", CASES)
@pytest.mark.parametrize("affine, dtype", [(True, torch.float32), (False, torch.float32), (True, torch.float16)],
                         ids=["affine", "plain", "float32-params"])
def test_layer_norm_ops(backend, device, affine, dtype):
    """float32-params: a float16 input with float32 weight and bias, whose gradients are float32."""
    if device == "unavailable":
        pytest.skip(f"{backend} ops are not available here")
    name = LAYER_NORM_OPS[backend]
    fwd = getattr(torch.ops.fused_attn, f"{name}_fwd").default
    bwd = getattr(torch.ops.fused_attn, f"{name}_bwd").default
    x = torch.randn(5, 24, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(24, device=device, requires_grad=True) if affine else None
    b = torch.randn(24, device=device, requires_grad=True) if affine else None
    torch.library.opcheck(fwd, (x, w, b, 1e-5))
    _, mean, rstd = fwd(x.detach(), None if w is None else w.detach(), None if b is None else b.detach(), 1e-5)
    dy = torch.randn(5, 24, device=device, dtype=dtype)
    torch.library.opcheck(bwd, (dy, x.detach(), mean, rstd, None if w is None else w.detach(), [True, affine, affine]))


def _families(op: str) -> list:
    """(op name prefix, device) for the Triton ops and the native (cpu/cuda) ops of ``op``."""
    params = []
    for backend, prefix in (("triton", "triton_"), ("cpu", ""), ("cuda", "")):
        for device in _devices_for(backend):
            if backend != "triton" and not _extension.has_kernel(f"{op}_fwd", backend):
                continue
            params.append(pytest.param(prefix, device, id=f"{backend}-{device}"))
    return params or [pytest.param(None, None, id="unavailable")]


def _op(prefix, name):
    if prefix is None:
        pytest.skip("no implementation of this op is available here")
    return getattr(torch.ops.fused_attn, f"{prefix}{name}").default


@pytest.mark.parametrize("prefix, device", _families("attention"))
@pytest.mark.parametrize("mask_kind", ["none", "padding", "bias"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layout", ["bhld", "blhd", "grouped"])
def test_attention_ops(prefix, device, mask_kind, causal, layout):
    fwd, bwd = _op(prefix, "attention_fwd"), _op(prefix, "attention_bwd")
    if layout == "grouped" and prefix == "triton_" and device == "cpu" and (mask_kind, causal) != ("bias", True):
        pytest.skip("one grouped case for the Triton ops under the interpreter (20 s each)")
    # The CUDA C++ kernels multiply on tensor cores: float16 (their declaration has no float32).
    dtype = torch.float16 if prefix == "" and device == "cuda" else torch.float32
    # blhd: heads split off a projection's output, whose layout the output follows (the fake
    # kernel must give the same strides as the kernel).
    # grouped: grouped-query attention, key/value with half the query's heads.
    def tensor(heads=2):
        if layout != "blhd":
            return torch.randn(2, heads, 20, 16, device=device, dtype=dtype, requires_grad=True)
        return torch.randn(2, 20, heads, 16, device=device, dtype=dtype).transpose(1, 2).requires_grad_()

    heads = 4 if layout == "grouped" else 2
    q, k, v = tensor(heads), tensor(), tensor()
    mask = None
    if mask_kind == "padding":
        mask = (torch.rand(2, 1, 1, 20, device=device) > 0.2).expand(2, heads, 20, 20)
    elif mask_kind == "bias":
        mask = torch.randn(2, heads, 20, 20, device=device, dtype=dtype, requires_grad=True)
    # With dropout too: the seed is an input, so the op is a pure function of its arguments.
    for p, seed in ((0.0, None), (0.3, torch.tensor(1234))):
        torch.library.opcheck(fwd, (q, k, v, mask, 0.25, causal, p, seed))
        out, lse = fwd(q.detach(), k.detach(), v.detach(), None if mask is None else mask.detach(), 0.25, causal, p, seed)
        torch.library.opcheck(
            bwd,
            (torch.randn_like(out), q.detach(), k.detach(), v.detach(), None if mask is None else mask.detach(),
             lse, 0.25, causal, p, seed, mask_kind == "bias"),
        )


@pytest.mark.parametrize("prefix, device", _families("softmax"))
@pytest.mark.parametrize("mask_kind", ["none", "bool", "bias"])
def test_softmax_ops(prefix, device, mask_kind):
    fwd, bwd = _op(prefix, "softmax_fwd"), _op(prefix, "softmax_bwd")
    x = torch.randn(2, 3, 4, 10, device=device, requires_grad=True)
    mask = None
    if mask_kind == "bool":
        mask = (torch.rand(1, 1, 4, 10, device=device) > 0.3).expand(2, 3, 4, 10)
    elif mask_kind == "bias":
        mask = torch.randn(2, 3, 4, 10, device=device, requires_grad=True)
    torch.library.opcheck(fwd, (x, mask, 0.5, False))
    y = fwd(x.detach(), None, 0.5, True)
    torch.library.opcheck(bwd, (torch.randn_like(y), y, 0.5, mask_kind == "bias"))


@pytest.mark.parametrize("prefix, device", _families("add_layer_norm"))
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16-float32-params"])
def test_add_layer_norm_ops(prefix, device, dropout_p, dtype):
    """float16-float32-params: float16 activations (input bias too) with float32 weight and bias."""
    fwd, bwd = _op(prefix, "add_layer_norm_fwd"), _op(prefix, "add_layer_norm_bwd")
    x, res, ib = (torch.randn(s, device=device, dtype=dtype, requires_grad=True) for s in ((6, 40), (6, 40), 40))
    w, b = (torch.randn(40, device=device, requires_grad=True) for _ in range(2))
    seed = torch.tensor(99) if dropout_p else None
    torch.library.opcheck(fwd, (x, res, w, b, ib, 1e-5, dropout_p, seed))
    detached = [t.detach() for t in (x, res, w, b, ib)]
    torch.library.opcheck(_op(prefix, "add_layer_norm_inference"), (*detached, 1e-5, dropout_p, seed))
    _, pre, mean, rstd = fwd(x.detach(), res.detach(), w.detach(), b.detach(), ib.detach(), 1e-5, dropout_p, seed)
    dy = torch.randn(6, 40, device=device, dtype=dtype)
    torch.library.opcheck(
        bwd,
        (dy, torch.randn_like(dy), pre, mean, rstd, w.detach(), dropout_p, seed, [True, True, True, True, True]),
    )


@pytest.mark.parametrize("prefix, device", _families("linear_gelu"))
@pytest.mark.parametrize("approximate", ["none", "tanh", "relu"])
def test_linear_gelu_and_ffn_ops(prefix, device, approximate):
    fwd, bwd = _op(prefix, "linear_gelu_fwd"), _op(prefix, "linear_gelu_bwd")
    ffn_fwd, ffn_bwd = _op(prefix, "ffn_fwd"), _op(prefix, "ffn_bwd")
    x = torch.randn(12, 16, device=device, requires_grad=True)
    w1, b1 = torch.randn(24, 16, device=device, requires_grad=True), torch.randn(24, device=device, requires_grad=True)
    w2, b2 = torch.randn(16, 24, device=device, requires_grad=True), torch.randn(16, device=device, requires_grad=True)
    torch.library.opcheck(fwd, (x, w1, b1, approximate))
    out, pre = fwd(x.detach(), w1.detach(), b1.detach(), approximate)
    torch.library.opcheck(
        bwd,
        (torch.randn_like(out), x.detach(), w1.detach(), pre, approximate, [True, True, True]),
    )
    # The inference forms, for calls that need no gradient (so their inputs do not require it).
    detached = (x.detach(), w1.detach(), b1.detach())
    torch.library.opcheck(_op(prefix, "linear_gelu_inference"), (*detached, approximate))
    torch.library.opcheck(_op(prefix, "ffn_inference"), (*detached, w2.detach(), b2.detach(), approximate))
    for p, seed in ((0.0, None), (0.2, torch.tensor(5))):
        torch.library.opcheck(ffn_fwd, (x, w1, b1, w2, b2, approximate, p, seed))
        y, pre = ffn_fwd(x.detach(), w1.detach(), b1.detach(), w2.detach(), b2.detach(), approximate, p, seed)
        torch.library.opcheck(
            ffn_bwd,
            (torch.randn_like(y), x.detach(), w1.detach(), w2.detach(), pre, approximate, p, seed, [True] * 5),
        )
