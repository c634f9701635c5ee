import warnings

import pytest
import torch
import torch.nn.functional as F

import fused_attn
from fused_attn import reference
from fused_attn.backends import BackendNotSupportedError
from fused_attn.ops.attention import NATIVE_GQA, attention_with_keep_mask, repeat_kv_heads

from .conftest import assert_parity, backend_params, check_tensor_parity, supported_dtypes, work_dtype

OP = "scaled_dot_product_attention"
BACKENDS = backend_params(OP, exclude=("reference",))
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _qkv(batch, heads, q_len, k_len, head_dim, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    make = lambda length: torch.randn(batch, heads, length, head_dim, generator=gen).to(device=device, dtype=dtype)  # noqa: E731
    return make(q_len), make(k_len), make(k_len)


def _mask(kind, batch, heads, q_len, k_len, device, seed=1):
    gen = torch.Generator().manual_seed(seed)
    if kind == "none" or kind == "causal":
        return None
    if kind in ("padding", "causal+padding"):
        # Key padding [B, 1, 1, Lk]: each sequence keeps a prefix of random length >= 1.
        lengths = torch.randint(1, k_len + 1, (batch,), generator=gen)
        return (torch.arange(k_len)[None, :] < lengths[:, None]).view(batch, 1, 1, k_len).to(device)
    if kind == "bool4d":
        keep = torch.rand(batch, heads, q_len, k_len, generator=gen) > 0.3
        keep[..., 0] = True  # no fully masked row here; those have their own test
        return keep.to(device)
    if kind == "bias":
        return (torch.randn(batch, 1, q_len, k_len, generator=gen) * 2).to(device)
    raise ValueError(kind)


def _check(backend, device, dtype, *, batch=2, heads=2, q_len=77, k_len=None, head_dim=64, kind="none",
           mask_grad=False, dropout_p=0.0):
    if dtype not in supported_dtypes(backend, device, OP):
        pytest.skip(f"{dtype} is not tested on {backend}-{device}")
    k_len = q_len if k_len is None else k_len
    q, k, v = _qkv(batch, heads, q_len, k_len, head_dim, dtype, device)
    mask = _mask(kind, batch, heads, q_len, k_len, device)
    if mask is not None and mask.is_floating_point():
        mask = mask.to(dtype)
    causal = kind.startswith("causal")
    args = {"query": q, "key": k, "value": v, "attn_mask": mask}
    grads = ("query", "key", "value") + (("attn_mask",) if mask_grad else ())
    assert_parity(
        lambda query, key, value, attn_mask: fused_attn.scaled_dot_product_attention(
            query, key, value, attn_mask, is_causal=causal, backend=backend
        ),
        lambda query, key, value, attn_mask: reference.scaled_dot_product_attention(
            query, key, value, attn_mask, is_causal=causal
        ),
        args,
        grad_args=grads,
    )
    assert fused_attn.last_backend(OP) == backend


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["none", "padding", "bool4d", "bias", "causal", "causal+padding"])
@pytest.mark.parametrize("lengths", [(77, 77), (77, 128)], ids=["self", "cross"])
def test_parity_masks(backend_device, dtype, kind, lengths):
    _check(*backend_device, dtype, q_len=lengths[0], k_len=lengths[1], kind=kind)


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_upstream_gradient_with_a_strided_last_dim(backend_device):
    """A loss on out.transpose(-1, -2) hands the backward a grad_out whose last dim is strided."""
    backend, device = backend_device
    dtype = work_dtype(OP, backend, device)
    q, k, v = _qkv(2, 2, 20, 24, 16, dtype, device)
    assert_parity(
        lambda query, key, value: fused_attn.scaled_dot_product_attention(
            query, key, value, is_causal=True, backend=backend).transpose(-1, -2),
        lambda query, key, value: reference.scaled_dot_product_attention(query, key, value, is_causal=True).transpose(-1, -2),
        {"query": q, "key": k, "value": v},
        grad_args=("query", "key", "value"),
    )


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [8, 16, 40, 64, 128, 256])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_parity_head_dims(backend_device, dtype, head_dim, causal):
    _check(*backend_device, dtype, batch=1, q_len=70, head_dim=head_dim, kind="causal" if causal else "none")


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("dims", [(64, 32), (40, 72), (256, 64), (64, 256)], ids=lambda d: f"d{d[0]}-dv{d[1]}")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_parity_value_head_dim_differs(backend_device, dims, causal):
    backend, device = backend_device
    dtype = work_dtype(OP, backend, device)
    d, dv = dims
    gen = torch.Generator().manual_seed(5)
    q, k = (torch.randn(1, 2, 37, d, generator=gen).to(device=device, dtype=dtype) for _ in range(2))
    v = torch.randn(1, 2, 37, dv, generator=gen).to(device=device, dtype=dtype)
    assert_parity(
        lambda **a: fused_attn.scaled_dot_product_attention(**a, is_causal=causal, backend=backend),
        lambda **a: reference.scaled_dot_product_attention(**a, is_causal=causal),
        {"query": q, "key": k, "value": v},
        grad_args=("query", "key", "value"),
    )


# 16-bit shapes around the edges of the tiles the kernels pack (the CPU backend multiplies 16-bit
# inputs natively where the CPU's tile unit takes them, on chunks of 64 keys x 64 features): key
# lengths at and around a chunk, a padding mask that hides the first keys (a walk that starts
# before its first visible key), value head dims that end inside a chunk, grouped key/value heads
# and a query read through a packed-QKV view.
EDGE_SHAPES = {
    "k1": dict(q_len=5, k_len=1),
    "k63": dict(q_len=70, k_len=63),
    "k65-left-pad": dict(q_len=33, k_len=65, left_pad=40),
    "k300-left-pad": dict(q_len=129, k_len=300, left_pad=70, causal=True),
    "d40-dv72": dict(q_len=50, k_len=97, head_dim=40, v_dim=72),
    "gqa": dict(q_len=40, k_len=130, heads=4, kv_heads=2),
    "packed-qkv": dict(q_len=77, k_len=77, packed=True),
}


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", list(EDGE_SHAPES), ids=str)
def test_parity_16bit_tile_edges(backend_device, dtype, shape):
    backend, device = backend_device
    if dtype not in supported_dtypes(backend, device, OP):
        pytest.skip(f"{dtype} is not tested on {backend}-{device}")
    c = {"heads": 2, "kv_heads": None, "head_dim": 64, "v_dim": None, "left_pad": 0, "causal": False,
         "packed": False} | EDGE_SHAPES[shape]
    heads, d = c["heads"], c["head_dim"]
    kv_heads, dv = c["kv_heads"] or heads, c["v_dim"] or d
    gen = torch.Generator().manual_seed(11)
    make = lambda h, n, dim: torch.randn(2, h, n, dim, generator=gen).to(device=device, dtype=dtype)  # noqa: E731
    if c["packed"]:  # [B, L, 3, H, D] projections viewed as [B, H, L, D]: rows 3 * H * D apart
        qkv = torch.randn(2, c["q_len"], 3, heads, d, generator=gen).to(device=device, dtype=dtype)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    else:
        q, k, v = make(heads, c["q_len"], d), make(kv_heads, c["k_len"], d), make(kv_heads, c["k_len"], dv)
    mask = None
    if c["left_pad"]:
        mask = torch.ones(2, 1, 1, c["k_len"], dtype=torch.bool, device=device)
        mask[0, ..., : c["left_pad"]] = False
    assert_parity(
        lambda **a: fused_attn.scaled_dot_product_attention(
            **a, is_causal=c["causal"], enable_gqa=kv_heads != heads, backend=backend
        ),
        lambda query, key, value, attn_mask: reference.scaled_dot_product_attention(
            query, repeat_kv_heads(key, heads), repeat_kv_heads(value, heads), attn_mask, is_causal=c["causal"]
        ),
        {"query": q, "key": k, "value": v, "attn_mask": mask},
        grad_args=("query", "key", "value"),
    )
    assert fused_attn.last_backend(OP) == backend


TILE_DTYPES = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)


def _skip_unless_on_tile_unit(dtype):
    """The dtype's name in fused_attn._extension.cpu_tile_dtypes(), or a skip where this CPU's tile
    unit does not multiply it."""
    from fused_attn import _extension
    name = str(dtype).removeprefix("torch.")
    if name not in _extension.cpu_tile_dtypes():
        pytest.skip(f"this CPU's tile unit does not multiply {name} (no AMX for it), or oneDNN is off")
    return name


@TILE_DTYPES
def test_cpu_16bit_products_on_the_tile_unit(dtype):
    """Where the CPU's tile unit multiplies the dtype (AMX-BF16 for bfloat16, AMX-FP16 for
    float16), the cpu kernels' products of such inputs run there
    (fused_attn._extension.cpu_tile_dtypes); with oneDNN turned off they run on float32 copies.
    Both pass parity, forward and backward (whose dV, dK and dQ products take P and dS rounded to
    the dtype on the tile unit), and they are two paths (P is rounded to the dtype for P V on the
    tile unit only)."""
    from fused_attn import _extension
    name = _skip_unless_on_tile_unit(dtype)
    q, k, v = _qkv(2, 2, 77, 200, 64, dtype, "cpu")
    mask = _mask("padding", 2, 2, 77, 200, "cpu")
    outputs = []
    for enabled in (True, False):
        with torch.backends.mkldnn.flags(enabled=enabled):
            assert (name in _extension.cpu_tile_dtypes()) == enabled
            assert_parity(
                lambda **a: fused_attn.scaled_dot_product_attention(**a, is_causal=True, backend="cpu"),
                lambda **a: reference.scaled_dot_product_attention(**a, is_causal=True),
                {"query": q, "key": k, "value": v, "attn_mask": mask},
                grad_args=("query", "key", "value"),
            )
            outputs.append(fused_attn.scaled_dot_product_attention(q, k, v, mask, is_causal=True, backend="cpu"))
    assert not torch.equal(*outputs)


@pytest.mark.parametrize("scale, grads", [(None, True), (-0.7, True), (0.0, True), (1e29, False)],
                         ids=["default", "negative", "zero", "huge"])
