"""Benchmark suites: each yields cases, and for each case the implementations to compare.

An implementation is a name and a zero-argument callable that runs the op once (forward, or
forward and backward: the gradients of the inputs are computed, not accumulated into ``.grad``,
so that every call does the same work). ``torch`` names PyTorch's own implementation (its fused
kernel where it has one: ``F.scaled_dot_product_attention``, ``F.layer_norm``); ``reference`` is
the package's plain PyTorch oracle (for attention with a guard for fully masked rows that plain
code does not have, which costs it extra passes over the scores); each case names its eager
baseline, the code a user would write without this package (``eager`` for attention,
``softmax(QK^T * scale) @ V`` with a boolean causal mask made once per case; ``torch`` for the
others, whose eager form is torch's own functions; ``plain`` for models), and speed-ups are
reported against it and against ``torch``; ``compiled`` is ``torch.compile`` of the reference;
``torch-flash`` is PyTorch's FlashAttention backend where it can run; ``copy`` is a device copy
of as many bytes as a memory-bound op must move (the bandwidth yardstick); the fused backends
that can serve the case on this machine follow, then other libraries' kernels when installed
(:mod:`.third_party`); the one the policy picks for the case is called as a user calls it, with no
backend named (:func:`_fused_runners`). The ``model`` suite compares whole models: ``plain`` (the baseline),
``optimized`` (``fused_attn.optimize``) and ``compiled``. An implementation that cannot run
in a case is in the case's ``skipped`` with the reason.

Each suite lists its cases' shapes first (:data:`SHAPES`: how many cases a run has, known before
any is set up), then sets each case up in turn; a case whose set-up runs out of memory or whose
sizes overflow the integer types raises :class:`CaseSetupFailed` with the shape it tried.

Work is counted as FLOPs for attention and the FFN (:func:`.harness.attention_flops`,
:func:`.harness.ffn_flops`) and as bytes that must cross memory for the memory-bound ops.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

import fused_attn
from fused_attn import backends

from ..ops.attention import repeat_kv_heads
from . import harness, third_party, workloads


@dataclasses.dataclass
class Settings:
    """What the command line chose: device, dtype, mode, sizes and the backends wanted."""

    device: torch.device
    dtype: torch.dtype
    mode: str
    batch: int | None = None
    heads: int | None = None
    kv_heads: int | None = None  # attention: key/value heads (grouped-query), a divisor of heads
    queries: int | None = None  # attention: queries per sequence against its seq keys (None: seq, self-attention)
    padding: float | None = None  # attention, model: the fraction of each sequence that is padding
    dropout: float | None = None  # attention: dropout_p of every implementation (None or 0: none)
    head_dim: int | None = None
    seqs: list[int] | None = None
    rows: int | None = None
    hiddens: list[int] | None = None
    causal: list[bool] | None = None
    backends: list[str] | None = None
    compile: bool = True  # include torch.compile of the reference (compilation is excluded from the times)
    compile_skipped: str | None = None  # without compile: why, as a skipped record (None: no record, as --no-compile)
    models: list[str] | None = None  # model suite: which workloads
    layers: int | None = None  # model suite: encoder layers
    activation: str | None = None  # ffn: a name of FFN_ACTIVATIONS (None: "gelu")


@dataclasses.dataclass
class Case:
    suite: str
    shape: dict
    dtype: torch.dtype
    mode: str
    impls: dict[str, Callable[[], object]]
    skipped: dict[str, str]
    flops: float | None = None  # floating-point operations per call (compute-bound ops)
    min_bytes: int | None = None  # bytes that must cross memory per call (memory-bound ops)
    tokens: int | None = None  # tokens per call (models)
    baseline: str = "torch"  # the eager implementation speed-ups are reported against


# The rate each suite reports: TFLOP/s for compute-bound ops, GB/s for memory-bound ones, tokens/s for models.
RATE_KEYS = {"attention": "tflops", "ffn": "tflops", "softmax": "gbps", "layer_norm": "gbps",
             "add_layer_norm": "gbps", "model": "tokens_per_s"}


class CaseSetupFailed(Exception):
    """Setting up the case of ``shape`` ran out of memory, or its sizes overflow the integer types
    (the exception is the ``__cause__``)."""

    def __init__(self, shape: dict, cause: BaseException):
        super().__init__(harness.one_line_reason(cause))
        self.shape = shape
        self.cause = cause


def _cases(shapes: list[dict], build: Callable[[dict], Case]) -> Iterator[Case]:
    """``build(shape)`` for each shape in turn; a set-up that runs out of memory or overflows
    raises :class:`CaseSetupFailed` naming the shape."""
    for shape in shapes:
        try:
            case = build(shape)
        except Exception as exc:
            if harness.is_out_of_memory(exc) or harness.is_size_overflow(exc):
                raise CaseSetupFailed(shape, exc) from exc
            raise
        yield case


INTERPRETED_SKIP = ("run by Triton's interpreter here (TRITON_INTERPRET=1), whose times are the Python "
                    "interpreter's, not a kernel's: name it in --backends to time it anyway")


def _fused_backends(op: str, inputs: backends.Inputs, wanted: list[str] | None) -> tuple[list[str], dict[str, str]]:
    ok, skipped = [], {}
    for name, reasons in backends.explain(op, inputs).items():
        if name == "reference" or (wanted and name not in wanted):
            continue
        if not reasons and name == "triton" and not wanted and inputs.device.type == "cpu":
            # Interpreted (the only way Triton serves CPU tensors): seconds to hours a call at the
            # default sizes, timing nothing a user's kernel would do.
            skipped[name] = INTERPRETED_SKIP
        elif reasons:
            # A backend that cannot run on this device at all: that one reason says it (the
            # device and dtype checks that follow would repeat it).
            skipped[name] = "; ".join(backends.backend_unavailable_reasons(name, inputs.device) or reasons)
        else:
            ok.append(name)
    return ok, skipped


def _fused_runners(
    op: str, names: list[str], grad: torch.Tensor | None, call: Callable[[str | None], torch.Tensor]
) -> dict[str, Callable[[], object]]:
    """A runner per fused backend in ``names`` of ``call(backend)``, which calls ``op``. The backend
    the policy picks for the call itself is timed as a user's call reaches it, with no backend
    named (so that the plain call's C++ entry serves it where it serves a user's: its host time
    counts as theirs); the others are named (the Python path). One untimed call, without
    gradient, asks the policy (``last_backend``)."""
    if not names:
        return {}
    with torch.no_grad():
        call(None)
    chosen = backends.last_backend(op)
    return {name: _runner(lambda backend=None if name == chosen else name: call(backend), grad) for name in names}


def _graph_leaves(out: torch.Tensor) -> list[torch.Tensor]:
    """The leaf tensors whose gradients ``out``'s backward computes: the variables of the
    ``AccumulateGrad`` nodes its graph reaches (a third-party adapter's own re-laid-out copies
    included)."""
    leaves, seen, stack = [], set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            leaves.append(node.variable)
        stack.extend(child for child, _ in node.next_functions)
    return leaves


def _runner(forward: Callable[[], torch.Tensor], grad: torch.Tensor | None) -> Callable[[], object]:
    """``forward`` alone, or with ``grad`` the forward and the backward to every leaf input.

    The gradients are returned by ``torch.autograd.grad`` and dropped instead of accumulated into
    ``.grad``: accumulation would add a read-modify-write of every input gradient to each call
    after the first, work the op does not do and the byte counts do not include. The leaves are
    found once, from the first call's graph; every call uses the same inputs.
    """
    if grad is None:
        return forward
    leaves: list[torch.Tensor] = []

    def step() -> None:
        out = forward()
        if not leaves:
            leaves.extend(_graph_leaves(out))
        torch.autograd.grad(out, leaves, grad)

    return step


_COMPILED: dict[Callable, Callable] = {}


def _compiled(s: Settings, reference: Callable, *args, **kwargs) -> Callable[[], torch.Tensor] | str | None:
    """``reference(*args, **kwargs)`` through ``torch.compile``; when the settings leave it out,
    the reason they give (a skipped record) or None (``--no-compile``: no record). Each reference
    function is compiled once, with dynamic shapes, and serves every case of a sweep: recompiling
    per shape would spend a GPU sweep's time in the compiler."""
    if not s.compile:
        return s.compile_skipped
    if reference not in _COMPILED:
        _COMPILED[reference] = torch.compile(reference, dynamic=True)
    compiled = _COMPILED[reference]
    return lambda: compiled(*args, **kwargs)


