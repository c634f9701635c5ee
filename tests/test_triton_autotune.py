"""Config choice with autotuning off (fused_attn/kernels/triton/_autotune.py), without a GPU."""

from __future__ import annotations

import types

import pytest

triton = pytest.importorskip("triton")

from fused_attn.kernels.triton import _autotune  # noqa: E402


class FakeKernel:
    """Compiles a config to an object that reports the shared memory of its BLOCK_M."""

    def __init__(self, shared_by_block):
        self.shared_by_block, self.compiled = shared_by_block, []

    def warmup(self, *args, grid, **kwargs):
        self.compiled.append((args, kwargs["BLOCK_M"], kwargs["HEAD"]))
        return types.SimpleNamespace(metadata=types.SimpleNamespace(shared=self.shared_by_block[kwargs["BLOCK_M"]]))


CONFIGS = [triton.Config({"BLOCK_M": m}, num_warps=4, num_stages=2) for m in (128, 64, 32)]


def test_first_config_that_fits_the_device(monkeypatch):
    kernel = FakeKernel({128: 300_000, 64: 200_000, 32: 100_000})
    monkeypatch.setattr(_autotune, "shared_memory_limit", lambda: 232_448)
    chosen = _autotune.first_that_fits(kernel, CONFIGS, {"x": "tensor"}, {"HEAD": 64, "grid": None, "warmup": False})
    assert chosen == [CONFIGS[1]]
    assert kernel.compiled == [(("tensor",), 128, 64), (("tensor",), 64, 64)]  # stops at the first that fits


def test_first_config_when_none_fits_or_the_limit_is_unknown(monkeypatch):
    kernel = FakeKernel({128: 300_000, 64: 300_000, 32: 300_000})
    monkeypatch.setattr(_autotune, "shared_memory_limit", lambda: 100_000)
    assert _autotune.first_that_fits(kernel, CONFIGS, {}, {"HEAD": 1}) == [CONFIGS[0]]
    monkeypatch.setattr(_autotune, "shared_memory_limit", lambda: None)
    assert _autotune.first_that_fits(kernel, CONFIGS, {}, {"HEAD": 1}) == [CONFIGS[0]]


def test_pruner_keeps_every_candidate_when_autotuning(monkeypatch):
    keep = lambda configs, args: [c for c in configs if c.kwargs["BLOCK_M"] <= args["HEAD"]]  # noqa: E731
    kernel = types.SimpleNamespace(fn=FakeKernel({64: 1, 32: 1}))
    prune = _autotune.pruner(lambda: kernel, keep)
    monkeypatch.setenv("FUSED_ATTN_TRITON_AUTOTUNE", "1")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert prune(CONFIGS, {"x": 1}, HEAD=64) == CONFIGS[1:]
    assert kernel.fn.compiled == []
    monkeypatch.setenv("FUSED_ATTN_TRITON_AUTOTUNE", "0")
    monkeypatch.setattr(_autotune, "shared_memory_limit", lambda: 10)
    assert prune(CONFIGS, {"x": 1}, HEAD=64) == [CONFIGS[1]]


def test_no_timing_when_autotuning_is_off(monkeypatch):
    calls = []
    monkeypatch.setenv("FUSED_ATTN_TRITON_AUTOTUNE", "0")
    assert _autotune.benchmark(lambda: calls.append(1), quantiles=(0.5, 0.2, 0.8)) == [0.0, 0.0, 0.0]
    assert calls == []


_SPECIALISATION_CHECK = """
import inspect
from fused_attn.kernels.triton import attention, ffn, layer_norm

CODE_FLAGS = ["BLOCK_D", "BLOCK_DV", "IS_CAUSAL", "HAS_MASK", "MASK_IS_BOOL", "KEY_RANGE", "DROPOUT", "WRITE_KEEP",
              "WRITE_DSCORES", "KEY_BOUNDS", "RAW_SCORES"]
kernels = [
    attention._attn_fwd_kernel, attention._attn_bwd_stats_kernel, attention._attn_bwd_dkdv_kernel,
    attention._attn_bwd_dq_kernel, ffn._gemm_kernel, layer_norm._norm_fwd_kernel, layer_norm._norm_bwd_kernel,
]
for kernel in kernels:
    jit = kernel.fn if hasattr(kernel, "configs") else kernel  # the JITFunction, under an autotuner or not
    names = list(inspect.signature(jit.fn).parameters)
    wanted = {"seed_ptr", "Q_BUCKET", "K_BUCKET", "M_BUCKET"} & set(names)
    assert "seed_ptr" in wanted, jit.fn.__name__
    free = {names[i] if isinstance(i, int) else i for i in jit.do_not_specialize}
    assert wanted <= free, (jit.fn.__name__, sorted(wanted - free))
    if hasattr(kernel, "configs"):
        # A tuning key names arguments of its kernel only (Triton 3.9 refuses any other name), and
        # every flag that changes the attention kernels' code or shared memory that the kernel takes.
        assert set(kernel.keys) <= set(names), (jit.fn.__name__, sorted(set(kernel.keys) - set(names)))
        if jit.fn.__name__.startswith("_attn"):
            missing = set(CODE_FLAGS) & set(names) - set(kernel.keys)
            assert not missing, (jit.fn.__name__, sorted(missing))
assert ffn._gemm_kernel.keys == ["M_BUCKET", "N", "K_BUCKET", "A_PROLOGUE", "B_PROLOGUE", "EPILOGUE", "K_BOUNDS"]
assert {"Q_BUCKET", "K_BUCKET"} <= set(attention._attn_fwd_kernel.keys)
assert "WRITE_DSCORES" in attention._attn_bwd_dq_kernel.keys and "WRITE_KEEP" in attention._attn_fwd_kernel.keys
print("ok")
"""


