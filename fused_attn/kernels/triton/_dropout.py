"""The dropout arithmetic the elementwise Triton kernels share (the attention kernels draw theirs
per tile of scores and keep the factor for both P and dP: see attention.py)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def dropout(x, seed, offsets, dropout_p):
    """Inverted dropout of float32 ``x`` at the Philox stream's elements ``offsets``: kept values
    (uniform >= p) are divided by 1 - p, dropped ones multiplied by 0, not replaced by it, so a
    dropped NaN or inf stays NaN, as in torch's dropout."""
    keep = (tl.rand(seed, offsets) >= dropout_p).to(tl.float32)
    return x * keep / (1.0 - dropout_p)
