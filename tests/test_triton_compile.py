"""The Triton kernels compile for Hopper, here, without a GPU (tests/triton_compile_check.py).

The other Triton tests run the kernels under the interpreter, which accepts code that the compiler
rejects; this one lowers every kernel the ops launch to a cubin for sm90 (first autotune config,
a few cases per op) and checks its shared memory against the per-block limit.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "triton_compile_check.py"


def _nvidia_backend_missing() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        return "triton has no NVIDIA backend here"
    return None


@pytest.mark.skipif(_nvidia_backend_missing() is not None, reason=str(_nvidia_backend_missing()))
def test_triton_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, str(SCRIPT), "--arch", "90", "--quick", "--first-config"]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert "sm90:" in output and "FAILED" not in output, output[-3000:]
