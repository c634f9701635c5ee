"""Shared test machinery: the parity helper and the backend matrix.

Parity: the reference runs in float64 as the truth; the fused op and the plain reference both run
in the low precision under test; the fused error (max |fused - truth|) must stay within
``factor`` times the plain error plus a floor of one unit in the last place at the tensor's own
scale (its largest true magnitude). The same holds for every input gradient, with the same
upstream gradient (rounded to the low precision, so that its rounding is charged to no one) for
all three. A tensor that is zero in exact arithmetic (e.g. dQ with a single key, where the
kernel's ``rowsum(dO * O)`` and ``dO @ V^T`` round differently) takes its floor from the
problem's scale (the largest magnitude among the true output and gradients, at least 1): it is
judged at the scale of the terms that cancel, not at zero. Where the plain implementation itself
breaks down (inf or NaN in low precision where the truth is finite), the fused result must be
within ``factor`` ulps of each such true element instead of being let off. Seeded random cases and
whole models are judged over a few perturbed copies of the problem at once (``draws``), each error
by its largest over them, so that the plain error is its usual level rather than one lucky draw.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import tempfile
from collections.abc import Callable

import pytest
import torch

from fused_attn import backends

HAS_CUDA = torch.cuda.is_available()


def pytest_configure(config):
    """The suite compiles into an Inductor cache of its own. torch.compile's on-disk caches
    (Inductor's FX graphs and AOTAutograd's, under ``TORCHINDUCTOR_CACHE_DIR``) key a graph on
    the ops it calls, not on the code behind them: the package's cache key tag
    (fused_attn._compile_cache) keeps another version's graphs apart, and a fresh directory also
    keeps the tests from checking a cache instead of the code where torch has no such tag."""
    directory = tempfile.mkdtemp(prefix="fused_attn_inductor_")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = directory
    config.add_cleanup(lambda: shutil.rmtree(directory, ignore_errors=True))


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)
    if os.environ.get("FUSED_ATTN_TEST_ORDER") == "spread":
        items[:] = [items[i] for i in spread_order([item.nodeid for item in items])]


def spread_order(node_ids: list[str]) -> list[int]:
    """Indices of ``node_ids`` in the order FUSED_ATTN_TEST_ORDER=spread runs them (``make gpu-check``,
    whose time limit may stop a run part way): in rounds, round k taking the k-th case of every test
    function, the functions in their collection order, so that a run stopped early has tried every
    function; each function's cases taken in bit-reversed order of their index (0, n/2, n/4, 3n/4,
    ...), so that its first rounds sample its whole parameter grid (dtypes, backends, shapes) rather
    than its first few points."""
    cases: dict[str, list[int]] = {}
    for index, node_id in enumerate(node_ids):
        cases.setdefault(node_id.split("[", 1)[0], []).append(index)
    rounds: list[list[int]] = []
    for indices in cases.values():
        bits = max(len(indices) - 1, 0).bit_length()
        spread = sorted(range(len(indices)), key=lambda i: int(f"{i:0{bits}b}"[::-1] or "0", 2))
        for k, i in enumerate(spread):
            if k == len(rounds):
                rounds.append([])
            rounds[k].append(indices[i])
    return [index for round_ in rounds for index in round_]


def native_ops() -> list[str]:
    """The extension's ops (csrc/ops.cpp), which need a kernel per device, an autograd kernel and an
    autocast one: the fused_attn ops other than the Triton ops and the composite ones registered
    from Python (fused_attn/ops/_second_order.py's, which decompose into torch ops)."""
    names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("fused_attn::")]
    composite = {n for n in names if torch._C._dispatch_has_kernel_for_dispatch_key(n, "CompositeImplicitAutograd")}
    return sorted(n.split("::", 1)[1] for n in names if n not in composite and not n.startswith("fused_attn::triton_"))


def backend_params(op: str, *, exclude: tuple[str, ...] = ()) -> list:
    """(backend, device) pairs for ``op``, from its own declarations; unavailable ones skip with why."""
    params = []
    for name, support in backends.registered_ops()[op].supports.items():
        if name in exclude:
            continue
        for device in support.devices or ("cpu", "cuda"):  # any device: tested on these
            marks = [pytest.mark.cuda] if device == "cuda" else []
            if device == "cpu" or HAS_CUDA:
                reasons = support.unavailable_reasons(torch.device(device))
                if reasons:
                    marks.append(pytest.mark.skip(reason="; ".join(reasons)))
            params.append(pytest.param((name, device), marks=marks, id=f"{name}-{device}"))
    return params


