"""Parity on seeded random configurations: combinations of shapes, masks, layouts, dtypes and
options that the per-feature grids of the op test files do not cross (a grouped-query cross
attention with a per-head bias on transposed inputs, a softmax over a middle dim of a strided
view under a broadcast mask, ...). Each case is drawn from its own seed, so a failure names the
case that reproduces it, and every backend of the op meets the same cases."""

from __future__ import annotations

import math
import random

import pytest
import torch

import fused_attn
from fused_attn import reference
from fused_attn.ops.attention import attention_with_keep_mask, repeat_kv_heads
from fused_attn.ops.ffn import linear_activation

from .conftest import assert_parity, backend_params, supported_dtypes

CASES = 12
# Problems judged together per case (assert_parity's draws): a case of one row or one feature is a
# handful of sums, whose plain error on one draw can be a lucky one far below its usual level.
DRAWS = 3
# Attention cases with dropout per backend (the interpreter's attention is the costly part).
DROPOUT_CASES = 6
# Slices (rows) at most in a softmax case.
MAX_ROWS = 512


def _layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """``t``'s values in another memory layout, differentiably: its own, the last two dims
    stored transposed, rows padded (a row stride past the row's end), or the last dim strided."""
    if kind == "contiguous":
        return t
    if kind == "transposed":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "padded_rows":
        return torch.cat([t, torch.zeros_like(t[..., :3])], dim=-1)[..., : t.shape[-1]]
    if kind == "strided":
        return torch.stack([t, torch.zeros_like(t)], dim=-1)[..., 0]
    raise ValueError(kind)


LAYOUTS = ("contiguous", "transposed", "padded_rows", "strided")


def _parity(context: str, fused, plain, args: dict, grads: tuple[str, ...]) -> None:
    """assert_parity over the case and DRAWS - 1 perturbed copies of it, its failure prefixed with the
    case (seed and configuration)."""
    try:
        assert_parity(fused, plain, args, grad_args=grads, draws=DRAWS)
    except AssertionError as exc:
        raise AssertionError(f"{context}: {exc}") from None


def _dtype(rng: random.Random, backend: str, device: str, op: str) -> torch.dtype:
    return rng.choice(supported_dtypes(backend, device, op))


def _attention_case(seed: int, backend: str, device: str) -> tuple[dict, dict]:
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    batch, kv_heads, group = rng.randint(1, 3), rng.randint(1, 3), rng.choice((1, 1, 2, 3))
    heads = kv_heads * group
    length = lambda: 1 if rng.random() < 0.15 else rng.randint(2, 70)  # noqa: E731
    q_len = length()
    k_len = q_len if rng.random() < 0.4 else length()
    head_dim = rng.choice((8, 16, 24, 40, 64, 72))
    head_dim_v = head_dim if rng.random() < 0.7 else rng.choice((8, 32, 48))
    dtype = _dtype(rng, backend, device, "scaled_dot_product_attention")
    mask_kind = rng.choice(("none", "key_padding", "bool_4d", "bool_2d", "bias", "head_bias", "learned_bias"))
    mask = None
    if mask_kind == "key_padding":
        lengths = torch.randint(1, k_len + 1, (batch,), generator=gen)
        mask = (torch.arange(k_len)[None, :] < lengths[:, None]).view(batch, 1, 1, k_len)
    elif mask_kind == "bool_4d":
        mask = torch.rand(batch, heads, q_len, k_len, generator=gen) > 0.4  # some rows fully masked
    elif mask_kind == "bool_2d":
        mask = torch.rand(q_len, k_len, generator=gen) > 0.2
    elif mask_kind in ("bias", "learned_bias"):
        mask = torch.randn(batch, 1, q_len, k_len, generator=gen) * 2
    elif mask_kind == "head_bias":
        mask = torch.randn(1, heads, 1, k_len, generator=gen)
    config = {
        "shape": (batch, heads, kv_heads, q_len, k_len, head_dim, head_dim_v),
        "dtype": dtype,
        "mask": mask_kind,
        "is_causal": rng.random() < 0.35,
        "scale": None if rng.random() < 0.5 else rng.uniform(0.05, 1.0),
        "layouts": tuple(rng.choice(LAYOUTS) for _ in range(3)),
        "enable_gqa": group > 1,
    }
    make = lambda h, length, d: torch.randn(batch, h, length, d, generator=gen).to(device=device, dtype=dtype)  # noqa: E731
    args = {"query": make(heads, q_len, head_dim), "key": make(kv_heads, k_len, head_dim),
            "value": make(kv_heads, k_len, head_dim_v)}
    if mask is not None:
        args["attn_mask"] = mask.to(device=device, dtype=mask.dtype if mask.dtype == torch.bool else dtype)
    return config, args


