"""The dropout arithmetic the elementwise Triton kernels share (the attention kernels draw theirs
per tile of scores and keep the factor for both P and dP: see attention.py)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def uniform(seed, counter):
    """The package's Philox stream (csrc/ops.cpp) at element ``counter``: Philox4x32-10 keyed by
    the 64-bit seed, counter words (low and high 32 bits of the element, 0, 0), the first output
    word mapped to [0, 1). The split into two 32-bit words is made here: tl.rand makes it only
    from Triton 3.4 on (before, a 64-bit counter took Philox's 64-bit variant, another stream)."""
    element = counter.to(tl.int64)
    low = element.to(tl.uint32)
    high = (element >> 32).to(tl.uint32)
    zero = low * 0
    word, _, _, _ = tl.random.philox(seed, low, high, zero, zero)
    return tl.random.uint_to_uniform_float(word)


@triton.jit
def dropout(x, seed, offsets, dropout_p):
    """Inverted dropout of float32 ``x`` at the Philox stream's elements ``offsets``: kept values
    (uniform >= p) are divided by 1 - p, dropped ones multiplied by 0, not replaced by it, so a
    dropped NaN or inf stays NaN, as in torch's dropout."""
    keep = (uniform(seed, offsets) >= dropout_p).to(tl.float32)
    return x * keep / (1.0 - dropout_p)