def _add_optional(impls: dict, skipped: dict, grad: torch.Tensor | None, adapters) -> None:
    """Adds the implementations that exist (``compiled``, other libraries) and the reasons of those that do not."""
    for name, fn in adapters:
        if isinstance(fn, str):
            skipped[name] = fn
        elif fn is not None:
            impls[name] = _runner(fn, grad)


def _copy(moved_bytes: int, like: torch.Tensor) -> Callable[[], object]:
    """A device copy moving as many bytes (read + written) as the op must: the bandwidth yardstick.
    It writes new tensors, as the ops write theirs. On a CPU a tensor past glibc's mmap threshold
    (32 MiB at most) is fresh pages every call, whose first writes fault them in, a cost the op
    pays too (about 13 of F.layer_norm's 22 ms at 4096 x 4096 in float32 on two cores): there the
    copy writes tensors of the op's output size (``like``), which cross that threshold where the
    op's do, where a copy into a kept buffer would show the op at a fraction of a bandwidth that
    nothing allocating its output reaches. On a GPU, whose caching allocator reuses its blocks at
    no such cost, it is one copy, one launch."""
    src = torch.empty(moved_bytes // (2 * like.element_size()), device=like.device, dtype=like.dtype)
    pieces = src.split(like.numel()) if src.device.type == "cpu" else (src,)
    return lambda: [piece.clone() for piece in pieces]


# ---------------------------------------------------------------------------------------------
# LayerNorm

# rows x hidden: BERT-base/large and wider hidden sizes.
LAYER_NORM_ROWS = {"cpu": 4096, "cuda": 16384}
LAYER_NORM_HIDDEN = {"cpu": [768, 1024, 4096], "cuda": [768, 1024, 4096, 8192]}


def layer_norm_shapes(s: Settings) -> list[dict]:
    rows = s.rows or LAYER_NORM_ROWS[s.device.type]
    return [{"rows": rows, "hidden": hidden} for hidden in s.hiddens or LAYER_NORM_HIDDEN[s.device.type]]


def layer_norm_cases(s: Settings) -> Iterator[Case]:
    training = s.mode == "fwd+bwd"

    def build(shape: dict) -> Case:
        rows, hidden = shape["rows"], shape["hidden"]
        x = torch.randn(rows, hidden, device=s.device, dtype=s.dtype, requires_grad=training)
        w = torch.randn(hidden, device=s.device, dtype=s.dtype, requires_grad=training)
        b = torch.randn(hidden, device=s.device, dtype=s.dtype, requires_grad=training)
        grad = torch.randn_like(x) if training else None
        # forward reads x, writes y; backward reads dy and x, writes dx (parameters are negligible)
        moved = rows * hidden * x.element_size() * (2 + (3 if training else 0))
        names, skipped = _fused_backends("layer_norm", backends.Inputs(s.device, s.dtype, {"hidden": hidden}), s.backends)
        impls: dict[str, Callable[[], object]] = {
            "torch": _runner(lambda: F.layer_norm(x, (hidden,), w, b), grad),
            "reference": _runner(lambda: fused_attn.reference.layer_norm(x, (hidden,), w, b), grad),
            "copy": _copy(moved, x),
        }
        _add_optional(impls, skipped, grad, [("compiled", _compiled(s, fused_attn.reference.layer_norm, x, (hidden,), w, b))])
        impls.update(_fused_runners("layer_norm", names, grad,
                                    lambda backend: fused_attn.layer_norm(x, (hidden,), w, b, backend=backend)))
        _add_optional(impls, skipped, grad, third_party.layer_norm(x, w, b, 1e-5))
        return Case("layer_norm", shape, s.dtype, s.mode, impls, skipped, min_bytes=moved)

    return _cases(layer_norm_shapes(s), build)


# ---------------------------------------------------------------------------------------------
# Attention

# Sequence sweep at a fixed token count per batch (as the FlashAttention benchmarks do), so that
# every length fills the device; heads x head_dim = 2048 on a GPU (BERT-large-like width).
ATTENTION_SEQS = {"cpu": [512, 1024, 2048], "cuda": [512, 1024, 2048, 4096, 8192, 16384]}
ATTENTION_TOKENS = {"cpu": 512, "cuda": 16384}


def _torch_flash(q, k, v, causal, dropout_p=0.0) -> Callable[[], torch.Tensor] | str:
    """PyTorch's FlashAttention SDPA backend, or why it cannot run (it has no CPU or float32 kernel)."""
    if q.device.type != "cuda":
        return "PyTorch's FlashAttention backend runs on CUDA only"
    if q.dtype == torch.float32:
        return "PyTorch's FlashAttention backend takes float16/bfloat16 only"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal,
                                                  enable_gqa=k.shape[1] != q.shape[1])

    return run


