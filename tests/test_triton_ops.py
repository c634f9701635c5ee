"""The Triton custom ops called directly (``torch.ops.fused_attn.triton_*``), as a user composing
them or a graph compiler does: each malformed argument raises a RuntimeError naming it, before any
kernel runs, where the kernels would read out of bounds or compute silently wrong; and the
extension's op of the same signature refuses the same call. The sweep's calls run in a child
process (tests/isolated.py), so that one that crashes fails its case. (Through the public ops the
arguments are validated first: tests/test_bad_input.py.)
"""

from __future__ import annotations

import functools
import re

import pytest
import torch

import fused_attn  # noqa: F401  (registers the ops)
from fused_attn import _extension
from fused_attn._env import triton_interpret_mode

from . import isolated

pytestmark = pytest.mark.skipif(not triton_interpret_mode(),
                                reason="the Triton ops run on the CPU under TRITON_INTERPRET=1")
ops = torch.ops.fused_attn
SEED = torch.tensor([7])
T3, T5 = [True] * 3, [True] * 5


_GEN = torch.Generator().manual_seed(0)


def _randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=_GEN, dtype=dtype)


def _stats(rows):
    return torch.zeros(rows), torch.ones(rows)


# The malformed dropout seeds of an op whose well-formed call has dropout.
def _bad_seeds():
    return [
        ("seed", None, r"seed must be given when dropout_p > 0: an int64 tensor with one element"),
        ("seed", torch.tensor([7.0]), r"seed must be an int64 tensor with one element, got float32 of shape \[1\]"),
        ("seed", torch.tensor([7, 8]), r"seed must be an int64 tensor with one element, got int64 of shape \[2\]"),
    ]


# Per op: the well-formed call's arguments by name (in schema order), and malformed ones, each
# (argument, bad value, the Triton op's message). Values are built lazily (_GEN is shared).
def _layer_norm():
    x = _randn(4, 16)
    mean, rstd = _stats(4)
    fwd = dict(input=x, weight=_randn(16), bias=_randn(16), eps=1e-5)
    bwd = dict(grad_out=_randn(4, 16), input=x, mean=mean, rstd=rstd, weight=_randn(16), output_mask=T3)
    return {
        "layer_norm_fwd": (fwd, [
            ("input", _randn(4, 16, 1), r"input must be 2-D \[rows, hidden\], got 3 dimensions"),
            ("input", _randn(16, 4).t(), "input must be contiguous"),
            ("input", _randn(4, 16, dtype=torch.float64), "input must be float32, float16 or bfloat16, got float64"),
            ("weight", _randn(5), r"weight must have shape \[16\], got \[5\]"),
            ("weight", _randn(16, 1), r"weight must have shape \[16\], got \[16, 1\]"),
            ("weight", _randn(32)[::2], "weight must be contiguous"),
            ("weight", _randn(16, dtype=torch.float64), "weight must have dtype float32"),
            ("bias", _randn(17), r"bias must have shape \[16\], got \[17\]"),
            ("eps", -1.0, r"eps must be finite and >= 0, got -1.0"),
            ("eps", float("nan"), "eps must be finite and >= 0, got nan"),
        ]),
        "layer_norm_bwd": (bwd, [
            ("grad_out", _randn(4, 15), r"grad_out must have the shape of input \[4, 16\], got \[4, 15\]"),
            ("grad_out", _randn(4, 16, dtype=torch.float16), "grad_out must have dtype float32, got float16"),
            ("grad_out", _randn(16, 4).t(), "grad_out must be contiguous"),
            ("mean", torch.zeros(3), r"mean must have shape \[4\], got \[3\]"),
            ("rstd", torch.ones(4, dtype=torch.float16), "rstd must be float32, got float16"),
            ("mean", torch.zeros(8)[::2], "mean must be contiguous"),
            ("weight", _randn(5), r"weight must have shape \[16\]"),
            ("weight", None, r"output_mask\[1\] asks for grad_weight, which requires a weight, but weight is None"),
        ]),
    }


