"""The dropout stream every backend draws (csrc/ops.cpp): element e takes word e % 4 of
Philox4x32-10 keyed by the 64-bit seed at counter c = e // 4 (counter words c & 0xffffffff,
c >> 32, 0, 0), the word w taken as int32 and mapped to [0, 1) by (w < 0 ? -w - 1 : w) *
4.6566127342e-10. Checked here against a plain-Python Philox at elements on both sides of 2^31,
2^32, 2^33 and 2^34 (the Triton helper, whatever Triton's own tl.randint4x does with 64-bit
counters), against the C++ CPU kernels' keep-masks (runs that start anywhere within a counter's
four words), and the CPU kernels' vector draw against the scalar definition in every instruction
set this CPU runs."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import fused_attn
from fused_attn import _cpu_isa, _extension, backends
from fused_attn.ops._random import draw_seed

from .conftest import backend_params

M32 = 0xFFFFFFFF
SEED = 0x123456789ABCDEF

if backends.triton_version() is not None:
    import triton
    import triton.language as tl

    from fused_attn.kernels.triton._dropout import uniform

    @triton.jit
    def _draw(out_ptr, seed, first, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(out_ptr + offs, uniform(seed, first + offs.to(tl.int64)))


def _philox_uniform(seed: int, element: int) -> np.float32:
    counter = element >> 2
    c0, c1, c2, c3 = counter & M32, (counter >> 32) & M32, 0, 0
    k0, k1 = seed & M32, (seed >> 32) & M32
    for _ in range(10):
        p0, p2 = c0, c2
        c0 = (((0xCD9E8D57 * p2) >> 32) ^ c1 ^ k0) & M32
        c2 = (((0xD2511F53 * p0) >> 32) ^ c3 ^ k1) & M32
        c1 = (0xCD9E8D57 * p2) & M32
        c3 = (0xD2511F53 * p0) & M32
        k0 = (k0 + 0x9E3779B9) & M32
        k1 = (k1 + 0xBB67AE85) & M32
    w = int(np.uint32((c0, c1, c2, c3)[element & 3]).view(np.int32))
    w = -w - 1 if w < 0 else w
    return np.float32(np.float32(w) * np.float32(4.6566127342e-10))


def _triton_device() -> str | None:
    if torch.cuda.is_available():
        return "cuda"
    return "cpu" if backends.triton_interpret_mode() and backends.triton_version() else None


@pytest.mark.skipif(_triton_device() is None, reason="needs Triton on a GPU or under TRITON_INTERPRET=1")
@pytest.mark.parametrize("first", [0, 3, 2**31 - 4, 2**32 - 4, 2**33 - 5, 2**34 - 6, 5 * 2**32 + 7, 2**40])
def test_triton_stream_is_the_documented_philox(first):
    out = torch.empty(8, device=_triton_device())
    _draw[(1,)](out, SEED, first, N=8)
    expected = np.array([_philox_uniform(SEED, first + i) for i in range(8)], dtype=np.float32)
    np.testing.assert_array_equal(out.cpu().numpy(), expected)


_CXX = shutil.which(os.environ.get("CXX", "c++"))
_RUNNABLE_SETS = [isa for isa in _cpu_isa.ISA_FLAGS if not _cpu_isa.missing_flags(isa)]
_FIRSTS = [0, 3, 2**31 - 4, 2**34 - 6, 2**34 - 130, 5 * 2**32 + 7, 2**40]


@pytest.mark.skipif(_CXX is None, reason="needs a C++ compiler")
@pytest.mark.parametrize("isa", _RUNNABLE_SETS)
def test_cpu_vector_draw_is_the_scalar_definition(isa, tmp_path):
    """philox::uniforms, compiled with each CPU kernel set's flags (AVX-512: 8 counters per vector
    as 64-bit lanes; AVX2: 8 as 32-bit lanes; generic: a loop), gives philox::uniform's bits for runs
    of every length up to 300 from offsets whose counters cross 2^32 inside a run (2^34 - 130: a
    batch of counters carries into the high word), and writes nothing past a run; the scalar values
    are the documented Philox. Element offsets this large need tensors of 64 GiB in the kernels."""
    root = Path(__file__).resolve().parent.parent
    exe = tmp_path / "philox_uniforms"
    subprocess.run([_CXX, "-O2", "-std=c++17", *_cpu_isa.COMPILE_FLAGS[isa], "-I", str(root / "csrc" / "include"),
                    str(root / "tests" / "cpp" / "philox_uniforms.cpp"), "-o", str(exe)],
                   check=True, capture_output=True)
    run = subprocess.run([str(exe), *map(str, _FIRSTS)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    values = np.array(run.stdout.split(), dtype=np.float32).reshape(len(_FIRSTS), 8)
    expected = np.array([[_philox_uniform(SEED, first + i) for i in range(8)] for first in _FIRSTS], dtype=np.float32)
    np.testing.assert_array_equal(values, expected)


@pytest.mark.skipif(not _extension.loaded(), reason="the extension is not built")
def test_cpu_kernel_keep_mask_is_the_documented_philox():
    rows, hidden, p = 3, 37, 0.4
    ones = torch.ones(rows, hidden)
    seed = torch.tensor(SEED)
    _, prenorm, _, _ = torch.ops.fused_attn.add_layer_norm_fwd(ones, torch.zeros_like(ones), None, None, None,
                                                               1e-5, p, seed)
    expected = np.array([[_philox_uniform(SEED, r * hidden + c) >= p for c in range(hidden)] for r in range(rows)])
    np.testing.assert_array_equal((prenorm != 0).numpy(), expected)


def _attention_dv(out, q, k, v, lse, p, seed, threads):
    """dV of the cpu attention's backward (scale 1, no mask) for an upstream gradient of ones, run
    on ``threads`` threads (which, with the heads, picks its schedule)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return torch.ops.fused_attn.attention_bwd(torch.ones_like(out), q, k, v, None, lse, 1.0, False, p, seed,
                                                  False)[2]
    finally:
        torch.set_num_threads(previous)


