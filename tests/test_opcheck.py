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
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_layer_norm_ops(backend, device, affine):
    if device == "unavailable":
        pytest.skip(f"{backend} ops are not available here")
    name = LAYER_NORM_OPS[backend]
    fwd = getattr(torch.ops.fused_attn, f"{name}_fwd").default
    bwd = getattr(torch.ops.fused_attn, f"{name}_bwd").default
    x = torch.randn(5, 24, device=device, requires_grad=True)
    w = torch.randn(24, device=device, requires_grad=True) if affine else None
    b = torch.randn(24, device=device, requires_grad=True) if affine else None
    torch.library.opcheck(fwd, (x, w, b, 1e-5))
    _, mean, rstd = fwd(x.detach(), None if w is None else w.detach(), None if b is None else b.detach(), 1e-5)
    dy = torch.randn(5, 24, device=device)
    torch.library.opcheck(bwd, (dy, x.detach(), mean, rstd, None if w is None else w.detach(), [True, affine, affine]))


TRITON_DEVICES = _devices_for("triton") or ["unavailable"]


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("mask_kind", ["none", "padding", "bias"])
@pytest.mark.parametrize("causal", [False, True])
def test_triton_attention_ops(device, mask_kind, causal):
    if device == "unavailable":
        pytest.skip("triton ops are not available here")
    q, k, v = (torch.randn(2, 2, 20, 16, device=device, requires_grad=True) for _ in range(3))
    mask = None
    if mask_kind == "padding":
        mask = (torch.rand(2, 1, 1, 20, device=device) > 0.2).expand(2, 2, 20, 20)
    elif mask_kind == "bias":
        mask = torch.randn(2, 2, 20, 20, device=device, requires_grad=True)
    # With dropout too: the seed is an input, so the op is a pure function of its arguments.
    for p, seed in ((0.0, None), (0.3, torch.tensor(1234))):
        torch.library.opcheck(torch.ops.fused_attn.triton_attention_fwd.default, (q, k, v, mask, 0.25, causal, p, seed))
        out, lse = torch.ops.fused_attn.triton_attention_fwd(
            q.detach(), k.detach(), v.detach(), None if mask is None else mask.detach(), 0.25, causal, p, seed
        )
        torch.library.opcheck(
            torch.ops.fused_attn.triton_attention_bwd.default,
            (torch.randn_like(out), q.detach(), k.detach(), v.detach(), None if mask is None else mask.detach(),
             out, lse, 0.25, causal, p, seed, mask_kind == "bias"),
        )


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("mask_kind", ["none", "bool", "bias"])
def test_triton_softmax_ops(device, mask_kind):
    if device == "unavailable":
        pytest.skip("triton ops are not available here")
    x = torch.randn(2, 3, 4, 10, device=device, requires_grad=True)
    mask = None
    if mask_kind == "bool":
        mask = (torch.rand(1, 1, 4, 10, device=device) > 0.3).expand(2, 3, 4, 10)
    elif mask_kind == "bias":
        mask = torch.randn(2, 3, 4, 10, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.fused_attn.triton_softmax_fwd.default, (x, mask, 0.5, False))
    y = torch.ops.fused_attn.triton_softmax_fwd(x.detach(), None, 0.5, True)
    torch.library.opcheck(torch.ops.fused_attn.triton_softmax_bwd.default, (torch.randn_like(y), y, 0.5, mask_kind == "bias"))


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_triton_add_layer_norm_ops(device, dropout_p):
    if device == "unavailable":
        pytest.skip("triton ops are not available here")
    x, res = (torch.randn(6, 40, device=device, requires_grad=True) for _ in range(2))
    w, b, ib = (torch.randn(40, device=device, requires_grad=True) for _ in range(3))
    seed = torch.tensor(99) if dropout_p else None
    torch.library.opcheck(torch.ops.fused_attn.triton_add_layer_norm_fwd.default, (x, res, w, b, ib, 1e-5, dropout_p, seed))
    _, pre, mean, rstd = torch.ops.fused_attn.triton_add_layer_norm_fwd(
        x.detach(), res.detach(), w.detach(), b.detach(), ib.detach(), 1e-5, dropout_p, seed
    )
    dy = torch.randn(6, 40, device=device)
    torch.library.opcheck(
        torch.ops.fused_attn.triton_add_layer_norm_bwd.default,
        (dy, torch.randn_like(dy), pre, mean, rstd, w.detach(), dropout_p, seed, [True, True, True, True, True]),
    )


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_triton_linear_gelu_and_ffn_ops(device, approximate):
    if device == "unavailable":
        pytest.skip("triton ops are not available here")
    x = torch.randn(12, 16, device=device, requires_grad=True)
    w1, b1 = torch.randn(24, 16, device=device, requires_grad=True), torch.randn(24, device=device, requires_grad=True)
    w2, b2 = torch.randn(16, 24, device=device, requires_grad=True), torch.randn(16, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.fused_attn.triton_linear_gelu_fwd.default, (x, w1, b1, approximate))
    out, pre = torch.ops.fused_attn.triton_linear_gelu_fwd(x.detach(), w1.detach(), b1.detach(), approximate)
    torch.library.opcheck(
        torch.ops.fused_attn.triton_linear_gelu_bwd.default,
        (torch.randn_like(out), x.detach(), w1.detach(), pre, approximate, [True, True, True]),
    )
    for p, seed in ((0.0, None), (0.2, torch.tensor(5))):
        torch.library.opcheck(torch.ops.fused_attn.triton_ffn_fwd.default, (x, w1, b1, w2, b2, approximate, p, seed))
