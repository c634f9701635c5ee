"""Malformed input to every public op and module, on every backend available here.

Each case either raises a clear exception (its type and a fragment of the message that names the
argument are asserted) or returns what the reference returns (forward, and the gradients where
the inputs are differentiable; NaN exactly where the reference has NaN).

The backends and devices come from each op's declarations (as conftest's ``backend_params``);
the cases are written in float32, so a backend that does not take float32 (the CUDA C++
attention) is skipped here and covered by its own op's tests. Modules are swept on the backends
of the op their forward is built on.

The cases run in a child process per (backend, device) (tests/isolated.py): a crash in native code
(a segfault, an abort) then fails the case that was running instead of killing the test session,
and a new child takes the remaining cases.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F

import fused_attn
from fused_attn import BackendNotSupportedError, reference
from fused_attn.nn import FusedFFN, FusedLayerNorm

from . import isolated
from .conftest import _magnitude, backend_params, check_tensor_parity
from .isolated import report_cases

# ---------------------------------------------------------------------------------------------
# Checks, run inside the child


def expect_error(fn: Callable[[], object], exc: type[BaseException], *fragments: str) -> None:
    """``fn()`` raises ``exc`` whose message contains every fragment."""
    try:
        fn()
    except exc as err:
        message = str(err)
        missing = [f for f in fragments if f not in message]
        assert not missing, f"{type(err).__name__} message {message!r} lacks {missing}"
        return
    except Exception as err:  # noqa: BLE001 - the wrong exception type is the finding
        raise AssertionError(f"expected {exc.__name__}, got {type(err).__name__}: {err}") from None
    raise AssertionError(f"expected {exc.__name__}, nothing was raised")


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _upstream(out: torch.Tensor) -> torch.Tensor:
    # A fixed, non-uniform upstream gradient (a uniform one hides errors that cancel).
    return torch.arange(out.numel(), dtype=torch.float64).sin().reshape(out.shape).to(out.dtype).to(out.device)


def _float64_twin(args: dict, leaves: list) -> tuple[dict, list] | None:
    """``args`` and ``leaves`` in float64, the same layouts and views: each leaf copied with its
    strides, each argument that is a view of a leaf (listed or not) taken as the same view of the
    leaf's copy (an expanded or overlapping view stays one), other floating tensors converted. None
    when an argument is computed from the leaves other than by a view of one."""
    twins: dict[int, torch.Tensor] = {}

    def twin(leaf: torch.Tensor) -> torch.Tensor:
        if id(leaf) not in twins:
            copy64 = torch.empty_strided(leaf.size(), leaf.stride(), dtype=torch.float64, device=leaf.device)
            twins[id(leaf)] = copy64.copy_(leaf.detach()).requires_grad_(leaf.requires_grad)
        return twins[id(leaf)]

    def is_leaf(t: torch.Tensor) -> bool:
        # a listed leaf, or a leaf of the graph whose gradient is not checked (e.g. the base of an
        # expanded bias)
        return t.grad_fn is None or any(t is leaf for leaf in leaves)

    out = {}
    for name, value in args.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            base = value._base
            if base is not None and is_leaf(base):
                value = twin(base).as_strided(value.size(), value.stride(), value.storage_offset() - base.storage_offset())
            elif is_leaf(value):
                value = twin(value)
            else:
                return None
        out[name] = value
    return out, [twin(leaf) for leaf in leaves]


@contextlib.contextmanager
def _in_float64(modules: tuple[torch.nn.Module, ...]) -> Iterator[None]:
    """The modules' floating parameters and buffers in float64 for the duration (then back to their
    dtype: widening and narrowing again gives the same bits)."""
    dtypes = [next((t.dtype for t in [*m.parameters(), *m.buffers()] if t.is_floating_point()), None) for m in modules]
    try:
        for module in modules:
            module.double()
        yield
    finally:
        for module, dtype in zip(modules, dtypes):
            if dtype is not None:
                module.to(dtype)


def expect_same(fused: Callable, plain: Callable, make: Callable, *, grads: bool = True, tol: float = 1e-4,
                modules: tuple[torch.nn.Module, ...] = ()) -> None:
    """``fused(**args)`` equals ``plain(**args)`` (NaN where NaN), as do the gradients of the leaves.

    ``make()`` returns ``(args, leaves)``; it is called once per side, so the two graphs are
    independent. ``grads=False`` checks the forward only. Where ``plain`` also runs on the
    arguments in float64 (with ``modules``, the modules it calls, in float64 too), that is the
    truth, and the values are held to the parity rule of tests/conftest.py (within 3x the error
    ``plain`` makes in the arguments' precision, plus an ulp); otherwise fused and plain must agree
    within ``tol``.
    """
    results = []
    for fn in (fused, plain):
        args, leaves = make()
        out = _first(fn(**args))
        got = [out.detach()]
        if grads and leaves:
            got += list(torch.autograd.grad(out, leaves, _upstream(out), allow_unused=True))
        results.append(got)
    truth = None
    args, leaves = make()
    twin = _float64_twin(args, leaves if grads else [])
    if twin is not None and results[1][0].is_floating_point() and results[1][0].device.type != "meta":
        with _in_float64(modules):  # the backward too: it reads the modules' parameters
            try:
                out64 = _first(plain(**twin[0]))
            except (RuntimeError, TypeError, ValueError):
                out64 = None  # e.g. a module with float32 weights not given in `modules`
            if out64 is not None and out64.dtype == torch.float64:
                truth = [out64.detach()]
                if grads and twin[1]:
                    upstream = _upstream(results[1][0]).double()  # the low-precision sides' upstream, exactly
                    truth += list(torch.autograd.grad(out64, twin[1], upstream, allow_unused=True))
    names = ["output"] + [f"grad {i}" for i in range(len(results[0]) - 1)]
    scale = max([1.0] + [_magnitude(t) for t in truth or [] if t is not None])
    for i, (name, a, b) in enumerate(zip(names, *results)):
        if a is None or b is None:
            assert a is None and b is None, f"{name}: a gradient on one side only (fused {a is not None})"
            continue
        assert a.shape == b.shape, f"{name}: shape {list(a.shape)} != reference {list(b.shape)}"
        assert a.dtype == b.dtype, f"{name}: dtype {a.dtype} != reference {b.dtype}"
        assert a.device == b.device, f"{name}: device {a.device} != reference {b.device}"
        if a.device.type == "meta":
            continue
        nan_a, nan_b = torch.isnan(a), torch.isnan(b)
        assert torch.equal(nan_a, nan_b), f"{name}: NaN at {nan_a.sum()} places, reference at {nan_b.sum()}"
        if truth is not None and truth[i] is not None and torch.equal(torch.isnan(truth[i]), nan_b):
            check_tensor_parity(name, a, b, truth[i], factor=3.0, problem_scale=scale)
        else:
            torch.testing.assert_close(a, b, rtol=tol, atol=tol, equal_nan=True, msg=lambda m: f"{name}: {m}")


def randn(*shape, seed: int = 0, device="cpu", dtype=torch.float32, grad: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 1000 * len(shape) + sum(shape))
    return torch.randn(shape, generator=gen).to(device=device, dtype=dtype).requires_grad_(grad)


# ---------------------------------------------------------------------------------------------
# Cases. Each is ``fn(backend, device)``; ``OP`` names the op whose declarations decide on which
# backends it runs (modules: the op their forward is built on).

CASES: dict[str, tuple[str, Callable[[str, str], None]]] = {}


def case(op: str):
    def register(fn):
        CASES[fn.__name__] = (op, fn)
        return fn

    return register


B, H, L, D = 1, 2, 5, 8
SDPA = "scaled_dot_product_attention"


def _qkv(device, *, q=(B, H, L, D), k=(B, H, L, D), v=(B, H, L, D), grad=True, dtype=torch.float32):
    return [randn(*s, seed=i, device=device, dtype=dtype, grad=grad) for i, s in enumerate((q, k, v))]


def _sdpa(backend):
    return lambda **a: fused_attn.scaled_dot_product_attention(**a, backend=backend)


def _sdpa_same(backend, device, *, mask=None, grads=True, **shapes_and_kwargs):
    shapes = {k: shapes_and_kwargs.pop(k) for k in ("q", "k", "v") if k in shapes_and_kwargs}

    def make():
        q, k, v = _qkv(device, **shapes)
        args = dict(query=q, key=k, value=v, **shapes_and_kwargs)
        m = mask() if callable(mask) else mask
        if m is not None:
            args["attn_mask"] = m
        leaves = [q, k, v] + ([m] if m is not None and m.requires_grad else [])
        return args, leaves

    expect_same(_sdpa(backend), reference.scaled_dot_product_attention, make, grads=grads)


@case(SDPA)
def sdpa_query_3d(backend, device):
    q, k, v = _qkv(device, q=(H, L, D))
    expect_error(lambda: _sdpa(backend)(query=q, key=k, value=v), ValueError, "query must be 4-D")


@case(SDPA)
def sdpa_key_5d(backend, device):
    q, k, v = _qkv(device, k=(1, B, H, L, D))
    expect_error(lambda: _sdpa(backend)(query=q, key=k, value=v), ValueError, "key must be 4-D")


@case(SDPA)
def sdpa_batch_mismatch(backend, device):
    q, k, v = _qkv(device, k=(2, H, L, D))
    expect_error(lambda: _sdpa(backend)(query=q, key=k, value=v), ValueError, "key batch and heads")


@case(SDPA)
def sdpa_heads_mismatch(backend, device):
    q, k, v = _qkv(device, v=(B, 3, L, D))
    expect_error(lambda: _sdpa(backend)(query=q, key=k, value=v), ValueError, "value batch and heads")


@case(SDPA)
def sdpa_head_dim_mismatch(backend, device):
    q, k, v = _qkv(device, k=(B, H, L, 4))
    expect_error(lambda: _sdpa(backend)(query=q, key=k, value=v), ValueError, "key head_dim 4")


@case(SDPA)
def sdpa_key_value_lengths_differ(backend, device):
    q, k, v = _qkv(device, v=(B, H, L + 2, D))
    expect_error(lambda: _sdpa(backend)(query=q, key=k, value=v), ValueError, "value length 7", "key length 5")


@case(SDPA)
def sdpa_dtype_mismatch(backend, device):
    q, k, v = _qkv(device)
    expect_error(lambda: _sdpa(backend)(query=q, key=k.half(), value=v), TypeError, "key dtype float16")


@case(SDPA)
def sdpa_integer_query(backend, device):
    q, k, v = _qkv(device, grad=False)
    expect_error(lambda: _sdpa(backend)(query=q.long(), key=k, value=v), TypeError, "query must be a floating tensor")


@case(SDPA)
def sdpa_not_a_tensor(backend, device):
    q, k, v = _qkv(device)
    expect_error(lambda: _sdpa(backend)(query=q.tolist(), key=k, value=v), TypeError, "query must be a torch.Tensor")


@case(SDPA)
def sdpa_device_mismatch(backend, device):
    q, k, v = _qkv(device)
    expect_error(lambda: _sdpa(backend)(query=q, key=k.to("meta"), value=v), ValueError, "key is on meta")


@case(SDPA)
def sdpa_all_on_meta(backend, device):
    q, k, v = (t.detach().to("meta") for t in _qkv(device))
    if backend == "reference":  # plain torch: it runs wherever torch does
        assert _sdpa(backend)(query=q, key=k, value=v).device.type == "meta"
        return
    expect_error(lambda: _sdpa(backend)(query=q, key=k, value=v), BackendNotSupportedError, "meta")


@case(SDPA)
def sdpa_float64_on_fused_backend(backend, device):
    q, k, v = _qkv(device, dtype=torch.float64)
    if backend == "reference":
        _sdpa_same(backend, device, grads=False)
    else:
        expect_error(lambda: _sdpa(backend)(query=q, key=k, value=v), BackendNotSupportedError, "dtype float64")


@case(SDPA)
def sdpa_mask_does_not_broadcast(backend, device):
    q, k, v = _qkv(device)
    mask = torch.ones(B, H, L, L + 1, dtype=torch.bool, device=device)
    expect_error(lambda: _sdpa(backend)(query=q, key=k, value=v, attn_mask=mask), ValueError, "attn_mask of shape")


@case(SDPA)
def sdpa_mask_5d(backend, device):
    q, k, v = _qkv(device)
    mask = torch.ones(1, B, H, L, L, dtype=torch.bool, device=device)
    expect_error(
        lambda: _sdpa(backend)(query=q, key=k, value=v, attn_mask=mask), ValueError, "attn_mask must have at most 4"
    )


@case(SDPA)
def sdpa_integer_mask(backend, device):
    q, k, v = _qkv(device)
    mask = torch.ones(L, L, dtype=torch.int64, device=device)
    expect_error(
        lambda: _sdpa(backend)(query=q, key=k, value=v, attn_mask=mask), TypeError, "attn_mask must be a bool or floating"
    )


@case(SDPA)
def sdpa_float8_mask(backend, device):
    q, k, v = _qkv(device)
    mask = torch.zeros(L, L, device=device).to(torch.float8_e4m3fn)
    expect_error(
        lambda: _sdpa(backend)(query=q, key=k, value=v, attn_mask=mask), TypeError,
        "attn_mask must be a bool or floating tensor (float16, bfloat16, float32 or float64), got float8_e4m3fn",
    )


@case(SDPA)
def sdpa_sparse_mask(backend, device):
    q, k, v = _qkv(device)
    for mask, layout in ((torch.zeros(L, L, device=device).to_sparse(), "sparse_coo"),
                         (torch.ones(L, L, dtype=torch.bool, device=device).to_sparse_csr(), "sparse_csr")):
        expect_error(lambda: _sdpa(backend)(query=q, key=k, value=v, attn_mask=mask), TypeError,
                     f"attn_mask must be a dense (strided) tensor, got layout {layout}")


@case(SDPA)
def sdpa_nested_query(backend, device):
    pieces = [randn(L, H, D, seed=0, device=device), randn(L + 2, H, D, seed=1, device=device)]
    for layout in (torch.jagged, torch.strided):
        q = torch.nested.nested_tensor(pieces, layout=layout).transpose(1, 2)
        expect_error(lambda: _sdpa(backend)(query=q, key=q, value=q), TypeError,
                     "query must be a dense (strided) tensor, got a nested tensor")


@case(SDPA)
def sdpa_mask_on_other_device(backend, device):
    q, k, v = _qkv(device)
    mask = torch.zeros(L, L, device="meta")
    expect_error(lambda: _sdpa(backend)(query=q, key=k, value=v, attn_mask=mask), ValueError, "attn_mask is on meta")


@case(SDPA)
def sdpa_mask_of_other_float_dtype(backend, device):
    _sdpa_same(backend, device, mask=lambda: randn(L, L, seed=7, device=device, dtype=torch.float16))


@case(SDPA)
def sdpa_float64_mask(backend, device):
    _sdpa_same(backend, device, mask=lambda: randn(B, 1, 1, L, seed=7, device=device, dtype=torch.float64))


@case(SDPA)
def sdpa_mask_requires_grad(backend, device):
    _sdpa_same(backend, device, mask=lambda: randn(B, H, L, L, seed=7, device=device, grad=True))


@case(SDPA)
def sdpa_broadcast_mask_requires_grad(backend, device):
    _sdpa_same(backend, device, mask=lambda: randn(1, 1, L, seed=8, device=device, grad=True), is_causal=True)


@case(SDPA)
def sdpa_one_dim_bool_mask(backend, device):
    _sdpa_same(backend, device, mask=lambda: torch.tensor([True, False, True, True, False], device=device))


@case(SDPA)
def sdpa_mask_with_nan(backend, device):
    def mask():
        m = torch.zeros(L, L, device=device)
        m[1, 3] = float("nan")
        return m

    _sdpa_same(backend, device, mask=mask)


@case(SDPA)
def sdpa_mask_with_plus_inf(backend, device):
    def mask():
        m = torch.zeros(L, L, device=device)
        m[2, 0] = float("inf")
        return m

    _sdpa_same(backend, device, mask=mask, grads=False)


@case(SDPA)
def sdpa_mask_all_minus_inf(backend, device):
    _sdpa_same(backend, device, mask=lambda: torch.full((L, L), float("-inf"), device=device))


@case(SDPA)
def sdpa_unsupported_head_dim(backend, device):
    q, k, v = _qkv(device, q=(B, 1, 2, 300), k=(B, 1, 2, 300), v=(B, 1, 2, 4))
    if backend == "reference":
        _sdpa_same(backend, device, q=(B, 1, 2, 300), k=(B, 1, 2, 300), v=(B, 1, 2, 4))
    else:
        expect_error(lambda: _sdpa(backend)(query=q, key=k, value=v), BackendNotSupportedError, "head_dim=300")


@case(SDPA)
def sdpa_head_dim_zero(backend, device):
    # Empty query and key: no kernel runs (their size limits do not apply), the reference answers
    # (every score 0: the mean of the values), as torch does.
    _sdpa_same(backend, device, scale=1.0, q=(B, H, L, 0), k=(B, H, L, 0), v=(B, H, L, D))


@case(SDPA)
def sdpa_empty_batch(backend, device):
    _sdpa_same(backend, device, q=(0, H, L, D), k=(0, H, L, D), v=(0, H, L, D))


@case(SDPA)
def sdpa_zero_heads(backend, device):
    _sdpa_same(backend, device, q=(B, 0, L, D), k=(B, 0, L, D), v=(B, 0, L, D))


@case(SDPA)
def sdpa_query_length_zero(backend, device):
    _sdpa_same(backend, device, q=(B, H, 0, D), is_causal=True)


@case(SDPA)
def sdpa_key_length_zero(backend, device):
    _sdpa_same(backend, device, k=(B, H, 0, D), v=(B, H, 0, D))


@case(SDPA)
def sdpa_negative_scale(backend, device):
    _sdpa_same(backend, device, scale=-0.7)


@case(SDPA)
def sdpa_zero_scale(backend, device):
    _sdpa_same(backend, device, scale=0.0, is_causal=True)


@case(SDPA)
def sdpa_huge_scale(backend, device):
    # Finite as a Python float, infinite once rounded to float32: the scores overflow.
    _sdpa_same(backend, device, scale=1e300, grads=False)


@case(SDPA)
def sdpa_large_scale(backend, device):
    # Scores ~1e30 (finite in float32): the softmax is one-hot, nothing overflows.
    _sdpa_same(backend, device, scale=1e29, grads=False)


@case(SDPA)
def sdpa_non_finite_scale(backend, device):
    q, k, v = _qkv(device)
    for scale in (float("nan"), float("inf"), -float("inf")):
        expect_error(lambda: _sdpa(backend)(query=q, key=k, value=v, scale=scale), ValueError, "scale must be")


@case(SDPA)
def sdpa_scale_not_a_number(backend, device):
    q, k, v = _qkv(device)
    expect_error(lambda: _sdpa(backend)(query=q, key=k, value=v, scale="0.5"), ValueError, "scale must be")


@case(SDPA)
def sdpa_dropout_out_of_range(backend, device):
    q, k, v = _qkv(device)
    for p in (1.0 + 1e-9, -0.1, 1.5, float("nan"), True):
        expect_error(lambda: _sdpa(backend)(query=q, key=k, value=v, dropout_p=p), ValueError,
                     "dropout_p must be a number in [0, 1]")


@case(SDPA)
def sdpa_is_causal_not_bool(backend, device):
    q, k, v = _qkv(device)
    expect_error(lambda: _sdpa(backend)(query=q, key=k, value=v, is_causal=1), TypeError, "is_causal must be a Python bool")


@case(SDPA)
def sdpa_nan_in_query(backend, device):
    def make():
        q, k, v = _qkv(device, grad=False)
        q[0, 1, 2, 3] = float("nan")
        return dict(query=q, key=k, value=v), []

    expect_same(_sdpa(backend), reference.scaled_dot_product_attention, make)


@case(SDPA)
def sdpa_nan_in_value(backend, device):
    def make():
        q, k, v = _qkv(device, grad=False)
        v[0, 0, 4, 1] = float("nan")
        return dict(query=q, key=k, value=v, is_causal=True), []

    expect_same(_sdpa(backend), reference.scaled_dot_product_attention, make)


@case(SDPA)
def sdpa_inf_in_key(backend, device):
    def make():
        q, k, v = _qkv(device, grad=False)
        k[0, 0, 1, 0] = float("inf")
        return dict(query=q, key=k, value=v), []

    expect_same(_sdpa(backend), reference.scaled_dot_product_attention, make)


@case(SDPA)
def sdpa_non_contiguous(backend, device):
    def make():
        base = [randn(B, L, H, D, seed=i, device=device, grad=True) for i in range(3)]
        q, k = (t.transpose(1, 2) for t in base[:2])  # [B, H, L, D] views with odd strides
        v = base[2].permute(0, 2, 3, 1).transpose(-1, -2)  # last-dim stride != 1
        return dict(query=q, key=k, value=v), base

    expect_same(_sdpa(backend), reference.scaled_dot_product_attention, make)


@case(SDPA)
def sdpa_expanded_inputs(backend, device):
    def make():
        q = randn(B, 1, L, D, seed=1, device=device, grad=True)
        k = randn(B, H, 1, D, seed=2, device=device, grad=True)
        v = randn(B, H, L, 1, seed=3, device=device, grad=True)
        args = dict(query=q.expand(B, H, L, D), key=k.expand(B, H, L, D), value=v.expand(B, H, L, D))
        return args, [q, k, v]

    expect_same(_sdpa(backend), reference.scaled_dot_product_attention, make)


@case(SDPA)
def sdpa_overlapping_views(backend, device):
    def make():
        leaves = [randn(64, seed=i, device=device, grad=True) for i in range(3)]
        # Rows of 8 that start 3 elements apart: every element is read by several rows.
        q, k, v = (t.as_strided((B, H, L, D), (0, 12, 3, 1)) for t in leaves)
        return dict(query=q, key=k, value=v), leaves

    expect_same(_sdpa(backend), reference.scaled_dot_product_attention, make)


@case(SDPA)
def sdpa_same_tensor_for_query_key_value(backend, device):
    def make():
        x = randn(B, H, L, D, seed=4, device=device, grad=True)
        return dict(query=x, key=x, value=x, is_causal=True), [x]

    expect_same(_sdpa(backend), reference.scaled_dot_product_attention, make)


# ---- softmax

SOFTMAX_SHAPE = (2, 3, 4, 6)


def _softmax(backend):
    return lambda **a: fused_attn.softmax(**a, backend=backend)


def _softmax_same(backend, device, make_input=None, mask=None, grads=True, **kwargs):
    def make():
        x = make_input() if make_input else randn(*SOFTMAX_SHAPE, device=device, grad=True)
        m = mask() if callable(mask) else mask
        args = dict(input=x, mask=m, **kwargs)
        return args, [t for t in (x, m) if isinstance(t, torch.Tensor) and t.requires_grad and t.is_leaf]

    expect_same(_softmax(backend), reference.softmax, make, grads=grads)


@case("softmax")
def softmax_zero_dim_input(backend, device):
    expect_error(lambda: _softmax(backend)(input=torch.tensor(1.0, device=device)), ValueError,
                 "input must have at least 1 dimension, got shape []")


@case("softmax")
def softmax_dim_out_of_range(backend, device):
    x = randn(*SOFTMAX_SHAPE, device=device)
    for dim in (4, -5, 1.0, None):
        expect_error(lambda: _softmax(backend)(input=x, dim=dim), ValueError, "dim must be an int")


@case("softmax")
def softmax_integer_input(backend, device):
    x = torch.ones(3, 4, dtype=torch.int32, device=device)
    expect_error(lambda: _softmax(backend)(input=x), TypeError, "input must be a floating tensor")


@case("softmax")
def softmax_mask_does_not_broadcast(backend, device):
    x = randn(*SOFTMAX_SHAPE, device=device)
    mask = torch.ones(4, 5, dtype=torch.bool, device=device)
    expect_error(lambda: _softmax(backend)(input=x, mask=mask), ValueError, "mask of shape [4, 5]")


@case("softmax")
def softmax_mask_with_more_dims(backend, device):
    x = randn(4, 6, device=device)
    mask = torch.ones(2, 4, 6, dtype=torch.bool, device=device)
    expect_error(lambda: _softmax(backend)(input=x, mask=mask), ValueError, "mask must have at most 2 dimensions, got shape [2, 4, 6]")


@case("softmax")
def softmax_integer_mask(backend, device):
    x = randn(*SOFTMAX_SHAPE, device=device)
    mask = torch.ones(6, dtype=torch.uint8, device=device)
    expect_error(lambda: _softmax(backend)(input=x, mask=mask), TypeError, "mask must be a bool or floating")


@case("softmax")
def softmax_float8_or_sparse_mask(backend, device):
    x = randn(*SOFTMAX_SHAPE, device=device)
    mask = torch.zeros(6, device=device).to(torch.float8_e5m2)
    expect_error(lambda: _softmax(backend)(input=x, mask=mask), TypeError, "mask must be a bool or floating tensor (")
    mask = torch.zeros(4, 6, device=device).to_sparse_csr()
    expect_error(lambda: _softmax(backend)(input=x, mask=mask), TypeError,
                 "mask must be a dense (strided) tensor, got layout sparse_csr")


@case("softmax")
def softmax_mask_on_other_device(backend, device):
    x = randn(*SOFTMAX_SHAPE, device=device)
    expect_error(lambda: _softmax(backend)(input=x, mask=torch.zeros(6, device="meta")), ValueError, "mask is on meta")


@case("softmax")
def softmax_mask_of_other_float_dtype(backend, device):
    _softmax_same(backend, device, mask=lambda: randn(4, 6, seed=3, device=device, dtype=torch.float16))


@case("softmax")
def softmax_mask_requires_grad(backend, device):
    _softmax_same(backend, device, mask=lambda: randn(3, 1, 6, seed=3, device=device, grad=True))


@case("softmax")
def softmax_non_finite_scale(backend, device):
    x = randn(*SOFTMAX_SHAPE, device=device)
    for scale in (float("nan"), float("inf"), None, "2"):
        expect_error(lambda: _softmax(backend)(input=x, scale=scale), ValueError, "scale must be a finite number")


@case("softmax")
def softmax_negative_scale(backend, device):
    _softmax_same(backend, device, scale=-3.0)


@case("softmax")
def softmax_huge_scale(backend, device):
    _softmax_same(backend, device, scale=1e300, grads=False)


@case("softmax")
def softmax_causal_needs_last_dim(backend, device):
    x = randn(*SOFTMAX_SHAPE, device=device)
    expect_error(lambda: _softmax(backend)(input=x, dim=1, is_causal=True), ValueError, "is_causal=True needs dim")


@case("softmax")
def softmax_other_dim(backend, device):
    _softmax_same(backend, device, dim=1, mask=lambda: randn(3, 1, 1, seed=4, device=device) > 0)


@case("softmax")
def softmax_empty(backend, device):
    _softmax_same(backend, device, make_input=lambda: randn(0, 6, device=device, grad=True))


@case("softmax")
def softmax_empty_softmax_dim(backend, device):
    _softmax_same(backend, device, make_input=lambda: randn(3, 0, device=device, grad=True))


@case("softmax")
def softmax_nan_and_inf_rows(backend, device):
    def make_input():
        x = randn(4, 6, device=device)
        x[0, 2] = float("nan")
        x[1, 3] = float("inf")
        x[2] = float("-inf")
        return x

    _softmax_same(backend, device, make_input=make_input, grads=False)


@case("softmax")
def softmax_non_contiguous_expanded_overlapping(backend, device):
    _softmax_same(backend, device, make_input=lambda: randn(6, 4, device=device).t())
    _softmax_same(backend, device, make_input=lambda: randn(4, 1, device=device).expand(4, 6))
    _softmax_same(backend, device, make_input=lambda: randn(20, device=device).as_strided((5, 6), (2, 1)))


@case("softmax")
def softmax_float64_on_fused_backend(backend, device):
    if backend == "reference":
        _softmax_same(backend, device, make_input=lambda: randn(3, 4, device=device, dtype=torch.float64))
    else:
        x = randn(3, 4, device=device, dtype=torch.float64)
        expect_error(lambda: _softmax(backend)(input=x), BackendNotSupportedError, "dtype float64")


# ---- layer_norm

ROWS, HIDDEN = 3, 8


def _layer_norm(backend):
    return lambda **a: fused_attn.layer_norm(**a, backend=backend)


def _ln_args(device, **overrides):
    args = dict(
        input=randn(ROWS, HIDDEN, seed=1, device=device, grad=True),
        normalized_shape=(HIDDEN,),
        weight=randn(HIDDEN, seed=2, device=device, grad=True),
        bias=randn(HIDDEN, seed=3, device=device, grad=True),
    )
    args.update(overrides)
    return args


def _ln_same(backend, device, make_args=None, grads=True):
    def make():
        args = make_args() if make_args else _ln_args(device)
        leaves = [t for t in args.values() if isinstance(t, torch.Tensor) and t.requires_grad and t.is_leaf]
        return args, leaves

    expect_same(_layer_norm(backend), F.layer_norm, make, grads=grads)


@case("layer_norm")
def layer_norm_normalized_shape_mismatch(backend, device):
    args = _ln_args(device, normalized_shape=(HIDDEN + 1,), weight=None, bias=None)
    expect_error(lambda: _layer_norm(backend)(**args), ValueError, "normalized_shape [9] must equal the trailing dims")


@case("layer_norm")
def layer_norm_sparse_or_nested_input(backend, device):
    args = _ln_args(device, input=randn(ROWS, HIDDEN, device=device).to_sparse())
    expect_error(lambda: _layer_norm(backend)(**args), TypeError,
                 "input must be a dense (strided) tensor, got layout sparse_coo")
    nested = torch.nested.nested_tensor([randn(2, HIDDEN, device=device), randn(3, HIDDEN, device=device)],
                                        layout=torch.jagged)
    args = _ln_args(device, input=nested)
    expect_error(lambda: _layer_norm(backend)(**args), TypeError,
                 "input must be a dense (strided) tensor, got a nested tensor")


@case("layer_norm")
def layer_norm_normalized_shape_too_long(backend, device):
    args = _ln_args(device, normalized_shape=(2, ROWS, HIDDEN), weight=None, bias=None)
    expect_error(lambda: _layer_norm(backend)(**args), ValueError, "normalized_shape [2, 3, 8]")


@case("layer_norm")
def layer_norm_normalized_shape_empty_or_not_ints(backend, device):
    expect_error(lambda: _layer_norm(backend)(**_ln_args(device, normalized_shape=())), ValueError, "normalized_shape []")
    for bad in (8.0, "8", (8.0,), True):
        args = _ln_args(device, normalized_shape=bad)
        expect_error(lambda: _layer_norm(backend)(**args), TypeError, "normalized_shape must be an int or a sequence")


@case("layer_norm")
def layer_norm_zero_dim_input(backend, device):
    args = _ln_args(device, input=torch.tensor(2.0, device=device), normalized_shape=(1,), weight=None, bias=None)
    expect_error(lambda: _layer_norm(backend)(**args), ValueError, "input must have at least 1")


@case("layer_norm")
def layer_norm_weight_wrong_shape(backend, device):
    args = _ln_args(device, weight=randn(HIDDEN + 1, device=device))
    expect_error(lambda: _layer_norm(backend)(**args), ValueError, "weight must have shape [8], got [9]")
    args = _ln_args(device, bias=randn(1, HIDDEN, device=device))
    expect_error(lambda: _layer_norm(backend)(**args), ValueError, "bias must have shape [8], got [1, 8]")


@case("layer_norm")
def layer_norm_integer_weight(backend, device):
    args = _ln_args(device, weight=torch.ones(HIDDEN, dtype=torch.int64, device=device))
    expect_error(lambda: _layer_norm(backend)(**args), TypeError, "weight must be a floating tensor")


@case("layer_norm")
def layer_norm_weight_on_other_device(backend, device):
    args = _ln_args(device, bias=torch.zeros(HIDDEN, device="meta"))
    expect_error(lambda: _layer_norm(backend)(**args), ValueError, "bias is on meta")


@case("layer_norm")
def layer_norm_input_on_meta(backend, device):
    args = _ln_args("meta", weight=None, bias=None)
    if backend == "reference":  # plain torch: it runs wherever torch does
        assert _layer_norm(backend)(**args).device.type == "meta"
        return
    expect_error(lambda: _layer_norm(backend)(**args), BackendNotSupportedError, "meta")


@case("layer_norm")
def layer_norm_parameters_of_other_dtype(backend, device):
    # As F.layer_norm with float32 parameters on a float16 input: the output has the input's dtype.
    def make():
        args = _ln_args(device, input=randn(ROWS, HIDDEN, seed=1, device=device, dtype=torch.float16, grad=True))
        return args, [args["input"], args["weight"], args["bias"]]

    expect_same(_layer_norm(backend), F.layer_norm, make)  # torch's own mixed-precision path


@case("layer_norm")
def layer_norm_bad_eps(backend, device):
    for eps in (-1e-5, float("nan"), float("inf"), None, True):
        expect_error(lambda: _layer_norm(backend)(**_ln_args(device), eps=eps), ValueError, "eps must be")


@case("layer_norm")
def layer_norm_huge_eps(backend, device):
    # 1e39: finite, but not as a float32, which every kernel takes it as (inf: each row gives the bias).
    for eps in (1e30, 1e39):
        _ln_same(backend, device, make_args=lambda eps=eps: {**_ln_args(device), "eps": eps})


@case("layer_norm")
def layer_norm_constant_rows_with_zero_eps(backend, device):
    # Variance 0 and eps 0: 0 * inf, NaN in the reference too.
    _ln_same(backend, device, make_args=lambda: {**_ln_args(device, input=torch.ones(ROWS, HIDDEN, device=device)),
                                                 "eps": 0.0}, grads=False)


@case("layer_norm")
def layer_norm_empty(backend, device):
    _ln_same(backend, device, make_args=lambda: _ln_args(device, input=randn(0, HIDDEN, device=device, grad=True)))
    _ln_same(backend, device, make_args=lambda: _ln_args(device, input=randn(2, 0, HIDDEN, device=device, grad=True)))


@case("layer_norm")
def layer_norm_hidden_zero(backend, device):
    def make_args():
        return _ln_args(device, input=randn(ROWS, 0, device=device, grad=True), normalized_shape=(0,),
                        weight=randn(0, device=device, grad=True), bias=randn(0, device=device, grad=True))

    _ln_same(backend, device, make_args=make_args)


@case("layer_norm")
def layer_norm_nan_and_inf_rows(backend, device):
    def make_args():
        x = randn(4, HIDDEN, seed=1, device=device)
        x[1, 2] = float("nan")
        x[2, 5] = float("inf")
        return _ln_args(device, input=x.requires_grad_(True))

    _ln_same(backend, device, make_args=make_args, grads=False)


@case("layer_norm")
def layer_norm_multi_dim_normalized_shape(backend, device):
    def make_args():
        return _ln_args(device, input=randn(2, 3, 4, device=device, grad=True), normalized_shape=(3, 4),
                        weight=randn(3, 4, device=device, grad=True), bias=randn(3, 4, device=device, grad=True))

    _ln_same(backend, device, make_args=make_args)


@case("layer_norm")
def layer_norm_non_contiguous_expanded_overlapping(backend, device):
    for view in (
        lambda t: t.view(HIDDEN, ROWS).t(),  # transposed
        lambda t: t[:HIDDEN].view(1, HIDDEN).expand(ROWS, HIDDEN),  # expanded rows
        lambda t: t.as_strided((ROWS, HIDDEN), (2, 1)),  # overlapping rows
    ):
        def make():
            base = randn(ROWS * HIDDEN, seed=5, device=device, grad=True)
            weight = randn(2 * HIDDEN, seed=6, device=device, grad=True)
            bias = randn(1, seed=7, device=device, grad=True)
            args = dict(input=view(base), normalized_shape=(HIDDEN,), weight=weight[::2], bias=bias.expand(HIDDEN))
            return args, [base, weight, bias]

        expect_same(_layer_norm(backend), F.layer_norm, make)


@case("layer_norm")
def layer_norm_float64_on_fused_backend(backend, device):
    if backend == "reference":
        _ln_same(backend, device, make_args=lambda: {
            k: v.double() if isinstance(v, torch.Tensor) else v for k, v in _ln_args(device).items()})
    else:
        args = _ln_args(device, input=randn(2, HIDDEN, device=device, dtype=torch.float64))
        expect_error(lambda: _layer_norm(backend)(**args), BackendNotSupportedError, "dtype float64")


# ---- add_layer_norm


def _add_ln(backend):
    return lambda **a: fused_attn.add_layer_norm(**a, backend=backend)


def _aln_args(device, **overrides):
    args = dict(
        input=randn(ROWS, HIDDEN, seed=1, device=device, grad=True),
        residual=randn(ROWS, HIDDEN, seed=2, device=device, grad=True),
        weight=randn(HIDDEN, seed=3, device=device, grad=True),
        bias=randn(HIDDEN, seed=4, device=device, grad=True),
        input_bias=randn(HIDDEN, seed=5, device=device, grad=True),
    )
    args.update(overrides)
    return args


def _aln_same(backend, device, make_args=None, grads=True, tol=1e-4):
    def make():
        args = make_args() if make_args else _aln_args(device)
        leaves = [t for t in args.values() if isinstance(t, torch.Tensor) and t.requires_grad and t.is_leaf]
        return args, leaves

    expect_same(_add_ln(backend), reference.add_layer_norm, make, grads=grads, tol=tol)


@case("add_layer_norm")
def add_layer_norm_residual_shape_mismatch(backend, device):
    args = _aln_args(device, residual=randn(ROWS, 1, HIDDEN, device=device))
    expect_error(lambda: _add_ln(backend)(**args), ValueError, "residual shape [3, 1, 8] does not match input shape")


@case("add_layer_norm")
def add_layer_norm_residual_of_other_dtype(backend, device):
    # As ``residual + dropout(input + input_bias)``: the sum takes the promoted dtype.
    _aln_same(backend, device, make_args=lambda: _aln_args(
        device, residual=randn(ROWS, HIDDEN, seed=2, device=device, dtype=torch.float16, grad=True)))


@case("add_layer_norm")
def add_layer_norm_integer_residual(backend, device):
    args = _aln_args(device, residual=torch.ones(ROWS, HIDDEN, dtype=torch.int64, device=device))
    expect_error(lambda: _add_ln(backend)(**args), TypeError, "residual must be a floating tensor")


@case("add_layer_norm")
def add_layer_norm_residual_on_other_device(backend, device):
    args = _aln_args(device, residual=torch.zeros(ROWS, HIDDEN, device="meta"))
    expect_error(lambda: _add_ln(backend)(**args), ValueError, "residual is on meta")


@case("add_layer_norm")
def add_layer_norm_vectors_wrong_shape(backend, device):
    for name in ("weight", "bias", "input_bias"):
        args = _aln_args(device, **{name: randn(HIDDEN - 1, device=device)})
        expect_error(lambda: _add_ln(backend)(**args), ValueError, f"{name} must have shape [8], got [7]")


@case("add_layer_norm")
def add_layer_norm_bad_eps_and_dropout(backend, device):
    expect_error(lambda: _add_ln(backend)(**_aln_args(device), eps=-1.0), ValueError, "eps must be")
    for p in (1.5, -0.5, float("nan"), "0.1"):
        expect_error(lambda: _add_ln(backend)(**_aln_args(device), dropout_p=p), ValueError, "dropout_p must be")


@case("add_layer_norm")
def add_layer_norm_huge_eps(backend, device):
    for eps in (1e30, 1e39):  # 1e39: inf as a float32, as every kernel takes it
        _aln_same(backend, device, make_args=lambda eps=eps: {**_aln_args(device), "eps": eps})


@case("add_layer_norm")
def add_layer_norm_zero_dim(backend, device):
    x = torch.tensor(1.0, device=device)
    expect_error(lambda: _add_ln(backend)(input=x, residual=x, weight=None, bias=None), ValueError,
                 "input must have at least 1")


@case("add_layer_norm")
def add_layer_norm_empty(backend, device):
    _aln_same(backend, device, make_args=lambda: _aln_args(device, input=randn(0, HIDDEN, device=device, grad=True),
                                                           residual=randn(0, HIDDEN, device=device, grad=True)))


@case("add_layer_norm")
def add_layer_norm_hidden_zero(backend, device):
    def make_args():
        return dict(input=randn(ROWS, 0, device=device, grad=True), residual=randn(ROWS, 0, device=device, grad=True),
                    weight=None, bias=None)

    _aln_same(backend, device, make_args=make_args)


@case("add_layer_norm")
def add_layer_norm_nan_and_inf(backend, device):
    def make_args():
        x = randn(4, HIDDEN, seed=1, device=device)
        x[0, 1] = float("nan")
        r = randn(4, HIDDEN, seed=2, device=device)
        r[2, 3] = float("-inf")
        return _aln_args(device, input=x, residual=r)

    _aln_same(backend, device, make_args=make_args, grads=False)


@case("add_layer_norm")
def add_layer_norm_nan_and_inf_that_dropout_drops(backend, device):
    # As torch's dropout (x * mask / (1 - p)): a NaN or inf that dropout drops still makes its row NaN.
    p, seed = 0.5, 7

    def fused(**args):
        torch.manual_seed(seed)
        return _add_ln(backend)(**args, dropout_p=p)

    ones = torch.ones(ROWS, HIDDEN, device=device)
    keep = fused(input=ones, residual=torch.zeros_like(ones), weight=None, bias=None, input_bias=None,
                 return_prenorm=True)[1] != 0
    assert (~keep).any(dim=1).all(), "every row must drop an element for this test"

    def make():
        x = randn(ROWS, HIDDEN, seed=1, device=device)
        for row in range(ROWS):
            x[row, (~keep[row]).nonzero()[0, 0]] = float("nan") if row % 2 else float("inf")
        return _aln_args(device, input=x), []

    def plain(**args):
        return reference.add_layer_norm(**args, dropout_p=p, dropout_mask=keep)

    expect_same(fused, plain, make, grads=False)


@case("add_layer_norm")
def add_layer_norm_aliased_views(backend, device):
    def make_args():
        base = randn(ROWS * HIDDEN, seed=9, device=device, grad=True)
        x = base.view(HIDDEN, ROWS).t()  # non-contiguous
        return _aln_args(device, input=x, residual=x, weight=None, input_bias=None), base

    def make():
        args, base = make_args()
        return args, [base, args["bias"]]

    expect_same(_add_ln(backend), reference.add_layer_norm, make)


@case("add_layer_norm")
def add_layer_norm_expanded_and_overlapping(backend, device):
    def make():
        a = randn(HIDDEN, seed=1, device=device, grad=True)
        b = randn(ROWS + HIDDEN, seed=2, device=device, grad=True)
        w = randn(2 * HIDDEN, seed=3, device=device, grad=True)
        ib = randn(1, seed=4, device=device, grad=True)
        args = _aln_args(device, input=a.expand(ROWS, HIDDEN), residual=b.as_strided((ROWS, HIDDEN), (1, 1)),
                         weight=w[1::2], input_bias=ib.expand(HIDDEN))
        return args, [a, b, w, ib]

    expect_same(_add_ln(backend), reference.add_layer_norm, make)


@case("add_layer_norm")
def add_layer_norm_prenorm_with_nan(backend, device):
    def make():
        x = randn(ROWS, HIDDEN, seed=1, device=device)
        x[1, 1] = float("nan")
        return _aln_args(device, input=x, return_prenorm=True), []

    def both(fn):
        return lambda **a: torch.cat([t.reshape(-1) for t in fn(**a)])

    expect_same(both(_add_ln(backend)), both(reference.add_layer_norm), make)


# ---- linear_gelu and ffn

IN, OUT, HID = 8, 6, 12


def _linear_gelu(backend):
    return lambda **a: fused_attn.linear_gelu(**a, backend=backend)


def _ffn(backend):
    return lambda **a: fused_attn.ffn(**a, backend=backend)


def _lg_args(device, **overrides):
    args = dict(input=randn(ROWS, IN, seed=1, device=device, grad=True),
                weight=randn(OUT, IN, seed=2, device=device, grad=True),
                bias=randn(OUT, seed=3, device=device, grad=True))
    args.update(overrides)
    return args


def _ffn_args(device, **overrides):
    args = dict(input=randn(ROWS, IN, seed=1, device=device, grad=True),
                w1=randn(HID, IN, seed=2, device=device, grad=True), b1=randn(HID, seed=3, device=device, grad=True),
                w2=randn(IN, HID, seed=4, device=device, grad=True), b2=randn(IN, seed=5, device=device, grad=True))
    args.update(overrides)
    return args


def _leaves(args):
    return [t for t in args.values() if isinstance(t, torch.Tensor) and t.requires_grad and t.is_leaf]


def _lg_same(backend, device, make_args, grads=True):
    def make():
        args = make_args()
        return args, _leaves(args)

    expect_same(_linear_gelu(backend), reference.linear_gelu, make, grads=grads)


def _ffn_same(backend, device, make_args, grads=True):
    def make():
        args = make_args()
        return args, _leaves(args)

    expect_same(_ffn(backend), reference.ffn, make, grads=grads)


@case("linear_gelu")
def linear_gelu_weight_wrong_shape(backend, device):
    for weight in (randn(IN, device=device), randn(OUT, IN + 1, device=device), randn(1, OUT, IN, device=device)):
        args = _lg_args(device, weight=weight)
        expect_error(lambda: _linear_gelu(backend)(**args), ValueError, "weight must have shape [out_features, 8]")


@case("linear_gelu")
def linear_gelu_sparse_weight(backend, device):
    args = _lg_args(device, weight=randn(OUT, IN, device=device).to_sparse())
    expect_error(lambda: _linear_gelu(backend)(**args), TypeError,
                 "weight must be a dense (strided) tensor, got layout sparse_coo")


@case("linear_gelu")
def linear_gelu_bias_wrong_shape(backend, device):
    args = _lg_args(device, bias=randn(OUT + 1, device=device))
    expect_error(lambda: _linear_gelu(backend)(**args), ValueError, "bias must have shape [6], got [7]")


@case("linear_gelu")
def linear_gelu_dtype_and_device_mismatch(backend, device):
    args = _lg_args(device, weight=randn(OUT, IN, device=device, dtype=torch.float16))
    expect_error(lambda: _linear_gelu(backend)(**args), TypeError, "weight dtype float16 does not match input dtype")
    args = _lg_args(device, weight=randn(OUT, IN, device="meta"))
    expect_error(lambda: _linear_gelu(backend)(**args), ValueError, "weight is on meta")
    args = _lg_args(device, input=torch.ones(ROWS, IN, dtype=torch.int64, device=device))
    expect_error(lambda: _linear_gelu(backend)(**args), TypeError, "input must be a floating tensor")


@case("linear_gelu")
def linear_gelu_bad_approximate(backend, device):
    expect_error(lambda: _linear_gelu(backend)(**_lg_args(device), approximate="fast"), ValueError, "approximate must be")


@case("linear_gelu")
def linear_gelu_zero_dim(backend, device):
    args = _lg_args(device, input=torch.tensor(1.0, device=device))
    expect_error(lambda: _linear_gelu(backend)(**args), ValueError, "input must have at least 1")


@case("linear_gelu")
def linear_gelu_empty(backend, device):
    _lg_same(backend, device, lambda: _lg_args(device, input=randn(0, IN, device=device, grad=True)))
    _lg_same(backend, device, lambda: _lg_args(device, input=randn(ROWS, 0, device=device, grad=True),
                                               weight=randn(OUT, 0, device=device, grad=True)))
    _lg_same(backend, device, lambda: _lg_args(device, weight=randn(0, IN, device=device, grad=True),
                                               bias=randn(0, device=device, grad=True)))


@case("linear_gelu")
def linear_gelu_nan_and_inf(backend, device):
    def make_args():
        x = randn(4, IN, seed=1, device=device)
        x[0, 3] = float("nan")
        x[2, 1] = float("inf")
        return _lg_args(device, input=x)

    def gelu_by_definition(input, weight, bias):
        h = F.linear(input, weight, bias)
        return h * 0.5 * (1.0 + torch.erf(h * 0.5**0.5))

    def make():
        return make_args(), []

    # The reference backend is torch's own GELU, whose vectorised CPU kernel gives NaN at +inf.
    plain = reference.linear_gelu if backend == "reference" else gelu_by_definition
    expect_same(_linear_gelu(backend), plain, make)


@case("linear_gelu")
def linear_gelu_non_contiguous_expanded_overlapping(backend, device):
    def make_args():
        x = randn(IN, ROWS, seed=1, device=device, grad=True)
        w = randn(IN, OUT, seed=2, device=device, grad=True)
        return dict(input=x.t(), weight=w.t(), bias=randn(1, device=device, grad=True).expand(OUT)), [x, w]

    def make():
        args, leaves = make_args()
        return args, leaves

    expect_same(_linear_gelu(backend), reference.linear_gelu, make)

    def make_overlap():
        base = randn(40, seed=3, device=device, grad=True)
        return dict(input=base.as_strided((ROWS, 2, IN), (2, 1, 1)), weight=base.as_strided((OUT, IN), (3, 1))), [base]

    expect_same(_linear_gelu(backend), reference.linear_gelu, make_overlap)


@case("ffn")
def ffn_weights_wrong_shape(backend, device):
    args = _ffn_args(device, w2=randn(IN, HID + 1, device=device))
    expect_error(lambda: _ffn(backend)(**args), ValueError, "w2 must have shape [out_features, 12]")
    args = _ffn_args(device, w1=randn(HID, IN - 1, device=device))
    expect_error(lambda: _ffn(backend)(**args), ValueError, "w1 must have shape [out_features, 8]")
    args = _ffn_args(device, b1=randn(IN, device=device))
    expect_error(lambda: _ffn(backend)(**args), ValueError, "b1 must have shape [12], got [8]")
    args = _ffn_args(device, b2=randn(HID, device=device))
    expect_error(lambda: _ffn(backend)(**args), ValueError, "b2 must have shape [8], got [12]")


@case("ffn")
def ffn_dtype_and_device_mismatch(backend, device):
    args = _ffn_args(device, w2=randn(IN, HID, device=device, dtype=torch.bfloat16))
    expect_error(lambda: _ffn(backend)(**args), TypeError, "w2 dtype bfloat16 does not match input dtype float32")
    args = _ffn_args(device, b1=randn(HID, device="meta"))
    expect_error(lambda: _ffn(backend)(**args), ValueError, "b1 is on meta")


@case("ffn")
def ffn_bad_dropout_and_approximate(backend, device):
    for p in (1.0 + 1e-9, -1e-3, float("inf")):
        expect_error(lambda: _ffn(backend)(**_ffn_args(device), dropout_p=p), ValueError, "dropout_p must be")
    expect_error(lambda: _ffn(backend)(**_ffn_args(device), approximate=None), ValueError, "approximate must be")
    expect_error(lambda: _ffn(backend)(**_ffn_args(device), activation="silu"), ValueError,
                 "activation must be 'gelu' or 'relu', got 'silu'")
    for activation in (None, ["relu"]):
        expect_error(lambda: _ffn(backend)(**_ffn_args(device), activation=activation), ValueError,
                     "activation must be 'gelu' or 'relu', got")
    expect_error(lambda: _ffn(backend)(**_ffn_args(device), activation="relu", approximate="tanh"), ValueError,
                 "approximate applies to the GELU only: with activation='relu' it must be 'none', got 'tanh'")
    # A code of the kernels is not a GELU's approximation.
    expect_error(lambda: _ffn(backend)(**_ffn_args(device), approximate="relu"), ValueError,
                 "approximate must be 'none' or 'tanh', got 'relu'")


@case("ffn")
def ffn_empty(backend, device):
    _ffn_same(backend, device, lambda: _ffn_args(device, input=randn(2, 0, IN, device=device, grad=True)))
    _ffn_same(backend, device, lambda: _ffn_args(device, w1=randn(0, IN, device=device, grad=True),
                                                 b1=randn(0, device=device, grad=True),
                                                 w2=randn(IN, 0, device=device, grad=True)))


@case("ffn")
def ffn_nan(backend, device):
    def make_args():
        x = randn(4, IN, seed=1, device=device)
        x[1, 5] = float("nan")
        return _ffn_args(device, input=x)

    _ffn_same(backend, device, make_args, grads=False)


@case("ffn")
def ffn_nan_under_dropout(backend, device):
    # A NaN input row is NaN in every output column, dropped ones too, as with torch's dropout.
    x = randn(4, IN, seed=1, device=device)
    x[1, 5] = float("nan")
    out = _ffn(backend)(**_ffn_args(device, input=x), dropout_p=0.5)
    assert torch.isnan(out[1]).all(), f"row 1: {out[1]}"
    assert torch.isfinite(out[[0, 2, 3]]).all()


@case("ffn")
def ffn_non_contiguous_and_expanded(backend, device):
    def make():
        x = randn(IN, 2, ROWS, seed=1, device=device, grad=True)
        w2 = randn(HID, IN, seed=2, device=device, grad=True)
        args = _ffn_args(device, input=x.permute(1, 2, 0), w2=w2.t(), b1=None,
                         b2=randn(1, device=device, grad=True).expand(IN))
        return args, [x, w2, args["w1"]]

    expect_same(_ffn(backend), reference.ffn, make)


# ---- modules (torch.nn counterparts compared where they exist)

E, HEADS, FF = 8, 2, 16


def _set_backend(module: torch.nn.Module, backend: str) -> torch.nn.Module:
    for m in module.modules():
        if hasattr(type(m), "backend"):
            m.backend = backend
    return module


def _fused_pair(plain: torch.nn.Module, backend: str):
    fused = fused_attn.optimize(copy.deepcopy(plain), backend=backend).model
    return _set_backend(fused, backend), plain


@case("layer_norm")
def module_layer_norm_bad_input(backend, device):
    norm = _set_backend(FusedLayerNorm(E, device=device), backend)
    expect_error(lambda: norm(randn(2, E + 1, device=device)), ValueError, "normalized_shape [8]")
    expect_error(lambda: norm(torch.ones(2, E, dtype=torch.int64, device=device)), TypeError, "input must be a floating")
    expect_error(lambda: norm(randn(2, E, device="meta")), ValueError, "weight is on")


@case("layer_norm")
def module_layer_norm_odd_inputs(backend, device):
    torch.manual_seed(0)
    fused, plain = _fused_pair(torch.nn.LayerNorm(E, device=device), backend)

    def make_nan():
        x = randn(3, E, seed=1, device=device)
        x[0, 0] = float("nan")
        return dict(input=x), []

    def make_overlapping():
        base = randn(4 * E, seed=2, device=device, grad=True)
        return dict(input=base.as_strided((3, E), (3, 1))), [base]

    def make_expanded():
        base = randn(E, seed=3, device=device, grad=True)
        return dict(input=base.expand(2, E)), [base]

    for make in (make_nan, make_overlapping, make_expanded):
        expect_same(fused, plain, make, modules=(plain,))
    expect_same(fused, plain, lambda: (dict(input=randn(0, E, device=device, grad=True)), []), modules=(plain,))


def _mha(device, **kwargs):
    torch.manual_seed(0)
    return torch.nn.MultiheadAttention(E, HEADS, batch_first=True, device=device, **kwargs)


@case(SDPA)
def module_mha_bad_shapes(backend, device):
    fused, _ = _fused_pair(_mha(device), backend)
    x = randn(2, L, E, device=device)
    expect_error(lambda: fused(randn(2, L, E - 1, device=device), x, x), ValueError, "query must have embedding dim 8")
    expect_error(lambda: fused(randn(1, 2, L, E, device=device), x, x), ValueError, "query must be")
    expect_error(lambda: fused(x, randn(3, L, E, device=device), x), ValueError, "key")
    expect_error(lambda: fused(x, x, randn(2, L + 1, E, device=device)), ValueError, "value")
    expect_error(lambda: fused(x, x, x, key_padding_mask=torch.zeros(2, L + 1, dtype=torch.bool, device=device)),
                 ValueError, "key_padding_mask must have shape [2, 5]")
    expect_error(lambda: fused(x, x, x, attn_mask=torch.zeros(L, L + 1, dtype=torch.bool, device=device)),
                 ValueError, "attn_mask must have shape")
    expect_error(lambda: fused(x, x, x, attn_mask=torch.zeros(L, L, dtype=torch.int32, device=device)),
                 TypeError, "attn_mask must be a bool or floating")
    expect_error(lambda: fused(x, x, x, key_padding_mask=torch.zeros(2, L, dtype=torch.int64, device=device)),
                 TypeError, "key_padding_mask must be a bool or floating")
    expect_error(lambda: fused(x, x, x, is_causal=True), RuntimeError, "is_causal=True needs attn_mask")


@case(SDPA)
def module_mha_matches_torch_on_odd_inputs(backend, device):
    fused, plain = _fused_pair(_mha(device), backend)
    for need_weights in (False, True):
        def run(module):
            return lambda **a: module(**a, need_weights=need_weights)

        def make_nan():
            x = randn(2, L, E, seed=1, device=device)
            x[1, 2, 3] = float("nan")
            return dict(query=x, key=x, value=x), []

        expect_same(run(fused), run(plain), make_nan, modules=(plain,))

        def make_views():
            base = randn(2 * L * E, seed=2, device=device, grad=True)
            q = base.view(L, 2, E).transpose(0, 1)
            kv = base[: L * E].view(1, L, E).expand(2, L, E)
            pad = torch.tensor([[False] * L, [False, True, False, True, True]], device=device)
            return dict(query=q, key=kv, value=kv, key_padding_mask=pad), [base]

        expect_same(run(fused), run(plain), make_views, modules=(plain,))

        def make_unbatched():
            x = randn(L, E, seed=3, device=device, grad=True)
            mask = torch.ones(L, L, dtype=torch.bool, device=device).triu(1)
            return dict(query=x, key=x, value=x, attn_mask=mask), [x]

        expect_same(run(fused), run(plain), make_unbatched, modules=(plain,))


@case(SDPA)
def module_mha_float_mask_requires_grad(backend, device):
    fused, plain = _fused_pair(_mha(device), backend)

    def make():
        x = randn(2, L, E, seed=1, device=device, grad=True)
        mask = randn(L, L, seed=2, device=device, grad=True)
        return dict(query=x, key=x, value=x, attn_mask=mask, need_weights=False), [x, mask]

    expect_same(fused, plain, make, modules=(plain,))


@case(SDPA)
def module_mha_empty(backend, device):
    fused, plain = _fused_pair(_mha(device), backend)
    for shape in ((0, L, E), (2, 0, E)):
        def make():
            x = randn(*shape, device=device, grad=True)
            return dict(query=x, key=x, value=x, need_weights=False), [x]

        expect_same(fused, plain, make, modules=(plain,))


@case("ffn")
def module_ffn_bad_and_odd_inputs(backend, device):
    torch.manual_seed(0)
    module = _set_backend(FusedFFN(E, FF, dropout=0.0, device=device), backend)

    def ffn(input):
        return module(input)

    expect_error(lambda: ffn(randn(2, E + 1, device=device)), ValueError, "w1 must have shape [out_features, 9]")
    expect_error(lambda: FusedFFN(E, FF, activation="swish"), ValueError, "activation must be one of")

    def plain(input):
        return module.linear2(F.gelu(module.linear1(input)))

    def make_overlapping():
        base = randn(3 * E, seed=1, device=device, grad=True)
        return dict(input=base.as_strided((2, E), (1, 1))), [base]

    def make_expanded():
        base = randn(E, seed=2, device=device, grad=True)
        return dict(input=base.expand(2, E)), [base]

    for make in (make_overlapping, make_expanded):
        expect_same(ffn, plain, make, modules=(module,))


def _encoder(device, **kwargs):
    torch.manual_seed(0)
    return torch.nn.TransformerEncoderLayer(E, HEADS, FF, dropout=0.0, batch_first=True, device=device, **kwargs)


@case("add_layer_norm")
def module_encoder_layer_bad_input(backend, device):
    fused, _ = _fused_pair(_encoder(device), backend)
    x = randn(2, L, E, device=device)
    expect_error(lambda: fused(randn(2, L, E + 2, device=device)), ValueError, "query must have embedding dim 8")
    expect_error(lambda: fused(x, src_key_padding_mask=torch.zeros(2, L - 1, dtype=torch.bool, device=device)),
                 ValueError, "key_padding_mask must have shape [2, 5]")
    expect_error(lambda: fused(x, src_mask=torch.zeros(L, L, dtype=torch.int64, device=device)), TypeError,
                 "attn_mask must be a bool or floating")


@case("add_layer_norm")
def module_encoder_layer_matches_torch(backend, device):
    for norm_first in (False, True):
        fused, plain = _fused_pair(_encoder(device, norm_first=norm_first), backend)

        def make():
            base = randn(2 * L * E, seed=1, device=device, grad=True)
            x = base.view(L, 2, E).transpose(0, 1)
            pad = torch.tensor([[False] * L, [False, False, True, True, True]], device=device)
            return dict(src=x, src_key_padding_mask=pad), [base]

        expect_same(fused, plain, make, modules=(plain,))

        def make_unbatched_nan():
            x = randn(L, E, seed=2, device=device)
            x[3, 1] = float("nan")
            return dict(src=x), []

        expect_same(fused, plain, make_unbatched_nan, modules=(plain,))


@case("add_layer_norm")
def module_decoder_layer_bad_and_odd_input(backend, device):
    torch.manual_seed(0)
    plain = torch.nn.TransformerDecoderLayer(E, HEADS, FF, dropout=0.0, batch_first=True, device=device)
    fused, plain = _fused_pair(plain, backend)
    tgt, memory = randn(2, L, E, seed=1, device=device), randn(2, L + 2, E, seed=2, device=device)
    expect_error(lambda: fused(tgt, randn(3, L, E, device=device)), ValueError, "key")
    expect_error(lambda: fused(tgt, memory, memory_mask=torch.zeros(L, L, dtype=torch.bool, device=device)),
                 ValueError, "attn_mask must have shape")

    def make():
        t = randn(2, L, E, seed=1, device=device, grad=True)
        m = randn(2, L + 2, E, seed=2, device=device, grad=True)
        causal = torch.ones(L, L, dtype=torch.bool, device=device).triu(1)
        return dict(tgt=t, memory=m, tgt_mask=causal), [t, m]

    expect_same(fused, plain, make, modules=(plain,))


# ---------------------------------------------------------------------------------------------
# The child process and the tests


def run_child(backend: str, device: str, names: list[str]) -> None:
    """Runs the named cases (tests/isolated.py's child side)."""
    torch.manual_seed(0)
    report_cases(lambda name: CASES[name][1](backend, device), names, __file__)


def run_cases(backend: str, device: str, names: list[str], prelude: str = "") -> dict[str, dict]:
    """Runs ``names`` in child processes (``prelude``: code run in the child first)."""
    child = f"from tests.test_bad_input import run_child\nrun_child({backend!r}, {device!r}, names)"
    return isolated.run_cases(child, names, prelude)


@functools.cache
def child_results(backend: str, device: str) -> dict[str, dict]:
    """Every case of (backend, device), run once per test session."""
    return run_cases(backend, device, [name for name, (op, _) in CASES.items() if _declares(op, backend, device)])


def _declares(op: str, backend: str, device: str) -> bool:
    support = fused_attn.backends.registered_ops()[op].supports.get(backend)
    return support is not None and support.serves_device(device) and torch.float32 in support.dtypes


def _params() -> list:
    params = []
    for name, (op, _) in CASES.items():
        for p in backend_params(op):
            backend, device = p.values[0]
            marks = list(p.marks)
            if not _declares(op, backend, device):
                # The cases are written in float32 (their expectations are exact to 1e-4).
                marks.append(pytest.mark.skip(reason=f"{op} on {backend} does not take float32"))
            params.append(pytest.param(backend, device, name, marks=marks, id=f"{backend}-{device}-{name}"))
    return params


@pytest.mark.parametrize("backend, device, name", _params())
def test_bad_input(backend, device, name):
    result = child_results(backend, device)[name]
    assert result["ok"], result["detail"]


def test_every_public_op_and_module_is_swept():
    ops = {op for op, _ in CASES.values()}
    assert ops == set(fused_attn.backends.registered_ops()), "an op has no bad-input cases"
    names = " ".join(CASES)
    for module in ("layer_norm", "mha", "ffn", "encoder_layer", "decoder_layer"):
        assert f"module_{module}" in names, f"no bad-input case for the {module} module"


def test_a_crash_in_the_child_fails_only_its_case():
    """The harness itself: a case that kills its process is reported, and the next case still runs."""
    prelude = (
        "import os\nfrom tests import test_bad_input as t\n"
        "t.CASES['zz_crash'] = ('layer_norm', lambda b, d: os.abort())\n"
        "t.CASES['zz_fine'] = ('layer_norm', lambda b, d: None)"
    )
    results = run_cases("reference", "cpu", ["zz_crash", "zz_fine"], prelude=prelude)
    assert not results["zz_crash"]["ok"] and "died" in results["zz_crash"]["detail"]
    assert results["zz_fine"]["ok"]


def test_numpy_scalars_are_taken_as_torch_takes_them():
    """Scale, dropout_p, eps, dim and normalized_shape given as NumPy scalars (e.g. computed from
    a config with NumPy) mean the Python numbers they hold; NumPy NaN and bools are still refused."""
    np = pytest.importorskip("numpy")
    x = torch.randn(2, 2, 4, 8)
    torch.testing.assert_close(fused_attn.scaled_dot_product_attention(x, x, x, scale=np.float32(0.5)),
                               F.scaled_dot_product_attention(x, x, x, scale=0.5))
    torch.testing.assert_close(fused_attn.softmax(x, np.int64(1)), torch.softmax(x, 1))
    torch.testing.assert_close(fused_attn.layer_norm(x, (np.int64(8),), eps=np.float32(1e-3)),
                               F.layer_norm(x, (8,), eps=float(np.float32(1e-3))))
    torch.testing.assert_close(fused_attn.add_layer_norm(x, x, None, None, np.float64(1e-5), np.float32(0.0)),
                               F.layer_norm(x + x, (8,)))
    for bad in (np.float32("nan"), np.bool_(True)):
        with pytest.raises(ValueError, match="scale must be a finite number"):
            fused_attn.scaled_dot_product_attention(x, x, x, scale=bad)
    with pytest.raises(ValueError, match="dropout_p must be a number in"):
        fused_attn.scaled_dot_product_attention(x, x, x, dropout_p=np.float64(1.5))
