"""Drop-in modules against their torch.nn counterparts: same state_dict, same outputs and gradients."""

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import fused_attn
from fused_attn.nn import (
    FusedFFN,
    FusedLayerNorm,
    FusedMultiheadAttention,
    FusedTransformerDecoderLayer,
    FusedTransformerEncoderLayer,
)

from .conftest import assert_model_parity, assert_parity


def _as(module: nn.Module, cls: type) -> nn.Module:
    fused = copy.deepcopy(module)
    fused.__class__ = cls
    return fused


def _cast(dtype: torch.dtype, value):
    """A floating tensor (an input, a float mask) in ``dtype``, the model's: float64 for the truth
    of assert_model_parity; anything else (bool masks, None) as it is; dicts and tuples entrywise,
    a tensor given twice cast once (self-attention's query, key and value stay one tensor)."""
    if isinstance(value, dict):
        return {k: _cast(dtype, v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        cast = {}
        return type(value)(cast.setdefault(id(v), _cast(dtype, v)) for v in value)
    return value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def _dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _module_parity(plain: nn.Module, fused: nn.Module, inputs: dict, grad_inputs=()):
    """Fused module vs the torch module (truth: the torch module in float64), outputs and the
    gradients of inputs and of every parameter."""
    names = [n for n, _ in plain.named_parameters()]

    def run(module):
        def call(**kw):
            params = {n: kw.pop(f"p_{i}") for i, n in enumerate(names)}
            out = torch.func.functional_call(module, params, (), kw)
            return out[0] if isinstance(out, tuple) else out

        return call

    args = dict(inputs)
    args.update({f"p_{i}": p.detach() for i, (_, p) in enumerate(plain.named_parameters())})
    plain64 = copy.deepcopy(plain).double()

    def plain_call(**kw):
        module = plain64 if next(v for v in kw.values() if isinstance(v, torch.Tensor) and v.is_floating_point()).dtype == torch.float64 else plain
        return run(module)(**kw)

    assert_parity(run(fused), plain_call, args, grad_args=tuple(grad_inputs) + tuple(f"p_{i}" for i in range(len(names))))


def test_layer_norm_matches_torch_signature_state_and_repr():
    for kwargs in ({}, {"bias": False}, {"elementwise_affine": False}, {"eps": 1e-12}):
        plain, fused = nn.LayerNorm((4, 8), **kwargs), FusedLayerNorm((4, 8), **kwargs)
        assert list(plain.state_dict()) == list(fused.state_dict())
        assert plain.extra_repr() == fused.extra_repr()
        fused.load_state_dict(plain.state_dict())
        x = torch.randn(3, 4, 8)
        torch.testing.assert_close(fused(x), plain(x))
    assert FusedLayerNorm(8, dtype=torch.float16).weight.dtype == torch.float16


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("masks", ["none", "padding", "causal+padding", "float"])
def test_multihead_attention_matches_torch(batch_first, need_weights, masks):
    torch.manual_seed(0)
    plain = nn.MultiheadAttention(32, 4, batch_first=batch_first).eval()
    fused = _as(plain, FusedMultiheadAttention)
    shape = (2, 10, 32) if batch_first else (10, 2, 32)
    x = torch.randn(*shape)
    kwargs = {"need_weights": need_weights}
    if masks in ("padding", "causal+padding"):
        pad = torch.zeros(2, 10, dtype=torch.bool)
        pad[1, 7:] = True
        kwargs["key_padding_mask"] = pad
    if masks == "causal+padding":
        kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(10)
        kwargs["is_causal"] = True
    if masks == "float":
        kwargs["attn_mask"] = torch.randn(10, 10)

    def run(model):
        x_, kw = _cast(_dtype(model), (x, kwargs))
        out, weights = model(x_, x_, x_, **kw)
        assert (weights is not None) == need_weights
        return torch.cat([out.flatten(), weights.flatten()]) if need_weights else out

    assert_model_parity(plain, fused, run)  # output (and weights) and every parameter gradient


def test_multihead_attention_cross_kdim_vdim_and_unbatched():
    torch.manual_seed(1)
    plain = nn.MultiheadAttention(32, 4, kdim=24, vdim=16, batch_first=True).eval()
    fused = _as(plain, FusedMultiheadAttention)
    q, k, v = torch.randn(2, 5, 32), torch.randn(2, 9, 24), torch.randn(2, 9, 16)
    assert_model_parity(plain, fused, lambda m: m(*_cast(_dtype(m), (q, k, v)))[0])
    pad = torch.zeros(9, dtype=torch.bool)
    pad[6:] = True
    for kwargs in ({}, {"key_padding_mask": pad}, {"average_attn_weights": False}):  # unbatched: weights squeezed
        shapes = []

        def run(model):
            out, weights = model(*_cast(_dtype(model), (q[0], k[0], v[0])), **kwargs)
            shapes.append(weights.shape)
            return torch.cat([out.flatten(), weights.flatten()])

        assert_model_parity(plain, fused, run)
        assert len(set(shapes)) == 1, shapes  # the truth's, torch's, the fused module's
    assert list(fused.state_dict()) == list(plain.state_dict())


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32], ids=["bool", "float"])
@pytest.mark.parametrize("padding", [False, True], ids=["", "padding"])
def test_multihead_attention_three_dimensional_mask_and_per_head_weights(batch_first, mask_dtype, padding):
    """A [batch * heads, L, S] attn_mask (batch-major, as torch lays it out), alone or with a
    key_padding_mask; average_attn_weights=False returns the per-head weights [B, H, L, S]."""
    torch.manual_seed(2)
    batch, heads, length = 2, 4, 7
    plain = nn.MultiheadAttention(32, heads, batch_first=batch_first).eval()
    fused = _as(plain, FusedMultiheadAttention)
    x = torch.randn(batch, length, 32) if batch_first else torch.randn(length, batch, 32)
    if mask_dtype == torch.bool:
        mask = torch.rand(batch * heads, length, length) > 0.5
        mask |= torch.eye(length, dtype=torch.bool)  # True = masked out: keep the diagonal
        mask &= ~torch.eye(length, dtype=torch.bool)
    else:
        mask = torch.randn(batch * heads, length, length)
    kwargs = {"attn_mask": mask}
    if padding:
        pad = torch.zeros(batch, length, dtype=torch.bool)
        pad[1, 5:] = True
        kwargs["key_padding_mask"] = pad
    for average in (True, False):
        shapes = []

        def run(model):
            """The output with the weights, the weights, and the output without them (another kernel)."""
            x_, kw = _cast(_dtype(model), (x, kwargs))
            out, weights = model(x_, x_, x_, average_attn_weights=average, **kw)
            shapes.append(weights.shape)
            out_alone, _ = model(x_, x_, x_, need_weights=False, **kw)
            return torch.cat([out.flatten(), weights.flatten(), out_alone.flatten()])

        assert_model_parity(plain, fused, run)
        assert set(shapes) == {(batch, length, length) if average else (batch, heads, length, length)}


