"""The public ops' C++ entry for the plain call (csrc/fast.cpp, fused_attn.backends.fast_entry).

Every case is called twice after the remembered choices are forgotten: the first call takes the
Python path (validation, the policy's choice, which approves the kind of call for the entry), the
second the C++ entry, when the policy chose the extension's kernel. Both calls must give the same
bits: output, its strides, every gradient, the dropout draw after the same seed. Calls that are
not plain (a backend asked for, a mode, a transform, autocast, a dtype or a number the Python path
converts, a learned mask, nothing to compute) are left to the Python path, which must then serve
them as before, errors and their messages included.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fused_attn
from fused_attn import backends

from .conftest import HAS_CUDA

pytestmark = pytest.mark.skipif(backends.fast_entry("layer_norm") is None,
                                reason="fused_attn._C is not loaded, or has no C++ entry")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _served(op: str) -> int:
    return backends._FAST.served()[op]


def _tensor(gen: torch.Generator, shape, device, dtype=torch.float32, *, grad=False, scale=1.0) -> torch.Tensor:
    t = (torch.randn(shape, generator=gen) * scale).to(device=device, dtype=dtype)
    return t.requires_grad_(grad)


def _run(fn, make, gen_seed: int):
    """One call of ``fn(*make(generator))`` with the RNG seeded, then its backward (where any
    input requires grad): (output(s), their strides, input gradients)."""
    args, kwargs = make(torch.Generator().manual_seed(gen_seed))
    torch.manual_seed(1234)
    out = fn(*args, **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    leaves += [v for v in kwargs.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    grads = []
    if leaves:
        gen = torch.Generator().manual_seed(7)
        upstream = [torch.randn(o.shape, generator=gen).to(o) for o in outs]
        grads = torch.autograd.grad(outs, leaves, upstream, allow_unused=True)
    return outs, [o.stride() for o in outs], grads


def _assert_same_bits(first, second):
    (outs1, strides1, grads1), (outs2, strides2, grads2) = first, second
    assert strides1 == strides2
    for a, b in zip(outs1 + tuple(grads1), outs2 + tuple(grads2)):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape
            assert torch.equal(a, b), (a - b).abs().max()


def check_served(op: str, fn, make, *, device: str) -> None:
    """``fn`` called twice on the same values: the second call is served by the C++ entry
    exactly when the first was served by the extension's kernel, with the same bits."""
    backends.clear_choices()
    before = _served(op)
    first = _run(fn, make, 0)
    assert _served(op) == before, "a first call is never served before the policy approved it"
    native = fused_attn.last_backend(op) in ("cpu", "cuda")
    second = _run(fn, make, 0)
    assert _served(op) == before + native
    if native:
        assert fused_attn.last_backend(op) == device
    if device == "cpu":
        assert native, f"{op} on CPU tensors should run the cpu backend here"
    _assert_same_bits(first, second)


# ---------------------------------------------------------------------------------------------
# Calls the entry serves


LAYER_NORM_CASES = {
    "3d": lambda g, d, t: (((_tensor(g, (2, 5, 64), d, t, grad=True), (64,), _tensor(g, 64, d, t, grad=True),
                             _tensor(g, 64, d, t, grad=True), 1e-5)), {}),
    "two-dims-list": lambda g, d, t: (((_tensor(g, (3, 4, 6), d, t, grad=True), [4, 6],
                                        _tensor(g, (4, 6), d, t, grad=True), _tensor(g, (4, 6), d, t))), {}),
    "int-shape-no-affine": lambda g, d, t: ((_tensor(g, (7, 32), d, t, grad=True), 32), {"eps": 0}),
    "transposed": lambda g, d, t: ((_tensor(g, (32, 7), d, t).t().requires_grad_(), (32,),
                                    _tensor(g, 32, d, t), None), {}),
    "torch-size": lambda g, d, t: ((_tensor(g, (2, 3, 16), d, t, grad=True), torch.Size([3, 16])), {}),
    "inference": lambda g, d, t: ((_tensor(g, (4, 48), d, t), (48,), _tensor(g, 48, d, t),
                                   _tensor(g, 48, d, t)), {}),
    "float32-params": lambda g, d, t: ((_tensor(g, (4, 40), d, t, grad=True), (40,),
                                        _tensor(g, 40, d, grad=True), _tensor(g, 40, d, grad=True)), {}),
}