def test_per_call_values_do_not_specialise_the_compiled_kernels():
    """A new seed per call, or a new length within a bucket, must reuse the compiled kernel:
    Triton would otherwise compile a variant for int arguments divisible by 16 (or equal to 1),
    one call in sixteen paying a compilation, and for a seed tensor's address aligned to 16 bytes
    or not. And the GEMM's tuning is keyed by size buckets, not
    by the exact token count (each new count would time every config again). Checked on the
    compiled kernels' declarations (the interpreter keeps none), in a process without
    TRITON_INTERPRET."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _SPECIALISATION_CHECK], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr


@pytest.mark.parametrize("kernel", ["attention", "ffn"])
def test_tiles_skip_the_bounds_only_where_every_configs_tile_divides_the_length(kernel):
    """The attention's KEY_BOUNDS and the FFN GEMM's K_BOUNDS are fixed before the autotuner picks a
    tile: a length that any config's tile (the GPU's or the interpreter's, forward or backward) does
    not divide must keep the per-element bounds; one that all of them divide may drop them."""
    from fused_attn.kernels.triton import attention, ffn

    if kernel == "attention":
        configs = [c for interpret in (False, True) for stage in ("fwd", "bwd")
                   for c in attention._configs(stage, interpret)]
        blocks, bounds, expected = {c.kwargs["BLOCK_N"] for c in configs}, attention._key_bounds, {32, 64, 128}
    else:
        configs = [c for interpret in (False, True) for c in ffn._configs(interpret)]
        blocks, bounds, expected = {c.kwargs["BLOCK_K"] for c in configs}, ffn._k_bounds, {32, 64}
    assert expected <= blocks
    for length in range(1, 1100):
        assert bounds(length) == any(length % block for block in blocks), length
    assert not bounds(512) and not bounds(768) and not bounds(3072) and bounds(77) and bounds(200)
    assert bounds(192) == (kernel == "attention") and bounds(96)


def test_raw_products_only_for_a_boolean_or_no_mask_and_a_moderate_positive_scale():
    """RAW_SCORES ("Units" in the attention module's docstring): the kernels keep q.k unscaled
    only where scale * log2(e) is finite and normal and no floating mask is added to the scores."""
    import math

    import torch

    from fused_attn.kernels.triton import attention

    boolean, floating = torch.ones(1, 1, 1, 4, dtype=torch.bool), torch.zeros(1, 1, 1, 4)
    for scale in (2.0**-100, 0.125, 1.0, 8.0, 2.0**100):
        assert attention._raw_scores(None, scale) and attention._raw_scores(boolean, scale), scale
        assert not attention._raw_scores(floating, scale), scale
        assert not attention._raw_scores(floating.half(), scale), scale
    for scale in (0.0, -0.0, -0.125, -1.0, 2.0**-100 * 0.999, 2.0**-101, 2.0**100 * 1.001, 1e38, float("inf")):
        assert not attention._raw_scores(None, scale) and not attention._raw_scores(boolean, scale), scale
    assert not attention._raw_scores(None, float("nan"))
    # The bounds' factor scale * log2(e), in float32 as the kernels form it, is finite and normal.
    factors = torch.tensor([2.0**-100, 2.0**100], dtype=torch.float32) * math.log2(math.e)
    assert bool(torch.isfinite(factors).all()) and bool((factors >= torch.finfo(torch.float32).tiny).all())


def test_host_sizes_match_tritons():
    """The launchers' plain-int cdiv and next_power_of_2 (fused_attn/kernels/triton/_grid.py) give
    what Triton's constexpr functions of the same names give."""
    from fused_attn.kernels.triton._grid import cdiv, next_power_of_2

    assert all(cdiv(a, b) == triton.cdiv(a, b) for a in range(0, 300) for b in range(1, 70))
    assert all(next_power_of_2(n) == triton.next_power_of_2(n) for n in range(1, 5000))
    assert cdiv(2**40 + 1, 2**20) == 2**20 + 1 and next_power_of_2(2**31 - 1) == 2**31
