"""The dropout arithmetic the elementwise Triton kernels share (the attention kernels draw theirs
per tile of scores and keep the factor for both P and dP: see attention.py)."""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl


@triton.jit
def uniform(seed, counter):
    """The package's Philox stream (csrc/ops.cpp) at element ``counter``: word ``counter % 4`` of
    Philox4x32-10 keyed by the 64-bit seed at counter ``counter // 4`` (counter words: its low and
    high 32 bits, 0, 0; tl.randint4x's four words), mapped to [0, 1). The split into two 32-bit
    words is made here: tl.randint4x makes it only from Triton 3.4 on (before, a 64-bit counter
    took Philox's 64-bit variant, another stream). Each element evaluates its counter's Philox
    rounds and keeps one word; the CPU kernels use all four of a counter's words."""
    element = counter.to(tl.int64)
    group = element >> 2
    low = group.to(tl.uint32)
    high = (group >> 32).to(tl.uint32)
    zero = low * 0
    w0, w1, w2, w3 = tl.random.philox(seed, low, high, zero, zero)
    which = (element.to(tl.uint32) & 3).to(tl.int32)  # the word, compared in 32 bits (not 64)
    word = tl.where(which == 0, w0, tl.where(which == 1, w1, tl.where(which == 2, w2, w3)))
    return tl.random.uint_to_uniform_float(word)


@triton.jit
def load_seed(seed_ptr, DROPOUT: tl.constexpr):
    """The call's seed, read from device memory when the kernel runs (``seed_pointer``), where it
    drops; 0 (never used) where it does not. Read at run time, not passed by value at launch, so a
    CUDA graph that captured the call replays it with the seed each replay draws."""
    if DROPOUT:
        return tl.load(seed_ptr)
    else:
        return 0


@triton.jit
def dropout(x, seed, offsets, dropout_p, keep_prob):
    """Inverted dropout of float32 ``x`` at the Philox stream's elements ``offsets``: kept values
    (uniform >= p) are divided by ``keep_prob`` (``keep_divisor``), dropped ones multiplied by 0,
    not replaced by it, so a dropped NaN or inf stays NaN, as in torch's dropout. ``dropout_p``
    comes from ``as_float32``."""
    keep = (uniform(seed, offsets) >= dropout_p).to(tl.float32)
    # div_rn: the correctly rounded quotient the C++ kernels compute (a plain / compiles to an
    # approximate division on GPUs).
    return tl.math.div_rn(x * keep, keep_prob)


# Host side.


def seed_pointer(seed: torch.Tensor | int | None, dropout_p: float, like: torch.Tensor) -> torch.Tensor:
    """The seed argument of the kernels: an int64 tensor on ``like``'s device holding the seed
    (fused_attn.ops._random.kernel_seed checks what the ops pass; an int is for direct calls), or,
    without dropout, ``like`` itself, which the kernels never read then."""
    if dropout_p <= 0.0:
        return like
    if seed is None:
        raise ValueError("seed must be given when dropout_p > 0")
    if isinstance(seed, torch.Tensor):
        return seed.to(device=like.device, dtype=torch.int64)
    return torch.tensor((seed + 2**63) % 2**64 - 2**63, dtype=torch.int64, device=like.device)  # as int64 bits


# Every backend takes dropout_p as a float32 p (a float argument reaches a compiled
# kernel as float32 anyway; the interpreter would keep the double) and divides what it keeps by the
# keep rate 1 - p in float32, so an element's expected value is itself (fused_attn/philox.h,
# keep_divisor and keep_scale, the same arithmetic). A p that rounds to 1 keeps nothing: the divisor
# is then 1 and the scale 0, so the result is 0 rather than 0 / 0.


def as_float32(dropout_p: float) -> float:
    return float(np.float32(dropout_p))


def keep_divisor(dropout_p: float) -> float:
    p = np.float32(dropout_p)
    return float(np.float32(1) - p) if p < 1 else 1.0


def keep_scale(dropout_p: float) -> float:
    p = np.float32(dropout_p)
    return float(np.float32(1) / (np.float32(1) - p)) if p < 1 else 0.0