def _add_layer_norm():
    x = _randn(4, 16)
    mean, rstd = _stats(4)
    fwd = dict(input=x, residual=_randn(4, 16), weight=_randn(16), bias=_randn(16), input_bias=_randn(16), eps=1e-5,
               dropout_p=0.25, seed=SEED)
    bad_fwd = [
        ("input", _randn(4, 16, 2), r"input must be 2-D \[rows, hidden\]"),
        ("residual", _randn(4, 15), r"residual must have the shape of input \[4, 16\], got \[4, 15\]"),
        ("residual", _randn(4, 16, dtype=torch.float16), "residual must have dtype float32, got float16"),
        ("weight", _randn(15), r"weight must have shape \[16\]"),
        ("bias", _randn(16, dtype=torch.float16), "bias must have dtype float32"),
        ("input_bias", _randn(8), r"input_bias must have shape \[16\], got \[8\]"),
        ("input_bias", _randn(16, dtype=torch.float64), "input_bias must have dtype float32 like the input"),
        ("eps", float("inf"), "eps must be finite and >= 0"),
        ("dropout_p", 1.0, r"dropout_p must be in \[0, 1\), got 1.0"),
        ("dropout_p", float("nan"), r"dropout_p must be in \[0, 1\), got nan"),
        *_bad_seeds(),
    ]
    bwd = dict(grad_out=_randn(4, 16), grad_prenorm=_randn(4, 16), prenorm=x, mean=mean, rstd=rstd, weight=_randn(16),
               dropout_p=0.25, seed=SEED, output_mask=T5)
    return {
        "add_layer_norm_fwd": (fwd, bad_fwd),
        "add_layer_norm_inference": (fwd, bad_fwd),
        "add_layer_norm_bwd": (bwd, [
            ("prenorm", _randn(4), r"prenorm must be 2-D \[rows, hidden\], got 1 dimensions"),
            ("grad_out", _randn(5, 16), r"grad_out must have the shape of prenorm \[4, 16\], got \[5, 16\]"),
            ("grad_prenorm", _randn(4, 8), r"grad_prenorm must have the shape of prenorm \[4, 16\], got \[4, 8\]"),
            ("mean", torch.zeros(4, 1), r"mean must have shape \[4\], got \[4, 1\]"),
            ("weight", _randn(8), r"weight must have shape \[16\]"),
            ("weight", None, r"output_mask\[2\] asks for grad_weight"),
            ("dropout_p", -0.5, r"dropout_p must be in \[0, 1\)"),
            *_bad_seeds(),
        ]),
    }


def _attention():
    q, k, v = _randn(2, 4, 8, 16), _randn(2, 2, 12, 16), _randn(2, 2, 12, 8)
    fwd = dict(query=q, key=k, value=v, attn_mask=_randn(2, 1, 1, 12).expand(2, 4, 8, 12), scale=0.25,
               is_causal=False, dropout_p=0.25, seed=SEED)
    bad_fwd = [
        ("query", _randn(2, 8, 16), r"query must be 4-D \[batch, heads, seq, head_dim\], got 3 dimensions"),
        ("query", q.double(), "query must be float32, float16 or bfloat16, got float64"),
        ("key", k.half(), "key must have dtype float32 like query, got float16"),
        ("key", _randn(1, 2, 12, 16), r"key and value must have query's batch and heads \[2, 4\] \(or, grouped"),
        ("key", _randn(2, 3, 12, 16), "key and value must have query's batch and heads"),
        ("value", _randn(2, 1, 12, 8), "key and value must have query's batch and heads"),
        ("key", _randn(2, 2, 12, 8), "key head_dim 8 must equal query head_dim 16"),
        ("value", _randn(2, 2, 11, 8), "value length 11 must equal key length 12"),
        ("value", _randn(2, 2, 12, 16)[..., ::2], "value must have a unit stride along head_dim, got strides"),
        ("attn_mask", _randn(2, 4, 8), r"attn_mask must be expanded to \[batch, heads, q_len, k_len\] = "
                                       r"\[2, 4, 8, 12\], got \[2, 4, 8\]"),
        ("attn_mask", _randn(2, 1, 1, 12), r"attn_mask must be expanded to .* got \[2, 1, 1, 12\]"),
        ("attn_mask", torch.zeros(2, 4, 8, 12, dtype=torch.int32),
         "attn_mask must be bool, float32, float16, bfloat16 or float64, got int32"),
        ("scale", float("inf"), "scale must be finite, got inf"),
        ("dropout_p", 1.0, r"dropout_p must be in \[0, 1\)"),
        *_bad_seeds(),
    ]
    bwd = dict(grad_out=_randn(2, 4, 8, 8), **{n: fwd[n] for n in ("query", "key", "value", "attn_mask")},
               stats=torch.zeros(2, 4, 2, 8), scale=0.25, is_causal=True, dropout_p=0.25, seed=SEED,
               mask_needs_grad=False)
    return {
        "attention_fwd": (fwd, bad_fwd),
        "attention_bwd": (bwd, [
            *bad_fwd,
            ("grad_out", _randn(2, 4, 8, 16), r"grad_out must have shape \[2, 4, 8, 8\], got \[2, 4, 8, 16\]"),
            ("grad_out", _randn(2, 4, 8, 8, dtype=torch.float16), "grad_out must have dtype float32, got float16"),
            ("grad_out", _randn(2, 4, 8, 16)[..., ::2], "grad_out must have a unit stride along its last dim"),
            ("stats", torch.zeros(2, 4, 8), r"stats must have shape \[2, 4, 2, 8\] \(the Triton forward's row "
                                            r"statistics\), got \[2, 4, 8\]"),
            ("stats", torch.zeros(2, 4, 2, 8, dtype=torch.float16), "stats must be float32, got float16"),
            ("stats", torch.zeros(2, 4, 8, 2).transpose(2, 3), "stats must be a contiguous tensor on cpu"),
        ]),
    }


