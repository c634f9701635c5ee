"""The dropout stream every fused backend draws from, in plain torch.

``csrc/include/fused_attn/philox.h`` defines it (Philox4x32-10 as ``triton.language.randint4x``
computes it; element ``e`` of a call's stream is word ``e % 4`` of counter ``e // 4``); this is the
same function on tensors, so that a reference computation can be given the very keep-mask a
kernel drew from its seed. The 32-bit products are formed from 16-bit halves, which int64
arithmetic holds exactly.
"""

from __future__ import annotations

import math

import torch

_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUNDS = 10
_LOW32 = 0xFFFFFFFF
# int32 -> [0, 1) as triton.language.random.uint_to_uniform_float maps it.
_UNIFORM_SCALE = 4.6566127342e-10


def _mul_hi_lo(constant: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The high and low 32-bit words of ``constant * x`` for 32-bit ``constant`` and ``x``."""
    p_lo = (x & 0xFFFF) * constant  # < 2^48
    p_hi = (x >> 16) * constant  # < 2^48
    return (p_hi + (p_lo >> 16)) >> 16, (((p_hi & 0xFFFF) << 16) + p_lo) & _LOW32


def _counter_words(seed: int | torch.Tensor, counters: torch.Tensor) -> list[torch.Tensor]:
    """The four output words of Philox4x32-10 for each of ``counters`` (int64) under ``seed`` (a
    Python int in [0, 2^64), or an int64 tensor on the counters' device: its two's-complement bits)."""
    c0, c1 = counters & _LOW32, (counters >> 32) & _LOW32
    c2, c3 = torch.zeros_like(counters), torch.zeros_like(counters)
    k0, k1 = seed & _LOW32, (seed >> 32) & _LOW32
    for _ in range(_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _LOW32, (k1 + _KEY_B) & _LOW32
    return [c0, c1, c2, c3]


def uniforms(seed: int | torch.Tensor, numel: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Elements ``0 .. numel - 1`` of the stream of ``seed`` as float32 uniforms in [0, 1). ``seed``
    is an int or the int64 tensor with one element the ops pass (read where it lies: on a GPU,
    without a copy to the host)."""
    if isinstance(seed, torch.Tensor):
        seed = seed.to(device=device, dtype=torch.int64).reshape(())
    else:
        seed %= 2**64  # the kernels read the int64 seed as unsigned
    counters = torch.arange(math.ceil(numel / 4), dtype=torch.int64, device=device)
    words = torch.stack(_counter_words(seed, counters), dim=-1).flatten()[:numel]
    # As int32: w < 0 folds to -w - 1 (~w), i.e. 2^32 - 1 - word.
    folded = torch.where(words >= 2**31, _LOW32 - words, words)
    return folded.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32, device=device)


def keep_mask(seed: int | torch.Tensor, shape: tuple[int, ...], dropout_p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """The keep-mask (True = kept) of a call with dropout ``dropout_p`` whose elements, in the
    row-major order of ``shape``, are the first of the stream of ``seed``: attention's
    ``[batch, heads, q_len, k_len]`` scores, Add & Norm's and the FFN's ``[rows, features]``
    outputs. An element is kept when its uniform is >= ``dropout_p`` in float32, as the kernels
    compare."""
    u = uniforms(seed, math.prod(shape), device).view(shape)
    return u >= torch.tensor(dropout_p, dtype=torch.float32, device=device)