@pytest.mark.skipif(not _extension.loaded(), reason="the extension is not built")
def test_cpu_attention_keep_mask_is_the_documented_philox():
    """The cpu attention drops probability (b * H + h, i, j) at element ((b * H + h) * Lq + i) * Lk + j
    of the stream, in its forward and in both backward schedules. Equal scores and V = I make the
    output row i keep[i] / (Lk (1 - p)), and with an upstream gradient of ones dV[j] is the sum of
    the dropped probabilities of key j. Lk = 77 starts rows inside a counter's words, and 150
    keys run past one chunk of the draw."""
    q_len, p = 5, 0.4
    seed = torch.tensor(SEED)
    # Six heads take the per-head backward; one head on two threads the per-block passes.
    for (batch, heads), k_len in itertools.product(((2, 3), (1, 1)), (77, 150)):
        q, k = torch.zeros(batch, heads, q_len, 16), torch.zeros(batch, heads, k_len, 16)
        v = torch.eye(k_len).expand(batch, heads, k_len, k_len).contiguous()
        out, lse = torch.ops.fused_attn.attention_fwd(q, k, v, None, 1.0, False, p, seed)
        keep = np.array([[[[_philox_uniform(SEED, ((b * heads + h) * q_len + i) * k_len + j) >= p
                            for j in range(k_len)] for i in range(q_len)] for h in range(heads)]
                          for b in range(batch)])
        np.testing.assert_array_equal((out != 0).numpy(), keep)
        scale = np.float32(1) / (np.float32(1) - np.float32(p)) / k_len
        expected_dv = torch.from_numpy(keep.sum(axis=2).astype(np.float32) * scale)
        for threads in (1, 2):
            dv = _attention_dv(out, q, k, v, lse, p, seed, threads)
            # dV[j, c] is sum_i P[i, j] dO[i, c]: the same in every column c.
            torch.testing.assert_close(dv[..., 0], expected_dv, rtol=1e-6, atol=0)
            assert bool((dv == dv[..., :1]).all())


