"""The CUDA kernels (csrc/cuda/attention.cu, layer_norm.cu, ffn.cu) run here, without a GPU, under the
host emulator of tests/cuda_emu: every CUDA thread a fiber, the tensor-core products, ldmatrix loads,
warp shuffles, cp.async copies and barriers computed from their PTX definitions (cuda_emu.h), ffn.cu's
cuBLASLt calls served as cuBLASLt documents them (cublaslt_emu.h). The kernels' own code runs unchanged
(only their inline-PTX wrappers call the emulator), launched by their own host code on CPU tensors, so
parity here (on grids of shapes, and on every op's seeded random cases of tests/test_random_configs.py)
checks the tiling, the fragment bookkeeping, masks, causal skipping, key spans, grouped
heads, dropout, the backward's row statistics, the row mappings, vector paths and parameter-gradient
splits, the GEMM descriptors' layouts and epilogues, and the launchers' choices, on every push. It does
not check what only the hardware and nvcc decide (timing, register and shared-memory limits, the tensor
cores' own accumulation order, --use_fast_math's approximate exponentials and flush-to-zero, which the
host's IEEE arithmetic does not imitate, cuBLASLt's own kernels): the GPU runs (`make gpu-check`) do.

Each case is judged as the GPU parity tests judge the cuda backend (tests/conftest.py: assert_parity),
and the emulator turns undefined behaviour into errors (divergent warp instructions, deadlocks, shared
memory out of range, shared-memory races between warps, GEMM descriptors cuBLASLt would reject), so a
failure names the kernel's fault.
Besides parity: the results are the same bits with either timing of the asynchronous copies, any order
of the threads, and both row layouts (64 and 128 rows per block); ldmatrix reads are free of bank
conflicts, and fewer per product with 128 rows; the tensor-core products counted show causal and
padded work skipped; and under
AddressSanitizer no kernel touches memory outside its tensors.
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from fused_attn import reference
from fused_attn.ops._random import draw_seed
from fused_attn.ops._validate import broadcast_mask, rows
from fused_attn.ops.add_layer_norm import add_layer_norm_keep_mask
from fused_attn.ops.attention import attention_with_keep_mask
from fused_attn.ops.ffn import ffn_activation, ffn_keep_mask
from fused_attn.ops.softmax import _as_4d, _shifts_whole_slices

from .conftest import assert_parity, check_tensor_parity
from .cuda_emu import emu_build
from .test_random_configs import (
    _add_layer_norm_result, _attention_case, _attention_dropout_case, _ffn_case, _layout, _norm_case, _softmax_case,
)
from .test_random_configs import _parity as random_configs_parity

ROOT = Path(__file__).resolve().parents[1]
DTYPES = pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
# The emulated device for the parity tests: an H100's 132 multiprocessors, asynchronous copies landing
# only at the wait that covers them, and warps run one at a time as far ahead as the barriers allow.
PARITY_CONFIG = (132, True, 1)
# Seeded cases per op drawn by tests/test_random_configs.py's generators.
RANDOM_CASES = 24


@pytest.fixture(scope="module")
def emu():
    if platform.system() != "Linux":
        pytest.skip("the CUDA emulator runs on Linux")
    if emu_build.cuda_include() is None or emu_build.cublas_include() is None:
        pytest.skip("the CUDA toolkit's and cuBLAS's headers are not installed (set CUDA_HOME)")
    emu_build.build(ROOT / "build" / "cuda_emu")
    ops = torch.ops.fused_attn_emu
    ops.configure(*PARITY_CONFIG)
    yield ops


class _Attention(torch.autograd.Function):
    """The emulated kernels as an autograd function, as fused_attn/ops/attention.py wires the native ops."""

    @staticmethod
    def forward(ctx, ops, query, key, value, mask, scale, causal, dropout_p, seed):
        out, stats = ops.attention_fwd(query, key, value, mask, scale, causal, dropout_p, seed)
        ctx.save_for_backward(query, key, value, mask, stats, seed)
        ctx.args = (ops, scale, causal, dropout_p)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, mask, stats, seed = ctx.saved_tensors
        ops, scale, causal, dropout_p = ctx.args
        needs_mask = bool(ctx.needs_input_grad[4])
        dq, dk, dv, dmask = ops.attention_bwd(
            grad_out.contiguous(), query, key, value, mask, stats, scale, causal, dropout_p, seed, needs_mask
        )
        return None, dq, dk, dv, (dmask.to(mask.dtype) if needs_mask else None), None, None, None, None


def attention(ops, query, key, value, attn_mask=None, is_causal=False, scale=None, dropout_p=0.0, seed=None):
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    if attn_mask is not None:
        attn_mask = attn_mask.expand(*query.shape[:3], key.shape[2])
    return _Attention.apply(ops, query, key, value, attn_mask, scale, is_causal, dropout_p, seed)


def _inputs(batch, heads, q_len, k_len, d, dtype, *, kv_heads=None, dv=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    kv_heads = heads if kv_heads is None else kv_heads
    q = torch.randn(batch, heads, q_len, d, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, k_len, d, generator=gen).to(dtype)
    v = torch.randn(batch, kv_heads, k_len, d if dv is None else dv, generator=gen).to(dtype)
    return q, k, v


def _mask(kind, batch, heads, q_len, k_len, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    if kind in ("none", "causal"):
        return None
    if kind in ("padding", "causal+padding", "left-padding"):
        lengths = torch.randint(1, k_len + 1, (batch,), generator=gen)
        keep = torch.arange(k_len)[None, :] < lengths[:, None]
        if kind == "left-padding":
            keep = keep.flip(-1)
        return keep.view(batch, 1, 1, k_len)
    if kind == "bool4d":
        keep = torch.rand(batch, heads, q_len, k_len, generator=gen) > 0.3
        keep[..., 0] = True
        return keep
    if kind == "bias":
        return (torch.randn(batch, 1, q_len, k_len, generator=gen) * 2).to(dtype)
    raise ValueError(kind)


def _requested(grads, needs):
    """The gradients an autograd function returns for its inputs: those asked for, None for the rest."""
    return tuple(g if need else None for g, need in zip(grads, needs))


def _same_bits_under(emu, configs, run):
    """run()'s tensors under each emulator configuration (multiprocessors, copies at their wait,
    schedule seed) must be bitwise the same; the parity configuration is restored afterwards."""
    runs = []
    try:
        for config in configs:
            emu.configure(*config)
            runs.append(run())
    finally:
        emu.configure(*PARITY_CONFIG)
    for other in runs[1:]:
        assert len(other) == len(runs[0])
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def _repeat(t, heads):
    return t.repeat_interleave(heads // t.shape[1], dim=1)


def _parity(ops, q, k, v, mask=None, causal=False, scale=None, mask_grad=False):
    args = {"query": q, "key": k, "value": v, "attn_mask": mask}
    heads = q.shape[1]
    assert_parity(
        lambda query, key, value, attn_mask: attention(ops, query, key, value, attn_mask, causal, scale),
        lambda query, key, value, attn_mask: reference.scaled_dot_product_attention(
            query, _repeat(key, heads), _repeat(value, heads), attn_mask, is_causal=causal, scale=scale
        ),
        args,
        grad_args=("query", "key", "value") + (("attn_mask",) if mask_grad else ()),
    )


@DTYPES
@pytest.mark.parametrize("kind", ["none", "padding", "left-padding", "bool4d", "bias", "causal", "causal+padding"])
@pytest.mark.parametrize("lengths", [(77, 77), (77, 128), (130, 61), (150, 257)],
                         ids=["self", "cross", "cross-short", "long"])
def test_parity_masks(emu, dtype, kind, lengths):
    q, k, v = _inputs(2, 2, *lengths, 64, dtype)
    _parity(emu, q, k, v, _mask(kind, 2, 2, *lengths, dtype), causal=kind.startswith("causal"),
            mask_grad=kind == "bias")


@DTYPES
@pytest.mark.parametrize("head_dim", [8, 16, 40, 64, 96, 128, 200, 256])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_parity_head_dims(emu, dtype, head_dim, causal):
    q, k, v = _inputs(1, 2, 70, 70, head_dim, dtype)
    _parity(emu, q, k, v, causal=causal)


@pytest.mark.parametrize("dims", [(64, 32), (40, 72), (256, 64), (64, 256), (128, 200)], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_parity_value_head_dim_differs(emu, dims, causal):
    q, k, v = _inputs(1, 2, 37, 45, dims[0], torch.float16, dv=dims[1])
    _parity(emu, q, k, v, causal=causal)


@pytest.mark.parametrize("seq", [1, 2, 17, 63, 64, 65, 128, 257])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_parity_sequence_lengths(emu, seq, causal):
    q, k, v = _inputs(2, 3, seq, seq, 64, torch.float16)
    _parity(emu, q, k, v, causal=causal)


@pytest.mark.parametrize("lengths", [(1, 100), (100, 1), (33, 200), (200, 33)], ids=str)
@pytest.mark.parametrize("kind", ["causal", "causal+padding"])
def test_parity_causal_cross_lengths(emu, lengths, kind):
    q, k, v = _inputs(2, 2, *lengths, 32, torch.bfloat16)
    _parity(emu, q, k, v, _mask(kind, 2, 2, *lengths, torch.bfloat16), causal=True)


@pytest.mark.parametrize("mask_shape", [(2, 3, 50, 90), (1, 3, 50, 90), (2, 1, 1, 90), (50, 90)], ids=str)
def test_parity_float_mask_gradient(emu, mask_shape):
    q, k, v = _inputs(2, 3, 50, 90, 64, torch.float16)
    bias = (torch.randn(mask_shape, generator=torch.Generator().manual_seed(3)) * 2).to(torch.float16)
    _parity(emu, q, k, v, bias, mask_grad=True)


@pytest.mark.parametrize("kv_heads", [1, 2])
@pytest.mark.parametrize("kind", ["none", "causal", "padding"])
def test_parity_grouped_query_heads(emu, kv_heads, kind):
    q, k, v = _inputs(2, 4, 40, 130, 64, torch.float16, kv_heads=kv_heads)
    _parity(emu, q, k, v, _mask(kind, 2, 4, 40, 130, torch.float16), causal=kind == "causal")


def test_parity_strided_unaligned_views(emu):
    """Rows not 16-byte aligned (head dim 40 read from a packed QKV buffer at odd offsets) take the
    element-copy path; a [B, L, H, D] layout is read through its strides."""
    gen = torch.Generator().manual_seed(7)
    packed = torch.randn(2, 51, 3 * 3 * 36 + 1, generator=gen).to(torch.float16)
    q, k, v = (packed[..., 1 + i * 108: 1 + (i + 1) * 108].unflatten(-1, (3, 36)).transpose(1, 2) for i in range(3))
    _parity(emu, q, k, v, causal=True)
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in _inputs(2, 3, 70, 70, 64, torch.float16))
    _parity(emu, q, k, v, _mask("padding", 2, 3, 70, 70, torch.float16))


@pytest.mark.parametrize("kind", ["bool4d", "padding", "causal-bias"])
def test_fully_masked_rows_give_zero_and_zero_grads(emu, kind):
    q, k, v = _inputs(2, 2, 40, 70, 64, torch.float16)
    if kind == "bool4d":
        mask = torch.rand(2, 2, 40, 70, generator=torch.Generator().manual_seed(2)) > 0.5
        mask[:, :, 5] = False
    elif kind == "padding":
        mask = torch.ones(2, 1, 1, 70, dtype=torch.bool)
        mask[1] = False
    else:
        mask = torch.zeros(2, 2, 40, 70, dtype=torch.float16)
        mask[:, :, 7] = float("-inf")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = attention(emu, q, k, v, mask)
    out.backward(torch.randn_like(out))
    rows = (mask if mask.dtype == torch.bool else mask == 0).expand(2, 2, 40, 70).any(-1)
    assert torch.equal(out[~rows], torch.zeros_like(out[~rows]))
    assert torch.equal(q.grad[~rows], torch.zeros_like(q.grad[~rows]))
    assert bool(torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all())
    _parity(emu, *(t.detach() for t in (q, k, v)), mask)


@pytest.mark.parametrize("value", [-1e4, -1e9, float("-inf")], ids=str)
def test_rows_masked_by_a_huge_bias(emu, value):
    q, k, v = _inputs(1, 2, 33, 70, 64, torch.float16)
    bias = torch.zeros(1, 2, 33, 70)
    bias[..., 10:] = value
    _parity(emu, q, k, v, bias)


@pytest.mark.parametrize("scale", [0.05, 3.0])
def test_peaked_rows_and_custom_scale(emu, scale):
    q, k, v = _inputs(1, 2, 65, 65, 64, torch.bfloat16)
    _parity(emu, q * 4, k * 4, v, scale=scale)


@pytest.mark.parametrize("kind", ["none", "causal", "padding", "bias"])
def test_dropout_matches_the_reference_fed_the_shared_keep_mask(emu, kind):
    """Every backend draws the same keep-mask from the seed (csrc/include/fused_attn/philox.h): the
    emulated kernels' forward and backward equal the reference fed the Triton kernel's mask."""
    q, k, v = _inputs(2, 3, 64, 80, 32, torch.float16)
    mask = _mask(kind, 2, 3, 64, 80, torch.float16)
    causal, p = kind == "causal", 0.3
    torch.manual_seed(1234)
    _, keep = attention_with_keep_mask(q, k, v, mask, dropout_p=p, is_causal=causal)
    torch.manual_seed(1234)
    seed = draw_seed(p, q)
    assert_parity(
        lambda query, key, value, attn_mask: attention(emu, query, key, value, attn_mask, causal, None, p, seed),
        lambda query, key, value, attn_mask: reference.scaled_dot_product_attention(
            query, key, value, attn_mask, dropout_p=p, is_causal=causal, dropout_mask=keep
        ),
        {"query": q, "key": k, "value": v, "attn_mask": mask},
        grad_args=("query", "key", "value") + (("attn_mask",) if kind == "bias" else ()),
    )


@pytest.mark.parametrize("case", range(RANDOM_CASES))
def test_attention_random_configs(emu, case):
    """tests/test_random_configs.py's seeded attention cases (grouped heads, cross lengths, broadcast and
    learned masks, custom scales, transposed / padded / strided layouts, fully masked rows) with the
    cuda backend's dtypes, on the emulated kernels, strided last dims made contiguous as the op does."""
    config, args = _attention_case(1000 + case, "cuda", "cpu")
    _check_emulated_attention_case(emu, f"seed {1000 + case}: {config}", config, args)


