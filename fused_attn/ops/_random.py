"""Dropout seeds: one per call, drawn where the op is called on the inputs' device, passed to the
kernels as an input they read when they run."""

from __future__ import annotations

import torch

from ._validate import cuda_graph_capturing, dtype_name


def draw_seed(dropout_p: float, like: torch.Tensor) -> torch.Tensor | None:
    """An int64 scalar on ``like``'s device from that device's default generator (so that
    ``torch.manual_seed`` reproduces the draw); None without dropout. On a GPU the draw is a kernel
    of torch's, which a CUDA graph captures and replays with a new value each time (torch's
    generators are graph-safe); the fused kernels read the seed from device memory, so each replay
    drops other elements and its backward regenerates that replay's mask."""
    return torch.randint(0, 2**62, (), dtype=torch.int64, device=like.device) if dropout_p > 0.0 else None


def kernel_seed(seed: torch.Tensor | None, dropout_p: float, like: torch.Tensor, op: str) -> torch.Tensor | None:
    """``seed`` as the Triton kernels take it: None without dropout, else an int64 tensor with one
    element on ``like``'s device, as the CUDA launchers take it (cuda_utils::kernel_seed in
    csrc/include/fused_attn/cuda_utils.cuh, with the same checks, raising a RuntimeError as theirs
    and the Triton ops' other checks do, naming ``op``). A seed elsewhere (a direct op call with a CPU
    seed) is copied there, except while a CUDA graph is being captured: the copy's value would be
    frozen into every replay, so that is refused."""
    if dropout_p <= 0.0:
        return None
    if seed is None:
        raise RuntimeError(f"{op}: seed must be given when dropout_p > 0: an int64 tensor with one element (the "
                           "dropout stream's key)")
    if seed.dtype != torch.int64 or seed.numel() != 1:
        raise RuntimeError(f"{op}: seed must be an int64 tensor with one element, got {dtype_name(seed.dtype)} of "
                           f"shape {list(seed.shape)}")
    if seed.device == like.device:
        return seed
    if seed.device.type != "cpu":
        raise RuntimeError(f"{op}: seed must be on the inputs' device ({like.device}) or the CPU, got {seed.device}")
    if like.is_cuda and cuda_graph_capturing():
        raise RuntimeError(
            f"{op}: a CPU seed while a CUDA graph is being captured: every replay would drop the elements of the "
            "capture; give the seed on the inputs' device (fused_attn's ops draw it there)"
        )
    return seed.to(like.device)
