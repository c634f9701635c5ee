"""Exporting models that use the package: torch.export of the reference models (whose outputs are
dataclasses registered as pytrees) and ONNX export of optimize()d models.

ONNX: under ``torch.onnx.export`` (its torch.export-based exporter, ``dynamo=True``, the default)
every op runs its reference, whose plain ops the exporter translates; the exported graph, run by
ONNX Runtime, gives the eager model's outputs. The TorchScript exporter (``dynamo=False``) is
refused with a TypeError that names the way out. These tests need onnx, onnxscript and
onnxruntime (installed by ``make test``) and are skipped without them.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

import fused_attn
from fused_attn import _extension, backends
from fused_attn.models import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    Transformer,
    TransformerConfig,
)
from fused_attn.models.bert import BertHeadOutput, BertModelOutput
from fused_attn.models.transformer import TransformerOutput


def _bert_config() -> BertConfig:
    return BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=32, num_labels=3)


def _bert_inputs(length: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 97, (2, length), generator=gen)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, length - 4:] = 0
    return ids, mask


def _transformer() -> tuple[Transformer, tuple[torch.Tensor, ...]]:
    config = TransformerConfig(src_vocab_size=61, tgt_vocab_size=53, d_model=32, nhead=2, num_encoder_layers=1,
                               num_decoder_layers=1, dim_feedforward=64, max_position_embeddings=32)
    gen = torch.Generator().manual_seed(0)
    src, tgt = torch.randint(1, 61, (2, 10), generator=gen), torch.randint(1, 53, (2, 8), generator=gen)
    src_pad = torch.zeros(2, 10, dtype=torch.bool)
    src_pad[1, 7:] = True
    return Transformer(config).eval(), (src, tgt, src_pad)


def _leaves(output) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("optimized", [False, True], ids=["plain", "optimized"])
@pytest.mark.parametrize("model", ["BertModel", "BertForSequenceClassification", "Transformer"])
def test_reference_models_export_with_their_output_classes(model, optimized, tmp_path):
    """torch.export takes the reference models whole: their outputs (BertModelOutput,
    BertHeadOutput, TransformerOutput) are pytree nodes, which the exported program returns as
    the same class, also after torch.export.save and load; optimize()d, the program calls the
    fused ops."""
    torch.manual_seed(0)
    if model == "Transformer":
        module, args = _transformer()
        expected_type = TransformerOutput
    else:
        module = (BertModel if model == "BertModel" else BertForSequenceClassification)(_bert_config()).eval()
        args = _bert_inputs()
        expected_type = BertModelOutput if model == "BertModel" else BertHeadOutput
    if optimized:
        fused_attn.optimize(module, backend="cpu" if _extension.loaded() else "triton")
    with torch.no_grad():
        eager = module(*args)
        program = torch.export.export(module, args)
        path = tmp_path / "program.pt2"
        torch.export.save(program, path)
        loaded = torch.export.load(path)
        for run in (program.module(), loaded.module()):
            out = run(*args)
            assert type(out) is expected_type
            assert [f.name for f in dataclasses.fields(out)] == [f.name for f in dataclasses.fields(eager)]
            for got, want in zip(_leaves(out), _leaves(eager), strict=True):
                torch.testing.assert_close(got, want)
    fused_nodes = [n for n in program.graph.nodes if str(n.target).startswith("fused_attn.")]
    assert bool(fused_nodes) == optimized


def test_reference_model_outputs_pass_through_torch_func():
    """torch.func.vjp of functional_call takes the model's output class (a pytree), as it takes
    tensors: gradients of every parameter come back."""
    model = BertModel(_bert_config()).eval()
    params = {name: p.detach() for name, p in model.named_parameters()}
    args = _bert_inputs()
    out, vjp = torch.func.vjp(lambda p: torch.func.functional_call(model, p, args), params)
    assert type(out) is BertModelOutput
    (grads,) = vjp(BertModelOutput(torch.ones_like(out.last_hidden_state), torch.ones_like(out.pooler_output)))
    assert grads.keys() == params.keys()
    assert all(torch.isfinite(g).all() for g in grads.values())


# ---------------------------------------------------------------------------------------------
# ONNX

def _onnx_modules():
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    return pytest.importorskip("onnxruntime")


class _LastHidden(torch.nn.Module):
    """A BERT's last hidden state (Hugging Face's or ours), as the one output of a graph."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids, mask):
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state