@pytest.mark.skipif(not _extension.loaded(), reason="the extension is not built")
def test_cpu_kernels_keep_an_element_whose_uniform_is_exactly_p():
    """The keep test is inclusive (uniform >= p) in every CPU kernel that drops: with p set to the
    uniform of element 0 exactly, the attention's forward, both of its backward schedules and Add &
    Norm keep that element, and with the next float32 above it they drop it. (A strict > differs
    from >= only where a uniform equals p, which no random draw of these tests ever hits.)"""
    u = _philox_uniform(SEED, 0)
    assert 0 < u < 1
    seed = torch.tensor(SEED)
    # Equal scores over 4 keys and the identity for V: output [0, j] is keep[0, j] / (4 (1 - p)), and
    # with an upstream gradient of ones dV[j] is the dropped probability P[0, j] in every column.
    q, k = torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 4, 4)
    v = torch.eye(4).view(1, 1, 4, 4)
    ones = torch.ones(1, 37)
    for p, kept in ((float(u), True), (float(np.nextafter(u, np.float32(1))), False)):
        out, lse = torch.ops.fused_attn.attention_fwd(q, k, v, None, 1.0, False, p, seed)
        assert bool(out[0, 0, 0, 0] != 0) == kept, (p, out)
        for threads in (1, 2):  # one head: the per-head backward on one thread, the per-block passes on two
            dv = _attention_dv(out, q, k, v, lse, p, seed, threads)
            assert bool((dv[0, 0, 0] != 0).all()) == kept, (p, threads, dv)
        _, prenorm, _, _ = torch.ops.fused_attn.add_layer_norm_fwd(ones, torch.zeros_like(ones), None, None, None,
                                                                   1e-5, p, seed)
        assert bool(prenorm[0, 0] != 0) == kept, (p, prenorm)


@pytest.mark.parametrize("backend_device", backend_params("ffn", exclude=("reference",)))
def test_ffn_keep_mask_is_the_documented_philox_on_every_backend(backend_device):
    """The FFN drops element row * out_features + col of the shared stream on every backend (the
    cpu and cuda paths around a library GEMM, the Triton GEMM's epilogue), so one seed drops the
    same elements everywhere; ffn_keep_mask replays the backend's own kernel."""
    from fused_attn.ops.ffn import ffn_keep_mask

    backend, device = backend_device
    rows, out_features, p = 5, 37, 0.4
    torch.manual_seed(0)
    seed = int(draw_seed(p, torch.empty(0, device=device)))
    torch.manual_seed(0)
    keep = ffn_keep_mask(rows, out_features, p, device, backend).cpu()
    expected = [[_philox_uniform(seed, r * out_features + c) >= p for c in range(out_features)]
                for r in range(rows)]
    np.testing.assert_array_equal(keep.numpy(), np.array(expected))


@pytest.mark.skipif(_triton_device() is None, reason="needs Triton on a GPU or under TRITON_INTERPRET=1")
def test_triton_attention_keep_mask_is_the_documented_philox():
    """The attention drops probability (b * H + h, i, j) at element ((b * H + h) * Lq + i) * Lk + j of
    the stream (query and key lengths differ here, several heads and batches draw, and rows of 7
    keys start anywhere within a Philox counter's four words)."""
    from fused_attn.ops.attention import attention_with_keep_mask

    batch, heads, q_len, k_len, p = 2, 3, 5, 7, 0.4
    device = _triton_device()
    q, k = torch.randn(batch, heads, q_len, 16, device=device), torch.randn(batch, heads, k_len, 16, device=device)
    torch.manual_seed(0)
    seed = int(draw_seed(p, q))
    torch.manual_seed(0)
    _, keep = attention_with_keep_mask(q, k, k, dropout_p=p)
    expected = [[[[_philox_uniform(seed, ((b * heads + h) * q_len + i) * k_len + j) >= p for j in range(k_len)]
                  for i in range(q_len)] for h in range(heads)] for b in range(batch)]
    np.testing.assert_array_equal(keep.cpu().numpy(), np.array(expected))


def _dropout_op_calls(device: str, prefix: str = "") -> dict:
    """Each fused op with dropout (the native ones, or with ``prefix="triton_"`` the Triton ones),
    called as ``call(seed, dropout_p=0.1)`` on small inputs (float32 on the CPU, float16 on CUDA)."""
    ops = torch.ops.fused_attn
    dtype = torch.float32 if device == "cpu" else torch.float16
    x = torch.randn(4, 16, device=device, dtype=dtype)
    q = torch.randn(1, 2, 4, 16, device=device, dtype=dtype)
    w1, w2 = torch.randn(8, 16, device=device, dtype=dtype), torch.randn(16, 8, device=device, dtype=dtype)
    attention, add_layer_norm, ffn = (getattr(ops, prefix + name) for name in
                                      ("attention_fwd", "add_layer_norm_fwd", "ffn_fwd"))
    return {
        "attention_fwd": lambda seed, p=0.1: attention(q, q, q, None, 0.25, False, p, seed),
        "add_layer_norm_fwd": lambda seed, p=0.1: add_layer_norm(x, x, None, None, None, 1e-5, p, seed),
        "ffn_fwd": lambda seed, p=0.1: ffn(x, w1, None, w2, None, "none", p, seed),
    }


