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
