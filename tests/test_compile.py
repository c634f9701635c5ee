"""The public ops, the fused modules and optimize()d models under torch.compile(fullgraph=True):
one graph (no breaks), forward and backward equal to eager, and with dynamic=True one graph for
two sequence lengths."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import fused_attn
from fused_attn.nn import (
    FusedFFN,
    FusedLayerNorm,
    FusedMultiheadAttention,
    FusedTransformerDecoderLayer,
    FusedTransformerEncoderLayer,
)

from .conftest import assert_model_parity


def _require(backend: str) -> None:
    if backend not in fused_attn.available_backends("cpu"):
        pytest.skip(f"{backend} is not available here")


def _loss(out):
    """A fixed random projection of the outputs (a squared sum would be constant for normalised
    outputs, leaving gradients of rounding noise to compare)."""
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(123)
    return sum((o.float() * torch.randn(o.shape, generator=gen)).sum() for o in outs if isinstance(o, torch.Tensor))


def _grads(out, inputs):
    inputs = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return torch.autograd.grad(_loss(out), inputs) if inputs else ()


def _compiled_matches_eager(fn, calls, *, dynamic=False, backend="aot_eager", graphs=1, atol=1e-5):
    """Runs ``fn`` compiled (fullgraph) and eager on every argument tuple in ``calls``: the same
    outputs and input gradients, and ``graphs`` graphs compiled for all the calls. The compiled
    call comes first, as in a process that compiles before it runs anything eagerly (what an
    eager call leaves behind, e.g. a record filled on first use, is then not there yet)."""
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(fn, fullgraph=True, backend=backend, dynamic=dynamic)
    for args in calls:
        eager_args = [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                      for a in args]
        got = compiled(*args)
        expected = fn(*eager_args)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=atol)
        for g, e in zip(_grads(got, args), _grads(expected, eager_args)):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=atol)
    assert counters["stats"]["unique_graphs"] == graphs, dict(counters["stats"])


def _randn(*shape, grad=True, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).requires_grad_(grad)


# Each op: a function of a sequence length giving (fn, args), with the fused backend bound.
def _attention(backend):
    def make(seq):
        q, k, v = (_randn(1, 2, seq, 16, seed=i) for i in range(3))
        bias = _randn(1, 1, seq, seq, seed=3)
        row_bias = _randn(1, 2, seq, 1, seed=4)  # learned, one per query and head: its own gradient path
        pad = torch.arange(seq)[None, None, None, :] < seq - 3
        return (lambda q, k, v, bias, row_bias, pad: (
            fused_attn.scaled_dot_product_attention(q, k, v, bias, scale=0.3, backend=backend),
            fused_attn.scaled_dot_product_attention(q, k, v, pad, is_causal=True, backend=backend),
            # grouped-query: one key/value head for the two query heads
            fused_attn.scaled_dot_product_attention(q, k[:, :1], v[:, 1:], enable_gqa=True, backend=backend),
            fused_attn.scaled_dot_product_attention(q, k, v, row_bias, backend=backend),
        )), (q, k, v, bias, row_bias, pad)
    return make


def _softmax(backend):
    def make(seq):
        x, pad = _randn(2, 3, seq, seq), torch.arange(seq) < seq - 2
        return (lambda x, pad: fused_attn.softmax(x, -1, pad, backend=backend)), (x, pad)
    return make


def _layer_norm(backend):
    def make(seq):
        x, w, b = _randn(2, seq, 32), _randn(32, seed=1), _randn(32, seed=2)
        return (lambda x, w, b: fused_attn.layer_norm(x, (32,), w, b, 1e-6, backend=backend)), (x, w, b)
    return make


def _add_layer_norm(backend):
    def make(seq):
        x, r, w, b, ib = _randn(2, seq, 32), _randn(2, seq, 32, seed=1), _randn(32, seed=2), _randn(32, seed=3), \
            _randn(32, seed=4)
        return (lambda x, r, w, b, ib: fused_attn.add_layer_norm(x, r, w, b, 1e-6, input_bias=ib, return_prenorm=True,
                                                                 backend=backend)), (x, r, w, b, ib)
    return make


def _linear_gelu(backend):
    def make(seq):
        x, w, b = _randn(2, seq, 16), _randn(48, 16, seed=1), _randn(48, seed=2)
        return (lambda x, w, b: fused_attn.linear_gelu(x, w, b, "tanh", backend=backend)), (x, w, b)
    return make


def _ffn(backend):
    def make(seq):
        x, w1, b1, w2, b2 = _randn(seq, 16), _randn(48, 16, seed=1), _randn(48, seed=2), _randn(16, 48, seed=3), \
            _randn(16, seed=4)
        return (lambda x, w1, b1, w2, b2: fused_attn.ffn(x, w1, b1, w2, b2, backend=backend)), (x, w1, b1, w2, b2)
    return make


OPS = {"attention": _attention, "softmax": _softmax, "layer_norm": _layer_norm, "add_layer_norm": _add_layer_norm,
       "linear_gelu": _linear_gelu, "ffn": _ffn}


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("op", list(OPS))
def test_ops_compile_whole_forward_and_backward(op, backend):
    _require(backend)
    fn, args = OPS[op](backend)(12)
    _compiled_matches_eager(fn, [args])


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("op", list(OPS))
def test_ops_compile_whole_with_a_data_dependent_length(op, backend):
    """Rows picked by a mask (``nonzero``: a length known only from the data, an unbacked size)
    reach each op in a full graph, forward and backward: the backend choice asks whether an operand
    is empty without guarding on the data (a guard there fails the graph)."""
    _require(backend)
    fn, args = OPS[op](backend)(12)
    # The operands whose rows (dim -2) are picked: the queries (and the masks' query rows), the
    # rows of a norm or FFN (and the residual's).
    picked = {"attention": (0, 3, 4), "add_layer_norm": (0, 1)}.get(op, (0,))

    def on_picked_rows(keep, *args):
        rows = keep.nonzero().squeeze(1)
        return fn(*(a.index_select(-2, rows) if i in picked else a for i, a in enumerate(args)))

    keep = torch.arange(12) % 3 != 0
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        _compiled_matches_eager(on_picked_rows, [(keep, *args)])


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("op", list(OPS))
def test_ops_compile_one_graph_for_two_lengths(op, backend):
    """dynamic=True: the lengths (and the float arguments: scale, eps) are symbolic; one graph."""
    _require(backend)
    make = OPS[op](backend)
    fn, first = make(12)
    _, second = make(20)
    _compiled_matches_eager(fn, [first, second], dynamic=True)


def test_ops_compile_with_inductor():
    """Inductor (the default backend; it builds C++ here) around the fused ops."""
    _require("cpu")

    def block(q, x, w, b, w1, w2):
        a = fused_attn.scaled_dot_product_attention(q, q, q, is_causal=True)
        h = fused_attn.add_layer_norm(x, a.transpose(1, 2).flatten(2), w, b)
        return fused_attn.ffn(h, w1, None, w2, None)

    args = (_randn(2, 2, 8, 8), _randn(2, 8, 16, seed=1), _randn(16, seed=2), _randn(16, seed=3),
            _randn(32, 16, seed=4), _randn(16, 32, seed=5))
    _compiled_matches_eager(block, [args], backend="inductor", atol=1e-4)


def test_fallback_and_eager_calls_do_not_break_or_recompile_the_graph():
    """A fallback to the reference inside a compiled region warns (once, when the region runs)
    rather than breaking the graph, and calls made eagerly in between, which update what
    last_backend reports, do not make the compiled function recompile."""
    fn = lambda x: fused_attn.layer_norm(x, (8,)) * 2  # noqa: E731
    x64 = torch.randn(3, 8, dtype=torch.float64)
    message = "fused_attn.layer_norm: running the reference PyTorch implementation"
    fused_attn.backends._warned = {m for m in fused_attn.backends._warned if not m.startswith(message)}
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    with pytest.warns(fused_attn.FallbackWarning, match="running the reference"):
        torch.testing.assert_close(compiled(x64), fn(x64))
    assert fused_attn.last_backend("layer_norm") == "reference"
    fused_attn.softmax(torch.randn(2, 4), backend="reference")
    fused_attn.layer_norm(torch.randn(2, 8), (8,), backend="reference")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compiled(x64)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_the_package_marks_constants_as_torch_s_decorator_does():
    """fused_attn._extension.assume_constant sets by hand the mark that
    torch.compiler.assume_constant_result sets (so that importing the package need not import
    torch._dynamo): the same attributes on the function, and the functions the backend choice
    runs while a graph is traced carry it."""
    from fused_attn import _extension, backends

    def by_torch():
        pass

    def by_package():
        pass

    torch.compiler.assume_constant_result(by_torch)
    _extension.assume_constant(by_package)
    assert vars(by_torch) == vars(by_package) == {"_dynamo_marked_constant": True}
    for fn in (_extension.has_kernel, backends.warn_once):
        assert vars(fn).get("_dynamo_marked_constant") is True, fn.__name__


def test_use_backend_is_read_when_the_graph_is_traced():
    """use_backend() around the first call of a compiled function picks the backend its graph
    runs (read once at trace time, as the environment is), with no graph break."""
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: fused_attn.layer_norm(x, (8,)) * 2, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 8)
    with fused_attn.use_backend("reference"):
        out = compiled(x)
    assert fused_attn.last_backend("layer_norm") == "reference"
    torch.testing.assert_close(out, F.layer_norm(x, (8,)) * 2)


# ---------------------------------------------------------------------------------------------
# Modules and models


def _module_calls(module_kind):
    torch.manual_seed(0)
    if module_kind == "layer_norm":
        module = FusedLayerNorm(32)
        return module, lambda m, x: m(x), lambda seq: (_randn(2, seq, 32),)
    if module_kind == "ffn":
        module = FusedFFN(32, 64, dropout=0.0)
        return module, lambda m, x: m(x), lambda seq: (_randn(2, seq, 32),)
    if module_kind == "mha-causal-padding":  # the causal hint with a key padding mask: torch's rule
        module = FusedMultiheadAttention(32, 4, batch_first=True)

        def call(m, x):
            seq = x.shape[1]
            pad = (torch.arange(seq) >= seq - 3).expand(2, seq)
            causal = nn.Transformer.generate_square_subsequent_mask(seq)
            return m(x, x, x, key_padding_mask=pad, attn_mask=causal, is_causal=True, need_weights=False)[0]

        return module, call, lambda seq: (_randn(2, seq, 32),)
    if module_kind.startswith("mha"):
        module = FusedMultiheadAttention(32, 4, batch_first=True)
        need_weights = module_kind == "mha-weights"
        return module, lambda m, x: m(x, x, x, need_weights=need_weights)[0 if not need_weights else slice(None)], \
            lambda seq: (_randn(2, seq, 32),)
    if module_kind == "encoder":
        module = FusedTransformerEncoderLayer(32, 4, 64, dropout=0.0, activation="gelu", batch_first=True)
        return module, lambda m, x: m(x), lambda seq: (_randn(2, seq, 32),)
    module = FusedTransformerDecoderLayer(32, 4, 64, dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
    return module, lambda m, x, mem: m(x, mem), lambda seq: (_randn(2, seq, 32), _randn(2, seq + 3, 32, seed=1))


@pytest.mark.parametrize("module_kind", ["layer_norm", "ffn", "mha", "mha-weights", "mha-causal-padding", "encoder",
                                         "decoder"])
def test_fused_modules_compile_whole(module_kind, monkeypatch):
    from fused_attn.nn import transformer

    monkeypatch.setattr(transformer, "_KINDS_OF_NAME", {})  # as in a process that has run no layer yet
    module, call, inputs = _module_calls(module_kind)
    _compiled_matches_eager(lambda *args: call(module, *args), [inputs(12), inputs(20)], dynamic=True)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_optimized_reference_bert_compiles_whole(train):
    from fused_attn.models import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig.bert_tiny(vocab_size=50, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    fused_attn.optimize(model)
    model.train(train)

    def run(ids, mask):
        return model(ids, attention_mask=mask).last_hidden_state

    def batch(seq):
        mask = torch.ones(2, seq, dtype=torch.long)
        mask[1, seq - 4:] = 0
        return torch.randint(0, 50, (2, seq), generator=torch.Generator().manual_seed(seq)), mask

    _compiled_matches_eager(run, [batch(12), batch(20)], dynamic=True)
    params = dict(model.named_parameters())
    assert all(p.grad is None for p in params.values())  # the checks above differentiate inputs only


@pytest.mark.parametrize("family", ["bert", "gpt2", "distilbert"])
def test_optimized_hf_models_compile_whole_with_gradients(family):
    """An optimize()d Hugging Face model compiles into one graph (fullgraph), with the parity of
    eager: BERT (its fused attention, Add & Norm and intermediate blocks) and models whose
    feed-forward blocks run as one fused ffn call (GPT-2's Conv1D MLP, DistilBERT's FFN through its
    ff_chunk)."""
    transformers = pytest.importorskip("transformers")
    if family == "bert":
        config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=64, hidden_dropout_prob=0.0,
                                         attention_probs_dropout_prob=0.0)
        cls = transformers.BertModel
    elif family == "gpt2":
        config = transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=2, n_positions=32,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                         eos_token_id=0)
        cls = transformers.GPT2Model
    else:
        config = transformers.DistilBertConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2, hidden_dim=64,
                                               max_position_embeddings=32, dropout=0.0, attention_dropout=0.0)
        cls = transformers.DistilBertModel
    torch.manual_seed(0)
    plain = cls(config).train()
    model = copy.deepcopy(plain)
    report = fused_attn.optimize(model)
    assert {"FusedBertIntermediate", "FusedGPT2MLP", "FusedFFN"} & {new for _, _, new in report.replaced}
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(lambda m: m(input_ids=ids, attention_mask=mask).last_hidden_state, fullgraph=True,
                             backend="aot_eager")
    # The compiled fused model against the float64 eager truth, within 3x the error of the plain
    # float32 eager model: output and every parameter gradient (conftest).
    assert_model_parity(plain, model, lambda m: compiled(m) if m is model else
                        m(input_ids=ids, attention_mask=mask).last_hidden_state)
    assert counters["stats"]["unique_graphs"] == 1


def test_optimized_hf_bert_compiles_once_for_every_batch_and_length(monkeypatch):
    """An optimize()d Hugging Face BERT under torch.compile(dynamic=True): one graph for training
    steps of three batch sizes and lengths. Nothing the fused attention looks up once (transformers'
    output collector) is filled while the first call is traced, which would change it under that
    trace's guard and recompile at the next call."""
    transformers = pytest.importorskip("transformers")
    from fused_attn.integrations import hf

    monkeypatch.setattr(hf, "_COLLECTOR", [])  # as in a process that has not run the attention yet
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64)
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(config).train()
    fused_attn.optimize(model)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, dynamic=True, fullgraph=True, backend="aot_eager")
    for batch, length in ((2, 12), (3, 17), (5, 30)):
        ids = torch.randint(0, 50, (batch, length), generator=torch.Generator().manual_seed(batch))
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[-1, length // 2:] = 0
        compiled(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


@pytest.mark.cuda
def test_optimized_bert_inference_runs_in_cuda_graphs():
    """torch.compile(mode="reduce-overhead") captures an optimize()d BERT's inference in a CUDA
    graph (nothing in the fused ops makes Inductor skip it: no CPU tensor, no host sync) and the
    replays give eager's outputs: the remedy for host time per call on small inputs."""
    from fused_attn.models import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig.bert_tiny(vocab_size=50)).cuda().half().eval()
    fused_attn.optimize(model)
    ids = torch.randint(0, 50, (1, 32), device="cuda")
    mask = torch.ones(1, 32, dtype=torch.long, device="cuda")
    mask[0, 28:] = 0
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(lambda i, m: model(i, attention_mask=m).last_hidden_state, mode="reduce-overhead")
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).last_hidden_state
        for _ in range(3):  # warm-up, record, replay
            out = compiled(ids, mask).clone()
            torch.testing.assert_close(out, expected, rtol=1e-2, atol=1e-2)  # float16, Inductor vs eager glue
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])


