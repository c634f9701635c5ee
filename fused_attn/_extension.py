"""Loads the compiled extension ``fused_attn._C`` and remembers why, if it could not.

The extension registers its operators when loaded (``torch.ops.load_library``; they then live
under ``torch.ops.fused_attn``); it is also a Python module, whose functions are the public ops'
C++ entry for the plain call (csrc/fast.cpp, used by fused_attn.backends and fused_attn/ops).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

from ._cpu_isa import missing_flags
from ._sources import sources_digest

_BUILD_INFO = Path(__file__).with_name(f"_build_info.{sys.implementation.cache_tag}.json")


def build_info() -> dict:
    """The facts setup.py recorded about the build, or {} when it has not run."""
    try:
        return json.loads(_BUILD_INFO.read_text())
    except (OSError, ValueError):
        return {}


def _load() -> str | None:
    """Loads the library; returns None on success, else the reason it failed."""
    try:
        spec = importlib.util.find_spec("fused_attn._C")
    except (ImportError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    if spec is None or spec.origin is None:
        return "the extension is not built (run `make build` or `pip install --no-build-isolation -e .`)"
    # A library built for instructions this CPU lacks would die of SIGILL in its first kernel.
    isa = build_info().get("cpu_isa")
    lacking = missing_flags(isa) if isa else []
    if lacking:
        return (
            f"{spec.origin} was built for the {isa} instruction set, which this CPU lacks "
            f"({', '.join(lacking)}): rebuild it here (`make build`), or build with FUSED_ATTN_CPU_ISA=avx2 or generic"
        )
    try:
        torch.ops.load_library(spec.origin)
    except OSError as exc:
        return f"{spec.origin} failed to load: {exc}"
    return None


# Loaded once, at import: later queries read a constant (also while torch.compile traces).
_LOAD_ERROR = _load()


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
    spec = importlib.util.find_spec("fused_attn._C")
    return spec.origin if spec is not None else None


# Registrations do not change once the library is loaded: each answer is looked up once (backend
# choice asks on every call of an op).
_HAS_KERNEL: dict[tuple[str, str], bool] = {}


@torch._dynamo.assume_constant_result
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
    it did not load, was built for another torch, lacks the CUDA kernels where a GPU is visible
    (or code for that GPU's architecture), or its sources changed since (in a source checkout)."""
    if not loaded():
        return f"fused_attn._C not loaded: {load_error()}"
    info = build_info()
    if not info:
        return "no build record"
    if info.get("torch") != torch.__version__:
        return f"built for torch {info.get('torch')}, this is torch {torch.__version__}"
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