@pytest.mark.parametrize("kind", ["none", "causal"])
@TILE_DTYPES
def test_cpu_16bit_tiles_scales(scale, grads, kind, dtype):
    """On the tile unit the forward takes an unmasked tile's scores raw, the scale folded into the
    one pass that takes the exponentials (the row max the scaled largest raw score), where the scale
    is positive; other scales, and tiles a mask or the diagonal crosses, are scaled first; the
    backward folds any scale into an unmasked tile's probabilities. Parity either way (scores of
    1e29 and more: a one-hot softmax, nothing overflowing)."""
    _skip_unless_on_tile_unit(dtype)
    q, k, v = _qkv(2, 2, 300, 300, 64, dtype, "cpu")
    options = {"is_causal": kind == "causal", "scale": scale}
    assert_parity(
        lambda **a: fused_attn.scaled_dot_product_attention(**a, **options, backend="cpu"),
        lambda **a: reference.scaled_dot_product_attention(**a, **options),
        {"query": q, "key": k, "value": v},
        grad_args=("query", "key", "value") if grads else (),
    )


@TILE_DTYPES
def test_cpu_16bit_tiles_nan_query_row(dtype):
    """A NaN in a query makes its row NaN (through the exponentials: the one-pass forward's row max
    keeps no NaN bookkeeping) and leaves the other rows as they are."""
    _skip_unless_on_tile_unit(dtype)
    q, k, v = _qkv(1, 2, 300, 300, 64, dtype, "cpu")
    q[0, 1, 7, 5] = float("nan")
    out = fused_attn.scaled_dot_product_attention(q, k, v, backend="cpu")
    assert torch.isnan(out[0, 1, 7]).all()
    rest = torch.ones(300, dtype=torch.bool)
    rest[7] = False
    assert not torch.isnan(out[0, 0]).any() and not torch.isnan(out[0, 1, rest]).any()
    clean = q.clone()
    clean[0, 1, 7] = 0
    assert torch.equal(out[0, 1, rest], fused_attn.scaled_dot_product_attention(clean, k, v, backend="cpu")[0, 1, rest])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("q_len", [1, 3, 4, 5])
@pytest.mark.parametrize("k_len", [1, 77, 300])
@pytest.mark.parametrize("kind", ["none", "padding", "bias", "causal"])
def test_cpu_few_queries(dtype, q_len, k_len, kind):
    """A call with at most four queries (a decoding step against a cache of keys) takes the cpu
    kernels' row-by-row products instead of GEMMs (few_query_scores, one to four rows at a time;
    five queries take the GEMMs): parity, forward and backward, every dtype, masks and causality,
    odd key counts (bfloat16's P V pairs keys: a last key on its own)."""
    _check("cpu", "cpu", dtype, q_len=q_len, k_len=k_len, kind=kind, mask_grad=kind == "bias")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group, q_len", [(4, 1), (2, 2), (6, 1), (4, 3)], ids=["g4-q1", "g2-q2", "g6-q1", "g4-q3"])
@pytest.mark.parametrize("kind", ["none", "padding", "bool4d", "head_bias", "causal", "dropout"])
def test_cpu_few_queries_of_a_grouped_query_group(dtype, group, q_len, kind):
    """Few queries with grouped-query heads: a key/value head's group of query heads takes one task
    (2 x 2 key/value heads, two threads), each key and value row read once for the group, its rows
    four at a time (six and twelve rows: more than one group of them); each head's rows keep their
    own mask rows (a boolean mask or a learned bias differing per head, with its gradient),
    causality and dropout stream."""
    batch, kv_heads, k_len = 2, 2, 140
    heads = kv_heads * group
    gen = torch.Generator().manual_seed(8)
    q = torch.randn(batch, heads, q_len, 64, generator=gen).to(dtype)
    k, v = (torch.randn(batch, kv_heads, k_len, 64, generator=gen).to(dtype) for _ in range(2))
    mask = None
    if kind in ("padding", "bool4d"):
        mask = _mask(kind, batch, heads, q_len, k_len, "cpu")
    elif kind == "head_bias":
        mask = (torch.randn(batch, heads, q_len, k_len, generator=gen) * 2).to(dtype)
    causal, p = kind == "causal", 0.3 if kind == "dropout" else 0.0
    keep = None
    if p:
        torch.manual_seed(5)
        _, keep = attention_with_keep_mask(q, repeat_kv_heads(k, heads), repeat_kv_heads(v, heads), dropout_p=p)

    def fused(query, key, value, attn_mask):
        torch.manual_seed(5)
        return fused_attn.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p=p, is_causal=causal,
                                                       enable_gqa=True, backend="cpu")

    def plain(query, key, value, attn_mask):
        return reference.scaled_dot_product_attention(query, repeat_kv_heads(key, heads), repeat_kv_heads(value, heads),
                                                      attn_mask, dropout_p=p, is_causal=causal, dropout_mask=keep)

    grads = ("query", "key", "value") + (("attn_mask",) if kind == "head_bias" else ())
    _with_threads(2, lambda: assert_parity(fused, plain, {"query": q, "key": k, "value": v, "attn_mask": mask},
                                           grad_args=grads))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("threads", [1, 2, 3], ids=["t1", "t2", "t3"])
def test_cpu_few_queries_of_one_key_value_head_split_among_threads(dtype, threads):
    """One sequence, one key/value head (multi-query attention) read by six query heads: its group
    is split into as few tasks as keep every thread busy (one task of six heads on one thread, two
    of three on two, three of two on three), every split giving the one-task result."""
    gen = torch.Generator().manual_seed(21)
    q = torch.randn(1, 6, 1, 64, generator=gen).to(dtype)
    k, v = (torch.randn(1, 1, 300, 64, generator=gen).to(dtype) for _ in range(2))
    mask = _mask("padding", 1, 6, 1, 300, "cpu")

    def fused(query, key, value):
        return fused_attn.scaled_dot_product_attention(query, key, value, mask, enable_gqa=True, backend="cpu")

    _with_threads(threads, lambda: assert_parity(
        fused, lambda query, key, value: reference.scaled_dot_product_attention(
            query, repeat_kv_heads(key, 6), repeat_kv_heads(value, 6), mask),
        {"query": q, "key": k, "value": v}, grad_args=("query", "key", "value")))
    one_task = _with_threads(1, lambda: fused(q, k, v))
    assert torch.equal(_with_threads(threads, lambda: fused(q, k, v)), one_task)


def test_cpu_few_queries_with_dropout_and_leading_keys_masked():
    """The few-query products with dropout (parity with the reference fed the kernel's keep-mask)
    under a boolean mask that hides each sequence's first keys, so that the walk over the keys
    starts past them (KeySpans)."""
    q, k, v = _qkv(2, 3, 2, 150, 64, torch.float32, "cpu", seed=4)
    mask = torch.ones(2, 1, 1, 150, dtype=torch.bool)
    mask[0, ..., :70] = False
    mask[1, ..., :3] = False
    p = 0.3
    torch.manual_seed(77)
    _, keep = attention_with_keep_mask(q, k, v, mask, dropout_p=p)

    def fused(query, key, value):
        torch.manual_seed(77)
        return fused_attn.scaled_dot_product_attention(query, key, value, mask, dropout_p=p, backend="cpu")

    assert_parity(fused, lambda query, key, value: reference.scaled_dot_product_attention(
        query, key, value, mask, dropout_p=p, dropout_mask=keep), {"query": q, "key": k, "value": v},
        grad_args=("query", "key", "value"))


@pytest.mark.parametrize("dims", [(8, 8), (40, 72), (136, 64)], ids=lambda d: f"d{d[0]}-dv{d[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_few_queries_head_dims_strides_and_groups(dims, dtype):
    """The few-query products over head dims that are not a whole number of their 64-column blocks
    (and value head dims that differ), key and value rows read in place through a row stride past
    the head dim (views into a wider tensor), and grouped-query heads (two query heads a key/value
    head)."""
    d, dv = dims
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 3, d, generator=gen).to(dtype)
    k = torch.randn(2, 2, 130, d + 24, generator=gen).to(dtype)[..., :d]
    v = torch.randn(2, 2, 130, dv + 8, generator=gen).to(dtype)[..., :dv]
    mask = _mask("padding", 2, 4, 3, 130, "cpu")
    assert_parity(
        lambda **a: fused_attn.scaled_dot_product_attention(**a, enable_gqa=True, backend="cpu"),
        lambda **a: reference.scaled_dot_product_attention(
            a["query"], repeat_kv_heads(a["key"], 4), repeat_kv_heads(a["value"], 4), a["attn_mask"]),
        {"query": q, "key": k, "value": v, "attn_mask": mask},
        grad_args=("query", "key", "value"),
    )


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seq", [1, 17, 77, 128, 257])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_parity_sequence_lengths(backend_device, dtype, seq, causal):
    _check(*backend_device, dtype, batch=1, heads=2, q_len=seq, head_dim=32, kind="causal" if causal else "none")


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("lengths", [(17, 77), (77, 17), (1, 257), (257, 1), (100, 33)])
@pytest.mark.parametrize("kind", ["causal", "causal+padding"])
def test_parity_causal_cross_lengths(backend_device, lengths, kind):
    _check(*backend_device, torch.float16, batch=2, q_len=lengths[0], k_len=lengths[1], head_dim=32, kind=kind)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_shape", ["full", "heads-broadcast", "per-key", "per-query", "scalar"])