@pytest.mark.parametrize("case", range(RANDOM_CASES))
def test_attention_dropout_random_configs(emu, case):
    """The seeded attention cases with dropout: the emulated kernels' output and gradients are those of
    the reference fed the keep-mask every backend draws from the op's seed."""
    seed = 5000 + case
    config, args, dropout_p, keep = _attention_dropout_case(seed, "cuda", "cpu")
    _check_emulated_attention_case(emu, f"seed {seed}, dropout_p {dropout_p}: {config}", config, args, dropout_p,
                                   keep, seed)


def _check_emulated_attention_case(emu, context: str, config: dict, args: dict, dropout_p: float = 0.0,
                                   keep: torch.Tensor | None = None, seed: int = 0) -> None:
    """The case's parity on the emulated kernels, given the inputs as the op gives them; with dropout,
    the op's seed drawn after ``torch.manual_seed(seed)`` and the reference fed ``keep``."""
    heads = config["shape"][1]
    options = {"is_causal": config["is_causal"], "scale": config["scale"]}
    if dropout_p:
        torch.manual_seed(seed)
    kernel_seed = draw_seed(dropout_p, torch.empty(0))  # the op's seed: the one keep was drawn from

    def fused(query, key, value, attn_mask=None):
        q, k, v = (_layout(t, kind) for t, kind in zip((query, key, value), config["layouts"]))
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        return attention(emu, q, k, v, attn_mask, options["is_causal"], options["scale"], dropout_p, kernel_seed)

    def plain(query, key, value, attn_mask=None):
        return reference.scaled_dot_product_attention(query, _repeat(key, heads), _repeat(value, heads), attn_mask,
                                                      dropout_p, **options, dropout_mask=keep)

    grads = ("query", "key", "value") + (("attn_mask",) if config["mask"] == "learned_bias" else ())
    random_configs_parity(context, fused, plain, args, grads)


