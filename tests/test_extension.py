"""Whether the extension in place is current (used by `make gpu-check` to skip its build)."""

from __future__ import annotations

import pytest
import torch

from fused_attn import _extension

pytestmark = pytest.mark.skipif(not _extension.loaded(), reason="fused_attn._C is not built here")


def test_the_extension_built_by_make_is_current():
    assert _extension.stale_reason() is None
    assert _extension.build_info()["sources_digest"]


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


def test_the_build_takes_an_instruction_set_this_cpu_runs():
    # As make builds it (FUSED_ATTN_CPU_ISA unset: the default); the extension loaded, so the set
    # it was built for is one this CPU runs.
    from fused_attn import _cpu_isa

    isa = _extension.build_info()["cpu_isa"]
    assert _cpu_isa.missing_flags(isa) == []
    assert isa == _cpu_isa.default_isa()


AVX512_CPU = {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "sse4_2"}


@pytest.mark.parametrize("flags, default, lacking_avx512", [
    (AVX512_CPU, "avx2", []),  # AVX-512 is opt-in
    ({"avx2", "fma", "f16c", "avx512f"}, "avx2", ["avx512bw", "avx512vl", "avx512dq"]),
    ({"avx2", "fma"}, "generic", ["avx512f", "avx512bw", "avx512vl", "avx512dq", "f16c"]),
    (set(), "generic", ["avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c"]),
])
def test_cpu_instruction_set_by_flags(flags, default, lacking_avx512):
    from fused_attn import _cpu_isa

    assert _cpu_isa.default_isa(flags) == default
    assert _cpu_isa.missing_flags(default, flags) == []
    assert _cpu_isa.missing_flags("avx512", flags) == lacking_avx512


def test_a_library_built_for_instructions_this_cpu_lacks_is_not_loaded(monkeypatch):
    # Loading it would work; its first kernel would die of SIGILL. The loader says why instead,
    # and the package runs without it (stale_reason, and with it make, then rebuild it here).
    info = {**_extension.build_info(), "cpu_isa": "avx512"}
    monkeypatch.setattr(_extension, "build_info", lambda: info)
    monkeypatch.setattr(_extension, "missing_flags", lambda isa: ["avx512bw", "avx512vl"])
    reason = _extension._load()
    assert "built for the avx512 instruction set, which this CPU lacks (avx512bw, avx512vl)" in reason
    assert "FUSED_ATTN_CPU_ISA=avx2" in reason


def _native_ops() -> list[str]:
    names = [n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("fused_attn::")]
    return sorted(n for n in names if not n.startswith("triton_"))


def test_every_native_op_has_a_kernel_for_each_device_built():
    # The public functions route a call to an op by device; an op a device lacks would be a
    # NotImplementedError at the first call there (on a GPU: seen only when one is lent).
    ops = _native_ops()
    assert "add_layer_norm_inference" in ops and "attention_bwd" in ops
    keys = ["CPU"] + (["CUDA"] if _extension.build_info().get("cuda_compiled") else [])
    for key in keys:
        missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_attn::{op}", key)]
        assert not missing, f"no {key} kernel: {missing}"


def test_every_native_op_has_an_autograd_kernel():
    # A formula for the differentiable ops (csrc/autograd.cpp), an error for the others: without
    # one, autograd would pass a call through and leave its results silently without a gradient.
    missing = [op for op in _native_ops()
               if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_attn::{op}", "Autograd")]
    assert not missing, f"no Autograd kernel: {missing}"
