"""Every tile configuration a GPU's autotuner may choose for the Triton kernels, run and checked.

Under the Triton interpreter (the CPU tests) each kernel has one small configuration, and on a GPU
the autotuner picks one per shape from the lists next to the kernels
(``fused_attn/kernels/triton/attention.py``: ``_FWD_TILES``, ``_BWD_TILES``, ``_WIDE_TILES``;
``ffn.py``: ``GEMM_TILES``). Here each of those configurations is pinned in turn (as the kernels
have it: tile sizes, warps, stages) and run on shapes spanning several of its tiles, partial ones
included, forward and backward against the reference. A tile-size assumption that only a GPU's
pick would meet (a query tile four key tiles tall on the causal diagonal, a GEMM tile larger than
an operand, a partial group of tiles in the grouped ordering) fails here, on a CPU, first. On a GPU
the same tests compile and run every configuration, which autotuning alone does for one per shape.
"""

from __future__ import annotations

import pytest
import torch

import fused_attn
from fused_attn import reference
from fused_attn.ops.attention import attention_with_keep_mask
from fused_attn.ops.ffn import ffn_keep_mask

from .conftest import assert_parity
from .test_attention import _qkv
from .test_ffn import _ffn_args

triton = pytest.importorskip("triton")

from fused_attn.kernels.triton import attention as attention_kernels  # noqa: E402
from fused_attn.kernels.triton import ffn as ffn_kernels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Float32 under the interpreter (which computes bfloat16 dots wrongly, and float16 more slowly);
# float16 on a GPU, where the tile configurations are tuned for 16-bit tensor-core operands.
DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32


def _triton_or_skip():
    if "triton" not in fused_attn.available_backends(DEVICE):
        pytest.skip(f"triton does not run on {DEVICE} tensors here")


def _config_id(config) -> str:
    tiles = "x".join(str(config.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in config.kwargs)
    return f"{tiles}w{config.num_warps}s{config.num_stages}"


def _attention_pairs() -> list:
    """(forward config, backward config, head dim): the two stages' lists walked side by side, the
    narrow tiles at a head dim of 40 (padded to 64), the wide ones at 160 (padded to 256), so that
    every configuration of either stage runs once with the head dims it is chosen for."""
    fwd, bwd = attention_kernels._configs("fwd", interpret=False), attention_kernels._configs("bwd", interpret=False)
    wide = len(attention_kernels._WIDE_TILES)
    pairs = []
    for head_dim, fwd_part, bwd_part in ((40, fwd[:-wide], bwd[:-wide]), (160, fwd[-wide:], bwd[-wide:])):
        for i in range(max(len(fwd_part), len(bwd_part))):
            f, b = fwd_part[i % len(fwd_part)], bwd_part[i % len(bwd_part)]
            pairs.append(pytest.param(f, b, head_dim, id=f"fwd{_config_id(f)}-bwd{_config_id(b)}-d{head_dim}"))
    return pairs


def _pin_attention(monkeypatch, fwd, bwd) -> None:
    monkeypatch.setattr(attention_kernels._attn_fwd_kernel, "configs", [fwd])
    for kernel in (attention_kernels._attn_bwd_stats_kernel, attention_kernels._attn_bwd_dkdv_kernel,
                   attention_kernels._attn_bwd_dq_kernel):
        monkeypatch.setattr(kernel, "configs", [bwd])


def _mask(kind, q_len, k_len):
    gen = torch.Generator().manual_seed(1)
    if kind == "causal+padding":
        return (torch.arange(k_len) < k_len - 37).view(1, 1, 1, k_len).to(DEVICE)
    if kind == "bias":
        return (torch.randn(1, 1, q_len, k_len, generator=gen) * 2).to(DEVICE, DTYPE)
    return None


def test_the_lists_hold_the_configurations_the_kernels_are_given():
    # What the tests below pin is what the autotuner on a GPU chooses from.
    assert len(_attention_pairs()) >= len(attention_kernels._FWD_TILES) + len(attention_kernels._WIDE_TILES)
    gemm = ffn_kernels._configs(interpret=False)
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages, c.num_warps)
            for c in gemm] == ffn_kernels.GEMM_TILES


