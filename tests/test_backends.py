import ast
import importlib
import pathlib
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import fused_attn
from fused_attn import backends
from fused_attn.backends import BackendNotSupportedError, FallbackWarning, Inputs

PACKAGE_ROOT = pathlib.Path(fused_attn.__file__).parent


def _cpu_inputs(dtype=torch.float32, **features):
    return Inputs(torch.device("cpu"), dtype, {"hidden": 8, **features})


def test_auto_picks_the_cpu_kernel_for_cpu_tensors():
    assert backends.select("layer_norm", _cpu_inputs()) == "cpu"


def test_available_backends_on_cpu():
    names = fused_attn.available_backends("cpu")
    assert "cpu" in names and "reference" in names and "cuda" not in names
    assert ("triton" in names) == backends.triton_interpret_mode()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_available_backends_on_a_missing_gpu_is_empty():
    assert fused_attn.available_backends("cuda") == []


def test_forcing_cuda_on_cpu_tensor_lists_reasons():
    with pytest.raises(BackendNotSupportedError) as info:
        backends.select("layer_norm", _cpu_inputs(), "cuda")
    message = str(info.value)
    assert "backend 'cuda' cannot serve" in message and "CUDA tensors" in message


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        backends.select("layer_norm", _cpu_inputs(), "tpu")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendNotSupportedError, match="TRITON_INTERPRET=1"):
        backends.select("layer_norm", _cpu_inputs(), "triton")


