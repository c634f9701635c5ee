"""``optimize()``d torch.nn attention and Transformer layers, and Hugging Face BERT, against the
models they came from, on seeded random configurations: crossings of constructor options (dims,
heads, kdim/vdim, bias, batch_first, norm_first, activation) and call options (batched or not,
self or cross attention, boolean or float masks of each shape torch takes, causal hints,
need_weights and per-head weights) that the grids of tests/test_nn.py and tests/test_optimize.py
do not cross. Output and every parameter gradient against the original in float64
(tests/conftest.py's assert_model_parity, over the case and two perturbed copies of it); each
failure names its seed and configuration. Every
row keeps at least one key (its first), where torch's modules give NaN and the fused ones 0."""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_attn
from fused_attn import backends

from .conftest import assert_model_parity

CASES = 32
# Widths (model, feed-forward) of at least this many features. A parameter gradient is judged by its
# largest error against 3x the plain module's largest: over a handful of entries, each a sum of many
# rounded terms, the plain error can be far below one rounding of the result by the luck of
# cancellation (a one-entry bias gradient 0.03 ulp off), which no other honest order of the sum meets.
MIN_WIDTH = 16
# Problems judged together per case (assert_model_parity's draws): the case's own and two with every
# parameter perturbed by about 1e-6, so that a gradient's plain error is not one lucky draw.
DRAWS = 3
# The Triton backend (under the interpreter here) meets the first of the cases.
TRITON_CASES = 6


def _cases(count: int) -> list:
    """(backend, case) parameters: every case on the auto backend, the first TRITON_CASES also on Triton."""
    params = [pytest.param("auto", case, id=f"auto-{case}") for case in range(count)]
    reasons = backends.backend_unavailable_reasons("triton", torch.device("cpu"))
    marks = [pytest.mark.skip(reason="; ".join(reasons))] if reasons else []
    params += [pytest.param("triton", case, id=f"triton-{case}", marks=marks) for case in range(TRITON_CASES)]
    return params


def _cast(value, dtype: torch.dtype):
    """A floating tensor in the model's dtype; bool masks and None as they are."""
    return value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def _padding(rng: random.Random, batch: int | None, length: int, kind: str) -> torch.Tensor | None:
    """A key padding mask (True or -inf = padded) keeping a prefix of at least one key per sequence,
    [batch, length] or, unbatched, [length]."""
    if kind == "none":
        return None
    keep = [rng.randint(1, length) for _ in range(batch or 1)]
    padded = torch.tensor([[j >= k for j in range(length)] for k in keep])
    padded = padded if batch else padded[0]
    return padded if kind == "bool" else torch.zeros(padded.shape).masked_fill(padded, float("-inf"))


def _attn_mask(gen: torch.Generator, shape: tuple[int, ...], kind: str, mask_kind: str) -> torch.Tensor | None:
    """An attention mask of ``shape``, bool (True = not attended) or float (added) as ``mask_kind``
    says; ``kind`` "causal": the square subsequent mask, "random": some keys masked (bool) or a
    random bias (float), the first key always attended."""
    if kind == "none":
        return None
    if kind == "causal":
        return torch.ones(shape[-2:], dtype=torch.bool).triu(1) if mask_kind == "bool" else \
            nn.Transformer.generate_square_subsequent_mask(shape[-1])
    if mask_kind == "bool":
        masked = torch.rand(shape, generator=gen) > 0.6
        masked[..., 0] = False
        return masked
    return torch.randn(shape, generator=gen)


def _check(context: str, backend: str, plain: nn.Module, swapped_in: str, run) -> None:
    """optimize() on a copy of ``plain``, which must report ``swapped_in`` among what it put in, then
    parity, the fused ops run on ``backend``."""
    fused = copy.deepcopy(plain)
    report = fused_attn.optimize(fused)
    assert swapped_in in {new for _, _, new in report.replaced}, f"{context}: {report}"
    try:
        with fused_attn.use_backend(backend):
            assert_model_parity(plain, fused, run, draws=DRAWS)
    except AssertionError as exc:
        raise AssertionError(f"{context}: {exc}") from None