def test_parity_float_mask_gradient(backend_device, dtype, mask_shape):
    """A learned bias receives its gradient, summed over the dims it was broadcast along (for a
    bias constant along the keys the exact gradient is 0: the sum cancels, and must do so as
    closely as PyTorch's SDPA makes it)."""
    backend, device = backend_device
    if dtype not in supported_dtypes(backend, device, OP):
        pytest.skip(f"{dtype} is not tested on {backend}-{device}")
    q, k, v = _qkv(2, 3, 33, 45, 32, dtype, device)
    shape = {"full": (2, 3, 33, 45), "heads-broadcast": (1, 1, 33, 45), "per-key": (1, 1, 1, 45), "per-query": (2, 1, 33, 1),
             "scalar": (1, 1, 1, 1)}[mask_shape]
    bias = torch.randn(*shape, generator=torch.Generator().manual_seed(3)).to(device=device, dtype=dtype)
    assert_parity(
        lambda query, key, value, attn_mask: fused_attn.scaled_dot_product_attention(
            query, key, value, attn_mask, backend=backend
        ),
        lambda query, key, value, attn_mask: F.scaled_dot_product_attention(
            query, key, value, _keys_materialised(attn_mask, key)
        ),
        {"query": q, "key": k, "value": v, "attn_mask": bias},
        grad_args=("query", "key", "value", "attn_mask"),
    )


def _keys_materialised(attn_mask, key):
    """The plain call's mask with a broadcast key dim written out: torch's SDPA on CUDA (its
    memory-efficient kernel) refuses a bias whose last dim has stride 0 ("(*bias): last dimension
    must be contiguous"), which the fused op takes as it is. Its gradient is summed back by autograd."""
    if attn_mask.shape[-1] != 1:
        return attn_mask
    return attn_mask.expand(*attn_mask.shape[:-1], key.shape[-2]).contiguous()


def _scale_parity(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, seed: int = 0) -> None:
    """Parity of attention at ``scale``, forward and the three input gradients."""
    assert_parity(
        lambda query, key, value: fused_attn.scaled_dot_product_attention(query, key, value, scale=scale,
                                                                          backend=backend),
        lambda query, key, value: reference.scaled_dot_product_attention(query, key, value, scale=scale),
        {"query": q, "key": k, "value": v},
        grad_args=("query", "key", "value"), seed=seed,
    )


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_custom_scale(backend_device):
    backend, device = backend_device
    q, k, v = _qkv(1, 2, 30, 30, 16, work_dtype(OP, backend, device), device)
    for scale in (0.05, 1.0, 3.0, -0.5, 8.0):
        _scale_parity(backend, q, k, v, scale)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim, scale", [(16, 1.0), (2, -1.0)], ids=["d16", "d2-negative-scale"])
def test_peaked_rows_keep_gradient_parity(backend_device, dtype, head_dim, scale):
    """Queries and keys of size 3: nearly one-hot rows. A backward whose row terms (delta =
    rowsum(dO * O), from the output rounded to 16 bits) do not come from the P it recomputes
    leaves dS = P (dP - delta) uncancelled: triton's float16 dQ and dK were 2-6x the plain error."""
    backend, device = backend_device
    if dtype not in supported_dtypes(backend, device, OP):
        pytest.skip(f"{dtype} is not tested on {backend}-{device}")
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        q, k = (torch.randn(1, 2, 64, head_dim, generator=gen) * 3 for _ in range(2))
        v = torch.randn(1, 2, 64, head_dim, generator=gen)
        _scale_parity(backend, *(t.to(device=device, dtype=dtype) for t in (q, k, v)), scale, seed=seed)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("q_len", [2, 5])
def test_peaked_rows_float32_delta_keeps_its_digits(backend_device, q_len):
    """A logit range of ~30 (head dim 80 at scale 0.69) puts most of a row's P on one key, so delta
    = sum_j P_ij dP_ij is close to that key's dP (|dP| ~ 18) and dS = P (dP - delta) keeps only
    their difference: delta summed in float32 carried several ulps of |delta| into dS (cpu float32
    dQ and dK 6x the plain error at two queries)."""
    backend, device = backend_device
    if torch.float32 not in supported_dtypes(backend, device, OP):
        pytest.skip(f"float32 is not tested on {backend}-{device}")
    for seed in range(12):
        gen = torch.Generator().manual_seed(seed)
        q = torch.randn(1, 2, q_len, 80, generator=gen)
        k, v = torch.randn(1, 2, 22, 80, generator=gen), torch.randn(1, 2, 22, 80, generator=gen)
        _scale_parity(backend, q.to(device), k.to(device), v.to(device), 0.69)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("scale", [1e4, 1e30])
def test_one_hot_rows_give_zero_score_gradients(backend_device, scale):
    """At a huge scale every row is one-hot: dQ and dK are exactly 0, as the plain backward gives
    them. The backward's scores, rounded an ulp above the forward's row max, gave exp of ~1e23 (inf,
    then NaN gradients on cpu), and in float16 triton's dQ was 0.0122 at 1e4 and inf at 1e30."""
    backend, device = backend_device
    for dtype in (torch.float32, torch.float16):
        if dtype not in supported_dtypes(backend, device, OP):
            continue
        gen = torch.Generator().manual_seed(5)
        q, k = torch.randn(1, 2, 33, 16, generator=gen), torch.randn(1, 2, 20, 16, generator=gen)
        v, up = torch.randn(1, 2, 20, 8, generator=gen), torch.randn(1, 2, 33, 8, generator=gen)
        q, k, v, up = (t.to(device=device, dtype=dtype) for t in (q, k, v, up))
        q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
        out = fused_attn.scaled_dot_product_attention(q, k, v, scale=scale, backend=backend)
        out.backward(up)
        expected = reference.scaled_dot_product_attention(*(t.detach().double() for t in (q, k, v)), scale=scale)
        torch.testing.assert_close(out.double(), expected, rtol=0, atol=0)  # one value row each
        assert torch.equal(q.grad, torch.zeros_like(q)) and torch.equal(k.grad, torch.zeros_like(k)), dtype
        assert v.grad.isfinite().all()


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_dropout_at_a_huge_scale_keeps_zero_gradients_zero(backend_device):
    """dQ and dK take the scale and the dropout's 1 / (1 - p) at their stores: applied one after the
    other, not as their product, which overflows (1e38 x 10) where both are finite, so that a zero
    gradient (one-hot rows, as above) stayed 0 and did not become 0 x inf = NaN (triton and cuda)."""
    backend, device = backend_device
    for dtype in (torch.float32, torch.float16):
        if dtype not in supported_dtypes(backend, device, OP):
            continue
        gen = torch.Generator().manual_seed(7)
        # Small enough that the scaled scores stay finite (|q.k| < 3.4): one-hot rows all the same.
        q, k = torch.randn(1, 2, 33, 16, generator=gen) * 0.2, torch.randn(1, 2, 20, 16, generator=gen) * 0.2
        v, up = torch.randn(1, 2, 20, 8, generator=gen), torch.randn(1, 2, 33, 8, generator=gen)
        q, k, v, up = (t.to(device=device, dtype=dtype) for t in (q, k, v, up))
        q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
        out = fused_attn.scaled_dot_product_attention(q, k, v, scale=1e38, dropout_p=0.9, backend=backend)
        out.backward(up)
        assert torch.equal(q.grad, torch.zeros_like(q)) and torch.equal(k.grad, torch.zeros_like(k)), dtype
        assert out.isfinite().all() and v.grad.isfinite().all()


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("bias", [3e38, float("inf")], ids=["3e38", "inf"])
def test_huge_positive_bias_picks_its_key(backend_device, bias):
    """A bias above 2.36e38 overflowed to inf times log2(e) and the row to inf - inf = NaN on triton
    and cuda; the plain softmax gives its key all the weight (an infinite bias is NaN there too)."""
    backend, device = backend_device
    q, k, v = _qkv(1, 2, 5, 6, 16, work_dtype(OP, backend, device), device)
    mask = torch.zeros(5, 6, device=device)
    mask[:, 2] = bias
    mask[3, 4] = bias  # two keys at the same bias share the weight
    out = fused_attn.scaled_dot_product_attention(q, k, v, mask, backend=backend)
    expected = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), mask.double())
    if bias == float("inf"):
        assert out.isnan().all() and expected.isnan().all()
        return
    torch.testing.assert_close(out, expected.to(out.dtype))


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_matches_torch_sdpa(backend_device):
    """torch's own SDPA is the oracle here (run in float64 for the truth)."""
    backend, device = backend_device
    dtype = work_dtype(OP, backend, device)
    q, k, v = _qkv(2, 2, 50, 60, 32, dtype, device)
    args = {"query": q, "key": k, "value": v, "attn_mask": _mask("bias", 2, 2, 50, 60, device).to(dtype)}
    grads = ("query", "key", "value")
    assert_parity(lambda **a: fused_attn.scaled_dot_product_attention(**a, backend=backend),
                  F.scaled_dot_product_attention, args, grad_args=grads)
    args["attn_mask"] = None
    assert_parity(lambda **a: fused_attn.scaled_dot_product_attention(**a, is_causal=True, backend=backend),
                  lambda **a: F.scaled_dot_product_attention(**a, is_causal=True), args, grad_args=grads)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("variant", ["upper_left", "lower_right"])