def _add_norm_args(g, d, t, *, grad, shape=(2, 5, 64), input_bias=True, params=True):
    hidden = shape[-1]
    x, res = _tensor(g, shape, d, t, grad=grad), _tensor(g, shape, d, t, grad=grad)
    w, b = (_tensor(g, hidden, d, t, grad=grad), _tensor(g, hidden, d, t, grad=grad)) if params else (None, None)
    ib = _tensor(g, hidden, d, t, grad=grad) if input_bias else None
    return x, res, w, b, ib


ADD_NORM_CASES = {
    "dropout": lambda g, d, t: (lambda a: ((*a[:4], 1e-5, 0.1), {"input_bias": a[4]}))(
        _add_norm_args(g, d, t, grad=True)),
    "prenorm": lambda g, d, t: (_add_norm_args(g, d, t, grad=True)[:4],
                                {"dropout_p": 0.2, "return_prenorm": True}),
    "inference": lambda g, d, t: (_add_norm_args(g, d, t, grad=False, shape=(6, 32))[:4], {"eps": 1e-6}),
    "inference-dropout": lambda g, d, t: (_add_norm_args(g, d, t, grad=False, params=False)[:4],
                                          {"dropout_p": 0.3, "input_bias": _tensor(g, 64, d, t)}),
    "strided-residual": lambda g, d, t: ((_tensor(g, (8, 24), d, t, grad=True),
                                          _tensor(g, (24, 8), d, t).t().requires_grad_(), None, None), {}),
}


SOFTMAX_CASES = {
    "4d-bool-mask": lambda g, d, t: ((_tensor(g, (2, 3, 5, 7), d, t, grad=True), -1,
                                      torch.rand(2, 1, 1, 7, generator=g).to(d) > 0.3, 0.5), {}),
    "4d-causal": lambda g, d, t: ((_tensor(g, (2, 3, 5, 7), d, t, grad=True),), {"is_causal": True, "scale": 2}),
    "2d-float-mask": lambda g, d, t: ((_tensor(g, (5, 7), d, t, grad=True), 1, _tensor(g, 7, d, t)), {}),
    "3d-inference": lambda g, d, t: ((_tensor(g, (2, 5, 9), d, t), 2), {"is_causal": True}),
    "1d": lambda g, d, t: ((_tensor(g, (11,), d, t, grad=True),), {}),
}


def _qkv(g, d, t, *, q_len=5, k_len=5, heads=3, kv_heads=None, dim=16, dim_v=None, grad=True, batch=2):
    kv_heads = heads if kv_heads is None else kv_heads
    return (_tensor(g, (batch, heads, q_len, dim), d, t, grad=grad),
            _tensor(g, (batch, kv_heads, k_len, dim), d, t, grad=grad),
            _tensor(g, (batch, kv_heads, k_len, dim if dim_v is None else dim_v), d, t, grad=grad))


def _heads_split(g, d, t):
    """q, k, v split off [B, L, H * D] projections: strided [B, H, L, D] views."""
    x = _tensor(g, (2, 6, 3, 16), d, t, grad=True)
    y = _tensor(g, (2, 9, 3, 16), d, t, grad=True)
    return (x.transpose(1, 2), y.transpose(1, 2), (y * 2).transpose(1, 2)), {}


ATTENTION_CASES = {
    "plain": lambda g, d, t: (_qkv(g, d, t), {}),
    "padding-causal-cross": lambda g, d, t: (_qkv(g, d, t, k_len=7),
                                             {"attn_mask": torch.rand(2, 1, 1, 7, generator=g).to(d) > 0.3,
                                              "is_causal": True}),
    "float-bias-3d": lambda g, d, t: (_qkv(g, d, t, q_len=4, k_len=6),
                                      {"attn_mask": _tensor(g, (3, 4, 6), d, t), "scale": 0.3}),
    "float64-mask": lambda g, d, t: (_qkv(g, d, t), {"attn_mask": _tensor(g, (5, 5), d, torch.float64)}),
    "gqa": lambda g, d, t: (_qkv(g, d, t, heads=4, kv_heads=2), {"enable_gqa": True, "is_causal": True}),
    "head-dims-differ": lambda g, d, t: (_qkv(g, d, t, dim=32, dim_v=8), {"scale": 1}),
    "dropout": lambda g, d, t: (_qkv(g, d, t, q_len=9, k_len=9), {"dropout_p": 0.25}),
    "heads-split": _heads_split,
    "inference": lambda g, d, t: (_qkv(g, d, t, grad=False, q_len=1), {}),
}


