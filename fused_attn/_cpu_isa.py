"""The vector instruction sets of the extension's C++ CPU kernels. setup.py builds the kernels once
per set (``fused_attn/_C_cpu_<set>``, each a library of its own) and ``fused_attn._extension``
loads one of them at import: the widest this CPU runs, or the one FUSED_ATTN_CPU_ISA names, as
torch picks its own CPU kernels at run time (ATEN_CPU_CAPABILITY). A library built for
instructions the CPU lacks is never loaded (its first kernel would die of SIGILL, not raise), and
only one is loaded per process, so no code of a wider set can reach a narrower CPU. Standard
library only: setup.py loads this file on its own, before the package can be imported.

- ``avx512``: torch's AVX-512 set (F, BW, VL, DQ) with AVX2/FMA/F16C: 16 float32 lanes. On an
  AMX Xeon it made the bfloat16 attention forward about 20% faster than ``avx2`` and whole models
  3-7% (README, CPU figures);
- ``avx2``: AVX2, FMA and F16C: 8 float32 lanes; every x86-64 CPU since 2013-2015 has them;
- ``generic``: whatever the compiler targets by default (at::vec's portable loops).
"""

from __future__ import annotations

import os
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
    "generic": ["-Wno-psabi"],  # GCC's notes on passing at::vec's portable 32-byte vectors by value
}

# Build-time: FUSED_ATTN_BUILD_CPU_ISAS=avx2,avx512 (a comma list) names the sets to build.
# Run-time: FUSED_ATTN_CPU_ISA=avx2 names the one to load (it must be built and run on this CPU).
BUILD_ENV = "FUSED_ATTN_BUILD_CPU_ISAS"
RUN_ENV = "FUSED_ATTN_CPU_ISA"


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


def parse_list(text: str, name: str) -> list[str]:
    """The sets a comma list names, widest first; ValueError naming ``name`` for an unknown one."""
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in ISA_FLAGS]
    if unknown or not names:
        raise ValueError(f"{name} must name sets among {', '.join(ISA_FLAGS)} (comma-separated), got {text!r}")
    return [isa for isa in ISA_FLAGS if isa in names]


def default_build(flags: set[str] | None = None, machine: str | None = None) -> list[str]:
    """The sets a build makes unless told: on x86-64 ``avx512`` and ``avx2`` (whatever the building
    CPU has: the library may run on another), plus ``generic`` where the building CPU lacks AVX2;
    elsewhere ``generic`` alone."""
    machine = platform.machine() if machine is None else machine
    if machine not in ("x86_64", "AMD64"):
        return ["generic"]
    flags = cpu_flags() if flags is None else flags
    sets = ["avx512", "avx2"]
    if flags is not None and missing_flags("avx2", flags):
        sets.append("generic")
    return sets


def build_sets(environ: dict[str, str] | None = None) -> list[str]:
    """The sets setup.py builds: FUSED_ATTN_BUILD_CPU_ISAS, else ``default_build()``."""
    requested = (os.environ if environ is None else environ).get(BUILD_ENV, "")
    return parse_list(requested, BUILD_ENV) if requested.strip() else default_build()


def choose(built: list[str], flags: set[str] | None = None, requested: str | None = None) -> tuple[str | None, str]:
    """The set to load among ``built`` on a CPU with ``flags`` (None: this one): the one
    ``requested`` names (FUSED_ATTN_CPU_ISA) if given, else the widest it runs. Returns (set, why)
    or (None, the reason none can be loaded)."""
    flags = cpu_flags() if flags is None else flags
    if not built:
        return None, "no CPU kernel library is built (run `make build` or `pip install --no-build-isolation -e .`)"
    runnable = [isa for isa in ISA_FLAGS if isa in built and not missing_flags(isa, flags)]
    if requested:
        name = requested.strip().lower()
        if name not in ISA_FLAGS:
            return None, f"{RUN_ENV} must be one of {', '.join(ISA_FLAGS)}, got {requested!r}"
        if name not in built:
            return None, (f"{RUN_ENV}={name}, but the CPU kernels were built for {', '.join(built)} "
                          f"(build it with {BUILD_ENV}={','.join(sorted({name, *built}, key=list(ISA_FLAGS).index))})")
        lacking = missing_flags(name, flags)
        if lacking:
            return None, f"{RUN_ENV}={name}, but this CPU lacks {', '.join(lacking)}"
        return name, f"{RUN_ENV}={name}"
    if not runnable:
        lacking = {isa: missing_flags(isa, flags) for isa in built}
        detail = "; ".join(f"{isa} needs {', '.join(flags_)}" for isa, flags_ in lacking.items())
        return None, (f"the CPU kernels were built for {', '.join(built)}, none of which this CPU runs "
                      f"({detail}): rebuild with {BUILD_ENV}=generic")
    return runnable[0], "the widest set built that this CPU runs"