def supported_dtypes(backend: str, device: str, op: str | None = None) -> tuple[torch.dtype, ...]:
    """Dtypes to test a backend in: those ``op``'s declaration gives it (when ``op`` is named);
    under the Triton interpreter bf16 is left to GPU runs."""
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    if backend == "triton" and device == "cpu":
        dtypes = (torch.float32, torch.float16)
    if op is not None:
        declared = backends.registered_ops()[op].supports[backend].dtypes
        dtypes = tuple(d for d in dtypes if d in declared)
    return dtypes


def work_dtype(op: str, backend: str, device: str) -> torch.dtype:
    """The dtype for a test of semantics rather than precision: float32 where ``backend`` serves
    it, else float16 (e.g. tensor-core-only CUDA kernels)."""
    return supported_dtypes(backend, device, op)[0]


@dataclasses.dataclass
class ParityReport:
    name: str
    fused_err: float
    plain_err: float
    bound: float

    def __str__(self) -> str:
        return f"{self.name}: fused err {self.fused_err:.3g}, plain err {self.plain_err:.3g}, bound {self.bound:.3g}"


def _max_err(value: torch.Tensor, truth: torch.Tensor) -> float:
    if value.shape != truth.shape:
        raise AssertionError(f"shape {list(value.shape)} != reference shape {list(truth.shape)}")
    if truth.numel() == 0:
        return 0.0
    value = value.detach().double()
    truth = truth.detach().double()
    diff = (value - truth).abs()
    # NaN and infinities must sit exactly where the reference has the same (an inf of the same
    # sign is exact), and count as an infinite error elsewhere.
    same = (torch.isnan(value) & torch.isnan(truth)) | (torch.isinf(truth) & (value == truth))
    diff = torch.where(same, torch.zeros_like(diff), diff)
    return float(torch.nan_to_num(diff, nan=float("inf")).max())


def _magnitude(t: torch.Tensor) -> float:
    """The largest finite |t| (0 when there is none)."""
    finite = t.detach()[torch.isfinite(t.detach())]
    return float(finite.abs().max()) if finite.numel() else 0.0


def check_tensor_parity(
    name: str, value: torch.Tensor, plain_value: torch.Tensor, true_value: torch.Tensor, *,
    factor: float, problem_scale: float,
) -> ParityReport:
    """One tensor's parity (see the module docstring); returns its report, raises AssertionError."""
    report = tensor_errors(name, value, plain_value, true_value, factor=factor, problem_scale=problem_scale)
    assert report.fused_err <= report.bound, str(report)
    return report


def tensor_errors(
    name: str, value: torch.Tensor, plain_value: torch.Tensor, true_value: torch.Tensor, *,
    factor: float, problem_scale: float,
) -> ParityReport:
    """:func:`check_tensor_parity`'s report without its final judgment (where the plain
    implementation overflows, the fused one is judged here already)."""
    value, plain_value, true_value = value.detach(), plain_value.detach(), true_value.detach().double()
    eps = torch.finfo(value.dtype).eps
    own = _magnitude(true_value)
    floor = eps * (own if own > eps * problem_scale else problem_scale)
    plain_broken = torch.isfinite(true_value) & ~torch.isfinite(plain_value)
    if bool(plain_broken.any()):
        err = (value.double() - true_value).abs()[plain_broken]
        allowed = factor * eps * true_value.abs()[plain_broken] + floor
        bad = ~(err <= allowed)  # NaN fails
        assert not bool(bad.any()), (
            f"{name}: where the plain implementation overflows, fused err {float(err[bad][0]):.3g} at true value "
            f"{float(true_value[plain_broken][bad][0]):.3g} (allowed {float(allowed[bad][0]):.3g})"
        )
        # The rest is judged against what the plain implementation does where it works.
        value, plain_value = (torch.where(plain_broken, true_value, t.double()) for t in (value, plain_value))
    fused_err, plain_err = _max_err(value, true_value), _max_err(plain_value, true_value)
    return ParityReport(name, fused_err, plain_err, factor * plain_err + floor)


