"""Loads the compiled extension and remembers why, if it could not.

``fused_attn._C`` registers the operators (``torch.ops.load_library``; they then live under
``torch.ops.fused_attn``), their autograd and autocast kernels and the CUDA kernels; it is also a
Python module, whose functions are the public ops' C++ entry for the plain call (csrc/fast.cpp,
used by fused_attn.backends and fused_attn/ops). The CPU kernels are built once per vector
instruction set (``fused_attn._C_cpu_<set>``, fused_attn/_cpu_isa.py) and one of them is loaded
after it: the widest this CPU runs, or the one FUSED_ATTN_CPU_ISA names (``cpu_isa()`` says which,
``cpu_kernels_error()`` why none).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import torch

from . import _cpu_isa
from ._sources import sources_digest

_BUILD_INFO = Path(__file__).with_name(f"_build_info.{sys.implementation.cache_tag}.json")


def build_info() -> dict:
    """The facts setup.py recorded about the build, or {} when it has not run."""
    try:
        return json.loads(_BUILD_INFO.read_text())
    except (OSError, ValueError):
        return {}


def _find(name: str) -> str | None:
    try:
        spec = importlib.util.find_spec(f"fused_attn.{name}")
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None else None


def _load() -> str | None:
    """Loads fused_attn._C; returns None on success, else the reason it failed."""
    origin = _find("_C")
    if origin is None:
        return "the extension is not built (run `make build` or `pip install --no-build-isolation -e .`)"
    try:
        torch.ops.load_library(origin)
    except OSError as exc:
        return f"{origin} failed to load: {exc}"
    return None


def _built_cpu_sets(info: dict) -> dict[str, str]:
    """The CPU kernel libraries the build record ``info`` lists and that are in place: set -> path."""
    paths = {isa: _find(f"_C_cpu_{isa}") for isa in info.get("cpu_isas", [])}
    return {isa: path for isa, path in paths.items() if path is not None}


def _load_cpu_kernels(environ=os.environ) -> tuple[str | None, str | None]:
    """Loads one library of CPU kernels, after fused_attn._C: (the set loaded, None) on success,
    else (None, the reason). Never one built for instructions this CPU lacks: it would die of
    SIGILL in its first kernel, not raise."""
    if _LOAD_ERROR is not None:
        return None, f"fused_attn._C not loaded: {_LOAD_ERROR}"
    built = _built_cpu_sets(build_info())
    isa, why = _cpu_isa.choose(list(built), requested=environ.get(_cpu_isa.RUN_ENV))
    if isa is None:
        return None, why
    origin = built[isa]
    try:
        torch.ops.load_library(origin)
    except OSError as exc:
        return None, f"{origin} failed to load: {exc}"
    return isa, None


# Loaded once, at import: later queries read a constant (also while torch.compile traces).
_LOAD_ERROR = _load()
_CPU_ISA, _CPU_ERROR = _load_cpu_kernels()


def _fast_module() -> object | None:
    """The library's Python module (csrc/fast.cpp: the public functions' C++ entry for the plain
    call), imported from the file just loaded; None without it (e.g. a library built before it)."""
    if _LOAD_ERROR is not None:
        return None
    try:
        module = importlib.import_module("fused_attn._C")
    except ImportError:
        return None
    return module if hasattr(module, "approve") else None


_FAST = _fast_module()


def fast_module() -> object | None:
    return _FAST


def cpu_tile_dtypes() -> list[str]:
    """The dtypes whose products the CPU kernels run on the CPU's tile unit (AMX: attention's
    products of 16-bit inputs; README, CPU figures), as this machine and torch's oneDNN setting
    (``torch.backends.mkldnn.enabled``) allow now; empty without the extension."""
    return list(_FAST.cpu_tile_dtypes()) if _FAST is not None else []


def loaded() -> bool:
    return _LOAD_ERROR is None


def load_error() -> str | None:
    return _LOAD_ERROR


def library_path() -> str | None:
    return _find("_C")


def cpu_isa() -> str | None:
    """The instruction set of the CPU kernels loaded (``avx512``, ``avx2``, ``generic``), or None."""
    return _CPU_ISA


def cpu_kernels_error() -> str | None:
    """Why no CPU kernels are loaded (None when they are)."""
    return _CPU_ERROR


def cpu_library_path() -> str | None:
    return _find(f"_C_cpu_{_CPU_ISA}") if _CPU_ISA else None


def assume_constant(fn):
    """``torch.compiler.assume_constant_result(fn)`` (Dynamo runs ``fn`` while tracing and takes its
    result as a constant) without importing torch._dynamo, which the decorator does and which would
    add half a second to the package's import: the mark it sets, set here (tests/test_compile.py
    checks that the decorator still sets just that)."""
    fn._dynamo_marked_constant = True
    return fn


# Registrations do not change once the library is loaded: each answer is looked up once (backend
# choice asks on every call of an op).
_HAS_KERNEL: dict[tuple[str, str], bool] = {}


@assume_constant
def has_kernel(op: str, device_type: str) -> bool:
    """Whether the loaded library registered a ``device_type`` ("cpu"/"cuda") kernel for ``fused_attn::op``."""
    key = (op, device_type)
    found = _HAS_KERNEL.get(key)
    if found is None:
        found = _HAS_KERNEL[key] = loaded() and torch._C._dispatch_has_kernel_for_dispatch_key(
            f"fused_attn::{op}", device_type.upper()
        )
    return found


def cuda_kernels_compiled() -> bool:
    """True when the loaded library registered CUDA kernels (asked of the dispatcher itself)."""
    return has_kernel("layer_norm_fwd", "cuda")


def stale_reason() -> str | None:
    """Why the extension in place should be rebuilt before use here, or None when it need not:
    it did not load, was built for another torch, has no CPU kernels this CPU runs, lacks the CUDA
    kernels where a GPU is visible (or code for that GPU's architecture), or its sources changed
    since (in a source checkout)."""
    if not loaded():
        return f"fused_attn._C not loaded: {load_error()}"
    info = build_info()
    if not info:
        return "no build record"
    if info.get("torch") != torch.__version__:
        return f"built for torch {info.get('torch')}, this is torch {torch.__version__}"
    isa, why = _cpu_isa.choose(list(_built_cpu_sets(info)))
    if isa is None:
        return f"no CPU kernels this CPU runs: {why}"
    if torch.cuda.is_available():
        if not cuda_kernels_compiled():
            return "built without its CUDA kernels, and a GPU is visible"
        major, minor = torch.cuda.get_device_capability()
        archs = (info.get("cuda_arch_list") or "").replace(" ", ";").split(";")
        if archs != [""] and not any(a.split("+")[0] == f"{major}.{minor}" for a in archs):
            return f"built for CUDA architectures {info.get('cuda_arch_list')}, the GPU is {major}.{minor}"
    current = sources_digest(Path(__file__).resolve().parent.parent)
    if current is not None and current != info.get("sources_digest"):
        return "the sources changed since it was built"
    return None
