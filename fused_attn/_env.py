"""The environment every layer reads: the variables the ops consult on each call, and the longest
extent the GPU kernels take. Nothing of the package is imported here, so the Triton kernels can read
them without depending on the backend policy above them."""

from __future__ import annotations

import os

ENV_VAR = "FUSED_ATTN_BACKEND"
# The longest dimension (sequence, row width) the Triton and CUDA kernels take: their tile counts
# and loop counters are 32-bit, so a length within a loop step of 2^31 would wrap them. The largest
# step is the Triton LayerNorm's streamed block (64 KiB: 32768 16-bit elements) and softmax's
# (4096); csrc/cuda checks its own, looser bound (2^31 - 1024: its steps are at most a tile).
MAX_EXTENT = 2**31 - 2**16


def getenv(name: str) -> str | None:
    """``os.environ.get(name)``, read in about 0.05 us instead of 0.7 where Python keeps the
    environment as a bytes dict (POSIX): each op call reads two variables, which are read every
    time (not cached) so that setting one at run time takes effect at the next call."""
    data = getattr(os.environ, "_data", None)
    if os.name != "posix" or type(data) is not dict:
        return os.environ.get(name)
    key = _ENV_KEYS.get(name)
    value = data.get(key if key is not None else os.fsencode(name))
    return None if value is None else os.fsdecode(value)


# The encoded names of the variables the ops read, made once here and never changed: a cache
# filled on first use would be mutated inside the first torch.compile trace, whose guard on it
# would then fail and compile the graph a second time.
_ENV_KEYS: dict[str, bytes] = {
    name: os.fsencode(name) for name in ("TRITON_INTERPRET", "FUSED_ATTN_TRITON_AUTOTUNE", ENV_VAR)
}


def triton_interpret_mode() -> bool:
    return getenv("TRITON_INTERPRET") == "1"


def triton_autotune_enabled() -> bool:
    """Autotuning of the Triton kernels: on, unless FUSED_ATTN_TRITON_AUTOTUNE=0 (one default
    config per kernel: quick to compile, e.g. for test runs over many shapes) or interpreting."""
    return getenv("FUSED_ATTN_TRITON_AUTOTUNE") != "0" and not triton_interpret_mode()
