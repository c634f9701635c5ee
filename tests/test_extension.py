"""Whether the extension in place is current (used by `make gpu-check` to skip its build)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
import torch

from fused_attn import _extension

from .conftest import native_ops

pytestmark = pytest.mark.skipif(not _extension.loaded(), reason="fused_attn._C is not built here")


def test_the_extension_built_by_make_is_current():
    assert _extension.stale_reason() is None
    assert _extension.build_info()["sources_digest"]


def _elf_section_names(path: str) -> set[str]:
    """The section names of a 64-bit little-endian ELF file (what `readelf -S` lists)."""
    data = Path(path).read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, path
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names = headers[shstrndx][4]  # sh_offset of the section-name string table
    return {data[names + h[0]:data.index(b"\0", names + h[0])].decode() for h in headers}


def test_the_libraries_carry_debug_info_only_when_asked():
    """The C++ code is built without debug info (-g0 after Python's -g) unless FUSED_ATTN_DEBUG_INFO=1
    asked for it, as the build record says."""
    wanted = _extension.build_info().get("debug_info")
    if wanted is None:
        pytest.skip("built before the build record said whether it kept debug info")
    libraries = [p for p in (_extension.library_path(), _extension.cpu_library_path()) if p]
    for path in libraries:
        sections = _elf_section_names(path)
        assert ".text" in sections
        assert (".debug_info" in sections) == wanted, path


@pytest.mark.parametrize("change, reason", [
    ({"torch": "0.0.1"}, f"built for torch 0.0.1, this is torch {torch.__version__}"),
    ({"sources_digest": "0" * 64}, "the sources changed since it was built"),
])
def test_stale_when_built_for_another_torch_or_from_other_sources(monkeypatch, change, reason):
    info = {**_extension.build_info(), **change}
    monkeypatch.setattr(_extension, "build_info", lambda: info)
    assert _extension.stale_reason() == reason


def test_stale_without_a_build_record(monkeypatch):
    monkeypatch.setattr(_extension, "build_info", lambda: {})
    assert _extension.stale_reason() == "no build record"


def test_stale_when_the_gpu_architecture_is_missing(monkeypatch):
    info = {**_extension.build_info(), "cuda_arch_list": "7.0"}
    monkeypatch.setattr(_extension, "build_info", lambda: info)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(_extension, "cuda_kernels_compiled", lambda: True)
    assert _extension.stale_reason() == "built for CUDA architectures 7.0, the GPU is 9.0"


def test_the_cpu_kernels_loaded_are_the_widest_set_built_that_this_cpu_runs():
    # As make builds it (FUSED_ATTN_BUILD_CPU_ISAS unset: the default sets) and the package loads
    # it (FUSED_ATTN_CPU_ISA unset, or naming the set loaded).
    from fused_attn import _cpu_isa

    built = _extension.build_info()["cpu_isas"]
    assert built == _cpu_isa.default_build()
    isa = _extension.cpu_isa()
    assert isa in built and _cpu_isa.missing_flags(isa) == []
    assert _extension.cpu_kernels_error() is None
    if not os.environ.get("FUSED_ATTN_CPU_ISA"):
        assert isa == next(i for i in _cpu_isa.ISA_FLAGS if i in built and not _cpu_isa.missing_flags(i))


AVX512_CPU = {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "sse4_2"}
AVX2_CPU = {"avx2", "fma", "f16c", "avx512f", "sse4_2"}  # AVX-512 F alone is not torch's AVX-512 set


@pytest.mark.parametrize("flags, machine, built, chosen", [
    (AVX512_CPU, "x86_64", ["avx512", "avx2"], "avx512"),
    (AVX2_CPU, "x86_64", ["avx512", "avx2"], "avx2"),
    ({"avx2", "fma"}, "x86_64", ["avx512", "avx2", "generic"], "generic"),  # no F16C
    (set(), "x86_64", ["avx512", "avx2", "generic"], "generic"),
    (None, "aarch64", ["generic"], "generic"),
])
def test_the_sets_built_and_the_one_loaded_by_cpu(flags, machine, built, chosen):
    from fused_attn import _cpu_isa

    # Both x86-64 sets whatever the building CPU has (the library may run on another CPU).
    assert _cpu_isa.default_build(flags, machine) == built
    assert _cpu_isa.choose(built, flags) == (chosen, "the widest set built that this CPU runs")


@pytest.mark.parametrize("built, requested, chosen, reason", [
    (["avx512", "avx2"], "AVX2", "avx2", "FUSED_ATTN_CPU_ISA=avx2"),
    (["avx512", "avx2"], "generic", None,
     "FUSED_ATTN_CPU_ISA=generic, but the CPU kernels were built for avx512, avx2 "
     "(build it with FUSED_ATTN_BUILD_CPU_ISAS=avx512,avx2,generic)"),
    (["avx512", "avx2"], "sse", None, "FUSED_ATTN_CPU_ISA must be one of avx512, avx2, generic, got 'sse'"),
    (["avx512"], None, None,
     "the CPU kernels were built for avx512, none of which this CPU runs (avx512 needs avx512bw, avx512vl, "
     "avx512dq): rebuild with FUSED_ATTN_BUILD_CPU_ISAS=generic"),
    (["avx512", "avx2"], "avx512", None, "FUSED_ATTN_CPU_ISA=avx512, but this CPU lacks avx512bw, avx512vl, avx512dq"),
    ([], None, None, "no CPU kernel library is built (run `make build` or `pip install --no-build-isolation -e .`)"),
])
def test_the_set_requested_at_run_time(built, requested, chosen, reason):
    from fused_attn import _cpu_isa

    assert _cpu_isa.choose(built, AVX2_CPU, requested) == (chosen, reason)


@pytest.mark.parametrize("text, sets", [("avx2", ["avx2"]), (" avx2, AVX512 ", ["avx512", "avx2"]), ("", None),
                                        ("avx2,neon", None)])
def test_the_sets_requested_at_build_time(text, sets):
    from fused_attn import _cpu_isa

    if sets is None and text:
        with pytest.raises(ValueError, match=r"FUSED_ATTN_BUILD_CPU_ISAS must name sets among avx512, avx2, generic"):
            _cpu_isa.build_sets({"FUSED_ATTN_BUILD_CPU_ISAS": text})
    else:
        assert _cpu_isa.build_sets({"FUSED_ATTN_BUILD_CPU_ISAS": text}) == (sets or _cpu_isa.default_build())


def test_cpu_kernels_for_instructions_this_cpu_lacks_are_not_loaded(monkeypatch):
    # Loading such a library would work; its first kernel would die of SIGILL. The loader says why
    # instead, and the package runs without CPU kernels (the cpu backend unavailable, with that reason).
    from fused_attn import _cpu_isa

    info = {**_extension.build_info(), "cpu_isas": ["avx512"]}
    monkeypatch.setattr(_extension, "build_info", lambda: info)
    monkeypatch.setattr(_cpu_isa, "cpu_flags", lambda: AVX2_CPU)
    assert _extension._load_cpu_kernels({}) == (
        None,
        "the CPU kernels were built for avx512, none of which this CPU runs (avx512 needs avx512bw, avx512vl, "
        "avx512dq): rebuild with FUSED_ATTN_BUILD_CPU_ISAS=generic",
    )
    assert _extension.stale_reason().startswith("no CPU kernels this CPU runs: the CPU kernels were built for avx512")


def test_every_native_op_has_a_kernel_for_each_device_built():
    # The public functions route a call to an op by device; an op a device lacks would be a
    # NotImplementedError at the first call there (on a GPU: seen only when one is lent).
    ops = native_ops()
    assert "add_layer_norm_inference" in ops and "attention_bwd" in ops
    keys = ["CPU"] + (["CUDA"] if _extension.build_info().get("cuda_compiled") else [])
    for key in keys:
        missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_attn::{op}", key)]
        assert not missing, f"no {key} kernel: {missing}"


def test_every_native_op_has_an_autograd_kernel():
    # A formula for the differentiable ops (csrc/autograd.cpp), an error for the others: without
    # one, autograd would pass a call through and leave its results silently without a gradient.
    missing = [op for op in native_ops()
               if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_attn::{op}", "Autograd")]
    assert not missing, f"no Autograd kernel: {missing}"
