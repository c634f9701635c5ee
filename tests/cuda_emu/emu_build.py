"""Builds csrc/cuda/attention.cu, layer_norm.cu and ffn.cu for the host emulator
(tests/cuda_emu/cuda_emu.h; ffn.cu's cuBLASLt calls served by cublaslt_emu.h), and csrc/ffn.cpp as built
for CUDA, as the ``fused_attn_emu`` ops (tests/test_cuda_emulated.py).

Each kernel file's source is compiled as C++ after four rewrites, each of which must apply exactly as
often as listed (else the source has changed shape and this build says so): ``kernel<<<grid, block,
smem, stream>>>(args)`` becomes ``::cuda_emu::launch(kernel, grid, block, smem, stream)(args)``,
``extern __shared__ T name[];`` a pointer to the block's emulated dynamic shared memory, the
tensor device checks accept the CPU tensors the emulated kernels read, and csrc/ffn.cpp's operator
lookups (``find("fused_attn::...``) find the emulated ops (``fused_attn_emu::``). The CUDA registration block is
left out (the emulated ops register under their own namespace).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;()]*>)?)\s*<<<(.*?)>>>\(")
SHARED = re.compile(r"extern __shared__ (\w+) (\w+)\[\];")
REGISTRATION = re.compile(r"TORCH_LIBRARY_IMPL\(fused_attn, CUDA, m\) \{.*?\n\}\n", re.S)
IS_CUDA = re.compile(r"\.is_cuda\(\)")
LOOKUP = re.compile(r'find\("fused_attn::')
# Each source (under csrc/): its launches, extern __shared__ declarations, device checks and dispatcher
# lookups, as counted in it; each is compiled by tests/cuda_emu/<name>_emu.cpp (ffn_host: csrc/ffn.cpp as
# built for CUDA, looking up the emulated ops).
SOURCES = {"attention": ("cuda/attention.cu", 6, 3, 3, 0), "layer_norm": ("cuda/layer_norm.cu", 6, 0, 3, 0),
           "ffn": ("cuda/ffn.cu", 5, 0, 3, 0), "ffn_host": ("ffn.cpp", 0, 0, 0, 5)}


def cublas_include() -> Path | None:
    """The cuBLAS headers' directory (cublasLt.h): the CUDA toolkit's, or the one PyTorch's CUDA wheels
    install under site-packages/nvidia."""
    toolkit = cuda_include()
    if toolkit is not None and (toolkit / "cublasLt.h").is_file():
        return toolkit
    for base in map(Path, sys.path):
        for header in sorted(base.glob("nvidia/*/include/cublasLt.h")):
            return header.parent
    return None


def cuda_include() -> Path | None:
    """The CUDA toolkit's include directory (cuda_fp16.h, cuda_bf16.h, vector types), if any."""
    for base in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if base and (Path(base) / "include" / "cuda_bf16.h").is_file():
            return Path(base) / "include"
    nvcc = shutil.which("nvcc")
    if nvcc and (Path(nvcc).resolve().parents[1] / "include" / "cuda_bf16.h").is_file():
        return Path(nvcc).resolve().parents[1] / "include"
    return None


def rewrite(name: str, source: str) -> str:
    path, launches, shared, checks, lookups = SOURCES[name]
    rewrites = (
        (LAUNCH, r"::cuda_emu::launch(\1, \2)(", launches),
        (SHARED, r"\1* \2 = ::cuda_emu::dynamic_smem<\1>();", shared),
        (IS_CUDA, ".is_cpu()", checks),
        (LOOKUP, 'find("fused_attn_emu::', lookups),
        (REGISTRATION, "", 1),
    )
    for pattern, replacement, count in rewrites:
        source, n = pattern.subn(replacement, source)
        if n != count:
            raise RuntimeError(f"cuda emulator build: {pattern.pattern!r} matched {n} times in csrc/{path}, "
                               f"expected {count}")
    return source


def asan_runtime() -> Path | None:
    """GCC's AddressSanitizer runtime (to preload into a process that loads the memcheck build), if any."""
    try:
        out = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(out.stdout.strip())
    return path if path.is_absolute() and path.exists() else None


def build(build_dir: Path, verbose: bool = False, memcheck: bool = False) -> None:
    """Compiles (or reuses, when nothing changed) the emulated kernels and loads their ops. ``memcheck``:
    the build instrumented by AddressSanitizer (its own module name; the process must have preloaded
    asan_runtime()), in which a read or write past any tensor's allocation is reported."""
    include, cublas = cuda_include(), cublas_include()
    if include is None or cublas is None:
        raise RuntimeError("the CUDA toolkit's headers (cuda_bf16.h) or cuBLAS's (cublasLt.h) were not found; "
                           "set CUDA_HOME")
    from torch.utils import cpp_extension

    build_dir.mkdir(parents=True, exist_ok=True)
    for name in SOURCES:
        generated = build_dir / f"{name}_emulated.inc"
        text = rewrite(name, (ROOT / "csrc" / SOURCES[name][0]).read_text())
        if not generated.is_file() or generated.read_text() != text:
            generated.write_text(text)
    sanitize = ["-fsanitize=address", "-fno-omit-frame-pointer"] if memcheck else []
    cpp_extension.load(
        name="fused_attn_emu_memcheck" if memcheck else "fused_attn_emu",
        sources=[str(HERE / f"{name}_emu.cpp") for name in SOURCES],
        extra_include_paths=[str(HERE / "include"), str(build_dir), str(ROOT / "csrc" / "include"), str(include),
                            str(cublas)],
        extra_cflags=["-O2", "-fvisibility=hidden", "-DFUSED_ATTN_CUDA_EMULATION", "-Wno-unknown-pragmas",
                      "-Wno-unused-function", "-Wno-attributes", *sanitize],
        extra_ldflags=sanitize,
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=verbose,
    )
    if not hasattr(torch.ops.fused_attn_emu, "layer_norm_fwd"):
        raise RuntimeError("the emulated kernels were built but their ops did not register")