def assert_parity(
    fused: Callable[..., torch.Tensor],
    plain: Callable[..., torch.Tensor],
    args: dict[str, object],
    *,
    grad_args: tuple[str, ...] = (),
    factor: float = 3.0,
    seed: int = 0,
    draws: int = 1,
) -> list[ParityReport]:
    """Checks ``fused(**args)`` against ``plain`` run in float64 (truth) and in the args' precision.

    ``args`` holds the low-precision inputs; the names in ``grad_args`` are differentiated.
    Returns the per-output reports (useful to print when tuning tolerances is tempting: don't).

    ``draws``: how many problems are judged together, as in :func:`assert_model_parity`: the given
    one and ``draws - 1`` more with every floating input multiplied by random factors
    1 + 8 eps N(0, 1) (eps of its dtype: a few of its roundings); each tensor is judged by its
    largest error over them, fused against plain. A result of one row or one feature is a handful
    of sums, whose plain error on one problem can be a lucky draw far below its usual one (a float32
    linear_gelu of one row and one output: plain 0.26 ulp, fused a usual 2).
    """
    reports: dict[str, ParityReport] = {}
    for draw in range(draws):
        problem = args if draw == 0 else _perturbed_args(args, draw)
        for report in _parity_reports(fused, plain, problem, grad_args, factor, seed):
            _merge_report(reports, report)
    return _judged(reports)


def _perturbed_args(args: dict[str, object], draw: int) -> dict[str, object]:
    """``args`` with each floating tensor multiplied by its own factors 1 + 8 eps N(0, 1)."""
    gen = torch.Generator().manual_seed(draw)
    out = {}
    for k, v in args.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            noise = 1 + 8 * torch.finfo(v.dtype).eps * torch.randn(v.shape, generator=gen, dtype=torch.float64)
            v = (v.detach().double() * noise.to(v.device)).to(v.dtype)
        out[k] = v
    return out


def _merge_report(reports: dict[str, ParityReport], report: ParityReport) -> None:
    """Keeps in ``reports`` each tensor's largest errors and bound over the problems judged together."""
    seen = reports.get(report.name)
    reports[report.name] = report if seen is None else ParityReport(
        report.name, max(seen.fused_err, report.fused_err), max(seen.plain_err, report.plain_err),
        max(seen.bound, report.bound))


def _judged(reports: dict[str, ParityReport]) -> list[ParityReport]:
    """The reports, each fused error within its bound (else AssertionError, the first in order)."""
    for report in reports.values():
        assert report.fused_err <= report.bound, str(report)
    return list(reports.values())


def _parity_reports(fused, plain, args, grad_args, factor, seed) -> list[ParityReport]:
    """:func:`assert_parity`'s reports of one problem (output first, then each gradient)."""

    def prepared(to64: bool) -> dict[str, object]:
        out = {}
        for k, v in args.items():
            if isinstance(v, torch.Tensor):
                v = v.detach()
                if to64 and v.is_floating_point():
                    v = v.double()
                v = v.clone().requires_grad_(k in grad_args)
            out[k] = v
        return out

    a64, a_plain, a_fused = prepared(True), prepared(False), prepared(False)
    truth = plain(**a64)
    out_plain = plain(**a_plain)
    out_fused = fused(**a_fused)
    dtype = out_fused.dtype
    assert out_plain.dtype == dtype, f"fused dtype {dtype} != reference dtype {out_plain.dtype}"

    problem_scale = max(1.0, _magnitude(truth))
    if grad_args:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        upstream = torch.randn(truth.shape, generator=gen, dtype=torch.float64).to(dtype).to(truth.device)
        truth.backward(upstream.double())
        out_plain.backward(upstream)
        out_fused.backward(upstream)
        for k in grad_args:
            assert a_fused[k].grad is not None, f"no gradient reached {k}"
            problem_scale = max(problem_scale, _magnitude(a64[k].grad))

    def check(name: str, value: torch.Tensor, plain_value: torch.Tensor, true_value: torch.Tensor) -> ParityReport:
        return tensor_errors(name, value, plain_value, true_value, factor=factor, problem_scale=problem_scale)

    reports = [check("output", out_fused, out_plain, truth)]
    reports += [check(f"grad {k}", a_fused[k].grad, a_plain[k].grad, a64[k].grad) for k in grad_args]
    return reports