@pytest.mark.parametrize("lengths", [(17, 77), (77, 17), (33, 33), (1, 40)], ids=lambda n: f"q{n[0]}-k{n[1]}")
def test_causal_bias_matches_torch_sdpa(backend_device, variant, lengths):
    """torch's CausalBias objects (causal_upper_left / causal_lower_right) as attn_mask give what
    torch's SDPA gives for them, forward and backward, as a plain tensor."""
    from torch.nn.attention import bias as torch_bias

    backend, device = backend_device
    dtype = work_dtype(OP, backend, device)
    q_len, k_len = lengths
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns of NaN rows for lower_right with Lq > Lk
        causal = getattr(torch_bias, f"causal_{variant}")(q_len, k_len)
    q, k, v = _qkv(2, 2, q_len, k_len, 32, dtype, device)
    out = fused_attn.scaled_dot_product_attention(q, k, v, causal, backend=backend)
    assert type(out) is torch.Tensor
    assert fused_attn.last_backend(OP) == backend

    def truth(**a):
        # torch's own SDPA, rows it leaves NaN (a query that sees no key) read as 0
        return torch.nan_to_num(F.scaled_dot_product_attention(**a, attn_mask=causal), nan=0.0)

    assert_parity(lambda **a: fused_attn.scaled_dot_product_attention(**a, attn_mask=causal, backend=backend),
                  truth, {"query": q, "key": k, "value": v}, grad_args=("query", "key", "value"))
    if variant == "lower_right" and q_len > k_len:
        # Query i sees keys j <= i + Lk - Lq: the first Lq - Lk queries see none and get 0.
        assert (out[:, :, : q_len - k_len] == 0).all()


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_causal_bias_is_checked_against_the_inputs(backend_device):
    from torch.nn.attention.bias import causal_lower_right

    backend, device = backend_device
    q, k, v = _qkv(1, 2, 5, 9, 16, work_dtype(OP, backend, device), device)
    sdpa = lambda *a, **kw: fused_attn.scaled_dot_product_attention(*a, **kw, backend=backend)  # noqa: E731
    with pytest.raises(ValueError, match=r"attn_mask is a CausalBias for 5 queries and 8 keys; query has 5 and key 9"):
        sdpa(q, k, v, causal_lower_right(5, 8))
    with pytest.raises(ValueError, match="is_causal must be False when attn_mask is a CausalBias"):
        sdpa(q, k, v, causal_lower_right(5, 9), is_causal=True)
    with pytest.raises(TypeError, match="is_causal must be a Python bool"):
        sdpa(q, k, v, causal_lower_right(5, 9), is_causal=1)
    with pytest.raises(ValueError, match="query must be 4-D"):
        sdpa(q[0], k, v, causal_lower_right(5, 9))


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("kv_heads", [(1, 1), (2, 2), (2, 4), (4, 1)], ids=lambda h: f"k{h[0]}-v{h[1]}")
@pytest.mark.parametrize("kind", ["padding", "causal"])
def test_grouped_query_attention_matches_torch_sdpa(backend_device, kv_heads, kind):
    """enable_gqa=True as torch's SDPA: fewer key/value heads than query heads (each a divisor),
    forward and the gradients summed back into each key/value head, against torch in float64."""
    backend, device = backend_device
    dtype = work_dtype(OP, backend, device)
    gen = torch.Generator().manual_seed(0)
    make = lambda heads, length: torch.randn(2, heads, length, 32, generator=gen).to(device=device, dtype=dtype)  # noqa: E731
    args = {"query": make(4, 33), "key": make(kv_heads[0], 47), "value": make(kv_heads[1], 47),
            "attn_mask": _mask(kind, 2, 4, 33, 47, device)}
    causal = kind == "causal"
    assert_parity(
        lambda **a: fused_attn.scaled_dot_product_attention(**a, is_causal=causal, enable_gqa=True, backend=backend),
        lambda **a: F.scaled_dot_product_attention(**a, is_causal=causal, enable_gqa=True),
        args, grad_args=("query", "key", "value"),
    )
    assert fused_attn.last_backend(OP) == backend


class _RecordOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Every op that runs: its name and the shapes of its tensor arguments."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
        self.calls.append((func.overloadpacket.__name__, shapes))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("kind", ["padding", "causal"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["no-dropout", "dropout"])
def test_grouped_heads_are_read_in_place(backend_device, kind, dropout_p):
    """enable_gqa: the kernels get key and value with their own head count, not repeated (no op
    copies them), and give what the same kernel gives for the heads repeated in memory: the same
    output and dQ bit for bit (dropout included: its stream is keyed by the query head), and each
    key/value head's dK/dV the sum over its group (within the rounding of the repeated run's
    per-head terms: the cpu and Triton kernels sum in float32 and round once)."""
    backend, device = backend_device
    assert backend in NATIVE_GQA
    dtype = work_dtype(OP, backend, device)
    gen = torch.Generator().manual_seed(5)
    make = lambda heads, length, dim: torch.randn(2, heads, length, dim, generator=gen).to(device=device, dtype=dtype)  # noqa: E731
    q, k, v, grad_out = make(6, 21, 16), make(2, 30, 16), make(2, 30, 24), make(6, 21, 24)
    mask, causal = _mask(kind, 2, 6, 21, 30, device), kind == "causal"

    def run(key, value):
        inputs = [t.detach().requires_grad_() for t in (q, key, value)]
        torch.manual_seed(11)
        out = fused_attn.scaled_dot_product_attention(*inputs, mask, dropout_p, causal, enable_gqa=True,
                                                      backend=backend)
        out.backward(grad_out)
        assert fused_attn.last_backend(OP) == backend
        return out.detach(), *(t.grad for t in inputs)

    # The cpu backward's schedule follows the thread count and the head counts (grouped and
    # repeated heads may take different ones, whose dQ rounds differently): two threads, on
    # which both runs take the per-head schedule, whatever the machine.
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with _RecordOps() as record:
            out, dq, dk, dv = run(k, v)
        out_r, dq_r, dk_r, dv_r = run(k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1))
    finally:
        torch.set_num_threads(previous)
    kernel_calls = [shapes for name, shapes in record.calls if "attention_fwd" in name or "attention_bwd" in name]
    assert len(kernel_calls) == 2, record.calls
    for shapes in kernel_calls:
        assert (2, 2, 30, 16) in shapes and (2, 2, 30, 24) in shapes, shapes
    copies = [name for name, _ in record.calls if name in ("repeat_interleave", "index_select", "clone", "copy_", "cat")]
    assert not copies, copies

    assert torch.equal(out, out_r)
    assert torch.equal(dq, dq_r)
    for name, got, per_head in (("key", dk, dk_r), ("value", dv, dv_r)):
        per_head = per_head.double().unflatten(1, (2, 3))
        bound = 3 * torch.finfo(dtype).eps * float(per_head.abs().max())
        err = float((got.double() - per_head.sum(2)).abs().max())
        assert err <= bound, (f"grad {name}", err, bound)


@pytest.mark.parametrize("heads", [(3, 3), (2, 1), (0, 0)], ids=["indivisible", "key-value-differ", "none"])
def test_native_cpu_op_rejects_heads_it_cannot_group(heads):
    """The extension's op, called directly, checks the head counts itself: key and value may have
    fewer heads than the query only as one shared divisor of its heads."""
    from fused_attn import _extension

    if not _extension.has_kernel("attention_fwd", "cpu"):
        pytest.skip("the extension's cpu kernels are not built")
    q = torch.randn(1, 4, 8, 16)
    k, v = torch.randn(1, heads[0], 8, 16), torch.randn(1, heads[1], 8, 16)
    with pytest.raises(RuntimeError, match=r"\(or, grouped, the same divisor of query's heads\), got key"):
        torch.ops.fused_attn.attention_fwd(q, k, v, None, 0.25, False, 0.0, None)


# (threads, query heads, key/value heads) that take each schedule of the grouped CPU backward
# (GroupSplit and attention_bwd_cpu in csrc/cpu/attention.cpp): one task per key/value head and
# its whole group; the group split across two per-head tasks whose float32 parts are summed after;
# the split group in the per-block passes.
GROUPED_SCHEDULES = {"per-head": (1, 4, 1), "per-head-split": (2, 4, 1), "per-block-split": (4, 2, 1)}


