"""The fused modules themselves (``FusedMultiheadAttention``, ``FusedTransformerEncoderLayer``,
``FusedTransformerDecoderLayer``, ``FusedLayerNorm``) against the ``torch.nn`` modules whose
state_dict they load, and ``nn.TransformerEncoder`` / ``nn.TransformerDecoder`` / ``nn.Transformer``
models ``optimize()``d against the originals, on seeded random configurations.

Why: tests/test_nn.py checks each option on a grid of a few values, and tests/test_random_modules.py
reaches the modules through ``optimize()`` and judges the parameter gradients only. Here each case
draws its options together and every result is judged: the output, the returned attention
weights, and the gradient of every input (query, key, value, src, memory, a learned float mask)
and of every parameter. Drawn per case:

* attention: head dims 8/16/40 (now and then 72), lengths 1/5/17/2-12 (now and then 65/130/257,
  past the CPU kernels' tiles), batch_first, batched or unbatched, self-attention, a memory as key
  and value, the query also the key or the value, or three tensors, kdim/vdim, bias, the inputs
  contiguous, stored transposed or strided, their scale;
* masks: key padding masks bool, 0/-inf float, large finite negative (-1e4, -1e9) or arbitrary
  additive floats (right or left padding, a band or holes); attention masks 2-D or 3-D
  ``[B * H, L, S]``, bool, 0/-inf, large negative, a random bias, a band, or the top-left causal
  mask (also for a cross attention whose lengths differ), with or without the ``is_causal`` hint;
  each stored contiguous, transposed or broadcast with stride 0; a float mask now and then learned
  (requires grad);
* need_weights with averaged or per-head weights; train mode (dropout 0, but the weights' dropout
  when need_weights, which drops what torch's does under the same seed), eval mode with
  gradients (dropout 0 or 0.3, which must not apply), and eval mode under no_grad, half of those
  shaped for torch's inference fast paths (``torch._native_multi_head_attention``,
  ``torch._transformer_encoder_layer_fwd``, the encoder's nested tensors);
* layers: every activation torch's layers take ("relu", "gelu", ``F.relu``, ``F.gelu``,
  ``nn.ReLU()``, ``nn.GELU(approximate="tanh")``), norm_first, bias, layer_norm_eps, dim_feedforward,
  src/tgt masks and padding, memory masks and padding, ``tgt_is_causal``/``memory_is_causal``;
* LayerNorm: normalized shapes of 1-3 dims, affine or not, bias or not, eps, leading dims, strided
  inputs, rows far from zero mean;
* a quarter of the cases with gradients freeze some parameters, a quarter give some inputs that
  need no gradient.

Judged as tests/conftest.py judges parity (its ``tensor_errors``): the torch module in float64 is
the truth, and the fused module's float32 error must stay within 3x the float32 torch module's
own error plus one ulp at the problem's scale, each tensor by its largest errors over the case and
two copies of it with inputs and parameters perturbed by a few roundings (so that the plain error
is its usual level, not one lucky draw). The fused modules run on the named ``cpu`` backend (even
cases) or ``auto`` (odd cases: the policy picks the same kernels, and from the second call of a
shape on the extension's C++ entry for the plain call serves them), a few tiny cases on
``triton`` (the interpreter here).

Every case is drawn from ``random.Random(seed)`` with the seed in its id, and a failure names the
seed and the whole configuration. What is not drawn, and why:

* a query whose keys are all masked, except where torch defines its result (0 on its SDPA path:
  need_weights=False outside the inference fast path; a row of large finite negatives): where
  torch gives NaN (the weights' softmax, the fast paths) the fused modules' 0 is a documented
  difference;
* in the encoder layer's no_grad cases, ``nn.GELU(approximate="tanh")`` and additive float masks:
  torch's fast path computes the exact GELU for any ``nn.GELU`` (``activation_relu_or_gelu`` is set
  by isinstance) and reads a float mask as "nonzero = masked" (an additive bias gives NaN), where
  its own slow path computes what the fused layer computes;
* inputs larger than about 1: with scores of tens some softmax rows are one-hot to 1e-6, and a
  gradient there is the cancellation of terms a few ulps apart (dP - rowsum(dO * O)), which the
  fused kernels and torch round differently (single elements 3-7x torch's error, either way);
* dropout on the flash path (need_weights=False), whose kernels draw their own masks.

A case with a row of -1e4 or -1e9 judges that tensor at the plain error that row makes (float32
rounds the scores added to it), so it checks the row's value (uniform, not 0) rather than rounding.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_attn
from fused_attn import backends
from fused_attn.nn import (
    FusedLayerNorm,
    FusedMultiheadAttention,
    FusedTransformerDecoderLayer,
    FusedTransformerEncoderLayer,
)

from .conftest import ParityReport, tensor_errors

# Problems judged together per case: the case's own and DRAWS - 1 copies with every input multiplied
# by 1 + 8 eps N(0, 1) and every parameter by 1 + 1e-6 N(0, 1) (as conftest's assert_parity and
# assert_model_parity do), each tensor judged by its largest errors over them.
DRAWS = 3
FACTOR = 3.0
MHA_CASES = 320
LAYER_CASES = 128
MODEL_CASES = 32
NORM_CASES = 64
TRITON_CASES = 2
# Lengths: mostly short odd ones; now and then past the CPU kernels' tiles (64 keys; query blocks of
# 128 in the backward, 256 in the forward) with masks whose rows see different key ranges.
SHORT_LENGTHS = (1, 5, 17)
LONG_LENGTHS = (65, 130, 257)

pytestmark = [
    # torch warns of mismatched bool/float key padding and attention masks (which it still takes),
    # and of nested tensors being a prototype; both are drawn on purpose.
    pytest.mark.filterwarnings("ignore:Support for mismatched"),
    pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors"),
    pytest.mark.filterwarnings("ignore:enable_nested_tensor is True"),
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: these problems are tiny, and on a shared 2-core machine two threads
    waiting for each other made the file 8x slower (90 s against 11 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _backend_params(count: int, triton: int) -> list:
    """(backend, case) parameters: ``count`` cases, the even ones on the named cpu backend, the odd
    ones on "auto" (the module's backend None: the package's policy, which picks the same kernels,
    and, from the second call of a shape on, the extension's C++ entry for the plain call,
    csrc/fast.cpp, which the named backend never takes); the first ``triton`` also on Triton."""
    params = [pytest.param(name, case, id=f"{name}-{case}") for case in range(count)
              for name in (("auto",) if case % 2 else ("cpu",))]
    reasons = backends.backend_unavailable_reasons("triton", torch.device("cpu"))
    marks = [pytest.mark.skip(reason="; ".join(reasons))] if reasons else []
    params += [pytest.param("triton", case, id=f"triton-{case}", marks=marks) for case in range(triton)]
    return params


def _served_by(backend: str) -> str:
    """The backend fused_attn.last_backend names for a module run on ``backend``."""
    return "cpu" if backend == "auto" else backend


# ----------------------------------------------------------------------------------------------
# The judge
# ----------------------------------------------------------------------------------------------


def _layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """``t``'s values in another memory layout, differentiably (the modules must take any strides)."""
    if kind == "contiguous":
        return t
    if kind == "transposed":  # the first two dims stored swapped (a [L, B, E] view of [B, L, E] memory)
        return t.transpose(0, 1).contiguous().transpose(0, 1) if t.dim() >= 2 else t
    if kind == "strided":  # every feature a stride of 2 apart
        return torch.stack([t, torch.zeros_like(t)], dim=-1)[..., 0]
    raise ValueError(kind)