def test_env_var_selects(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert backends.select("layer_norm", _cpu_inputs()) == "reference"
    monkeypatch.setenv(backends.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match="FUSED_ATTN_BACKEND"):
        backends.select("layer_norm", _cpu_inputs())


def test_precedence_argument_context_env(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    with fused_attn.use_backend("cpu"):
        assert backends.select("layer_norm", _cpu_inputs()) == "cpu"
        assert backends.select("layer_norm", _cpu_inputs(), "reference") == "reference"
        with fused_attn.use_backend("auto"):
            assert backends.select("layer_norm", _cpu_inputs()) == "cpu"
    assert backends.select("layer_norm", _cpu_inputs()) == "reference"


def test_use_backend_runs_the_op_on_that_backend():
    x = torch.randn(3, 8)
    with fused_attn.use_backend("reference"):
        fused_attn.layer_norm(x, (8,))
    assert fused_attn.last_backend("layer_norm") == "reference"
    fused_attn.layer_norm(x, (8,))
    assert fused_attn.last_backend("layer_norm") == "cpu"


def test_use_backend_rejects_unknown_name():
    with pytest.raises(ValueError, match="use_backend: unknown backend"):
        with fused_attn.use_backend("gpu"):
            pass


def test_auto_falls_back_to_reference_visibly_once():
    x = torch.randn(3, 8, dtype=torch.float64)
    backends._warned.clear()
    with pytest.warns(FallbackWarning, match="dtype float64") as record:
        out = fused_attn.layer_norm(x, (8,))
    assert record[0].filename == __file__  # points at the caller's line
    assert fused_attn.last_backend("layer_norm") == "reference"
    torch.testing.assert_close(out, torch.nn.functional.layer_norm(x, (8,)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused_attn.layer_norm(x, (8,))


def test_explain_lists_every_backend():
    reasons = backends.explain("layer_norm", _cpu_inputs())
    assert set(reasons) == {"cuda", "triton", "cpu", "reference"}
    assert reasons["cpu"] == [] and reasons["reference"] == []
    assert reasons["cuda"]


def test_support_limits_and_features():
    support = backends.Support(
        "reference",
        devices=("cpu",),
        dtypes=(torch.float32,),
        limits={"head_dim": (16, 256)},
        multiple_of={"head_dim": 8},
        unsupported=("dropout",),
    )
    ok = Inputs(torch.device("cpu"), torch.float32, {"head_dim": 64})
    assert support.not_supported_reasons(ok) == []
    bad = Inputs(torch.device("cpu"), torch.float16, {"head_dim": 260, "dropout": True})
    reasons = support.not_supported_reasons(bad)
    assert any("dtype float16" in r for r in reasons)
    assert any("head_dim=260 exceeds the maximum 256" in r for r in reasons)
    assert any("not a multiple of 8" in r for r in reasons)
    assert any("dropout is not supported" in r for r in reasons)
    assert "head_dim in [16..256]" in support.describe()


@pytest.mark.parametrize("head_dim, offered, refused", [
    (256, 101376, True),   # sm86/sm89/sm120: 99 KB per block
    (256, 166912, False),  # A100
    (256, 232448, False),  # H100
    (160, 101376, True),
    (128, 101376, False),  # never asks the device
])
def test_cuda_attention_wide_heads_need_the_shared_memory(monkeypatch, head_dim, offered, refused):
    from fused_attn.ops import attention

    class Props:
        name = "GPU under test"
        shared_memory_per_block_optin = offered

    def properties(device):
        assert head_dim > 128, "head dims up to 128 fit every sm80+ GPU: nothing to ask"
        return Props()

    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    inputs = Inputs(torch.device("cuda"), torch.float16, {"head_dim": 64, "head_dim_v": head_dim})
    reasons = attention._cuda_shared_memory_reasons(inputs)
    if refused:
        assert reasons == [f"head dims over 128 need 135168 bytes of shared memory per block; GPU under test offers "
                           f"{offered}"]
    else:
        assert reasons == []
    assert attention.SPEC.supports["cuda"].check is attention._cuda_shared_memory_reasons
    assert "head dims over 128 where the GPU has 132 KiB" in attention.SPEC.supports["cuda"].describe()


def test_cuda_attention_shared_memory_figure_follows_the_kernels():
    """CUDA_WIDE_HEAD_SMEM_BYTES is what csrc/cuda/attention.cu's kernels ask for at padded head
    dim 256, and up to head dim 128 every kernel (with one strip per warp or, where the kernels take
    them, two; and the forward at 256) fits the 99 KiB per block of
    sm86/sm89/sm120: evaluated from the kernel file's own constexpr formulas, so a change of tile
    sizes there cannot leave the policy's figure behind."""
    import pathlib
    import re

    from fused_attn.ops import attention

    source = (pathlib.Path(__file__).parents[1] / "csrc" / "cuda" / "attention.cu").read_text()

    def constant(name):
        return re.search(rf"constexpr int {name} = ([^;]+);", source).group(1)

    threads = int(re.match(r"\d+", constant("kThreads")).group(0))
    rows_per_block = 16 * threads // 32
    assert constant("kRowsPerBlock") == "16 * kWarps" and constant("kWarps") == "kThreads / kWarpSize"

    def stream_rows(d):
        body = re.search(r"constexpr int stream_rows\(int head_dim\) \{ return head_dim <= (\d+) \? (\d+) : (\d+); \}",
                         source).groups()
        return int(body[1]) if d <= int(body[0]) else int(body[2])

    def out_cols(d):
        assert "constexpr int out_cols(int head_dim) { return head_dim > 128 ? 128 : head_dim; }" in source
        return min(d, 128)

    # Rows per block: 16 per strip per warp, one strip or two (block_strips), two only up to
    # kMaxTwoStripHeadDim in the forward and kMaxTwoStripBwdHeadDim in the backward.
    assert "constexpr int block_rows(int strips) { return kRowsPerBlock * strips; }" in source
    two_strip_max = int(constant("kMaxTwoStripHeadDim"))

    # The backward's kernels stream half as many rows with two strips.
    assert ("constexpr int strip_stream_rows() { return kStrips == 1 ? stream_rows(kD) : stream_rows(kD) / 2; }"
            in source)
    two_strip_bwd_max = int(constant("kMaxTwoStripBwdHeadDim"))

    def smem(kernel, d, strips=1):
        body = re.search(rf"constexpr int {kernel}\(\) \{{\s*constexpr int (\w+) = "
                         rf"(stream_rows\(kD\)|strip_stream_rows<kD, (kMT|kNT)>\(\));\s*return ([^;]+);", source)
        local, initial, strips_name, expression = body.groups()
        streamed = stream_rows(d) if initial == "stream_rows(kD)" or strips == 1 else stream_rows(d) // 2
        expression = expression.replace(f"block_rows({strips_name or 'kMT'})", "(kRowsPerBlock * strips)")
        names = {"kD": d, local: streamed, "kRowsPerBlock": rows_per_block, "out_cols": out_cols, "strips": strips}
        return eval(expression, {"__builtins__": {}}, names)

    kernels = ("fwd_smem_bytes", "bwd_dkdv_smem_bytes", "bwd_dq_smem_bytes")
    assert max(smem(k, 256) for k in kernels) == attention.CUDA_WIDE_HEAD_SMEM_BYTES
    assert two_strip_max == 128 and smem("fwd_smem_bytes", 128, strips=2) < attention.CUDA_WIDE_HEAD_SMEM_BYTES
    assert two_strip_bwd_max == 64
    sm86_per_block = 101376
    assert all(smem(k, d) <= sm86_per_block for k in kernels for d in (32, 64, 96, 128))
    assert all(smem("fwd_smem_bytes", d, strips=2) <= sm86_per_block for d in (32, 64, 96, 128))
    assert all(smem(k, d, strips=2) <= sm86_per_block for k in kernels[1:] for d in (32, 64))
    assert smem("fwd_smem_bytes", 256) <= sm86_per_block


@pytest.mark.parametrize("op", ["scaled_dot_product_attention", "linear_gelu", "softmax", "layer_norm"])
def test_triton_interpreter_does_not_take_bfloat16(op, monkeypatch):
    """The Triton interpreter computes bfloat16 wrongly (tl.dot returns garbage, conversions
    truncate): on CPU tensors the triton backend declines bfloat16 with the reason."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    support = backends.registered_ops()[op].supports["triton"]
    if support.unavailable_reasons(torch.device("cpu")):
        pytest.skip("triton is not installed")
    reasons = support.not_supported_reasons(backends.Inputs(torch.device("cpu"), torch.bfloat16, {}))
    assert reasons == ["bfloat16 is not served on CPU tensors (the Triton interpreter computes it wrongly)"]
    assert not support.not_supported_reasons(backends.Inputs(torch.device("cpu"), torch.float16, {}))
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    with pytest.raises(backends.BackendNotSupportedError, match="Triton interpreter computes it wrongly"):
        fused_attn.linear_gelu(x, torch.randn(8, 16, dtype=torch.bfloat16), backend="triton")


def test_remembered_choices_follow_what_decides_them(monkeypatch):
    """Eager calls remember their choice per (op, backend asked, device, dtype, features, Triton
    interpreter switch): every one of those still decides, the second time as the first."""
    backends.clear_choices()
    for _ in range(2):
        assert backends.select("layer_norm", _cpu_inputs()) == "cpu"
        assert backends.select("layer_norm", _cpu_inputs(), "reference") == "reference"
        with fused_attn.use_backend("reference"):
            assert backends.select("layer_norm", _cpu_inputs()) == "reference"
        assert backends.select("layer_norm", _cpu_inputs(torch.float64)) == "reference"
        with pytest.raises(BackendNotSupportedError, match="CUDA tensors"):
            backends.select("layer_norm", _cpu_inputs(), "cuda")
        with monkeypatch.context() as m:
            m.setenv(backends.ENV_VAR, "reference")
            assert backends.select("layer_norm", _cpu_inputs()) == "reference"
        with monkeypatch.context() as m:
            m.setenv("TRITON_INTERPRET", "0")
            with pytest.raises(BackendNotSupportedError, match="TRITON_INTERPRET=1"):
                backends.select("layer_norm", _cpu_inputs(), "triton")
        assert backends.select("scaled_dot_product_attention",
                               Inputs(torch.device("cpu"), torch.float32, {"head_dim": 64})) == "cpu"
        with pytest.raises(BackendNotSupportedError, match="head_dim=300"):
            backends.select("scaled_dot_product_attention",
                            Inputs(torch.device("cpu"), torch.float32, {"head_dim": 300}), "cpu")


def test_remembered_fallback_still_records_and_warns_once():
    backends.clear_choices()
    backends._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert backends.select("layer_norm", _cpu_inputs(torch.float64)) == "reference"
            assert backends.last_backend("layer_norm") == "reference"
            assert backends.select("layer_norm", _cpu_inputs()) == "cpu"
            assert backends.last_backend("layer_norm") == "cpu"
    fallbacks = [w for w in caught if issubclass(w.category, FallbackWarning)]
    assert len(fallbacks) == 1 and "float64" in str(fallbacks[0].message)


@pytest.mark.parametrize("op, feature", [
    ("scaled_dot_product_attention", "q_len"), ("scaled_dot_product_attention", "k_len"), ("softmax", "n_cols"),
    ("layer_norm", "hidden"), ("add_layer_norm", "hidden"), ("linear_gelu", "gemm_dim"), ("ffn", "gemm_dim"),
])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_kernels_decline_lengths_that_would_wrap_32_bit_counters(op, feature, backend):
    """A dimension within a tile of 2^31 would wrap the 32-bit tile counts and loop counters of the
    Triton and CUDA kernels: declared once, so auto passes such calls on and a named backend says why."""
    base = {"head_dim": 64, "head_dim_v": 64, "q_len": 8, "k_len": 8, "n_cols": 8, "hidden": 8, "gemm_dim": 8}
    for extent, refused in ((backends.MAX_EXTENT, False), (backends.MAX_EXTENT + 1, True)):
        inputs = Inputs(torch.device("cuda"), torch.float16, {**base, feature: extent})
        support = backends.registered_ops()[op].supports[backend]
        reasons = [r for r in support.not_supported_reasons(inputs) if feature in r]
        assert bool(reasons) == refused, reasons


@pytest.mark.parametrize("op", ["linear_gelu", "ffn"])
def test_gemm_ops_declare_their_largest_dim(op, monkeypatch):
    """gemm_dim, the feature their limit reads, is the largest of rows, input, hidden and output features."""
    module = importlib.import_module("fused_attn.ops.ffn")  # the module: fused_attn.ops.ffn is also the function
    seen = []
    select = module.select
    monkeypatch.setattr(module, "select", lambda name, inputs, backend=None, **kw: (
        seen.append(inputs.features) or select(name, inputs, backend, **kw)))
    x = torch.randn(3, 5, 8)
    if op == "linear_gelu":
        fused_attn.linear_gelu(x, torch.randn(20, 8), backend="reference")
        fused_attn.linear_gelu(x.view(15, 8)[:0], torch.randn(4, 8), backend="reference")
    else:
        fused_attn.ffn(x, torch.randn(12, 8), None, torch.randn(8, 12), None, backend="reference")
        fused_attn.ffn(x, torch.randn(4, 8), None, torch.randn(6, 4), None, backend="reference")
    expected = {"linear_gelu": [20, 8], "ffn": [15, 15]}[op]
    assert [features["gemm_dim"] for features in seen] == expected


def test_triton_gemm_refuses_dims_that_would_wrap():
    if backends.triton_version() is None:
        pytest.skip("triton is not installed")
    from fused_attn.kernels.triton import ffn as kernels

    tall = torch.zeros(1, 1).expand(backends.MAX_EXTENT + 1, 1)  # no memory behind it: refused before any launch
    with pytest.raises(ValueError, match="dims up to"):
        kernels.gemm(tall, torch.zeros(1, 1), tall)


def test_triton_launchers_refuse_extents_that_would_wrap():
    """What the backend choice declines (a traced graph with a dynamic size can still bring it) the
    launchers refuse before any launch or allocation."""
    if backends.triton_version() is None:
        pytest.skip("triton is not installed")
    from fused_attn.kernels.triton import attention, layer_norm, softmax

    wide = torch.zeros(1, 1).expand(1, backends.MAX_EXTENT + 1)  # no memory behind it
    with pytest.raises(ValueError, match="LayerNorm kernels take rows up to"):
        layer_norm.norm_fwd(wide, None, None, None, None, 1e-5, 0.0, 0)
    with pytest.raises(ValueError, match="LayerNorm kernels take rows up to"):
        layer_norm.norm_bwd(wide, None, wide, torch.zeros(1), torch.ones(1), None, 0.0, 0,
                            dict(dx=True, dinput=False, dweight=False, dbias=False, dinput_bias=False))
    with pytest.raises(ValueError, match="softmax kernel takes rows up to"):
        softmax.softmax_fwd(wide[None, None], None, 1.0, False)
    long = torch.zeros(1, 1, 1, 16).expand(1, 1, backends.MAX_EXTENT + 1, 16)
    q = torch.zeros(1, 1, 1, 16)
    with pytest.raises(ValueError, match="take lengths up to"):
        attention.attention_fwd(q, long, long, None, 1.0, False, 0.0, 0)


def test_triton_row_kernels_launch_in_chunks_past_the_grid_limit(monkeypatch):
    """The softmax and LayerNorm kernels have a program per row and take their first row as an argument:
    past the grid limit they are launched once per chunk of rows. With chunks of 3 rows the results
    are those of one launch, bit for bit (a chunk that ignored its first row would leave rows unset)."""
    if backends.triton_version() is None or not backends.triton_interpret_mode():
        pytest.skip("needs triton and TRITON_INTERPRET=1")
    from fused_attn.kernels.triton import _grid, layer_norm, softmax

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 2, 11, generator=gen).transpose(1, 2)  # 20 strided rows
    mask = torch.randn(1, 2, 5, 11, generator=gen)
    long = torch.randn(1, 1, 4, 16385, generator=gen)  # streamed in blocks
    dy = torch.randn(2, 2, 5, 11, generator=gen)
    h, res = torch.randn(7, 24, generator=gen), torch.randn(7, 24, generator=gen)
    w, b, xb = torch.randn(24, generator=gen), torch.randn(24, generator=gen), torch.randn(24, generator=gen)

    def run():
        y = softmax.softmax_fwd(x, mask.expand(x.shape), 0.5, True)
        streamed = softmax.softmax_fwd(long, None, 1.0, False)
        grads = softmax.softmax_bwd(dy, y, 0.5, True)
        norm = layer_norm.norm_fwd(h, res, w, b, xb, 1e-5, 0.25, 7)
        return [y, streamed, *grads, *[t for t in norm if t is not None]]

    whole = run()
    monkeypatch.setattr(_grid, "ROW_CHUNK", 3)
    assert list(_grid.row_chunks(20)) == [(0, 3), (3, 3), (6, 3), (9, 3), (12, 3), (15, 3), (18, 2)]
    for chunked, expected in zip(run(), whole):
        assert torch.equal(chunked, expected)


def test_triton_attention_refuses_grids_past_the_launch_limit():
    """2^31 one-row heads would need more programs than a launch takes: refused with the reason,
    before any allocation (the expanded inputs below have no memory behind them)."""
    if backends.triton_version() is None:
        pytest.skip("triton is not installed")
    from fused_attn.kernels.triton import attention

    q = torch.zeros(1, 1, 1, 16).expand(2**31, 1, 1, 16)
    with pytest.raises(ValueError, match=r"batch \* heads = 2147483648 .* split the batch"):
        attention.attention_fwd(q, q, q, None, 1.0, False, 0.0, 0)
    stats = torch.zeros(1, 1, 2, 1).expand(2**31, 1, 2, 1)
    with pytest.raises(ValueError, match=r"batch \* heads = 2147483648 .* split the batch"):
        attention.attention_bwd(q, q, q, q, None, stats, 1.0, False, 0.0, 0, False)
    attention._check_extents(2**26, 1, 992, 1)  # 31 tiles of 32 rows per head: 2^31 - 2^26 programs
    with pytest.raises(ValueError, match="split the batch"):
        attention._check_extents(2**26, 1, 993, 1)  # 32 tiles: 2^31


def test_symbolic_tracing_outside_dynamo_takes_the_full_choice_path():
    """make_fx (and export) trace with symbolic sizes that Dynamo's is_compiling() does not flag:
    such a call is not remembered (a symbolic size is neither hashable nor fixed) and traces."""
    from torch.fx.experimental.proxy_tensor import make_fx

    backends.clear_choices()
    x = torch.randn(5, 8)
    for fn in (lambda x: fused_attn.softmax(x, -1), lambda x: fused_attn.linear_gelu(x, torch.ones(4, 8))):
        graph = make_fx(fn, tracing_mode="symbolic")(torch.randn(3, 8))
        torch.testing.assert_close(graph(x), fn(x))  # another length than traced
    assert all(type(value) in (int, bool) for key in backends._CHOICES for _, value in key[5:])


def test_remembered_choices_follow_the_triton_interpreter_switch(monkeypatch):
    """The choice cache keys on TRITON_INTERPRET: switching it off at run time makes Triton on CPU
    tensors refused at the next call, not served from a choice made while it was on."""
    if backends.triton_version() is None:
        pytest.skip("triton is not installed")
    x = torch.randn(4, 8)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    fused_attn.softmax(x, backend="triton")
    assert fused_attn.last_backend("softmax") == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(BackendNotSupportedError, match="only under TRITON_INTERPRET=1"):
        fused_attn.softmax(x, backend="triton")
    assert backends.select("softmax", Inputs(x.device, x.dtype, {"n_cols": 8})) != "triton"


def test_empty_inputs_are_served_by_the_reference_and_say_so(monkeypatch):
    """Nothing to compute launches no kernel: the reference gives the empty result, and
    last_backend names it rather than the backend the policy chose."""
    monkeypatch.setattr(backends, "_warned", set())  # a fallback warned earlier in the run warns again
    fused_attn.layer_norm(torch.randn(4, 8), (8,), backend="cpu")
    assert fused_attn.last_backend("layer_norm") == "cpu"
    out = fused_attn.layer_norm(torch.randn(0, 8), (8,), backend="cpu")
    assert out.shape == (0, 8) and fused_attn.last_backend("layer_norm") == "reference"
    q = torch.randn(1, 2, 3, 8)
    out = fused_attn.scaled_dot_product_attention(q, q[:, :, :0], q[:, :, :0], backend="cpu")
    assert torch.equal(out, torch.zeros_like(q)) and fused_attn.last_backend("scaled_dot_product_attention") == "reference"
    # A zero head dim is empty too: no kernel limit applies to it (no FallbackWarning, no refusal).
    empty, values = torch.randn(1, 2, 3, 0), torch.randn(1, 2, 3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for v in (empty, values):
            for backend in (None, "cpu"):
                out = fused_attn.scaled_dot_product_attention(empty, empty, v, backend=backend)
                torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(empty, empty, v))
                assert fused_attn.last_backend("scaled_dot_product_attention") == "reference"
        # Nor does a dtype no kernel serves (float64) announce a fallback when there is nothing to
        # compute, or everything is dropped.
        f64 = torch.randn(0, 8, dtype=torch.float64)
        assert fused_attn.layer_norm(f64, (8,)).shape == (0, 8)
        assert fused_attn.softmax(f64).shape == (0, 8)
        q64 = torch.randn(1, 2, 3, 8, dtype=torch.float64)
        out = fused_attn.scaled_dot_product_attention(q64, q64, q64, dropout_p=1.0)
        assert torch.equal(out, torch.zeros_like(q64))
        assert fused_attn.last_backend("scaled_dot_product_attention") == "reference"
    # A named backend is still held to what it serves.
    with pytest.raises(BackendNotSupportedError, match="float64"):
        fused_attn.layer_norm(f64, (8,), backend="cpu")


def test_the_reference_serves_any_device():
    """Named, the reference runs wherever torch runs (here meta tensors, for shapes); under auto
    it serves them too, with a FallbackWarning naming the device."""
    meta = lambda *shape: torch.randn(*shape, device="meta")  # noqa: E731
    q, w, b = meta(2, 3, 5, 8), meta(8), meta(8)
    calls = {
        "scaled_dot_product_attention": lambda backend: fused_attn.scaled_dot_product_attention(q, q, q, backend=backend),
        "softmax": lambda backend: fused_attn.softmax(q, backend=backend),
        "layer_norm": lambda backend: fused_attn.layer_norm(q, (8,), w, b, backend=backend),
        "add_layer_norm": lambda backend: fused_attn.add_layer_norm(q, q, w, b, backend=backend),
        "linear_gelu": lambda backend: fused_attn.linear_gelu(q, meta(16, 8), meta(16), backend=backend),
        "ffn": lambda backend: fused_attn.ffn(q, meta(16, 8), meta(16), meta(8, 16), b, backend=backend),
    }
    assert set(calls) == set(backends.registered_ops())
    for op, call in calls.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = call("reference")
        assert out.device.type == "meta" and fused_attn.last_backend(op) == "reference"
        assert backends.registered_ops()[op].supports["reference"].describe().startswith("devices=any;")
        backends._warned.clear()
        with pytest.warns(FallbackWarning, match="no fused backend for meta tensors"):
            assert call(None).shape == out.shape
        with pytest.raises(BackendNotSupportedError, match="device meta not in"):
            call("cpu")



@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_dropout_of_one_is_answered_by_the_reference(backend):
    """dropout_p=1 drops everything, as torch's dropout: no kernel runs, no warning, and the
    result and gradients are the reference's (zeros, or layer_norm(residual) for Add & Norm)."""
    if backend not in fused_attn.available_backends("cpu"):
        pytest.skip(f"{backend} is not available here")
    q, x, r = (torch.randn(*s, requires_grad=True) for s in ((1, 2, 5, 8), (3, 8), (3, 8)))
    w1, w2 = torch.randn(16, 8, requires_grad=True), torch.randn(8, 16, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = fused_attn.scaled_dot_product_attention(q, q, q, dropout_p=1.0, backend=backend)
        assert fused_attn.last_backend("scaled_dot_product_attention") == "reference"
        norm = fused_attn.add_layer_norm(x, r, None, None, dropout_p=1.0, backend=backend)
        assert fused_attn.last_backend("add_layer_norm") == "reference"
        ffn = fused_attn.ffn(x, w1, None, w2, None, dropout_p=1.0, backend=backend)
        assert fused_attn.last_backend("ffn") == "reference"
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(ffn, torch.zeros_like(ffn))
    torch.testing.assert_close(norm, torch.nn.functional.layer_norm(r, (8,)))
    (out.sum() + norm.square().sum() + ffn.sum()).backward()
    for t in (q, x, w1, w2):
        assert torch.equal(t.grad, torch.zeros_like(t))
    torch.testing.assert_close(r.grad, torch.autograd.grad(torch.nn.functional.layer_norm(r, (8,)).square().sum(), r)[0])

def _forward_ad_calls(backend):
    """op -> (fn of the differentiable tensors, primals, tangents), small float32 sizes."""
    gen = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=gen) / 2

    def pair(*shapes):
        return tuple(t(*s) for s in shapes), tuple(t(*s) for s in shapes)

    calls = {
        "layer_norm": (lambda x, w, b: fused_attn.layer_norm(x, (16,), w, b, backend=backend), (6, 16), (16,), (16,)),
        "add_layer_norm": (lambda x, r, w, b: fused_attn.add_layer_norm(x, r, w, b, backend=backend),
                           (6, 16), (6, 16), (16,), (16,)),
        "scaled_dot_product_attention": (
            lambda q, k, v, m: fused_attn.scaled_dot_product_attention(q, k, v, m, backend=backend),
            (1, 2, 5, 16), (1, 2, 7, 16), (1, 2, 7, 16), (5, 7)),
        "softmax": (lambda s, m: fused_attn.softmax(s, mask=m, scale=0.5, backend=backend), (1, 2, 5, 7), (5, 7)),
        "linear_gelu": (lambda x, w, b: fused_attn.linear_gelu(x, w, b, backend=backend), (6, 16), (8, 16), (8,)),
        "ffn": (lambda x, w1, b1, w2, b2: fused_attn.ffn(x, w1, b1, w2, b2, backend=backend),
                (6, 16), (8, 16), (8,), (16, 8), (16,)),
    }
    return {op: (fn, *pair(*shapes)) for op, (fn, *shapes) in calls.items()}


FORWARD_AD_OPS = ["layer_norm", "add_layer_norm", "scaled_dot_product_attention", "softmax", "linear_gelu", "ffn"]


@pytest.mark.parametrize("op", FORWARD_AD_OPS)
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_forward_mode_ad_is_refused_by_a_named_fused_backend(op, backend):
    """The fused ops have no forward derivative: a tangent on any input must not pass over them
    silently (a custom op without a forward formula would give a zero or missing tangent)."""
    if backend not in fused_attn.available_backends("cpu"):
        pytest.skip(f"{backend} is not available here")
    fn, primals, tangents = _forward_ad_calls(backend)[op]
    for i in range(len(primals)):  # a tangent on each argument in turn
        only = tuple(tan if j == i else torch.zeros_like(tan) for j, tan in enumerate(tangents))
        with pytest.raises(BackendNotSupportedError, match="forward-mode AD"):
            torch.func.jvp(fn, primals, only)
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level(), pytest.raises(BackendNotSupportedError, match="forward-mode AD"):
        fn(fwAD.make_dual(primals[0], tangents[0]), *primals[1:])
    fn(*primals)  # the same call without a tangent is served


# What each op computes, in plain torch functions that have forward derivatives (torch's SDPA has
# none on CPU): the truth for the tangents.
_EAGER = {
    "layer_norm": lambda x, w, b: F.layer_norm(x, (16,), w, b),
    "add_layer_norm": lambda x, r, w, b: F.layer_norm(r + x, (16,), w, b),
    "scaled_dot_product_attention": lambda q, k, v, m: torch.softmax(q @ k.transpose(-1, -2) / 4 + m, -1) @ v,
    "softmax": lambda s, m: torch.softmax(s * 0.5 + m, -1),
    "linear_gelu": lambda x, w, b: F.gelu(F.linear(x, w, b)),
    "ffn": lambda x, w1, b1, w2, b2: F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2),
}


@pytest.mark.parametrize("op", FORWARD_AD_OPS)
def test_forward_mode_ad_under_auto_runs_the_reference(op):
    """auto serves a call with a tangent by the reference (a FallbackWarning says so once), and
    the tangent is torch's; the same call without one goes back to the fused kernel."""
    fn, primals, tangents = _forward_ad_calls(None)[op]
    expected = torch.func.jvp(_EAGER[op], primals, tangents)
    backends._warned.clear()
    with pytest.warns(FallbackWarning, match="forward-mode AD"):
        got = torch.func.jvp(fn, primals, tangents)
    assert fused_attn.last_backend(op) == "reference"
    torch.testing.assert_close(got, expected)
    with warnings.catch_warnings():  # torch.func.jacfwd: tangents batched by vmap
        warnings.simplefilter("ignore", FallbackWarning)
        jacobian = torch.func.jacfwd(lambda x: fn(x, *primals[1:]))(primals[0])
    torch.testing.assert_close(jacobian, torch.func.jacfwd(lambda x: _EAGER[op](x, *primals[1:]))(primals[0]))
    fn(*primals)
    assert fused_attn.last_backend(op) != "reference"


def test_every_transform_feature_has_a_reason():
    """Each feature transform_features can set is one the backends refuse with a reason of its own."""
    from fused_attn.ops import _validate

    assert set(backends._TRANSFORMS) == set(_validate.TRANSFORMS)


@pytest.mark.parametrize("op", FORWARD_AD_OPS)
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_func_grad_is_refused_by_a_named_fused_backend(op, backend):
    """torch.func.grad/vjp wrap tensors that the fused ops' autograd formulas cannot take: a
    named fused backend says so (not torch's "cannot use C++ torch::autograd::Function ...")."""
    if backend not in fused_attn.available_backends("cpu"):
        pytest.skip(f"{backend} is not available here")
    fn, primals, _ = _forward_ad_calls(backend)[op]
    with pytest.raises(BackendNotSupportedError, match="torch.func grad, vjp"):
        torch.func.grad(lambda *a: fn(*a).sum())(*primals)
    with pytest.raises(BackendNotSupportedError, match="torch.func grad, vjp"):
        torch.func.vjp(fn, *primals)
    batched = torch.func.vmap(lambda x: fn(x, *primals[1:]))(primals[0][None])
    assert torch.equal(batched, fn(*primals)[None])  # vmap alone: served, once per batch element


@pytest.mark.parametrize("op", FORWARD_AD_OPS)
def test_func_grad_under_auto_runs_the_reference(op):
    """auto serves a call inside torch.func.grad/vjp/jacrev by the reference (a FallbackWarning
    says so once), with torch's gradients, also per sample under vmap; outside it the fused kernel."""
    fn, primals, _ = _forward_ad_calls(None)[op]
    argnums = tuple(range(len(primals)))
    expected = torch.func.grad(lambda *a: _EAGER[op](*a).square().sum(), argnums)(*primals)
    backends._warned.clear()
    with pytest.warns(FallbackWarning, match="torch.func grad, vjp"):
        got = torch.func.grad(lambda *a: fn(*a).square().sum(), argnums)(*primals)
    assert fused_attn.last_backend(op) == "reference"
    torch.testing.assert_close(got, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        jacobian = torch.func.jacrev(lambda x: fn(x, *primals[1:]))(primals[0])
        batch = torch.stack([primals[0], primals[0].flip(0)])  # per-sample gradients: vmap(grad)
        per_sample = torch.func.vmap(torch.func.grad(lambda x: fn(x, *primals[1:]).square().sum()))(batch)
    torch.testing.assert_close(jacobian, torch.func.jacrev(lambda x: _EAGER[op](x, *primals[1:]))(primals[0]))
    eager_grad = torch.func.grad(lambda x: _EAGER[op](x, *primals[1:]).square().sum())
    torch.testing.assert_close(per_sample, torch.stack([eager_grad(x) for x in batch]))
    fn(*primals)
    assert fused_attn.last_backend(op) != "reference"


def test_func_grad_through_an_optimized_layer():
    """Per-sample parameter gradients (vmap(grad) over functional_call) of an optimize()d encoder
    layer are torch's: the fused modules' calls go to the reference inside the transform."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    fused = fused_attn.optimize(layer, inplace=False).model
    x = torch.randn(3, 5, 16)

    def per_sample(module):
        params = dict(module.named_parameters())

        def loss(p, xi):
            return torch.func.functional_call(module, p, (xi[None],)).square().sum()

        return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        got = per_sample(fused)
    torch.testing.assert_close(got, per_sample(layer))


def test_learned_per_row_bias_gradient_is_exactly_zero_on_the_reference():
    """The reference (also what auto runs for float64) gives a key-size-1 bias its exact zero
    gradient, as the fused backends: not the rounding noise of Lk terms that cancel."""
    gen = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.float64):
        q, k, v = (torch.randn(1, 2, 6, 16, generator=gen, dtype=dtype) for _ in range(3))
        bias = torch.randn(1, 2, 6, 1, generator=gen, dtype=dtype, requires_grad=True)
        out = fused_attn.scaled_dot_product_attention(q, k, v, bias, backend="reference")
        (grad,) = torch.autograd.grad(out.square().sum(), bias)
        assert torch.equal(grad, torch.zeros_like(bias)), dtype


def test_forward_mode_ad_with_a_learned_per_row_bias():
    """A float mask of key size 1 that requires grad takes its own path (its gradient is exactly 0,
    softmax ignores it); a tangent on it moves no output either."""
    import torch.autograd.forward_ad as fwAD

    gen = torch.Generator().manual_seed(0)
    q, k, v, tq = (torch.randn(1, 2, 5, 16, generator=gen) for _ in range(4))
    m, tm = torch.randn(1, 2, 5, 1, generator=gen).requires_grad_(), torch.randn(1, 2, 5, 1, generator=gen)
    expected = torch.func.jvp(lambda q, m: _EAGER["scaled_dot_product_attention"](q, k, v, m), (q, m.detach()),
                              (tq, tm))[1]
    with warnings.catch_warnings(), fwAD.dual_level():
        warnings.simplefilter("ignore", FallbackWarning)
        out = fused_attn.scaled_dot_product_attention(fwAD.make_dual(q, tq), k, v, fwAD.make_dual(m, tm))
        torch.testing.assert_close(fwAD.unpack_dual(out).tangent, expected)


def _package_imports(path: pathlib.Path) -> set[str]:
    """The modules of the package that ``path`` imports, as dotted names under ``fused_attn``."""
    package = "fused_attn." + ".".join(path.relative_to(PACKAGE_ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.rstrip(".").split(".")
            base = base[: len(base) - node.level + 1]
            found.add(".".join(base + ([node.module] if node.module else [])))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            found.update(n for n in names if n and n.split(".")[0] == "fused_attn")
    return found


def test_importing_the_package_leaves_torch_compile_s_machinery_alone():
    """``import fused_attn`` (and its modules, models and Hugging Face integration) imports neither
    torch._dynamo nor sympy: they would add about 0.9 s to it on a 2-core CPU (twenty times the
    rest), for users who never compile. torch.compile imports them when it is used, and the
    Triton backend Triton at its first call."""
    code = ("import sys, fused_attn, fused_attn.nn, fused_attn.models, fused_attn.integrations.hf\n"
            "print(sorted(m for m in ('torch._dynamo', 'sympy', 'torch.nn.attention.bias', 'triton')"
            " if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE_ROOT.parent)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]", run.stdout


@pytest.mark.parametrize("layer, allowed", [
    ("kernels", ("fused_attn.kernels", "fused_attn._env")),
    ("reference", ("fused_attn.reference",)),
])
def test_lower_layers_import_nothing_above_them(layer, allowed):
    """Kernels and references sit at the bottom: the Triton kernels read the environment from
    ``_env`` (which imports nothing of the package), never the backend policy or the ops."""
    assert "fused_attn" not in _package_imports(PACKAGE_ROOT / "_env.py")
    for path in sorted((PACKAGE_ROOT / layer).rglob("*.py")):
        above = {m for m in _package_imports(path) if not m.startswith(allowed)}
        assert not above, f"{path.relative_to(PACKAGE_ROOT)} imports {sorted(above)}"
