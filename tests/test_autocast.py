"""Under ``torch.autocast`` the fused ops and modules give the dtypes their PyTorch counterparts
give under the same autocast, and stay within the parity bound of those counterparts (run in
the autocast precision) against a float64 truth (autocast leaves float64 alone)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_attn

from .conftest import assert_model_parity, assert_parity, backend_params, native_ops, supported_dtypes

# CPU autocast runs in bfloat16 (its float16 support is partial); CUDA in both.
AUTOCAST_DTYPES = {"cpu": (torch.bfloat16,), "cuda": (torch.float16, torch.bfloat16)}


def autocast_params(op: str) -> list:
    """(backend, device, autocast dtype) from ``op``'s declarations, as conftest's backend_params."""
    params = []
    for p in backend_params(op):
        backend, device = p.values[0]
        for dtype in AUTOCAST_DTYPES[device]:
            marks = list(p.marks)
            if dtype not in supported_dtypes(backend, device):
                marks.append(pytest.mark.skip(reason=f"{dtype} is not tested on {backend}-{device}"))
            name = str(dtype).replace("torch.", "")
            params.append(pytest.param(backend, device, dtype, marks=marks, id=f"{backend}-{device}-{name}"))
    return params


def autocast_wrapped(fn, device: str, dtype: torch.dtype):
    def run(**kwargs):
        with torch.autocast(device, dtype=dtype):
            return fn(**kwargs)

    return run


def randn(*shape, device, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)


def check_op(fused, plain, args, device, dtype, grad_args):
    """Same output dtype as ``plain`` under autocast, and parity (assert_parity also compares the
    output dtypes of the fused and the plain call)."""
    assert_parity(autocast_wrapped(fused, device, dtype), autocast_wrapped(plain, device, dtype), args,
                  grad_args=grad_args)


@pytest.mark.parametrize("backend, device, dtype", autocast_params("scaled_dot_product_attention"))
@pytest.mark.parametrize("mask_kind", ["none", "padding", "bias"])
def test_attention(backend, device, dtype, mask_kind):
    q, k, v = (randn(2, 2, 33, 16, device=device, seed=i) for i in range(3))
    mask = None
    if mask_kind == "padding":
        mask = torch.ones(2, 1, 1, 33, dtype=torch.bool, device=device)
        mask[1, ..., 20:] = False
    elif mask_kind == "bias":
        mask = randn(2, 1, 33, 33, device=device, seed=3)
    causal = mask_kind == "none"
    check_op(
        lambda query, key, value, attn_mask: fused_attn.scaled_dot_product_attention(
            query, key, value, attn_mask, is_causal=causal, backend=backend),
        lambda query, key, value, attn_mask: F.scaled_dot_product_attention(
            query, key, value, attn_mask, is_causal=causal),
        {"query": q, "key": k, "value": v, "attn_mask": mask}, device, dtype,
        ("query", "key", "value") + (("attn_mask",) if mask_kind == "bias" else ()),
    )


@pytest.mark.parametrize("backend, device, dtype", autocast_params("layer_norm"))
@pytest.mark.parametrize("input_dtype", ["float32", "autocast"], ids=["f32-input", "low-input"])
def test_layer_norm(backend, device, dtype, input_dtype):
    # A low-precision input with float32 parameters is what a LayerNorm after a linear layer sees.
    x = randn(6, 40, device=device, dtype=torch.float32 if input_dtype == "float32" else dtype)
    w, b = randn(40, device=device, seed=1), randn(40, device=device, seed=2)
    check_op(
        lambda input, weight, bias: fused_attn.layer_norm(input, (40,), weight, bias, backend=backend),
        lambda input, weight, bias: F.layer_norm(input, (40,), weight, bias),
        {"input": x, "weight": w, "bias": b}, device, dtype, ("input", "weight", "bias"),
    )


@pytest.mark.parametrize("backend, device, dtype", autocast_params("softmax"))
@pytest.mark.parametrize("input_dtype", ["float32", "autocast"], ids=["f32-input", "low-input"])
def test_softmax(backend, device, dtype, input_dtype):
    x = randn(3, 5, 24, device=device, dtype=torch.float32 if input_dtype == "float32" else dtype) * 3
    check_op(
        lambda input: fused_attn.softmax(input, -1, backend=backend),
        lambda input: torch.softmax(input, -1),
        {"input": x}, device, dtype, ("input",),
    )


@pytest.mark.parametrize("backend, device, dtype", autocast_params("linear_gelu"))
def test_linear_gelu(backend, device, dtype):
    x, w, b = randn(7, 24, device=device), randn(40, 24, device=device, seed=1) * 0.2, randn(40, device=device, seed=2)
    check_op(
        lambda input, weight, bias: fused_attn.linear_gelu(input, weight, bias, backend=backend),
        lambda input, weight, bias: F.gelu(F.linear(input, weight, bias)),
        {"input": x, "weight": w, "bias": b}, device, dtype, ("input", "weight", "bias"),
    )


@pytest.mark.parametrize("backend, device, dtype", autocast_params("ffn"))
def test_ffn(backend, device, dtype):
    args = {"input": randn(7, 24, device=device), "w1": randn(48, 24, device=device, seed=1) * 0.2,
            "b1": randn(48, device=device, seed=2), "w2": randn(24, 48, device=device, seed=3) * 0.2,
            "b2": randn(24, device=device, seed=4)}
    check_op(
        lambda input, w1, b1, w2, b2: fused_attn.ffn(input, w1, b1, w2, b2, backend=backend),
        lambda input, w1, b1, w2, b2: F.linear(F.gelu(F.linear(input, w1, b1)), w2, b2),
        args, device, dtype, tuple(args),
    )


@pytest.mark.parametrize("backend, device, dtype", autocast_params("add_layer_norm"))
def test_add_layer_norm(backend, device, dtype):
    # A sublayer's output from a linear layer (low precision) onto a float32 residual stream.
    args = {"input": randn(6, 40, device=device, dtype=dtype), "residual": randn(6, 40, device=device, seed=1),
            "weight": randn(40, device=device, seed=2), "bias": randn(40, device=device, seed=3),
            "input_bias": randn(40, device=device, seed=4)}
    check_op(
        lambda input, residual, weight, bias, input_bias: fused_attn.add_layer_norm(
            input, residual, weight, bias, input_bias=input_bias, backend=backend),
        lambda input, residual, weight, bias, input_bias: F.layer_norm(
            residual + (input + input_bias), (40,), weight, bias),
        args, device, dtype, tuple(args),
    )


# ---- modules


def _fused_copy(module: nn.Module, backend: str) -> nn.Module:
    return fused_attn.optimize(copy.deepcopy(module), backend=backend).model


def check_module(plain: nn.Module, backend: str, device: str, dtype: torch.dtype, run) -> None:
    """``run(model)`` under autocast: the output dtype of the fused copy is the plain module's,
    and the fused copy passes whole-model parity (output and every parameter gradient)."""
    fused = _fused_copy(plain, backend)

    def run_autocast(model):
        # The float64 truth model runs with float64 inputs, which autocast leaves alone.
        with torch.autocast(device, dtype=dtype):
            return run(model, next(model.parameters()).dtype)

    with torch.no_grad():
        assert run_autocast(fused).dtype == run_autocast(plain).dtype
    assert_model_parity(plain, fused, run_autocast)


@pytest.mark.parametrize("backend, device, dtype", autocast_params("scaled_dot_product_attention"))
@pytest.mark.parametrize("need_weights", [False, True], ids=["flash", "weights"])
def test_multihead_attention(backend, device, dtype, need_weights):
    torch.manual_seed(0)
    plain = nn.MultiheadAttention(32, 4, batch_first=True, device=device)
    pad = torch.zeros(2, 11, dtype=torch.bool, device=device)
    pad[0, 8:] = True

    def outputs(model, param_dtype):
        x = randn(2, 11, 32, device=device, seed=1, dtype=param_dtype)
        return model(x, x, x, key_padding_mask=pad, need_weights=need_weights)

    with torch.no_grad(), torch.autocast(device, dtype=dtype):
        got, want = outputs(_fused_copy(plain, backend), torch.float32), outputs(plain, torch.float32)
    assert [None if t is None else t.dtype for t in got] == [None if t is None else t.dtype for t in want]
    check_module(plain, backend, device, dtype, lambda model, param_dtype: outputs(model, param_dtype)[0])


@pytest.mark.parametrize("backend, device, dtype", autocast_params("layer_norm"))
def test_layer_norm_module(backend, device, dtype):
    torch.manual_seed(0)
    plain = nn.LayerNorm(40, device=device)
    nn.init.normal_(plain.weight)
    nn.init.normal_(plain.bias)

    def run(model, param_dtype):
        # Fed by a linear layer, as in a Transformer: the input is in the autocast dtype.
        x = randn(6, 40, device=device, seed=1, dtype=param_dtype)
        return model(x.to(dtype) if param_dtype != torch.float64 else x)

    check_module(plain, backend, device, dtype, run)


@pytest.mark.parametrize("backend, device, dtype", autocast_params("add_layer_norm"))
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-ln", "pre-ln"])
def test_transformer_encoder_layer(backend, device, dtype, norm_first):
    torch.manual_seed(0)
    plain = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=norm_first, device=device)
    pad = torch.zeros(2, 9, dtype=torch.bool, device=device)
    pad[1, 6:] = True

    def run(model, param_dtype):
        return model(randn(2, 9, 32, device=device, seed=1, dtype=param_dtype), src_key_padding_mask=pad)

    check_module(plain, backend, device, dtype, run)


def test_float64_and_disabled_autocast_are_left_alone():
    x = torch.randn(2, 2, 5, 8, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused_attn.scaled_dot_product_attention(x, x, x, backend="reference").dtype == torch.float64
        with torch.autocast("cpu", enabled=False):
            assert fused_attn.linear_gelu(x.float(), torch.randn(3, 8), backend="reference").dtype == torch.float32


def test_autocast_compiles_without_graph_breaks():
    if "cpu" not in fused_attn.available_backends("cpu"):
        pytest.skip("the cpu backend is not available here")
    w = torch.randn(8, 8)

    def fn(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fused_attn.linear_gelu(x, w, backend="cpu") + fused_attn.layer_norm(x, 8, backend="cpu")

    torch._dynamo.reset()
    x = torch.randn(4, 8)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(x)
    assert compiled.dtype == torch.float32
    torch.testing.assert_close(compiled, fn(x))


def _native_ops() -> list[str]:
    from fused_attn import _extension

    return native_ops() if _extension.loaded() else []


def test_every_native_op_runs_its_kernels_with_autocast_off():
    # The kernels call ATen (GEMMs): with autocast left on inside them, autocast would recast those
    # calls (csrc/autocast.cpp).
    ops = _native_ops()
    if not ops:
        pytest.skip("the extension is not built")
    for key in ("AutocastCPU", "AutocastCUDA"):
        missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_attn::{op}", key)]
        assert not missing, f"no {key} kernel: {missing}"


@pytest.mark.parametrize("backend_device", backend_params("ffn", exclude=("reference", "triton")))
def test_native_ops_ignore_an_enclosing_autocast(backend_device):
    # A float32 call of the raw ops inside an autocast region computes in float32, bit for bit as
    # outside it: the dtypes are the caller's (the public functions cast under autocast themselves).
    _, device = backend_device
    dtype = torch.bfloat16 if device == "cpu" else torch.float16
    x, w1, b1 = randn(9, 24, device=device), randn(40, 24, device=device, seed=1), randn(40, device=device, seed=2)
    w2, b2 = randn(24, 40, device=device, seed=3), randn(24, device=device, seed=4)
    q, k, v = (randn(1, 2, 9, 16, device=device, seed=s) for s in (5, 6, 7))
    scale = 16 ** -0.5
    calls = {
        "linear_gelu_fwd": lambda: torch.ops.fused_attn.linear_gelu_fwd(x, w1, b1, "none"),
        "linear_gelu_inference": lambda: torch.ops.fused_attn.linear_gelu_inference(x, w1, b1, "none"),
        "ffn_fwd": lambda: torch.ops.fused_attn.ffn_fwd(x, w1, b1, w2, b2, "none", 0.0, None),
        "layer_norm_fwd": lambda: torch.ops.fused_attn.layer_norm_fwd(x, b2, b2, 1e-5),
    }
    if device == "cpu":  # the cuda attention kernels take 16-bit inputs only
        calls["attention_fwd"] = lambda: torch.ops.fused_attn.attention_fwd(q, k, v, None, scale, False, 0.0, None)
    for name, call in calls.items():
        outside = call()
        with torch.autocast(device, dtype=dtype):
            inside = call()
        for a, b in zip(outside if isinstance(outside, tuple) else (outside,),
                        inside if isinstance(inside, tuple) else (inside,)):
            assert b.dtype == a.dtype == torch.float32, name
            assert torch.equal(a, b), f"{name} computes differently inside an autocast region"