def _set_parameters(models, base: dict[str, torch.Tensor], noise: dict[str, torch.Tensor] | None) -> None:
    """Every model's parameters set to ``base`` (float32) times ``noise``, rounded to float32 once:
    the float64 truth gets exactly the float32 values the others hold."""
    with torch.no_grad():
        for name, value in base.items():
            value = value.double() * noise[name] if noise is not None else value.double()
            value = value.float()
            for model in models:
                model.get_parameter(name).copy_(value)


def _perturbed_input(x: torch.Tensor, draw: int, index: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * draw + index)
    noise = 1 + 8 * torch.finfo(torch.float32).eps * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    return x * noise


def _parity(context: str, truth: nn.Module, plain: nn.Module, fused: nn.Module, run, inputs: dict, *,
            grads: bool, seed: int, draws: int = DRAWS) -> None:
    """``run(model, inputs)`` -> {name: tensor} for the float64 ``truth``, the float32 ``plain``
    torch module and the float32 ``fused`` one (all three holding the same parameter values); the
    fused outputs, the gradients of ``inputs`` (float64 tensors, given to each model in its dtype)
    and of every parameter judged as conftest.tensor_errors judges them, over ``draws`` problems.
    ``grads=False``: outputs alone, every call under no_grad (inference). With gradients, a quarter
    of the cases freeze some parameters (requires_grad=False, in all three models) and a quarter
    give some inputs that need no gradient (drawn from the seed apart from the case's options)."""
    names = [n for n, _ in plain.named_parameters()]
    assert names == [n for n, _ in fused.named_parameters()] == [n for n, _ in truth.named_parameters()], context
    base = {n: p.detach().clone() for n, p in plain.named_parameters()}
    rng = random.Random(7 * seed + 1)
    frozen = {n for n in names if rng.random() < 0.5} if grads and rng.random() < 0.25 else set()
    constant = {k for k in inputs if rng.random() < 0.4} if grads and rng.random() < 0.25 else set()
    if frozen >= set(names) and constant >= set(inputs):
        frozen, constant = set(), set()
    if frozen or constant:
        context += f"; frozen {sorted(frozen)}, no gradient for inputs {sorted(constant)}"
    for model in (truth, plain, fused):
        for n, p in model.named_parameters():
            p.requires_grad_(n not in frozen)
    reports: dict[str, ParityReport] = {}
    try:
        for draw in range(draws):
            noise = None
            if draw:
                gen = torch.Generator().manual_seed(draw)
                noise = {n: 1 + 1e-6 * torch.randn(p.shape, generator=gen, dtype=torch.float64)
                         for n, p in base.items()}
            _set_parameters((truth, plain, fused), base, noise)
            problem = {k: (v if not draw else _perturbed_input(v, draw, i)).float()
                       for i, (k, v) in enumerate(inputs.items())}
            for report in _reports(truth, plain, fused, run, problem, grads, seed, constant):
                seen = reports.get(report.name)
                reports[report.name] = report if seen is None else ParityReport(
                    report.name, max(seen.fused_err, report.fused_err), max(seen.plain_err, report.plain_err),
                    max(seen.bound, report.bound))
    except AssertionError as exc:
        raise AssertionError(f"{context}: {exc}") from None
    finally:
        _set_parameters((truth, plain, fused), base, None)
    failed = [str(r) for r in reports.values() if not r.fused_err <= r.bound]
    assert not failed, f"{context}: " + "; ".join(failed)


