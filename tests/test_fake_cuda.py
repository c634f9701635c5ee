"""The Python side of the CUDA paths, without a GPU: the public ops, the autocast policy, a fused
module and an ``optimize()``d BERT run on fake CUDA tensors (``FakeTensorMode``: shapes, dtypes
and devices propagate through every op's fake kernel, no kernel runs). This covers what a GPU run
would hit before any kernel (validation, backend choice for CUDA tensors, the CUDA autocast
dtypes, the fake kernels' shapes, a whole-graph export) on every machine; on a machine with a GPU
the same tests run against its real properties. Numbers come from the parity tests on a GPU.

Without a GPU, ``torch.autocast("cuda")`` is made while ``torch.cuda.is_available`` says True
(else it disables itself) and stands in an sm90 device that supports bfloat16; nothing else is
stood in for (with ``is_available`` True throughout, some fake ops would initialise CUDA).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import fused_attn
from fused_attn import backends
from fused_attn.models import BertConfig, BertModel
from fused_attn.ops import _random

from .conftest import HAS_CUDA

GPU_BACKENDS = ("cuda", "triton")


@pytest.fixture
def fake_cuda():
    """A FakeTensorMode in which CUDA tensors can be made on this machine."""
    if not torch.backends.cuda.is_built():
        pytest.skip("this torch is built without CUDA: no CUDA tensors, fake or not")
    with FakeTensorMode() as mode:
        yield mode


def cuda_autocast(dtype: torch.dtype, monkeypatch) -> torch.autocast:
    if HAS_CUDA:
        return torch.autocast("cuda", dtype=dtype)
    with monkeypatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: True)
        patch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
        patch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
        return torch.autocast("cuda", dtype=dtype)


def usable(op: str, backend: str, dtype: torch.dtype) -> bool:
    support = backends.registered_ops()[op].supports[backend]
    return not support.unavailable_reasons(torch.device("cuda")) and dtype in support.dtypes


def expected_auto(op: str, dtype: torch.dtype) -> str:
    """What ``auto`` must take for CUDA inputs of ``dtype``: cuda, then triton, else reference."""
    return next((b for b in GPU_BACKENDS if usable(op, b, dtype)), "reference")


def cuda_randn(*shape, dtype=torch.float32, grad=False):
    return torch.randn(shape, device="cuda", dtype=dtype, requires_grad=grad)


# Each case: op name, the fused call, the PyTorch counterpart and the input shapes. Masks are made
# in the case: a key padding mask read through strides, a float bias.
def _attention(backend, dtype):
    q, k, v = cuda_randn(2, 3, 77, 64, dtype=dtype), cuda_randn(2, 3, 33, 64, dtype=dtype), cuda_randn(2, 3, 33, 40, dtype=dtype)
    bias = cuda_randn(2, 1, 77, 33, dtype=dtype)
    fused = fused_attn.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=0.1, backend=backend)
    return fused, F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def _attention_causal_padding(backend, dtype):
    q = cuda_randn(2, 4, 17, 128, dtype=dtype)
    pad = torch.empty(2, 1, 1, 17, device="cuda", dtype=torch.bool)
    fused = fused_attn.scaled_dot_product_attention(q, q, q, attn_mask=pad, is_causal=True, backend=backend)
    return fused, F.scaled_dot_product_attention(q, q, q, is_causal=True)


def _softmax(backend, dtype):
    x = cuda_randn(2, 3, 77, 33, dtype=dtype)
    pad = torch.empty(2, 1, 1, 33, device="cuda", dtype=torch.bool)
    return fused_attn.softmax(x, mask=pad, scale=0.5, backend=backend), torch.softmax(x * 0.5, -1)


def _layer_norm(backend, dtype):
    x, w, b = cuda_randn(3, 7, 768, dtype=dtype), cuda_randn(768, dtype=dtype), cuda_randn(768, dtype=dtype)
    return fused_attn.layer_norm(x, (768,), w, b, backend=backend), F.layer_norm(x, (768,), w, b)


def _add_layer_norm(backend, dtype):
    x, r = cuda_randn(3, 7, 1000, dtype=dtype), cuda_randn(3, 7, 1000, dtype=dtype)
    w, b, ib = (cuda_randn(1000, dtype=dtype) for _ in range(3))
    fused = fused_attn.add_layer_norm(x, r, w, b, dropout_p=0.1, input_bias=ib, backend=backend)
    return fused, F.layer_norm(r + F.dropout(x + ib, 0.1), (1000,), w, b)


def _linear_gelu(backend, dtype):
    x, w, b = cuda_randn(3, 7, 64, dtype=dtype), cuda_randn(200, 64, dtype=dtype), cuda_randn(200, dtype=dtype)
    return fused_attn.linear_gelu(x, w, b, approximate="tanh", backend=backend), F.gelu(F.linear(x, w, b), approximate="tanh")


def _ffn(backend, dtype):
    x, w1, b1 = cuda_randn(5, 64, dtype=dtype), cuda_randn(256, 64, dtype=dtype), cuda_randn(256, dtype=dtype)
    w2, b2 = cuda_randn(48, 256, dtype=dtype), cuda_randn(48, dtype=dtype)
    fused = fused_attn.ffn(x, w1, b1, w2, b2, dropout_p=0.1, backend=backend)
    return fused, F.dropout(F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2), 0.1)


CASES = {
    "attention": ("scaled_dot_product_attention", _attention),
    "attention_padding": ("scaled_dot_product_attention", _attention_causal_padding),
    "softmax": ("softmax", _softmax),
    "layer_norm": ("layer_norm", _layer_norm),
    "add_layer_norm": ("add_layer_norm", _add_layer_norm),
    "linear_gelu": ("linear_gelu", _linear_gelu),
    "ffn": ("ffn", _ffn),
}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("backend", [*GPU_BACKENDS, "auto"])
@pytest.mark.parametrize("case", list(CASES))
def test_ops_on_cuda_tensors(fake_cuda, case, backend, dtype_name):
    op, run = CASES[case]
    dtype = DTYPES[dtype_name]
    if backend != "auto" and not usable(op, backend, dtype):
        with pytest.raises(backends.BackendNotSupportedError, match=f"backend '{backend}' cannot serve"):
            run(backend, dtype)
        return
    fused, plain = run(backend, dtype)
    assert (fused.shape, fused.dtype, fused.device) == (plain.shape, plain.dtype, plain.device)
    assert fused_attn.last_backend(op) == (expected_auto(op, dtype) if backend == "auto" else backend)


@pytest.mark.parametrize("inputs_in", ["float32", "autocast_dtype"])
@pytest.mark.parametrize("autocast_dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("backend", [*GPU_BACKENDS, "auto"])
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_autocast_gives_pytorchs_dtypes(fake_cuda, monkeypatch, case, backend, autocast_dtype, inputs_in):
    """Under CUDA autocast, from float32 or low-precision inputs: attention, linear_gelu and ffn
    run in the autocast dtype, the norms and softmax in float32, as their PyTorch counterparts."""
    op, run = CASES[case]
    input_dtype = torch.float32 if inputs_in == "float32" else autocast_dtype
    run_dtype = torch.float32 if op in ("layer_norm", "add_layer_norm", "softmax") else autocast_dtype
    if backend != "auto" and not usable(op, backend, run_dtype):
        pytest.skip(f"{backend} does not serve {op} in {run_dtype} here")
    with cuda_autocast(autocast_dtype, monkeypatch):
        fused, plain = run(backend, input_dtype)
    assert fused.dtype == plain.dtype == run_dtype
    assert fused_attn.last_backend(op) == (expected_auto(op, run_dtype) if backend == "auto" else backend)


def on_fake_gpu(make, dtype):
    """A module whose parameters and buffers are fake CUDA tensors (floating ones in ``dtype``).
    It is built on the meta device and given new tensors: random initialisation, ``.to("cuda")``
    and ``.to_empty`` of a fake module would each initialise CUDA or refuse to swap fakes. The
    parameters do not require grad: autograd on CUDA tensors needs a device (forward only here)."""
    with torch.device("meta"):
        module = make()
    for sub in module.modules():
        for name, p in sub._parameters.items():
            if p is not None:
                sub._parameters[name] = nn.Parameter(torch.empty(p.shape, device="cuda", dtype=dtype), False)
        for name, b in sub._buffers.items():
            if b is not None:
                sub._buffers[name] = torch.empty(b.shape, device="cuda", dtype=dtype if b.is_floating_point() else b.dtype)
    return module


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_optimized_modules_on_cuda_tensors(fake_cuda, dtype):
    """A torch.nn encoder layer and the reference BERT, optimize()d and cast for a GPU, run the
    fused ops there (the attention on the cuda backend where the extension has its kernels)."""
    make = dict(dropout=0.1, batch_first=True, activation="gelu")
    layer, plain_layer = on_fake_gpu(lambda: nn.TransformerEncoderLayer(64, 4, 128, **make), dtype), on_fake_gpu(
        lambda: nn.TransformerEncoderLayer(64, 4, 128, **make), dtype)
    report = fused_attn.optimize(layer)
    assert not report.kept, report
    x = cuda_randn(2, 9, 64, dtype=dtype)
    pad = torch.empty(2, 9, device="cuda", dtype=torch.bool)
    out = layer(x, src_key_padding_mask=pad)
    assert (out.shape, out.dtype, out.device) == (plain_layer(x, src_key_padding_mask=pad).shape, dtype, x.device)
    assert fused_attn.last_backend("scaled_dot_product_attention") == expected_auto("scaled_dot_product_attention", dtype)
    assert fused_attn.last_backend("add_layer_norm") == expected_auto("add_layer_norm", dtype)

    config = BertConfig.bert_tiny(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = on_fake_gpu(lambda: BertModel(config), dtype)
    assert not fused_attn.optimize(model).kept
    ids = torch.empty(2, 13, device="cuda", dtype=torch.long)
    mask = torch.empty(2, 13, device="cuda", dtype=torch.long)
    hidden = model(ids, attention_mask=mask).last_hidden_state
    assert (hidden.shape, hidden.dtype, hidden.device) == ((2, 13, config.hidden_size), dtype, ids.device)
    assert fused_attn.last_backend("scaled_dot_product_attention") == expected_auto("scaled_dot_product_attention", dtype)


def test_export_whole_graph_on_cuda_tensors(fake_cuda):
    """torch.export (one graph, no breaks) of the fused ops on CUDA inputs: one node per op."""

    class Block(nn.Module):
        def forward(self, q, x, w, b, w1, w2):
            a = fused_attn.scaled_dot_product_attention(q, q, q, is_causal=True)
            h = fused_attn.add_layer_norm(x, a.transpose(1, 2).flatten(2), w, b)
            return fused_attn.ffn(h, w1, None, w2, None)

    args = (cuda_randn(2, 4, 16, 16, dtype=torch.float16), cuda_randn(2, 16, 64, dtype=torch.float16),
            cuda_randn(64, dtype=torch.float16), cuda_randn(64, dtype=torch.float16),
            cuda_randn(128, 64, dtype=torch.float16), cuda_randn(64, 128, dtype=torch.float16))
    graph = torch.export.export(Block(), args).graph
    targets = [str(n.target) for n in graph.nodes if n.op == "call_function" and "fused_attn" in str(n.target)]
    assert len(targets) == 3, targets


@pytest.mark.parametrize("case", ["attention", "add_layer_norm", "ffn"])
def test_dropout_draws_its_seed_on_the_inputs_device(fake_cuda, monkeypatch, case):
    """A call with dropout on CUDA tensors draws its seed on their device (a draw that a captured
    CUDA graph replays anew, read by the kernels when they run: tests/test_random.py replays a real
    graph on a GPU) and runs fused on every fused backend, with no fallback."""
    import importlib

    if HAS_CUDA:
        pytest.skip("on a GPU, tests/test_random.py captures a real graph")
    op, make = CASES[case]
    module = importlib.import_module(f"fused_attn.ops.{'attention' if case == 'attention' else case}")
    drawn = []
    monkeypatch.setattr(module, "draw_seed", lambda p, like: drawn.append(_random.draw_seed(p, like)) or drawn[-1])
    monkeypatch.setattr(backends, "_warned", set())
    backends.clear_choices()
    with warnings.catch_warnings():
        warnings.simplefilter("error", backends.FallbackWarning)
        make(None, torch.float16)
        assert backends.last_backend(op) == expected_auto(op, torch.float16)
        for name in GPU_BACKENDS:
            if usable(op, name, torch.float16):
                make(name, torch.float16)
                assert backends.last_backend(op) == name
    assert drawn and all(seed.device.type == "cuda" and seed.dtype == torch.int64 for seed in drawn)