@pytest.mark.parametrize("backend, case", _cases(CASES))
def test_multihead_attention_random_configs(backend, case):
    seed = 5000 + case
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    heads = rng.randint(1, 4)
    head_dim = rng.choice((16,) if heads == 1 else (8, 12, 16))
    embed = heads * head_dim
    cross = rng.random() < 0.5
    kdim, vdim = (rng.randint(3, 20), rng.randint(3, 20)) if cross and rng.random() < 0.5 else (None, None)
    bias, batch_first = rng.random() < 0.8, rng.random() < 0.5
    batch = rng.randint(1, 3) if rng.random() < 0.8 else None  # None: unbatched inputs
    q_len = rng.randint(1, 12)
    k_len = rng.randint(1, 12) if cross else q_len
    mask_kind = rng.choice(("bool", "float"))
    padding = _padding(rng, batch, k_len, rng.choice(("none", mask_kind)))
    attn_kind = rng.choice(("none", "2d", "3d") + (("causal",) if not cross else ()))
    attn_shape = (q_len, k_len) if attn_kind != "3d" else ((batch or 1) * heads, q_len, k_len)
    attn_mask = _attn_mask(gen, attn_shape, "none" if attn_kind == "none" else "causal" if attn_kind == "causal"
                           else "random", mask_kind)
    is_causal = attn_kind == "causal" and rng.random() < 0.5
    need_weights, average = rng.random() < 0.5, rng.random() < 0.5
    context = (f"seed {seed}: embed {embed}, heads {heads}, kdim/vdim {kdim}/{vdim}, bias {bias}, batch_first "
               f"{batch_first}, batch {batch}, lengths {q_len}/{k_len}, padding {None if padding is None else padding.dtype}, "
               f"attn_mask {attn_kind} {None if attn_mask is None else attn_mask.dtype}, is_causal {is_causal}, "
               f"need_weights {need_weights}, average {average}")

    plain = nn.MultiheadAttention(embed, heads, bias=bias, kdim=kdim, vdim=vdim, batch_first=batch_first)

    def tokens(length: int, width: int) -> torch.Tensor:
        shape = (length, width) if batch is None else (batch, length, width) if batch_first else (length, batch, width)
        return torch.randn(shape, generator=gen, dtype=torch.float64)

    query = tokens(q_len, embed)
    key = tokens(k_len, kdim or embed) if cross else query
    value = tokens(k_len, vdim or embed) if cross else query

    def run(model):
        dtype = next(model.parameters()).dtype
        q = query.to(dtype)
        k, v = (key.to(dtype), value.to(dtype)) if cross else (q, q)  # self-attention: one tensor
        out, weights = model(q, k, v, key_padding_mask=_cast(padding, dtype), need_weights=need_weights,
                             attn_mask=_cast(attn_mask, dtype), average_attn_weights=average, is_causal=is_causal)
        return torch.cat([out.flatten(), weights.flatten()]) if need_weights else out

    _check(context, backend, plain, "FusedMultiheadAttention", run)


@pytest.mark.parametrize("backend, case", _cases(CASES))
@pytest.mark.parametrize("layer", ["encoder", "decoder"])
def test_transformer_layer_random_configs(layer, backend, case):
    seed = (6000 if layer == "encoder" else 7000) + case
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    heads = rng.randint(1, 4)
    d_model = heads * rng.choice((16,) if heads == 1 else (8, 16))
    activation = rng.choice(("relu", "gelu", F.relu, F.gelu))
    options = {
        "dim_feedforward": rng.randint(MIN_WIDTH, 80), "dropout": 0.0, "activation": activation,
        "layer_norm_eps": rng.choice((1e-5, 1e-6, 1e-12)), "batch_first": rng.random() < 0.5,
        "norm_first": rng.random() < 0.5, "bias": rng.random() < 0.8,
    }
    batch, length = rng.randint(1, 3), rng.randint(1, 12)
    mask_kind = rng.choice(("bool", "float"))
    self_kind = rng.choice(("none", "causal", "random"))
    self_mask = _attn_mask(gen, (length, length), self_kind, mask_kind)
    self_causal = self_kind == "causal" and rng.random() < 0.5
    self_padding = _padding(rng, batch, length, rng.choice(("none", mask_kind)))
    context = f"seed {seed}: {layer}, d_model {d_model}, heads {heads}, {options}, batch {batch}, length {length}, " \
              f"mask {self_kind} ({mask_kind}), causal hint {self_causal}, padding {self_padding is not None}"

    def tokens(n: int) -> torch.Tensor:
        shape = (batch, n, d_model) if options["batch_first"] else (n, batch, d_model)
        return torch.randn(shape, generator=gen, dtype=torch.float64)

    src = tokens(length)
    if layer == "encoder":
        plain = nn.TransformerEncoderLayer(d_model, heads, **options)

        def run(model):
            dtype = next(model.parameters()).dtype
            return model(src.to(dtype), src_mask=_cast(self_mask, dtype),
                         src_key_padding_mask=_cast(self_padding, dtype), is_causal=self_causal)
    else:
        memory_length = rng.randint(1, 12)
        memory = tokens(memory_length)
        memory_mask = _attn_mask(gen, (length, memory_length), rng.choice(("none", "random")), mask_kind)
        memory_padding = _padding(rng, batch, memory_length, rng.choice(("none", mask_kind)))
        context += f", memory {memory_length}, memory mask {memory_mask is not None}, " \
                   f"memory padding {memory_padding is not None}"
        plain = nn.TransformerDecoderLayer(d_model, heads, **options)

        def run(model):
            dtype = next(model.parameters()).dtype
            return model(src.to(dtype), memory.to(dtype), tgt_mask=_cast(self_mask, dtype),
                         memory_mask=_cast(memory_mask, dtype), tgt_key_padding_mask=_cast(self_padding, dtype),
                         memory_key_padding_mask=_cast(memory_padding, dtype), tgt_is_causal=self_causal)

    swapped_in = "FusedTransformerEncoderLayer" if layer == "encoder" else "FusedTransformerDecoderLayer"
    _check(context, backend, plain, swapped_in, run)