def _native_devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.skipif(not _extension.loaded(), reason="the extension is not built")
@pytest.mark.parametrize("device", _native_devices())
@pytest.mark.parametrize("op", ["attention_fwd", "add_layer_norm_fwd", "ffn_fwd"])
def test_native_ops_check_the_dropout_seed_alike(device, op):
    # One check (fused_attn/checks.h, checked_seed) with one message for every op and device; the cpu
    # kernels take the seed on the CPU, the CUDA kernels on the inputs' device (read when they run) or,
    # outside a graph capture, on the CPU, with the same result.
    call = _dropout_op_calls(device)[op]
    out = call(torch.tensor(7))[0]
    with pytest.raises(RuntimeError, match=r"seed must be given when dropout_p > 0: an int64 tensor with one element"):
        call(None)
    bad = {"Float of shape \\[\\]": torch.tensor(7.0), "Long of shape \\[2\\]": torch.tensor([7, 8])}
    for described, seed in bad.items():
        with pytest.raises(RuntimeError, match="seed must be an int64 tensor with one element, got " + described):
            call(seed)
    if device == "cuda":
        assert torch.equal(call(torch.tensor(7, device="cuda"))[0], out)
    elif torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="seed must be on the CPU, the inputs' device, got cuda:0"):
            call(torch.tensor(7, device="cuda"))


def _ffn_args(device):
    dtype = torch.float32 if device == "cpu" else torch.float16
    x, w1 = torch.randn(4, 16, device=device, dtype=dtype), torch.randn(8, 16, device=device, dtype=dtype)
    return x, w1, torch.randn(16, 5, device=device, dtype=dtype)  # w2's inner size is not w1's 8


@pytest.mark.skipif(not _extension.loaded(), reason="the extension is not built")
@pytest.mark.parametrize("device", _native_devices())
def test_native_ffn_checks_its_seed_before_its_gemms(device):
    """The FFN's dropout comes after both GEMMs; its seed is checked before them: a call without one
    is refused for the seed, not after the work (here, not for a w2 the second GEMM would refuse)."""
    x, w1, w2 = _ffn_args(device)
    with pytest.raises(RuntimeError, match="seed must be given when dropout_p > 0"):
        torch.ops.fused_attn.ffn_fwd(x, w1, None, w2, None, "none", 0.1, None)
    with pytest.raises(RuntimeError, match="w2 must have shape"):
        torch.ops.fused_attn.ffn_fwd(x, w1, None, w2, None, "none", 0.1, torch.tensor(7))


@pytest.mark.skipif(_triton_device() is None, reason="needs Triton on a GPU or under TRITON_INTERPRET=1")
def test_triton_ffn_checks_its_seed_before_its_gemms(monkeypatch):
    """The Triton FFN alike: a call without a seed is refused before its first GEMM runs."""
    from fused_attn.kernels.triton import ffn as kernels

    def first_gemm(*args, **kwargs):
        raise AssertionError("the first GEMM ran before the seed was checked")

    monkeypatch.setattr(kernels, "linear_gelu_fwd", first_gemm)
    x, w1, _ = _ffn_args(_triton_device())
    with pytest.raises(RuntimeError, match="seed must be given when dropout_p > 0"):
        torch.ops.fused_attn.triton_ffn_fwd(x, w1, None, w1.t().contiguous(), None, "none", 0.1, None)