def test_multihead_attention_weights_carry_the_attention_dropout():
    """need_weights=True (nn.MultiheadAttention's default) in training: the returned weights are
    the dropped-out probabilities, as torch's (about p of them zero)."""
    torch.manual_seed(3)
    fused = FusedMultiheadAttention(16, 4, dropout=0.5, batch_first=True).train()
    x = torch.randn(4, 32, 16)
    _, weights = fused(x, x, x, average_attn_weights=False)
    zeros = float((weights == 0).double().mean())
    assert abs(zeros - 0.5) < 0.05, zeros
    kept = weights[weights != 0]
    assert float(kept.min()) > 0


class _CountLinear(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += func is torch.nn.functional.linear
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batched", [True, False])
def test_multihead_attention_projects_shared_inputs_in_one_gemm(batch_first, bias, batched):
    """Self-attention: one GEMM for Q, K and V (also after the batch_first and unbatched layout
    changes); memory as key and value: one for K and V. Then the output projection."""
    torch.manual_seed(3)
    plain = nn.MultiheadAttention(32, 4, bias=bias, batch_first=batch_first).eval()
    fused = _as(plain, FusedMultiheadAttention)
    x, memory = torch.randn(2, 6, 32), torch.randn(2, 9, 32)
    if not batched:
        x, memory = x[0], memory[0]
    elif not batch_first:
        x, memory = x.transpose(0, 1), memory.transpose(0, 1)
    for (q, k, v), gemms in (((x, x, x), 2), ((x, memory, memory), 3), ((x, memory, memory.clone()), 4)):
        with _CountLinear() as counter:
            fused(q, k, v, need_weights=False)
        assert counter.calls == gemms
        assert_model_parity(plain, fused, lambda m: m(*_cast(_dtype(m), (q, k, v)), need_weights=False)[0])



class _RecordOps(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("memory", [False, True], ids=["self", "cross"])
def test_multihead_attention_moves_no_activation(batch_first, memory):
    """Inputs stay in the caller's layout, the heads are views of the projections, the attention
    output comes back in the query's layout: nothing is copied or transposed in memory, forward
    or backward (torch's own module copies the input of a batch_first call and the attention
    output)."""
    torch.manual_seed(3)
    fused = FusedMultiheadAttention(32, 4, batch_first=batch_first)
    x = torch.randn(2, 6, 32) if batch_first else torch.randn(6, 2, 32)
    kv = (torch.randn(2, 9, 32) if batch_first else torch.randn(9, 2, 32)) if memory else x
    x.requires_grad_()
    grad = torch.randn(x.shape)
    with _RecordOps() as recorder:
        out, _ = fused(x, kv, kv, need_weights=False)
        out.backward(grad)
    copies = [op for op in recorder.ops if op in ("clone", "copy_", "contiguous", "_to_copy")]
    assert "attention_fwd" in recorder.ops and not copies, recorder.ops

def test_multihead_attention_gradients():
    torch.manual_seed(2)
    plain = nn.MultiheadAttention(16, 2, batch_first=True).eval()
    fused = _as(plain, FusedMultiheadAttention)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[0, 5:] = True
    x = torch.randn(2, 7, 16)

    class Wrap(nn.Module):
        def __init__(self, mha):
            super().__init__()
            self.mha = mha

        def forward(self, x):
            return self.mha(x, x, x, key_padding_mask=pad, need_weights=False)[0]

    _module_parity(Wrap(plain), Wrap(fused), {"x": x}, grad_inputs=("x",))


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_encoder_layer_matches_torch(norm_first, activation, batch_first):
    torch.manual_seed(3)
    kwargs = dict(d_model=32, nhead=4, dim_feedforward=64, activation=activation, batch_first=batch_first,
                  norm_first=norm_first)
    plain = nn.TransformerEncoderLayer(**kwargs).eval()
    fused = FusedTransformerEncoderLayer(**kwargs).eval()
    assert list(fused.state_dict()) == list(plain.state_dict())
    fused.load_state_dict(plain.state_dict())
    pad = torch.zeros(2, 10, dtype=torch.bool)
    pad[0, 6:] = True

    class Wrap(nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def forward(self, src):
            return self.layer(src, src_key_padding_mask=pad)

    src = torch.randn(2, 10, 32) if batch_first else torch.randn(10, 2, 32)
    _module_parity(Wrap(plain), Wrap(fused), {"src": src}, grad_inputs=("src",))


@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_layer_matches_torch(norm_first):
    torch.manual_seed(4)
    kwargs = dict(d_model=32, nhead=4, dim_feedforward=64, activation="gelu", batch_first=True, norm_first=norm_first)
    plain = nn.TransformerDecoderLayer(**kwargs).eval()
    fused = FusedTransformerDecoderLayer(**kwargs).eval()
    fused.load_state_dict(plain.state_dict())
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    memory_pad = torch.zeros(2, 9, dtype=torch.bool)
    memory_pad[1, 4:] = True
    tgt_pad = torch.zeros(2, 6, dtype=torch.bool)
    tgt_pad[1, 3:] = True

    class Wrap(nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def forward(self, tgt, memory):
            return self.layer(tgt, memory, tgt_mask=causal, tgt_is_causal=True, tgt_key_padding_mask=tgt_pad,
                              memory_key_padding_mask=memory_pad)

    _module_parity(
        Wrap(plain), Wrap(fused), {"tgt": torch.randn(2, 6, 32), "memory": torch.randn(2, 9, 32)},
        grad_inputs=("tgt", "memory"),
    )


def test_fused_layers_train_with_dropout():
    """In training the fused layer drops: its output differs from eval mode's and from one call to the
    next, is reproduced under the same seed, and every parameter gets a finite gradient. (Where it
    drops is torch's: test_optimize's tests with dropout 1.)"""
    torch.manual_seed(5)
    layer = FusedTransformerEncoderLayer(32, 4, 64, dropout=0.2, activation="gelu", batch_first=True).train()
    x = torch.randn(2, 10, 32, requires_grad=True)
    with torch.no_grad():
        undropped = layer.eval()(x)
        layer.train()
        torch.manual_seed(6)
        first = layer(x)
        assert not torch.equal(first, layer(x))
        assert not torch.allclose(first, undropped)
    torch.manual_seed(6)
    out = layer(x)
    assert torch.equal(out, first)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in layer.parameters())


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu"])
def test_ffn_module(activation):
    torch.manual_seed(6)
    module = FusedFFN(16, 48, dropout=0.0, activation=activation).eval()
    x = torch.randn(3, 5, 16)
    act = {"gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"), "relu": nn.ReLU()}[activation]

    class PlainFFN(nn.Module):  # torch's modules, with the fused module's parameter names
        def __init__(self):
            super().__init__()
            self.linear1, self.linear2 = copy.deepcopy(module.linear1), copy.deepcopy(module.linear2)

        def forward(self, x):
            return self.linear2(act(self.linear1(x)))

    assert_model_parity(PlainFFN(), module, lambda m: m(x.to(_dtype(m))))
    with pytest.raises(ValueError, match="activation must be one of"):
        FusedFFN(16, 48, activation="swish")


def test_module_backend_attribute_is_used():
    ln = FusedLayerNorm(8)
    ln.backend = "reference"
    ln(torch.randn(2, 8))
    assert fused_attn.last_backend("layer_norm") == "reference"


@pytest.mark.parametrize("cls", [FusedTransformerEncoderLayer, FusedTransformerDecoderLayer])
def test_layer_backend_attribute_moves_its_attention_and_norms(cls):
    """``layer.backend`` reaches the fused submodules the layer calls (attention, norms), so one
    assignment moves every op the layer runs; a deliberately different child setting comes after."""
    layer = cls(16, 2, 32, dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
    children = [m for m in layer.modules() if isinstance(m, (FusedMultiheadAttention, FusedLayerNorm))]
    assert len(children) == (3 if cls is FusedTransformerEncoderLayer else 5)
    x = torch.randn(2, 5, 16)
    for backend in ("cpu", "reference"):
        if backend not in fused_attn.available_backends("cpu"):
            continue
        layer.backend = backend
        assert all(m.backend == backend for m in children)
        layer(x) if cls is FusedTransformerEncoderLayer else layer(x, x)
        for op in ("scaled_dot_product_attention", "layer_norm", "add_layer_norm", "ffn"):
            assert fused_attn.last_backend(op) == backend, op
    layer.norm1.backend = None
    assert layer.backend == "reference" and layer.norm1.backend is None


_JIT_DEPRECATED = (FutureWarning, DeprecationWarning)


def test_torchscript_is_refused_by_name():
    """torch.jit.script cannot compile the fused modules' Python dispatch: a TypeError naming the
    module and what to use instead, for a fused module and for an optimize()d model; restored,
    the model scripts. (torch deprecates torch.jit.script with a FutureWarning, before 2.12 a
    DeprecationWarning.)"""
    layer = FusedTransformerEncoderLayer(16, 2, 32, batch_first=True)
    with pytest.warns(_JIT_DEPRECATED), pytest.raises(TypeError, match="FusedTransformerEncoderLayer cannot be "
                                                                      "compiled by torch.jit.script; use torch.compile"):
        torch.jit.script(layer)
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    fused_attn.optimize(model)
    with pytest.warns(_JIT_DEPRECATED), pytest.raises(TypeError, match="FusedLayerNorm cannot be compiled"):
        torch.jit.script(model)
    fused_attn.restore(model)
    with pytest.warns(_JIT_DEPRECATED):
        torch.jit.script(model)


@pytest.mark.parametrize("module", ["layer_norm", "attention", "encoder", "ffn"])
def test_torch_jit_trace_is_refused_by_name(module):
    """torch.jit.trace hands the ops their sizes as tensors (which failed inside torch with an
    AssertionError, "Expected bool, got <class 'torch.Tensor'>") and would record one backend's
    op for the traced grad mode: every fused op refuses it with a TypeError saying what to use
    instead, whatever the backend; restored, an optimize()d model traces."""
    x = torch.randn(2, 5, 16)
    fused, args = {
        "layer_norm": (FusedLayerNorm(16), (x,)),
        "attention": (FusedMultiheadAttention(16, 2, batch_first=True), (x, x, x)),
        "encoder": (FusedTransformerEncoderLayer(16, 2, 32, dropout=0.0, activation="gelu", batch_first=True), (x,)),
        "ffn": (FusedFFN(16, 32, dropout=0.0), (x,)),
    }[module]
    for backend in (None, "reference"):
        fused.backend = backend
        with warnings.catch_warnings(), pytest.raises(TypeError, match="torch.jit.trace cannot record the fused_attn "
                                                                          "ops .* use torch.compile or torch.export"):
            warnings.simplefilter("ignore")
            torch.jit.trace(fused, args)
    # In training: torch's own layer traces alike with and without grad only off its inference fast path.
    model = nn.Sequential(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True))
    fused_attn.optimize(model)
    with warnings.catch_warnings(), pytest.raises(TypeError, match="torch.jit.trace cannot record"):
        warnings.simplefilter("ignore")
        torch.jit.trace(model, (x,))
    fused_attn.restore(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (x,))
    torch.testing.assert_close(traced(x), model(x))


def _encoder_pair(num_layers=2, **kwargs):
    torch.manual_seed(7)
    kwargs = {**dict(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True), **kwargs}
    plain = nn.TransformerEncoder(nn.TransformerEncoderLayer(**kwargs), num_layers).eval()
    fused = nn.TransformerEncoder(FusedTransformerEncoderLayer(**kwargs), num_layers).eval()
    fused.load_state_dict(plain.state_dict())
    return plain, fused


def _padded_batch():
    x = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(8))
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, 4:] = True
    pad[2, 2:] = True
    return x, pad


