"""benchmarks/triton_tiles.py, which times every Triton attention tile configuration on a GPU,
run here on a tiny shape under the interpreter with a stand-in timer: each configuration the
pruning keeps for the head dim is pinned in turn and run, and the kernels' candidate lists are
given back afterwards."""

from __future__ import annotations

import pytest
import torch

import fused_attn

triton = pytest.importorskip("triton")

from benchmarks import triton_tiles  # noqa: E402
from fused_attn.kernels.triton import attention as kernels  # noqa: E402


def test_every_configuration_is_pinned_run_and_given_back(monkeypatch):
    if "triton" not in fused_attn.available_backends("cpu"):
        pytest.skip("triton does not run on cpu tensors here (TRITON_INTERPRET=1 is not set)")
    # Two candidates per stage keep the interpreter's work small; the wide ones are not taken at head dim 16.
    monkeypatch.setattr(kernels, "_FWD_TILES", [(32, 32, 4, 1), (16, 32, 4, 1)])
    monkeypatch.setattr(kernels, "_BWD_TILES", [(32, 16, 4, 1), (16, 16, 4, 1)])
    lists = {name: getattr(kernels, name).configs for name in
             ("_attn_fwd_kernel", "_attn_bwd_stats_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")}
    calls, candidates = [], []

    def bench(fn):
        calls.append(fn())
        candidates.append([triton_tiles._config_id(c) for c in kernels._attn_bwd_dq_kernel.configs])
        return 2.0

    rows = triton_tiles.study(40, 16, True, bench, device="cpu", dtype=torch.float32, tokens=40, width=16)
    assert [(r["stage"], r["config"]) for r in rows] == [
        ("fwd", "autotuned"), ("bwd", "autotuned"), ("fwd", "32x32w4s1"), ("fwd", "16x32w4s1"),
        ("bwd", "32x16w4s1"), ("bwd", "16x16w4s1")]
    assert all("skipped" not in r and r["ms"] == 2.0 for r in rows), rows
    assert candidates[-2:] == [["32x16w4s1"], ["16x16w4s1"]]  # what the backward ran with, pinned
    assert rows[0]["tflops"] == 4 * 1 * 1 * 40 * 40 * 16 / 2 / 2.0 * 1e-9
    # Every run computed the same attention, whatever the tile.
    outs = [c[0] for c in calls if isinstance(c, tuple) and c[0].shape == (1, 1, 40, 16) and len(c) == 3]
    assert len(outs) == 3 and all(torch.allclose(o, outs[0], atol=1e-5) for o in outs)
    dqs = [c[0] for c in calls if len(c) == 4]
    assert len(dqs) == 3 and all(torch.allclose(d, dqs[0], atol=1e-5) for d in dqs)
    for name, configs in lists.items():
        assert getattr(kernels, name).configs is configs