LINEAR_GELU_CASES = {
    "3d": lambda g, d, t: ((_tensor(g, (2, 5, 32), d, t, grad=True), _tensor(g, (48, 32), d, t, grad=True),
                            _tensor(g, 48, d, t, grad=True)), {}),
    "tanh-no-bias": lambda g, d, t: ((_tensor(g, (6, 32), d, t, grad=True), _tensor(g, (40, 32), d, t)),
                                     {"approximate": "tanh"}),
    "1d-inference": lambda g, d, t: ((_tensor(g, (32,), d, t), _tensor(g, (24, 32), d, t), _tensor(g, 24, d, t)),
                                     {}),
    "strided-weight": lambda g, d, t: ((_tensor(g, (3, 16), d, t, grad=True),
                                        _tensor(g, (16, 20), d, t).t().requires_grad_()), {}),
}


def _ffn_args(g, d, t, *, grad, rows=(2, 5), model=32, hidden=64, out=24, biases=True):
    x = _tensor(g, (*rows, model), d, t, grad=grad)
    w1, w2 = _tensor(g, (hidden, model), d, t, grad=grad, scale=0.2), _tensor(g, (out, hidden), d, t, grad=grad)
    b1, b2 = (_tensor(g, hidden, d, t, grad=grad), _tensor(g, out, d, t, grad=grad)) if biases else (None, None)
    return x, w1, b1, w2, b2


FFN_CASES = {
    "dropout": lambda g, d, t: (_ffn_args(g, d, t, grad=True), {"dropout_p": 0.1}),
    "tanh-no-biases": lambda g, d, t: (_ffn_args(g, d, t, grad=True, biases=False), {"approximate": "tanh"}),
    "inference": lambda g, d, t: (_ffn_args(g, d, t, grad=False, rows=(7,)), {}),
    "inference-dropout": lambda g, d, t: (_ffn_args(g, d, t, grad=False), {"dropout_p": 0.5}),
}