def _run_all(ops, q, k, v, mask, causal, dropout_p=0.0):
    seed = torch.tensor(99) if dropout_p > 0 else None
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    mask = None if mask is None else mask.detach().requires_grad_(mask.is_floating_point())
    out = attention(ops, q, k, v, mask, causal, None, dropout_p, seed)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out.dtype))
    return [out, q.grad, k.grad, v.grad] + ([mask.grad] if mask is not None and mask.is_floating_point() else [])


CONFIG_CASES = {
    "d64-causal": dict(q_len=200, k_len=200, d=64, kind="causal"),
    "d128-padding-dropout": dict(q_len=150, k_len=97, d=128, kind="padding", dropout_p=0.2),
    "d40-padding-dropout": dict(q_len=90, k_len=150, d=40, kind="padding", dropout_p=0.2),
    "d32-bias": dict(q_len=130, k_len=70, d=32, kind="bias"),
    "d256": dict(q_len=70, k_len=70, d=256, kind="none"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES), ids=str)
def test_same_bits_for_every_schedule_copy_timing_and_row_layout(emu, case):
    """Copies performed when issued or at their wait, threads resumed in shuffled orders, and 64 or 128
    rows per block (queries; keys in dK/dV: the launchers pick 128 when the blocks fill the device, one
    multiprocessor here, up to head dim 64 in the backward) give bitwise the same outputs and gradients."""
    c = dict(CONFIG_CASES[case])
    kind, dropout_p = c.pop("kind"), c.pop("dropout_p", 0.0)
    q, k, v = _inputs(2, 2, c["q_len"], c["k_len"], c["d"], torch.float16)
    mask = _mask(kind, 2, 2, c["q_len"], c["k_len"], torch.float16)
    _same_bits_under(emu, [(10**6, False, 0), (10**6, True, 7), (1, False, 3), (1, True, 0)],
                     lambda: _run_all(emu, q, k, v, mask, kind == "causal", dropout_p))


@pytest.mark.parametrize("head_dim", [32, 64, 96, 128, 256])
def test_attention_ldmatrix_reads_are_free_of_bank_conflicts(emu, head_dim):
    """csrc/cuda/attention.cu pads shared-memory rows by 16 bytes so that the eight rows of every ldmatrix
    phase fall in eight distinct bank groups: forward and backward, at every padded head dim, take no
    extra wavefronts (a performance property the emulator can count without a GPU)."""
    q, k, v = (t.requires_grad_() for t in _inputs(1, 2, 150, 150, head_dim, torch.float16))
    emu.take_counters()
    attention(emu, q, k, v, is_causal=True).sum().backward()
    phases, extra, _ = emu.take_counters()
    assert phases > 0
    assert extra == 0, f"{extra} extra wavefronts over {phases} ldmatrix phases"


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_two_strips_per_warp_cut_shared_memory_reads(emu, causal):
    """With two 16-row strips per warp (128 rows per block: the launchers' choice when the blocks fill
    the device, here one multiprocessor) each fragment of the streamed tiles read from shared memory
    serves 32 rows instead of 16: the forward's K and V, the statistics and dQ kernels' K and V, the
    dK/dV kernel's Q and dO. Counted in ldmatrix phases at head dim 64, for the same tensor-core
    products (fewer under causality, where a warp skips the tiles past its own rows). With two strips,
    and the fragments of a warp's own rows held in registers (the forward's Q, the statistics and dQ
    kernels' Q and dO), a tensor-core product takes about one phase in the forward and 1.3 in the
    backward."""
    q, k, v = _inputs(1, 2, 256, 256, 64, torch.float16)
    counts = {}
    try:
        for multiprocessors in (10**6, 1):
            emu.configure(multiprocessors, True, 1)
            qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
            emu.take_counters()
            out = attention(emu, qq, kk, vv, None, causal)
            forward = emu.take_counters()
            out.sum().backward()
            counts[multiprocessors] = (forward, emu.take_counters())
    finally:
        emu.configure(*PARITY_CONFIG)
    (fwd_one, bwd_one), (fwd_two, bwd_two) = counts[10**6], counts[1]
    assert fwd_two[0] < 0.6 * fwd_one[0], (fwd_one, fwd_two)
    assert bwd_two[0] < (0.7 if causal else 0.75) * bwd_one[0], (bwd_one, bwd_two)
    assert fwd_two[2] == fwd_one[2] if not causal else fwd_two[2] <= fwd_one[2]
    assert bwd_two[2] == bwd_one[2] if not causal else bwd_two[2] < bwd_one[2]
    assert fwd_two[0] <= 1.1 * fwd_two[2] and bwd_two[0] <= 1.35 * bwd_two[2], (fwd_two, bwd_two)