@pytest.mark.parametrize("schedule", list(GROUPED_SCHEDULES))
@pytest.mark.parametrize("kind", ["none", "causal+padding", "dropout"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_backward_schedules_grouped_heads(schedule, kind, dtype):
    """The CPU backward's schedules with one key/value head read by several query heads, against
    the reference in float64 (with dropout: given the kernel's own keep-mask). In bfloat16 on a
    CPU with AMX the products run on the tile unit, whose dK/dV sums are transposed."""
    if dtype not in supported_dtypes("cpu", "cpu", OP):
        pytest.skip("the cpu backend is not available")
    threads, heads, kv_heads = GROUPED_SCHEDULES[schedule]
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, h, n, 32, generator=gen).to(dtype)
               for h, n in ((heads, 150), (kv_heads, 170), (kv_heads, 170)))
    mask = None if kind == "dropout" else _mask(kind, 1, heads, 150, 170, "cpu")
    args = {"query": q, "key": k, "value": v, "attn_mask": mask}
    causal, p = kind.startswith("causal"), 0.3 if kind == "dropout" else 0.0
    keep = None
    if p:
        torch.manual_seed(7)
        _, keep = attention_with_keep_mask(q, k.repeat_interleave(heads // kv_heads, 1),
                                           v.repeat_interleave(heads // kv_heads, 1), dropout_p=p)

    def fused(**a):
        torch.manual_seed(7)
        return fused_attn.scaled_dot_product_attention(**a, dropout_p=p, is_causal=causal, enable_gqa=True,
                                                       backend="cpu")

    def plain(query, key, value, attn_mask):
        group = heads // kv_heads
        return reference.scaled_dot_product_attention(
            query, key.repeat_interleave(group, 1), value.repeat_interleave(group, 1), attn_mask, dropout_p=p,
            is_causal=causal, dropout_mask=keep)

    _with_threads(threads, lambda: assert_parity(fused, plain, args, grad_args=("query", "key", "value")))


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("kind", ["bool", "float", "causal-cross"])
def test_fully_masked_rows_give_zero_and_zero_grads(backend_device, kind):
    backend, device = backend_device
    dtype = work_dtype(OP, backend, device)
    q, k, v = _qkv(1, 2, 9, 12, 16, dtype, device)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    causal = False
    if kind == "bool":
        mask = torch.ones(1, 2, 9, 12, dtype=torch.bool, device=device)
        mask[:, :, 3] = False
    elif kind == "float":
        mask = torch.zeros(1, 2, 9, 12, device=device, dtype=dtype)
        mask[:, :, 3] = float("-inf")
    else:
        # Causal with a padding mask hiding key 0: query 0 sees no key at all.
        mask = torch.ones(1, 1, 1, 12, dtype=torch.bool, device=device)
        mask[..., 0] = False
        causal = True
    out = fused_attn.scaled_dot_product_attention(q, k, v, mask, is_causal=causal, backend=backend)
    row = 3 if kind != "causal-cross" else 0
    assert torch.isfinite(out).all()
    assert (out[:, :, row] == 0).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()
    assert (q.grad[:, :, row] == 0).all()
    assert_parity(
        lambda **a: fused_attn.scaled_dot_product_attention(**a, is_causal=causal, backend=backend),
        lambda **a: reference.scaled_dot_product_attention(**a, is_causal=causal),
        {"query": q, "key": k, "value": v, "attn_mask": mask},
        grad_args=("query", "key", "value"),
    )


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("value", ["-1e9", "finfo.min"])
def test_rows_masked_by_huge_finite_bias(backend_device, dtype, value):
    """A float mask of -1e9 or finfo.min on every key of a row (a common masked_fill value) does
    not mask the row out: as in PyTorch its probabilities stay uniform, in the forward and in the
    gradients, whatever the size of the bias next to the scores."""
    backend, device = backend_device
    if dtype not in supported_dtypes(backend, device, OP):
        pytest.skip(f"{dtype} is not tested on {backend}-{device}")
    # float16 holds no -1e9: a float32 mask with float16 inputs, as a model without autocast has.
    mask_dtype = torch.float32 if dtype == torch.float16 and value == "-1e9" else dtype
    big = torch.finfo(mask_dtype).min if value == "finfo.min" else float(value)
    q, k, v = _qkv(1, 2, 9, 12, 16, dtype, device)
    gen = torch.Generator().manual_seed(3)
    mask = torch.randn(1, 2, 9, 12, generator=gen).to(device=device, dtype=mask_dtype)
    mask[:, :, 3] = big  # every key of query 3
    mask[:, :, 5, ::2] = big  # half the keys of query 5
    assert_parity(
        lambda **a: fused_attn.scaled_dot_product_attention(**a, backend=backend),
        lambda **a: reference.scaled_dot_product_attention(**a),
        {"query": q, "key": k, "value": v, "attn_mask": mask},
        grad_args=("query", "key", "value"),
    )


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_padding_mask_is_read_through_strides(backend_device, monkeypatch):
    """The [B, 1, 1, Lk] mask reaches the kernel as a zero-stride view, not an expanded copy."""
    backend, device = backend_device
    from fused_attn.ops import attention as attention_op

    seen = {}
    kernel = attention_op._FWD_OPS[backend]

    def spy(q, k, v, mask, *args):
        seen["mask"] = mask
        return kernel(q, k, v, mask, *args)

    monkeypatch.setitem(attention_op._FWD_OPS, backend, spy)
    q, k, v = _qkv(2, 4, 16, 16, 16, work_dtype(OP, backend, device), device)
    pad = _mask("padding", 2, 4, 16, 16, device)
    fused_attn.scaled_dot_product_attention(q, k, v, pad, backend=backend)
    mask = seen["mask"]
    assert mask.shape == (2, 4, 16, 16)
    assert mask.stride()[1] == 0 and mask.stride()[2] == 0
    assert mask.untyped_storage().data_ptr() == pad.untyped_storage().data_ptr()


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_non_contiguous_layouts(backend_device):
    """[B, L, H, D] projections transposed to [B, H, L, D] are used in place."""
    backend, device = backend_device
    x = torch.randn(2, 40, 3, 3, 16, device=device, dtype=work_dtype(OP, backend, device))  # [B, L, (q,k,v), H, D]
    q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    # The same as on contiguous copies, whose parity the tests above check.
    torch.testing.assert_close(
        fused_attn.scaled_dot_product_attention(q, k, v, is_causal=True, backend=backend),
        fused_attn.scaled_dot_product_attention(*(t.contiguous() for t in (q, k, v)), is_causal=True, backend=backend),
    )


# The memory orders of [B, H, L, D] a query arrives in: as made, heads split off a batch-first
# projection ([B, L, H, D], Hugging Face), off a sequence-first one ([L, B, H, D], torch.nn).
QUERY_LAYOUTS = {"bhld": (0, 1, 2, 3), "blhd": (0, 2, 1, 3), "lbhd": (2, 0, 1, 3)}


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("layout", list(QUERY_LAYOUTS))
def test_output_follows_the_query_layout(backend_device, layout):
    """The output is laid out as the query (as torch's SDPA does), so that merging the heads back
    (transpose + reshape) is a view, not a copy; values and gradients are those of contiguous
    inputs, a strided upstream gradient included."""
    backend, device = backend_device
    dtype = work_dtype(OP, backend, device)
    order = QUERY_LAYOUTS[layout]
    shapes = {"q": (2, 3, 33, 16), "kv": (2, 3, 40, 16)}
    gen = torch.Generator().manual_seed(0)

    def in_layout(shape):
        stored = torch.randn([shape[d] for d in order], generator=gen).to(device=device, dtype=dtype)
        return stored.permute(*(order.index(d) for d in range(4)))

    q, k, v = (in_layout(shapes[n]).requires_grad_() for n in ("q", "kv", "kv"))
    out = fused_attn.scaled_dot_product_attention(q, k, v, is_causal=True, backend=backend)
    assert out.permute(*order).is_contiguous(), f"output strides {out.stride()} for a {layout} query"
    grad = in_layout(shapes["q"])  # as the gradient of the merged heads arrives
    out.backward(grad)

    dense = [t.detach().contiguous().requires_grad_() for t in (q, k, v)]
    expected = fused_attn.scaled_dot_product_attention(*dense, is_causal=True, backend=backend)
    assert expected.is_contiguous()
    expected.backward(grad.contiguous())
    assert torch.equal(out, expected)
    for name, got, want in zip(("query", "key", "value"), (q, k, v), dense):
        assert torch.equal(got.grad, want.grad), f"grad {name}"



@pytest.mark.parametrize("backend_device", BACKENDS)
def test_backward_keeps_no_output(backend_device):
    """The backward reads the row statistics, not the output: autograd keeps the inputs, the
    statistics and the seed, and nothing in the output's memory, so a caller who lets the output
    go (it was summed, or consumed by an op that keeps no copy) frees it."""
    backend, device = backend_device
    dtype = work_dtype(OP, backend, device)
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 24, 24, 16, dtype, device))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fused_attn.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=0.1, backend=backend)
    assert fused_attn.last_backend(OP) == backend
    storages = {t.untyped_storage().data_ptr() for t in saved}
    assert {q.data_ptr(), k.data_ptr(), v.data_ptr()} <= storages
    assert out.untyped_storage().data_ptr() not in storages
    out.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))

@pytest.mark.parametrize("layout", list(QUERY_LAYOUTS))
@pytest.mark.parametrize("dtype, backend", [(torch.float32, "reference"), (torch.float64, None)])
def test_reference_output_follows_the_query_layout(layout, dtype, backend):
    """The reference (named, or the float64 fallback) lays its output out as the kernels do."""
    order = QUERY_LAYOUTS[layout]
    stored = torch.randn([(2, 3, 9, 8)[d] for d in order], dtype=dtype)
    q = stored.permute(*(order.index(d) for d in range(4)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fused_attn.FallbackWarning)
        out = fused_attn.scaled_dot_product_attention(q, q, q, backend=backend)
    assert fused_attn.last_backend(OP) == "reference"
    assert out.permute(*order).is_contiguous(), f"output strides {out.stride()} for a {layout} query"
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q))


