"""Whole-model parity of the reference models (fused_attn.models), plain vs fused.

Parity follows tests/conftest.py's rule, applied to a whole model: the plain model in float64
is the truth; the plain model in float32 and the fused model in float32 (same parameters) are
both compared with it; for the output(s) and the gradient of every parameter, the fused error
must stay within 3x the plain error plus a floor of one float32 ulp at the problem's scale (the
largest magnitude among the true outputs and parameter gradients, at least 1). Eval mode
(dropout off), padded sequences, causal decoders, float32 on CPU; backends: "triton" (under
TRITON_INTERPRET=1), "auto" and "cpu" where fused_attn reports a CPU kernel for every op the
model calls (else skipped, naming the ops that lack one).

With transformers installed: a Hugging Face BERT (random init) loads into ours with
strict=True and gives its outputs, plain and fused (judged against the Hugging Face model in
float64), and ours loads into theirs.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import fused_attn
from fused_attn import backends
from fused_attn.models import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
    Transformer,
    TransformerConfig,
)
from fused_attn.models.transformer import sinusoidal_positions

from .conftest import ParityReport, _magnitude, _max_err, check_tensor_parity

BERT_OPS = ("layer_norm", "scaled_dot_product_attention", "add_layer_norm", "linear_gelu")
POST_LN_OPS = ("scaled_dot_product_attention", "add_layer_norm", "linear_gelu")
PRE_LN_OPS = ("layer_norm", "scaled_dot_product_attention", "add_layer_norm", "ffn")
CPU_F32 = backends.Inputs(torch.device("cpu"), torch.float32)
FP32_EPS = torch.finfo(torch.float32).eps


def _backend_params() -> list:
    return [pytest.param(name, id=name) for name in ("triton", "auto", "cpu")]


def _require(backend: str, ops: tuple[str, ...]) -> None:
    """Skips unless ``backend`` can serve every op of the model here (by fused_attn's own account)."""
    if backend == "auto":
        return
    missing = []
    for op in ops:
        reasons = backends.explain(op, CPU_F32).get(backend, [f"{op} has no {backend} implementation"])
        if reasons:
            missing.append(f"{op}: {'; '.join(reasons)}")
    if missing:
        pytest.skip(f"backend {backend!r} cannot serve: " + " | ".join(missing))


def _check_served(backend: str, ops: tuple[str, ...]) -> None:
    for op in ops:
        served = fused_attn.last_backend(op)
        if backend == "auto":
            assert served in backends.AUTO_ORDER["cpu"], f"auto ran {op} on {served!r}, not a fused kernel"
        else:
            assert served == backend, f"{op} ran on {served!r}, not {backend!r}"


# ---------------------------------------------------------------------------------------------
# The parity helper


def _fused_copy(model: torch.nn.Module, backend: str | None) -> torch.nn.Module:
    fused = copy.deepcopy(model)  # the copy has its own config, shared by all its submodules
    fused.config.fused = True
    fused.config.backend = backend
    return fused


def _assert_model_parity(model, run, backend, ops, *, seed=0, factor=3.0) -> list[ParityReport]:
    """``run(model)`` -> tuple of output tensors; checks outputs and every parameter gradient."""
    model = model.float().eval()
    truth_model = copy.deepcopy(model).double()
    fused_model = _fused_copy(model, backend)
    assert fused_model.state_dict().keys() == model.state_dict().keys()

    truth = run(truth_model)
    gen = torch.Generator().manual_seed(seed)
    # Rounded to the models' float32 once, so that all three get the same upstream gradient.
    upstream = [torch.randn(t.shape, generator=gen, dtype=torch.float64).float().double() for t in truth]
    results = {}
    for name, m in (("truth", truth_model), ("plain", model), ("fused", fused_model)):
        outs = truth if name == "truth" else run(m)
        sum((o * u.to(o.dtype)).sum() for o, u in zip(outs, upstream)).backward()
        grads = {k: p.grad for k, p in m.named_parameters()}
        results[name] = (outs, grads)
    _check_served(backend, ops)

    true_outs, true_grads = results["truth"]
    assert all(g is not None for g in true_grads.values()), "a parameter received no gradient"
    scale = max([1.0] + [_magnitude(t) for t in true_outs] + [_magnitude(g) for g in true_grads.values()])
    pairs = [(f"output {i}", i) for i in range(len(true_outs))] + [(f"grad {k}", k) for k in true_grads]
    reports, failures = [], []
    for label, key in pairs:
        if isinstance(key, int):
            truth_v, plain_v, fused_v = true_outs[key], results["plain"][0][key], results["fused"][0][key]
        else:
            truth_v, plain_v, fused_v = true_grads[key], results["plain"][1][key], results["fused"][1][key]
            assert fused_v is not None, f"no gradient reached {key} in the fused model"
        assert fused_v.dtype == torch.float32
        try:
            reports.append(check_tensor_parity(label, fused_v, plain_v, truth_v, factor=factor, problem_scale=scale))
        except AssertionError as exc:
            failures.append(str(exc))
    assert not failures, "fused model outside the parity bound:\n" + "\n".join(failures)
    return reports


# ---------------------------------------------------------------------------------------------
# Inputs


def _bert_config(**overrides) -> BertConfig:
    base = dict(
        vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
    )
    return BertConfig(**{**base, **overrides})


def _bert_batch(config: BertConfig, batch=2, length=12, lengths=(12, 7), seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, config.vocab_size, (batch, length), generator=gen)
    attention_mask = torch.zeros(batch, length, dtype=torch.long)
    for i, n in enumerate(lengths):
        attention_mask[i, :n] = 1
    ids = ids.masked_fill(attention_mask == 0, config.pad_token_id)
    token_type_ids = torch.zeros(batch, length, dtype=torch.long)
    token_type_ids[:, length // 2 :] = 1
    return ids, attention_mask, token_type_ids


def _init_non_trivial(model: torch.nn.Module, seed=0) -> None:
    """Moves LayerNorm weights and biases away from 1/0 so that their gradients all matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.add_(0.1 * torch.randn(m.weight.shape, generator=gen))
                m.bias.add_(0.1 * torch.randn(m.bias.shape, generator=gen))
            elif isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.add_(0.02 * torch.randn(m.bias.shape, generator=gen))


# ---------------------------------------------------------------------------------------------
# BERT parity, plain vs fused


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("hidden_act", ["gelu_new", "relu"])
def test_bert_model_parity(backend, hidden_act):
    _require(backend, BERT_OPS)
    torch.manual_seed(0)
    config = _bert_config(hidden_act=hidden_act)
    model = BertModel(config)
    _init_non_trivial(model)
    ids, mask, types = _bert_batch(config)

    def run(m):
        out = m(ids, attention_mask=mask, token_type_ids=types)
        return out.last_hidden_state, out.pooler_output

    _assert_model_parity(model, run, backend, BERT_OPS)


@pytest.mark.parametrize("backend", _backend_params())
def test_bert_masked_lm_parity(backend):
    _require(backend, BERT_OPS)
    torch.manual_seed(1)
    config = _bert_config()
    model = BertForMaskedLM(config)
    _init_non_trivial(model, seed=1)
    ids, mask, types = _bert_batch(config, seed=1)
    labels = torch.where(torch.rand(ids.shape, generator=torch.Generator().manual_seed(2)) < 0.3, ids, -100)
    labels = labels.masked_fill(mask == 0, -100)

    def run(m):
        out = m(ids, attention_mask=mask, token_type_ids=types, labels=labels)
        return out.logits, out.loss

    _assert_model_parity(model, run, backend, BERT_OPS)


@pytest.mark.parametrize("backend", _backend_params())
def test_bert_gradient_penalty_parity(backend):
    """A loss plus the squared norm of its own parameter gradients (create_graph=True, then a
    backward through them: the second-order path of every fused op the model runs) gives the
    plain model's value and parameter gradients."""
    _require(backend, BERT_OPS)
    torch.manual_seed(3)
    config = _bert_config(num_hidden_layers=1)
    model = BertForMaskedLM(config)
    _init_non_trivial(model, seed=3)
    ids, mask, types = _bert_batch(config, batch=2, lengths=(10, 6), length=10, seed=3)
    labels = ids.masked_fill(mask == 0, -100)

    def run(m):
        loss = m(ids, attention_mask=mask, token_type_ids=types, labels=labels).loss
        grads = torch.autograd.grad(loss, list(m.parameters()), create_graph=True)
        return (loss + 0.1 * sum(g.square().sum() for g in grads),)

    _assert_model_parity(model, run, backend, BERT_OPS)


@pytest.mark.parametrize("backend", _backend_params())
def test_bert_sequence_classification_parity(backend):
    _require(backend, BERT_OPS)
    torch.manual_seed(2)
    config = _bert_config(num_hidden_layers=1)
    model = BertForSequenceClassification(config)
    _init_non_trivial(model, seed=2)
    ids, mask, types = _bert_batch(config, batch=3, lengths=(12, 5, 9), length=12, seed=2)
    labels = torch.tensor([0, 2, 1])

    def run(m):
        out = m(ids, attention_mask=mask, token_type_ids=types, labels=labels)
        return out.logits, out.loss

    _assert_model_parity(model, run, backend, BERT_OPS)


# ---------------------------------------------------------------------------------------------
# Encoder-decoder Transformer parity, plain vs fused


def _transformer_batch(config: TransformerConfig, *, left_pad_tgt=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    batch, src_len, tgt_len = 2, 10, 8
    src = torch.randint(1, config.src_vocab_size, (batch, src_len), generator=gen)
    tgt = torch.randint(1, config.tgt_vocab_size, (batch, tgt_len), generator=gen)
    src_pad = torch.zeros(batch, src_len, dtype=torch.bool)
    src_pad[1, 7:] = True
    tgt_pad = torch.zeros(batch, tgt_len, dtype=torch.bool)
    if left_pad_tgt:
        # Under the causal mask the first queries of sequence 1 see no key at all: zero rows.
        tgt_pad[1, :3] = True
    else:
        tgt_pad[1, 5:] = True
    src, tgt = src.masked_fill(src_pad, config.pad_token_id), tgt.masked_fill(tgt_pad, config.pad_token_id)
    labels = torch.randint(1, config.tgt_vocab_size, (batch, tgt_len), generator=gen).masked_fill(tgt_pad, -100)
    return src, tgt, src_pad, tgt_pad, labels


def _transformer_config(**overrides) -> TransformerConfig:
    base = dict(
        src_vocab_size=61, tgt_vocab_size=53, d_model=64, nhead=2, num_encoder_layers=1, num_decoder_layers=1,
        dim_feedforward=96, dropout=0.0, max_position_embeddings=32,
    )
    return TransformerConfig(**{**base, **overrides})


def test_transformer_embeddings_are_the_standard_ones():
    """Token embeddings scaled by sqrt(d_model) (unless scale_embedding=False) plus the sinusoidal
    table of "Attention Is All You Need": PE(p, 2i) = sin(p / 10000^(2i/d)), PE(p, 2i+1) = cos(...)."""
    d_model, length = 64, 20
    position = torch.arange(length, dtype=torch.float64)[:, None]
    angle = position / 10000 ** (torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
    table = sinusoidal_positions(length, d_model)
    torch.testing.assert_close(table[:, 0::2], torch.sin(angle).float())
    torch.testing.assert_close(table[:, 1::2], torch.cos(angle).float())
    tokens = torch.randint(1, 61, (2, length), generator=torch.Generator().manual_seed(0))
    for scale in (True, False):
        model = Transformer(_transformer_config(positional="sinusoidal", scale_embedding=scale)).eval()
        embedded = model._embed(tokens, model.src_embed, None)
        expected = model.src_embed(tokens) * (d_model**0.5 if scale else 1.0) + table
        torch.testing.assert_close(embedded, expected)


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize(
    "norm_first, positional, activation, left_pad_tgt",
    [(False, "sinusoidal", "gelu", False), (True, "learned", "gelu_tanh", True), (True, "sinusoidal", "relu", False)],
    ids=["post_ln-sinusoidal", "pre_ln-learned-left_pad", "pre_ln-relu"],
)
def test_transformer_parity(backend, norm_first, positional, activation, left_pad_tgt):
    ops = PRE_LN_OPS if norm_first else POST_LN_OPS
    _require(backend, ops)
    torch.manual_seed(3)
    # Two encoder layers in the pre-LN case: the residual stream crosses a layer boundary.
    config = _transformer_config(
        norm_first=norm_first, positional=positional, activation=activation, num_encoder_layers=2 if norm_first else 1
    )
    model = Transformer(config)
    _init_non_trivial(model, seed=3)
    src, tgt, src_pad, tgt_pad, labels = _transformer_batch(config, left_pad_tgt=left_pad_tgt)

    def run(m):
        out = m(src, tgt, src_key_padding_mask=src_pad, tgt_key_padding_mask=tgt_pad, labels=labels)
        return out.logits, out.loss, out.encoder_last_hidden_state

    _assert_model_parity(model, run, backend, ops)


def test_transformer_mask_semantics():
    """Padding masks follow torch's convention (True = pad; the source mask also masks the
    cross-attention keys) and the decoder self-attention is causal."""
    torch.manual_seed(4)
    config = _transformer_config(num_decoder_layers=1, norm_first=True)
    model = Transformer(config).double().eval()
    src, tgt, src_pad, tgt_pad, _ = _transformer_batch(config)
    out = model(src, tgt, src_pad, tgt_pad).logits
    # Changing padded tokens (keys masked everywhere) must not change the outputs at real positions.
    src2 = src.masked_fill(src_pad, 5)
    tgt2 = tgt.masked_fill(tgt_pad, 7)
    out2 = model(src2, tgt2, src_pad, tgt_pad).logits
    real = ~tgt_pad
    torch.testing.assert_close(out2[real], out[real], rtol=0, atol=1e-12)
    # Causality: changing the last target token changes nothing before it.
    tgt3 = tgt.clone()
    tgt3[:, -1] = 11
    out3 = model(src, tgt3, src_pad, tgt_pad).logits
    torch.testing.assert_close(out3[:, :-1], out[:, :-1], rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# What the fused path calls


def test_fused_path_calls_every_op_with_config_backend(monkeypatch):
    calls: list[tuple[str, tuple, dict]] = []
    for name in ("scaled_dot_product_attention", "layer_norm", "add_layer_norm", "linear_activation", "ffn"):
        original = getattr(fused_attn.ops, name)

        def spy(*args, __name=name, __original=original, **kwargs):
            calls.append((__name, args, kwargs))
            return __original(*args, **kwargs)

        monkeypatch.setattr(fused_attn.ops, name, spy)

    config = _bert_config(fused=True, backend="reference", hidden_dropout_prob=0.25, attention_probs_dropout_prob=0.125)
    ids, mask, types = _bert_batch(config)
    model = BertForMaskedLM(config)
    model(ids, mask, types)
    names = [c[0] for c in calls]
    assert names.count("scaled_dot_product_attention") == 2 and names.count("add_layer_norm") == 4
    assert names.count("linear_activation") == 3 and names.count("layer_norm") == 2
    # Dropout inside the ops in train mode (attention probabilities; hidden dropout in Add & Norm), off in eval.
    dropout = lambda c: c[2]["dropout_p"] if c[0] == "scaled_dot_product_attention" else c[1][5]  # noqa: E731
    assert {dropout(c) for c in calls if c[0] in ("scaled_dot_product_attention", "add_layer_norm")} == {0.125, 0.25}
    calls.clear()
    model.eval()(ids, mask, types)
    assert {dropout(c) for c in calls if c[0] in ("scaled_dot_product_attention", "add_layer_norm")} == {0.0}

    calls.clear()
    tconfig = _transformer_config(fused=True, backend="reference")
    src, tgt, src_pad, tgt_pad, _ = _transformer_batch(tconfig)
    Transformer(tconfig)(src, tgt, src_pad, tgt_pad)
    tconfig_pre = _transformer_config(fused=True, backend="reference", norm_first=True)
    Transformer(tconfig_pre)(src, tgt, src_pad, tgt_pad)
    assert {c[0] for c in calls} == {"scaled_dot_product_attention", "layer_norm", "add_layer_norm", "linear_activation", "ffn"}

    assert all(c[2].get("backend") == "reference" for c in calls), "an op call did not get config.backend"
    attention = [c for c in calls if c[0] == "scaled_dot_product_attention"]
    for _, (q, k, _v), kwargs in attention:
        m = kwargs["attn_mask"]
        # The [B, 1, 1, Lk] padding mask, as is: never expanded over heads or queries.
        assert m.dtype == torch.bool and tuple(m.shape) == (q.shape[0], 1, 1, k.shape[2])
    causal = [c for c in attention if c[2]["is_causal"]]
    cross = [c for c in attention if c[1][0].shape[2] != c[1][1].shape[2]]
    assert causal and all(c[1][0].shape[2] == tgt.shape[1] for c in causal)
    assert cross and all(c[1][1].shape[2] == src.shape[1] for c in cross)


def test_fused_and_plain_state_dicts_identical():
    for cls in (BertModel, BertForMaskedLM, BertForSequenceClassification):
        torch.manual_seed(5)
        plain = cls(_bert_config())
        torch.manual_seed(5)
        fused = cls(_bert_config(fused=True, backend="triton"))
        sd_plain, sd_fused = plain.state_dict(), fused.state_dict()
        assert list(sd_plain) == list(sd_fused)
        assert all(torch.equal(sd_plain[k], sd_fused[k]) for k in sd_plain)
        fused.load_state_dict(plain.state_dict(), strict=True)
        plain.load_state_dict(fused.state_dict(), strict=True)
    torch.manual_seed(6)
    plain = Transformer(_transformer_config())
    fused = _fused_copy(plain, "triton")
    fresh = Transformer(_transformer_config(fused=True))
    fresh.load_state_dict(plain.state_dict(), strict=True)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in fused.state_dict().items())


def test_bert_presets():
    tiny = BertConfig.bert_tiny()
    assert (tiny.num_hidden_layers, tiny.hidden_size, tiny.num_attention_heads, tiny.intermediate_size) == (2, 128, 2, 512)
    base, large = BertConfig.bert_base(), BertConfig.bert_large()
    assert (base.num_hidden_layers, base.hidden_size, base.num_attention_heads, base.intermediate_size) == (12, 768, 12, 3072)
    assert (large.num_hidden_layers, large.hidden_size, large.num_attention_heads, large.intermediate_size) == (24, 1024, 16, 4096)
    assert BertConfig.bert_tiny(fused=True, backend="cpu").fused
    assert BertConfig(hidden_act="relu").hidden_act == "relu"
    with pytest.raises(ValueError, match="unsupported activation 'silu'; expected one of"):
        BertConfig(hidden_act="silu")
    with pytest.raises(ValueError, match="multiple"):
        BertConfig(hidden_size=100, num_attention_heads=3)


def test_legacy_position_ids_key_loads():
    model = BertModel(_bert_config())
    sd = model.state_dict()
    sd["embeddings.position_ids"] = torch.arange(32)[None]
    model.load_state_dict(sd, strict=True)



@pytest.mark.parametrize("build", ["bert", "transformer"])
def test_built_on_the_meta_device_then_loaded_gives_the_same_outputs(build):
    """PyTorch's way to build a large model without allocating it twice: on the meta device, then
    to_empty() + load_state_dict(). Nothing the forward reads may be left out of the state_dict
    (a non-persistent buffer would come back uninitialised): the loaded model matches the one the
    weights came from, plain and optimize()d."""
    torch.manual_seed(0)
    if build == "bert":
        config = _bert_config()
        source = BertForMaskedLM(config).eval()
        with torch.device("meta"):
            built = BertForMaskedLM(config)
        ids, attention_mask, token_type_ids = _bert_batch(config)
        run = lambda m: m(ids, attention_mask, token_type_ids).logits  # noqa: E731
    else:
        config = _transformer_config(positional="sinusoidal")
        source = Transformer(config).eval()
        with torch.device("meta"):
            built = Transformer(config)
        src, tgt, src_pad, tgt_pad, _ = _transformer_batch(config)
        run = lambda m: m(src, tgt, src_pad, tgt_pad).logits  # noqa: E731
    built.to_empty(device="cpu")
    with torch.no_grad():  # what to_empty() may leave, made certain: a buffer load_state_dict skips
        for buffer in built.buffers():
            buffer.fill_(7)
    built.load_state_dict(source.state_dict(), strict=True)
    built.eval()
    expected = run(source)
    torch.testing.assert_close(run(built), expected, rtol=0, atol=0)
    fused_attn.optimize(built)
    torch.testing.assert_close(run(built), run(fused_attn.optimize(source).model))

# ---------------------------------------------------------------------------------------------
# Training: plain vs fused from the same init give the same loss curve


def test_masked_lm_training_loss_curve():
    backend = "auto"
    torch.manual_seed(7)
    config = _bert_config(num_hidden_layers=1)
    model = BertForMaskedLM(config)
    gen = torch.Generator().manual_seed(8)
    ids, mask, types = _bert_batch(config, length=10, lengths=(10, 6), seed=10)
    masked = (torch.rand(ids.shape, generator=gen) < 0.3) & (mask == 1)
    labels = torch.where(masked, ids, -100)
    # One synthetic batch seen five times: the loss must go down, identically in all three runs.
    batches = [(ids.masked_fill(masked, 3), mask, types, labels)] * 5

    def curve(m):
        m.train()
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.01)
        losses = []
        for ids, mask, types, labels in batches:
            opt.zero_grad(set_to_none=True)
            loss = m(ids, mask, types, labels=labels).loss
            loss.backward()
            opt.step()
            losses.append(loss.detach().double())
        return torch.stack(losses)

    truth = curve(copy.deepcopy(model).double())
    plain = curve(copy.deepcopy(model))
    fused = curve(_fused_copy(model, backend))
    _check_served(backend, BERT_OPS)
    assert truth[-1] < truth[0], "the synthetic task does not train"
    plain_err = (plain - truth).abs()
    fused_err = (fused - truth).abs()
    bound = 3.0 * plain_err.max() + FP32_EPS * max(1.0, float(truth.abs().max()))
    assert float(fused_err.max()) <= bound, f"loss curve: fused err {fused_err.tolist()}, plain err {plain_err.tolist()}"


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers interoperability


def _hf_tiny(transformers, **overrides):
    """A transformers BertConfig with bert_tiny's shape (google/bert_uncased_L-2_H-128_A-2)."""
    return transformers.BertConfig(
        **{**dict(vocab_size=30522, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=512, hidden_act="gelu", max_position_embeddings=512, type_vocab_size=2,
                  layer_norm_eps=1e-12, pad_token_id=0), **overrides}
    )


@pytest.mark.parametrize("head", ["BertModel", "BertForMaskedLM", "BertForSequenceClassification"])
def test_hf_bert_state_dict_round_trip(head):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(9)
    hf_config = _hf_tiny(transformers, num_labels=3)
    config = BertConfig.from_hf(hf_config)
    assert dataclasses.replace(config, num_labels=2) == BertConfig.bert_tiny()
    hf = getattr(transformers, head)(hf_config).eval()
    ours = {"BertModel": BertModel, "BertForMaskedLM": BertForMaskedLM,
            "BertForSequenceClassification": BertForSequenceClassification}[head](config).eval()
    hf_sd = hf.state_dict()
    assert list(ours.state_dict()) == list(hf_sd)
    ours.load_state_dict(hf_sd, strict=True)
    assert all(torch.equal(v, hf_sd[k]) for k, v in ours.state_dict().items())
    if head == "BertForMaskedLM":
        assert ours.cls.predictions.decoder.weight is ours.bert.embeddings.word_embeddings.weight
        assert ours.cls.predictions.decoder.bias is ours.cls.predictions.bias

    # Ours -> theirs (a fresh, differently initialised model): strict, and the same tensors.
    torch.manual_seed(10)
    hf2 = getattr(transformers, head)(hf_config).eval()
    hf2.load_state_dict(ours.state_dict(), strict=True)
    assert all(torch.equal(v, hf_sd[k]) for k, v in hf2.state_dict().items())


@pytest.mark.parametrize("head", ["BertModel", "BertForMaskedLM"])
def test_hf_bert_same_outputs(head):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(11)
    hf_config = _hf_tiny(transformers, hidden_act="gelu_new" if head == "BertModel" else "gelu")
    hf = getattr(transformers, head)(hf_config).eval()
    config = BertConfig.from_hf(hf_config)
    ours = (BertModel if head == "BertModel" else BertForMaskedLM)(config).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    fused = _fused_copy(ours, "triton")
    hf64 = copy.deepcopy(hf).double()
    ids, mask, types = _bert_batch(config, length=12, lengths=(12, 7), seed=12)

    positions = torch.arange(3, 3 + ids.shape[1]).expand_as(ids)  # explicit position ids, not 0..L-1

    def hf_out(m):
        out = m(input_ids=ids, attention_mask=mask, token_type_ids=types, position_ids=positions)
        return (out.last_hidden_state, out.pooler_output) if head == "BertModel" else (out.logits,)

    def our_out(m):
        out = m(ids, attention_mask=mask, token_type_ids=types, position_ids=positions)
        return (out.last_hidden_state, out.pooler_output) if head == "BertModel" else (out.logits,)

    with torch.no_grad():
        truth, hf32, plain, fused_out = hf_out(hf64), hf_out(hf), our_out(ours), our_out(fused)
    _check_served("triton", BERT_OPS)
    for i, t in enumerate(truth):
        floor = FP32_EPS * max(1.0, float(t.abs().max()))
        hf_err = _max_err(hf32[i], t)
        for name, value in (("plain", plain[i]), ("fused", fused_out[i])):
            err = _max_err(value, t)
            assert err <= 3.0 * hf_err + floor, f"{head} output {i}: {name} err {err:.3g}, HF fp32 err {hf_err:.3g}"


@pytest.mark.parametrize("problem_type, num_labels, label_kind", [
    (None, 1, "float"), (None, 3, "int"), (None, 3, "float"),
    ("regression", 3, "float"), ("single_label_classification", 3, "int"), ("multi_label_classification", 3, "float"),
])
def test_sequence_classification_loss_as_hf(problem_type, num_labels, label_kind):
    """The loss Hugging Face's BertForSequenceClassification takes, by config.problem_type or, when
    it is None, by num_labels and the labels' dtype."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(13)
    hf_config = _hf_tiny(transformers, num_labels=num_labels, problem_type=problem_type, num_hidden_layers=1)
    hf = transformers.BertForSequenceClassification(hf_config).eval()
    config = BertConfig.from_hf(hf_config)
    assert config.problem_type == problem_type
    ours = BertForSequenceClassification(config).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    ids, mask, _ = _bert_batch(config, batch=3, lengths=(12, 5, 9), length=12, seed=13)
    gen = torch.Generator().manual_seed(14)
    if label_kind == "int":
        labels = torch.randint(0, num_labels, (3,), generator=gen)
    else:
        labels = torch.rand(3, num_labels, generator=gen).round() if problem_type != "regression" and num_labels > 1 \
            else torch.randn(3, num_labels, generator=gen)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss = ours(ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(loss, expected)


def test_problem_type_is_checked():
    with pytest.raises(ValueError, match="problem_type must be one of"):
        BertConfig.bert_tiny(problem_type="ranking")


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_bert_dropout_follows_modules_as_hf(fused):
    """As in transformers' BERT: the hidden dropout is its nn.Dropout's to switch (frozen in a
    training model, on in an eval one), the attention probabilities' dropout the attention
    module's; with every module's mode set alike, training mode drops and eval mode does not."""
    torch.manual_seed(3)
    config = dataclasses.replace(BertConfig.bert_tiny(), hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
    model = BertModel(config)
    model = _fused_copy(model, "cpu" if "cpu" in backends.available_backends("cpu") else "reference") if fused else model
    ids, mask, types = _bert_batch(config)
    run = lambda: model(ids, attention_mask=mask, token_type_ids=types).last_hidden_state  # noqa: E731
    model.eval()
    expected = run()
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout) or type(m).__name__ == "BertSelfAttention":
            m.eval()
    torch.testing.assert_close(run(), expected)
    model.eval()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout) and m is not model.embeddings.dropout:
            m.train()
    assert not torch.equal(run(), expected)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-LN", "pre-LN"])
def test_hooks_on_linear_layers_the_fused_path_reads_are_kept(norm_first, recwarn):
    """The fused path of the reference models reads the weights of linear layers the plain path
    calls (BERT's dense layers, the Transformer's out_proj and FFN): once optimized, a model whose
    such layers carry hooks (a forward hook for features, torch.nn.utils.prune's weight pre-hook)
    runs them unfused, with a FallbackWarning, so the hooks fire as in the plain model, and a
    pruned model trains as the plain one (the fused path read the weight pruning computed once,
    and its second backward raised)."""
    from torch.nn.utils import prune

    def bert(fused):
        torch.manual_seed(0)
        model = BertForMaskedLM(_bert_config(num_hidden_layers=1))
        prune.l1_unstructured(model.bert.encoder.layer[0].intermediate.dense, "weight", 0.5)
        if fused:
            fused_attn.optimize(model, backend="cpu" if "cpu" in backends.available_backends("cpu") else "reference")
        return model

    def transformer(fused):
        torch.manual_seed(0)
        model = Transformer(_transformer_config(norm_first=norm_first))
        prune.l1_unstructured(model.encoder.layers[0].linear2, "weight", 0.5)
        if fused:
            fused_attn.optimize(model, backend="cpu" if "cpu" in backends.available_backends("cpu") else "reference")
        return model

    ids, mask, types = _bert_batch(_bert_config())
    src, tgt, src_pad, tgt_pad, labels = _transformer_batch(_transformer_config())
    steps = {
        bert: lambda model: model(ids, attention_mask=mask, token_type_ids=types, labels=ids).loss,
        transformer: lambda model: model(src, tgt, src_pad, tgt_pad, labels=labels).loss,
    }
    for build, loss_of in steps.items():
        losses, fired = [], []
        for fused in (False, True):
            model = build(fused)
            hooked = {name: m for name, m in model.named_modules()
                      if name.endswith(("output.dense", "out_proj", "linear1", "linear2"))}
            for name, m in hooked.items():
                m.register_forward_hook(lambda module, args, out, name=name: fired.append((fused, name)))
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            for _ in range(2):
                optimizer.zero_grad()
                loss = loss_of(model)
                loss.backward()
                optimizer.step()
                losses.append((fused, loss.item()))
        assert sorted(name for fused, name in fired if fused) == sorted(name for fused, name in fired if not fused)
        assert {name for _, name in fired} == set(hooked)
        plain, fused_losses = ([loss for f, loss in losses if f == which] for which in (False, True))
        torch.testing.assert_close(fused_losses, plain, rtol=1e-5, atol=1e-6)
    assert any("hooks on a linear layer" in m for m in fused_attn.backends._warned)


@pytest.mark.parametrize("order", ["quantize-then-optimize", "optimize-then-quantize"])
def test_dynamically_quantized_linears_run_unfused(order, monkeypatch):
    """torch.ao.quantization.quantize_dynamic swaps the linear layers for int8 ones, whose weight is
    a method: the fused path of the reference models, which reads the dense layers' weights, calls
    them instead (a FallbackWarning names the class), and the quantized model, optimized before
    or after, gives the plain quantized model's outputs (it raised a TypeError before)."""
    monkeypatch.setattr(backends, "_warned", set())
    ids, mask, types = _bert_batch(_bert_config())
    src, tgt, src_pad, tgt_pad, _ = _transformer_batch(_transformer_config())
    cases = [
        (lambda: BertModel(_bert_config()), lambda m: m(ids, attention_mask=mask, token_type_ids=types).last_hidden_state),
        (lambda: Transformer(_transformer_config(norm_first=True)), lambda m: m(src, tgt, src_pad, tgt_pad).logits),
    ]

    def quantize(model):
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)

    for build, run in cases:
        torch.manual_seed(0)
        plain = build().eval()
        model = copy.deepcopy(plain)
        if order == "quantize-then-optimize":
            model = quantize(model)
            fused_attn.optimize(model)
        else:
            fused_attn.optimize(model)
            model = quantize(model)
        assert model.config.fused
        with torch.no_grad():
            torch.testing.assert_close(run(model), run(quantize(plain)))
    assert any("a linear layer is torch.ao.nn.quantized.dynamic" in m for m in backends._warned), backends._warned


def test_bert_longer_than_its_position_table_says_so():
    model = BertModel(BertConfig.bert_tiny(max_position_embeddings=16))
    with pytest.raises(ValueError, match="input_ids length 20 exceeds max_position_embeddings 16"):
        model(torch.ones(1, 20, dtype=torch.long))