@pytest.mark.skipif(_triton_device() is None, reason="needs Triton on a GPU or under TRITON_INTERPRET=1")
@pytest.mark.parametrize("op", ["attention_fwd", "add_layer_norm_fwd", "ffn_fwd"])
def test_triton_ops_check_the_dropout_seed_as_the_native_ones(op):
    """The Triton ops take the seed as the CUDA kernels do (fused_attn/ops/_random.py kernel_seed):
    required with dropout, an int64 tensor with one element, on the inputs' device or copied there
    from the CPU (the same result); without dropout it is not read."""
    device = _triton_device()
    call = _dropout_op_calls(device, "triton_")[op]
    out = call(torch.tensor(7, device=device))[0]
    assert torch.equal(call(torch.tensor(7))[0], out)
    assert not torch.equal(call(torch.tensor(8, device=device))[0], out)
    assert torch.equal(call(None, 0.0)[0], call(torch.tensor(7.0), 0.0)[0])  # no dropout: no seed read
    with pytest.raises(RuntimeError, match=rf"triton_\w+: seed must be given when dropout_p > 0: an int64 tensor"):
        call(None)
    for described, seed in {r"float32 of shape \[\]": torch.tensor(7.0),
                            r"int64 of shape \[2\]": torch.tensor([7, 8])}.items():
        with pytest.raises(RuntimeError, match="seed must be an int64 tensor with one element, got " + described):
            call(seed)


def _dropout_calls(backend: str, device: str) -> dict:
    """Each public op with dropout_p = 0.5 on ``backend``, on inputs made by ``make(*shape)``."""
    import fused_attn

    return {
        "ffn": lambda make: fused_attn.ffn(make(6, 16), make(32, 16), make(32), make(16, 32), make(16),
                                           dropout_p=0.5, backend=backend),
        "add_layer_norm": lambda make: fused_attn.add_layer_norm(make(6, 16), make(6, 16), make(16), make(16),
                                                                 dropout_p=0.5, backend=backend),
        "scaled_dot_product_attention": lambda make: fused_attn.scaled_dot_product_attention(
            make(1, 2, 6, 16), make(1, 2, 6, 16), make(1, 2, 6, 16), dropout_p=0.5, backend=backend),
    }


@pytest.mark.parametrize("backend_device", backend_params("ffn", exclude=("reference",)))
@pytest.mark.parametrize("op", ["ffn", "add_layer_norm", "scaled_dot_product_attention"])
def test_dropout_applies_alike_with_and_without_autograd(backend_device, op):
    """A call that records no graph (torch.no_grad, or no input requiring grad) takes the ops'
    inference forms: they drop the same elements, scaled alike, as the training form."""
    backend, device = backend_device
    call = _dropout_calls(backend, device)[op]

    def run(requires_grad: bool, no_grad: bool, seed: int = 0) -> torch.Tensor:
        gen = torch.Generator().manual_seed(5)
        make = lambda *shape: torch.randn(*shape, generator=gen).to(device).requires_grad_(requires_grad)  # noqa: E731
        torch.manual_seed(seed)
        if no_grad:
            with torch.no_grad():
                return call(make)
        return call(make).detach()

    trained = run(True, False)
    for requires_grad, no_grad in ((False, False), (True, True), (False, True)):
        torch.testing.assert_close(run(requires_grad, no_grad), trained, rtol=0, atol=0)
    assert not torch.equal(run(False, True, seed=1), trained)  # another seed drops other elements


