"""The CPU kernels are built once per vector instruction set and the widest this CPU runs is loaded
(fused_attn/_cpu_isa.py). The rest of the suite tests that one; here every other set built that
this CPU runs passes the CPU kernels' tests too, each in a process of its own (one set is loaded
per process), so that code of a narrower set (AVX2 on an AVX-512 machine) is not shipped untested."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fused_attn import _cpu_isa, _extension

ROOT = Path(__file__).resolve().parent.parent

# The tests of the CPU kernels: their parity (every op, dtype, mask, dropout, both backward
# schedules, the tile unit's products), edges, numerics and determinism, on the cpu backend.
KERNEL_TESTS = [
    "tests/test_attention.py", "tests/test_add_layer_norm.py", "tests/test_layer_norm.py", "tests/test_ffn.py",
    "tests/test_softmax.py", "tests/test_random_configs.py", "tests/test_misaligned.py", "tests/test_numerics.py",
    "tests/test_determinism.py", "tests/test_random.py",
]
SELECT = "cpu-cpu or test_cpu_"


def _other_sets() -> list:
    built = _extension.build_info().get("cpu_isas", [])
    params = []
    for isa in _cpu_isa.ISA_FLAGS:
        reason = None
        if isa not in built:
            reason = f"the {isa} CPU kernels are not built here"
        elif isa == _extension.cpu_isa():
            reason = f"{isa} is the set loaded: the rest of the suite tests it"
        elif _cpu_isa.missing_flags(isa):
            reason = f"this CPU lacks {', '.join(_cpu_isa.missing_flags(isa))}"
        params.append(pytest.param(isa, marks=[pytest.mark.skip(reason=reason)] if reason else []))
    return params


pytestmark = pytest.mark.skipif(_extension.cpu_isa() is None, reason=f"no CPU kernels: {_extension.cpu_kernels_error()}")


@pytest.mark.slow
@pytest.mark.parametrize("isa", _other_sets())
def test_the_kernel_tests_pass_with_each_other_set_built(isa):
    env = {**os.environ, _cpu_isa.RUN_ENV: isa}
    probe = subprocess.run(
        [sys.executable, "-c", "from fused_attn import _extension as e; print(e.cpu_isa(), e.cpu_kernels_error())"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert probe.stdout.split()[:2] == [isa, "None"], probe.stdout + probe.stderr
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", SELECT, *KERNEL_TESTS],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600,
    )
    assert run.returncode == 0, f"with {_cpu_isa.RUN_ENV}={isa}:\n" + run.stdout[-6000:] + run.stderr[-2000:]
    assert " passed" in run.stdout.splitlines()[-1]
