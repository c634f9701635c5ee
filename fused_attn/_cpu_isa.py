"""The vector instruction sets the extension's C++ CPU kernels can be built for, shared by setup.py
(which picks one at build time) and ``fused_attn._extension`` (which refuses to load a library
built for instructions this CPU lacks: a kernel would die of SIGILL, not raise). Standard library
only: setup.py loads this file on its own, before the package can be imported.

- ``avx512``: torch's AVX-512 set (F, BW, VL, DQ) with AVX2/FMA/F16C: 16 float32 lanes. Opt-in
  (FUSED_ATTN_CPU_ISA=avx512): on an AMX Xeon it made the bfloat16 attention forward about 20%
  faster and whole models 3-7% (README, CPU figures);
- ``avx2``: AVX2, FMA and F16C: 8 float32 lanes; the default where the CPU has it;
- ``generic``: whatever the compiler targets by default (at::vec's portable loops).
"""

from __future__ import annotations

import platform
from pathlib import Path

# /proc/cpuinfo flags each set needs, widest first.
ISA_FLAGS: dict[str, tuple[str, ...]] = {
    "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c"),
    "avx2": ("avx2", "fma", "f16c"),
    "generic": (),
}

# Compiler flags of each set (CPU_CAPABILITY picks at::vec's implementation, as in torch's build).
# GCC 12's own avx512fintrin.h trips its -W(maybe-)uninitialized (the _mm512_undefined_* idiom, GCC
# bug 105593) wherever at::vec's 512-bit reductions inline: off for that set.
COMPILE_FLAGS: dict[str, list[str]] = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-Wno-maybe-uninitialized", "-Wno-uninitialized"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "generic": [],
}


def cpu_flags() -> set[str] | None:
    """The instruction-set flags of this CPU (from /proc/cpuinfo), or None where they cannot be
    read (not Linux, not x86-64)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return None


def missing_flags(isa: str, flags: set[str] | None = None) -> list[str]:
    """The flags of ``isa`` this CPU lacks ([] when none, or when the CPU's flags are unknown)."""
    flags = cpu_flags() if flags is None else flags
    if flags is None:
        return []
    return [flag for flag in ISA_FLAGS.get(isa, ()) if flag not in flags]


def default_isa(flags: set[str] | None = None) -> str:
    """The set a build takes unless told: ``avx2`` where this CPU runs it, else ``generic`` (also
    where its flags are unknown)."""
    flags = cpu_flags() if flags is None else flags
    if flags is None:
        return "generic"
    return "avx2" if set(ISA_FLAGS["avx2"]) <= flags else "generic"