# Lengths of 170 and 130 cover a 128-row query tile and a partial one; 100 and 150 keys a partial
# key tile of every width; causal with fewer keys than queries and the reverse. 256 and 128 keys are
# whole tiles of every width: the kernels then skip the keys' bounds (KEY_BOUNDS false) while the
# 200 or 256 queries still end in a partial tile or not.
_ATTENTION_CASES = [
    pytest.param("causal", (170, 170), id="causal"),
    pytest.param("causal+padding", (130, 170), id="causal+padding"),
    pytest.param("causal", (170, 100), id="causal-fewer-keys"),
    pytest.param("bias", (170, 150), id="bias"),
    pytest.param("full", (200, 256), id="full-whole-key-tiles"),
    pytest.param("causal", (256, 128), id="causal-whole-key-tiles"),
]


@pytest.mark.parametrize("fwd, bwd, head_dim", _attention_pairs())
@pytest.mark.parametrize("kind, lengths", _ATTENTION_CASES)
def test_attention_every_tile_configuration(fwd, bwd, head_dim, kind, lengths, monkeypatch):
    _triton_or_skip()
    _pin_attention(monkeypatch, fwd, bwd)
    _check_attention(head_dim, kind, lengths)


@pytest.mark.parametrize("fwd, bwd", [pytest.param(*p.values[:2], id=p.id.removesuffix("-d40"))
                                      for p in _attention_pairs() if p.values[2] == 40])
@pytest.mark.parametrize("kind, lengths", [c for c in _ATTENTION_CASES if c.id in ("bias", "full-whole-key-tiles")])
def test_attention_narrow_tiles_at_head_dim_96(fwd, bwd, kind, lengths, monkeypatch):
    """The narrow tiles again at a head dim of 96 (padded to 128), where the dK/dV kernel forms its
    tiles queries x keys rather than transposed (up to 64)."""
    _triton_or_skip()
    _pin_attention(monkeypatch, fwd, bwd)
    _check_attention(96, kind, lengths)


def _check_attention(head_dim, kind, lengths):
    q, k, v = _qkv(1, 2, *lengths, head_dim, DTYPE, DEVICE)
    causal = kind.startswith("causal")
    grads = ("query", "key", "value") + (("attn_mask",) if kind == "bias" else ())
    assert_parity(
        lambda query, key, value, attn_mask: fused_attn.scaled_dot_product_attention(
            query, key, value, attn_mask, is_causal=causal, backend="triton"),
        lambda query, key, value, attn_mask: reference.scaled_dot_product_attention(
            query, key, value, attn_mask, is_causal=causal),
        {"query": q, "key": k, "value": v, "attn_mask": _mask(kind, *lengths)},
        grad_args=grads,
    )
    assert fused_attn.last_backend("scaled_dot_product_attention") == "triton"


@pytest.mark.parametrize("fwd, bwd, head_dim", _attention_pairs())
def test_attention_dropout_every_tile_configuration(fwd, bwd, head_dim, monkeypatch):
    """The keep-mask is a function of the seed and the element's position alone: the one drawn
    under each configuration is the unpinned kernel's where the causal mask lets a query see a key
    (tiles wholly above the diagonal are skipped, and how many are depends on the tile), and the
    backward regenerates it."""
    _triton_or_skip()
    q, k, v = _qkv(1, 2, 150, 170, head_dim, DTYPE, DEVICE, seed=3)
    p = 0.3
    torch.manual_seed(5)
    _, default_keep = attention_with_keep_mask(q, k, v, dropout_p=p, is_causal=True)
    _pin_attention(monkeypatch, fwd, bwd)
    torch.manual_seed(5)
    _, keep = attention_with_keep_mask(q, k, v, dropout_p=p, is_causal=True)
    seen = torch.ones(150, 170, dtype=torch.bool, device=DEVICE).tril()
    assert torch.equal(keep & seen, default_keep & seen)

    def fused(query, key, value):
        torch.manual_seed(5)
        return fused_attn.scaled_dot_product_attention(query, key, value, dropout_p=p, is_causal=True,
                                                       backend="triton")

    assert_parity(
        fused,
        lambda query, key, value: reference.scaled_dot_product_attention(
            query, key, value, dropout_p=p, is_causal=True, dropout_mask=keep),
        {"query": q, "key": k, "value": v},
        grad_args=("query", "key", "value"),
    )