# op -> (its public function, its cases, the 16-bit dtype run besides float32)
OPS = {
    "layer_norm": (fused_attn.layer_norm, LAYER_NORM_CASES, torch.bfloat16),
    "add_layer_norm": (fused_attn.add_layer_norm, ADD_NORM_CASES, torch.float16),
    "softmax": (fused_attn.softmax, SOFTMAX_CASES, torch.float16),
    "scaled_dot_product_attention": (fused_attn.scaled_dot_product_attention, ATTENTION_CASES, torch.float16),
    "linear_gelu": (fused_attn.linear_gelu, LINEAR_GELU_CASES, torch.bfloat16),
    "ffn": (fused_attn.ffn, FFN_CASES, torch.float16),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float32", "16-bit"])
@pytest.mark.parametrize("op, case", [(op, case) for op, (_, cases, _) in OPS.items() for case in cases])
def test_plain_calls_are_served_with_the_same_bits(op, case, dtype, device):
    fn, cases, half = OPS[op]
    dtype = torch.float32 if dtype == "float32" else half
    check_served(op, fn, lambda g: cases[case](g, device, dtype), device=device)


def test_served_calls_record_their_backend_and_forget_with_the_choices():
    x, w = torch.randn(4, 16), torch.ones(16)
    backends.clear_choices()
    fused_attn.layer_norm(x, (16,), w)
    fused_attn.softmax(x)  # another op last
    before = _served("layer_norm")
    backends._last_choice.pop("layer_norm")
    fused_attn.layer_norm(x, (16,), w)
    assert _served("layer_norm") == before + 1 and fused_attn.last_backend("layer_norm") == "cpu"
    backends.clear_choices()
    fused_attn.layer_norm(x, (16,), w)
    assert _served("layer_norm") == before + 1  # forgotten: the Python path again, which approves anew
    fused_attn.layer_norm(x, (16,), w)
    assert _served("layer_norm") == before + 2


def test_each_shape_is_approved_for_itself():
    """The approval covers the features the policy decided on (here the head dims): another head
    dim is decided by the policy first, a head dim the cpu kernels do not take never comes here."""
    backends.clear_choices()
    q = torch.randn(1, 2, 3, 16)
    fused_attn.scaled_dot_product_attention(q, q, q)
    before = _served("scaled_dot_product_attention")
    wide = torch.randn(1, 2, 3, 32)
    fused_attn.scaled_dot_product_attention(wide, wide, wide)
    assert _served("scaled_dot_product_attention") == before
    too_wide = torch.randn(1, 1, 2, 300)
    for _ in range(2):
        with pytest.warns(backends.FallbackWarning) if _ == 0 else warnings.catch_warnings():
            out = fused_attn.scaled_dot_product_attention(too_wide, too_wide, too_wide)
        assert fused_attn.last_backend("scaled_dot_product_attention") == "reference"
        assert out.shape == too_wide.shape
    assert _served("scaled_dot_product_attention") == before


# ---------------------------------------------------------------------------------------------
# Calls left to the Python path


class _Subclass(torch.Tensor):
    pass


class _NoOpDispatchMode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _approved_layer_norm_call():
    x, w = torch.randn(4, 16), torch.randn(16)
    backends.clear_choices()
    fused_attn.layer_norm(x, (16,), w)
    return x, w


@pytest.mark.parametrize("context", [
    "backend-argument", "use_backend", "environment", "autocast", "torch-function-mode", "dispatch-mode",
    "forward-ad", "func-grad", "vmap", "numpy-eps", "subclass", "inference-tensor-ok",
])
def test_calls_that_are_not_plain_take_the_python_path(context, monkeypatch):
    x, w = _approved_layer_norm_call()
    expected = torch.nn.functional.layer_norm(x, (16,), w)
    before = _served("layer_norm")
    call = lambda t=x, **kw: fused_attn.layer_norm(t, (16,), w, **kw)  # noqa: E731
    if context == "backend-argument":
        out = call(backend="cpu")
    elif context == "use_backend":
        with fused_attn.use_backend("cpu"):
            out = call()
    elif context == "environment":
        monkeypatch.setenv(backends.ENV_VAR, "cpu")
        out = call()
    elif context == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = call()
    elif context == "torch-function-mode":
        with torch.device("cpu"):
            out = call()
    elif context == "dispatch-mode":
        with _NoOpDispatchMode():
            out = call()
    elif context == "forward-ad":
        import torch.autograd.forward_ad as fwAD

        with fwAD.dual_level():
            out = fwAD.unpack_dual(call(fwAD.make_dual(x, torch.ones_like(x)))).primal
    elif context == "func-grad":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", backends.FallbackWarning)
            torch.func.grad(lambda t: call(t).sum())(x)
        out = expected
    elif context == "vmap":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = torch.vmap(call)(x)
    elif context == "numpy-eps":
        out = fused_attn.layer_norm(x, (16,), w, eps=np.float64(1e-5))
    elif context == "subclass":
        out = call(x.as_subclass(_Subclass))
    else:  # an inference tensor is plain: served
        with torch.inference_mode():
            out = call(x.clone())
        torch.testing.assert_close(out, expected)
        assert _served("layer_norm") == before + 1
        return
    torch.testing.assert_close(out, expected, atol=2e-2 if context == "autocast" else 1e-5, rtol=0.02)
    assert _served("layer_norm") == before


def test_jit_trace_still_refused():
    x, w = _approved_layer_norm_call()
    with pytest.raises(TypeError, match="torch.jit.trace"):
        torch.jit.trace(lambda t: fused_attn.layer_norm(t, (16,), w), (x,))


def test_learned_masks_empty_inputs_and_full_dropout_take_the_python_path(monkeypatch):
    monkeypatch.setattr(backends, "_warned", set())  # the float64 fallback below warns, whatever ran before
    q = torch.randn(1, 2, 3, 8)
    backends.clear_choices()
    fused_attn.scaled_dot_product_attention(q, q, q)
    before = _served("scaled_dot_product_attention")
    bias = torch.zeros(3, 3, requires_grad=True)
    out = fused_attn.scaled_dot_product_attention(q, q, q, bias)
    out.sum().backward()
    assert bias.grad is not None
    empty = fused_attn.scaled_dot_product_attention(q[:, :, :0], q, q)
    assert empty.shape == (1, 2, 0, 8)
    zeros = fused_attn.scaled_dot_product_attention(q, q, q, dropout_p=1.0)
    assert torch.equal(zeros, torch.zeros_like(zeros))
    with pytest.warns(backends.FallbackWarning):
        fused_attn.scaled_dot_product_attention(q.double(), q.double(), q.double())
    assert _served("scaled_dot_product_attention") == before


@pytest.mark.parametrize("call, error, match", [
    (lambda q, m: fused_attn.scaled_dot_product_attention(q, q.half(), q), TypeError, "key dtype float16"),
    (lambda q, m: fused_attn.scaled_dot_product_attention(q, q[0], q), ValueError, "key must be 4-D"),
    (lambda q, m: fused_attn.scaled_dot_product_attention(q, q, q, m[:, :2]), ValueError, "does not broadcast"),
    (lambda q, m: fused_attn.scaled_dot_product_attention(q, q, q, m.long()), TypeError, "attn_mask must be a bool"),
    (lambda q, m: fused_attn.scaled_dot_product_attention(q, q, q, dropout_p=1.5), ValueError, "dropout_p"),
    (lambda q, m: fused_attn.scaled_dot_product_attention(q, q, q, scale=float("nan")), ValueError, "scale"),
    (lambda q, m: fused_attn.scaled_dot_product_attention(q, q, q, is_causal=1), TypeError, "is_causal"),
    (lambda q, m: fused_attn.scaled_dot_product_attention(q, q[:, :1], q[:, :1]), ValueError, "enable_gqa=True"),
    (lambda q, m: fused_attn.layer_norm(q, (8,), torch.ones(7)), ValueError, "weight must have shape"),
    (lambda q, m: fused_attn.layer_norm(q, (8,), eps=-1.0), ValueError, "eps"),
    (lambda q, m: fused_attn.softmax(q, dim=4), ValueError, "dim must be an int"),
    (lambda q, m: fused_attn.linear_gelu(q, torch.ones(4, 8), approximate="fast"), ValueError, "approximate"),
    (lambda q, m: fused_attn.ffn(q, torch.ones(4, 8), None, torch.ones(8, 5), None), ValueError, "w2 must have shape"),
    (lambda q, m: fused_attn.add_layer_norm(q, q[0], None, None), ValueError, "residual shape"),
])
def test_bad_input_keeps_its_message_after_approval(call, error, match, monkeypatch):
    """With every op's plain call of these shapes approved, a bad call still reaches the Python
    checks and their messages."""
    q = torch.randn(2, 3, 4, 8)
    mask = torch.rand(2, 3, 4, 4) > 0.5
    backends.clear_choices()
    fused_attn.scaled_dot_product_attention(q, q, q, mask)
    fused_attn.layer_norm(q, (8,))
    fused_attn.softmax(q)
    fused_attn.linear_gelu(q, torch.ones(4, 8))
    fused_attn.ffn(q, torch.ones(4, 8), None, torch.ones(8, 4), None)
    fused_attn.add_layer_norm(q, q, None, None)
    with pytest.raises(error, match=match):
        call(q, mask)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.cuda
def test_cuda_float32_attention_is_left_to_triton():
    """The policy gives float32 attention on CUDA tensors to Triton: never approved for the entry."""
    q = torch.randn(1, 2, 8, 16, device="cuda")
    backends.clear_choices()
    before = _served("scaled_dot_product_attention")
    for _ in range(2):
        fused_attn.scaled_dot_product_attention(q, q, q)
    assert fused_attn.last_backend("scaled_dot_product_attention") != "cuda"
    assert _served("scaled_dot_product_attention") == before


def test_entry_checks_its_argument_count():
    with pytest.raises(TypeError, match="fused_attn._C.layer_norm takes 5 arguments, got 2"):
        backends.fast_entry("layer_norm")(torch.ones(2), 2)


def test_served_calls_run_python_hooks_and_anomaly_mode():
    """The entry drops the GIL while an op runs; what the op calls back into Python (saved-tensor
    hooks, anomaly mode's traceback of the node) takes it back."""
    x, w = torch.randn(4, 16, requires_grad=True), torch.randn(16, requires_grad=True)
    packed = []

    def pack(t):
        packed.append(t.shape)
        return t

    backends.clear_choices()
    before = _served("layer_norm")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anomaly mode says it is slow
        with torch.autograd.detect_anomaly():
            for _ in range(2):
                fused_attn.layer_norm(x, (16,), w).sum().backward()
    assert _served("layer_norm") == before + 1
    assert len(packed) == 8  # input, weight, mean, rstd, in each call


# ---------------------------------------------------------------------------------------------
# Random calls, valid or not: the second call (the entry's, where the first approved) gives the
# first call's bits, or the same error


def _random_attention_call(rng: np.random.Generator):
    batch, kv_heads, group = (int(v) for v in rng.integers(1, 4, size=3))
    heads = kv_heads * group
    q_len, k_len = (int(v) for v in rng.integers(1, 12, size=2))
    dim, dim_v = int(rng.choice([8, 16, 24])), int(rng.choice([8, 16]))
    gen = torch.Generator().manual_seed(int(rng.integers(1 << 30)))

    def t(*shape):
        return torch.randn(*shape, generator=gen).requires_grad_(bool(rng.random() < 0.7))

    q = t(batch, heads, q_len, dim)
    if rng.random() < 0.3:  # heads split off a [B, L, H * D] projection
        q = torch.randn(batch, q_len, heads, dim, generator=gen).transpose(1, 2)
    k, v = t(batch, kv_heads, k_len, dim), t(batch, kv_heads, k_len, dim_v)
    if rng.random() < 0.1:  # a mismatch the Python path names
        k = t(batch, kv_heads, k_len, dim + 8)
    full = (batch, heads, q_len, k_len)
    mask = None
    if rng.random() < 0.6:
        rank = int(rng.integers(0, 5))
        shape = [d if rng.random() < 0.5 else 1 for d in full[4 - rank:]]
        if rng.random() < 0.1 and rank:  # one that does not broadcast
            shape[-1] = k_len + 1
        mask = (torch.rand(tuple(shape), generator=gen) > 0.3 if rng.random() < 0.5
                else torch.randn(tuple(shape), generator=gen).to(rng.choice([torch.float32, torch.float64])))
    kwargs = {
        "attn_mask": mask,
        "dropout_p": float(rng.choice([0.0, 0.0, 0.2])),
        "is_causal": bool(rng.random() < 0.4),
        "scale": None if rng.random() < 0.5 else float(rng.uniform(0.1, 2.0)),
        "enable_gqa": group > 1 or bool(rng.random() < 0.2),
    }
    return (q, k, v), kwargs


def _random_norm_call(rng: np.random.Generator):
    gen = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    lead = [int(v) for v in rng.integers(1, 5, size=int(rng.integers(0, 3)))]
    trailing = [int(v) for v in rng.integers(1, 40, size=int(rng.integers(1, 3)))]
    grad = bool(rng.random() < 0.7)
    x = torch.randn(*lead, *trailing, generator=gen).requires_grad_(grad)
    w = torch.randn(*trailing, generator=gen).requires_grad_(grad) if rng.random() < 0.8 else None
    b = torch.randn(*trailing, generator=gen) if rng.random() < 0.8 else None
    if rng.random() < 0.1 and w is not None:
        w = torch.randn(trailing[-1] + 1, generator=gen)
    shape = trailing if rng.random() < 0.5 else tuple(trailing)
    return (x, shape, w, b), {"eps": float(rng.choice([1e-5, 1e-6, 0.0]))}


def _random_softmax_call(rng: np.random.Generator):
    gen = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    shape = [int(v) for v in rng.integers(1, 7, size=int(rng.integers(1, 5)))]
    x = torch.randn(*shape, generator=gen).requires_grad_(bool(rng.random() < 0.7))
    mask = None
    if rng.random() < 0.6:
        rank = int(rng.integers(0, len(shape) + 1))
        mshape = [d if rng.random() < 0.5 else 1 for d in shape[len(shape) - rank:]]
        mask = (torch.rand(tuple(mshape), generator=gen) > 0.3 if rng.random() < 0.5
                else torch.randn(tuple(mshape), generator=gen))
    causal = len(shape) >= 2 and bool(rng.random() < 0.3)
    return (x, -1, mask, float(rng.uniform(0.2, 2.0)), causal), {}


def _random_add_norm_call(rng: np.random.Generator):
    gen = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    shape = [int(v) for v in rng.integers(1, 5, size=int(rng.integers(0, 3)))] + [int(rng.integers(1, 48))]
    hidden = shape[-1]

    def t(*dims, grad=bool(rng.random() < 0.7)):
        return torch.randn(*dims, generator=gen).requires_grad_(grad)

    x, res = t(*shape), t(*shape)
    if rng.random() < 0.2:  # a residual split off a wider tensor: a strided view
        res = t(*shape[:-1], hidden * 2)[..., ::2]
    w = t(hidden) if rng.random() < 0.8 else None
    b = t(hidden) if w is not None and rng.random() < 0.8 else None
    ib = t(hidden) if rng.random() < 0.5 else None
    if rng.random() < 0.1:  # a mismatch the Python path names
        res = t(*shape[:-1], hidden + 1)
    if rng.random() < 0.05 and w is not None:
        w = t(hidden + 2)
    kwargs = {"input_bias": ib, "return_prenorm": bool(rng.random() < 0.3)}
    return (x, res, w, b, float(rng.choice([1e-5, 1e-12])), float(rng.choice([0.0, 0.0, 0.1, 0.5]))), kwargs


def _random_linear_args(rng: np.random.Generator, gen: torch.Generator, widths):
    """input [..., widths[0]] and, per following width, a weight [width, previous] and a bias
    (or None); a few of them a size off, for errors the Python path names."""
    lead = [int(v) for v in rng.integers(1, 5, size=int(rng.integers(0, 3)))]

    def t(*dims):
        return (torch.randn(*dims, generator=gen) * 0.3).requires_grad_(bool(rng.random() < 0.6))

    out = [t(*lead, widths[0])]
    for previous, width in zip(widths, widths[1:]):
        w = t(width, previous) if rng.random() < 0.8 else t(previous, width).t()  # a transposed view
        if rng.random() < 0.05:
            w = t(width, previous + 1)
        b = None if rng.random() < 0.3 else t(width + int(rng.random() < 0.05))
        out += [w, b]
    return out


def _random_linear_gelu_call(rng: np.random.Generator):
    gen = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    args = _random_linear_args(rng, gen, [int(v) for v in rng.integers(1, 40, size=2)])
    return tuple(args), {"approximate": str(rng.choice(["none", "tanh"]))}


def _random_ffn_call(rng: np.random.Generator):
    gen = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    args = _random_linear_args(rng, gen, [int(v) for v in rng.integers(1, 40, size=3)])
    return tuple(args), {"approximate": str(rng.choice(["none", "tanh"])),
                         "dropout_p": float(rng.choice([0.0, 0.0, 0.2]))}


RANDOM_CALLS = {
    "scaled_dot_product_attention": (fused_attn.scaled_dot_product_attention, _random_attention_call),
    "layer_norm": (fused_attn.layer_norm, _random_norm_call),
    "softmax": (fused_attn.softmax, _random_softmax_call),
    "add_layer_norm": (fused_attn.add_layer_norm, _random_add_norm_call),
    "linear_gelu": (fused_attn.linear_gelu, _random_linear_gelu_call),
    "ffn": (fused_attn.ffn, _random_ffn_call),
}


def _outcome(fn, args, kwargs):
    torch.manual_seed(99)
    try:
        out = fn(*args, **kwargs)
    except (TypeError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    outs = out if isinstance(out, tuple) else (out,)
    leaves = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.requires_grad]
    upstream = [torch.linspace(-1, 1, o.numel()).view(o.shape) for o in outs]
    grads = torch.autograd.grad(outs, leaves, upstream, allow_unused=True) if leaves else ()
    return outs, [o.stride() for o in outs], grads


@pytest.mark.parametrize("op", RANDOM_CALLS)
def test_random_calls_give_the_python_paths_bits_or_error(op):
    fn, make = RANDOM_CALLS[op]
    rng = np.random.default_rng(2026)
    served = 0
    for _ in range(120):
        args, kwargs = make(rng)
        backends.clear_choices()
        before = _served(op)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", backends.FallbackWarning)
            first = _outcome(fn, args, kwargs)
            second = _outcome(fn, args, kwargs)
        served += _served(op) - before
        if isinstance(first, str):
            assert second == first
            continue
        assert not isinstance(second, str), second
        assert first[1] == second[1]
        assert all(torch.equal(a, b) for a, b in zip(first[0], second[0]))
        for a, b in zip(first[2], second[2]):
            assert (a is None and b is None) or torch.equal(a, b)
    assert served >= 60, served  # most random calls are plain

