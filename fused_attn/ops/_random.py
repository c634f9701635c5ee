"""Dropout seeds: one per call, drawn where the op is called, passed to the kernels as an input."""

from __future__ import annotations

import torch

from ._validate import cuda_graph_capturing


def draw_seed(dropout_p: float) -> torch.Tensor | None:
    """A CPU int64 scalar from torch's default generator, so that ``torch.manual_seed``
    reproduces the draw; None without dropout."""
    return torch.randint(0, 2**62, (), dtype=torch.int64) if dropout_p > 0.0 else None


def seed_int(seed: torch.Tensor | None) -> int:
    return int(seed) if seed is not None else 0


def kernel_seed(seed: torch.Tensor | None, like: torch.Tensor, op: str) -> int:
    """``seed`` as the Triton kernels take it (0 without dropout). Refused while a CUDA graph is
    being captured, as the CUDA launchers refuse it (csrc/include/fused_attn/cuda_utils.cuh): the
    kernels take the seed from the host at each call, so every replay would drop the elements of
    the capture. The public ops called eagerly run their reference then; a direct op call or a
    torch.compile'd function captured afterwards reaches this."""
    if seed is None:
        return 0
    if like.is_cuda and cuda_graph_capturing():
        raise RuntimeError(
            f"{op}: dropout while a CUDA graph is being captured: the fused kernels take their dropout seed from "
            "the host at each call, so every replay would drop the elements of the capture; fused_attn's ops "
            "called eagerly run their reference then, a compiled function cannot: give its ops with dropout "
            "backend='reference', or capture without dropout"
        )
    return int(seed)