@pytest.mark.parametrize("kind", ["bool", "float", "causal-cross"])
def test_cpu_forward_log_sum_exp_of_a_row_that_sees_no_key_is_inf(kind):
    """The native CPU forward's second output, the log-sum-exp the backward reads, is +inf for a row
    that sees no key (the contract in csrc/cpu/attention.cpp: every probability the backward
    recomputes there is exp(-inf - inf) = 0) and logsumexp of the scaled, masked scores elsewhere.
    The public op cannot tell: with s = -inf on such a row, any finite lse gives P = 0 as well."""
    if torch.float32 not in supported_dtypes("cpu", "cpu", OP):
        pytest.skip("the cpu backend is not available")
    q, k, v = _qkv(1, 2, 9, 12, 16, torch.float32, "cpu")
    causal, row = False, 3
    if kind == "bool":
        mask = torch.ones(1, 2, 9, 12, dtype=torch.bool)
        mask[:, :, 3] = False
    elif kind == "float":
        mask = torch.randn(1, 2, 9, 12, generator=torch.Generator().manual_seed(3))
        mask[:, :, 3] = float("-inf")
    else:
        # Causal with a padding mask hiding key 0: query 0 sees no key at all.
        mask = torch.ones(1, 1, 1, 12, dtype=torch.bool)
        mask[..., 0] = False
        mask = mask.expand(1, 2, 9, 12)
        causal, row = True, 0
    scale = 0.25
    _, lse = torch.ops.fused_attn.attention_fwd(q, k, v, mask, scale, causal, 0.0, None)
    scores = scale * q.double() @ k.double().transpose(-1, -2)
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.double()
    if causal:
        scores = scores.masked_fill(torch.ones(9, 12, dtype=torch.bool).triu(1), float("-inf"))
    want = torch.logsumexp(scores, dim=-1)
    assert torch.isneginf(want[:, :, row]).all() and torch.isfinite(want[:, :, row + 1:]).all()
    want[:, :, row] = float("inf")
    torch.testing.assert_close(lse.double(), want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Dropout


def _dropout_inputs(backend, device, q_len=64, k_len=80):
    return _qkv(2, 3, q_len, k_len, 32, work_dtype(OP, backend, device), device)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_fraction_matches_p(backend_device, p):
    """The drop fraction of the backend's own keep-mask, read off the op's output: with equal
    scores every probability is 1/Lk, and with the identity for V, output [i, j] is
    keep[i, j] / (Lk * (1 - p))."""
    backend, device = backend_device
    dtype = work_dtype(OP, backend, device)
    q = torch.zeros(2, 3, 128, 128, device=device, dtype=dtype)
    v = torch.eye(128, device=device, dtype=dtype).expand(2, 3, 128, 128)
    torch.manual_seed(0)
    out = fused_attn.scaled_dot_product_attention(q, q, v, dropout_p=p, backend=backend)
    assert fused_attn.last_backend(OP) == backend
    keep = out > 0
    # 1/128 and 1 are exact: the kept values are 1/(1 - p) / 128 rounded once to the dtype (the keep
    # scale in float32 first, philox::keep_divisor), so within one ulp of the dtype.
    kept, want = out[keep].double(), 1 / (128 * (1 - p))
    assert float((kept - want).abs().max()) <= torch.finfo(dtype).eps * want
    dropped = 1.0 - keep.float().mean().item()
    # 98304 draws: the standard error is below 0.002.
    assert abs(dropped - p) < 0.01, dropped


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("kind", ["none", "causal", "padding", "bias"])
def test_dropout_forward_and_backward_match_reference_with_kernel_mask(backend_device, kind):
    """Forward and backward equal the reference fed the kernel's own keep-mask (with a learned bias,
    its gradient too)."""
    backend, device = backend_device
    q, k, v = _dropout_inputs(backend, device)
    mask = _mask(kind, 2, 3, 64, 80, device)
    if kind == "bias":
        mask = mask.to(q.dtype)
    causal = kind == "causal"
    p = 0.3
    torch.manual_seed(1234)
    _, keep = attention_with_keep_mask(q, k, v, mask, dropout_p=p, is_causal=causal)

    def fused(query, key, value, attn_mask):
        torch.manual_seed(1234)  # the op draws the same seed as the keep-mask call above
        return fused_attn.scaled_dot_product_attention(
            query, key, value, attn_mask, dropout_p=p, is_causal=causal, backend=backend
        )

    def plain(query, key, value, attn_mask):
        return reference.scaled_dot_product_attention(
            query, key, value, attn_mask, dropout_p=p, is_causal=causal, dropout_mask=keep
        )

    grads = ("query", "key", "value") + (("attn_mask",) if kind == "bias" else ())
    assert_parity(fused, plain, {"query": q, "key": k, "value": v, "attn_mask": mask}, grad_args=grads)


# p = 1 - 2^-17: a kept element is scaled by 2^17, beyond fp16's range. Seed 6 keeps 2 of 256 x 512
# elements (rows 87 and 160).
NEAR_ONE_P, NEAR_ONE_SEED = 1.0 - 2.0**-17, 6


def _dropout_near_one(backend, device, q, k, v, upstream, partner=None):
    """[output, grad query, grad key, grad value] of the fp16 op at p = NEAR_ONE_P and their float64
    truth (the reference fed the kernel's keep-mask), where each row holding a kept element attends
    to that key alone, or also to ``partner(key)``, which must be dropped; other rows see every key."""
    if torch.float16 not in supported_dtypes(backend, device, OP):
        pytest.skip(f"float16 is not tested on {backend}-{device}")
    torch.manual_seed(NEAR_ONE_SEED)
    _, keep = attention_with_keep_mask(q, k, v, dropout_p=NEAR_ONE_P)
    kept = keep.nonzero().tolist()
    assert kept, "the stream no longer keeps an element here: pick another seed"
    mask = torch.ones(keep.shape, dtype=torch.bool, device=device)
    for b, h, i, j in kept:
        mask[b, h, i] = False
        mask[b, h, i, j] = True
        if partner is not None:
            assert not keep[b, h, i, partner(j)], "the other key of a row must be dropped: pick another seed"
            mask[b, h, i, partner(j)] = True

    def run(fn, dtype):
        args = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*args)
        out.backward(upstream.to(dtype))
        return [out.detach()] + [a.grad for a in args]

    torch.manual_seed(NEAR_ONE_SEED)
    fused = run(lambda *a: fused_attn.scaled_dot_product_attention(
        *a, mask, dropout_p=NEAR_ONE_P, backend=backend), torch.float16)
    truth = run(lambda *a: reference.scaled_dot_product_attention(
        *a, mask, dropout_p=NEAR_ONE_P, dropout_mask=keep), torch.float64)
    return fused, truth


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_dropout_near_one_does_not_overflow_fp16(backend_device):
    """A kept probability is scaled by 2^17, beyond fp16's range, though O = P V / (1 - p) is not. Each
    row holding a kept element attends to that key alone (P = 1), so the true output and gradients
    are finite and the only rounding is their cast to fp16: within one ulp of their scale."""
    backend, device = backend_device
    q, k, v = _qkv(1, 1, 256, 512, 16, torch.float16, device)
    v = v * 0.05  # |O| up to ~2e4: large in fp16, not out of range
    upstream = torch.randn(1, 1, 256, 16, generator=torch.Generator().manual_seed(2)).to(device) * 0.01
    fused, truth = _dropout_near_one(backend, device, q, k, v, upstream)
    assert truth[0].abs().max() > 1e4  # kept elements reached the output
    scale = max(float(t.abs().max()) for t in truth)
    for name, got, want in zip(("output", "grad query", "grad key", "grad value"), fused, truth):
        assert torch.isfinite(got).all(), name
        err = float((got.double() - want).abs().max())
        assert err <= torch.finfo(torch.float16).eps * scale, (name, err, scale)


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_dropout_near_one_score_gradients_do_not_overflow_fp16(backend_device):
    """The weight split: each row holding a kept element attends to that key and one dropped key,
    with equal probabilities 1/2. dP of the kept key is dO . v / (1 - p) = 2^19 and dS = P (dP -
    delta) = +-2^17, beyond fp16, though dQ, dK (small q and k) and dV are not: the 1 / (1 - p)
    belongs on the float32 gradients, not on the fp16 dS the tile products take."""
    backend, device = backend_device
    q, k, _ = _qkv(1, 1, 256, 512, 16, torch.float16, device)
    q, k = q * 0.01, k * 0.01  # scores ~1e-5: P = 1/2 to fp16's precision
    v = torch.full((1, 1, 512, 16), 0.5, dtype=torch.float16, device=device)
    upstream = torch.full((1, 1, 256, 16), 0.5, device=device)  # dO . v = 4 on every row
    fused, truth = _dropout_near_one(backend, device, q, k, v, upstream, partner=lambda j: (j + 1) % 512)
    for name, got, want in zip(("output", "grad query", "grad key", "grad value"), fused, truth):
        scale = float(want.abs().max())
        assert 0 < scale < 6e4, (name, scale)  # nonzero and within fp16's range
        assert torch.isfinite(got).all(), name
        err = float((got.double() - want).abs().max())
        assert err <= 2 * torch.finfo(torch.float16).eps * scale, (name, err, scale)


# The CPU backward has two schedules, chosen by heads against threads (csrc/cpu/attention.cpp,
# "Backward"): a single head takes the per-head sweep on one thread and the per-block passes on
# two, whatever the machine's core count.
CPU_SCHEDULES = pytest.mark.parametrize("threads", [1, 2], ids=["per-head", "per-block"])


def _with_threads(threads, fn):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(previous)


@CPU_SCHEDULES
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["none", "causal+padding", "bias"])
def test_cpu_backward_schedules(threads, dtype, kind):
    _with_threads(threads, lambda: _check(
        "cpu", "cpu", dtype, batch=1, heads=1, q_len=150, k_len=170, kind=kind, mask_grad=kind == "bias"
    ))


@CPU_SCHEDULES
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lengths", [(1, 16), (33, 70), (40, 300), (150, 170)], ids=lambda ls: "x".join(map(str, ls)))
@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["no-dropout", "dropout"])
def test_cpu_backward_one_visible_key_gives_exactly_zero_score_gradients(threads, dtype, lengths, dropout_p):
    # Each causal query sees one key (its own position): P is one-hot, and dS = P (dP - delta) is
    # zero in exact arithmetic, as the plain softmax backward computes it. The statistics pass and
    # the gradient passes must form the same S and dP tiles for it to be zero here too (a key tile
    # cut at the causal edge in one pass and whole in another is a GEMM of another shape), and the
    # same dropped dP (dropped in a fused multiply-subtract by one pass, the rounded product by the
    # other, kept rows were off zero by 1e-6 on the schedules of several threads).
    if dtype not in supported_dtypes("cpu", "cpu", OP):
        pytest.skip("the cpu backend is not available")
    q_len, k_len = lengths
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, n, 64, generator=gen).to(dtype).requires_grad_() for n in (q_len, k_len, k_len))
    rows = torch.arange(q_len)
    visible = torch.zeros(q_len, k_len, dtype=torch.bool)
    visible[rows, rows.clamp(max=k_len - 1)] = True
    bias = torch.zeros(q_len, k_len, dtype=dtype).masked_fill(~visible, float("-inf")).requires_grad_()

    def run():
        torch.manual_seed(5)
        out = fused_attn.scaled_dot_product_attention(q, k, v, bias, dropout_p=dropout_p, is_causal=True,
                                                      backend="cpu")
        out.backward(torch.randn(out.shape, generator=gen).to(dtype))

    _with_threads(threads, run)
    for name, grad in (("query", q.grad), ("key", k.grad), ("attn_mask", bias.grad)):
        assert torch.count_nonzero(grad) == 0, f"grad {name}: max {float(grad.abs().max()):.3g}, expected exact zeros"


@CPU_SCHEDULES
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_backward_schedules_dropout(threads, dtype):
    if dtype not in supported_dtypes("cpu", "cpu", OP):
        pytest.skip("the cpu backend is not available")
    q, k, v = _qkv(1, 1, 150, 170, 32, dtype, "cpu")
    torch.manual_seed(99)
    _, keep = attention_with_keep_mask(q, k, v, dropout_p=0.3, is_causal=True)

    def fused(query, key, value):
        torch.manual_seed(99)
        return fused_attn.scaled_dot_product_attention(query, key, value, dropout_p=0.3, is_causal=True, backend="cpu")

    def plain(query, key, value):
        return reference.scaled_dot_product_attention(query, key, value, dropout_p=0.3, is_causal=True, dropout_mask=keep)

    _with_threads(threads, lambda: assert_parity(fused, plain, {"query": q, "key": k, "value": v},
                                                 grad_args=("query", "key", "value")))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_backward_memory_does_not_grow_with_heads(dtype):
    # The CPU backward's memory beyond the gradients it returns is its threads' scratch and a few
    # floats per query row: with more heads than threads (one task per head) it holds no copy of
    # K or V, also where bfloat16's products run on the tile unit (K and V packed per head, in
    # the task's scratch). Doubling the heads adds at most the per-row statistics (8 bytes a row
    # against K's 128 here), nowhere near a copy of the added K.
    if dtype not in supported_dtypes("cpu", "cpu", OP):
        pytest.skip("the cpu backend is not available")
    from fused_attn.bench.harness import peak_memory

    def extra(heads):
        gen = torch.Generator().manual_seed(3)
        q, k, v = (torch.randn(1, heads, 512, 64, generator=gen).to(dtype).requires_grad_() for _ in range(3))
        out = fused_attn.scaled_dot_product_attention(q, k, v, backend="cpu")
        grad = torch.randn(out.shape, generator=gen).to(dtype)
        peak = peak_memory(lambda: torch.autograd.grad(out, (q, k, v), grad), torch.device("cpu"))
        return peak - 3 * q.numel() * q.element_size()

    small, large = _with_threads(2, lambda: (extra(24), extra(48)))
    added_k = 24 * 512 * 64 * torch.empty((), dtype=dtype).element_size()
    assert large - small < added_k / 4, (
        f"backward beyond its gradients: {small} bytes at 24 heads, {large} at 48 (K of 24 heads: {added_k})"
    )


