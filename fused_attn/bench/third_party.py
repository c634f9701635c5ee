"""Other libraries' fused kernels, measured side by side when they are installed.

Each adapter returns ``(name, forward)`` where ``forward`` is a zero-argument callable computing
the same thing as the case's baseline, or ``(name, reason)`` when it cannot: the library is not
installed, or cannot serve the device, dtype or shape. Layout conversions happen here, before
the timed call, never inside it; an output in another layout is returned as a view in the
case's (a transpose costs nothing), so that the case's gradient fits it in a backward.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch

Adapter = tuple[str, "Callable[[], torch.Tensor] | str"]


def _missing(module: str, package: str) -> str | None:
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    return None if found else f"not installed (pip install {package})"


def _gpu_half(x: torch.Tensor, library: str) -> str | None:
    if x.device.type != "cuda":
        return f"{library} runs on CUDA only"
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"{library} takes float16/bfloat16 only"
    return None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, dropout_p: float = 0.0) -> list[Adapter]:
    """flash-attn and xformers, both taking and returning [batch, seq, heads, head_dim]; the output
    is returned as a [batch, heads, seq, head_dim] view, the layout of the case's inputs and of its
    gradient (whose last dim stays contiguous through the view, as these libraries need). Grouped
    key/value heads (fewer than the query's): flash-attn takes them as they are, xformers repeated
    inside the call."""
    adapters: list[Adapter] = []
    why = _missing("flash_attn", "flash-attn") or _gpu_half(q, "flash-attn")
    if why:
        adapters.append(("flash-attn", why))
    else:
        from flash_attn import flash_attn_func

        qt, kt, vt = (t.transpose(1, 2).contiguous().detach().requires_grad_(t.requires_grad) for t in (q, k, v))
        adapters.append(("flash-attn",
                         lambda: flash_attn_func(qt, kt, vt, dropout_p=dropout_p, causal=causal).transpose(1, 2)))
    why = _missing("xformers", "xformers") or (None if q.device.type == "cuda" else "xformers runs on CUDA only")
    if why:
        adapters.append(("xformers", why))
    else:
        import xformers.ops as xops

        qt, kt, vt = (t.transpose(1, 2).contiguous().detach().requires_grad_(t.requires_grad) for t in (q, k, v))
        bias = xops.LowerTriangularMask() if causal else None
        group = q.shape[1] // k.shape[1]

        def grouped(t: torch.Tensor) -> torch.Tensor:  # [B, L, Hkv, D] -> [B, L, H, D], repeated
            return t if group == 1 else t.repeat_interleave(group, dim=2)

        adapters.append(
            ("xformers",
             lambda: xops.memory_efficient_attention(qt, grouped(kt), grouped(vt), attn_bias=bias,
                                                     p=dropout_p).transpose(1, 2))
        )
    return adapters


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> list[Adapter]:
    """apex's FusedLayerNorm and Liger-Kernel's Triton LayerNorm."""
    adapters: list[Adapter] = []
    why = _missing("apex", "apex") or (None if x.device.type == "cuda" else "apex runs on CUDA only")
    if why:
        adapters.append(("apex", why))
    else:
        from apex.normalization.fused_layer_norm import fused_layer_norm_affine

        shape = (x.shape[-1],)
        adapters.append(("apex", lambda: fused_layer_norm_affine(x, weight, bias, shape, eps)))
    why = _missing("liger_kernel", "liger-kernel") or (None if x.device.type == "cuda" else "liger-kernel runs on CUDA only")
    if why:
        adapters.append(("liger-kernel", why))
    else:
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction

        adapters.append(("liger-kernel", lambda: LigerLayerNormFunction.apply(x, weight, bias, eps)))
    return adapters


def ffn(x, w1, b1, w2, b2) -> list[Adapter]:
    """apex's FusedDenseGeluDense (cuBLASLt GEMM + bias + GELU, then GEMM + bias)."""
    why = _missing("apex", "apex") or _gpu_half(x, "apex fused_dense")
    if why:
        return [("apex", why)]
    from apex.fused_dense import fused_dense_gelu_dense_function

    return [("apex", lambda: fused_dense_gelu_dense_function(x, w1, b1, w2, b2))]
