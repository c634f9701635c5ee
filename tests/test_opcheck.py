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