def assert_elementwise_parity(
    name: str, value: torch.Tensor, plain_value: torch.Tensor, true_value: torch.Tensor, *, factor: float = 3.0
) -> None:
    """Parity element by element, for values spanning many magnitudes (where a bound set by the
    largest would hide every small one): |fused - truth| <= factor * |plain - truth| (where the
    plain value is finite) + 2 eps |truth| + the dtype's smallest normal, and NaN or an infinity
    exactly where the truth has it."""
    info = torch.finfo(value.dtype)
    value, plain_value, truth = value.detach().double(), plain_value.detach().double(), true_value.detach().double()
    assert value.shape == truth.shape, f"{name}: shape {list(value.shape)} != reference shape {list(truth.shape)}"
    special = ~torch.isfinite(truth)
    same = (torch.isnan(value) & torch.isnan(truth)) | (value == truth)
    assert bool(same[special].all()), f"{name}: {value[special & ~same].tolist()} where the truth is {truth[special & ~same].tolist()}"
    zero = torch.zeros_like(truth)
    plain_err = torch.where(torch.isfinite(plain_value), (plain_value - truth).abs(), zero)
    allowed = torch.where(special, zero, factor * plain_err + 2 * info.eps * truth.abs() + info.tiny)
    err = torch.where(special, zero, (value - truth).abs())
    bad = ~(err <= allowed)  # NaN fails
    assert not bool(bad.any()), (
        f"{name}: err {float(err[bad][0]):.3g} at true value {float(truth[bad][0]):.3g} (allowed {float(allowed[bad][0]):.3g})"
    )