def _captured_dropout_call(op: str, backend: str | None):
    """(inputs that require grad, a call of the public ``op`` with dropout 0.5 on ``backend``)."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen) * scale).to("cuda", torch.float16).requires_grad_()

    if op == "scaled_dot_product_attention":
        q = randn(2, 4, 64, 64)
        return [q], lambda: fused_attn.scaled_dot_product_attention(q, q, q, dropout_p=0.5, backend=backend)
    if op == "add_layer_norm":
        x, r, w, b = randn(64, 256), randn(64, 256), randn(256), randn(256)
        return [x, w], lambda: fused_attn.add_layer_norm(x, r, w, b, 1e-5, 0.5, backend=backend)
    x, w1, b1, w2, b2 = randn(64, 64), randn(128, 64, scale=0.1), randn(128), randn(64, 128, scale=0.1), randn(64)
    return [x, w1], lambda: fused_attn.ffn(x, w1, b1, w2, b2, dropout_p=0.5, backend=backend)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("op", ["scaled_dot_product_attention", "add_layer_norm", "ffn"])
@pytest.mark.parametrize("backend", [None, "cuda", "triton"])
def test_dropout_in_a_captured_cuda_graph_draws_anew_at_each_replay(op, backend):
    """A CUDA graph captured around a fused call with dropout, forward and backward, draws a new
    mask at every replay: the seed is drawn on the device by torch's graph-safe generator and read
    by the kernels when they run. After the same torch.manual_seed a replay gives the eager call's
    bits (the same draw), and its gradients are those of the mask its forward drew."""
    if backend is not None and backends.explain(op, backends.Inputs(torch.device("cuda"), torch.float16))[backend]:
        pytest.skip(f"the {backend} backend cannot serve {op} here")
    leaves, call = _captured_dropout_call(op, backend)
    grad_out = torch.randn(call().shape, generator=torch.Generator().manual_seed(1)).to("cuda", torch.float16)

    def step():
        out = call()
        return (out, *torch.autograd.grad(out, leaves, grad_out))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (and autotuning) off the default stream, as torch.cuda.graph asks
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    fused = backends.last_backend(op)
    assert fused != "reference"
    graph = torch.cuda.CUDAGraph()
    with warnings.catch_warnings():
        warnings.simplefilter("error", backends.FallbackWarning)
        with torch.cuda.graph(graph):
            captured = step()
    assert backends.last_backend(op) == fused
    torch.manual_seed(123)
    graph.replay()
    first = [t.clone() for t in captured]
    graph.replay()
    second = [t.clone() for t in captured]
    torch.manual_seed(123)
    eager = step()
    assert not torch.equal(first[0], second[0])  # a new mask at the second replay
    assert all(torch.isfinite(t).all() for t in first + second)
    assert torch.equal(first[0], eager[0])
    for replayed, expected in zip(first[1:], eager[1:]):
        torch.testing.assert_close(replayed, expected)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("op", ["attention_fwd", "add_layer_norm_fwd", "ffn_fwd"])
@pytest.mark.parametrize("triton", [False, True], ids=["native", "triton"])
def test_fused_dropout_ops_take_a_device_seed_in_a_cuda_graph_capture_and_refuse_a_cpu_one(op, triton):
    """Called directly while a CUDA graph is captured, the fused ops with dropout take a seed on the
    device (read when the kernels run) and refuse one on the CPU, naming themselves and the way out,
    instead of freezing its value into every replay (cuda_utils::kernel_seed in
    csrc/include/fused_attn/cuda_utils.cuh, fused_attn/ops/_random.py kernel_seed). Outside a capture
    a CPU seed gives the device seed's result."""
    dropped = _dropout_op_calls("cuda", "triton_" if triton else "")[op]
    call = lambda seed: dropped(seed, 0.5)  # noqa: E731
    cpu_seed, device_seed = torch.tensor(7), torch.tensor(7, device="cuda")
    expected = call(cpu_seed)[0].clone()
    assert torch.equal(call(device_seed)[0], expected)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = call(device_seed)[0]
    graph.replay()
    assert torch.equal(captured, expected)
    device_seed.fill_(8)  # what a replayed draw does: the kernels read the new seed
    graph.replay()
    assert not torch.equal(captured, expected)
    with pytest.raises(RuntimeError, match=r"a CPU seed while a CUDA graph is being captured.*on the inputs' device"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            call(cpu_seed)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_model_with_dropout_compiled_with_cuda_graphs_draws_anew_at_each_call():
    """torch.compile(mode="reduce-overhead") captures a fused BERT's training step, dropout
    included, in CUDA graphs, forward and backward, with no skip (a seed drawn on the host made
    Inductor skip the graphs: a CPU tensor), and each step drops other elements."""
    from torch._dynamo.utils import counters

    from fused_attn.models import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig.bert_tiny(fused=True, num_hidden_layers=1)).cuda().half().train()  # compiles faster
    ids = torch.randint(0, 1000, (2, 64), device="cuda")
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, mode="reduce-overhead")
    steps = []
    for _ in range(4):
        torch.compiler.cudagraph_mark_step_begin()
        hidden = compiled(ids).last_hidden_state
        hidden.float().square().mean().backward()
        steps.append((hidden.detach().clone(), model.embeddings.word_embeddings.weight.grad.clone()))
        model.zero_grad(set_to_none=False)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert not torch.equal(steps[2][0], steps[3][0]) and not torch.equal(steps[2][1], steps[3][1])
    assert all(torch.isfinite(t).all() for step in steps for t in step)