def _padded_inference_parity(plain, fused):
    """On the padded batch, in inference (no_grad): parity of the output with torch's (the truth:
    ``plain`` in float64), zeros at the padded positions in all three."""
    x, pad = _padded_batch()
    outs = []

    def run(model):
        outs.append(model(x.to(_dtype(model)), src_key_padding_mask=pad))
        return outs[-1]

    assert_model_parity(plain, fused, run, grads=False)
    assert all((out[pad] == 0).all() for out in outs)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_encoder_of_fused_layers_in_inference_takes_nested_tensors(activation):
    """torch.nn.TransformerEncoder hands its layers nested tensors in inference with a padding
    mask (enable_nested_tensor, the default): the fused layer takes them and the encoder gives
    torch's output, zeros at the padded positions included."""
    plain, fused = _encoder_pair(activation=activation)
    assert fused.use_nested_tensor
    _padded_inference_parity(plain, fused)


def test_optimized_encoder_keeps_torchs_inference_output():
    plain, _ = _encoder_pair()
    fused = copy.deepcopy(plain)
    fused_attn.optimize(fused)
    assert fused.use_nested_tensor == plain.use_nested_tensor
    _padded_inference_parity(plain, fused)


@pytest.mark.parametrize("hook", ["prune", "weight_norm", "forward_hook"])
@pytest.mark.parametrize("layer", ["encoder", "decoder", "ffn"])
def test_hooks_on_bypassed_submodules_run(hook, layer, recwarn):
    """Hooks on the linear/norm/dropout submodules that the fused path reads instead of calling
    (prune and the old weight_norm recompute the weight in one): the layer runs torch's forward,
    which calls them, says so once, and trains as torch's layer does."""
    torch.manual_seed(9)
    kwargs = dict(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0, activation="gelu", batch_first=True)
    if layer == "ffn":
        fused = FusedFFN(32, 64, dropout=0.0)
        plain = copy.deepcopy(fused)
        plain.__class__ = nn.Module
        plain.forward = lambda x: plain.linear2(plain.dropout(plain.activation(plain.linear1(x))))
    else:
        torch_cls, fused_cls = {"encoder": (nn.TransformerEncoderLayer, FusedTransformerEncoderLayer),
                                "decoder": (nn.TransformerDecoderLayer, FusedTransformerDecoderLayer)}[layer]
        plain = torch_cls(**kwargs)
        fused = fused_cls(**kwargs)
        fused.load_state_dict(plain.state_dict())
    calls = []
    for module in (plain, fused):
        if hook == "prune":
            prune.l1_unstructured(module.linear1, "weight", amount=0.3)
        elif hook == "weight_norm":
            with pytest.warns(FutureWarning):
                torch.nn.utils.weight_norm(module.linear1)
        else:
            module.linear2.register_forward_hook(lambda m, args, out: calls.append(out.shape))
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(10))
    memory = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(11))
    losses = []
    for module in (plain, fused):
        optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
        trace = []
        for _ in range(2):
            optimizer.zero_grad()
            out = module(x, memory) if layer == "decoder" else module(x)
            loss = out.square().sum()
            loss.backward()
            optimizer.step()
            trace.append(loss.item())
        losses.append(trace)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    if hook == "forward_hook":
        assert len(calls) == 4
    assert any(m.startswith(f"{type(fused).__name__}: hooks on its") for m in fused_attn.backends._warned)


