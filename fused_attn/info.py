"""``fused-attn info``: how the package was built and what this machine offers."""

from __future__ import annotations

import platform

import torch

from . import __version__, _compile_cache, _extension, backends


def gpu_name() -> str | None:
    if not torch.cuda.is_available():
        return None
    cc = torch.cuda.get_device_capability()
    return f"{torch.cuda.get_device_name()} (sm{cc[0]}{cc[1]})"


def collect() -> dict:
    """Build facts and machine facts, as one dict (also embedded in benchmark reports)."""
    build = _extension.build_info()
    return {
        "fused_attn": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "build": build,
        "extension_loaded": _extension.loaded(),
        "extension_error": _extension.load_error(),
        "extension_stale": _extension.stale_reason(),
        "extension_path": _extension.library_path(),
        "cuda_kernels_compiled": _extension.cuda_kernels_compiled(),
        "cpu_isa": _extension.cpu_isa(),
        "cpu_kernels_error": _extension.cpu_kernels_error(),
        "cpu_library_path": _extension.cpu_library_path(),
        "plain_call_entry": _extension.fast_module() is not None,
        "cpu_tile_dtypes": _extension.cpu_tile_dtypes(),
        "triton": backends.triton_version(),
        "triton_interpret": backends.triton_interpret_mode(),
        "compile_cache_tag": _compile_cache.current_tag(),
        "gpu": gpu_name(),
        "available_backends": {
            "cpu": backends.available_backends("cpu"),
            **({"cuda": backends.available_backends("cuda")} if torch.cuda.is_available() else {}),
        },
    }


def render(facts: dict) -> str:
    build = facts["build"]
    yes = {True: "yes", False: "no"}
    lines = [f"fused-attn {facts['fused_attn']}  (python {facts['python']}, torch {facts['torch']})", "", "build:"]
    if build:
        lines += [
            f"  built with torch  {build.get('torch')} (CUDA {build.get('torch_cuda')}) at {build.get('built_at')}",
            f"  CUDA kernels      {'compiled for ' + str(build.get('cuda_arch_list')) if build.get('cuda_compiled') else 'not compiled'}",
            f"  CPU kernels       built for {', '.join(build.get('cpu_isas') or [build.get('cpu_isa') or 'none'])}"
            f" from {', '.join(build.get('cpu_sources', [])) or 'the sources below'}",
            f"  sources           {', '.join(build.get('sources', []))}",
        ]
    else:
        lines.append("  no build record: the extension has not been built in this checkout")
    if build and facts.get("extension_stale"):
        lines.append(f"  REBUILD: {facts['extension_stale']}")
    lines += ["", "this machine:"]
    if facts["extension_loaded"]:
        lines.append(f"  extension         loaded ({facts['extension_path']})")
    else:
        lines.append(f"  extension         NOT loaded: {facts['extension_error']}")
    if facts.get("cpu_isa"):
        lines.append(f"  CPU kernels       {facts['cpu_isa']} ({facts['cpu_library_path']}; FUSED_ATTN_CPU_ISA picks another)")
    else:
        lines.append(f"  CPU kernels       NOT loaded: {facts.get('cpu_kernels_error')}")
    lines += [
        f"  CUDA kernels      {'registered' if facts['cuda_kernels_compiled'] else 'not registered'}",
        "  plain-call entry  "
        + ("C++ (fused_attn._C)" if facts.get("plain_call_entry") else "none: every call takes the Python path"),
        "  CPU tile unit     "
        + (f"{', '.join(facts['cpu_tile_dtypes'])} products of the attention kernels run on it"
           if facts["cpu_tile_dtypes"] else "not used (no AMX for 16-bit products, or oneDNN off)"),
        f"  GPU               {facts['gpu'] or 'none'}",
        f"  Triton            {facts['triton'] or 'not installed'}"
        + (f" (interpreter mode: {yes[facts['triton_interpret']]})" if facts["triton"] else ""),
        f"  compile cache tag {facts.get('compile_cache_tag') or 'none (this torch has no cache key tag)'}",
    ]
    for device, names in facts["available_backends"].items():
        lines.append(f"  backends ({device}) {' ' * (6 - len(device))}{', '.join(names)}")
    lines += ["", "ops (what each backend declares it serves):"]
    for op, spec in sorted(backends.registered_ops().items()):
        lines.append(f"  {op}")
        for name, support in spec.supports.items():
            lines.append(f"    {name:<10} {support.describe()}")
    return "\n".join(lines)