def _softmax():
    x = _randn(2, 3, 4, 5)
    y = torch.softmax(x, -1)
    return {
        "softmax_fwd": (dict(input=x, mask=_randn(2, 3, 4, 5) > 0, scale=0.5, is_causal=True), [
            ("input", _randn(3, 4, 5), r"input must be 4-D \[A, B, M, N\], got 3 dimensions"),
            ("input", x.double(), "input must be float32, float16 or bfloat16, got float64"),
            ("mask", _randn(2, 3, 4) > 0,
             r"mask must be expanded to the input's shape \[2, 3, 4, 5\], got \[2, 3, 4\]"),
            ("mask", torch.ones(1, 1, 1, 5, dtype=torch.bool), r"mask must be expanded to the input's shape"),
            ("mask", torch.zeros(2, 3, 4, 5, dtype=torch.int64),
             "mask must be bool, float32, float16, bfloat16 or float64, got int64"),
            ("scale", float("nan"), "scale must be finite, got nan"),
        ]),
        "softmax_bwd": (dict(grad_out=_randn(2, 3, 4, 5), output=y, scale=0.5, mask_needs_grad=True), [
            ("grad_out", _randn(2, 3, 4, 6),
             r"grad_out must have the shape of output \[2, 3, 4, 5\], got \[2, 3, 4, 6\]"),
            ("grad_out", _randn(2, 3, 4, 5, dtype=torch.float16), "grad_out must have dtype float32, got float16"),
            ("output", torch.tensor(1.0), "output must have at least 1 dimension"),
            ("output", y.double(), "output must be float32, float16 or bfloat16, got float64"),
            ("scale", float("-inf"), "scale must be finite, got -inf"),
        ]),
    }


def _linear_gelu():
    x, w = _randn(6, 8), _randn(12, 8)
    fwd = dict(input=x, weight=w, bias=_randn(12), approximate="none")
    bad_fwd = [
        ("input", _randn(6, 8, 1), r"input must be 2-D \[rows, hidden\]"),
        ("input", _randn(8, 6).t(), "input must be contiguous"),
        ("input", x.double(), "input must be float32, float16 or bfloat16, got float64"),
        ("weight", _randn(12, 7),
         r"weight must have shape \[out_features, 8\] \(in_features of the input\), got \[12, 7\]"),
        ("weight", _randn(8), r"weight must have shape \[out_features, 8\]"),
        ("weight", w.half(), "weight must have dtype float32 like the input, got float16"),
        ("bias", _randn(11), r"bias must have shape \[12\], got \[11\]"),
        ("bias", _randn(12, dtype=torch.float64), "bias must have dtype float32 like the input, got float64"),
        ("approximate", "exact", 'approximate must be "none", "tanh" or "relu", got "exact"'),
    ]
    bwd = dict(grad_out=_randn(6, 12), input=x, weight=w, pre_activation=_randn(6, 12), approximate="tanh",
               output_mask=T3)
    return {
        "linear_gelu_fwd": (fwd, bad_fwd),
        "linear_gelu_inference": (fwd, bad_fwd),
        "linear_gelu_bwd": (bwd, [
            ("grad_out", _randn(6, 11),
             r"grad_out must have shape \[6, 12\] \(\[rows of input, out_features of weight\]\)"),
            ("grad_out", _randn(12, 6).t(), "grad_out must be contiguous"),
            ("grad_out", _randn(6, 12, dtype=torch.float16), "grad_out must have dtype float32 like the input"),
            ("pre_activation", _randn(6, 11),
             r"pre_activation must have the shape of grad_out \[6, 12\], got \[6, 11\]"),
            ("pre_activation", _randn(6, 12, dtype=torch.float16),
             "pre_activation must have dtype float32, got float16"),
            ("weight", _randn(12, 7), r"weight must have shape \[out_features, 8\]"),
            ("input", _randn(6), r"input must be 2-D \[rows, hidden\]"),
            ("approximate", "", 'approximate must be "none", "tanh" or "relu", got ""'),
        ]),
    }