def assert_float32_parameters_unrounded(
    norm: Callable[..., torch.Tensor],
    plain: Callable[..., torch.Tensor],
    inputs: dict[str, torch.Tensor],
    hidden: int,
    *,
    seed: int = 0,
) -> None:
    """A norm (``norm(**inputs, weight=, bias=)``; ``plain`` the same in plain torch, run in
    float64 for the truth) on float16/bfloat16 ``inputs`` with float32
    weight and bias reads them unrounded and gives their gradients as float32 sums: the output is
    the float64 truth rounded once to the inputs' dtype (a rare element one ulp off, where float32
    arithmetic lands on the other side of a rounding boundary), and the weight and bias gradients
    are float32 within float32 accuracy of the truth. Rounding the parameters to the inputs' dtype
    first changes about a third of the output; rounding their gradients, the gradients' every digit
    past the dtype's."""
    gen = torch.Generator().manual_seed(seed)
    device = next(iter(inputs.values())).device
    params = {
        "weight": (torch.randn(hidden, generator=gen) * 0.3 + 1).to(device),
        "bias": (torch.randn(hidden, generator=gen) * 0.3).to(device),
    }

    dtype = next(iter(inputs.values())).dtype
    # The upstream gradient in the inputs' dtype, the truth's exactly that, widened.
    upstream = torch.randn(next(iter(inputs.values())).shape, generator=torch.Generator().manual_seed(seed + 1))
    upstream = upstream.to(device, dtype)

    def run(fn: Callable[..., torch.Tensor], to64: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        args = {k: (v.double() if to64 else v).detach().clone().requires_grad_() for k, v in {**inputs, **params}.items()}
        out = fn(**args)
        out.backward(upstream.to(out.dtype))
        return out, {k: args[k].grad for k in params}

    out, grads = run(norm, False)
    truth, true_grads = run(plain, True)
    rounded = truth.to(dtype)
    assert out.dtype == dtype
    # One ulp of dtype at each element's magnitude, at least 1 (an output near 0 is the difference of
    # terms of about that size, |xhat * weight| and |bias|, whose float32 rounding it carries).
    ulp = rounded.double().abs().clamp(min=1.0) * torch.finfo(dtype).eps
    off = (out.double() - rounded.double()).abs()
    assert bool((off <= ulp).all()), f"output more than one ulp from the truth rounded once: {float((off / ulp).max())} ulp"
    mismatched = float((off > 0).double().mean())
    assert mismatched <= 0.02, f"{mismatched:.1%} of the output differs from the truth rounded once"
    for name, grad in grads.items():
        assert grad.dtype == torch.float32, f"grad {name} is {grad.dtype}"
        scale = float(true_grads[name].abs().max())
        err = float((grad.double() - true_grads[name]).abs().max())
        assert err <= 1e-5 * scale, f"grad {name} is off the truth by {err:.3g} (scale {scale:.3g}): not a float32 sum"


def assert_model_parity(plain, fused, run, *, factor: float = 3.0, truth=None, grads: bool = True,
                        draws: int | None = None) -> None:
    """Whole-model parity: output and every parameter gradient of ``fused`` against a float64
    copy of ``plain`` (the truth), within ``factor`` x the error ``plain`` itself makes (plus one
    ulp at the tensor's scale, as :func:`assert_parity`). ``run(model)`` returns the output
    tensor; the loss is its squared sum. ``truth``: the float64 model, where a copy of ``plain``
    would not compute what ``plain`` does; ``grads=False``: the output alone, run under no_grad
    (where inference is what is tested).

    ``draws``: how many problems are judged together: the given one and ``draws - 1`` more, made
    by multiplying every parameter of both models by the same random factors 1 + 1e-6 N(0, 1)
    (the truth computed afresh for each); each tensor is judged by its largest error over them,
    fused against plain. Where a gradient comes from a few cancelling terms (small random models),
    the plain implementation's error on one problem can be a lucky draw far below its usual one
    (a decoder's key projection fed by one two-key softmax row: 2.3 ulp, where 30 such draws gave
    it a median of 6 and a maximum of 21, and the fused model 8.5 and 18), which no other honest
    order of the sums meets; its largest over a few problems is its error level. By default three
    problems (one where ``truth`` is given): on an AVX-512 CPU, one draw of a small Hugging Face
    BERT's query-weight gradient gave plain 0.3x its largest error over 12 draws (the fused model's
    largest was 1.4x plain's), a draw that had been a fair one on an AVX2 CPU."""
    if draws is None:
        draws = 1 if truth is not None else 3
    if draws > 1 and truth is not None:
        raise ValueError("draws > 1 computes its own truth for each problem; truth must be None")
    reports: dict[str, ParityReport] = {}
    for draw in range(draws):
        models = (plain, fused)
        if draw:
            gen = torch.Generator().manual_seed(draw)
            noise = {n: 1 + 1e-6 * torch.randn(p.shape, generator=gen, dtype=torch.float64)
                     for n, p in plain.named_parameters()}
            models = tuple(_perturbed(copy.deepcopy(m), noise) for m in models)
        for report in _model_parity_reports(*models, run, factor=factor, truth=truth, grads=grads):
            _merge_report(reports, report)
    _judged(reports)


def _perturbed(model, noise: dict[str, torch.Tensor]):
    """``model`` with each parameter multiplied by ``noise`` of its name (in place; returned)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            assert name in noise, f"the fused model has a parameter the plain one has not: {name}"
            param.mul_(noise[name].to(param.dtype))
    return model


def _model_parity_reports(plain, fused, run, *, factor: float, truth, grads: bool) -> list[ParityReport]:
    """:func:`assert_model_parity`'s reports of one problem (output first, then each gradient)."""
    truth_model = copy.deepcopy(plain).double() if truth is None else truth
    results = []
    for model in (truth_model, plain, fused):
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(grads):
            out = run(model)
        if grads:
            out.double().square().sum().backward()
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (out64, g64), (out_plain, g_plain), (out_fused, g_fused) = results
    scale = max([1.0, _magnitude(out64)] + [_magnitude(g) for g in g64.values()])
    reports = [tensor_errors("output", out_fused, out_plain, out64, factor=factor, problem_scale=scale)]
    assert set(g_fused) == set(g_plain), "the fused model's gradients reach other parameters"
    for name, g in g64.items():
        reports.append(tensor_errors(f"grad {name}", g_fused[name], g_plain[name], g, factor=factor,
                                     problem_scale=scale))
    return reports