def test_global_module_hooks_are_honoured(recwarn):
    """A hook registered for every module (nn.modules.module.register_module_forward_hook) that
    changes a Linear's output: the fused layer runs torch's forward, which calls its children, as
    torch's layer (in training, where torch's own fast path does not skip hooks)."""
    torch.manual_seed(13)
    kwargs = dict(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, activation="gelu", batch_first=True)
    plain = nn.TransformerEncoderLayer(**kwargs).train()
    fused = FusedTransformerEncoderLayer(**kwargs).train()
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(2, 5, 16)
    handle = nn.modules.module.register_module_forward_hook(lambda m, a, out: out * 2 if isinstance(m, nn.Linear) else None)
    try:
        assert_model_parity(plain, fused, lambda m: m(x.to(_dtype(m))))
    finally:
        handle.remove()


def test_multihead_attention_query_without_keys_gives_zero_with_a_float_mask():
    """A float attn_mask with a key_padding_mask that masks every key of a sequence: its
    attention is 0 (the package's rule for fully masked rows), weights and output alike."""
    torch.manual_seed(14)
    mha = FusedMultiheadAttention(16, 2, batch_first=True).eval()
    with torch.no_grad():
        mha.out_proj.bias.normal_()
    x = torch.randn(2, 5, 16)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1] = True
    for need_weights in (True, False):
        out, weights = mha(x, x, x, attn_mask=torch.randn(5, 5), key_padding_mask=pad, need_weights=need_weights)
        torch.testing.assert_close(out[1], mha.out_proj.bias.expand(5, 16), rtol=0, atol=0)
        if need_weights:
            assert (weights[1] == 0).all()