@pytest.mark.parametrize("backend, case", _cases(CASES // 2))
def test_hf_bert_random_configs(backend, case):
    """Hugging Face BERT built from a random config, optimize()d: the encoder's output and every
    parameter gradient, with random padding and token types."""
    transformers = pytest.importorskip("transformers")
    seed = 8000 + case
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    heads = rng.randint(1, 4)
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=heads * rng.choice((16,) if heads == 1 else (8, 16)), num_attention_heads=heads,
        num_hidden_layers=rng.randint(1, 2), intermediate_size=rng.randint(MIN_WIDTH, 80),
        hidden_act=rng.choice(("gelu", "gelu_new", "gelu_pytorch_tanh", "relu")),
        layer_norm_eps=rng.choice((1e-12, 1e-5)), max_position_embeddings=32,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    batch, length = rng.randint(1, 3), rng.randint(1, 16)
    ids = torch.randint(0, 50, (batch, length), generator=gen)
    kept = [rng.randint(1, length) for _ in range(batch)]
    keep = torch.tensor([[int(j < n) for j in range(length)] for n in kept])
    types = torch.randint(0, 2, (batch, length), generator=gen)
    context = f"seed {seed}: {config.to_diff_dict()}, batch {batch}, kept lengths {kept}"
    plain = transformers.BertModel(config)

    def run(model):
        return model(input_ids=ids, attention_mask=keep, token_type_ids=types).last_hidden_state

    _check(context, backend, plain, "attention fused_attn", run)


@pytest.mark.parametrize("backend, case", _cases(CASES // 2))
@pytest.mark.parametrize("model", ["bert", "transformer"])
def test_reference_model_random_configs(model, backend, case):
    """The package's reference BERT and encoder-decoder Transformer from random configs,
    optimize()d: outputs and every parameter gradient, with random padding."""
    from fused_attn.models import BertConfig, BertModel, Transformer, TransformerConfig

    seed = (9000 if model == "bert" else 9500) + case
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    heads = rng.randint(1, 4)
    width = heads * rng.choice((16,) if heads == 1 else (8, 16))
    batch = rng.randint(1, 3)

    def tokens(length: int) -> torch.Tensor:
        return torch.randint(1, 40, (batch, length), generator=gen)

    def padded(length: int) -> torch.Tensor:  # True = padding, a prefix of at least one token kept
        kept = [rng.randint(1, length) for _ in range(batch)]
        return torch.tensor([[j >= n for j in range(length)] for n in kept])

    if model == "bert":
        config = BertConfig(
            vocab_size=40, hidden_size=width, num_attention_heads=heads, num_hidden_layers=rng.randint(1, 2),
            intermediate_size=rng.randint(MIN_WIDTH, 80), hidden_act=rng.choice(("gelu", "gelu_new")),
            layer_norm_eps=rng.choice((1e-12, 1e-5)), max_position_embeddings=32,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )
        ids = tokens(rng.randint(1, 16))
        pad = padded(ids.shape[1])
        plain, swapped_in = BertModel(config), "BertModel(fused=True)"

        def run(m):
            return m(ids, attention_mask=(~pad).long()).last_hidden_state
    else:
        config = TransformerConfig(
            src_vocab_size=40, d_model=width, nhead=heads, num_encoder_layers=rng.randint(1, 2),
            num_decoder_layers=rng.randint(1, 2), dim_feedforward=rng.randint(MIN_WIDTH, 80), dropout=0.0,
            activation=rng.choice(("gelu", "gelu_tanh")), norm_first=rng.random() < 0.5,
            positional=rng.choice(("sinusoidal", "learned")), max_position_embeddings=32,
        )
        src, tgt = tokens(rng.randint(1, 12)), tokens(rng.randint(1, 12))
        src_pad, tgt_pad = padded(src.shape[1]), padded(tgt.shape[1])
        plain, swapped_in = Transformer(config), "Transformer(fused=True)"

        def run(m):
            return m(src, tgt, src_key_padding_mask=src_pad, tgt_key_padding_mask=tgt_pad).logits

    _check(f"seed {seed}: {config}", backend, plain, swapped_in, run)


def test_parity_over_draws_still_fails_a_less_accurate_model():
    """assert_model_parity with draws: a model that computes what the plain one does passes; one
    whose output carries an error about 100x the plain rounding (1e-5 relative) fails on every
    draw's largest error; a truth of one's own is refused (each draw needs its own)."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    x = torch.randn(8, 16)

    def run(model):
        return model(x.to(next(model.parameters()).dtype))

    assert_model_parity(plain, copy.deepcopy(plain), run, draws=3)
    worse = copy.deepcopy(plain)
    worse[2].register_forward_hook(lambda module, args, out: out * (1 + 1e-5 * torch.randn(out.shape)).to(out.dtype))
    with pytest.raises(AssertionError, match="output: fused err"):
        assert_model_parity(plain, worse, run, draws=3)
    with pytest.raises(ValueError, match="truth must be None"):
        assert_model_parity(plain, copy.deepcopy(plain), run, draws=2, truth=copy.deepcopy(plain).double())