def _products(emu, q, k, v, mask=None, causal=False, dropout_p=0.0, backward=False):
    """Tensor-core products of one call (forward, or forward and backward)."""
    q, k, v = (t.detach().requires_grad_(backward) for t in (q, k, v))
    emu.take_counters()
    out = attention(emu, q, k, v, mask, causal, None, dropout_p, torch.tensor(3) if dropout_p > 0 else None)
    if backward:
        out.sum().backward()
    return emu.take_counters()[2]


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_attention_work_skips_what_no_query_sees(emu, backward):
    """The work the kernels do, counted in tensor-core products: causal attention skips the key tiles past
    each warp's rows (about half the products of full attention at 512 x 512, not a masked full pass); a
    key padding mask that hides half the keys halves them (the key spans); dropout adds no product."""
    q, k, v = _inputs(1, 1, 512, 512, 64, torch.float16)
    full = _products(emu, q, k, v, backward=backward)
    causal = _products(emu, q, k, v, causal=True, backward=backward)
    half_keys = (torch.arange(512) < 256).view(1, 1, 1, 512)
    padded = _products(emu, q, k, v, half_keys, backward=backward)
    dropped = _products(emu, q, k, v, dropout_p=0.1, backward=backward)
    assert 0.45 < causal / full < 0.6, (causal, full)
    assert 0.45 < padded / full < 0.55, (padded, full)
    assert dropped == full