@pytest.mark.parametrize("case", range(CASES))
@pytest.mark.parametrize("backend_device", backend_params("scaled_dot_product_attention", exclude=("reference",)))
def test_attention_random_configs(backend_device, case):
    backend, device = backend_device
    config, args = _attention_case(1000 + case, backend, device)
    _check_attention_case(f"seed {1000 + case}: {config}", config, args, backend)


def _attention_dropout_case(seed: int, backend: str, device: str) -> tuple[dict, dict, float, torch.Tensor]:
    """_attention_case(seed) with a dropout_p, and the keep-mask [B, H, Lq, Lk] the op draws after
    ``torch.manual_seed(seed)`` (every backend draws the same one from the op's seed; the Triton
    forward returns it, here in float32: the mask depends on the seed and the positions alone)."""
    config, args = _attention_case(seed, backend, device)
    dropout_p = random.Random(-seed).choice((0.1, 0.3, 0.6))
    heads = config["shape"][1]
    query, key, value = args["query"], repeat_kv_heads(args["key"], heads), repeat_kv_heads(args["value"], heads)
    mask = args.get("attn_mask")
    mask = mask.float() if mask is not None and mask.is_floating_point() else mask
    torch.manual_seed(seed)
    with torch.no_grad():
        _, keep = attention_with_keep_mask(query.float(), key.float(), value.float(), mask, dropout_p,
                                           config["is_causal"], config["scale"])
    return config, args, dropout_p, keep


@pytest.mark.parametrize("case", range(DROPOUT_CASES))
@pytest.mark.parametrize("backend_device", backend_params("scaled_dot_product_attention", exclude=("reference",)))
def test_attention_dropout_random_configs(backend_device, case):
    """The seeded attention cases with dropout: output and gradients those of the reference fed the
    keep-mask the kernels draw."""
    backend, device = backend_device
    seed = 5000 + case
    config, args, dropout_p, keep = _attention_dropout_case(seed, backend, device)
    _check_attention_case(f"seed {seed}, dropout_p {dropout_p}: {config}", config, args, backend, dropout_p, keep,
                          seed)


def _check_attention_case(context: str, config: dict, args: dict, backend: str, dropout_p: float = 0.0,
                          keep: torch.Tensor | None = None, seed: int = 0) -> None:
    """The case's parity on ``backend``; with dropout, the op's seed drawn after ``torch.manual_seed(seed)``
    and the reference fed ``keep``."""
    heads = config["shape"][1]
    options = {"dropout_p": dropout_p, "is_causal": config["is_causal"], "scale": config["scale"]}

    def fused(query, key, value, attn_mask=None):
        q, k, v = (_layout(t, kind) for t, kind in zip((query, key, value), config["layouts"]))
        if dropout_p:
            torch.manual_seed(seed)
        return fused_attn.scaled_dot_product_attention(
            q, k, v, attn_mask, **options, enable_gqa=config["enable_gqa"], backend=backend
        )

    def plain(query, key, value, attn_mask=None):
        key, value = repeat_kv_heads(key, heads), repeat_kv_heads(value, heads)
        return reference.scaled_dot_product_attention(query, key, value, attn_mask, **options, dropout_mask=keep)

    grads = ("query", "key", "value") + (("attn_mask",) if config["mask"] == "learned_bias" else ())
    _parity(context, fused, plain, args, grads)


def _broadcast_shape(rng: random.Random, shape: tuple[int, ...]) -> tuple[int, ...]:
    """A shape that broadcasts to ``shape``: some leading dims dropped, some sizes set to 1."""
    kept = shape[rng.randint(0, len(shape) - 1):]
    return tuple(1 if rng.random() < 0.4 else n for n in kept)


