"""Products that must be rounded on their own, whatever the compiler would contract.

The kernels compile with floating-point contraction on (``_options.LAUNCH_OPTIONS``), so a product
feeding an addition or subtraction may become one FMA with the product unrounded. Where the same
product is also used on its own, the two uses then disagree by the product's rounding error, and
some formulas need them to agree exactly: attention's ``s - max(s)`` must be exactly 0 at the row
max (as an FMA it is the rounding error of that score, which at scores of 1e30 is ~1e22, and its
exp2 inf or 0); LayerNorm's backward ``g - mean(g)`` must cancel exactly where torch's does.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..._env import triton_interpret_mode

# Whether the product is a PTX mul.rn.f32 (compiled kernels) or a plain product (the interpreter,
# which runs no PTX and evaluates through numpy, never contracting). Read when this module is
# imported, as the triton.jit decorators read TRITON_INTERPRET.
_ROUND_PRODUCT = tl.constexpr(not triton_interpret_mode())


@triton.jit
def rounded_product(a, b):
    """``a * b`` (float32, broadcast) rounded on its own: an instruction with an explicit rounding
    mode is never contracted. mul.rn.f32 also keeps subnormals, as torch's product and the cuda
    backend's __fmul_rn do (libdevice's mul_rn compiles to mul.rn.ftz.f32 here)."""
    if _ROUND_PRODUCT:
        return tl.inline_asm_elementwise(
            "mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return a * b