def _reports(truth, plain, fused, run, problem: dict, grads: bool, seed: int,
             constant=frozenset()) -> list[ParityReport]:
    """One problem's reports: outputs, then input and parameter gradients (``constant``: inputs
    given without requires_grad)."""
    results = []
    for model, dtype in ((truth, torch.float64), (plain, torch.float32), (fused, torch.float32)):
        model.zero_grad(set_to_none=True)
        xs = {k: v.to(dtype).detach().clone().requires_grad_(grads and k not in constant) for k, v in problem.items()}
        with torch.set_grad_enabled(grads):
            outs = run(model, xs)
        assert all(o.dtype == dtype for o in outs.values()), {k: o.dtype for k, o in outs.items()}
        results.append((outs, xs))
    (o64, x64), (o_plain, x_plain), (o_fused, x_fused) = results
    assert list(o_fused) == list(o_plain) == list(o64)
    if grads:
        gen = torch.Generator().manual_seed(seed)
        upstream = {k: torch.randn(o.shape, generator=gen, dtype=torch.float64).float() for k, o in o64.items()}
        for (outs, _), dtype in zip(results, (torch.float64, torch.float32, torch.float32)):
            # An output that needs no gradient (the weights, from frozen projections of constant inputs)
            # needs none in every model.
            assert [o.requires_grad for o in outs.values()] == [o.requires_grad for o in o_plain.values()], \
                {k: o.requires_grad for k, o in outs.items()}
            differentiable = [k for k, o in outs.items() if o.requires_grad]
            if differentiable:
                torch.autograd.backward([outs[k] for k in differentiable],
                                        [upstream[k].to(dtype) for k in differentiable])
    tensors = {f"{k}": (o_fused[k], o_plain[k], o64[k]) for k in o64}
    if grads:
        for k in problem:
            # A mask torch drops (an attn_mask given with the is_causal hint alone) gets no gradient.
            got, want, true = x_fused[k].grad, x_plain[k].grad, x64[k].grad
            assert (got is None) == (want is None) == (true is None), f"grad input {k}: reached in one model only"
            if true is not None:
                tensors[f"grad input {k}"] = (got, want, true)
        fused_params, plain_params = dict(fused.named_parameters()), dict(plain.named_parameters())
        for name, p in truth.named_parameters():
            got, want = fused_params[name].grad, plain_params[name].grad
            assert (got is None) == (want is None) == (p.grad is None), f"grad {name}: reached in one model only"
            if p.grad is not None:
                tensors[f"grad {name}"] = (got, want, p.grad)
    scale = max([1.0] + [_magnitude(t[2]) for t in tensors.values()])
    return [tensor_errors(name, f, p, t, factor=FACTOR, problem_scale=scale) for name, (f, p, t) in tensors.items()]


def _magnitude(t: torch.Tensor) -> float:
    finite = t.detach()[torch.isfinite(t.detach())]
    return float(finite.abs().max()) if finite.numel() else 0.0


def _loaded(cls, torch_module: nn.Module, *args, **kwargs) -> nn.Module:
    """``cls(*args, **kwargs)`` holding ``torch_module``'s state_dict (same keys, in the same order)."""
    module = cls(*args, **kwargs)
    assert list(module.state_dict()) == list(torch_module.state_dict())
    module.load_state_dict(torch_module.state_dict())
    return module.train(torch_module.training)


# ----------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------


def _length(rng: random.Random, tiny: bool = False) -> int:
    if tiny:
        return rng.randint(1, 5)
    return rng.choice(LONG_LENGTHS) if rng.random() < 0.08 else rng.choice(SHORT_LENGTHS + (rng.randint(2, 12),))


def _keep_pattern(rng: random.Random, gen: torch.Generator, rows: int, length: int, allow_empty: bool,
                  patterns: tuple[str, ...] = ("prefix", "prefix", "suffix", "band", "holes")):
    """[rows, length] bool, True = the key is kept: each row a prefix (right padding), a suffix (left
    padding), a band or random holes, at least one key kept, unless ``allow_empty`` and a draw
    empties one row."""
    pattern = rng.choice(patterns)
    keep = torch.zeros(rows, length, dtype=torch.bool)
    for r in range(rows):
        n = rng.randint(1, length)
        if pattern == "prefix":
            keep[r, :n] = True
        elif pattern == "suffix":
            keep[r, length - n:] = True
        elif pattern == "band":
            start = rng.randint(0, length - n)
            keep[r, start:start + n] = True
        else:
            keep[r] = torch.rand(length, generator=gen) < 0.6
            keep[r, rng.randrange(length)] = True
    empty = allow_empty and rng.random() < 0.3
    if empty:
        keep[rng.randrange(rows)] = False
    return keep, f"{pattern}{', a row empty' if empty else ''}"


class Mask:
    """A mask drawn for a case: its value (bool, True = masked, torch.nn's convention; or float64,
    added), its memory layout, and whether it is ``learned`` (a float mask given as an input that
    requires grad, its gradient judged with the rest)."""

    def __init__(self, name: str, value: torch.Tensor | None, desc: str, rng: random.Random, causal: bool = False,
                 can_learn: bool = True):
        self.name, self.value, self.desc = name, value, desc
        layouts = ("contiguous", "contiguous", "transposed") + (() if causal else ("expanded",))
        self.layout = rng.choice(layouts) if value is not None and value.dim() >= 2 else "contiguous"
        self.learned = value is not None and value.is_floating_point() and can_learn and rng.random() < 0.5
        self.causal = causal
        if value is not None and value.is_floating_point():
            self.value = value.double()
        if self.layout == "expanded":  # the values the modules will see: the first row / matrix for all
            self.value = self.value[:1].expand(self.value.shape).clone()

    def masked(self) -> torch.Tensor | None:
        """Where the mask hides a key (True), or None."""
        if self.value is None:
            return None
        return self.value if self.value.dtype == torch.bool else self.value == float("-inf")

    def unmask(self, index) -> None:
        """Lets the keys at ``index`` be seen (masked_fill-style: False, or 0 for a float mask)."""
        self.value[index] = False if self.value.dtype == torch.bool else 0.0

    def __repr__(self) -> str:
        if self.value is None:
            return "none"
        learned = ", learned" if self.learned else ""
        return f"{self.desc} {list(self.value.shape)} {self.value.dtype} ({self.layout}{learned})"

    def add_input(self, inputs: dict) -> None:
        if self.learned:
            inputs[self.name] = self.value

    def get(self, xs: dict, dtype: torch.dtype) -> torch.Tensor | None:
        """The mask for a model of ``dtype`` (the case's input when learned), in its layout."""
        if self.value is None:
            return None
        m = xs[self.name] if self.learned else (self.value.to(dtype) if self.value.is_floating_point() else self.value)
        if self.layout == "transposed":
            m = m.transpose(-1, -2).contiguous().transpose(-1, -2)
        elif self.layout == "expanded":  # its first row (padding) / matrix (attn_mask) for all, stride 0
            m = m[:1].expand(m.shape)
        return m