def test_hooks_on_a_called_child_under_a_second_name_keep_the_fused_path(recwarn):
    layer = FusedTransformerEncoderLayer(16, 4, 32, dropout=0.0).eval()
    layer.attn_alias = layer.self_attn  # the same module, registered twice
    calls = []
    layer.self_attn.register_forward_hook(lambda *args: calls.append(1))
    layer(torch.randn(3, 2, 16))
    assert calls == [1]
    assert not [w for w in recwarn if issubclass(w.category, fused_attn.FallbackWarning)]


def test_observer_hooks_keep_the_fused_path():
    layer = FusedTransformerEncoderLayer(32, 4, 64, dropout=0.0, activation="gelu", batch_first=True)
    seen = []
    layer.linear1.register_forward_hook(fused_attn.nn.transformer.observer(lambda m, a, o: seen.append(1)))
    fused_attn.backends._last_choice.pop("add_layer_norm", None)
    layer(torch.randn(2, 6, 32))
    assert fused_attn.last_backend("add_layer_norm") is not None and not seen


@pytest.mark.parametrize("built", ["layer", "decoder"])
def test_optimize_copy_computes_what_the_original_computes(built):
    """torch's TransformerDecoderLayer.__setstate__ hides an activation module (nn.GELU()) behind
    F.relu on every copy, so a TransformerDecoder (which copies its layer) really runs ReLU while
    a layer used directly runs GELU: optimize(inplace=False) keeps each as it is."""
    torch.manual_seed(12)

    def build(dtype):
        layer = nn.TransformerDecoderLayer(32, 4, 64, dropout=0.0, batch_first=True,
                                           activation=nn.GELU(approximate="tanh"), dtype=dtype)
        return (layer if built == "layer" else nn.TransformerDecoder(layer, 2)).eval()

    model = build(torch.float32)
    copied = fused_attn.optimize(model, inplace=False).model
    tgt, memory = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    truth = build(torch.float64)  # built as the model was: a copy of it would hide its GELU
    truth.load_state_dict(model.state_dict())
    assert_model_parity(model, copied, lambda m: m(*_cast(_dtype(m), (tgt, memory))), truth=truth)


