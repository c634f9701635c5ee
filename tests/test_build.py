"""setup.py: its choice of CUDA include folders, its torch floor, the source distribution's
contents (no compiler is run)."""

from __future__ import annotations

import importlib.util
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _setup_module():
    spec = importlib.util.spec_from_file_location("fused_attn_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cuda_library_headers_never_shadow_the_toolkits(tmp_path, monkeypatch):
    """Only the headers of the CUDA library wheels that the toolkit lacks (cuBLAS, NCCL, ...) go on
    the include path: the wheels' own copies of the CUDA runtime headers, at the CUDA version torch
    was built with, must not replace nvcc's (torch 2.15's CUDA 13.2 headers stop nvcc 13.0)."""
    setup = _setup_module()
    toolkit = tmp_path / "cuda"
    (toolkit / "include" / "cccl").mkdir(parents=True)
    (toolkit / "include" / "cuda_runtime.h").write_text("toolkit")
    wheels = tmp_path / "site-packages"
    cu13 = wheels / "nvidia" / "cu13" / "include"
    (cu13 / "cccl").mkdir(parents=True)
    for name in ("cuda_runtime.h", "cublasLt.h"):
        (cu13 / name).write_text("wheel")
    nccl = wheels / "nvidia" / "nccl" / "include"
    nccl.mkdir(parents=True)
    (nccl / "nccl.h").write_text("wheel")
    monkeypatch.setattr(setup, "ROOT", tmp_path / "source")
    monkeypatch.setattr(site, "getsitepackages", lambda: [str(wheels)])
    monkeypatch.setattr(site, "getusersitepackages", lambda: str(tmp_path / "user"))
    monkeypatch.setattr(sys, "path", [str(wheels)])

    [folder] = setup._cuda_library_includes(str(toolkit))
    assert sorted(p.name for p in Path(folder).iterdir()) == ["cublasLt.h", "nccl.h"]
    assert (Path(folder) / "cublasLt.h").read_text() == "wheel"

    # Each build links the folder anew: a header gone from the wheels is gone from it.
    (cu13 / "cublasLt.h").unlink()
    [folder] = setup._cuda_library_includes(str(toolkit))
    assert sorted(p.name for p in Path(folder).iterdir()) == ["nccl.h"]


def test_an_older_torch_is_refused_by_name(monkeypatch):
    """The extension's sources need torch 2.11's c10/ATen interfaces: an older torch gets one line
    naming both versions instead of a page of compiler errors."""
    setup = _setup_module()
    monkeypatch.setattr(torch, "__version__", "2.4.1+cu121")
    with pytest.raises(SystemExit, match=r"fused-attn needs torch >= 2\.11 to build its extension; this is torch 2\.4\.1"):
        setup.main()
    pyproject = (ROOT / "pyproject.toml").read_text()
    floor = ".".join(map(str, setup.MIN_TORCH))
    assert pyproject.count(f'"torch>={floor}"') == 2  # the build's requirements and the package's


def test_the_source_distribution_holds_what_the_build_reads(tmp_path):
    """setup.py lists the .cpp/.cu files it compiles, not the headers they include: the source
    distribution (MANIFEST.in) must carry every file under csrc/, or a build from it fails at its
    first #include. Checked on the manifest setuptools writes for an sdist (egg_info's
    SOURCES.txt), written outside the checkout."""
    env = {**os.environ, "FUSED_ATTN_SKIP_EXTENSION": "1"}
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    listed = set((tmp_path / "fused_attn.egg-info" / "SOURCES.txt").read_text().split())
    csrc = {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*") if p.is_file()}
    assert {p for p in csrc if p.endswith((".h", ".cuh"))}, "no headers found under csrc/"
    assert sorted(csrc - listed) == []
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE", "fused_attn/_cpu_isa.py",
                 "fused_attn/kernels/triton/attention.py", "tests/cuda_emu/cuda_emu.h"):
        assert name in listed, name
    assert not [p for p in listed if p.startswith("benchmarks/results/") or p.endswith((".so", ".pyc"))]