def test_first_compile_in_a_fresh_process_traces_once():
    """No module state of the package changes while the first call is traced (e.g. a cache filled
    on first use), so the guards of the first graph hold and identical calls do not recompile."""
    import subprocess
    import sys

    script = """
import torch, torch._dynamo
from torch._dynamo.utils import counters
from fused_attn.nn import FusedLayerNorm
torch._dynamo.config.error_on_recompile = True
compiled = torch.compile(FusedLayerNorm(32), fullgraph=True, backend="aot_eager")
x = torch.randn(4, 32)
for _ in range(3):
    compiled(x)
print(counters["stats"]["unique_graphs"])
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "1"


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_export_of_an_optimized_layer_with_a_dynamic_sequence_length(backend):
    """torch.export (non-strict) of an optimize()d encoder layer with a dynamic sequence length:
    the ops' backend choice reads the sizes without comparing them in ways that would add guards
    the dynamic range violates; the exported program runs at another length, as eager does."""
    _require(backend)
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, activation="gelu").eval()
    fused_attn.optimize(layer, backend=backend)
    seq = torch.export.Dim("seq", min=2, max=512)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(layer, (torch.randn(2, 10, 32),), dynamic_shapes={"src": {1: seq}})
    x = torch.randn(2, 37, 32)
    torch.testing.assert_close(program.module()(x), layer(x))


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_export_with_a_sequence_dim_without_a_max(backend, strict):
    """torch.export with ``Dim("seq")`` (no max) of the attention and the softmax: the backend
    choice checks the lengths against the kernels' limits (MAX_EXTENT on triton and cuda) without
    a guard, which the unbounded dim would violate (a constraint violation before); the program
    then runs at another length, as eager does."""
    _require(backend)

    class Block(torch.nn.Module):
        def forward(self, q, pad):
            a = fused_attn.scaled_dot_product_attention(q, q, q, pad[:, None, None, :], backend=backend)
            return fused_attn.softmax(a @ q.transpose(-2, -1), -1, is_causal=True, backend=backend)

    def inputs(seq):
        pad = torch.ones(2, seq, dtype=torch.bool)
        pad[1, seq - 2:] = False
        return _randn(2, 2, seq, 8, grad=False), pad

    seq = torch.export.Dim("seq")
    block = Block()
    program = torch.export.export(block, inputs(6), dynamic_shapes=({2: seq}, {1: seq}), strict=strict)
    args = inputs(9)
    torch.testing.assert_close(program.module()(*args), block(*args))


_CACHED_COMPILE = """
import sys, torch
import fused_attn
from torch._dynamo.utils import counters
if sys.argv[1] != "-":  # the tag another version of the package would set
    torch.compiler.config.cache_key_tag = sys.argv[1]