class _Encoder(torch.nn.Module):
    """Token ids through an embedding and a torch.nn.TransformerEncoder with a key padding mask."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(97, 32)
        layer = torch.nn.TransformerEncoderLayer(32, 2, 64, batch_first=True, activation="gelu")
        self.encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, ids, mask):
        return self.encoder(self.embed(ids), src_key_padding_mask=mask == 0)


def _model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "bert":
        return BertModel(_bert_config()).eval()
    if kind == "hf-bert":
        transformers = pytest.importorskip("transformers")
        return _LastHidden(transformers.BertModel(transformers.BertConfig(**_bert_config().to_hf_kwargs()))).eval()
    return _Encoder().eval()


def _graph_ops(path) -> set[tuple[str, str]]:
    import onnx

    model = onnx.load(str(path))
    ops = {(node.domain, node.op_type) for node in model.graph.node}
    # The exporter may keep a part as a local function: its body counts as the graph's.
    for function in model.functions:
        ops |= {(node.domain, node.op_type) for node in function.node}
    return ops


@pytest.mark.parametrize("kind", ["bert", "hf-bert", "nn-encoder"])
def test_optimized_model_exports_to_onnx(kind, tmp_path, monkeypatch):
    """An optimize()d model exports to ONNX: each fused op is traced as its reference (a
    FallbackWarning names the export as the reason, and last_backend says 'reference'), the graph
    holds standard ONNX operators only, and ONNX Runtime computes the eager model's output,
    dynamic batch and sequence length included."""
    ort = _onnx_modules()
    model = _model(kind)
    report = fused_attn.optimize(model)
    assert report.replaced
    ids, mask = _bert_inputs()
    batch, seq = torch.export.Dim("batch", min=1, max=8), torch.export.Dim("seq", min=2, max=32)
    monkeypatch.setattr(backends, "_warned", set())  # a fallback warned earlier in the run warns again
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        program = torch.onnx.export(model, (ids, mask), dynamo=True, input_names=["ids", "mask"],
                                    dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}))
    fallbacks = [str(w.message) for w in caught if issubclass(w.category, backends.FallbackWarning)]
    assert any("ONNX export" in message for message in fallbacks), fallbacks
    assert backends.last_backend("scaled_dot_product_attention") == "reference"
    path = tmp_path / "model.onnx"
    program.save(str(path))
    ops = _graph_ops(path)
    assert {domain for domain, _ in ops} <= {"", "ai.onnx"}, ops
    session = ort.InferenceSession(str(path))
    for length in (12, 7):
        ids, mask = _bert_inputs(length)
        with torch.no_grad():
            eager = model(ids, mask)
        eager = eager.last_hidden_state if isinstance(eager, BertModelOutput) else eager
        (got,) = session.run(None, {"ids": ids.numpy(), "mask": mask.numpy()})[:1]
        torch.testing.assert_close(torch.from_numpy(got), eager, rtol=1e-5, atol=1e-5)
    # Eager calls after the export run the fused kernels again.
    with torch.no_grad():
        model(ids, mask)
    assert backends.last_backend("scaled_dot_product_attention") != "reference"


def test_named_fused_backend_refuses_onnx_export():
    """A model optimize()d onto a named fused backend keeps that choice: under ONNX export it
    raises, naming the export, instead of exporting something else than it was told."""
    _onnx_modules()
    model = _model("bert")
    name = "cpu" if _extension.loaded() else "triton"
    fused_attn.optimize(model, backend=name)
    with pytest.raises(Exception, match=f"backend '{name}' cannot serve these inputs: .*ONNX export"):
        torch.onnx.export(model, _bert_inputs(), dynamo=True)


def test_torchscript_onnx_exporter_is_refused_with_the_way_out(tmp_path):
    """``torch.onnx.export(..., dynamo=False)`` records with torch.jit.trace, which cannot record
    the fused ops: a TypeError says to export with dynamo=True or restore the model first."""
    pytest.importorskip("onnx")
    model = _LastHidden(_model("bert"))  # jit.trace takes tensors out, no dataclass
    fused_attn.optimize(model)
    with pytest.raises(TypeError, match=r"dynamo=False\) records the model with torch.jit.trace.*dynamo=True"):
        torch.onnx.export(model, _bert_inputs(), str(tmp_path / "m.onnx"), dynamo=False)
    fused_attn.restore(model)
    torch.onnx.export(model, _bert_inputs(), str(tmp_path / "m.onnx"), dynamo=False)


def test_optimized_model_compiles_ahead_of_time_with_aotinductor(tmp_path):
    """AOTInductor compiles an exported optimize()d BERT into a package whose C++ runtime calls the
    extension's ops (registered where fused_attn is imported) and gives the eager output."""
    if not _extension.loaded():
        pytest.skip("the package's C++ extension is not built here")
    model = _LastHidden(_model("bert"))
    fused_attn.optimize(model, backend="cpu")
    args = _bert_inputs()
    program = torch.export.export(model, args)
    assert any(str(n.target).startswith("fused_attn.") for n in program.graph.nodes)
    path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "bert.pt2"))
    runner = torch._inductor.aoti_load_package(path)
    with torch.no_grad():
        torch.testing.assert_close(runner(*args), model(*args))