@pytest.mark.parametrize("length", [256, 1024], ids=["one-block", "four-blocks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_forward_memory_does_not_grow_with_heads(dtype, length):
    # With more heads than threads, where bfloat16's products run on the tile unit, no packed
    # copy of the whole of K and V exists: with each head's queries one block (256), each task
    # packs K and V a tile at a time; with several blocks (1024), a task per head packs its head
    # once into its scratch and walks its blocks (float32 widens blocks in its scratch). Doubling
    # the heads adds the output (subtracted) and the row log-sum-exp (4 bytes a row against K's
    # 128), nowhere near a copy of the added K.
    if dtype not in supported_dtypes("cpu", "cpu", OP):
        pytest.skip("the cpu backend is not available")
    from fused_attn.bench.harness import peak_memory

    def extra(heads):
        gen = torch.Generator().manual_seed(3)
        q, k, v = (torch.randn(1, heads, length, 64, generator=gen).to(dtype) for _ in range(3))
        peak = peak_memory(lambda: fused_attn.scaled_dot_product_attention(q, k, v, backend="cpu"),
                           torch.device("cpu"))
        return peak - q.numel() * q.element_size()

    small, large = _with_threads(2, lambda: (extra(24), extra(48)))
    added_k = 24 * length * 64 * torch.empty((), dtype=dtype).element_size()
    assert large - small < added_k / 4, (
        f"forward beyond its output: {small} bytes at 24 heads, {large} at 48 (K of 24 heads: {added_k})"
    )


# Boolean masks that hide whole key tiles from whole query blocks, which the cpu kernels do not
# form (csrc/cpu/attention.cpp, KeySpans): 3 sequences x 150 queries x 300 keys (two forward key
# tiles of 256, three backward ones of 128; query blocks of 64 to 256).
def _key_range_mask(kind: str) -> torch.Tensor:
    keys = torch.arange(300)
    if kind == "padding":  # all keys; a short prefix; left padding (the first 200 keys hidden)
        return torch.stack([keys < 300, keys < 37, keys >= 200]).view(3, 1, 1, 300)
    if kind == "window":  # query i sees the keys within 30 of 2 i: a band, per query
        band = (keys[None, :] - 2 * torch.arange(150)[:, None]).abs() <= 30
        return band.view(1, 1, 150, 300).expand(3, 1, 150, 300)
    if kind == "empty-rows":  # padding, and queries 64..149 of the second sequence see no key at all
        keep = _key_range_mask("padding").expand(3, 1, 150, 300).clone()
        keep[1, :, 64:] = False
        return keep
    raise ValueError(kind)


# One thread takes the per-head backward, eight the per-block passes (3 heads in all).
KEY_RANGE_SCHEDULES = pytest.mark.parametrize("threads", [1, 8], ids=["per-head", "per-block"])


@KEY_RANGE_SCHEDULES
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind, causal", [("padding", False), ("padding", True), ("window", False),
                                          ("empty-rows", False), ("empty-rows", True)])
def test_cpu_masked_key_ranges(threads, dtype, kind, causal):
    if dtype not in supported_dtypes("cpu", "cpu", OP):
        pytest.skip("the cpu backend is not available")
    q = torch.randn(3, 1, 150, 32, generator=torch.Generator().manual_seed(3)).to(dtype)
    k, v = _qkv(3, 1, 300, 300, 32, dtype, "cpu")[1:]
    args = {"query": q, "key": k, "value": v, "attn_mask": _key_range_mask(kind)}
    _with_threads(threads, lambda: assert_parity(
        lambda **a: fused_attn.scaled_dot_product_attention(**a, is_causal=causal, backend="cpu"),
        lambda **a: reference.scaled_dot_product_attention(**a, is_causal=causal),
        args, grad_args=("query", "key", "value")))


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kv_heads", [2, 1], ids=["mha", "grouped"])
def test_padding_masks_that_hide_whole_key_tiles(backend_device, dtype, causal, kv_heads):
    """Key padding masks (the same for every query) that hide whole key tiles, which every kernel
    leaves out of every pass (cpu KeySpans, triton _key_range, cuda key_span_kernel): left and
    right padding, a sequence that sees no key, grouped key/value heads."""
    backend, device = backend_device
    if dtype not in supported_dtypes(backend, device, OP):
        pytest.skip(f"{dtype} is not tested on {backend}-{device}")
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(4, 2, 70, 16, generator=gen).to(device=device, dtype=dtype)
    k, v = (torch.randn(4, kv_heads, 300, 16, generator=gen).to(device=device, dtype=dtype) for _ in range(2))
    keys = torch.arange(300)
    mask = torch.stack([keys < 300, keys < 37, keys >= 200, keys < 0]).view(4, 1, 1, 300).to(device)
    assert_parity(
        lambda **a: fused_attn.scaled_dot_product_attention(**a, is_causal=causal, enable_gqa=True, backend=backend),
        lambda **a: reference.scaled_dot_product_attention(
            a["query"], repeat_kv_heads(a["key"], 2), repeat_kv_heads(a["value"], 2), a["attn_mask"], is_causal=causal),
        {"query": q, "key": k, "value": v, "attn_mask": mask}, grad_args=("query", "key", "value"))


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_padding_mask_ranges_past_the_first_thousand_keys(backend_device):
    """The triton kernels scan a padding mask 1024 keys at a time for the range they walk: ranges
    that start, end or lie past the first 1024 keys, causal too."""
    backend, device = backend_device
    dtype = work_dtype(OP, backend, device)
    q, k, v = _qkv(3, 1, 9, 1500, 16, dtype, device)
    keys = torch.arange(1500)
    mask = torch.stack([(keys >= 1100) & (keys < 1300), keys < 1030, keys >= 1023]).view(3, 1, 1, 1500).to(device)
    for causal in (False, True):
        assert_parity(
            lambda **a: fused_attn.scaled_dot_product_attention(**a, is_causal=causal, backend=backend),
            lambda **a: reference.scaled_dot_product_attention(**a, is_causal=causal),
            {"query": q, "key": k, "value": v, "attn_mask": mask}, grad_args=("query", "key", "value"))


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_key_tiles_hidden_from_a_whole_sequence_are_not_read(backend_device):
    """The kernels do not read the key tiles a padding mask hides from every query of a sequence
    (tiles of up to 128 keys): a NaN in their keys or values reaches neither the output nor a
    gradient, where a kernel that multiplies it by a zero probability spreads it."""
    backend, device = backend_device
    q, k, v = _qkv(3, 2, 70, 300, 16, work_dtype(OP, backend, device), device)
    keys = torch.arange(300)
    mask = torch.stack([keys < 300, keys < 37, keys >= 200]).view(3, 1, 1, 300).to(device)
    k[1, :, 260], v[1, :, 256:], k[2, :, 3], v[2, :, :64] = (float("nan"),) * 4
    results = []
    for inputs in ((q, k, v), (q, k.nan_to_num(0.0), v.nan_to_num(0.0))):
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = fused_attn.scaled_dot_product_attention(*leaves, mask, backend=backend)
        out.backward(torch.ones_like(out))
        results.append([out] + [t.grad for t in leaves])
    for name, got, want in zip(("output", "grad query", "grad key", "grad value"), *results):
        assert not torch.isnan(got).any(), name
        assert torch.equal(got, want), name


@KEY_RANGE_SCHEDULES
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_masked_key_ranges_dropout(threads, dtype):
    """The dropout draw of an element is its own wherever the walk of the keys starts (in bfloat16
    on a CPU with AMX, a walk that starts before its first visible key, on a chunk boundary)."""
    if dtype not in supported_dtypes("cpu", "cpu", OP):
        pytest.skip("the cpu backend is not available")
    q, k, v = _qkv(3, 1, 150, 300, 16, dtype, "cpu")
    mask = _key_range_mask("padding")
    torch.manual_seed(7)
    _, keep = attention_with_keep_mask(q, k, v, mask, dropout_p=0.3)

    def fused(query, key, value):
        torch.manual_seed(7)
        return fused_attn.scaled_dot_product_attention(query, key, value, mask, dropout_p=0.3, backend="cpu")

    def plain(query, key, value):
        return reference.scaled_dot_product_attention(query, key, value, mask, dropout_p=0.3, dropout_mask=keep)

    _with_threads(threads, lambda: assert_parity(fused, plain, {"query": q, "key": k, "value": v},
                                                 grad_args=("query", "key", "value")))


