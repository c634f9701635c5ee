"""Compiler options that every launch of the package's Triton kernels passes."""

from __future__ import annotations

# Floating-point contraction (a * b + c as one FMA) stays on, as every Triton release up to 3.9
# compiles by default and as the kernels were built and checked. Triton 3.9 warns that its default
# turns to off in 3.10; asked for explicitly, the kernels compile alike on every release, and Triton
# has nothing to warn about. (Code whose accuracy needs an FMA calls tl.fma, whatever this says.)
LAUNCH_OPTIONS = {"enable_fp_fusion": True}
