"""Builds the extension: fused_attn._C (the op schemas, autograd, autocast, the plain-call entry and
the CUDA kernels) and the C++ CPU kernels, once per vector instruction set, each a library of its
own (fused_attn._C_cpu_avx512, _C_cpu_avx2, ...), of which fused_attn._extension loads the widest
this CPU runs (fused_attn/_cpu_isa.py).

The CPU kernels (csrc/cpu, and csrc/ffn.cpp's CPU half) are always compiled, for the sets
FUSED_ATTN_BUILD_CPU_ISAS names (a comma list of avx512, avx2, generic; default avx512,avx2 on
x86-64, generic elsewhere). The CUDA kernels (csrc/cuda) are compiled when a CUDA toolkit and a
CUDA build of torch are both present; FUSED_ATTN_BUILD_CUDA=0/1 forces either way.
TORCH_CUDA_ARCH_LIST picks the GPU architectures (default "8.0;9.0" when no GPU is visible) and
MAX_JOBS the number of parallel compile jobs; FUSED_ATTN_WERROR=0 keeps nvcc warnings from
failing the build; FUSED_ATTN_DEBUG_INFO=1 keeps the host code's debug info (off by default, see
cxx_flags).

What was built is written to fused_attn/_build_info.<python tag>.json so that `fused-attn info` can report it.
FUSED_ATTN_SKIP_EXTENSION=1 installs the Python package alone (the Makefile then builds the
extension in place, incrementally, with `setup.py build_ext --inplace`).
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import platform
import shutil
import site
import sys
import time
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
# One record per interpreter: extensions for several Pythons may sit side by side in place.
BUILD_INFO = ROOT / "fused_attn" / f"_build_info.{sys.implementation.cache_tag}.json"


def _package_module(name: str):
    """fused_attn/<name>.py loaded on its own (standard library only), before the package can be imported."""
    spec = importlib.util.spec_from_file_location(f"_fused_attn{name}", ROOT / "fused_attn" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sources_digest() -> str | None:
    return _package_module("_sources").sources_digest(ROOT)


def _env_flag(name: str) -> bool | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise SystemExit(f"{name} must be 0 or 1, got {value!r}")


def _cuda_library_includes(cuda_home: str) -> list[str]:
    """A folder of the headers that the CUDA library wheels (nvidia/*/include) have and the toolkit
    at ``cuda_home`` lacks, e.g. cuBLAS from nvidia/cu13, linked one by one.

    The wheels also carry the CUDA runtime's own headers at the CUDA version torch was built with;
    nvcc needs its toolkit's (cccl stops with "CUDA compiler and CUDA toolkit headers are
    incompatible" when torch's CUDA is newer than nvcc's, e.g. torch 2.15's 13.2 with nvcc 13.0),
    so the wheels' folders themselves are not put on the include path.
    """
    roots = list(site.getsitepackages()) + [site.getusersitepackages()] + sys.path
    toolkit = Path(cuda_home) / "include"
    folder = ROOT / "build" / "cuda-library-include"
    if folder.is_dir():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for root in dict.fromkeys(roots):
        for inc in sorted(glob.glob(os.path.join(root, "nvidia", "*", "include"))):
            for entry in sorted(Path(inc).iterdir()):
                link = folder / entry.name
                if not (toolkit / entry.name).exists() and not link.is_symlink():
                    link.symlink_to(entry.resolve())
    return [str(folder)]


def _cublaslt_link_args(cuda_home: str, cuda_version: str | None) -> list[str]:
    """Linker flags for cuBLASLt (csrc/cuda/ffn.cu): the library of the CUDA wheel that torch itself loads
    (nvidia/*/lib next to torch, e.g. nvidia/cu13/lib), else the toolkit's ($CUDA_HOME/lib64).

    The wheels ship only the versioned file (libcublasLt.so.13, no unversioned symlink), so it is named
    with -l: and the soname's major version taken from torch's CUDA. Importing torch has already loaded
    that soname, which the extension then shares; the rpath only matters for loading it without torch.
    """
    major = (cuda_version or "").split(".")[0]
    name = f"libcublasLt.so.{major}" if major else "libcublasLt.so"
    import torch

    roots = [str(Path(torch.__file__).resolve().parent.parent)]
    roots += list(site.getsitepackages()) + [site.getusersitepackages()] + sys.path
    candidates: list[str] = []
    for root in roots:
        candidates += sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib")))
    candidates += [os.path.join(cuda_home, "lib64"), os.path.join(cuda_home, "lib")]
    for folder in candidates:
        if os.path.isfile(os.path.join(folder, name)):
            return [f"-L{folder}", f"-l:{name}", f"-Wl,-rpath,{folder}"]
    return ["-lcublasLt"]  # let the linker search its default paths (and fail naming the library if absent)


def _cpu_isas() -> list[str]:
    try:
        return _package_module("_cpu_isa").build_sets()
    except ValueError as exc:
        raise SystemExit(str(exc)) from None


# The oldest torch the extension compiles against and the suite passes on (the C++ sources use
# c10 and ATen interfaces that torch 2.4, say, lacks); pyproject.toml asks for the same.
MIN_TORCH = (2, 11)


def main() -> None:
    import torch
    from torch.utils import cpp_extension

    release = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    if release < MIN_TORCH:
        raise SystemExit(
            f"fused-attn needs torch >= {'.'.join(map(str, MIN_TORCH))} to build its extension; "
            f"this is torch {torch.__version__}"
        )

    cuda_home = cpp_extension.CUDA_HOME
    cuda_possible = torch.version.cuda is not None and cuda_home is not None
    forced = _env_flag("FUSED_ATTN_BUILD_CUDA")
    if forced and not cuda_possible:
        raise SystemExit(
            "FUSED_ATTN_BUILD_CUDA=1 but CUDA cannot be built: "
            f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={cuda_home!r}"
        )
    build_cuda = cuda_possible if forced is None else forced

    if build_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"

    isas = _cpu_isas()
    cxx_flags = ["-O3", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
    # Python's own CFLAGS carry -g, which the C++ compiler takes before these: the debug info of
    # the template-heavy kernels was 95% of the libraries (the AVX-512 CPU kernels 26.8 MB against
    # 1.5 MB without it) and a third of their compile time (csrc/cpu/attention.cpp 23.5 s -> 16.3 s
    # with -g0), and it changes no instruction.
    debug_info = bool(_env_flag("FUSED_ATTN_DEBUG_INFO"))
    if not debug_info:
        cxx_flags.append("-g0")
    nvcc_flags = [
        "-O3",
        "--use_fast_math",
        "--expt-relaxed-constexpr",
        "-lineinfo",
        "-Xcompiler=-Wall",
    ]

    # Warnings are errors by default (CI keeps the kernels warning-free); FUSED_ATTN_WERROR=0 keeps
    # them warnings, e.g. when building against another torch whose headers warn.
    if _env_flag("FUSED_ATTN_WERROR") is not False:
        nvcc_flags.append("-Werror=all-warnings")

    # csrc/ffn.cpp is the FFN op of both devices: its CPU half goes with the CPU kernels, its CUDA
    # half (where CUDA is built) with the CUDA kernels.
    sources = [s for s in sorted(glob.glob("csrc/*.cpp")) if s != "csrc/ffn.cpp"]
    cpu_sources = sorted(glob.glob("csrc/cpu/*.cpp")) + ["csrc/ffn.cpp"]
    include_dirs = [str(ROOT / "csrc" / "include")]
    link_args = ["-fopenmp"]
    isa_flags = _package_module("_cpu_isa").COMPILE_FLAGS
    cpu_extensions = [
        cpp_extension.CppExtension(
            name=f"fused_attn._C_cpu_{isa}",
            sources=cpu_sources,
            include_dirs=list(include_dirs),
            extra_compile_args=[*cxx_flags, *isa_flags[isa], "-DFUSED_ATTN_CPU_KERNELS"],
            extra_link_args=list(link_args),
            py_limited_api=False,
        )
        for isa in isas
    ]
    if build_cuda:
        sources += ["csrc/ffn.cpp"] + sorted(glob.glob("csrc/cuda/*.cu"))
        include_dirs += _cuda_library_includes(cuda_home)
        link_args += _cublaslt_link_args(cuda_home, torch.version.cuda)
        cxx_flags.append("-DFUSED_ATTN_WITH_CUDA")
        nvcc_flags.append("-DFUSED_ATTN_WITH_CUDA")
        extension_cls = cpp_extension.CUDAExtension
    else:
        extension_cls = cpp_extension.CppExtension

    extension = extension_cls(
        name="fused_attn._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags} if build_cuda else cxx_flags,
        extra_link_args=link_args,
        py_limited_api=False,
    )

    facts = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_home": cuda_home,
        "cuda_compiled": build_cuda,
        "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if build_cuda else None,
        "cpu_isas": isas,
        "sources": sources,
        "cpu_sources": cpu_sources,
        "python": platform.python_version(),
        "sources_digest": _sources_digest(),
        "debug_info": debug_info,
    }

    class BuildExtension(cpp_extension.BuildExtension):
        """Builds each library in a folder of its own (the CPU kernel libraries compile the same
        sources with other flags), removes CPU kernel libraries of sets not built this time (they
        would be of older sources), and records what was built next to the extension once the
        build has succeeded."""

        def build_extension(self, ext) -> None:
            build_temp = self.build_temp
            self.build_temp = os.path.join(build_temp, ext.name.rpartition(".")[2])
            try:
                super().build_extension(ext)
            finally:
                self.build_temp = build_temp

        def run(self) -> None:
            super().run()
            facts["built_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
            package_dir = Path(self.get_ext_fullpath(extension.name)).parent
            built = {Path(self.get_ext_fullpath(ext.name)).name for ext in cpu_extensions}
            suffix = Path(self.get_ext_fullpath(extension.name)).name.partition(".")[2]
            for old in package_dir.glob(f"_C_cpu_*.{suffix}"):
                if old.name not in built:
                    old.unlink()
            (package_dir / BUILD_INFO.name).write_text(json.dumps(facts, indent=2) + "\n")

    skip = _env_flag("FUSED_ATTN_SKIP_EXTENSION")
    setup(
        ext_modules=[] if skip else [extension, *cpu_extensions],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )


if __name__ == "__main__":
    main()