def _ffn():
    x, w1, w2 = _randn(6, 8), _randn(12, 8), _randn(5, 12)
    inference = dict(input=x, w1=w1, b1=_randn(12), w2=w2, b2=_randn(5), approximate="none")
    bad = [
        ("input", _randn(6, 8, 1), r"input must be 2-D \[rows, hidden\]"),
        ("w1", _randn(12, 7), r"w1 must have shape \[out_features, 8\] \(in_features of the input\)"),
        ("w1", w1.half(), "w1 must have dtype float32 like the input"),
        ("b1", _randn(11), r"b1 must have shape \[12\] \(hidden features of w1\), got \[11\]"),
        ("w2", _randn(5, 11), r"w2 must have shape \[out_features, 12\] \(hidden features of w1\), got \[5, 11\]"),
        ("w2", _randn(12), r"w2 must have shape \[out_features, 12\]"),
        ("w2", w2.double(), "w2 must have dtype float32 like the input, got float64"),
        ("b2", _randn(4), r"b2 must have shape \[5\] \(out_features of w2\), got \[4\]"),
        ("b2", _randn(1, 5), r"b2 must have shape \[5\] \(out_features of w2\), got \[1, 5\]"),
        ("approximate", "gelu", 'approximate must be "none", "tanh" or "relu"'),
    ]
    bwd = dict(grad_out=_randn(6, 5), input=x, w1=w1, w2=w2, pre_activation=_randn(6, 12), approximate="none",
               dropout_p=0.25, seed=SEED, output_mask=T5)
    return {
        "ffn_fwd": ({**inference, "dropout_p": 0.25, "seed": SEED},
                    [*bad, ("dropout_p", 1.5, r"dropout_p must be in \[0, 1\), got 1.5"), *_bad_seeds()]),
        "ffn_inference": (inference, bad),
        "ffn_bwd": (bwd, [
            ("grad_out", _randn(6, 4), r"grad_out must have shape \[6, 5\] \(\[rows of input, out_features of w2\]\)"),
            ("grad_out", _randn(7, 5), r"grad_out must have shape \[6, 5\]"),
            ("grad_out", _randn(6, 5, dtype=torch.float16), "grad_out must have dtype float32 like the input"),
            ("pre_activation", _randn(6, 11), r"pre_activation must have shape \[6, 12\], got \[6, 11\]"),
            ("pre_activation", _randn(12, 6).t(), "pre_activation must be contiguous"),
            ("w1", _randn(12, 7), r"w1 must have shape \[out_features, 8\]"),
            ("w2", _randn(5, 11), r"w2 must have shape \[out_features, 12\] \(hidden features of w1\)"),
            ("input", _randn(8, 6).t(), "input must be contiguous"),
            ("dropout_p", 1.0, r"dropout_p must be in \[0, 1\)"),
            *_bad_seeds(),
        ]),
    }


def _all_ops():
    ops_ = {}
    for family in (_layer_norm, _add_layer_norm, _attention, _softmax, _linear_gelu, _ffn):
        ops_.update(family())
    return ops_


OPS = _all_ops()
# Case names: "{op}-ok" the well-formed call, "{op}-{i}" its i-th malformed one.
CASES = {f"{op}-ok": (op, None) for op in OPS} | {
    f"{op}-{i}": (op, i) for op, (_, bad) in OPS.items() for i in range(len(bad))
}


def _native_args(op: str, args: dict) -> dict | None:
    """The extension's op's arguments for the same call: the CPU attention backward reads the
    log-sum-exp [B, H, Lq] where the Triton one reads [B, H, 2, Lq] (and a malformed one is named
    otherwise: no comparison)."""
    if op != "attention_bwd":
        return args
    if args["stats"].shape != (2, 4, 2, 8) or args["stats"].dtype != torch.float32 or not args["stats"].is_contiguous():
        return None
    return {**{k: v for k, v in args.items() if k != "stats"}, "lse": torch.zeros(2, 4, 8)}


def _refused(call, message: str) -> None:
    try:
        call()
    except RuntimeError as err:
        if not re.search(message, str(err)):
            raise AssertionError(f"the message {str(err)!r} does not match {message!r}") from None
        return
    raise AssertionError("no RuntimeError was raised")


# The extension's forms of a backward that write over an argument (csrc/ops.cpp), the same checks.
NATIVE_VARIANTS = {"linear_gelu_bwd": ("linear_gelu_bwd_scratch", "linear_gelu_bwd_consuming"),
                   "ffn_bwd": ("ffn_bwd_consuming",)}