def _gemm_configs() -> list:
    return [pytest.param(c, id=_config_id(c)) for c in ffn_kernels._configs(interpret=False)]


def _tile_ffn_args(config, seed, whole_k_tiles=False):
    """Sizes a third to a half beyond the larger of the tile's M and N, so that every GEMM of the
    FFN (whose dims trade roles between forward and backward) has two tiles or more along each
    dim, the last partial, and K runs several BLOCK_K steps and a remainder; with
    ``whole_k_tiles`` each size rounded up to a multiple of 64, so that K has no remainder (the
    kernel's loads then carry no K bounds: K_BOUNDS off) while M and N still end in partial tiles."""
    size = max(config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"])
    dims = [size * 4 // 3 + 7, size * 5 // 4 + 3, size * 3 // 2 + 5]
    if whole_k_tiles:
        dims = [-(-d // 64) * 64 for d in dims]
    return _ffn_args(*dims, DTYPE, DEVICE, seed=seed)


@pytest.mark.parametrize("config", _gemm_configs())
@pytest.mark.parametrize("approximate,whole_k_tiles", [("none", False), ("tanh", False), ("none", True)],
                         ids=["none", "tanh", "none-whole-k-tiles"])
def test_ffn_every_tile_configuration(config, approximate, whole_k_tiles, monkeypatch):
    """The bias + GELU epilogue, the dGELU prologue and the bias gradients' row sums of every GEMM
    the FFN runs, under each configuration, with K tiles partial and whole."""
    _triton_or_skip()
    monkeypatch.setattr(ffn_kernels._gemm_kernel, "configs", [config])
    assert_parity(
        lambda input, w1, b1, w2, b2: fused_attn.ffn(input, w1, b1, w2, b2, approximate, backend="triton"),
        lambda input, w1, b1, w2, b2: reference.ffn(input, w1, b1, w2, b2, approximate),
        _tile_ffn_args(config, seed=0, whole_k_tiles=whole_k_tiles),
        grad_args=("input", "w1", "b1", "w2", "b2"),
    )
    assert fused_attn.last_backend("ffn") == "triton"


@pytest.mark.parametrize("config", _gemm_configs())
def test_ffn_dropout_every_tile_configuration(config, monkeypatch):
    """The dropout epilogue and its backward's prologue regenerate one keep-mask, the unpinned kernel's."""
    _triton_or_skip()
    args = _tile_ffn_args(config, seed=1)
    rows, model, p = args["input"].shape[0], args["w2"].shape[0], 0.25
    torch.manual_seed(9)
    default_keep = ffn_keep_mask(rows, model, p, DEVICE, "triton")
    monkeypatch.setattr(ffn_kernels._gemm_kernel, "configs", [config])
    torch.manual_seed(9)
    keep = ffn_keep_mask(rows, model, p, DEVICE, "triton")
    assert torch.equal(keep, default_keep)

    def fused(input, w1, b1, w2, b2):
        torch.manual_seed(9)
        return fused_attn.ffn(input, w1, b1, w2, b2, "none", p, backend="triton")

    assert_parity(
        fused,
        lambda input, w1, b1, w2, b2: reference.ffn(input, w1, b1, w2, b2, "none", p, dropout_mask=keep),
        args,
        grad_args=("input", "w1", "b1", "w2", "b2"),
    )