def _seen_by_every_query(padding: Mask, attn_mask: Mask, batch: int | None, heads: int) -> None:
    """Where the two masks together hide every key from a query (torch's weights and inference
    fast paths give NaN there, the fused modules 0), lets it see one: key 0 unpadded under a causal
    mask (every query sees key 0), else, in the attention mask, one key its padding keeps."""
    pad, attn = padding.masked(), attn_mask.masked()
    if pad is None and attn is None:
        return
    rows = batch or 1
    pad = torch.zeros(rows, 1, 1, 1, dtype=torch.bool) if pad is None else pad.reshape(rows, 1, 1, -1)
    attn = torch.zeros(1, 1, 1, 1, dtype=torch.bool) if attn is None else \
        attn.reshape(rows, heads, *attn.shape[-2:]) if attn.dim() == 3 else attn[None, None]
    empty = (pad | attn).all(-1)  # [rows or 1, heads or 1, q_len or 1]
    if not bool(empty.any()):
        return
    if attn_mask.value is None or attn_mask.causal:
        padding.unmask((..., 0))
        return
    for b, h, i in empty.nonzero().tolist():
        j = int((~pad[b % pad.shape[0], 0, 0]).nonzero()[0]) if not bool(pad[b % pad.shape[0]].all()) else 0
        attn_mask.unmask((..., i, j))  # for every batch and head: it only lets more keys be seen


def _padding(name: str, rng: random.Random, batch: int | None, length: int, kinds: tuple[str, ...],
             allow_empty: bool, can_learn: bool = True, **pattern) -> Mask:
    """A key padding mask ([batch, length], or [length] unbatched) of a kind among ``kinds``: "bool"
    (True = padded), "inf" (float, -inf = padded), "large" (float, -1e4 or -1e9 = padded, a row
    of it allowed: a uniform softmax) or "float" (arbitrary additive floats with -inf where
    padded, which torch adds as they are)."""
    kind = rng.choice(kinds)
    if kind == "none":
        return Mask(name, None, "none", rng)
    gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
    # A large finite negative (the old Hugging Face style) hides no row: a row of it is a uniform
    # softmax, which torch computes everywhere.
    keep, pattern = _keep_pattern(rng, gen, batch or 1, length, allow_empty or kind == "large", **pattern)
    padded = ~keep if batch else ~keep[0]
    if kind == "bool":
        return Mask(name, padded, f"bool {pattern}", rng)
    if kind == "large":
        big = rng.choice((-1e4, -1e9))
        return Mask(name, torch.zeros(padded.shape).masked_fill(padded, big), f"{big:g} {pattern}", rng,
                    can_learn=can_learn)
    value = torch.zeros(padded.shape).masked_fill(padded, float("-inf"))
    if kind == "float":
        value = value + torch.randn(padded.shape, generator=gen)
    return Mask(name, value, f"{kind} {pattern}", rng, can_learn=can_learn and kind == "float")