def test_launchers_refuse_devices_that_cannot_run_them(emu):
    """Below compute capability 8.0 (no mma.sync / cp.async) the attention launchers refuse with the way
    out; on a GPU with sm86's 99 KB of shared memory per block the head-dim-256 backward (135 KB) is refused
    by name, checked when its kernel is first prepared (once per process: here, a process of its own)."""
    q, k, v = _inputs(1, 1, 40, 40, 256, torch.float16)
    try:
        emu.set_device(7, 5, 64 * 1024)
        with pytest.raises(RuntimeError, match=r"needs compute capability 8.0 or newer .* got 7.5 .*backend='triton'"):
            emu.attention_fwd(q, k, v, None, 0.0625, False, 0.0, None)
    finally:
        emu.set_device(9, 0, 227 * 1024)
    script = f"""
import sys, torch
sys.path.insert(0, {str(ROOT)!r})
from pathlib import Path
from tests.cuda_emu import emu_build
emu_build.build(Path({str(ROOT / "build" / "cuda_emu")!r}))
ops = torch.ops.fused_attn_emu
ops.set_device(8, 6, 99 * 1024)
q, k, v = (torch.randn(1, 1, 40, 256).half() for _ in range(3))
out, stats = ops.attention_fwd(q, k, v, None, 0.0625, False, 0.0, None)
try:
    ops.attention_bwd(torch.ones_like(out), q, k, v, None, stats, 0.0625, False, 0.0, None, False)
except RuntimeError as e:
    print(str(e).splitlines()[0])
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "head dim 256 needs" in result.stdout and "emulated sm86 offers 101376" in result.stdout, result.stdout
    assert "backend='triton'" in result.stdout


def test_launchers_take_a_device_seed_while_a_cuda_graph_is_captured(emu):
    """Every launcher with dropout takes a seed on the inputs' device while the stream is captured
    into a CUDA graph, the kernels reading it when they run (here, where the emulated device's
    memory is the host's, a CPU seed is one): the same results as outside the capture, and a new
    seed in that memory drops other elements. (A seed on the CPU for CUDA inputs, refused then,
    takes a GPU: tests/test_random.py.)"""
    q, k, v = _inputs(1, 1, 20, 20, 32, torch.float16)
    x, w = torch.randn(8, 64).half(), torch.ones(64).half()
    w1, w2 = torch.randn(16, 64).half(), torch.randn(8, 16).half()
    seed = torch.tensor(3)
    calls = {
        "attention": lambda: emu.attention_fwd(q, k, v, None, 0.2, False, 0.1, seed)[0],
        "add_layer_norm": lambda: emu.add_layer_norm_fwd(x, x, w, None, None, 1e-5, 0.1, seed)[0],
        "ffn": lambda: emu.ffn_fwd(x, w1, None, w2, None, "none", 0.1, seed)[0],
    }
    expected = {op: call() for op, call in calls.items()}
    try:
        emu.set_capturing(True)
        for op, call in calls.items():
            assert torch.equal(call(), expected[op]), op
        seed.fill_(4)
        for op, call in calls.items():
            assert not torch.equal(call(), expected[op]), op
    finally:
        emu.set_capturing(False)


# Softmax: softmax(input * scale + mask) over the last dim, a warp per row up to 1024 elements, a block
# per row above, rows cached in registers up to 32 / 8 elements per thread.

class _Softmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ops, x, mask, scale, causal):
        y = ops.softmax_fwd(x, mask, scale, causal)
        ctx.save_for_backward(y)
        ctx.args = (ops, scale)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        (y,) = ctx.saved_tensors
        ops, scale = ctx.args
        needs_mask = bool(ctx.needs_input_grad[2])
        dx, dmask = ops.softmax_bwd(grad_out.contiguous(), y, scale, needs_mask)
        return None, dx, (dmask if needs_mask else None), None, None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [1, 7, 32, 100, 256, 1000, 1025, 3000])
@pytest.mark.parametrize("kind", ["none", "bool", "bias", "causal"])
def test_softmax_parity(emu, dtype, n, kind):
    gen = torch.Generator().manual_seed(n)
    x = (torch.randn(2, 2, 5, n, generator=gen) * 3).to(dtype)
    mask = None
    if kind == "bool":
        mask = torch.rand(2, 1, 5, n, generator=gen) > 0.3
        mask[..., 0] = True
    elif kind == "bias":
        mask = torch.randn(1, 2, 5, n, generator=gen).to(dtype)
    causal = kind == "causal"
    assert_parity(
        lambda input, mask: _Softmax.apply(emu, input, None if mask is None else mask.expand_as(input), 0.7, causal),
        lambda input, mask: reference.softmax(input, mask=mask, scale=0.7, is_causal=causal),
        {"input": x, "mask": mask},
        grad_args=("input",) + (("mask",) if kind == "bias" else ()),
    )


def test_softmax_fully_masked_rows_are_zero(emu):
    x = torch.randn(1, 1, 4, 50).to(torch.float16).requires_grad_()
    mask = torch.ones(1, 1, 4, 50, dtype=torch.bool)
    mask[0, 0, 2] = False
    y = _Softmax.apply(emu, x, mask, 1.0, False)
    y.backward(torch.randn_like(y))
    assert torch.equal(y[0, 0, 2], torch.zeros(50, dtype=torch.float16))
    assert torch.equal(x.grad[0, 0, 2], torch.zeros(50, dtype=torch.float16))


@pytest.mark.parametrize("case", range(RANDOM_CASES))
def test_softmax_random_configs(emu, case):
    """tests/test_random_configs.py's seeded softmax cases (ranks 1 to 5, any dim, broadcast and learned
    masks, causal rows, custom scales, strided layouts) with the cuda backend's dtypes, on the emulated
    kernels, given the input as the op gives it: the softmax dim moved last, viewed as 4-D, the mask a
    broadcast view."""
    context, args, grads, options = _softmax_case(2000 + case, "cuda", "cpu")
    dim, scale, is_causal = options["dim"] % args["input"].dim(), options["scale"], options["is_causal"]
    if "mask" in args and _shifts_whole_slices(args["mask"], dim, args["input"].dim()):
        # A learned mask constant along dim shifts whole slices: the op gives it an exact zero gradient
        # without the kernels (RowShift; tests/test_random_configs.py checks it).
        grads = ("input",)

    def fused(input, mask=None):
        x = _layout(input, options["layout"])
        if mask is not None:
            mask = _as_4d(broadcast_mask(mask, "mask", x, "input", x.shape, "input shape").movedim(dim, -1))
        moved = x.movedim(dim, -1)
        y = _Softmax.apply(emu, _as_4d(moved), mask, scale, is_causal)
        return y.reshape(moved.shape).movedim(-1, dim)

    def plain(input, mask=None):
        return reference.softmax(input, dim, mask, scale, is_causal)

    random_configs_parity(context, fused, plain, args, grads)


# LayerNorm and Add & Norm (csrc/cuda/layer_norm.cu): a warp per row up to hidden 1024, a block per row
# above; vector access where every pointer is 16-byte aligned; parameter gradients by column partials
# over row splits, then a finalize kernel.

class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ops, x, weight, bias, eps):
        y, mean, rstd = ops.layer_norm_fwd(x, weight, bias, eps)
        ctx.save_for_backward(x, mean, rstd, weight)
        ctx.ops = ops
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, mean, rstd, weight = ctx.saved_tensors
        needs = list(ctx.needs_input_grad[1:4])
        grads = ctx.ops.layer_norm_bwd(grad_out.contiguous(), x, mean, rstd, weight, needs)
        return None, *_requested(grads, needs), None


class _AddLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ops, x, residual, weight, bias, input_bias, eps, dropout_p, seed):
        out, prenorm, mean, rstd = ops.add_layer_norm_fwd(x, residual, weight, bias, input_bias, eps, dropout_p, seed)
        inference = ops.add_layer_norm_inference(x, residual, weight, bias, input_bias, eps, dropout_p, seed)
        assert torch.equal(out, inference)
        ctx.save_for_backward(prenorm, mean, rstd, weight, seed)
        ctx.args = (ops, dropout_p)
        return out, prenorm

    @staticmethod
    def backward(ctx, grad_out, grad_prenorm):
        prenorm, mean, rstd, weight, seed = ctx.saved_tensors
        ops, dropout_p = ctx.args
        needs = list(ctx.needs_input_grad[1:6])
        grads = ops.add_layer_norm_bwd(
            grad_out.contiguous(), None if grad_prenorm is None else grad_prenorm.contiguous(), prenorm, mean, rstd,
            weight, dropout_p, seed, needs,
        )
        return None, *_requested(grads, needs), None, None, None


def _rows(rows, hidden, dtype, seed=0, misaligned=False):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, hidden, generator=gen) * 2 + 0.5).to(dtype)
    if misaligned:  # contiguous, but one element past a 16-byte boundary: the scalar path
        buffer = torch.empty(rows * hidden + 1, dtype=dtype)
        buffer[1:] = x.flatten()
        x = buffer[1:].view(rows, hidden)
    return x


def _params(hidden, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    weight, bias = 1 + 0.1 * torch.randn(hidden, generator=gen), 0.1 * torch.randn(hidden, generator=gen)
    return weight.to(dtype), bias.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("hidden", [1, 7, 64, 100, 768, 1024, 1025, 4000])
@pytest.mark.parametrize("params", ["same", "float32", "none"])
def test_layer_norm_parity(emu, dtype, hidden, params):
    x = _rows(37, hidden, dtype)
    w, b = _params(hidden, dtype if params == "same" else torch.float32)
    if params == "none":
        w = b = None
    assert_parity(
        lambda input, weight, bias: _LayerNorm.apply(emu, input, weight, bias, 1e-5),
        lambda input, weight, bias: reference.layer_norm(input, (hidden,), weight, bias, 1e-5),
        {"input": x, "weight": w, "bias": b},
        grad_args=("input",) + (("weight", "bias") if w is not None else ()),
    )


@pytest.mark.parametrize("shape", [(3000, 40), (700, 1536), (5, 8)], ids=str)
@pytest.mark.parametrize("misaligned", [False, True], ids=["aligned", "misaligned"])
def test_layer_norm_parity_row_splits_and_alignment(emu, shape, misaligned):
    x = _rows(*shape, torch.float16, misaligned=misaligned)
    w, b = _params(shape[1], torch.float16)
    assert_parity(
        lambda input, weight, bias: _LayerNorm.apply(emu, input, weight, bias, 1e-5),
        lambda input, weight, bias: reference.layer_norm(input, (shape[1],), weight, bias, 1e-5),
        {"input": x, "weight": w, "bias": b},
        grad_args=("input", "weight", "bias"),
    )


def test_layer_norm_constant_rows_give_the_bias(emu):
    x = torch.full((4, 300), 3.25, dtype=torch.float16)
    w, b = _params(300, torch.float16)
    y, _, _ = emu.layer_norm_fwd(x, w, b, 1e-5)
    assert torch.equal(y, b.expand(4, 300))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("hidden", [8, 768, 1030])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("prenorm_grad", [False, True], ids=["post-ln", "pre-ln"])
def test_add_layer_norm_parity(emu, dtype, hidden, dropout_p, prenorm_grad):
    """Forward, the pre-norm sum, and every gradient, with the dropout keep-mask every backend draws from
    the seed (replayed from the Triton kernel's draw); the inference form gives the forward's bits."""
    x, residual = _rows(21, hidden, dtype, seed=2), _rows(21, hidden, dtype, seed=3)
    w, b = _params(hidden, torch.float32 if dtype != torch.float32 else dtype)
    input_bias = _params(hidden, dtype, seed=4)[1]
    torch.manual_seed(77)
    with warnings.catch_warnings():  # the interpreter's numpy on the mask-drawing call's zero variance
        warnings.simplefilter("ignore", RuntimeWarning)
        keep = add_layer_norm_keep_mask((21, hidden), dropout_p, "cpu") if dropout_p > 0 else None
    torch.manual_seed(77)
    seed = draw_seed(dropout_p, torch.empty(0))

    def fused(input, residual, weight, bias, input_bias):
        out, prenorm = _AddLayerNorm.apply(emu, input, residual, weight, bias, input_bias, 1e-5, dropout_p, seed)
        return out + prenorm if prenorm_grad else out

    def plain(input, residual, weight, bias, input_bias):
        out, prenorm = reference.add_layer_norm(input, residual, weight, bias, 1e-5, dropout_p, input_bias,
                                                return_prenorm=True, dropout_mask=keep)
        return out + prenorm if prenorm_grad else out

    assert_parity(fused, plain, {"input": x, "residual": residual, "weight": w, "bias": b, "input_bias": input_bias},
                  grad_args=("input", "residual", "weight", "bias", "input_bias"))


@pytest.mark.parametrize("op", ["layer_norm", "add_layer_norm"])
@pytest.mark.parametrize("case", range(RANDOM_CASES))
def test_norm_random_configs(emu, op, case):
    """tests/test_random_configs.py's seeded layer_norm and add_layer_norm cases (leading dims, one or two
    normalized dims from 1 to 700 wide, float32 parameters of a 16-bit input, eps, input bias, the
    pre-norm sum's gradient, strided layouts) with the cuda backend's dtypes, on the emulated kernels,
    given the rows as the op gives them."""
    context, args, options = _norm_case(op, "cuda", "cpu", 3000 + case)
    hidden, eps = math.prod(options["normalized_shape"]), options["eps"]
    as_rows = lambda t: rows(t, hidden)  # noqa: E731

    if op == "layer_norm":
        def fused(input, weight=None, bias=None):
            flat = [None if p is None else p.reshape(hidden) for p in (weight, bias)]
            out = _LayerNorm.apply(emu, as_rows(_layout(input, options["layout"])), *flat, eps)
            return out.reshape(input.shape)

        def plain(input, weight=None, bias=None):
            return reference.layer_norm(input, options["normalized_shape"], weight, bias, eps)
    else:
        prenorm = options["prenorm"]

        def fused(input, residual, weight, bias, input_bias=None):
            x = as_rows(_layout(input, options["layout"]))
            out = _AddLayerNorm.apply(emu, x, as_rows(residual), weight, bias, input_bias, eps, 0.0, None)
            out = tuple(t.reshape(input.shape) for t in out)
            return _add_layer_norm_result(out if prenorm else out[0], prenorm)

        def plain(input, residual, weight, bias, input_bias=None):
            out = reference.add_layer_norm(input, residual, weight, bias, eps, input_bias=input_bias,
                                           return_prenorm=prenorm)
            return _add_layer_norm_result(out, prenorm)

    random_configs_parity(context, fused, plain, args, tuple(args))


# FFN (csrc/cuda/ffn.cu): cuBLASLt GEMMs (served by tests/cuda_emu/cublaslt_emu.h, which refuses operand
# shapes and leading dimensions that do not fit together) with their bias and GELU epilogues, the
# activation kernels (both GELUs, ReLU), the bias-gradient reduction, the FFN backward's DGELU epilogue and
# the FFN's dropout kernel. `approximate` is the ops' activation code: "none" (erf GELU), "tanh", "relu".
ACTIVATIONS = pytest.mark.parametrize("approximate", ["none", "tanh", "relu"])


def _reference_ffn(input, w1, b1, w2, b2, approximate, dropout_p=0.0, dropout_mask=None):
    """fused_attn.reference.ffn for an activation code (ReLU is its activation="relu")."""
    return reference.ffn(input, w1, b1, w2, b2, dropout_p=dropout_p, dropout_mask=dropout_mask,
                         **ffn_activation(approximate))


def _with_zero_pre_activations(x, w, b):
    """x, w, b with pre-activations x w^T + b exactly 0 (ReLU's kink, where its gradient is 0): the
    first output feature of every row (w's first row and b[0] zero) and, for more than one row, every
    third feature of the first row (x's first row zero, b zero there: the other features of that row
    are b, of both signs)."""
    x, w = x.clone(), w.clone()
    w[0] = 0
    if x.shape[0] > 1:
        x[0] = 0
    if b is not None:
        b = b.clone()
        b[::3] = 0
    return x, w, b

class _LinearGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ops, x, weight, bias, approximate):
        out, pre = ops.linear_gelu_fwd(x, weight, bias, approximate)
        assert torch.equal(out, ops.linear_gelu_inference(x, weight, bias, approximate))
        ctx.save_for_backward(x, weight, pre)
        ctx.args = (ops, approximate)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, pre = ctx.saved_tensors
        ops, approximate = ctx.args
        needs = list(ctx.needs_input_grad[1:4])
        grads = ops.linear_gelu_bwd(grad_out.contiguous(), x, weight, pre, approximate, needs)
        scratch = grad_out.clone().contiguous()
        for a, b in zip(grads, ops.linear_gelu_bwd_scratch(scratch, x, weight, pre, approximate, needs)):
            assert (a is None and b is None) or torch.equal(a, b)
        return None, *_requested(grads, needs), None


LINEAR_SHAPES = {"bert-ish": (40, 96, 128), "odd": (37, 50, 77), "one-row": (1, 64, 32), "one-feature": (9, 1, 24)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@ACTIVATIONS
@pytest.mark.parametrize("shape", list(LINEAR_SHAPES), ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_linear_gelu_parity(emu, dtype, approximate, shape, bias):
    """Forward (the fused GELU epilogue where it serves: tanh, 16-bit, out_features % 8 == 0; else the
    bias epilogue and the GELU kernel), the inference form's bits, and the gradients (the GELU-gradient
    kernel with its bias-gradient reduction, two GEMMs), with grad_out as scratch giving the same bits.
    ReLU (elementwise kernels only) with pre-activations exactly 0 among them."""
    rows, inp, out = LINEAR_SHAPES[shape]
    gen = torch.Generator().manual_seed(rows + out)
    x = torch.randn(rows, inp, generator=gen).to(dtype)
    w = (torch.randn(out, inp, generator=gen) / math.sqrt(inp)).to(dtype)
    b = (torch.randn(out, generator=gen) * 0.5).to(dtype) if bias else None
    if approximate == "relu":
        x, w, b = _with_zero_pre_activations(x, w, b)
        _, pre = emu.linear_gelu_fwd(x, w, b, approximate)
        assert (pre == 0).any() and (pre > 0).any() and (pre < 0).any()
    assert_parity(
        lambda input, weight, bias: _LinearGelu.apply(emu, input, weight, bias, approximate),
        lambda input, weight, bias: reference.linear_activation(input, weight, bias, approximate),
        {"input": x, "weight": w, "bias": b},
        grad_args=("input", "weight") + (("bias",) if bias else ()),
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("hidden", [128, 36])
def test_ffn_backward_through_the_next_linear(emu, dtype, hidden):
    """The FFN's first-layer backward from the second layer's gradient: cuBLASLt's DGELU(_BGRAD) epilogue
    (tanh, 16-bit, hidden % 8 == 0) forms grad_pre and grad_b1 in the GEMM; other calls (also the erf
    GELU and ReLU) are declined."""
    rows, model = 33, 48
    gen = torch.Generator().manual_seed(hidden)
    x = torch.randn(rows, model, generator=gen).to(dtype)
    w1 = (torch.randn(hidden, model, generator=gen) / math.sqrt(model)).to(dtype)
    b1 = (torch.randn(hidden, generator=gen) * 0.5).to(dtype)
    w2 = (torch.randn(model, hidden, generator=gen) / math.sqrt(hidden)).to(dtype)
    grad_next = torch.randn(rows, model, generator=gen).to(dtype)
    for other in ("none", "relu"):  # cuBLASLt has neither the erf GELU nor a ReLU gradient from pre
        _, pre = emu.linear_gelu_fwd(x, w1, b1, other)
        assert not emu.linear_gelu_bwd_from_next(grad_next, w2, x, w1, pre, other, [True, True, True])[3]
    _, pre = emu.linear_gelu_fwd(x, w1, b1, "tanh")
    dx, dw1, db1, served = emu.linear_gelu_bwd_from_next(grad_next, w2, x, w1, pre, "tanh", [True, True, True])
    assert served == (hidden % 8 == 0)
    if not served:
        return

    def first_layer(input, weight, bias):  # the gradients of sum(grad_next * (gelu(x w1^T + b1) w2^T))
        return reference.linear_gelu(input, weight, bias, "tanh") @ w2.to(input.dtype).t()

    x64, w64, b64 = (t.double().requires_grad_() for t in (x, w1, b1))
    first_layer(x64, w64, b64).backward(grad_next.double())
    for name, fused, truth in [("dx", dx, x64.grad), ("dw1", dw1, w64.grad), ("db1", db1, b64.grad)]:
        plain = [t.detach().clone().requires_grad_() for t in (x, w1, b1)]
        first_layer(*plain).backward(grad_next)
        plain_grad = plain[["dx", "dw1", "db1"].index(name)].grad
        check_tensor_parity(name, fused, plain_grad, truth, factor=3.0, problem_scale=float(truth.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(7, 77), (64, 256)], ids=str)
def test_ffn_dropout_draws_the_cpu_kernels_mask(emu, dtype, shape):
    p = 0.3
    torch.manual_seed(11)
    keep = ffn_keep_mask(*shape, p, "cpu", "cpu")
    torch.manual_seed(11)
    seed = draw_seed(p, torch.empty(0))
    src = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    dst = torch.empty_like(src)
    emu.ffn_dropout(src, dst, seed, p)
    assert torch.equal(dst != 0, keep & (src != 0))
    assert torch.equal(dst[keep], (src.float()[keep] / (1 - p)).to(dtype))


class _FFN(torch.autograd.Function):
    """csrc/ffn.cpp as built for CUDA over the emulated kernels, wired as csrc/autograd.cpp wires ffn."""

    @staticmethod
    def forward(ctx, ops, x, w1, b1, w2, b2, approximate, dropout_p, seed):
        out, pre = ops.ffn_fwd(x, w1, b1, w2, b2, approximate, dropout_p, seed)
        if dropout_p == 0.0:
            assert torch.equal(out, ops.ffn_inference(x, w1, b1, w2, b2, approximate))
        ctx.save_for_backward(x, w1, w2, pre, seed)
        ctx.args = (ops, approximate, dropout_p)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, w1, w2, pre, seed = ctx.saved_tensors
        ops, approximate, dropout_p = ctx.args
        needs = list(ctx.needs_input_grad[1:6])
        grads = ops.ffn_bwd(grad_out.contiguous(), x, w1, w2, pre, approximate, dropout_p, seed, needs)
        return None, *_requested(grads, needs), None, None, None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@ACTIVATIONS
@pytest.mark.parametrize("hidden", [128, 36])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_ffn_parity(emu, dtype, approximate, hidden, dropout_p):
    """The whole FFN on the CUDA path: forward (its inference form's bits), the backward's dropout of the
    gradient, the DGELU-epilogue GEMM where it serves (tanh, 16-bit, hidden % 8 == 0) and the hidden
    gradient's GEMM with linear_gelu's backward elsewhere; every gradient, with the CPU kernels' keep-mask.
    ReLU with hidden pre-activations exactly 0 among them."""
    rows, model = 29, 48
    gen = torch.Generator().manual_seed(hidden + rows)
    x = torch.randn(rows, model, generator=gen).to(dtype)
    w1 = (torch.randn(hidden, model, generator=gen) / math.sqrt(model)).to(dtype)
    b1 = (torch.randn(hidden, generator=gen) * 0.5).to(dtype)
    if approximate == "relu":
        x, w1, b1 = _with_zero_pre_activations(x, w1, b1)
    w2 = (torch.randn(model, hidden, generator=gen) / math.sqrt(hidden)).to(dtype)
    b2 = (torch.randn(model, generator=gen) * 0.5).to(dtype)
    keep, seed = None, None
    if dropout_p > 0:
        torch.manual_seed(21)
        keep = ffn_keep_mask(rows, model, dropout_p, "cpu", "cpu")
        torch.manual_seed(21)
        seed = draw_seed(dropout_p, torch.empty(0))
    assert_parity(
        lambda input, w1, b1, w2, b2: _FFN.apply(emu, input, w1, b1, w2, b2, approximate, dropout_p, seed),
        lambda input, w1, b1, w2, b2: _reference_ffn(input, w1, b1, w2, b2, approximate, dropout_p, keep),
        {"input": x, "w1": w1, "b1": b1, "w2": w2, "b2": b2},
        grad_args=("input", "w1", "b1", "w2", "b2"),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("features", [16, 13], ids=["vector", "scalar"])
def test_relu_kernels_follow_torch_at_the_edges(emu, dtype, features):
    """The ReLU kernels on chosen pre-activations: torch.relu's forward (NaN and -0 pass, +-inf) and
    threshold_backward's gradient (0 at pre <= 0 whatever grad_out, also inf or NaN; grad_out where pre is
    NaN). The forward reads the pre-activation of an empty product, the bias itself; the backward's
    grad_pre is read off the bias gradient of one row (a sum of one term) and off grad_input = grad_pre @ I.
    16 features: the vector kernels (16-byte loads), 13: the scalar ones."""
    def bits(t):  # NaN as one value: its payload is the dtype conversion's, not the activation's
        return t.nan_to_num(nan=1234.0).view(torch.int32 if t.dtype == torch.float32 else torch.int16)

    special = [float("nan"), -0.0, 0.0, float("inf"), -float("inf"), -1.0, 2.5, -3e-5, 1e-30, -1e-30]
    pre = torch.tensor((special + [0.5, -0.5, 7.0, -7.0, 3.0, 0.0])[:features]).to(dtype)
    empty_x, empty_w = torch.empty(1, 0, dtype=dtype), torch.empty(features, 0, dtype=dtype)
    out, kept = emu.linear_gelu_fwd(empty_x, empty_w, pre, "relu")
    assert torch.equal(bits(kept[0]), bits(pre))
    assert torch.equal(out[0].isnan(), pre.isnan())
    assert torch.equal(bits(out[0]), bits(torch.relu(pre)))  # -0 stays -0, as in torch
    assert torch.equal(bits(out), bits(emu.linear_gelu_inference(empty_x, empty_w, pre, "relu")))

    # grad_pre where grad_out is inf or NaN: the bias gradient alone (no GEMM, which would spread them).
    grad_out = torch.tensor([1.5, float("inf"), float("nan"), -2.0] * 4)[:features].to(dtype).unsqueeze(0)
    x, eye = torch.zeros(1, features, dtype=dtype), torch.eye(features, dtype=dtype)
    want = torch.ops.aten.threshold_backward(grad_out[0], torch.relu(pre), 0)
    _, _, grad_bias = emu.linear_gelu_bwd(grad_out, x, eye, pre.unsqueeze(0), "relu", [False, False, True])
    torch.testing.assert_close(grad_bias, want, equal_nan=True, rtol=0, atol=0)
    # Finite values through the stored grad_pre and its GEMM: grad_input = grad_pre @ I.
    finite_pre = pre.nan_to_num(nan=1.0, posinf=1.0, neginf=-1.0).unsqueeze(0)
    finite_grad = grad_out.nan_to_num(nan=1.0, posinf=1.0)
    want = torch.ops.aten.threshold_backward(finite_grad[0], torch.relu(finite_pre[0]), 0)
    grad_input, _, grad_bias = emu.linear_gelu_bwd(finite_grad, x, eye, finite_pre, "relu", [True, False, True])
    assert torch.equal(grad_input[0], want) and torch.equal(grad_bias, want)


def test_activation_codes_are_checked(emu):
    x, w = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(RuntimeError, match='approximate must be "none", "tanh" or "relu", got "gelu"'):
        emu.linear_gelu_fwd(x, w, None, "gelu")
    with pytest.raises(RuntimeError, match='"none", "tanh" or "relu", got "Relu"'):
        emu.linear_gelu_bwd(torch.randn(3, 5), x, w, torch.randn(3, 5), "Relu", [True, True, True])


@pytest.mark.parametrize("op", ["linear_gelu", "ffn"])
@pytest.mark.parametrize("case", range(RANDOM_CASES))
def test_ffn_random_configs(emu, op, case):
    """tests/test_random_configs.py's seeded linear_gelu and FFN cases (1 to 130 features on each side,
    with and without biases, their activations, strided layouts) with the cuda backend's dtypes, on the emulated
    kernels and GEMMs, given the rows as the op gives them."""
    context, args, options = _ffn_case(op, "cuda", "cpu", 4000 + case)
    approximate = options["approximate"]

    def as_rows(input):
        return rows(_layout(input, options["layout"]), input.shape[-1])

    if op == "linear_gelu":
        def fused(input, w1, b1=None):
            out = _LinearGelu.apply(emu, as_rows(input), w1, b1, approximate)
            return out.reshape(*input.shape[:-1], w1.shape[0])

        def plain(input, w1, b1=None):
            return reference.linear_activation(input, w1, b1, approximate)
    else:
        def fused(input, w1, w2, b1=None, b2=None):
            out = _FFN.apply(emu, as_rows(input), w1, b1, w2, b2, approximate, 0.0, None)
            return out.reshape(*input.shape[:-1], w2.shape[0])

        def plain(input, w1, w2, b1=None, b2=None):
            return _reference_ffn(input, w1, b1, w2, b2, approximate)

    random_configs_parity(context, fused, plain, args, tuple(args))


def test_norm_and_ffn_kernels_give_the_same_bits_under_every_schedule(emu):
    """LayerNorm (warp and block rows), Add & Norm with dropout and the FFN give bitwise the same outputs
    and gradients whatever the device's multiprocessor count, the copies' timing and the threads' order
    (their splits are fixed by the shape: csrc/cuda/layer_norm.cu, "Determinism")."""
    def run():
        results = []
        for hidden in (96, 1500):
            x = _rows(300, hidden, torch.float16, seed=hidden)
            w, b = _params(hidden, torch.float32)
            y, mean, rstd = emu.layer_norm_fwd(x, w, b, 1e-5)
            results += [y, *emu.layer_norm_bwd(torch.ones_like(y), x, mean, rstd, w, [True, True, True])]
            out, pre, mean, rstd = emu.add_layer_norm_fwd(x, x.flip(0), w, b, None, 1e-5, 0.1, torch.tensor(4))
            results += [out, *emu.add_layer_norm_bwd(torch.ones_like(out), None, pre, mean, rstd, w, 0.1,
                                                     torch.tensor(4), [True, True, True, True, False])[:4]]
        x, w1, w2 = _rows(70, 48, torch.float16), _rows(64, 48, torch.float16, seed=1), _rows(48, 64, torch.float16, 2)
        out, pre = emu.ffn_fwd(x, w1, None, w2, None, "tanh", 0.1, torch.tensor(6))
        results += [out, *emu.ffn_bwd(torch.ones_like(out), x, w1, w2, pre, "tanh", 0.1, torch.tensor(6),
                                      [True, True, False, True, False])]
        return [t for t in results if t is not None and t.numel() > 0]

    _same_bits_under(emu, [(132, False, 0), (1, True, 5), (10**6, True, 9)], run)


# The emulator's own checks: undefined behaviour reported, and the AddressSanitizer build.

@pytest.mark.parametrize("fault, message", [(0, "divergent warp"), (1, "deadlock"), (2, "past the 1024 bytes"),
                                            (3, "shared-memory race")])
def test_emulator_reports_undefined_behaviour(emu, fault, message):
    """What the hardware leaves undefined is an error of the launch here, not a hang or a guess."""
    with pytest.raises(RuntimeError, match=message):
        emu.self_test(fault)


def test_memcheck_no_access_outside_any_tensor(emu):
    """The kernels built with AddressSanitizer (tests/cuda_emu/memcheck.py, in a process of its own with
    the runtime preloaded) over cases that reach every load path: no read or write outside a tensor's
    allocation (the emulator's counterpart of compute-sanitizer's memcheck)."""
    runtime = emu_build.asan_runtime()
    if runtime is None:
        pytest.skip("GCC's AddressSanitizer runtime is not installed")
    env = dict(os.environ, LD_PRELOAD=str(runtime), ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:halt_on_error=1")
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "cuda_emu" / "memcheck.py")], env=env,
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0 and "AddressSanitizer" not in result.stderr, result.stderr[-6000:]
    assert int(result.stdout.split()[-1]) >= 90