class _LoRALinear(nn.Linear):
    """A linear whose forward adds a low-rank term: its weight alone does not say what it computes."""

    def forward(self, x):
        return super().forward(x) + 0.5 * x[..., :1].expand(*x.shape[:-1], self.out_features)


class _RMSLikeNorm(nn.LayerNorm):
    def forward(self, x):
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps) * self.weight


class _ShiftedGELU(nn.GELU):
    def forward(self, x):
        return super().forward(x) + 0.1


_FOREIGN = {
    "linear1": lambda: _LoRALinear(32, 64),
    "norm1": lambda: _RMSLikeNorm(32),
    "norm2": lambda: nn.RMSNorm(32),
    "dropout1": lambda: nn.Identity(),
    "activation": lambda: _ShiftedGELU(),
}


@pytest.mark.parametrize("child", sorted(_FOREIGN))
def test_foreign_submodules_are_computed_as_torch_does(child, recwarn):
    """A linear/norm/dropout submodule that is not exactly torch's (a LoRA linear, an RMSNorm, an
    Identity for a dropout): optimize() keeps the layer and says why, a fused layer built directly
    runs torch's forward with a FallbackWarning; a GELU subclass is called, not taken for GELU."""
    torch.manual_seed(13)
    plain = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, activation="gelu", batch_first=True).eval()
    setattr(plain, child, _FOREIGN[child]())
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(14))
    expected = plain(x)
    optimized = copy.deepcopy(plain)
    report = fused_attn.optimize(optimized)
    if child == "activation":
        assert type(optimized) is FusedTransformerEncoderLayer
    else:
        assert type(optimized) is nn.TransformerEncoderLayer
        kind = {"linear1": "Linear", "dropout1": "Dropout"}.get(child, "LayerNorm")
        assert ("", "TransformerEncoderLayer", f"{child} is {type(getattr(plain, child)).__name__}, not {kind}") \
            in report.kept
    torch.testing.assert_close(optimized(x), expected)

    built = FusedTransformerEncoderLayer(32, 4, 64, dropout=0.0, activation="gelu", batch_first=True).eval()
    built.load_state_dict(plain.state_dict(), strict=False)
    setattr(built, child, copy.deepcopy(getattr(plain, child)))
    torch.testing.assert_close(built(x), expected)
    if child != "activation":
        assert any(m.startswith(f"FusedTransformerEncoderLayer: {child} is") for m in fused_attn.backends._warned)


