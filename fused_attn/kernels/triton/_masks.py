"""What the attention and softmax kernels share about floating masks."""

from __future__ import annotations

import triton
import triton.language as tl

# -FLT_MAX / log2(e) is -2.3587e38: below it a finite value times log2(e) overflows to -inf.
MASK_FLOOR = tl.constexpr(-2.35e38)
LOG2E = 1.4426950408889634
FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_OVERFLOW = 3.4028235677973366e38  # FLOAT32_MAX + half an ulp: above it a double rounds to inf


def log2_scale(scale: float) -> float:
    """The score scale in the kernels' log2 units, ``scale * log2(e)``. For a scale that is finite
    in float32 it saturates at float32's largest finite value: a scale beyond 2.36e38 would
    otherwise reach the kernel as inf, and a zero score times it as NaN, where the other backends
    (which scale by ``scale`` itself) give the limit softmax. A scale that float32 cannot hold is
    inf there too, as on the other backends."""
    if abs(scale) >= FLOAT32_OVERFLOW:
        return scale * LOG2E
    return max(-FLOAT32_MAX, min(FLOAT32_MAX, scale * LOG2E))


@triton.jit
def bias_log2(bias):
    """A floating mask value (float32) in the kernels' log2 units: times log2(e), after finite
    values below MASK_FLOOR are raised to it (-inf stays -inf, NaN stays NaN). So a row whose
    every element carries ``torch.finfo(...).min`` stays finite and averages its values as
    PyTorch does, instead of counting as fully masked."""
    clamped = tl.where((bias < MASK_FLOOR) & (bias != float("-inf")), MASK_FLOOR, bias)
    return clamped * 1.4426950408889634