def _softmax_case(seed: int, backend: str, device: str) -> tuple[str, dict, tuple[str, ...], dict]:
    """A seeded softmax case: (its description, the arguments, those differentiated, the options
    dim, scale, is_causal and layout)."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    rank = rng.randint(1, 5)
    sizes = [rng.choice((1, rng.randint(2, 9), rng.randint(10, 300))) for _ in range(rank)]
    dim = rng.randrange(-rank, rank)
    while math.prod(sizes) // sizes[dim] > MAX_ROWS:  # the interpreter runs a program per slice
        widest = max((i for i in range(rank) if i != dim % rank), key=lambda i: sizes[i])
        sizes[widest] //= 2
    shape = tuple(sizes)
    is_causal = rank >= 2 and dim % rank == rank - 1 and rng.random() < 0.4
    dtype = _dtype(rng, backend, device, "softmax")
    mask_kind = rng.choice(("none", "bool", "float", "learned"))
    layout = rng.choice(LAYOUTS) if rank >= 2 else rng.choice(("contiguous", "strided"))
    scale = rng.choice((1.0, rng.uniform(0.1, 3.0)))
    args = {"input": (torch.randn(shape, generator=gen) * 3).to(device=device, dtype=dtype)}
    if mask_kind != "none":
        mask_shape = _broadcast_shape(rng, shape)
        mask = (torch.rand(mask_shape, generator=gen) > 0.3 if mask_kind == "bool"
                else torch.randn(mask_shape, generator=gen))
        args["mask"] = mask.to(device=device, dtype=torch.bool if mask_kind == "bool" else dtype)
    grads = ("input",) + (("mask",) if mask_kind == "learned" else ())
    context = f"seed {seed}: shape {shape}, dim {dim}, causal {is_causal}, {dtype}, mask {mask_kind} " \
              f"{list(args['mask'].shape) if 'mask' in args else ''}, layout {layout}, scale {scale}"
    return context, args, grads, {"dim": dim, "scale": scale, "is_causal": is_causal, "layout": layout}


@pytest.mark.parametrize("case", range(CASES))
@pytest.mark.parametrize("backend_device", backend_params("softmax", exclude=("reference",)))
def test_softmax_random_configs(backend_device, case):
    backend, device = backend_device
    context, args, grads, options = _softmax_case(2000 + case, backend, device)
    dim, scale, is_causal = options["dim"], options["scale"], options["is_causal"]

    def fused(input, mask=None):
        return fused_attn.softmax(_layout(input, options["layout"]), dim, mask, scale, is_causal, backend=backend)

    def plain(input, mask=None):
        return reference.softmax(input, dim, mask, scale, is_causal)

    _parity(context, fused, plain, args, grads)


@pytest.mark.parametrize("case", range(CASES))
@pytest.mark.parametrize("backend_device", backend_params("layer_norm", exclude=("reference",)))
def test_layer_norm_random_configs(backend_device, case):
    _check_norm_case("layer_norm", *backend_device, 3000 + case)


@pytest.mark.parametrize("case", range(CASES))
@pytest.mark.parametrize("backend_device", backend_params("add_layer_norm", exclude=("reference",)))
def test_add_layer_norm_random_configs(backend_device, case):
    _check_norm_case("add_layer_norm", *backend_device, 3000 + case)


def _norm_case(op: str, backend: str, device: str, seed: int) -> tuple[str, dict, dict]:
    """A seeded layer_norm or add_layer_norm case: (its description, the arguments, all of them
    differentiated, the options normalized_shape, eps, layout and, for add_layer_norm, prenorm: whether
    the pre-norm sum is returned too)."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    norm_dims = rng.choice((1, 1, 1, 2))
    norm_shape = tuple(rng.choice((1, rng.randint(2, 64), rng.randint(65, 700))) for _ in range(norm_dims))
    if norm_dims == 2:
        norm_shape = tuple(min(n, 40) for n in norm_shape)
    leading = tuple(rng.randint(1, 7) for _ in range(rng.randint(0 if op == "layer_norm" else 1, 3)))
    shape = leading + norm_shape
    dtype = _dtype(rng, backend, device, op)
    param_dtype = torch.float32 if dtype != torch.float32 and rng.random() < 0.5 else dtype
    eps = rng.choice((1e-5, 1e-12, 1e-3))
    affine = rng.choice(("both", "weight", "none")) if op == "layer_norm" else "both"
    layout = rng.choice(LAYOUTS) if len(shape) >= 2 else "contiguous"
    context = f"{op} {backend}-{device} seed {seed}: shape {shape}, normalized {norm_shape}, {dtype}, " \
              f"params {param_dtype}, eps {eps}, affine {affine}, layout {layout}"
    make = lambda s, d, scale=1.0: (torch.randn(s, generator=gen) * scale).to(device=device, dtype=d)  # noqa: E731
    args = {"input": make(shape, dtype, 2.0)}
    if affine in ("both", "weight"):
        args["weight"] = make(norm_shape, param_dtype) * 0.5 + 1
    if affine == "both":
        args["bias"] = make(norm_shape, param_dtype)
    options = {"normalized_shape": norm_shape, "eps": eps, "layout": layout}
    if op == "add_layer_norm":
        hidden = math.prod(norm_shape)
        if len(norm_shape) > 1:  # add_layer_norm normalises the last dim
            shape = shape[:-len(norm_shape)] + (hidden,)
            args = {k: v.reshape(shape if k == "input" else (hidden,)) for k, v in args.items()}
        args["residual"] = make(shape, dtype)
        with_bias = rng.random() < 0.5
        if with_bias:
            args["input_bias"] = make((hidden,), dtype)
        options["prenorm"] = rng.random() < 0.5
        context += f", input_bias {with_bias}, return_prenorm {options['prenorm']}"
    return context, args, options


