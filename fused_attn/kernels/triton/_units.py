"""What the attention and softmax kernels share about their scores' units."""

from __future__ import annotations

import triton.language as tl

# Scores and floating masks stay in natural units (or, in the attention kernels where RAW_SCORES
# holds, forward and backward, raw products q.k) until the row max is subtracted; only the difference is taken to log2 units for exp2.
# Folding log2(e) into the scale (or the mask) first would round every score at its own magnitude:
# 1e-3 absolute in the exponent at |score| ~ 1e4, where the plain softmax subtracts the max exactly.
LOG2E = tl.constexpr(1.4426950408889634)
