"""fused_attn.optimize / restore on torch.nn models and Hugging Face BERT."""

import copy
import importlib
import inspect
import warnings
import pickle
import subprocess
import sys
import weakref

import pytest
import torch
from torch import nn

import fused_attn
from fused_attn.nn import FusedFFN, FusedLayerNorm, FusedMultiheadAttention, FusedTransformerEncoderLayer

from .conftest import assert_model_parity


def _transformer():
    torch.manual_seed(0)
    return nn.Transformer(d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=64,
                          dropout=0.0, activation="gelu", batch_first=True).eval()


def _run_transformer(model):
    torch.manual_seed(1)
    dtype = next(model.parameters()).dtype
    src, tgt = torch.randn(2, 9, 32, dtype=dtype), torch.randn(2, 6, 32, dtype=dtype)
    src_pad = torch.zeros(2, 9, dtype=torch.bool)
    src_pad[1, 6:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(6, dtype=dtype)
    return model(src, tgt, tgt_mask=causal, tgt_is_causal=True, src_key_padding_mask=src_pad,
                 memory_key_padding_mask=src_pad)


def test_optimize_torch_transformer_keeps_outputs_weights_and_grads():
    plain = _transformer()
    fused_model = copy.deepcopy(plain)
    state = {k: v.clone() for k, v in fused_model.state_dict().items()}
    report = fused_attn.optimize(fused_model)
    assert report.model is fused_model
    kinds = {new for _, _, new in report.replaced}
    assert {"FusedTransformerEncoderLayer", "FusedTransformerDecoderLayer", "FusedMultiheadAttention", "FusedLayerNorm"} <= kinds
    assert isinstance(fused_model.encoder.layers[0], FusedTransformerEncoderLayer)
    for k, v in fused_model.state_dict().items():
        assert torch.equal(v, state[k])
    assert_model_parity(plain, fused_model, _run_transformer)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-LN", "pre-LN"])
def test_layers_with_dropout_one_train_as_torch_does(norm_first):
    """nn.Dropout takes p=1 (everything dropped): optimize converts such layers, and in training
    their output and gradients are torch's (the fused ops answer p=1 by the reference): every
    dropout of both layer kinds is where torch has it, pre-LN as post-LN."""
    torch.manual_seed(0)
    plain = nn.Transformer(d_model=32, nhead=4, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=64,
                           dropout=1.0, activation="gelu", batch_first=True, norm_first=norm_first).train()
    fused_model = copy.deepcopy(plain)
    report = fused_attn.optimize(fused_model)
    assert not report.kept and report.replaced

    def run(model):  # the encoder's output too: with p=1 the decoder's cross-attention ignores it
        torch.manual_seed(2)
        src = torch.randn(2, 9, 32, dtype=next(model.parameters()).dtype)
        return torch.cat([model.encoder(src).flatten(), _run_transformer(model).flatten()])

    with warnings.catch_warnings():
        warnings.simplefilter("error", fused_attn.FallbackWarning)
        assert_model_parity(plain, fused_model, run)


def test_restore_gives_the_original_back():
    model = _transformer()
    classes = {name: type(m) for name, m in model.named_modules()}
    fused_attn.optimize(model)
    fused_attn.restore(model)
    assert {name: type(m) for name, m in model.named_modules()} == classes
    assert model.encoder.enable_nested_tensor is True
    assert not any(hasattr(m, "backend") for m in model.modules() if not isinstance(m, FusedLayerNorm))


def test_restore_gives_a_module_built_fused_its_own_backend_back():
    """optimize sets its backend on modules built fused too; restore puts back what they had."""
    built, kept = FusedLayerNorm(8), FusedLayerNorm(8)
    kept.backend = "cpu"
    layer = FusedTransformerEncoderLayer(8, 2, 16, dropout=0.0)
    layer.backend = "reference"  # a fused layer's backend is its fused children's too
    before = {name: m.backend for name, m in layer.named_modules() if hasattr(m, "backend")}
    assert set(before.values()) == {"reference"} and len(before) == 4
    ffn = FusedFFN(8, 16)
    model = nn.Sequential(built, kept, nn.LayerNorm(8), layer, ffn)
    report = fused_attn.optimize(model, backend="reference")
    # Reported as built fused, not as replaced by themselves; the converted one as replaced.
    assert report.replaced == [("2", "LayerNorm", "FusedLayerNorm")]
    assert [p for p, _ in report.built_fused] == ["0", "1", "3", "3.self_attn", "3.norm1", "3.norm2", "4"]
    assert "  fused    4: FusedFFN (built fused)" in str(report).splitlines()
    fused_attn.optimize(model, backend="triton")  # a second optimize does not overwrite what was saved
    assert (built.backend, kept.backend, model[2].backend, layer.norm1.backend, ffn.backend) == ("triton",) * 5
    fused_attn.restore(model)
    assert (built.backend, kept.backend, ffn.backend) == (None, "cpu", None)
    assert {name: m.backend for name, m in layer.named_modules() if hasattr(m, "backend")} == before
    assert type(model[2]) is nn.LayerNorm and not hasattr(model[2], "backend")
    assert not any(k.startswith("_fused_attn") for m in model.modules() for k in m.__dict__)


def test_inplace_false_leaves_the_model_alone():
    model = _transformer()
    report = fused_attn.optimize(model, inplace=False)
    assert report.model is not model
    assert type(model.encoder.layers[0]) is nn.TransformerEncoderLayer
    assert_model_parity(model, report.model, _run_transformer)


def test_modules_kept_are_not_reported_as_replaced():
    """report.replaced lists exactly the modules converted: those kept (an unsupported head dim,
    float64 parameters) are in report.kept alone, and the summary line counts them so."""
    model = nn.Sequential(nn.MultiheadAttention(640, 2), nn.LayerNorm(8).double(), nn.LayerNorm(8))
    report = fused_attn.optimize(model, backend="reference")
    assert report.replaced == [("2", "LayerNorm", "FusedLayerNorm")]
    assert [(path, kind) for path, kind, _ in report.kept] == [("0", "MultiheadAttention"), ("1", "LayerNorm")]
    assert str(report).splitlines()[0] == "fused_attn.optimize: 1 replaced, 2 kept as they were"


def test_feed_forwards_without_a_gelu_or_relu_are_reported_as_running_unfused():
    """The fused FFN computes the GELUs (exact or tanh) and ReLU (torch's layers' default): optimize
    fuses those feed-forwards with no row, and for a layer with another activation fuses its
    attention and norms and reports its feed-forward as kept, as it does for a FusedFFN built with
    another activation."""
    model = nn.Sequential(
        nn.TransformerEncoderLayer(32, 4, 64),
        nn.TransformerDecoderLayer(32, 4, 64, activation=nn.SiLU()),
        nn.TransformerEncoderLayer(32, 4, 64, activation="gelu"),
        nn.TransformerEncoderLayer(32, 4, 64, activation=nn.GELU(approximate="tanh")),
        fused_attn.nn.FusedFFN(32, 64, activation=torch.tanh),
        fused_attn.nn.FusedFFN(32, 64),
        nn.TransformerEncoderLayer(32, 4, 64, activation=nn.ReLU()),
        fused_attn.nn.FusedFFN(32, 64, activation="relu"),
    )
    report = fused_attn.optimize(model, backend="reference")
    assert [(path, kind, why.split(":")[0]) for path, kind, why in report.kept] == [
        ("1.linear1", "feed-forward", "activation SiLU is not a GELU or ReLU (F.gelu, nn.GELU, F.relu, nn.ReLU)"),
        ("4.linear1", "feed-forward", "activation tanh is not a GELU or ReLU (F.gelu, nn.GELU, F.relu, nn.ReLU)"),
    ]
    assert all("linear1, the activation and linear2 run unfused" in why for _, _, why in report.kept)
    assert {path for path, _, _ in report.replaced} >= {"0", "1", "2", "3", "6"}
    # An optimized model optimized again reports the same.
    assert fused_attn.optimize(model, backend="reference").kept == report.kept


@pytest.mark.parametrize("activation", ["relu", nn.ReLU(), torch.relu, "gelu", nn.GELU(approximate="tanh")],
                         ids=["relu", "nn.ReLU", "torch.relu", "gelu", "nn.GELU-tanh"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_relu_and_gelu_feed_forwards_run_fused_with_torchs_results(activation, training):
    """An optimized torch layer's feed-forward runs the fused kernels for its activation, ReLU (the
    default) as the GELUs: the whole FFN (ffn) in eval mode, the first linear and its activation
    (linear_gelu's kernels) before the inner dropout in training; outputs and gradients as torch's."""
    torch.manual_seed(0)
    plain = nn.TransformerEncoderLayer(32, 4, 64, activation=activation, dropout=0.0, batch_first=True)
    fused = fused_attn.optimize(copy.deepcopy(plain)).model
    src = torch.randn(3, 10, 32)
    plain.train(training), fused.train(training)
    if training:  # an inner dropout that is on, but drops nothing: the results stay comparable
        plain.dropout.p = fused.dropout.p = 1e-30
    op = "linear_gelu" if training else "ffn"
    x = torch.randn(2, 32)
    fused_attn.ffn(x, fused.linear1.weight, None, fused.linear2.weight, None, backend="reference")
    fused_attn.linear_gelu(x, fused.linear1.weight, backend="reference")
    with fused_attn.use_backend("cpu"):
        out = fused(src)
    assert fused_attn.last_backend(op) == "cpu", op
    want = plain(src)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    if training:
        out.sum().backward(), want.sum().backward()
        for (name, p), q in zip(fused.named_parameters(), plain.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_unsupported_modules_are_kept_with_a_reason():
    model = nn.Sequential(nn.MultiheadAttention(640, 2), nn.LayerNorm(8).double(), nn.LayerNorm(8))
    report = fused_attn.optimize(model, backend="reference")
    kept = {path: why for path, _, why in report.kept}
    assert "head_dim 320" in kept["0"]
    assert "float64" in kept["1"]
    assert type(model[0]) is nn.MultiheadAttention and type(model[1]) is nn.LayerNorm
    assert isinstance(model[2], FusedLayerNorm) and model[2].backend == "reference"
    assert "kept" in str(report) and "replaced" in str(report)


def test_optimize_rejects_bad_arguments():
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        fused_attn.optimize(nn.LayerNorm(4), backend="tpu")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fused_attn.optimize("bert")
    model = nn.LayerNorm(4)
    with pytest.raises(TypeError, match="inplace must be a Python bool, got 'no'"):
        fused_attn.optimize(model, inplace="no")
    assert type(model) is nn.LayerNorm


def test_optimized_modules_use_the_requested_backend():
    model = nn.Sequential(nn.LayerNorm(8))
    fused_attn.optimize(model, backend="reference")
    model(torch.randn(2, 8))
    assert fused_attn.last_backend("layer_norm") == "reference"


# ---------------------------------------------------------------------------------------------
# Hugging Face


def _hf_config(**overrides):
    transformers = pytest.importorskip("transformers")
    kwargs = dict(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                  max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    kwargs.update(overrides)
    return transformers, transformers.BertConfig(**kwargs)


def _batch():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 120, (2, 12), generator=gen)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    return ids, mask


@pytest.mark.parametrize("head", ["BertModel", "BertForMaskedLM", "BertForSequenceClassification"])
@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new"])
def test_hf_bert_optimized_matches_unoptimized(head, hidden_act):
    transformers, config = _hf_config(hidden_act=hidden_act)
    torch.manual_seed(0)
    plain = getattr(transformers, head)(config).eval()
    fused_model = copy.deepcopy(plain)
    report = fused_attn.optimize(fused_model)
    replaced = {new for _, _, new in report.replaced}
    assert {"attention fused_attn", "FusedBertSelfOutput", "FusedBertIntermediate", "FusedBertOutput"} <= replaced
    assert list(fused_model.state_dict()) == list(plain.state_dict())
    ids, mask = _batch()
    key = "last_hidden_state" if head == "BertModel" else "logits"
    assert_model_parity(plain, fused_model, lambda model: model(input_ids=ids, attention_mask=mask)[key])
    for op in ("scaled_dot_product_attention", "add_layer_norm", "linear_gelu"):
        assert fused_attn.last_backend(op) in ("cpu", "triton")


@pytest.mark.parametrize(
    "hidden_act, fused",
    [("gelu_pytorch_tanh", True), ("gelu_fast", True), ("gelu_python", True), ("quick_gelu", False), ("relu", True),
     ("silu", False)],
)
def test_hf_intermediate_activations(hidden_act, fused):
    """Each of transformers' exact and tanh GELUs, and ReLU, runs in the fused epilogue; other
    activations keep transformers' intermediate block, with the reason in the report; outputs match
    either way."""
    transformers, config = _hf_config(hidden_act=hidden_act)
    torch.manual_seed(0)
    plain = transformers.BertModel(config).eval()
    fused_model = copy.deepcopy(plain)
    report = fused_attn.optimize(fused_model)
    replaced = {new for _, _, new in report.replaced}
    kept = [(path, why) for path, _, why in report.kept if path.endswith("intermediate")]
    assert ("FusedBertIntermediate" in replaced) == fused
    assert (kept == []) == fused
    expected = f"activation {type(transformers.activations.ACT2FN[hidden_act]).__name__} is not a GELU or ReLU"
    assert all(why == expected for _, why in kept)
    ids, mask = _batch()
    assert_model_parity(plain, fused_model, lambda model: model(input_ids=ids, attention_mask=mask).last_hidden_state)


def test_hf_attention_moves_no_activation():
    """The fused attention gives its output in the layout of transformers' query ([B, L, H, D]
    memory), so the merge of the heads that follows (transpose + contiguous + reshape) is a view,
    forward and backward; plain transformers copies it there."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class RecordOps(TorchDispatchMode):
        ops: list

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    transformers, config = _hf_config(num_hidden_layers=1)
    model = transformers.BertModel(config)
    fused_attn.optimize(model)
    ids, mask = _batch()
    recorder = RecordOps()
    recorder.ops = []
    with recorder:
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        out.backward(torch.ones(out.shape))
    assert "attention_fwd" in recorder.ops or "triton_attention_fwd" in recorder.ops
    assert not [op for op in recorder.ops if op in ("clone", "copy_")], recorder.ops


def _spy_attention(monkeypatch) -> list:
    """Records (mask, is_causal) of every call the fused attention function makes to the kernels."""
    from fused_attn.integrations import hf

    calls = []

    def spy(*args, **kwargs):
        calls.append((args[3], args[5]))
        return fused_attn.scaled_dot_product_attention(*args, **kwargs)

    monkeypatch.setattr(hf, "scaled_dot_product_attention", spy)
    return calls


def test_hf_mask_the_same_for_every_query_reaches_the_kernels_as_one_row_per_sequence(monkeypatch):
    """transformers builds BERT's padding mask as a whole [B, 1, L, L] tensor; the fused attention's
    mask function hands it on broadcast over the queries (stride 0), one row per sequence, with the
    same values, so the kernels read B x L mask values and walk only the keys it leaves."""
    transformers, config = _hf_config()
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, bidirectional_mask_function, sdpa_mask

    from fused_attn.integrations import hf

    plain = transformers.BertModel(config).eval()
    fused_model = copy.deepcopy(plain)
    fused_attn.optimize(fused_model, backend="triton")  # its kernels skip the padded key tiles of such a mask
    calls = _spy_attention(monkeypatch)
    ids, pad = _batch()
    assert_model_parity(plain, fused_model, lambda model: model(input_ids=ids, attention_mask=pad).last_hidden_state)
    assert calls and all(m.shape == (2, 1, 12, 12) and m.stride(2) == 0 and not causal for m, causal in calls)
    assert torch.equal(calls[0][0], pad.bool()[:, None, None, :].expand(2, 1, 12, 12))
    assert fused_attn.last_backend("scaled_dot_product_attention") == "triton"

    build = ALL_MASK_ATTENTION_FUNCTIONS[hf.ATTENTION_NAME]
    kwargs = dict(batch_size=2, q_length=12, kv_length=12, mask_function=bidirectional_mask_function,
                  attention_mask=pad.bool(), allow_is_causal_skip=False)
    got, want = build(**kwargs), sdpa_mask(**kwargs)
    assert torch.equal(got, want) and got.stride(2) == 0


@pytest.mark.parametrize("padding", ["right", "left"])
def test_hf_decoder_padding_mask_reaches_the_kernels_as_causal_and_one_row(monkeypatch, padding):
    """A decoder's padded batch: transformers builds causal x padding as a whole [B, 1, L, L] mask;
    the fused attention gives the kernels is_causal and the padding row instead (the same
    attention), so they skip the key tiles above the diagonal. Masks that are not of that form
    (a sliding window, queries offset by a cache) go as built."""
    transformers = pytest.importorskip("transformers")
    from transformers.masking_utils import (
        ALL_MASK_ATTENTION_FUNCTIONS,
        and_masks,
        causal_mask_function,
        sdpa_mask,
        sliding_window_overlay,
    )

    from fused_attn.integrations import hf

    config = transformers.GPT2Config(vocab_size=120, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    plain = transformers.GPT2Model(config).eval()
    fused_model = copy.deepcopy(plain)
    fused_attn.optimize(fused_model)
    calls = _spy_attention(monkeypatch)
    ids, pad = _batch()
    if padding == "left":
        pad = pad.flip(-1)
    assert_model_parity(plain, fused_model, lambda model: model(input_ids=ids, attention_mask=pad).last_hidden_state)
    assert calls and all(causal and m.shape == (2, 1, 1, 12) for m, causal in calls)
    assert torch.equal(calls[0][0], pad.bool()[:, None, None, :])

    build = ALL_MASK_ATTENTION_FUNCTIONS[hf.ATTENTION_NAME]
    for kwargs in (dict(q_length=12, kv_length=12, mask_function=causal_mask_function),
                   dict(q_length=12, kv_length=12, mask_function=and_masks(causal_mask_function,
                                                                           sliding_window_overlay(4))),
                   dict(q_length=6, kv_length=12, q_offset=6, mask_function=causal_mask_function)):
        kwargs.update(batch_size=2, attention_mask=pad.bool(), allow_is_causal_skip=False)
        got, want = build(**kwargs), sdpa_mask(**kwargs)
        assert torch.equal(got, want) and got.stride(2) != 0
        row = getattr(got, hf._CAUSAL_ROW, None)
        assert (row is not None) == (kwargs["mask_function"] is causal_mask_function and kwargs["q_length"] == 12)
        built = weakref.ref(got)
        del got
        assert built() is None  # the row it carries does not hold it (no cycle left to the collector)


def test_hf_bert_restore():
    transformers, config = _hf_config()
    model = transformers.BertModel(config).eval()
    original = model.config._attn_implementation
    ids, mask = _batch()
    before = model(input_ids=ids, attention_mask=mask).last_hidden_state
    fused_attn.optimize(model)
    fused_attn.restore(model)
    assert model.config._attn_implementation == original
    assert type(model.encoder.layer[0].output).__name__ == "BertOutput"
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).last_hidden_state, before)


def test_hf_bert_restore_leaves_no_attribute_optimize_set():
    """restore() takes off every attribute optimize() put on a Hugging Face model's modules (the
    fused blocks' backend, GELU approximation and activation record, the original-class marker):
    each module is left with the attributes it had before."""
    transformers, config = _hf_config()
    model = transformers.BertModel(config).eval()
    before = {name: set(vars(m)) for name, m in model.named_modules()}
    fused_attn.optimize(model)
    fused_attn.restore(model)
    assert {name: set(vars(m)) for name, m in model.named_modules()} == before


@pytest.mark.parametrize("how", ["argument", "config"])
def test_hf_output_attentions_as_eager(how):
    """output_attentions gives the probabilities (self and cross attention) as the eager
    implementation does; the fused softmax computes them."""
    transformers, config = _hf_config(is_decoder=True, add_cross_attention=True,
                                      output_attentions=how == "config")
    torch.manual_seed(0)
    plain = transformers.BertModel(config).eval()
    plain.set_attn_implementation("eager")
    fused_model = copy.deepcopy(plain)
    fused_attn.optimize(fused_model)
    ids, mask = _batch()
    memory = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    memory_mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2])
    kwargs = {"output_attentions": True} if how == "argument" else {}

    def run(model):
        out = model(input_ids=ids, attention_mask=mask, encoder_hidden_states=memory.to(model.dtype),
                    encoder_attention_mask=memory_mask, **kwargs)
        assert len(out.attentions) == len(out.cross_attentions) == config.num_hidden_layers
        return torch.cat([t.flatten() for t in (out.last_hidden_state, *out.attentions, *out.cross_attentions)])

    assert_model_parity(plain, fused_model, run)
    assert fused_attn.last_backend("softmax") in ("cpu", "triton")


def test_hf_output_attentions_of_a_model_that_does_not_pass_them_on():
    """GPT-2 removes output_attentions before its layers; transformers records its attention
    modules' weights, which eager always computes: the optimized model returns them too."""
    plain = _other_family("gpt2")[0]
    plain.set_attn_implementation("eager")
    fused_model = copy.deepcopy(plain)
    fused_attn.optimize(fused_model)
    ids, mask = _batch()

    def run(model):
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
        assert len(out.attentions) == model.config.n_layer
        return torch.cat([t.flatten() for t in (out.logits, *out.attentions)])

    assert_model_parity(plain, fused_model, run)
    assert len(fused_model(input_ids=ids, attention_mask=mask).attentions or ()) == 0  # not asked: not computed


def test_hf_output_attentions_in_training_carry_the_attention_dropout():
    """In training, the attentions returned are the dropped-out probabilities the values were
    weighted with, as transformers' eager attention returns them (about p of them zero)."""
    transformers, config = _hf_config(attention_probs_dropout_prob=0.5, num_hidden_layers=1)
    torch.manual_seed(0)
    model = transformers.BertModel(config).train()
    fused_attn.optimize(model)
    ids, _ = _batch()
    (weights,) = model(input_ids=ids, output_attentions=True).attentions
    zeros = float((weights == 0).double().mean())
    assert abs(zeros - 0.5) < 0.05, zeros
    assert float(weights[weights != 0].min()) > 0


def _with_registered_attention(model_class, config, output_attentions):
    """A model of another family (random weights) on transformers' sdpa (eager for
    output_attentions) and a copy switched to the fused attention (register_attention)."""
    from fused_attn.integrations import hf

    torch.manual_seed(0)
    plain = model_class(config).eval()
    plain.set_attn_implementation("eager" if output_attentions else "sdpa")
    fused_model = copy.deepcopy(plain)
    fused_model.set_attn_implementation(hf.register_attention())
    return plain, fused_model


@pytest.mark.parametrize("output_attentions", [False, True], ids=["sdpa", "output-attentions"])
def test_hf_attention_function_takes_grouped_key_value_heads(output_attentions):
    """The fused attention function ("fused_attn", register_attention) serves models that hand it
    key/value with fewer heads than the query (grouped-query attention, e.g. Llama's
    num_key_value_heads): the same outputs and gradients as transformers' sdpa (or eager, for
    output_attentions)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=120, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    plain, fused_model = _with_registered_attention(transformers.LlamaModel, config, output_attentions)
    ids, mask = _batch()

    def run(model):
        out = model(input_ids=ids, attention_mask=mask, output_attentions=output_attentions)
        return torch.cat([t.flatten() for t in (out.last_hidden_state, *(out.attentions or ()))])

    assert_model_parity(plain, fused_model, run)
    assert fused_attn.last_backend("softmax" if output_attentions else "scaled_dot_product_attention") in ("cpu", "triton")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_optimized_decoder_generates_with_its_key_value_cache(family):
    """Decoding with transformers' key/value cache through the fused attention: greedy generate()
    on a left-padded batch gives the same tokens and scores as the plain model (dynamic and
    static cache), and a chunk of 4 tokens fed after a cached prefix of 5 (its queries see the
    whole prefix and, causally, each other: a bottom-right causal mask) gives the plain model's
    logits."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if family == "llama":
        config = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                          bos_token_id=1, eos_token_id=2)
        plain = transformers.LlamaForCausalLM(config).eval()
    else:
        config = transformers.GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                         bos_token_id=1, eos_token_id=2)
        plain = transformers.GPT2LMHeadModel(config).eval()
    fused_model = fused_attn.optimize(plain, inplace=False).model
    assert fused_model.config._attn_implementation == "fused_attn"
    ids = torch.randint(3, 100, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        # Also with the static cache: keys and values in a buffer of fixed length, the slots not
        # yet filled masked out, so each step's key length is the buffer's.
        for cache_implementation in (None, "static"):
            options = {"cache_implementation": cache_implementation} if cache_implementation else {}
            runs = [m.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                               output_scores=True, return_dict_in_generate=True, **options) for m in (plain, fused_model)]
            assert torch.equal(runs[0].sequences, runs[1].sequences), cache_implementation
            torch.testing.assert_close(torch.stack(runs[1].scores), torch.stack(runs[0].scores), rtol=1e-5, atol=1e-5)
        assert fused_attn.last_backend("scaled_dot_product_attention") in ("cpu", "triton")
        x = torch.randint(3, 100, (2, 9))
        logits = []
        # The cache's keyword: ``cache`` in newer transformers, ``past_key_values`` before (5.17).
        keyword = "cache" if "cache" in inspect.signature(plain.forward).parameters else "past_key_values"
        for m in (plain, fused_model):
            cache = {keyword: transformers.DynamicCache(), "use_cache": True}
            m(x[:, :5], **cache)
            logits.append(m(x[:, 5:], **cache).logits)
        whole = plain(x).logits[:, 5:]
    torch.testing.assert_close(logits[0], whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("output_attentions", [False, True], ids=["sdpa", "output-attentions"])
def test_hf_attention_function_adds_t5_position_bias(output_attentions):
    """The registered attention function takes the relative position bias that T5 hands it
    (added to the scores, under the padding and causal masks): T5's outputs and every gradient,
    the bias embedding's included, as transformers' sdpa (or eager, for output_attentions)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(vocab_size=120, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, dropout_rate=0.0)
    plain, fused_model = _with_registered_attention(transformers.T5Model, config, output_attentions)
    ids, mask = _batch()
    decoder_ids = ids[:, :7]

    def run(model):
        out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids,
                    output_attentions=output_attentions)
        weights = (*out.encoder_attentions, *out.decoder_attentions, *out.cross_attentions) if output_attentions else ()
        return torch.cat([t.flatten() for t in (out.last_hidden_state, out.encoder_last_hidden_state, *weights)])

    assert_model_parity(plain, fused_model, run)


def test_hf_attention_function_refuses_what_it_does_not_implement():
    from fused_attn.integrations import hf

    pytest.importorskip("transformers")
    q = torch.randn(1, 2, 4, 8)
    for name, value in (("softcap", 30.0), ("s_aux", torch.zeros(2)), ("indices", torch.zeros(1, 4, 2))):
        with pytest.raises(ValueError, match=f"does not support .*\\({name}\\)"):
            hf.fused_attention_forward(nn.Module(), q, q, q, None, **{name: value})


@pytest.mark.parametrize("output_attentions", [False, True], ids=["fused", "weights"])
def test_hf_attention_function_takes_a_head_mask_per_head(output_attentions):
    """transformers before 5 pass ``model(head_mask=...)`` to the attention function, which eager
    attention multiplies the probabilities by: one factor per head (and batch row) scales that
    head's output, the weights returned with output_attentions included, with its gradient; a
    head mask that varies over queries or keys raises, naming the shape."""
    from fused_attn.integrations import hf

    pytest.importorskip("transformers")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=gen) for _ in range(3))
    pad = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    pad[1, ..., 3:] = False
    for shape in ((1, 3, 1, 1), (2, 3, 1, 1)):
        head_mask = torch.rand(shape, generator=gen).requires_grad_()
        out, weights = hf.fused_attention_forward(nn.Module(), q, k, v, pad, head_mask=head_mask,
                                                  output_attentions=output_attentions)
        probs = torch.softmax((q @ k.transpose(-1, -2) * 8 ** -0.5).masked_fill(~pad, float("-inf")), -1) * head_mask
        torch.testing.assert_close(out, (probs @ v).transpose(1, 2))
        if output_attentions:
            torch.testing.assert_close(weights, probs)
        (grad,) = torch.autograd.grad(out.sum(), head_mask)
        (expected,) = torch.autograd.grad((probs @ v).sum(), head_mask)
        torch.testing.assert_close(grad, expected)
    with pytest.raises(ValueError, match=r"head_mask of one factor per head .* got shape \[1, 3, 5, 5\]"):
        hf.fused_attention_forward(nn.Module(), q, k, v, None, head_mask=torch.ones(1, 3, 5, 5))


def test_hf_optimized_model_pickles(tmp_path):
    """torch.save of a whole optimized model, loaded here and in a fresh process."""
    transformers, config = _hf_config()
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(config).eval()
    fused_attn.optimize(model)
    ids, mask = _batch()
    expected = model(input_ids=ids, attention_mask=mask).logits
    clone = pickle.loads(pickle.dumps(model))
    assert type(clone.bert.encoder.layer[0].output) is type(model.bert.encoder.layer[0].output)
    assert torch.equal(clone(input_ids=ids, attention_mask=mask).logits, expected)
    torch.save({"model": model, "ids": ids, "mask": mask, "expected": expected}, tmp_path / "model.pt")
    script = (
        "import sys, torch\n"
        f"saved = torch.load({str(tmp_path / 'model.pt')!r}, weights_only=False)\n"
        "out = saved['model'](input_ids=saved['ids'], attention_mask=saved['mask']).logits\n"
        "assert type(saved['model'].bert.encoder.layer[0].output).__name__ == 'FusedBertOutput'\n"
        "sys.exit(0 if torch.equal(out, saved['expected']) else 3)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_models_sharing_a_config_are_optimized_and_restored_apart(tmp_path):
    transformers, config = _hf_config()
    a, b = transformers.BertModel(config).eval(), transformers.BertModel(config).eval()
    original = config._attn_implementation
    fused_attn.optimize(a, backend="reference")
    assert a.config._attn_implementation == "fused_attn"
    assert b.config is config and config._attn_implementation == original
    fused_attn.optimize(b)
    a.save_pretrained(tmp_path)
    assert "fused_attn_backend" not in (tmp_path / "config.json").read_text()
    fused_attn.restore(a)
    fused_attn.restore(b)
    assert a.config is config and b.config is config and config._attn_implementation == original
    assert all(m.__dict__.get("config", config) is config for m in a.modules())
    assert not any("fused_attn_backend" in m.__dict__ for m in a.modules())

    from fused_attn.models import BertConfig, BertModel

    shared = BertConfig.bert_tiny(vocab_size=50)
    pa, pb = BertModel(shared), BertModel(shared)
    fused_attn.optimize(pa, backend="reference")
    assert pa.config.fused and pa.embeddings.config is pa.config
    assert not pb.config.fused and not shared.fused and shared.backend is None
    fused_attn.restore(pa)
    assert all(m.__dict__.get("config", shared) is shared for m in pa.modules())


def test_optimizing_again_switches_every_fused_module_to_the_new_backend():
    transformers, config = _hf_config()
    hf = transformers.BertForMaskedLM(config).eval()
    torch_model = _transformer()
    for model in (hf, torch_model):
        fused_attn.optimize(model, backend="cpu")
        report = fused_attn.optimize(model, backend="reference")
        assert report.replaced and not report.kept
    ids, mask = _batch()
    hf(input_ids=ids, attention_mask=mask)
    for op in ("scaled_dot_product_attention", "add_layer_norm", "linear_gelu", "layer_norm"):
        assert fused_attn.last_backend(op) == "reference", op
    _run_transformer(torch_model)
    for op in ("scaled_dot_product_attention", "add_layer_norm", "layer_norm"):
        assert fused_attn.last_backend(op) == "reference", op


def test_hf_dropout_follows_the_dropout_modules():
    """The fused Add & Norm drops as transformers' blocks do: when their nn.Dropout trains, whatever
    the block's own mode (frozen dropout in training, Monte Carlo dropout in eval)."""
    transformers, config = _hf_config(hidden_dropout_prob=0.3)
    torch.manual_seed(0)
    plain = transformers.BertModel(config)
    fused_model = copy.deepcopy(plain)
    fused_attn.optimize(fused_model)
    ids, mask = _batch()
    for model in (plain, fused_model):
        model.train()
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.eval()
    run = lambda model: model(input_ids=ids, attention_mask=mask).last_hidden_state  # noqa: E731
    torch.testing.assert_close(run(fused_model), run(plain))
    for model in (plain, fused_model):
        model.eval()
        expected = run(model)
        # The blocks' dropouts alone (the embeddings' would make the runs differ whatever the
        # fused Add & Norm does): the output is no longer the undropped one.
        for m in model.modules():
            if isinstance(m, nn.Dropout) and m is not model.embeddings.dropout:
                m.train()
        assert not torch.equal(run(model), expected), type(model).__name__


@pytest.mark.parametrize("where", ["add_norm", "attention"])
def test_hf_training_dropouts_reach_the_fused_ops(where):
    """In training, the fused Add & Norm drops its input where transformers' BertSelfOutput and
    BertOutput do, and the fused attention its probabilities (the dropout transformers hands the
    attention function). With p = 1 each such dropout zeroes what it drops (the block then gives
    LayerNorm of the residual, the attention 0): output and every parameter gradient are
    transformers' (conftest parity). With p = 0.3 and every other dropout off, the output is not
    the undropped one, and the same seed draws it again."""
    transformers, config = _hf_config()
    torch.manual_seed(0)
    plain = transformers.BertModel(config)
    fused_model = copy.deepcopy(plain)
    fused_attn.optimize(fused_model)
    ids, mask = _batch()

    def dropouts(model):
        for layer in model.encoder.layer:
            if where == "add_norm":
                yield from (layer.attention.output.dropout, layer.output.dropout)
            else:
                yield layer.attention.self.dropout

    def run(model):
        torch.manual_seed(1)
        return model(input_ids=ids, attention_mask=mask).last_hidden_state

    for model in (plain, fused_model):
        model.train()
        for m in dropouts(model):
            m.p = 1.0
    assert_model_parity(plain, fused_model, run)
    fused_model.eval()
    expected = run(fused_model)
    fused_model.train()
    for m in dropouts(fused_model):
        m.p = 0.3
    dropped = run(fused_model)
    assert not torch.equal(dropped, expected)
    assert torch.equal(run(fused_model), dropped)
    assert fused_attn.last_backend("add_layer_norm" if where == "add_norm" else "scaled_dot_product_attention") \
        in ("cpu", "triton")


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_hf_gradient_checkpointing_recomputes_the_same_dropout(backend, reentrant):
    """Activation checkpointing (transformers' gradient_checkpointing_enable, torch.utils.checkpoint
    underneath) runs each layer's forward again in the backward: the fused ops draw their dropout
    seeds from torch's generator, whose state the checkpoint saves and restores, so the second
    forward drops what the first dropped, and the loss and every gradient are those of the same
    step without checkpointing, with every dropout on."""
    if backend not in fused_attn.available_backends("cpu"):
        pytest.skip(f"{backend} is not available here")
    transformers, config = _hf_config(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2)
    torch.manual_seed(0)
    plain = transformers.BertForMaskedLM(config)
    ids, mask = _batch()

    def step(checkpointing, train=True):
        model = copy.deepcopy(plain).train(train)
        fused_attn.optimize(model, backend=backend)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        torch.manual_seed(1)
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        assert fused_attn.last_backend("scaled_dot_product_attention") == backend
        return loss.detach(), {name: p.grad for name, p in model.named_parameters()}

    loss, grads = step(False)
    assert not torch.equal(loss, step(False, train=False)[0])  # the dropouts drop
    loss_checkpointed, grads_checkpointed = step(True)
    assert torch.equal(loss_checkpointed, loss)
    for name, grad in grads.items():
        assert torch.equal(grads_checkpointed[name], grad), name


def test_hf_blocks_with_hooked_submodules_run_unfused():
    """A hook on a submodule the fused block reads rather than calls (a feature hook, an adapter,
    torch.nn.utils.prune) makes the block run transformers' forward, with a FallbackWarning; an
    activation replaced after optimize() is honoured."""
    import torch.nn.utils.prune as prune

    transformers, config = _hf_config()
    torch.manual_seed(0)
    plain = transformers.BertModel(config).eval()
    fused_model = copy.deepcopy(plain)
    fused_attn.optimize(fused_model)
    ids, mask = _batch()
    run = lambda model: model(input_ids=ids, attention_mask=mask).last_hidden_state  # noqa: E731
    calls = []
    for model in (plain, fused_model):
        model.encoder.layer[0].output.dense.register_forward_hook(lambda mod, args, out: calls.append(1) or out * 0.5)
        model.encoder.layer[1].intermediate.dense.register_forward_hook(lambda mod, args, out: out + 1.0)
    expected = run(plain)
    with pytest.warns(fused_attn.FallbackWarning, match="hooks on its"):
        torch.testing.assert_close(run(fused_model), expected)
    assert len(calls) == 2

    for model in (plain, fused_model):
        prune.l1_unstructured(model.encoder.layer[1].attention.output.dense, "weight", amount=0.5)
        model.train()
    for _ in range(2):  # the pruned weight is recomputed on every call, as an optimizer step needs
        outs = [run(model) for model in (plain, fused_model)]
        torch.testing.assert_close(outs[1], outs[0])
        for model, out in zip((plain, fused_model), outs):
            out.sum().backward()
            with torch.no_grad():
                model.encoder.layer[1].attention.output.dense.weight_orig.add_(0.01)

    for model in (plain, fused_model):
        model.eval()
        model.encoder.layer[0].intermediate.intermediate_act_fn = nn.SiLU()
    torch.testing.assert_close(run(fused_model), run(plain))

    class ScaledLinear(nn.Linear):  # an adapter-like subclass: its weight alone is not what it computes
        def forward(self, x):
            return 2.0 * super().forward(x)

    for model in (plain, fused_model):
        dense = model.encoder.layer[0].output.dense
        scaled = ScaledLinear(dense.in_features, dense.out_features)
        scaled.load_state_dict(dense.state_dict())
        model.encoder.layer[0].output.dense = scaled
    with pytest.warns(fused_attn.FallbackWarning, match="dense is ScaledLinear, not Linear"):
        torch.testing.assert_close(run(fused_model), run(plain))


def test_hf_activation_is_not_registered_twice():
    """optimize() leaves each intermediate block's children as they were: the activation it was set
    up for is not a second child (in the module tree, and, for an activation with parameters
    replaced after optimize, as state_dict keys a plain model would not load), before or after
    restore()."""
    transformers, config = _hf_config()
    torch.manual_seed(0)
    plain = transformers.BertModel(config).eval()
    fused_model = copy.deepcopy(plain)
    fused_attn.optimize(fused_model)
    children = lambda model: [list(m._modules) for m in model.modules()]  # noqa: E731
    assert children(fused_model) == children(plain)
    for model in (plain, fused_model):
        model.encoder.layer[0].intermediate.intermediate_act_fn = nn.PReLU()
    ids, mask = _batch()
    run = lambda model: model(input_ids=ids, attention_mask=mask).last_hidden_state  # noqa: E731
    torch.testing.assert_close(run(fused_model), run(plain))
    assert list(fused_model.state_dict()) == list(plain.state_dict())
    copy.deepcopy(plain).load_state_dict(fused_model.state_dict())
    fused_attn.restore(fused_model)
    assert children(fused_model) == children(plain)


def test_hf_blocks_kept_are_not_reported_missing():
    """Every BERT block kept for a foreign submodule is listed with its reason, and the report does
    not also say that the model has no such block; a class named like torch's is named in full."""
    transformers, config = _hf_config(num_hidden_layers=1)

    class Linear(nn.Linear):  # an adapter named like torch's Linear
        def forward(self, x):
            return super().forward(x)

    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    for name, module in list(model.named_modules()):
        if name.startswith("encoder") and type(getattr(module, "dense", None)) is nn.Linear:
            dense = Linear(module.dense.in_features, module.dense.out_features)
            dense.load_state_dict(module.dense.state_dict())
            module.dense = dense
    report = fused_attn.optimize(model)
    why = f"dense is {Linear.__module__}.{Linear.__qualname__}, not torch.nn.modules.linear.Linear"
    assert sorted(report.kept) == [(f"encoder.layer.0.{p}", cls, why) for p, cls in
                                   (("attention.output", "BertSelfOutput"), ("intermediate", "BertIntermediate"),
                                    ("output", "BertOutput"))]


def test_parametrized_submodules_stay_fused():
    """A parametrized linear (weight_norm) is the class it was made from: optimize fuses its torch
    and Hugging Face layers, the forward reads the parametrized weight with no fallback, and the
    gradients reach the parametrization's own parameters. An adapter-like Linear subclass in a
    Hugging Face block keeps the block, with the reason."""
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, activation="gelu", batch_first=True).eval()
    weight_norm(layer.linear1)
    weight_norm(layer.self_attn.out_proj)
    fused_layer = copy.deepcopy(layer)
    report = fused_attn.optimize(fused_layer)
    assert report.kept == [] and ("", "TransformerEncoderLayer", "FusedTransformerEncoderLayer") in report.replaced
    x = torch.randn(2, 7, 32)
    assert sum("original" in name for name, _ in layer.named_parameters()) == 4
    with warnings.catch_warnings():  # parity covers the gradients of the parametrizations' parameters
        warnings.simplefilter("error", fused_attn.FallbackWarning)
        assert_model_parity(layer, fused_layer, lambda model: model(x.to(model.linear2.weight.dtype)))

    transformers, config = _hf_config()
    plain = transformers.BertModel(config).eval()
    weight_norm(plain.encoder.layer[0].output.dense)
    weight_norm(plain.encoder.layer[1].intermediate.dense)

    class ScaledLinear(nn.Linear):  # an adapter-like subclass: its weight alone is not what it computes
        def forward(self, x):
            return 2.0 * super().forward(x)

    dense = plain.encoder.layer[1].output.dense
    plain.encoder.layer[1].output.dense = ScaledLinear(dense.in_features, dense.out_features)
    plain.encoder.layer[1].output.dense.load_state_dict(dense.state_dict())
    fused_model = copy.deepcopy(plain)
    report = fused_attn.optimize(fused_model)
    replaced = {path for path, _, _ in report.replaced}
    assert {"encoder.layer.0.output", "encoder.layer.1.intermediate"} <= replaced
    assert ("encoder.layer.1.output", "BertOutput", "dense is ScaledLinear, not Linear") in report.kept
    ids, mask = _batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error", fused_attn.FallbackWarning)
        assert_model_parity(plain, fused_model, lambda model: model(input_ids=ids, attention_mask=mask).last_hidden_state)


def test_parametrized_modules_are_converted_and_restored_with_their_parametrizations():
    """A MultiheadAttention or LayerNorm parametrized itself (parametrize gives it a class of its
    own) is converted, not skipped unreported: it computes what it computed, with its
    parametrization, and restore gives it back parametrized, also when the parametrization was
    registered after optimize (restore used to reset the class and lose the parametrized tensors).
    A parametrized LayerNorm of a Hugging Face model is converted too."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import orthogonal, weight_norm

    torch.manual_seed(0)
    plain = nn.Sequential(nn.MultiheadAttention(16, 2, batch_first=True), nn.LayerNorm(16))
    weight_norm(plain[0], "in_proj_weight")
    orthogonal(plain[0].out_proj)
    weight_norm(plain[1])
    fused_model = copy.deepcopy(plain)
    report = fused_attn.optimize(fused_model)
    assert report.kept == []
    assert report.replaced == [("0", "MultiheadAttention", "FusedMultiheadAttention"),
                               ("1", "LayerNorm", "FusedLayerNorm")]
    assert isinstance(fused_model[0], FusedMultiheadAttention) and isinstance(fused_model[1], FusedLayerNorm)
    assert all(parametrize.is_parametrized(m) for m in fused_model)
    x = torch.randn(2, 5, 16)

    def run(model):
        h = x.to(model[1].weight.dtype)
        return model[1](model[0](h, h, h, need_weights=False)[0])

    assert_model_parity(plain, fused_model, run)
    fused_attn.restore(fused_model)
    assert [fused_attn.convert.own_class(m) for m in fused_model] == [nn.MultiheadAttention, nn.LayerNorm]
    torch.testing.assert_close(run(fused_model), run(plain), rtol=0, atol=0)

    # Parametrized after optimize: restore keeps the parametrization; removing it leaves the class.
    model = nn.Sequential(nn.MultiheadAttention(16, 2, batch_first=True), nn.LayerNorm(16))
    fused_attn.optimize(model)
    weight_norm(model[0], "in_proj_weight")
    weight_norm(model[1])
    expected = run(model)
    fused_attn.restore(model)
    assert [fused_attn.convert.own_class(m) for m in model] == [nn.MultiheadAttention, nn.LayerNorm]
    torch.testing.assert_close(run(model), expected)
    parametrize.remove_parametrizations(model[1], "weight")
    assert type(model[1]) is nn.LayerNorm and model[1](x).shape == x.shape

    transformers, config = _hf_config()
    hf = transformers.BertModel(config).eval()
    weight_norm(hf.embeddings.LayerNorm)
    report = fused_attn.optimize(hf)
    assert ("embeddings.LayerNorm", "LayerNorm", "FusedLayerNorm") in report.replaced
    assert isinstance(hf.embeddings.LayerNorm, FusedLayerNorm) and parametrize.is_parametrized(hf.embeddings.LayerNorm)
    fused_attn.restore(hf)
    assert fused_attn.convert.own_class(hf.embeddings.LayerNorm) is nn.LayerNorm
    assert parametrize.is_parametrized(hf.embeddings.LayerNorm, "weight")


def test_parametrized_modules_are_reported_by_their_own_class():
    """The report names a parametrized module by the class it was made from, as the first
    optimize does ("LayerNorm -> FusedLayerNorm"): when it is kept (float64 parameters) and when a
    second optimize switches its backend, not by the class torch.nn.utils.parametrize derived
    ("ParametrizedLayerNorm", "ParametrizedFusedLayerNorm")."""
    from torch.nn.utils.parametrizations import weight_norm

    model = nn.Sequential(nn.LayerNorm(16), nn.LayerNorm(16).double())
    for norm in model:
        weight_norm(norm)
    first = fused_attn.optimize(model, backend="reference")
    assert first.replaced == [("0", "LayerNorm", "FusedLayerNorm")]
    assert [(path, kind) for path, kind, _ in first.kept] == [("1", "LayerNorm")]
    again = fused_attn.optimize(model, backend="reference")
    assert again.replaced == first.replaced


def test_hf_unsupported_head_dim_keeps_the_attention():
    """A head dim no fused kernel serves leaves the model's attention implementation as it was,
    whichever backend is asked for; the report says so, and the model still runs."""
    transformers, config = _hf_config(hidden_size=640, num_attention_heads=2)
    model = transformers.BertModel(config).eval()
    original = model.config._attn_implementation
    ids, mask = _batch()
    expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
    report = fused_attn.optimize(model, backend="cpu")
    assert model.config._attn_implementation == original
    assert not any(new.startswith("attention") for _, _, new in report.replaced)
    assert ("", f"attention {original}", "head_dim 320 outside [1, 256]") in report.kept
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).last_hidden_state, expected)


def test_restore_of_a_submodel_restores_its_attention():
    transformers, config = _hf_config()
    model = transformers.BertForMaskedLM(config).eval()
    original = model.config._attn_implementation
    fused_attn.optimize(model)
    fused_attn.restore(model.bert)
    assert model.bert.config._attn_implementation == original
    assert model.bert.encoder.layer[0].attention.self.config._attn_implementation == original
    fused_attn.optimize(model)  # the restored submodel rejoins the model's own config
    assert model.bert.config is model.config and model.config._attn_implementation == "fused_attn"
    assert config._attn_implementation == original
    fused_attn.restore(model)
    assert all(m.__dict__.get("config", config) is config for m in model.modules())


def test_nested_optimize_and_restore():
    """optimize() on a model and on its submodel, in either order, with backends; restore() of
    the outer model gives the original config back everywhere."""
    from fused_attn.models import BertConfig, BertForMaskedLM

    transformers, hf_config = _hf_config()
    for model, shared in ((BertForMaskedLM(BertConfig.bert_tiny(vocab_size=50)), None),
                          (transformers.BertForMaskedLM(hf_config), hf_config)):
        shared = model.config
        fused_attn.optimize(model)
        fused_attn.optimize(model.bert)
        fused_attn.restore(model)
        assert model.config is shared and model.bert.config is shared
        fused_attn.optimize(model.bert, backend="reference")
        fused_attn.optimize(model, backend="cpu")
        assert model.bert.config is model.config is not shared
        backend = getattr(model.config, "backend", None) or model.bert.embeddings.LayerNorm.backend
        assert backend == "cpu"
        fused_attn.restore(model)
        assert all(m.__dict__.get("config", shared) is shared for m in model.modules())


def test_float64_models_are_kept_with_a_reason():
    from fused_attn.models import BertConfig, BertModel

    transformers, config = _hf_config()
    for model in (transformers.BertModel(config).double(), BertModel(BertConfig.bert_tiny(vocab_size=50)).double()):
        report = fused_attn.optimize(model)
        assert not report.replaced
        assert [(path, why) for path, _, why in report.kept] == [
            ("", "parameters in float64: the fused kernels take float16, bfloat16 and float32")
        ]
    assert config._attn_implementation != "fused_attn"


def _other_family(name):
    """A small transformers model of another family (random weights, dropout off), its plain
    copy on sdpa, the call that runs it on a padded batch, and what optimize() must report: the
    paths whose attention switches to the fused one, and the fused block classes."""
    transformers = pytest.importorskip("transformers")
    ids, mask = _batch()
    lm = lambda model: model(input_ids=ids, attention_mask=mask).logits  # noqa: E731

    def seq2seq(model):
        return model(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :7]).last_hidden_state

    if name == "gpt2":
        config = transformers.GPT2Config(vocab_size=120, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                         eos_token_id=0)
        model, run, switched, blocks = transformers.GPT2LMHeadModel(config), lm, [""], {"FusedGPT2MLP"}
    elif name == "llama":
        config = transformers.LlamaConfig(vocab_size=120, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        model, run, switched, blocks = transformers.LlamaForCausalLM(config), lm, [""], set()
    elif name == "mistral":
        # Grouped heads and a sliding window (shorter than the batch's sequences) in the mask.
        config = transformers.MistralConfig(vocab_size=120, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                            sliding_window=4)
        model, run, switched, blocks = transformers.MistralForCausalLM(config), lm, [""], set()
    elif name == "distilbert":
        config = transformers.DistilBertConfig(vocab_size=120, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                                               max_position_embeddings=64, dropout=0.0, attention_dropout=0.0)
        model, switched, blocks = transformers.DistilBertModel(config), [""], {"FusedFFN"}
        run = lambda model: model(input_ids=ids, attention_mask=mask).last_hidden_state  # noqa: E731
    elif name == "vit":
        config = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=128, image_size=32, patch_size=8, hidden_dropout_prob=0.0,
                                        attention_probs_dropout_prob=0.0)
        pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        model, switched, blocks = transformers.ViTModel(config), [""], {"FusedViTMLP"}
        run = lambda model: model(pixel_values=pixels).last_hidden_state  # noqa: E731
    elif name == "electra":
        config = transformers.ElectraConfig(vocab_size=120, embedding_size=64, hidden_size=64, num_hidden_layers=1,
                                            num_attention_heads=4, intermediate_size=128, max_position_embeddings=64,
                                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        model, run, switched = transformers.ElectraForMaskedLM(config), lm, [""]
        blocks = {"FusedElectraSelfOutput", "FusedElectraIntermediate", "FusedElectraOutput"}
    elif name == "bart":
        config = transformers.BartConfig(vocab_size=120, d_model=64, encoder_layers=1, decoder_layers=1,
                                         encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                                         decoder_ffn_dim=128, max_position_embeddings=64, dropout=0.0,
                                         attention_dropout=0.0, activation_dropout=0.0)
        model, switched, blocks = transformers.BartModel(config), [""], set()
        run = seq2seq
    elif name == "t5":
        # A composite model: its two stacks have configs of their own, and are converted apart.
        config = transformers.T5Config(vocab_size=120, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                       relative_attention_num_buckets=8, dropout_rate=0.0)
        model, switched, blocks = transformers.T5Model(config), ["decoder", "encoder"], set()
        run = seq2seq
    else:
        raise ValueError(name)
    torch.manual_seed(0)
    plain = type(model)(config).eval()
    plain.set_attn_implementation("sdpa")
    return plain, run, switched, blocks


@pytest.mark.parametrize("name", ["gpt2", "llama", "mistral", "electra", "distilbert", "vit", "bart", "t5"])
def test_hf_models_of_other_families_run_the_fused_attention(name):
    """optimize() on transformers models beyond BERT: the attention of every model whose attention
    goes through transformers' attention interface becomes the fused one (GPT-2's causal and
    padding masks, Llama's grouped key/value heads, Mistral's sliding window, an encoder with
    no mask (ViT), BART's cross-attention, T5's position bias
    in its two separately configured stacks), blocks whose forward is BERT's are fused wherever
    they are (ELECTRA's), and so are feed-forward blocks of two linear layers around an activation
    (GPT-2's, DistilBERT's, ViT's), LayerNorms are converted, and the report says when nothing
    else is of a form the package fuses. Outputs and every parameter gradient match the plain model's;
    restore() gives the plain model back, config objects included."""
    from transformers import PreTrainedModel

    plain, run, switched, blocks = _other_family(name)
    fused_model = copy.deepcopy(plain)
    configs = {path: m.config for path, m in fused_model.named_modules() if isinstance(m, PreTrainedModel)}
    report = fused_attn.optimize(fused_model)
    assert sorted(p for p, old, new in report.replaced if new == "attention fused_attn") == switched
    assert {new for _, _, new in report.replaced if new.startswith("Fused") and new != "FusedLayerNorm"} == blocks
    note = "no feed-forward, intermediate or Add & Norm block of a form fused_attn fuses"
    notes = sorted(p for p, _, why in report.kept if why.startswith(note))
    assert notes == ([] if blocks else switched)
    assert len(report.kept) == len(notes)
    for path in switched:
        assert fused_model.get_submodule(path).config._attn_implementation == "fused_attn"
    assert_model_parity(plain, fused_model, run)
    assert fused_attn.last_backend("scaled_dot_product_attention") in ("cpu", "triton")

    fused_attn.restore(fused_model)
    assert {path: m.config for path, m in fused_model.named_modules() if isinstance(m, PreTrainedModel)} == configs
    assert all(c._attn_implementation == "sdpa" for c in configs.values())
    assert [type(m) for m in fused_model.modules()] == [type(m) for m in plain.modules()]
    assert torch.equal(run(fused_model), run(plain))


def _mlp_family(name, **overrides):
    """A small transformers model (random weights, dropout off unless ``overrides`` set it) whose
    feed-forward blocks are two linear layers around an activation, its run, and the paths of those
    blocks."""
    transformers = pytest.importorskip("transformers")
    ids, mask = _batch()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    vision = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
                  patch_size=8)
    if name == "gpt2":  # transformers' Conv1D layers, a dropout after them
        config = transformers.GPT2Config(**{**dict(vocab_size=120, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                                   eos_token_id=0), **overrides})
        model, blocks = transformers.GPT2Model(config), "h.{}.mlp"
    elif name == "gpt_neox":
        config = transformers.GPTNeoXConfig(**{**dict(vocab_size=120, hidden_size=64, num_attention_heads=4,
                                                      intermediate_size=128, num_hidden_layers=2,
                                                      max_position_embeddings=64, hidden_dropout=0.0,
                                                      attention_dropout=0.0), **overrides})
        model, blocks = transformers.GPTNeoXModel(config), "layers.{}.mlp"
    elif name == "distilbert":  # the chain is FFN.ff_chunk, which its forward calls chunk by chunk
        config = transformers.DistilBertConfig(**{**dict(vocab_size=120, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                                                         max_position_embeddings=64, dropout=0.0,
                                                         attention_dropout=0.0), **overrides})
        model, blocks = transformers.DistilBertModel(config), "transformer.layer.{}.ffn"
    elif name == "vit":
        config = transformers.ViTConfig(**{**vision, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
                                           **overrides})
        model = transformers.ViTModel(config)
    elif name == "siglip":
        model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**{**vision, **overrides}))
    elif name == "clip":
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**{**vision, **overrides}))
    else:
        raise ValueError(name)
    if name in ("vit", "siglip", "clip"):
        config = model.config
        # The layers' MLPs (and SigLIP's pooling head's), wherever this transformers puts them.
        blocks = [p for p, m in model.named_modules() if type(m).__name__.endswith("MLP")]
        run = lambda model: model(pixel_values=pixels).last_hidden_state  # noqa: E731
    else:
        blocks = [blocks.format(i) for i in range(2)]
        run = lambda model: model(input_ids=ids, attention_mask=mask).last_hidden_state  # noqa: E731
    torch.manual_seed(0)
    return type(model)(config).eval(), run, blocks


@pytest.mark.parametrize("name, overrides", [
    ("gpt2", {}),  # gelu_new: the tanh GELU
    ("gpt_neox", {"hidden_act": "relu"}),
    ("distilbert", {"chunk_size_feed_forward": 4}),  # 12 tokens: ff_chunk on three chunks of 4
    ("distilbert", {}),
    ("vit", {}),
    ("siglip", {}),  # gelu_pytorch_tanh
], ids=["gpt2", "gpt_neox-relu", "distilbert-chunked", "distilbert", "vit", "siglip"])
def test_hf_feed_forward_blocks_run_the_fused_ffn(name, overrides, monkeypatch):
    """A block whose forward (or, DistilBERT's, ff_chunk) chains two linear layers around a GELU or
    ReLU, and a dropout after them, runs as one fused_attn.ffn call: GPT-2's MLP (Conv1D layers,
    their weights stored transposed), GPT-NeoX's, DistilBERT's FFN (chunked or not), ViT's and
    SigLIP's MLP. Outputs and every parameter gradient match the plain model's, in inference too;
    the optimized model pickles, and restore() gives the plain blocks back."""
    from fused_attn.integrations import hf

    plain, run, blocks = _mlp_family(name, **overrides)
    calls = []
    monkeypatch.setattr(hf, "ffn", lambda *args, **kwargs: calls.append(kwargs) or fused_attn.ffn(*args, **kwargs))
    fused_model = copy.deepcopy(plain)
    report = fused_attn.optimize(fused_model)
    cls = type(plain.get_submodule(blocks[0])).__name__
    assert [(p, old, new) for p, old, new in report.replaced if p in blocks] == [(p, cls, f"Fused{cls}") for p in blocks]
    assert not [row for row in report.kept if row[0] in blocks]
    with warnings.catch_warnings():
        warnings.simplefilter("error", fused_attn.FallbackWarning)
        assert_model_parity(plain, fused_model, run)
        with torch.no_grad():
            calls.clear()
            torch.testing.assert_close(run(fused_model), run(plain))
    chunks = 3 if overrides.get("chunk_size_feed_forward") else 1
    assert len(calls) == len(blocks) * chunks and all(c["dropout_p"] == 0.0 for c in calls)

    loaded = pickle.loads(pickle.dumps(fused_model))
    assert type(loaded.get_submodule(blocks[0])).__name__ == f"Fused{cls}"
    expected = run(fused_model)
    calls.clear()
    torch.testing.assert_close(run(loaded), expected)
    assert len(calls) == len(blocks) * chunks

    fused_attn.restore(fused_model)
    assert [type(m) for m in fused_model.modules()] == [type(m) for m in plain.modules()]
    assert not any(k.startswith("fused_attn") for k in vars(fused_model.get_submodule(blocks[0])))
    calls.clear()
    torch.testing.assert_close(run(fused_model), run(plain))
    assert calls == []


def test_hf_feed_forward_dropout_is_the_blocks_own():
    """The fused block drops at its dropout's rate in training (the fraction of its outputs zeroed)
    and not in inference; a block without a dropout (ViT's) drops nothing."""
    plain, run, blocks = _mlp_family("gpt2", resid_pdrop=0.5)
    report = fused_attn.optimize(plain)
    assert (blocks[0], "GPT2MLP", "FusedGPT2MLP") in report.replaced
    outputs = []
    plain.get_submodule(blocks[0]).register_forward_hook(lambda mod, args, out: outputs.append(out))
    for training in (True, False):
        plain.train(training)
        run(plain)
        zeros = (outputs.pop() == 0).float().mean().item()
        assert abs(zeros - 0.5) < 0.06 if training else zeros == 0.0

    vit, run, blocks = _mlp_family("vit", hidden_dropout_prob=0.5)
    fused_attn.optimize(vit)
    vit.get_submodule(blocks[0]).register_forward_hook(lambda mod, args, out: outputs.append(out))
    vit.train()
    run(vit)
    assert (outputs.pop() == 0).float().mean().item() == 0.0


def test_hf_feed_forward_blocks_fall_back_where_the_fused_one_cannot_stand_for_them():
    """An activation other than a GELU or ReLU keeps the block (CLIP's quick GELU), with the reason;
    after optimize(), a replaced activation, a hook on a child the fused block reads and an
    adapter-like linear each run transformers' forward (a FallbackWarning for the latter two), and
    a GELU put back runs fused again. A linear that is not exactly torch's keeps the block."""
    from fused_attn.integrations import hf

    clip, _, blocks = _mlp_family("clip")
    report = fused_attn.optimize(clip)
    assert [(p, why) for p, _, why in report.kept] == [(p, "activation QuickGELUActivation is not a GELU or ReLU")
                                                        for p in blocks]

    plain, run, blocks = _mlp_family("vit")
    fused_model = copy.deepcopy(plain)
    fused_attn.optimize(fused_model)
    block = fused_model.get_submodule(blocks[0])
    chain = hf._call_chain(type(plain.get_submodule(blocks[0])).forward)
    first, activation, second = chain
    for model in (plain, fused_model):
        setattr(model.get_submodule(blocks[0]), activation, nn.SiLU())
    torch.testing.assert_close(run(fused_model), run(plain))
    assert block.fused_attn_activation_code is None
    for model in (plain, fused_model):
        setattr(model.get_submodule(blocks[0]), activation, nn.GELU(approximate="tanh"))
    torch.testing.assert_close(run(fused_model), run(plain))
    assert block.fused_attn_activation_code == "tanh"

    hooked = []
    handles = [model.get_submodule(blocks[0]).get_submodule(second).register_forward_hook(
        lambda mod, args, out: hooked.append(1) or out * 0.5) for model in (plain, fused_model)]
    with pytest.warns(fused_attn.FallbackWarning, match="hooks on its"):
        torch.testing.assert_close(run(fused_model), run(plain))
    assert len(hooked) == 2
    for handle in handles:
        handle.remove()

    class ScaledLinear(nn.Linear):  # an adapter-like subclass: its weight alone is not what it computes
        def forward(self, x):
            return 2.0 * super().forward(x)

    def adapt(model):
        linear = model.get_submodule(blocks[1]).get_submodule(first)
        scaled = ScaledLinear(linear.in_features, linear.out_features)
        scaled.load_state_dict(linear.state_dict())
        setattr(model.get_submodule(blocks[1]), first, scaled)

    for model in (plain, fused_model):
        adapt(model)
    with pytest.warns(fused_attn.FallbackWarning, match=f"{first} is ScaledLinear, not Linear"):
        torch.testing.assert_close(run(fused_model), run(plain))

    fresh, _, _ = _mlp_family("vit")
    adapt(fresh)
    report = fused_attn.optimize(fresh)
    assert (blocks[1], "ViTMLP", f"{first} is ScaledLinear, not Linear") in report.kept
    assert (blocks[0], "ViTMLP", "FusedViTMLP") in report.replaced


def test_feed_forward_chains_are_read_from_the_code():
    """The chain is recognised by the shape of the method's code, whatever its names; a forward that
    computes anything more (a residual, another order, an extra argument) is not taken for one."""
    from fused_attn.integrations import hf

    class Chain(nn.Module):
        def forward(self, states):
            states = self.up(states)
            states = self.act(states)
            states = self.down(states)
            return states

    class Renamed(nn.Module):
        def forward(self, features):
            out = self.up(features)
            out = self.act(out)
            out = self.down(out)
            out = self.drop(out)
            return out

    class Residual(nn.Module):
        def forward(self, x):
            h = self.up(x)
            h = self.act(h)
            h = self.down(h)
            return h + x

    class Nested(nn.Module):
        def forward(self, x):
            return self.down(self.act(self.up(x)))

    class TwoInputs(nn.Module):
        def forward(self, x, scale):
            x = self.up(x)
            x = self.act(x)
            x = self.down(x)
            return x

    assert hf._call_chain(Chain.forward) == ("up", "act", "down")
    assert hf._call_chain(Renamed.forward) == ("up", "act", "down", "drop")
    assert all(hf._call_chain(cls.forward) is None for cls in (Residual, Nested, TwoInputs))
    module = Chain()
    module.up, module.act, module.down = nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)
    assert hf._mlp_form(module) == ("forward", ("up", "act", "down"))
    module.act = nn.Linear(16, 16)  # three linear layers: no activation between them
    assert hf._mlp_form(module) is None
    module.act, module.down = nn.GELU(), nn.LayerNorm(16)
    assert hf._mlp_form(module) is None


def test_hf_encoder_decoder_of_berts_is_fused_model_by_model():
    """An EncoderDecoderModel pairs two BERTs with configs of their own (and gives the decoder's
    head another config object than its base model): each BERT gets its blocks and LayerNorms
    fused and, where its layers read the config that gets switched, the fused attention; the pair
    computes what it did, and restore() undoes both."""
    transformers = pytest.importorskip("transformers")
    encoder = transformers.BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                      intermediate_size=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    decoder = transformers.BertConfig(**{**encoder.to_dict(), "is_decoder": True, "add_cross_attention": True})
    torch.manual_seed(0)
    plain = transformers.EncoderDecoderModel(encoder=transformers.BertModel(encoder),
                                             decoder=transformers.BertLMHeadModel(decoder)).eval()
    fused_model = copy.deepcopy(plain)
    report = fused_attn.optimize(fused_model)
    assert [p for p, _, new in report.replaced if new == "attention fused_attn"] == ["decoder.bert"]
    # The encoder's layers read the config object they were built with, not the one the pair gave
    # the encoder: switching the encoder's would not reach them, and the report says so.
    assert [(p, why) for p, _, why in report.kept] == [
        ("encoder", "its attention modules (encoder.layer.0.attention.self) read another config object than the "
                    "model's")]
    assert fused_model.encoder.config._attn_implementation == "sdpa"
    assert {"FusedBertOutput", "FusedBertSelfOutput", "FusedBertIntermediate"} <= {new for _, _, new in report.replaced}
    ids, mask = _batch()

    def run(model):
        return model(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :7]).logits

    assert_model_parity(plain, fused_model, run)
    fused_attn.restore(fused_model)
    assert fused_model.encoder.config is fused_model.config.encoder
    assert torch.equal(run(fused_model), run(plain))


def test_hf_attention_outside_the_interface_is_kept():
    """A model whose attention does not go through transformers' attention interface (DeBERTa's
    disentangled attention) keeps it, with the reason in the report; its BERT-form GELU blocks
    are still fused, and the model computes what it did."""
    transformers = pytest.importorskip("transformers")
    config = transformers.DebertaConfig(vocab_size=120, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                        intermediate_size=128, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                        attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    plain = transformers.DebertaModel(config).eval()
    fused_model = copy.deepcopy(plain)
    original = fused_model.config._attn_implementation
    report = fused_attn.optimize(fused_model)
    assert report.kept == [("", f"attention {original}",
                            "DebertaModel's attention does not go through transformers' attention interface")]
    assert [new for _, _, new in report.replaced] == ["FusedDebertaIntermediate"]
    assert fused_model.config._attn_implementation == original
    ids, mask = _batch()
    assert_model_parity(plain, fused_model, lambda model: model(input_ids=ids, attention_mask=mask).last_hidden_state)


def _kept_attention(model, *reason_fragments):
    """optimize() keeps ``model``'s attention with a reason containing one of ``reason_fragments``,
    and the model computes exactly what it did."""
    ids, mask = _batch()
    model.eval()
    expected = model(input_ids=ids, attention_mask=mask).logits
    original = model.config._attn_implementation
    report = fused_attn.optimize(model)
    rows = [why for path, what, why in report.kept if path == "" and what == f"attention {original}"]
    assert len(rows) == 1 and any(fragment in rows[0] for fragment in reason_fragments), report.kept
    assert not any(new == "attention fused_attn" for _, _, new in report.replaced)
    assert model.config._attn_implementation == original
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, expected, rtol=0, atol=0)


def test_hf_models_transformers_does_not_run_on_sdpa_keep_their_attention():
    """The fused attention has sdpa's semantics: a model that transformers does not run on sdpa
    (Gemma 2's logit soft-capping, decoders whose masks are built for eager) keeps its attention,
    with the reason, instead of failing or attending differently. (transformers 5.17 still runs
    Gemma 2 on sdpa, handing the attention function the soft-capping, which the fused one does not
    implement: kept for that reason.)"""
    transformers = pytest.importorskip("transformers")
    config = transformers.Gemma2Config(vocab_size=120, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       max_position_embeddings=64)
    torch.manual_seed(0)
    _kept_attention(transformers.Gemma2ForCausalLM(config), "transformers does not run Gemma2Model on sdpa",
                    "hands the attention function softcap")


def test_hf_attention_handing_over_what_the_fused_function_does_not_implement_is_kept():
    """DeepSeek-V3.2's sparse attention hands the attention function the top-k key indices
    (``indices``) on every implementation but eager and sdpa: optimize() keeps it (the fused
    function would refuse the call, as it refuses soft-capping and sinks)."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "DeepseekV32Config"):
        pytest.skip("this transformers has no DeepSeek-V3.2")
    config = transformers.DeepseekV32Config(
        vocab_size=120, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
        first_k_dense_replace=2, index_topk=4, index_head_dim=8, index_n_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    _kept_attention(transformers.DeepseekV32ForCausalLM(config), "hands the attention function indices")


def test_hf_head_dim_is_read_from_the_attention_modules():
    """Multi-head latent attention (DeepSeek-V3) declares a head_dim in its config that is only
    the rotary slice; the attention runs at qk_nope + qk_rope = 272, which no kernel serves."""
    transformers = pytest.importorskip("transformers")
    config = transformers.DeepseekV3Config(
        vocab_size=120, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
        qk_nope_head_dim=264, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
        first_k_dense_replace=1, max_position_embeddings=64)
    torch.manual_seed(0)
    _kept_attention(transformers.DeepseekV3ForCausalLM(config), "head_dim 272 outside [1, 256]")


def test_hf_attention_transformers_does_not_switch_is_reported_kept():
    """A model class transformers will not switch at run time (one whose source it cannot read,
    e.g. defined in a notebook) keeps its attention, and the report says so."""
    pytest.importorskip("transformers")
    from transformers.models.bert.modeling_bert import BertEmbeddings, BertEncoder, BertPreTrainedModel

    source = (
        "class NotebookBert(BertPreTrainedModel):\n"
        "    def __init__(self, config):\n"
        "        super().__init__(config)\n"
        "        self.embeddings = BertEmbeddings(config)\n"
        "        self.encoder = BertEncoder(config)\n"
        "        self.post_init()\n"
        "    def forward(self, input_ids, attention_mask=None):\n"
        "        return self.encoder(self.embeddings(input_ids=input_ids)).last_hidden_state\n"
    )
    namespace = {"BertPreTrainedModel": BertPreTrainedModel, "BertEmbeddings": BertEmbeddings,
                 "BertEncoder": BertEncoder, "__name__": "notebook_cell"}
    exec(compile(source, "<cell>", "exec"), namespace)
    _, config = _hf_config()
    torch.manual_seed(0)
    model = namespace["NotebookBert"](config).eval()
    ids, _ = _batch()
    expected = model(ids)
    report = fused_attn.optimize(model)
    assert ("", "attention sdpa", "transformers did not switch NotebookBert's attention implementation") in report.kept
    assert "FusedBertOutput" in {new for _, _, new in report.replaced}
    torch.testing.assert_close(model(ids), expected)


def test_hf_composite_model_own_layers():
    """A composite model's own layers (outside its separately configured submodels) get their
    BERT-form blocks fused (GIT's text encoder), and an attention of its own that would need its
    config switched is kept with a line in the report (Kosmos-2's image-to-text projection)."""
    transformers = pytest.importorskip("transformers")
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=16,
                  patch_size=8)
    torch.manual_seed(0)
    git = transformers.GitModel(transformers.GitConfig(
        vision_config=vision, vocab_size=120, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, max_position_embeddings=64, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)).eval()
    report = fused_attn.optimize(git)
    assert {"FusedGitOutput", "FusedGitSelfOutput", "FusedGitIntermediate"} <= {new for _, _, new in report.replaced}
    kosmos = transformers.Kosmos2Model(transformers.Kosmos2Config(
        text_config=dict(vocab_size=120, embed_dim=64, layers=1, attention_heads=4, ffn_dim=128,
                         max_position_embeddings=64),
        vision_config=vision, latent_query_num=4)).eval()
    report = fused_attn.optimize(kosmos)
    assert [(path, why[:39]) for path, what, why in report.kept if path == "image_to_text_projection.x_attn"] == [
        ("image_to_text_projection.x_attn", "attention of the composite Kosmos2Model")]
    fused_attn.restore(kosmos)
    fused_attn.restore(git)


def test_hf_model_treating_sdpa_apart_keeps_its_attention():
    """Gemma 4 slices the queries of its KV-shared layers except under the implementation named
    "sdpa": under any other name (the fused one's) its masks would hide other keys, so it keeps
    its attention, with the method in the report."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Gemma4TextConfig"):
        pytest.skip("this transformers has no Gemma 4")
    source = inspect.getsource(importlib.import_module("transformers.models.gemma4.modeling_gemma4"))
    if '"sdpa"' not in source and "'sdpa'" not in source:
        pytest.skip("this transformers' Gemma 4 runs alike on every attention implementation (its code names no sdpa)")
    config = transformers.Gemma4TextConfig(
        vocab_size=120, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, global_head_dim=16, hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=120, sliding_window=8, num_kv_shared_layers=2,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])
    torch.manual_seed(0)
    _kept_attention(transformers.Gemma4ForCausalLM(config), "runs the model differently on sdpa")


def test_hf_user_code_treating_sdpa_apart_keeps_the_attention():
    """The sdpa check reads the model's own code wherever it comes from (here a user's subclass,
    as remote code would be), not only transformers' model files."""
    transformers = pytest.importorskip("transformers")

    class Tuned(transformers.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            if self.config._attn_implementation == "sdpa":
                kwargs["logits_to_keep"] = 0
            return super().forward(*args, **kwargs)

    config = transformers.LlamaConfig(vocab_size=120, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    _kept_attention(Tuned(config), "Tuned.forward runs the model differently on sdpa")


def test_hf_attention_chosen_as_another_kernel_is_kept():
    """A model built with another attention kernel (flex attention) builds its masks in that
    kernel's form: optimize() leaves its attention alone."""
    transformers, config = _hf_config()
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(config)
    model.set_attn_implementation("flex_attention")
    report = fused_attn.optimize(model)
    assert ("", "attention flex_attention", "attn_implementation 'flex_attention' was chosen for it") in report.kept
    assert model.config._attn_implementation == "flex_attention"


def test_hf_model_class_without_sdpa_flag_around_a_bert_is_switched():
    """The sdpa gate looks at the transformers model holding the attention (here a BertModel),
    not at a user's wrapper class around it, which declares nothing."""
    transformers, config = _hf_config()

    class Classifier(transformers.PreTrainedModel):
        config_class = transformers.BertConfig

        def __init__(self, config):
            super().__init__(config)
            self.bert = transformers.BertModel(config)
            self.head = nn.Linear(config.hidden_size, 3)
            self.post_init()

        def forward(self, input_ids, attention_mask=None):
            return self.head(self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state)

    torch.manual_seed(0)
    plain = Classifier(config).eval()
    fused_model = copy.deepcopy(plain)
    report = fused_attn.optimize(fused_model)
    # transformers runs the wrapper, and so the BERT that shares its config, on eager.
    assert ("", "attention eager", "attention fused_attn") in report.replaced
    ids, mask = _batch()
    assert_model_parity(plain, fused_model, lambda model: model(ids, mask))


def test_hf_optimized_model_of_another_family_loads_in_a_fresh_process(tmp_path):
    """A switched model with no fused block (Llama) registers the fused attention again where it
    is loaded, so torch.load of the whole model, or of its backbone alone, runs in a fresh
    process."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=120, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    fused_attn.optimize(model)
    ids, mask = _batch()
    expected = model(input_ids=ids, attention_mask=mask).logits
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    for name, saved in (("model", model), ("backbone", model.model)):  # the backbone alone, too
        torch.save({"model": saved}, tmp_path / f"{name}.pt")
    torch.save({"ids": ids, "mask": mask, "expected": expected, "hidden": hidden}, tmp_path / "data.pt")
    script = (
        "import sys, torch\n"
        "name = sys.argv[1]\n"
        f"model = torch.load({str(tmp_path)!r} + f'/{{name}}.pt', weights_only=False)['model']\n"
        f"data = torch.load({str(tmp_path / 'data.pt')!r})\n"
        "assert model.config._attn_implementation == 'fused_attn'\n"
        "out = model(input_ids=data['ids'], attention_mask=data['mask'])\n"
        "out = out.logits if name == 'model' else out.last_hidden_state\n"
        "sys.exit(0 if torch.equal(out, data['expected' if name == 'model' else 'hidden']) else 3)\n"
    )
    for name in ("model", "backbone"):
        result = subprocess.run([sys.executable, "-c", script, name], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, name + ": " + result.stderr[-3000:]
    fused_attn.restore(model)
    assert not any("_fused_attn_registration" in m.__dict__ for m in model.modules())


def test_hf_decorated_block_forward_is_not_taken_for_bert_s():
    """A block whose forward has BERT's body under a decorator (here torch.no_grad) computes
    something else: optimize() leaves it to its own forward."""
    transformers, config = _hf_config()
    from transformers.models.bert.modeling_bert import BertIntermediate

    class FrozenIntermediate(BertIntermediate):
        @torch.no_grad()
        def forward(self, hidden_states):
            hidden_states = self.dense(hidden_states)
            hidden_states = self.intermediate_act_fn(hidden_states)
            return hidden_states

    torch.manual_seed(0)
    plain = transformers.BertModel(config).eval()
    plain.encoder.layer[0].intermediate.__class__ = FrozenIntermediate
    fused_model = copy.deepcopy(plain)
    fused_attn.optimize(fused_model)
    assert type(fused_model.encoder.layer[0].intermediate) is FrozenIntermediate
    assert type(fused_model.encoder.layer[1].intermediate).__name__ == "FusedBertIntermediate"
    ids, mask = _batch()
    assert_model_parity(plain, fused_model, lambda model: model(input_ids=ids, attention_mask=mask).last_hidden_state)


def test_hf_blocks_are_recognised_by_what_they_compute_not_their_name():
    """A block with the name and the submodules of BERT's Add & Norm block but another forward
    (here the residual counted twice) is not taken for one: optimize() leaves it to its own
    forward, and the model's output is still the plain one."""
    transformers, config = _hf_config()
    from transformers.models.bert.modeling_bert import BertOutput

    class DoubledResidualOutput(BertOutput):
        def forward(self, hidden_states, input_tensor):
            return self.LayerNorm(self.dropout(self.dense(hidden_states)) + 2 * input_tensor)

    torch.manual_seed(0)
    plain = transformers.BertModel(config).eval()
    plain.encoder.layer[0].output.__class__ = DoubledResidualOutput
    fused_model = copy.deepcopy(plain)
    report = fused_attn.optimize(fused_model)
    fused_blocks = [p for p, _, new in report.replaced if new.endswith("Output") and new.startswith("Fused")]
    assert "encoder.layer.0.output" not in fused_blocks and "encoder.layer.1.output" in fused_blocks
    assert type(fused_model.encoder.layer[0].output) is DoubledResidualOutput
    ids, mask = _batch()
    assert_model_parity(plain, fused_model, lambda model: model(input_ids=ids, attention_mask=mask).last_hidden_state)


def test_hf_attention_function_is_causal_where_sdpa_is():
    """Without an explicit is_causal, the fused attention function decides causality as
    transformers' sdpa function does: from the module's is_causal, True where it has none, and
    never with a mask or a single query."""
    pytest.importorskip("transformers")
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from fused_attn.integrations import hf

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 8, generator=gen) for _ in range(3))
    causal_module, plain_module = nn.Module(), nn.Module()
    plain_module.is_causal = False
    for module in (nn.Module(), causal_module, plain_module):
        for mask, query in ((None, q), (torch.ones(1, 1, 5, 5, dtype=torch.bool), q), (None, q[:, :, :1])):
            expected = sdpa_attention_forward(module, query, k, v, mask)[0]
            torch.testing.assert_close(hf.fused_attention_forward(module, query, k, v, mask)[0], expected)


# ---------------------------------------------------------------------------------------------
# The package's reference models


def test_optimize_reference_bert_and_transformer():
    from fused_attn.models import BertConfig, BertForMaskedLM, Transformer, TransformerConfig

    torch.manual_seed(0)
    bert = BertForMaskedLM(BertConfig.bert_tiny(vocab_size=100, hidden_dropout_prob=0.0,
                                                attention_probs_dropout_prob=0.0)).eval()
    plain = copy.deepcopy(bert)
    ids, mask = torch.randint(0, 100, (2, 10)), torch.ones(2, 10, dtype=torch.long)
    mask[0, 7:] = 0
    report = fused_attn.optimize(bert, backend="triton")
    assert report.replaced == [("", "BertForMaskedLM(fused=False)", "BertForMaskedLM(fused=True)")]
    assert bert.config.fused and bert.config.backend == "triton"
    assert_model_parity(plain, bert, lambda m: m(input_ids=ids, attention_mask=mask).logits)
    fused_attn.restore(bert)
    assert not bert.config.fused and bert.config.backend is None

    transformer = Transformer(TransformerConfig(src_vocab_size=50, d_model=32, nhead=4, dim_feedforward=64,
                                                num_encoder_layers=1, num_decoder_layers=1, dropout=0.0))
    fused_attn.optimize(transformer)
    assert transformer.config.fused


def test_hf_roberta_optimized_matches_unoptimized():
    transformers = pytest.importorskip("transformers")
    config = transformers.RobertaConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=128, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                        attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    plain = transformers.RobertaForMaskedLM(config).eval()
    fused_model = copy.deepcopy(plain)
    report = fused_attn.optimize(fused_model)
    assert {"attention fused_attn", "FusedRobertaSelfOutput", "FusedRobertaIntermediate", "FusedRobertaOutput"} <= {
        new for _, _, new in report.replaced
    }
    ids, mask = _batch()
    ids = ids.clamp(min=3)
    assert_model_parity(plain, fused_model, lambda model: model(input_ids=ids, attention_mask=mask).logits)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_hf_bert_optimized_matches_unoptimized_on_gpu(dtype, backend):
    transformers, config = _hf_config()
    torch.manual_seed(0)
    plain = transformers.BertForMaskedLM(config).eval().to("cuda", dtype)
    fused_model = copy.deepcopy(plain)
    fused_attn.optimize(fused_model, backend=backend)
    ids, mask = (t.cuda() for t in _batch())
    assert_model_parity(plain, fused_model, lambda model: model(input_ids=ids, attention_mask=mask).logits)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_torch_transformer_optimized_on_gpu(dtype):
    plain = _transformer().to("cuda", dtype)
    fused_model = copy.deepcopy(plain)
    fused_attn.optimize(fused_model)

    def run(model):
        torch.manual_seed(1)
        src = torch.randn(2, 9, 32, device="cuda", dtype=next(model.parameters()).dtype)
        tgt = torch.randn(2, 6, 32, device="cuda", dtype=src.dtype)
        causal = nn.Transformer.generate_square_subsequent_mask(6, device="cuda", dtype=src.dtype)
        return model(src, tgt, tgt_mask=causal, tgt_is_causal=True)

    assert_model_parity(plain, fused_model, run)