def _add_layer_norm_result(out: torch.Tensor | tuple[torch.Tensor, torch.Tensor], prenorm: bool) -> torch.Tensor:
    """add_layer_norm's result as one tensor: with the pre-norm sum, both flattened and joined."""
    return torch.cat([out[0].flatten(), out[1].flatten()]) if prenorm else out


def _check_norm_case(op: str, backend: str, device: str, seed: int) -> None:
    context, args, options = _norm_case(op, backend, device, seed)
    norm_shape, eps, layout = options["normalized_shape"], options["eps"], options["layout"]
    if op == "layer_norm":
        def fused(input, weight=None, bias=None):
            return fused_attn.layer_norm(_layout(input, layout), norm_shape, weight, bias, eps, backend=backend)

        def plain(input, weight=None, bias=None):
            return reference.layer_norm(input, norm_shape, weight, bias, eps)
    else:
        prenorm = options["prenorm"]

        def fused(input, residual, weight, bias, input_bias=None):
            out = fused_attn.add_layer_norm(_layout(input, layout), residual, weight, bias, eps,
                                            input_bias=input_bias, return_prenorm=prenorm, backend=backend)
            return _add_layer_norm_result(out, prenorm)

        def plain(input, residual, weight, bias, input_bias=None):
            out = reference.add_layer_norm(input, residual, weight, bias, eps, input_bias=input_bias,
                                           return_prenorm=prenorm)
            return _add_layer_norm_result(out, prenorm)
    _parity(context, fused, plain, args, tuple(args))


@pytest.mark.parametrize("case", range(CASES))
@pytest.mark.parametrize("backend_device", backend_params("linear_gelu", exclude=("reference",)))
def test_linear_gelu_random_configs(backend_device, case):
    _check_ffn_case("linear_gelu", *backend_device, 4000 + case)


@pytest.mark.parametrize("case", range(CASES))
@pytest.mark.parametrize("backend_device", backend_params("ffn", exclude=("reference",)))
def test_ffn_random_configs(backend_device, case):
    _check_ffn_case("ffn", *backend_device, 4000 + case)


def _ffn_case(op: str, backend: str, device: str, seed: int) -> tuple[str, dict, dict]:
    """A seeded linear_gelu or ffn case: (its description, the arguments, all of them differentiated,
    the options approximate, the kernels' activation code: "relu" or a GELU's, and layout)."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    leading = tuple(rng.choice((1, rng.randint(2, 40))) for _ in range(rng.randint(1, 3)))
    in_features, hidden, out_features = (rng.choice((1, rng.randint(2, 24), rng.randint(25, 130))) for _ in range(3))
    dtype = _dtype(rng, backend, device, op)
    approximate = rng.choice(("none", "tanh", "relu"))
    layout = rng.choice(LAYOUTS)
    biases = rng.random() < 0.7
    context = f"{op} {backend}-{device} seed {seed}: input {leading + (in_features,)}, hidden {hidden}, " \
              f"out {out_features}, {dtype}, {approximate}, layout {layout}, biases {biases}"
    make = lambda *s: (torch.randn(s, generator=gen) / math.sqrt(s[-1])).to(device=device, dtype=dtype)  # noqa: E731
    args = {"input": make(*leading, in_features) * math.sqrt(in_features), "w1": make(hidden, in_features)}
    if biases:
        args["b1"] = make(hidden)
    if op == "ffn":
        args["w2"] = make(out_features, hidden)
        if biases:
            args["b2"] = make(out_features)
    return context, args, {"approximate": approximate, "layout": layout}


def _check_ffn_case(op: str, backend: str, device: str, seed: int) -> None:
    context, args, options = _ffn_case(op, backend, device, seed)
    approximate, layout = options["approximate"], options["layout"]
    activation = {"activation": "relu"} if approximate == "relu" else {"approximate": approximate}
    if op == "linear_gelu":
        def fused(input, w1, b1=None):
            return linear_activation(_layout(input, layout), w1, b1, approximate, backend=backend)

        def plain(input, w1, b1=None):
            return reference.linear_activation(input, w1, b1, approximate)
    else:
        def fused(input, w1, w2, b1=None, b2=None):
            return fused_attn.ffn(_layout(input, layout), w1, b1, w2, b2, **activation, backend=backend)

        def plain(input, w1, w2, b1=None, b2=None):
            return reference.ffn(input, w1, b1, w2, b2, **activation)
    _parity(context, fused, plain, args, tuple(args))