q = torch.randn(1, 2, 8, 8, requires_grad=True)
out = torch.compile(lambda q: fused_attn.scaled_dot_product_attention(q, q, q, is_causal=True), fullgraph=True)(q)
out.sum().backward()
print(torch.compiler.config.cache_key_tag, counters["aot_autograd"]["autograd_cache_hit"])
"""


def test_compile_caches_are_keyed_on_the_package(tmp_path):
    """Importing the package adds its identity (its Python sources and its extension's) to torch's
    compile cache key tag, after a tag the user set: a graph cached by another version of the
    package, whose backward may differ, is compiled afresh instead of being reused."""
    import os
    import subprocess
    import sys

    from fused_attn import _compile_cache

    _require("cpu")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache"), "TORCH_COMPILE_CACHE_KEY_TAG": "mine"}

    def run(tag: str) -> tuple[str, int]:
        done = subprocess.run([sys.executable, "-c", _CACHED_COMPILE, tag], capture_output=True, text=True,
                              timeout=600, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        used, hits = done.stdout.split()[-2:]
        return used, int(hits)

    ours = f"mine+{_compile_cache.identity()}"
    assert run("-") == (ours, 0)  # fills the cache
    assert run("-") == (ours, 1)  # the same package: served from the cache
    other = "mine+fused_attn-0.1.0-0000000000000000"
    assert run(other) == (other, 0)  # another version's tag: compiled afresh


def test_package_identity_follows_its_sources(tmp_path):
    from fused_attn import _compile_cache

    (tmp_path / "ops").mkdir()
    (tmp_path / "ops" / "a.py").write_text("x = 1\n")
    first = _compile_cache.identity(tmp_path, "digest")
    assert first == _compile_cache.identity(tmp_path, "digest")
    assert first != _compile_cache.identity(tmp_path, "another extension")
    (tmp_path / "ops" / "a.py").write_text("x = 2\n")
    assert first != _compile_cache.identity(tmp_path, "digest")
    assert _compile_cache.identity() in torch.compiler.config.cache_key_tag.split("+")
