"""What the attention and softmax kernels share about floating masks."""

from __future__ import annotations

import triton
import triton.language as tl

# -FLT_MAX / log2(e) is -2.3587e38: below it a finite value times log2(e) overflows to -inf.
MASK_FLOOR = tl.constexpr(-2.35e38)


@triton.jit
def bias_log2(bias):
    """A floating mask value (float32) in the kernels' log2 units: times log2(e), after finite
    values below MASK_FLOOR are raised to it (-inf stays -inf, NaN stays NaN). So a row whose
    every element carries ``torch.finfo(...).min`` stays finite and averages its values as
    PyTorch does, instead of counting as fully masked."""
    clamped = tl.where((bias < MASK_FLOOR) & (bias != float("-inf")), MASK_FLOOR, bias)
    return clamped * 1.4426950408889634