def test_multihead_attention_is_causal_hint_as_torch():
    """is_causal replaces attn_mask by causal masking only when neither the weights nor a key
    padding mask need the mask itself (torch's rule): with either, the given mask applies, even
    one that is not causal."""
    torch.manual_seed(15)
    plain = nn.MultiheadAttention(16, 2, batch_first=True).eval()
    fused = _as(plain, FusedMultiheadAttention)
    x = torch.randn(2, 5, 16)
    mask = torch.rand(5, 5, generator=torch.Generator().manual_seed(16)) > 0.5
    mask.fill_diagonal_(False)  # True = masked, torch's convention; not causal
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 4] = True
    causal = nn.Transformer.generate_square_subsequent_mask(5).isinf()
    for kwargs in ({"need_weights": True}, {"need_weights": False, "key_padding_mask": pad},
                   {"need_weights": True, "key_padding_mask": pad}):
        for attn_mask in (mask, causal):
            want = plain(x, x, x, attn_mask=attn_mask, is_causal=True, **kwargs)
            got = fused(x, x, x, attn_mask=attn_mask, is_causal=True, **kwargs)
            torch.testing.assert_close(got[0], want[0])
            if kwargs["need_weights"]:
                torch.testing.assert_close(got[1], want[1])
    torch.testing.assert_close(fused(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)[0],
                               plain(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)[0])
    torch.testing.assert_close(fused(x, x, x, is_causal=None)[0], plain(x, x, x, is_causal=None)[0])


def test_multihead_attention_runs_a_causal_hint_causally_with_padding(monkeypatch):
    """With is_causal and a key padding mask (or the weights), torch applies the attn_mask given;
    the fused module gives the same result, but when the mask is the causal mask (float from
    generate_square_subsequent_mask, or bool) it runs the kernels' causal masking with the
    padding mask alone ([B, 1, 1, Lk], never merged): checked once per mask and version, so a
    mask changed in place is checked again, and a mask that needs its gradient applies as given."""
    from fused_attn.nn import attention as mha_module

    calls = []
    for name in ("scaled_dot_product_attention", "softmax"):
        op = getattr(mha_module, name)

        def spy(*args, _op=op, _name=name, **kwargs):
            mask = args[3] if _name == "scaled_dot_product_attention" else args[2]
            causal = args[5] if _name == "scaled_dot_product_attention" else args[4]
            calls.append((None if mask is None else tuple(mask.shape), causal))
            return _op(*args, **kwargs)

        monkeypatch.setattr(mha_module, name, spy)
    torch.manual_seed(21)
    plain = nn.MultiheadAttention(16, 2, batch_first=True).eval()
    fused = _as(plain, FusedMultiheadAttention)
    x = torch.randn(3, 6, 16)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[1, 4:] = True
    pad[2, 0] = True  # left padding: query 0 of sequence 2 sees no key (torch: NaN, fused: 0)
    float_causal = nn.Transformer.generate_square_subsequent_mask(6)
    for attn_mask in (float_causal, float_causal.isinf()):
        for kwargs in ({"need_weights": False, "key_padding_mask": pad}, {"need_weights": True},
                       {"need_weights": True, "key_padding_mask": pad, "average_attn_weights": False}):
            calls.clear()
            want = plain(x, x, x, attn_mask=attn_mask, is_causal=True, **kwargs)
            got = fused(x, x, x, attn_mask=attn_mask, is_causal=True, **kwargs)
            padded = "key_padding_mask" in kwargs
            assert calls == [((3, 1, 1, 6) if padded else None, True)], (attn_mask.dtype, kwargs)
            seen = ~torch.isnan(want[0])
            torch.testing.assert_close(got[0][seen], want[0][seen])
            assert torch.equal(got[0][~seen], torch.zeros_like(got[0][~seen]))
            if kwargs["need_weights"]:
                torch.testing.assert_close(got[1].nan_to_num(0.0), want[1].nan_to_num(0.0))
    # Changed in place after a call, the mask is checked again and applies as given.
    mask = float_causal.clone()
    fused(x, x, x, attn_mask=mask, key_padding_mask=pad, is_causal=True, need_weights=False)
    mask[5, 0] = float("-inf")
    calls.clear()
    got = fused(x, x, x, attn_mask=mask, key_padding_mask=pad, is_causal=True, need_weights=False)[0]
    assert calls == [((3, 1, 6, 6), False)]
    want = plain(x, x, x, attn_mask=mask, key_padding_mask=pad, is_causal=True, need_weights=False)[0]
    torch.testing.assert_close(got[1], want[1])
    # A causal mask that requires grad gets its gradient, as from torch's.
    learned = [float_causal.clone().requires_grad_() for _ in range(2)]
    for module, m in zip((plain, fused), learned):
        out = module(x, x, x, attn_mask=m, key_padding_mask=pad, is_causal=True, need_weights=False)[0]
        out[:2].sum().backward()
    torch.testing.assert_close(learned[1].grad, learned[0].grad)