@KEY_RANGE_SCHEDULES
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_cpu_keys_hidden_from_a_whole_sequence_are_not_read(threads, dtype, causal):
    """Keys a padding mask hides from every query of a sequence are never read, nor those past the
    causal diagonal: a NaN among their values or keys reaches neither the output nor a gradient,
    where a kernel that multiplies it by a zero probability would spread it. Some share a chunk of
    64 keys with seen ones (bfloat16 packs keys by the chunk where the CPU multiplies it
    natively): left padding up to key 200, causal ends at 150."""
    if dtype not in supported_dtypes("cpu", "cpu", OP):
        pytest.skip("the cpu backend is not available")
    q, k, v = _qkv(3, 1, 150, 300, 16, dtype, "cpu")
    k[1, :, 250], v[1, :, 40:], v[2, :, 7], v[2, :, 195] = (float("nan"),) * 4
    if causal:  # the first sequence sees every key but the queries end at 150
        v[0, :, 160], k[0, :, 170] = float("nan"), float("nan")
    mask = _key_range_mask("padding")
    args = {"query": q, "key": k, "value": v}
    clean = {name: t.nan_to_num(0.0) for name, t in args.items()}
    results = []
    for inputs in (args, clean):
        leaves = {name: t.clone().requires_grad_() for name, t in inputs.items()}
        out = _with_threads(threads, lambda: fused_attn.scaled_dot_product_attention(
            **leaves, attn_mask=mask, is_causal=causal, backend="cpu"))
        out.backward(torch.ones_like(out))
        results.append([out] + [leaves[name].grad for name in ("query", "key", "value")])
    for name, got, want in zip(("output", "grad query", "grad key", "grad value"), *results):
        hidden = {"grad key": (1, 250), "grad value": (1, slice(40, None))}.get(name)
        if hidden is not None:  # a hidden key's own gradient is 0 either way
            assert torch.count_nonzero(got[hidden[0], :, hidden[1]]) == 0, name
        assert torch.equal(got.nan_to_num(0.0), want), name
        assert not torch.isnan(got).any(), name


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_dropout_same_seed_same_result_other_seed_differs(backend_device):
    backend, device = backend_device
    q, k, v = _dropout_inputs(backend, device)

    def run(seed):
        torch.manual_seed(seed)
        return fused_attn.scaled_dot_product_attention(q, k, v, dropout_p=0.2, backend=backend)

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_no_dropout_is_deterministic(backend_device):
    backend, device = backend_device
    q, k, v = _dropout_inputs(backend, device)
    q.requires_grad_(True)
    a = fused_attn.scaled_dot_product_attention(q, k, v, is_causal=True, backend=backend)
    (ga,) = torch.autograd.grad(a.sum(), q)
    b = fused_attn.scaled_dot_product_attention(q, k, v, is_causal=True, backend=backend)
    (gb,) = torch.autograd.grad(b.sum(), q)
    assert torch.equal(a, b) and torch.equal(ga, gb)


# ---------------------------------------------------------------------------------------------
# Bad input


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


@pytest.mark.parametrize(
    "make_args, kwargs, error, fragment",
    [
        (lambda: (_t(2, 8, 16), _t(2, 8, 16), _t(2, 8, 16)), {}, ValueError, "query must be 4-D [batch, heads, seq, head_dim]"),
        (lambda: (_t(1, 2, 8, 16), _t(1, 2, 8, 16, 1), _t(1, 2, 8, 16)), {}, ValueError, "key must be 4-D"),
        (lambda: (_t(1, 2, 8, 16), _t(2, 2, 8, 16), _t(2, 2, 8, 16)), {}, ValueError, "key batch and heads [2, 2] do not match query's [1, 2]"),
        (lambda: (_t(1, 4, 8, 16), _t(1, 2, 8, 16), _t(1, 2, 8, 16)), {}, ValueError,
         "key batch and heads [1, 2] do not match query's [1, 4] (grouped-query attention needs enable_gqa=True)"),
        (lambda: (_t(1, 4, 8, 16), _t(1, 3, 8, 16), _t(1, 3, 8, 16)), {"enable_gqa": True}, ValueError,
         "key batch and heads [1, 3] do not match query's [1, 4] (with enable_gqa=True, query heads must be a multiple"),
        (lambda: (_t(1, 4, 8, 16), _t(1, 2, 8, 16), _t(1, 3, 8, 16)), {"enable_gqa": True}, ValueError,
         "value batch and heads [1, 3] do not match query's [1, 4]"),
        (lambda: (_t(1, 4, 8, 16), _t(1, 0, 8, 16), _t(1, 0, 8, 16)), {"enable_gqa": True}, ValueError,
         "key batch and heads [1, 0] do not match query's [1, 4]"),
        (lambda: (_t(1, 2, 8, 16), _t(1, 2, 8, 16), _t(1, 2, 8, 16)), {"enable_gqa": 1}, TypeError,
         "enable_gqa must be a Python bool, got 1 (builtins.int)"),
        (lambda: (_t(1, 2, 8, 16), _t(1, 3, 8, 16), _t(1, 3, 8, 16)), {}, ValueError, "key batch and heads"),
        (lambda: (_t(1, 2, 8, 16), _t(1, 2, 8, 32), _t(1, 2, 8, 16)), {}, ValueError, "key head_dim 32 does not match query head_dim 16"),
        (lambda: (_t(1, 2, 8, 16), _t(1, 2, 8, 16), _t(1, 2, 9, 16)), {}, ValueError, "value length 9 does not match key length 8"),
        (lambda: (_t(1, 2, 8, 16), _t(1, 2, 8, 16, dtype=torch.float16), _t(1, 2, 8, 16)), {}, TypeError, "key dtype float16 does not match query dtype float32"),
        (lambda: (_t(1, 2, 8, 16), _t(1, 2, 8, 16), _t(1, 2, 8, 16), torch.ones(1, 3, 8, 8, dtype=torch.bool)), {}, ValueError, "attn_mask of shape [1, 3, 8, 8] does not broadcast to [batch, heads, q_len, k_len] = [1, 2, 8, 8]"),
        (lambda: (_t(1, 2, 8, 16), _t(1, 2, 8, 16), _t(1, 2, 8, 16), torch.ones(8, 7, dtype=torch.bool)), {}, ValueError, "does not broadcast"),
        (lambda: (_t(1, 2, 8, 16), _t(1, 2, 8, 16), _t(1, 2, 8, 16), torch.ones(1, 1, 8, 8, dtype=torch.int32)), {}, TypeError, "attn_mask must be a bool or floating tensor (float16, bfloat16, float32 or float64), got int32"),
        (lambda: (_t(1, 2, 8, 16), _t(1, 2, 8, 16), _t(1, 2, 8, 16)), {"dropout_p": 1.5}, ValueError, "dropout_p must be a number in [0, 1]"),
        (lambda: (_t(1, 2, 8, 16), _t(1, 2, 8, 16), _t(1, 2, 8, 16)), {"dropout_p": -0.1}, ValueError, "dropout_p"),
        (lambda: (_t(1, 2, 8, 16), _t(1, 2, 8, 16), _t(1, 2, 8, 16)), {"scale": float("nan")}, ValueError, "scale must be a finite number"),
        (lambda: (_t(1, 2, 8, 16), _t(1, 2, 8, 16), _t(1, 2, 8, 16)), {"is_causal": 1}, TypeError, "is_causal must be a Python bool"),
        (lambda: ("q", _t(1, 2, 8, 16), _t(1, 2, 8, 16)), {}, TypeError, "query must be a torch.Tensor"),
    ],
)
def test_bad_input(make_args, kwargs, error, fragment):
    with pytest.raises(error) as info:
        fused_attn.scaled_dot_product_attention(*make_args(), **kwargs)
    assert fragment in str(info.value)


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_unsupported_head_dim_is_rejected_with_reason(backend_device):
    backend, device = backend_device
    q = torch.randn(1, 1, 4, 320, device=device, dtype=work_dtype(OP, backend, device))
    with pytest.raises(BackendNotSupportedError, match="head_dim=320 exceeds the maximum 256"):
        fused_attn.scaled_dot_product_attention(q, q, q, backend=backend)


@pytest.mark.parametrize("backend_device", backend_params(OP))
@pytest.mark.parametrize("shape", [(0, 2, 8, 16), (1, 0, 8, 16), (1, 2, 0, 16)])
def test_empty_inputs(backend_device, shape):
    backend, device = backend_device
    q = torch.randn(*shape, device=device, dtype=work_dtype(OP, backend, device), requires_grad=True)
    out = fused_attn.scaled_dot_product_attention(q, q, q, backend=backend)
    assert out.shape == shape
    out.sum().backward()
    assert q.grad.shape == shape


@pytest.mark.parametrize("backend_device", backend_params(OP))
def test_zero_length_keys_give_zero(backend_device):
    backend, device = backend_device
    q = torch.randn(1, 2, 5, 16, device=device, dtype=work_dtype(OP, backend, device))
    kv = torch.randn(1, 2, 0, 16, device=device, dtype=q.dtype)
    out = fused_attn.scaled_dot_product_attention(q, kv, kv, backend=backend)
    assert out.shape == (1, 2, 5, 16) and (out == 0).all()


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_key_constant_bias_gradient_is_zero_and_views_keep_theirs(backend_device):
    """A bias of key size 1 gets its exact zero gradient; a view the user expanded along the keys
    is an Lk-wide mask and gets its per-element gradient (the leaf's sum of it is ~0)."""
    backend, device = backend_device
    dtype = work_dtype(OP, backend, device)
    q, k, v = _qkv(2, 3, 17, 9, 16, dtype, device)
    bias = torch.randn(2, 1, 17, 1, device=device, dtype=dtype, requires_grad=True)
    out = fused_attn.scaled_dot_product_attention(q, k, v, bias, backend=backend)
    (grad,) = torch.autograd.grad(out.float().square().sum(), bias)
    assert torch.equal(grad, torch.zeros_like(bias))
    wide = bias.expand(2, 3, 17, 9)
    out = fused_attn.scaled_dot_product_attention(q, k, v, wide, backend=backend)
    (grad,) = torch.autograd.grad(out.float().square().sum(), wide)

    def plain_grad(t):  # torch's SDPA in the dtype of t, through the same expanded view
        leaf = bias.detach().to(t).requires_grad_(True)
        view = leaf.expand(2, 3, 17, 9)
        out = F.scaled_dot_product_attention(q.to(t), k.to(t), v.to(t), view)
        return torch.autograd.grad(out.to(torch.promote_types(t, torch.float32)).square().sum(), view)[0]

    truth = plain_grad(torch.float64)
    assert truth.abs().max() > 0.01
    check_tensor_parity("grad of the expanded bias", grad, plain_grad(dtype), truth, factor=3.0,
                        problem_scale=float(truth.abs().max()))