def _grouped_reference(q, k, v, is_causal, mask=None, dropout_p=0.0):
    """The reference for grouped key/value heads: repeated to the query's, then the plain attention."""
    heads = q.shape[1]
    return fused_attn.reference.scaled_dot_product_attention(q, repeat_kv_heads(k, heads), repeat_kv_heads(v, heads),
                                                             mask, dropout_p=dropout_p, is_causal=is_causal)


def attention_heads(s: Settings) -> int:
    """The attention suite's query heads: ``--heads``, else 12 on a CPU (BERT-base) and a width of
    2048 (heads x head_dim) on a GPU."""
    return s.heads or (12 if s.device.type == "cpu" else max(1, 2048 // (s.head_dim or 64)))


def attention_shapes(s: Settings) -> list[dict]:
    head_dim = s.head_dim or 64
    heads = attention_heads(s)
    kv_heads = s.kv_heads or heads
    if heads % kv_heads:
        raise ValueError(f"kv_heads {kv_heads} must divide heads {heads}")
    return [
        {"batch": s.batch or max(1, ATTENTION_TOKENS[s.device.type] // seq), "heads": heads,
         **({"kv_heads": kv_heads} if kv_heads != heads else {}), **({"queries": s.queries} if s.queries else {}),
         "seq": seq, "head_dim": head_dim, "causal": causal,
         **({"padding": s.padding} if s.padding else {}), **({"dropout": s.dropout} if s.dropout else {})}
        for causal in s.causal or ([False] if s.queries else [False, True])
        for seq in s.seqs or ATTENTION_SEQS[s.device.type]
    ]


def attention_cases(s: Settings) -> Iterator[Case]:
    """Self-attention over the sequence sweep, or with ``queries`` that many queries per sequence
    against its keys (a decoding step's queries against a cache); with ``kv_heads`` (grouped-query) key and value have
    fewer heads: implementations that take them as they are (``enable_gqa``, flash-attn) do, the
    others (eager, the reference, xformers) repeat them inside the timed call. With ``dropout``
    every implementation drops probabilities at that rate, in either mode (a training step's
    forward; eager as ``F.dropout`` of the probabilities), each from its own random stream."""
    training = s.mode == "fwd+bwd"

    def build(shape: dict) -> Case:
        batch, heads, seq, head_dim, causal = (shape[key] for key in ("batch", "heads", "seq", "head_dim", "causal"))
        kv_heads = shape.get("kv_heads", heads)
        p = shape.get("dropout", 0.0)
        gqa = kv_heads != heads
        q_len = shape.get("queries", seq)
        q, k, v = (
            torch.randn(batch, n, length, head_dim, device=s.device, dtype=s.dtype, requires_grad=training)
            for n, length in ((heads, q_len), (kv_heads, seq), (kv_heads, seq))
        )
        grad = torch.randn_like(q) if training else None
        # What a user writes: the causal mask is made once, outside the timed call.
        future = torch.ones(q_len, seq, dtype=torch.bool, device=s.device).triu(1) if causal else None
        # --padding: every sequence's last keys are padding, hidden by a [B, 1, 1, L] boolean mask
        # (True = attend), as a tokenizer's attention mask gives it; torch's SDPA takes no mask
        # with is_causal, so it gets the two combined (also made once).
        mask = sdpa_mask = None
        if shape.get("padding"):
            mask = torch.ones(batch, 1, 1, seq, dtype=torch.bool, device=s.device)
            mask[..., max(1, seq - round(shape["padding"] * seq)):] = False
            sdpa_mask = mask & ~future if causal else mask
        flops = harness.attention_flops(batch, heads, q_len, seq, head_dim, causal=causal, mode=s.mode)
        inputs = backends.Inputs(
            s.device, s.dtype,
            {"head_dim": head_dim, "head_dim_v": head_dim, "dropout": p > 0, "q_len": q_len, "k_len": seq},
        )
        names, skipped = _fused_backends("scaled_dot_product_attention", inputs, s.backends)

        def eager(scale=head_dim**-0.5) -> torch.Tensor:
            scores = q @ repeat_kv_heads(k, heads).transpose(-2, -1) * scale
            if future is not None:
                scores = scores.masked_fill(future, float("-inf"))
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            probs = torch.softmax(scores, -1)
            return (F.dropout(probs, p) if p else probs) @ repeat_kv_heads(v, heads)

        impls: dict[str, Callable[[], object]] = {
            "eager": _runner(eager, grad),
            "torch": _runner(lambda: F.scaled_dot_product_attention(
                q, k, v, sdpa_mask, dropout_p=p, is_causal=causal and mask is None, enable_gqa=gqa), grad),
            "reference": _runner(lambda: _grouped_reference(q, k, v, causal, mask, p), grad),
        }
        compiled = _compiled(s, _grouped_reference, q, k, v, causal, mask, p)
        # Whether every implementation's causality is the same: with fewer queries than keys,
        # PyTorch's FlashAttention backend refuses is_causal, and flash-attn aligns its causal mask
        # to the last key (the others align it to the first).
        causal_agrees = not causal or q_len == seq
        if mask is not None:
            flash = "PyTorch's FlashAttention backend takes no mask"
        elif not causal_agrees:
            flash = "PyTorch's FlashAttention backend takes is_causal only for as many queries as keys"
        else:
            flash = _torch_flash(q, k, v, causal, p)
        _add_optional(impls, skipped, grad, [("torch-flash", flash), ("compiled", compiled)])
        impls.update(_fused_runners(
            "scaled_dot_product_attention", names, grad,
            lambda backend: fused_attn.scaled_dot_product_attention(
                q, k, v, mask, dropout_p=p, is_causal=causal, enable_gqa=gqa, backend=backend
            ),
        ))
        others = third_party.attention(q, k, v, causal, p)
        if not causal_agrees:
            others = [(name, fn if isinstance(fn, str) or name != "flash-attn"
                       else "--queries with --causal: its causal mask is aligned to the last key") for name, fn in others]
        if mask is not None:  # their dense calls take no mask (flash-attn's padded batches go through varlen)
            others = [(name, fn if isinstance(fn, str) else "--padding: its call here takes no mask")
                      for name, fn in others]
        _add_optional(impls, skipped, grad, others)
        return Case("attention", shape, s.dtype, s.mode, impls, skipped, flops=flops, baseline="eager")

    return _cases(attention_shapes(s), build)


# ---------------------------------------------------------------------------------------------
# Masked softmax

SOFTMAX_SEQS = {"cpu": [128, 512, 1024], "cuda": [512, 1024, 2048, 4096]}


def softmax_shapes(s: Settings) -> list[dict]:
    return [{"batch": s.batch or max(1, (4096 if s.device.type == "cuda" else 256) // seq), "heads": s.heads or 12,
             "seq": seq} for seq in s.seqs or SOFTMAX_SEQS[s.device.type]]


def softmax_cases(s: Settings) -> Iterator[Case]:
    training = s.mode == "fwd+bwd"

    def build(shape: dict) -> Case:
        batch, heads, seq = shape["batch"], shape["heads"], shape["seq"]
        x = torch.randn(batch, heads, seq, seq, device=s.device, dtype=s.dtype, requires_grad=training)
        pad = torch.rand(batch, 1, 1, seq, device=s.device) > 0.1
        grad = torch.randn_like(x) if training else None
        moved = x.numel() * x.element_size() * (2 + (3 if training else 0))
        names, skipped = _fused_backends("softmax", backends.Inputs(s.device, s.dtype, {"n_cols": seq}), s.backends)
        impls: dict[str, Callable[[], object]] = {
            "torch": _runner(lambda: torch.softmax((x * 0.125).masked_fill(~pad, float("-inf")), -1), grad),
            "reference": _runner(lambda: fused_attn.reference.softmax(x, -1, pad, 0.125), grad),
            "copy": _copy(moved, x),
        }
        _add_optional(impls, skipped, grad, [("compiled", _compiled(s, fused_attn.reference.softmax, x, -1, pad, 0.125))])
        impls.update(_fused_runners("softmax", names, grad,
                                    lambda backend: fused_attn.softmax(x, -1, pad, 0.125, backend=backend)))
        return Case("softmax", shape, s.dtype, s.mode, impls, skipped, min_bytes=moved)

    return _cases(softmax_shapes(s), build)


# ---------------------------------------------------------------------------------------------
# FFN and Add & Norm

# (model, hidden) of BERT-base and BERT-large; token counts per device.
FFN_SHAPES = [(768, 3072), (1024, 4096)]
FFN_TOKENS = {"cpu": [512, 2048], "cuda": [4096, 8192, 16384, 32768]}
# The FFN's activation by name: ffn's (activation, approximate) and eager PyTorch's function.
FFN_ACTIVATIONS = {
    "gelu": (("gelu", "none"), F.gelu),
    "gelu-tanh": (("gelu", "tanh"), lambda h: F.gelu(h, approximate="tanh")),
    "relu": (("relu", "none"), F.relu),
}


def ffn_shapes(s: Settings) -> list[dict]:
    """The FFN's sizes; a shape names its activation when it is not the default exact GELU."""
    widths = [(width, 4 * width) for width in s.hiddens] if s.hiddens else FFN_SHAPES
    activation = s.activation or "gelu"
    if activation not in FFN_ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(FFN_ACTIVATIONS)}, got {activation!r}")
    return [{"tokens": tokens, "d_model": model, "d_ff": hidden, **({"activation": activation} if activation != "gelu" else {})}
            for model, hidden in widths for tokens in ([s.rows] if s.rows else FFN_TOKENS[s.device.type])]


def ffn_cases(s: Settings) -> Iterator[Case]:
    training = s.mode == "fwd+bwd"
    p = 0.1 if training else 0.0

    def build(shape: dict) -> Case:
        tokens, model, hidden = shape["tokens"], shape["d_model"], shape["d_ff"]
        (activation, approximate), act = FFN_ACTIVATIONS[shape.get("activation", "gelu")]
        make = lambda *size, scale=1.0: (torch.randn(*size, device=s.device) * scale).to(s.dtype).requires_grad_(training)  # noqa: E731
        x = make(tokens, model)
        w1, b1 = make(hidden, model, scale=model**-0.5), make(hidden)
        w2, b2 = make(model, hidden, scale=hidden**-0.5), make(model)
        grad = torch.randn_like(x) if training else None
        flops = harness.ffn_flops(tokens, model, hidden, mode=s.mode)
        names, skipped = _fused_backends("ffn", backends.Inputs(s.device, s.dtype, {"gemm_dim": max(tokens, model, hidden)}), s.backends)

        def eager() -> torch.Tensor:
            h = act(F.linear(x, w1, b1))
            return F.dropout(F.linear(h, w2, b2), p, training=training)

        impls: dict[str, Callable[[], object]] = {
            "torch": _runner(eager, grad),
            "reference": _runner(lambda: fused_attn.reference.ffn(x, w1, b1, w2, b2, approximate, p,
                                                                  activation=activation), grad),
        }
        compiled = _compiled(s, fused_attn.reference.ffn, x, w1, b1, w2, b2, approximate, p, activation=activation)
        _add_optional(impls, skipped, grad, [("compiled", compiled)])
        impls.update(_fused_runners("ffn", names, grad,
                                    lambda backend: fused_attn.ffn(x, w1, b1, w2, b2, approximate, p,
                                                                   activation=activation, backend=backend)))
        if training:
            skipped["apex"] = "apex's fused dense has no dropout: compared in inference only"
        elif activation == "relu":
            skipped["apex"] = "apex's fused dense has a GELU only"
        else:
            _add_optional(impls, skipped, grad, third_party.ffn(x, w1, b1, w2, b2))
        return Case("ffn", shape, s.dtype, s.mode, impls, skipped, flops=flops)

    return _cases(ffn_shapes(s), build)


def add_layer_norm_shapes(s: Settings) -> list[dict]:
    rows = s.rows or LAYER_NORM_ROWS[s.device.type]
    return [{"rows": rows, "hidden": hidden} for hidden in s.hiddens or LAYER_NORM_HIDDEN[s.device.type][:2]]


def add_layer_norm_cases(s: Settings) -> Iterator[Case]:
    training = s.mode == "fwd+bwd"
    p = 0.1 if training else 0.0

    def build(shape: dict) -> Case:
        rows, hidden = shape["rows"], shape["hidden"]
        make = lambda *size: torch.randn(*size, device=s.device, dtype=s.dtype, requires_grad=training)  # noqa: E731
        x, res = make(rows, hidden), make(rows, hidden)
        w, b, ib = make(hidden), make(hidden), make(hidden)
        grad = torch.randn_like(x) if training else None
        # Inference reads x and the residual and writes the output; training's forward also writes
        # the pre-norm sum, and its backward reads dy and that sum and writes the input's and the
        # residual's gradients.
        tensors = 8 if training else 3
        moved = rows * hidden * x.element_size() * tensors
        names, skipped = _fused_backends("add_layer_norm", backends.Inputs(s.device, s.dtype, {"hidden": hidden}), s.backends)
        impls: dict[str, Callable[[], object]] = {
            "torch": _runner(lambda: F.layer_norm(res + F.dropout(x + ib, p, training=training), (hidden,), w, b), grad),
            "reference": _runner(lambda: fused_attn.reference.add_layer_norm(x, res, w, b, 1e-5, p, ib), grad),
            "copy": _copy(moved, x),
        }
        compiled = _compiled(s, fused_attn.reference.add_layer_norm, x, res, w, b, 1e-5, p, ib)
        _add_optional(impls, skipped, grad, [("compiled", compiled)])
        impls.update(_fused_runners(
            "add_layer_norm", names, grad,
            lambda backend: fused_attn.add_layer_norm(x, res, w, b, 1e-5, p, ib, backend=backend),
        ))
        return Case("add_layer_norm", shape, s.dtype, s.mode, impls, skipped, min_bytes=moved)

    return _cases(add_layer_norm_shapes(s), build)


# ---------------------------------------------------------------------------------------------
# Whole models

# (model, layers, batch, seq) per device: on a CPU a small BERT and two BERT-base layers of
# Hugging Face's, each a few seconds per training step; on a GPU BERT-base at a usual
# fine-tuning size, ours and Hugging Face's. The last of each is a single short sequence, as
# served online: its kernels are small, so the host's time per op call bounds it (the package's
# own per-call overhead shows there, not in the large cases).
MODEL_SHAPES = {
    "cpu": [("bert-mini", None, 8, 256), ("hf-bert", 2, 4, 256), ("bert-tiny", None, 1, 32)],
    "cuda": [("bert-base", None, 32, 512), ("hf-bert", None, 32, 512), ("bert-base", None, 1, 128)],
}


def _model_step(model: torch.nn.Module, step: Callable, training: bool) -> Callable[[], object]:
    if not training:
        model.eval()

        def infer() -> None:
            with torch.no_grad():
                step(model)

        return infer
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

    def train() -> None:
        step(model).float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return train


def model_shapes(s: Settings) -> list[dict]:
    """One per (model, seq): ``layers`` None for the model's own count (filled in once it is built;
    the Transformer's is per stack, encoder and decoder each)."""
    defaults = [(m, None, 8, 256) for m in s.models] if s.models else MODEL_SHAPES[s.device.type]
    return [{"model": name, "layers": s.layers or layers, "batch": s.batch or batch, "seq": seq,
             **({"padding": s.padding} if s.padding is not None else {})}
            for name, layers, batch, default_seq in defaults for seq in s.seqs or [default_seq]]


def model_cases(s: Settings) -> Iterator[Case]:
    """Reference BERT (and Hugging Face BERT when installed): plain, optimize()d, torch.compile()d.

    ``fwd`` is inference (eval mode, no autograd); ``fwd+bwd`` a training step (dropout on,
    forward, backward, SGD update).
    """
    training = s.mode == "fwd+bwd"

    def build(shape: dict) -> Case:
        try:
            w = workloads.build(shape["model"], batch=shape["batch"], seq=shape["seq"], layers=shape["layers"],
                                device=s.device, dtype=s.dtype, training=training, padding=shape.get("padding"))
        except workloads.WorkloadUnavailable as exc:
            names = ["plain", "optimized"] + (["compiled"] if s.compile or s.compile_skipped else [])
            return Case("model", shape, s.dtype, s.mode, {}, {impl: str(exc) for impl in names}, baseline="plain")
        shape = {**shape, "layers": w.layers}
        impls = {
            "plain": _model_step(w.model, w.step, training),
            "optimized": _model_step(workloads.optimized(w), w.step, training),
        }
        skipped = {}
        if s.compile:
            impls["compiled"] = _model_step(torch.compile(w.model), w.step, training)
        elif s.compile_skipped:
            skipped["compiled"] = s.compile_skipped
        return Case("model", shape, s.dtype, s.mode, impls, skipped, tokens=w.tokens, baseline="plain")

    return _cases(model_shapes(s), build)


SUITES: dict[str, Callable[[Settings], Iterator[Case]]] = {
    "add_layer_norm": add_layer_norm_cases,
    "attention": attention_cases,
    "ffn": ffn_cases,
    "layer_norm": layer_norm_cases,
    "model": model_cases,
    "softmax": softmax_cases,
}

# Each suite's case shapes, in the order its cases run.
SHAPES: dict[str, Callable[[Settings], list[dict]]] = {
    "add_layer_norm": add_layer_norm_shapes,
    "attention": attention_shapes,
    "ffn": ffn_shapes,
    "layer_norm": layer_norm_shapes,
    "model": model_shapes,
    "softmax": softmax_shapes,
}