def test_multihead_attention_refuses_the_masks_torch_refuses():
    """Where torch's MultiheadAttention raises on a mask, so does the fused one: a mask given as an
    is_causal hint is still checked (it was dropped unchecked: an int64 mask, an unbatched 3-D mask
    of the wrong head count), and a float mask must have the query's dtype (outside autocast)."""
    torch.manual_seed(17)
    plain = nn.MultiheadAttention(8, 2).eval()
    fused = _as(plain, FusedMultiheadAttention)
    x, unbatched = torch.randn(4, 2, 8), torch.randn(4, 8)
    causal = nn.Transformer.generate_square_subsequent_mask(4)
    cases = [
        (x, {"attn_mask": causal.isinf().long(), "is_causal": True, "need_weights": False}, "attn_mask must be a bool"),
        (unbatched, {"attn_mask": causal.expand(3, 4, 4), "is_causal": True, "need_weights": False},
         r"attn_mask must have shape \[4, 4\] or \[2, 4, 4\]"),
        (x, {"attn_mask": causal.double()}, "attn_mask must be bool or have the query's dtype torch.float32"),
        (x, {"attn_mask": causal.double(), "need_weights": False}, "attn_mask must be bool or have the query's dtype"),
        (x, {"key_padding_mask": torch.zeros(2, 4, dtype=torch.float64)},
         "key_padding_mask must be bool or have the query's dtype"),
    ]
    for query, kwargs, message in cases:
        with pytest.raises(Exception):
            plain(query, query, query, **kwargs)
        with pytest.raises((TypeError, ValueError), match=message):
            fused(query, query, query, **kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts a float32 mask with the rest, as torch's
        for module in (plain, fused):
            module(x, x, x, attn_mask=causal, need_weights=False)


def test_multihead_attention_reads_out_proj_as_torch():
    """torch's attention reads out_proj's parameters without calling it: a hook on it runs in
    neither."""
    plain = nn.MultiheadAttention(16, 2, batch_first=True)
    fused = _as(plain, FusedMultiheadAttention)
    calls = []
    for module in (plain, fused):
        module.out_proj.register_forward_hook(lambda *args: calls.append(1))
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(fused(x, x, x)[0], plain(x, x, x)[0])
    assert calls == []


def test_nested_inputs_as_torch():
    """Nested tensors, which torch's MultiheadAttention (in inference) and LayerNorm take, get
    torch's results."""
    torch.manual_seed(17)
    mha = nn.MultiheadAttention(16, 2, batch_first=True).eval()
    norm = nn.LayerNorm(16)
    nested = torch.nested.nested_tensor([torch.randn(5, 16), torch.randn(3, 16)])
    with torch.no_grad():
        for plain, cls, call in ((mha, FusedMultiheadAttention, lambda m: m(nested, nested, nested)[0]),
                                 (norm, FusedLayerNorm, lambda m: m(nested))):
            want, got = call(plain), call(_as(plain, cls))
            for w, g in zip(want.unbind(), got.unbind()):
                torch.testing.assert_close(g, w)
    jagged = torch.nested.nested_tensor([torch.randn(5, 16), torch.randn(3, 16)], layout=torch.jagged)
    for w, g in zip(norm(jagged).unbind(), _as(norm, FusedLayerNorm)(jagged).unbind()):
        torch.testing.assert_close(g, w)
    # A nested tensor holds its sequences along dim 0: a batch_first=False layer refuses it, as torch's.
    layer = FusedTransformerEncoderLayer(16, 2, 32, batch_first=False).eval()
    with torch.no_grad(), pytest.raises(ValueError, match="nested tensor .* batch_first=False"):
        layer(nested)


def test_attention_with_bias_kv_or_zero_attn_is_kept():
    model = nn.Sequential(nn.MultiheadAttention(16, 2, add_bias_kv=True), nn.MultiheadAttention(16, 2, add_zero_attn=True),
                          nn.TransformerEncoderLayer(16, 2, 32))
    model[2].self_attn = nn.MultiheadAttention(16, 2, add_bias_kv=True)
    report = fused_attn.optimize(model)
    why = "add_bias_kv/add_zero_attn: no fused kernel serves them"
    assert report.kept == [("0", "MultiheadAttention", why), ("1", "MultiheadAttention", why),
                           ("2", "TransformerEncoderLayer", why), ("2.self_attn", "MultiheadAttention", why)]