def _attn_mask(name: str, rng: random.Random, shape: tuple[int, ...], kinds: tuple[str, ...], allow_empty: bool,
               can_learn: bool = True) -> Mask:
    """An attention mask of ``shape`` ([L, S] or [B * H, L, S]) of a kind among ``kinds``: "bool"
    (True = masked: random keys, or a band around the diagonal, each row keeping one key unless
    ``allow_empty`` and a draw masks a whole row), "inf" (the same as 0 / -inf floats), "float"
    (a random additive bias, sometimes -inf where the bool mask masks), "large" (-1e4 or -1e9
    where masked, sometimes a whole row), "causal_bool" / "causal_float" (the top-left causal
    mask, broadcast to ``shape``)."""
    kind = rng.choice(kinds)
    if kind == "none":
        return Mask(name, None, "none", rng)
    gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
    q_len, k_len = shape[-2:]
    if kind.startswith("causal"):
        hidden = torch.ones(q_len, k_len, dtype=torch.bool).triu(1).expand(shape).contiguous()
        value = hidden if kind == "causal_bool" else torch.zeros(shape).masked_fill(hidden, float("-inf"))
        return Mask(name, value, kind, rng, causal=True, can_learn=can_learn)
    if rng.random() < 0.3:  # a band: query i sees the keys near i * k_len / q_len
        width = rng.randint(0, 3)
        centre = (torch.arange(q_len) * k_len // q_len)[:, None]
        masked = ((torch.arange(k_len)[None, :] - centre).abs() > width).expand(shape).clone()
        desc = f"band {width}"
    else:
        masked = torch.rand(shape, generator=gen) > 0.5
        keep = torch.randint(0, k_len, (*shape[:-1], 1), generator=gen)
        masked.scatter_(-1, keep, False)
        desc = "random"
    if allow_empty and rng.random() < 0.3:
        masked[..., rng.randrange(q_len), :] = True  # every key of one query masked
        desc += ", a row empty"
    if kind == "bool":
        return Mask(name, masked, f"bool {desc}", rng)
    if kind == "inf":
        return Mask(name, torch.zeros(shape).masked_fill(masked, float("-inf")), f"inf {desc}", rng)
    if kind == "large":  # a large finite negative: a row of it is defined (uniform) everywhere
        if rng.random() < 0.3:
            masked[..., rng.randrange(q_len), :] = True
            desc += ", a row all of it"
        big = rng.choice((-1e4, -1e9))
        return Mask(name, torch.zeros(shape).masked_fill(masked, big), f"{big:g} {desc}", rng, can_learn=can_learn)
    bias = torch.randn(shape, generator=gen)
    if rng.random() < 0.5:
        return Mask(name, bias.masked_fill(masked, float("-inf")), f"float -inf {desc}", rng, can_learn=can_learn)
    return Mask(name, bias, "float bias", rng, can_learn=can_learn)


def _mode(rng: random.Random) -> str:
    """train (dropout 0), eval with gradients, or eval under no_grad (torch's inference fast paths)."""
    return rng.choice(("train", "eval", "inference"))


def _tokens(gen: torch.Generator, batch: int | None, length: int, width: int, batch_first: bool) -> torch.Tensor:
    shape = (length, width) if batch is None else (batch, length, width) if batch_first else (length, batch, width)
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def _context(seed: int, backend: str, case: dict) -> str:
    return f"seed {seed} ({backend}): " + ", ".join(f"{k} {v!r}" for k, v in case.items())


# ----------------------------------------------------------------------------------------------
# MultiheadAttention
# ----------------------------------------------------------------------------------------------


def _mha_case(seed: int, tiny: bool) -> dict:
    rng = random.Random(seed)
    mode = _mode(rng)
    # Half the inference cases are what torch's inference fast path takes (a batch-first batched
    # self-attention with biases, an even head count, bool masks): torch._native_multi_head_attention.
    fast = mode == "inference" and rng.random() < 0.5
    heads = rng.randint(1, 4) if not fast else rng.choice((2, 4))
    head_dim = rng.choice((8, 16, 40) if not tiny else (8,)) if rng.random() < 0.95 else 72
    embed = heads * head_dim
    # memory: key is value, another sequence; qk / qv: the query is also the key / the value.
    kind = rng.choice(("self", "self", "memory", "cross", "qk", "qv")) if not fast else "self"
    kdim = vdim = None
    if kind == "cross" and rng.random() < 0.6:
        kdim, vdim = rng.choice((8, 12, 24, embed)), rng.choice((8, 20, embed))
    elif kind == "memory" and rng.random() < 0.3:
        kdim = vdim = rng.choice((12, 24))
    batch = None if rng.random() < 0.2 and not fast else rng.randint(1, 3)
    q_len = _length(rng, tiny)
    k_len = q_len if kind in ("self", "qk", "qv") else _length(rng, tiny)
    need_weights, average = rng.random() < 0.5, rng.random() < 0.5
    # torch defines a query without keys (0 attention) on its SDPA path alone.
    allow_empty = not need_weights and mode != "inference"
    grads = mode != "inference"
    padding = _padding("key_padding_mask", rng, batch, k_len,
                       ("none", "bool", "inf", "large", "float") if not fast else ("none", "bool"),
                       allow_empty, can_learn=grads)
    three_d = rng.random() < 0.4
    shape = ((batch or 1) * heads, q_len, k_len) if three_d else (q_len, k_len)
    attn_mask = _attn_mask("attn_mask", rng, shape,
                           ("none", "bool", "inf", "large", "float", "causal_bool", "causal_float") if not fast
                           else ("none", "bool", "causal_bool"), allow_empty, can_learn=grads)
    if not allow_empty:
        _seen_by_every_query(padding, attn_mask, batch, heads)
    return dict(
        mode=mode, fast=fast, heads=heads, embed=embed, kind=kind, kdim=kdim, vdim=vdim,
        bias=rng.random() < 0.8 or fast, batch_first=rng.random() < 0.5 or fast, batch=batch, q_len=q_len,
        # In eval no dropout applies. In training the weights' dropout (need_weights) is torch's
        # F.dropout on the same number of probabilities in the same order: seeded alike before each
        # call, it drops the same ones (the flash kernel's own dropout, need_weights=False, is not).
        k_len=k_len, dropout=0.0 if mode == "train" and not need_weights else rng.choice((0.0, 0.3)),
        need_weights=need_weights, average=average, key_padding_mask=padding, attn_mask=attn_mask,
        is_causal=attn_mask.desc.startswith("causal") and rng.random() < 0.6,
        layout=rng.choice(("contiguous", "contiguous", "transposed", "strided")),
        scale=rng.choice((1.0, 1.0, 0.1)),  # of the inputs; not larger: see the module docstring
    )


@pytest.mark.parametrize("backend, case", _backend_params(MHA_CASES, TRITON_CASES))
def test_multihead_attention_module_random_configs(backend, case):
    """FusedMultiheadAttention against nn.MultiheadAttention: output, weights, input, mask and
    parameter gradients."""
    seed = 31000 + case
    c = _mha_case(seed, tiny=backend == "triton")
    context = _context(seed, backend, c)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    kwargs = dict(bias=c["bias"], kdim=c["kdim"], vdim=c["vdim"], batch_first=c["batch_first"], dropout=c["dropout"])
    plain = nn.MultiheadAttention(c["embed"], c["heads"], **kwargs).train(c["mode"] == "train")
    fused = _loaded(FusedMultiheadAttention, plain, c["embed"], c["heads"], **kwargs)
    fused.backend = None if backend == "auto" else backend
    truth = _loaded(nn.MultiheadAttention, plain, c["embed"], c["heads"], **kwargs, dtype=torch.float64)

    inputs = {"query": _tokens(gen, c["batch"], c["q_len"], c["embed"], c["batch_first"])}
    if c["kind"] in ("memory", "cross", "qv"):
        inputs["key"] = _tokens(gen, c["batch"], c["k_len"], c["kdim"] or c["embed"], c["batch_first"])
    if c["kind"] in ("cross", "qk"):
        inputs["value"] = _tokens(gen, c["batch"], c["k_len"], c["vdim"] or c["embed"], c["batch_first"])
    inputs = {k: v * c["scale"] for k, v in inputs.items()}
    for mask in (c["key_padding_mask"], c["attn_mask"]):
        mask.add_input(inputs)

    def run(model, xs):
        dtype = xs["query"].dtype
        q = _layout(xs["query"], c["layout"])
        k = _layout(xs["key"], c["layout"]) if "key" in xs else q  # one tensor where the case shares it
        v = _layout(xs["value"], c["layout"]) if "value" in xs else q if c["kind"] == "qv" else k
        torch.manual_seed(seed)  # the same dropout of the weights in every model
        out, weights = model(q, k, v, key_padding_mask=c["key_padding_mask"].get(xs, dtype),
                             need_weights=c["need_weights"], attn_mask=c["attn_mask"].get(xs, dtype),
                             average_attn_weights=c["average"], is_causal=c["is_causal"])
        assert (weights is None) == (not c["need_weights"])
        if model is fused:
            op = "softmax" if c["need_weights"] else "scaled_dot_product_attention"
            assert fused_attn.last_backend(op) == _served_by(backend), (op, fused_attn.last_backend(op))
        return {"output": out} if weights is None else {"output": out, "weights": weights}

    _parity(context, truth, plain, fused, run, inputs, grads=c["mode"] != "inference", seed=seed)


# ----------------------------------------------------------------------------------------------
# Encoder and decoder layers
# ----------------------------------------------------------------------------------------------

_ACTIVATIONS = {
    "relu": lambda: "relu", "gelu": lambda: "gelu", "F.relu": lambda: F.relu, "F.gelu": lambda: F.gelu,
    "nn.ReLU": lambda: nn.ReLU(), "nn.GELU(tanh)": lambda: nn.GELU(approximate="tanh"),
}


def _layer_case(seed: int, layer: str, tiny: bool) -> dict:
    rng = random.Random(seed)
    mode = _mode(rng)
    grads = mode != "inference"
    # Half the encoder's inference cases are what torch's fast path takes
    # (torch._transformer_encoder_layer_fwd): batch first, batched, biases, an even head count, ReLU or GELU.
    fast = layer == "encoder" and mode == "inference" and rng.random() < 0.5
    heads = rng.randint(1, 4) if not fast else rng.choice((2, 4))
    d_model = heads * rng.choice((8, 16, 40) if not tiny else (8,))
    activation = rng.choice(sorted(_ACTIVATIONS))
    if mode == "inference" and layer == "encoder" and activation == "nn.GELU(tanh)":
        activation = "gelu"  # torch's fast path computes the exact GELU for it (see the module docstring)
    batch = None if rng.random() < 0.2 and not fast else rng.randint(1, 3)
    length = _length(rng, tiny)
    options = dict(
        dim_feedforward=rng.randint(16, 80), dropout=0.0 if mode == "train" else rng.choice((0.0, 0.3)),
        batch_first=rng.random() < 0.5 or fast, norm_first=rng.random() < 0.5, bias=rng.random() < 0.8 or fast,
        layer_norm_eps=rng.choice((1e-5, 1e-6, 1e-12)),
    )
    allow_empty = mode != "inference"  # the layers never ask for weights: torch's SDPA path gives 0
    # torch's encoder-layer fast path reads a float mask as "nonzero = masked" (an additive bias
    # gives NaN; see the module docstring): there, float masks are 0 / -inf.
    additive = () if layer == "encoder" and mode == "inference" else ("float", "large")
    three_d = rng.random() < 0.3
    shape = ((batch or 1) * heads, length, length) if three_d else (length, length)
    case = dict(
        layer=layer, mode=mode, fast=fast, heads=heads, d_model=d_model, activation=activation, options=options,
        batch=batch, length=length,
        padding=_padding("padding", rng, batch, length, ("none", "bool", "inf") + additive, allow_empty, grads),
        mask=_attn_mask("mask", rng, shape, ("none", "bool", "inf", "causal_bool", "causal_float") + additive,
                        allow_empty, grads),
    )
    case["is_causal"] = case["mask"].desc.startswith("causal") and rng.random() < 0.6
    if not allow_empty:
        _seen_by_every_query(case["padding"], case["mask"], batch, heads)
    if layer == "decoder":
        memory_length = _length(rng, tiny)
        memory_shape = ((batch or 1) * heads, length, memory_length) if rng.random() < 0.3 else (length, memory_length)
        case.update(
            memory_length=memory_length,
            memory_padding=_padding("memory_padding", rng, batch, memory_length,
                                    ("none", "bool", "inf", "large", "float"),
                                    allow_empty, grads),
            memory_mask=_attn_mask("memory_mask", rng, memory_shape,
                                   ("none", "bool", "inf", "large", "float", "causal_bool", "causal_float"),
                                   allow_empty, grads),
        )
        case["memory_is_causal"] = case["memory_mask"].desc.startswith("causal") and rng.random() < 0.6
        if not allow_empty:
            _seen_by_every_query(case["memory_padding"], case["memory_mask"], batch, heads)
    return case


def _layer_test(layer: str, backend: str, seed: int) -> None:
    c = _layer_case(seed, layer, tiny=backend == "triton")
    context = _context(seed, backend, c)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    torch_cls, fused_cls = {"encoder": (nn.TransformerEncoderLayer, FusedTransformerEncoderLayer),
                            "decoder": (nn.TransformerDecoderLayer, FusedTransformerDecoderLayer)}[layer]

    def build(cls, **extra):
        # Each built on its own (never copied: a copy of torch's decoder layer runs F.relu in place of
        # an activation module, TransformerDecoderLayer.__setstate__), with a fresh activation.
        return cls(c["d_model"], c["heads"], activation=_ACTIVATIONS[c["activation"]](), **c["options"], **extra)

    plain = build(torch_cls).train(c["mode"] == "train")
    fused = _loaded(lambda: build(fused_cls), plain)
    fused.backend = None if backend == "auto" else backend
    truth = _loaded(lambda: build(torch_cls, dtype=torch.float64), plain)
    masks = [c[k] for k in ("padding", "mask", "memory_padding", "memory_mask") if k in c]
    inputs = {"src": _tokens(gen, c["batch"], c["length"], c["d_model"], c["options"]["batch_first"])}
    if layer == "decoder":
        inputs["memory"] = _tokens(gen, c["batch"], c["memory_length"], c["d_model"], c["options"]["batch_first"])
    for mask in masks:
        mask.add_input(inputs)

    def run(model, xs):
        dtype = xs["src"].dtype
        m = {mask.name: mask.get(xs, dtype) for mask in masks}
        if layer == "encoder":
            out = model(xs["src"], src_mask=m["mask"], src_key_padding_mask=m["padding"], is_causal=c["is_causal"])
        else:
            out = model(xs["src"], xs["memory"], tgt_mask=m["mask"], memory_mask=m["memory_mask"],
                        tgt_key_padding_mask=m["padding"], memory_key_padding_mask=m["memory_padding"],
                        tgt_is_causal=c["is_causal"], memory_is_causal=c["memory_is_causal"])
        if model is fused:
            for op in ("scaled_dot_product_attention", "add_layer_norm"):
                assert fused_attn.last_backend(op) == _served_by(backend), (op, fused_attn.last_backend(op))
        return {"output": out}

    _parity(context, truth, plain, fused, run, inputs, grads=c["mode"] != "inference", seed=seed)


@pytest.mark.parametrize("backend, case", _backend_params(LAYER_CASES, TRITON_CASES // 2))
def test_encoder_layer_random_configs(backend, case):
    _layer_test("encoder", backend, 32000 + case)


@pytest.mark.parametrize("backend, case", _backend_params(LAYER_CASES, TRITON_CASES // 2))
def test_decoder_layer_random_configs(backend, case):
    _layer_test("decoder", backend, 33000 + case)


# ----------------------------------------------------------------------------------------------
# Models of torch.nn layers, optimize()d
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", range(MODEL_CASES))
def test_optimized_torch_models_random_configs(case):
    """``nn.TransformerEncoder`` (with its nested-tensor inference path where torch takes it),
    ``nn.TransformerDecoder`` or a whole ``nn.Transformer`` (whose copied decoder layers run
    F.relu whatever activation module they were built with: TransformerDecoderLayer.__setstate__),
    batched or not, converted by ``optimize(inplace=False, backend=...)`` ("cpu" for the even
    cases, "auto" for the odd ones), against the original (and its float64 copy as the truth)."""
    seed = 34000 + case
    rng = random.Random(seed)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    mode = _mode(rng)
    kind = rng.choice(("encoder", "decoder", "transformer"))
    # Half the encoders in inference are what torch turns into nested tensors (its fast path with a
    # padding mask: batch first, post-LN, an even head count, ReLU or GELU, right padding, no mask).
    nested = kind == "encoder" and mode == "inference" and rng.random() < 0.5
    heads = rng.choice((2, 4)) if rng.random() < 0.7 or nested else rng.choice((1, 3))
    d_model = heads * rng.choice((8, 16))
    activation = rng.choice(sorted(_ACTIVATIONS))
    if mode == "inference" and activation == "nn.GELU(tanh)":
        activation = "gelu"  # torch's encoder-layer fast path: the exact GELU for any nn.GELU (module docstring)
    layer_kwargs = dict(dim_feedforward=rng.randint(16, 64), dropout=0.0 if mode == "train" else 0.3,
                        batch_first=rng.random() < 0.7 or nested, norm_first=rng.random() < 0.3 and not nested)
    batch = rng.randint(1, 3) if rng.random() < 0.85 or nested else None
    src_len, tgt_len = _length(rng), _length(rng)
    src_padding = _padding("src_padding", rng, batch, src_len, ("bool",) if nested else ("none", "bool", "inf"),
                           allow_empty=False, can_learn=False, **({"patterns": ("prefix",)} if nested else {}))
    tgt_padding = _padding("tgt_padding", rng, batch, tgt_len, ("none", "bool", "inf"), False, False)
    causal = rng.random() < 0.3 and not nested
    if causal and src_padding.value is not None:
        src_padding.unmask((..., 0))  # every causal query sees key 0 (no query without keys: see above)
    if tgt_padding.value is not None:
        tgt_padding.unmask((..., 0))  # under the causal tgt_mask
    c = dict(kind=kind, mode=mode, heads=heads, d_model=d_model, activation=activation, **layer_kwargs, batch=batch,
             src_len=src_len, tgt_len=tgt_len, src_padding=src_padding, tgt_padding=tgt_padding, src_causal=causal,
             layers=rng.randint(1, 2), final_norm=rng.random() < 0.5)
    layer_kwargs["activation"] = _ACTIVATIONS[activation]()
    norm = nn.LayerNorm(d_model) if c["final_norm"] else None
    if kind == "encoder":
        c["nested"] = rng.random() < 0.7 or nested
        plain = nn.TransformerEncoder(nn.TransformerEncoderLayer(d_model, heads, **layer_kwargs), c["layers"],
                                      norm=norm, enable_nested_tensor=c["nested"])
    elif kind == "decoder":
        plain = nn.TransformerDecoder(nn.TransformerDecoderLayer(d_model, heads, **layer_kwargs), c["layers"],
                                      norm=norm)
    else:
        plain = nn.Transformer(d_model, heads, num_encoder_layers=c["layers"], num_decoder_layers=rng.randint(1, 2),
                               **layer_kwargs)
    backend = "auto" if case % 2 else "cpu"
    context = _context(seed, backend, c)
    plain.train(mode == "train")
    report = fused_attn.optimize(plain, inplace=False, backend=backend)
    fused = report.model
    layer_class = "FusedTransformerDecoderLayer" if kind == "decoder" else "FusedTransformerEncoderLayer"
    assert layer_class in {new for _, _, new in report.replaced}, f"{context}: {report}"
    assert not report.kept, f"{context}: {report}"
    truth = copy.deepcopy(plain).double()  # computes what ``plain`` does (a copy keeps its decoder's activation)
    inputs = {"src": _tokens(gen, batch, src_len, d_model, layer_kwargs["batch_first"])}
    if kind != "encoder":
        inputs["tgt"] = _tokens(gen, batch, tgt_len, d_model, layer_kwargs["batch_first"])

    tgt_hint = rng.choice((True, None))  # the causal hint, or torch's detection of the causal tgt_mask
    context += f", tgt_is_causal {tgt_hint}"

    def run(model, xs):
        dtype = xs["src"].dtype
        src_mask = nn.Transformer.generate_square_subsequent_mask(src_len, dtype=dtype) if causal else None
        tgt_mask = nn.Transformer.generate_square_subsequent_mask(tgt_len, dtype=dtype)
        pad, tgt_pad = src_padding.get(xs, dtype), tgt_padding.get(xs, dtype)
        if kind == "encoder":
            out = model(xs["src"], mask=src_mask, src_key_padding_mask=pad, is_causal=causal or None)
        elif kind == "decoder":  # src is the memory
            out = model(xs["tgt"], xs["src"], tgt_mask=tgt_mask, tgt_key_padding_mask=tgt_pad,
                        memory_key_padding_mask=pad, tgt_is_causal=tgt_hint)
        else:
            out = model(xs["src"], xs["tgt"], src_mask=src_mask, tgt_mask=tgt_mask, src_key_padding_mask=pad,
                        tgt_key_padding_mask=tgt_pad, memory_key_padding_mask=pad, src_is_causal=causal or None,
                        tgt_is_causal=tgt_hint)
        return {"output": out}

    _parity(context, truth, plain, fused, run, inputs, grads=mode != "inference", seed=seed)


# ----------------------------------------------------------------------------------------------
# LayerNorm
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend, case", _backend_params(NORM_CASES, TRITON_CASES))
def test_layer_norm_module_random_configs(backend, case):
    """FusedLayerNorm against nn.LayerNorm: normalized shapes of 1 to 3 dims, with and without
    weight/bias, eps, leading dims (none too), strided inputs, and rows far from zero mean (an
    offset up to 1e4 times their spread, where a variance taken as E[x^2] - E[x]^2 cancels)."""
    seed = 35000 + case
    rng = random.Random(seed)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    tiny = backend == "triton"
    normalized = tuple(rng.choice((1, 3, 8, 16, 40, 64, 100, 768) if not tiny else (1, 3, 8, 16))
                       for _ in range(rng.choice((1, 1, 1, 2, 3))))
    if len(normalized) > 1:
        normalized = tuple(min(n, 16) for n in normalized)
    leading = tuple(rng.randint(1, 5) for _ in range(rng.randint(0, 3)))
    c = dict(normalized_shape=normalized if len(normalized) > 1 or rng.random() < 0.5 else normalized[0],
             leading=leading, elementwise_affine=rng.random() < 0.8, bias=rng.random() < 0.8,
             eps=rng.choice((1e-5, 1e-6, 1e-12, 1e-3)), mode=_mode(rng),
             layout=rng.choice(("contiguous", "transposed", "strided")),
             offset=rng.choice((0.0, 0.0, 3.0, 100.0, 1e4)), spread=rng.choice((1.0, 1e-3, 50.0)))
    context = _context(seed, backend, c)
    kwargs = dict(eps=c["eps"], elementwise_affine=c["elementwise_affine"], bias=c["bias"])
    plain = nn.LayerNorm(c["normalized_shape"], **kwargs).train(c["mode"] == "train")
    if c["elementwise_affine"]:
        with torch.no_grad():  # parameters other than ones and zeros
            for p in plain.parameters():
                p.add_(0.5 * torch.randn(p.shape, generator=gen))
    fused = _loaded(FusedLayerNorm, plain, c["normalized_shape"], **kwargs)
    fused.backend = None if backend == "auto" else backend
    truth = _loaded(nn.LayerNorm, plain, c["normalized_shape"], **kwargs, dtype=torch.float64)
    shape = leading + normalized
    x = c["offset"] * (1 + torch.rand(shape[:-1] + (1,), generator=gen, dtype=torch.float64)) + \
        c["spread"] * torch.randn(shape, generator=gen, dtype=torch.float64)

    def run(model, xs):
        out = model(_layout(xs["input"], c["layout"]))
        if model is fused:
            assert fused_attn.last_backend("layer_norm") == _served_by(backend)
        return {"output": out}

    _parity(context, truth, plain, fused, run, {"input": x}, grads=c["mode"] != "inference", seed=seed)