def check_case(name: str) -> None:
    """One case, run in a child process (tests/isolated.py): the well-formed call runs (the
    malformed ones differ from it in one argument each); a malformed one is refused, naming the
    argument, by the Triton op (in the words given) and by the extension's ops of the same
    signature (in their own)."""
    op, index = CASES[name]
    args, bad = OPS[op]
    if index is not None:
        arg, value, message = bad[index]
        args = {**args, arg: value}
    native = _native_args(op, args) if _extension.loaded() else None
    native_ops = () if native is None else (op, *NATIVE_VARIANTS.get(op, ()))
    if index is None:
        getattr(ops, f"triton_{op}")(**args)
        for native_op in native_ops:  # on copies: the variants write over grad_out or pre_activation
            getattr(ops, native_op)(**{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in native.items()})
        return
    _refused(lambda: getattr(ops, f"triton_{op}")(**args), message)
    for native_op in native_ops:
        _refused(lambda: getattr(ops, native_op)(**native), re.escape(arg))


@functools.cache
def _results() -> dict[str, dict]:
    child = f"from tests.test_triton_ops import check_case\nfrom tests.isolated import report_cases\n" \
            f"report_cases(check_case, names, {__file__!r})"
    return isolated.run_cases(child, list(CASES))


def test_every_triton_op_has_its_cases():
    triton_ops = {name.removeprefix("triton_") for name in dir(ops) if name.startswith("triton_")}
    assert triton_ops == set(OPS)


def _case_id(name: str) -> str:
    op, index = CASES[name]
    return name if index is None else f"{op}-{OPS[op][1][index][0]}-{index}"


@pytest.mark.parametrize("name", list(CASES), ids=[_case_id(n) for n in CASES])
def test_direct_call(name):
    """Each case in a child process: an op that crashed (as the malformed calls did, reading out of
    bounds) fails its case instead of the session."""
    result = _results()[name]
    assert result["ok"], result["detail"]


@pytest.mark.parametrize("op, count", [("layer_norm_bwd", 3), ("linear_gelu_bwd", 3), ("ffn_bwd", 5),
                                       ("add_layer_norm_bwd", 5)])
def test_output_mask_has_one_entry_per_gradient(op, count):
    args, _ = OPS[op]
    with pytest.raises(RuntimeError, match=f"output_mask must have {count} entries, got 2"):
        getattr(ops, f"triton_{op}")(**{**args, "output_mask": [True, True]})


def test_head_dims_outside_the_declared_limits_are_refused():
    """The limits the backend declares (ops.attention.GPU_LIMITS: 1 to 256), checked by the op too."""
    empty = _randn(1, 1, 4, 0)
    with pytest.raises(RuntimeError, match="serve head dims 1 to 256, got head_dim 0 and value head_dim 0"):
        ops.triton_attention_fwd(empty, empty, empty, None, 0.1, False, 0.0, None)
    q = _randn(1, 1, 4, 264)
    with pytest.raises(RuntimeError, match="the Triton attention kernels serve head dims 1 to 256, got head_dim 264"):
        ops.triton_attention_fwd(q, q, q, None, 0.1, False, 0.0, None)
    with pytest.raises(RuntimeError, match="value head_dim 300"):
        ops.triton_attention_fwd(q[..., :8], q[..., :8], _randn(1, 1, 4, 300), None, 0.1, False, 0.0, None)


def test_cpu_tensors_are_refused_outside_the_interpreter(monkeypatch):
    """Without TRITON_INTERPRET=1 the kernels would be compiled for the GPU and handed CPU pointers."""
    args, _ = OPS["layer_norm_fwd"]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="input is on cpu, where the Triton kernels do not run: Triton runs on CPU "
                                           "tensors only under TRITON_INTERPRET=1"):
        ops.triton_layer_norm_fwd(**args)


def test_softmax_backward_of_a_permuted_output_reads_it_as_it_is():
    """The kernel reads rows contiguously: a dense permuted output was read in memory order, giving
    gradients of other elements, with no error."""
    y = torch.softmax(_randn(2, 4, 3, 5), -1).permute(0, 2, 1, 3)
    g = _randn(2, 3, 4, 5)
    want = ops.triton_softmax_bwd(g, y.contiguous(), 0.5, True)
    got = ops.triton_softmax_bwd(g.transpose(1, 2).contiguous().transpose(1, 2), y, 0.5, True)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    ref = (y * (g - (g * y).sum(-1, keepdim=True))) * 0.5
    torch.testing.assert_close(got[0], ref)
