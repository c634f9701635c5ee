"""What this machine offers, and which kernel serves a call.

Four backends exist: ``cuda`` (CUDA C++ kernels in ``fused_attn._C``), ``triton`` (Triton kernels;
on CPU tensors only under ``TRITON_INTERPRET=1``), ``cpu`` (C++ CPU kernels in
``fused_attn._C_cpu_<set>``, the library of one vector instruction set, loaded after ``fused_attn._C``,
which registers the operators) and ``reference`` (plain PyTorch). Each op declares, once, what each backend of it can serve
(:class:`Support`); that declaration answers :meth:`Support.not_supported_reasons` and is what
``fused-attn info`` prints and what the tests take their matrix from.

A call's backend is, in order of precedence: the op's ``backend=`` argument, the innermost
:func:`use_backend` context, the ``FUSED_ATTN_BACKEND`` environment variable, else ``"auto"``.
``auto`` takes the first backend without reasons in the device's order (CUDA tensors: cuda,
triton; CPU tensors: cpu, triton). When none of those can serve the call, ``auto`` runs the
reference implementation and says so with a :class:`FallbackWarning`, once per op and reason.
A named backend that cannot serve the call raises :class:`BackendNotSupportedError` listing why.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import importlib.util
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.autograd.forward_ad as _forward_ad

from . import _extension
from ._env import ENV_VAR, MAX_EXTENT, getenv, triton_interpret_mode

BACKENDS = ("cuda", "triton", "cpu", "reference")
AUTO_ORDER = {"cuda": ("cuda", "triton"), "cpu": ("cpu", "triton")}


class BackendNotSupportedError(RuntimeError):
    """The requested backend (or every backend, for ``auto``) cannot serve these inputs."""


class FallbackWarning(UserWarning):
    """``auto`` found no fused kernel for a call and ran the reference implementation."""


@dataclasses.dataclass(frozen=True)
class Inputs:
    """What a backend needs to know about a call to decide whether it can serve it."""

    device: torch.device
    dtype: torch.dtype
    features: Mapping[str, Any] = dataclasses.field(default_factory=dict)


_INTERPRETER_BF16 = "the Triton interpreter computes it wrongly"
# Every fused backend's (features set by ops._validate.transform_features): only the reference,
# plain differentiable torch, computes under these.
_TRANSFORMS = {
    "forward_ad": "forward-mode AD (an input carries a tangent; the fused kernels have no forward derivative)",
    "func_transform": "a torch.func grad, vjp, jacrev or jvp transform (the fused ops' autograd formulas do not "
    "compose with them)",
    "onnx_export": "ONNX export (the fused kernels are no ONNX operators; the reference's plain ops are exported)",
}


@dataclasses.dataclass(frozen=True)
class Support:
    """What one backend of one op can serve.

    ``limits`` bounds integer features (``name -> (min, max)``, either end ``None``);
    ``multiple_of`` requires integer features to be multiples; ``unsupported`` lists boolean
    features the backend cannot do (e.g. ``"dropout"``); ``min_compute_capability`` applies to
    CUDA devices; ``check`` adds op-specific reasons, which ``check_doc`` states for
    ``describe()`` (what ``fused-attn info`` prints).
    """

    backend: str
    # Device types served; None: any device torch runs on (the reference, plain torch).
    devices: tuple[str, ...] | None
    dtypes: tuple[torch.dtype, ...]
    limits: Mapping[str, tuple[int | None, int | None]] = dataclasses.field(default_factory=dict)
    multiple_of: Mapping[str, int] = dataclasses.field(default_factory=dict)
    unsupported: tuple[str, ...] = ()
    min_compute_capability: tuple[int, int] | None = None
    check: Callable[[Inputs], list[str]] | None = None
    check_doc: str = ""
    # For the cpu and cuda backends: the fused_attn op whose kernel must be registered (the CUDA kernels
    # by fused_attn._C, the CPU kernels by the fused_attn._C_cpu_<set> library loaded).
    native_op: str | None = None

    def unavailable_reasons(self, device: torch.device) -> list[str]:
        """Why this backend of this op cannot run on ``device`` here at all, whatever the inputs."""
        reasons = backend_unavailable_reasons(self.backend, device)
        if not reasons and self.native_op and not _extension.has_kernel(self.native_op, self.backend):
            library = "fused_attn._C" if self.backend == "cuda" else "the CPU kernel library loaded"
            reasons.append(f"{library} has no {self.backend} kernel for fused_attn::{self.native_op}")
        return reasons

    def not_supported_reasons(self, inputs: Inputs) -> list[str]:
        reasons = self.unavailable_reasons(inputs.device)
        if not self.serves_device(inputs.device.type):
            reasons.append(f"device {inputs.device.type} not in {self.devices}")
        if inputs.dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            reasons.append(f"dtype {str(inputs.dtype).replace('torch.', '')} not in ({names})")
        for name, (low, high) in self.limits.items():
            value = inputs.features.get(name)
            if value is None:
                continue
            if low is not None and _beyond(value < low):
                reasons.append(f"{name}={value} is below the minimum {low}")
            if high is not None and _beyond(value > high):
                reasons.append(f"{name}={value} exceeds the maximum {high}")
        for name, factor in self.multiple_of.items():
            value = inputs.features.get(name)
            if value is not None and value % factor:
                reasons.append(f"{name}={value} is not a multiple of {factor}")
        for name in self.unsupported:
            if inputs.features.get(name):
                reasons.append(f"{name} is not supported")
        if (self._bfloat16_on_cuda_only() and inputs.device.type == "cpu" and inputs.dtype == torch.bfloat16
                and triton_interpret_mode()):
            reasons.append(f"bfloat16 is not served on CPU tensors ({_INTERPRETER_BF16})")
        if (
            self.min_compute_capability is not None
            and inputs.device.type == "cuda"
            and torch.cuda.is_available()
        ):
            cc = torch.cuda.get_device_capability(inputs.device)
            if cc < self.min_compute_capability:
                need = ".".join(map(str, self.min_compute_capability))
                reasons.append(f"compute capability {cc[0]}.{cc[1]} is below the required {need}")
        if not self._serves_transforms():
            reasons += [why for name, why in _TRANSFORMS.items() if inputs.features.get(name)]
        if self.check is not None and not reasons:
            reasons.extend(self.check(inputs))
        return reasons

    def describe(self) -> str:
        parts = [
            "devices=" + ("any" if self.devices is None else ",".join(self.devices)),
            "dtypes=" + ",".join(str(d).replace("torch.", "") for d in self.dtypes),
        ]
        for name, (low, high) in self.limits.items():
            parts.append(f"{name} in [{low if low is not None else ''}..{high if high is not None else ''}]")
        parts += [f"{name} % {factor} == 0" for name, factor in self.multiple_of.items()]
        parts += [f"no {name}" for name in self.unsupported]
        if self.min_compute_capability:
            parts.append("sm>=" + "".join(map(str, self.min_compute_capability)))
        if self.check_doc:
            parts.append(self.check_doc)
        if self._bfloat16_on_cuda_only():
            parts.append(f"bfloat16 on cuda only ({_INTERPRETER_BF16})")
        if not self._serves_transforms():
            parts.append("no forward-mode AD, torch.func grad/vjp/jacrev/jvp or ONNX export")
        return "; ".join(parts)

    def serves_device(self, device_type: str) -> bool:
        return self.devices is None or device_type in self.devices

    def _serves_transforms(self) -> bool:
        # Only the reference (plain differentiable torch) propagates tangents and composes with
        # torch.func; a fused op's autograd formula has no forward derivative nor functorch support.
        return self.backend == "reference"

    def _bfloat16_on_cuda_only(self) -> bool:
        # The interpreter's tl.dot on bfloat16 returns garbage and its float32 -> bfloat16
        # conversion truncates: bfloat16 Triton runs on GPUs only.
        return self.backend == "triton" and self.serves_device("cpu") and torch.bfloat16 in self.dtypes


def _beyond(comparison: object) -> bool:
    """Whether a feature is beyond a limit: for a size that is a plain int, the comparison itself;
    for a symbolic one (a dynamic dim under torch.compile or torch.export), only when every size
    its range allows is. Comparing it outright would add a guard (e.g. ``seq <= MAX_EXTENT``) that
    torch.export refuses for a ``Dim`` without a max, as a constraint violation; the kernels check
    their extents themselves when they run (csrc/cuda, the Triton launchers)."""
    if type(comparison) is bool and not torch.compiler.is_compiling():
        return comparison
    # Imported here, where torch.compile or torch.export has imported it (at the package's import
    # it would add sympy's quarter of a second); Dynamo, which may take a symbolic comparison for a
    # bool, traces this call with its own rule.
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return statically_known_true(comparison)


def is_empty(*tensors: torch.Tensor) -> bool:
    """Whether any of ``tensors`` has no elements; for a data-dependent (unbacked) size, e.g. rows
    picked by a boolean mask under torch.compile, decided without a guard (not empty unless known).
    Under Dynamo, which takes a symbolic size for an int, always by guard_or_false: ``numel == 0``
    there guards on the data, which fails a full graph."""
    compiling = torch.compiler.is_compiling()
    for t in tensors:
        numel = t.numel()
        if not compiling and not isinstance(numel, torch.SymInt):  # an int (a tensor under torch.jit.trace)
            if numel == 0:
                return True
            continue
        from torch.fx.experimental.symbolic_shapes import guard_or_false

        if guard_or_false(numel == 0):
            return True
    return False


@dataclasses.dataclass(frozen=True)
class OpSpec:
    name: str
    supports: Mapping[str, Support]


_OPS: dict[str, OpSpec] = {}


def register_op(name: str, supports: list[Support]) -> OpSpec:
    """Declares an op's backends; called once by each module under ``fused_attn/ops``."""
    spec = OpSpec(name, {s.backend: s for s in supports})
    _OPS[name] = spec
    return spec


def registered_ops() -> dict[str, OpSpec]:
    return dict(_OPS)


# ---------------------------------------------------------------------------------------------
# Machine-level availability


# Looked up once at import: triton_version() runs inside every op's backend choice, which
# torch.compile traces, and Dynamo refuses to trace importlib's module search (torch 2.11).
_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def triton_version() -> str | None:
    if not _TRITON_FOUND:
        return None
    import triton

    return triton.__version__


def backend_unavailable_reasons(backend: str, device: torch.device) -> list[str]:
    """Why ``backend`` cannot run on ``device`` on this machine at all (empty when it can)."""
    if backend == "reference":
        return []
    if backend == "cpu":
        if device.type != "cpu":
            return [f"the cpu backend runs on CPU tensors, got {device.type}"]
        if not _extension.loaded():
            return [f"fused_attn._C not loaded: {_extension.load_error()}"]
        error = _extension.cpu_kernels_error()
        return [f"no CPU kernels loaded: {error}"] if error else []
    if backend == "cuda":
        if device.type != "cuda":
            return [f"the cuda backend runs on CUDA tensors, got {device.type}"]
        if not _extension.loaded():
            return [f"fused_attn._C not loaded: {_extension.load_error()}"]
        if not _extension.cuda_kernels_compiled():
            return ["fused_attn._C was built without its CUDA kernels"]
        return []
    if backend == "triton":
        if triton_version() is None:
            return ["triton is not installed"]
        if device.type == "cpu" and not triton_interpret_mode():
            return ["Triton runs on CPU tensors only under TRITON_INTERPRET=1"]
        if device.type not in ("cpu", "cuda"):
            return [f"Triton does not run on {device.type} tensors"]
        return []
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """The backends that can run on ``device`` here (default: CUDA if present, else CPU); none on a
    CUDA device when this machine has no usable GPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return []
    return [b for b in BACKENDS if not backend_unavailable_reasons(b, device)]


# ---------------------------------------------------------------------------------------------
# Selection

_requested: contextvars.ContextVar[str | None] = contextvars.ContextVar("fused_attn_backend", default=None)
_warned: set[str] = set()
_last_choice: dict[str, str] = {}


# Both run for real when torch.compile traces a call (Dynamo runs a function marked
# assume_constant_result rather than tracing it): a fallback warns when its graph is traced, and
# last_backend reports the backend a compiled graph was traced with, with no graph break and no
# guard on these records (an eager call that changes them does not make compiled code recompile).
_assume_constant = _extension.assume_constant


@_assume_constant
def warn_once(message: str, stacklevel: int = 1) -> bool:
    """A :class:`FallbackWarning` with ``message``, once per process and message;
    ``stacklevel`` counts from the caller of this function."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, FallbackWarning, stacklevel=stacklevel + 1)
    return True


@_assume_constant
def _note_choice(op: str, backend: str, fallback_reason: str) -> None:
    """Records ``backend`` as the one that served ``op`` (:func:`last_backend`) and, for a fallback
    to the reference (a non-empty ``fallback_reason``), warns once per op and reason at the line
    that called the op."""
    _last_choice[op] = backend
    if fallback_reason:
        warn_once(f"fused_attn.{op}: running the reference PyTorch implementation ({fallback_reason})", 4)


def _validate_name(name: str, source: str) -> str:
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"{source}: unknown backend {name!r}; expected 'auto' or one of {BACKENDS}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: ops called inside use ``name`` ("auto" or one of :data:`BACKENDS`) unless
    they pass ``backend=`` themselves; a ValueError for any other name. Under torch.compile it is
    read when a graph is traced, as the environment is; enter it around the compiled call, not
    inside the compiled function (Dynamo cannot trace the context variable's change: inside, pass
    ``backend=`` instead)."""
    token = _requested.set(_validate_name(name, "use_backend"))
    try:
        yield
    finally:
        _requested.reset(token)


@_assume_constant
def _context_backend() -> str:
    """The name :func:`use_backend` set, or "". Read once per torch.compile trace as a constant, as
    the environment is (the Dynamo of older torch, e.g. 2.11, cannot trace ``ContextVar.get``)."""
    return _requested.get() or ""


def requested_backend(argument: str | None = None) -> str:
    """The backend asked for: argument, then :func:`use_backend`, then the environment, else auto."""
    if argument is not None:
        return _validate_name(argument, "backend")
    context = _context_backend()
    if context:
        return context
    env = getenv(ENV_VAR)
    if env:
        return _validate_name(env, ENV_VAR)
    return "auto"


# Eager calls remember each choice: what a backend can serve depends on the call's device, dtype
# and features, the backend asked for and the Triton interpreter switch, nothing else that changes
# while a process runs, and the full check costs more host time than a small kernel. Traced
# calls (torch.compile) take the full path, which leaves no state for Dynamo to guard on.
_CHOICES: dict[tuple, tuple[str, str | None, str]] = {}
_CHOICES_MAX = 4096
# The extension's C++ entry for the plain call (csrc/fast.cpp): each public op hands it its
# arguments first (fast_entry, fast_path_open); it serves a call only with the extension's kernel
# that this policy approved for the call's op, device, dtype and features (_approve), and records
# it in _last_choice as a call served here would be.
_FAST = _extension.fast_module()
if _FAST is not None:
    _FAST.bind(_last_choice)


def clear_choices() -> None:
    """Forgets the remembered backend choices (for code that changes what the machine offers
    while running, e.g. tests that patch device properties)."""
    _CHOICES.clear()
    if _FAST is not None:
        _FAST.clear()


def fast_entry(op: str) -> Callable | None:
    """The C++ entry of public op ``op`` for the plain call: it takes the public function's
    arguments (without ``backend``) and returns the result, or None for a call it leaves to the
    Python path (anything but a plain call of an approved kind); None without the extension."""
    return getattr(_FAST, op, None)


def fast_path_open() -> bool:
    """Whether a call may try the C++ entry, as far as Python's own state tells: not while
    torch.compile or torch.export traces (which capture the Python path), inside
    :func:`use_backend`, or under forward-mode AD. The entry checks the rest itself (modes,
    transforms, the tracer, autocast, the environment's backend)."""
    return not torch.compiler.is_compiling() and _requested.get() is None and _forward_ad._current_level < 0


def _approve(op: str, inputs: Inputs, name: str) -> None:
    """Tells the C++ entry that ``auto`` runs ``op`` on such inputs with the extension's kernel."""
    if _FAST is not None and name in ("cpu", "cuda") and not any(inputs.features.get(t) for t in _TRANSFORMS):
        _FAST.approve(op, inputs.device, inputs.dtype, tuple(inputs.features.values()))


def select(
    op: str, inputs: Inputs, backend: str | None = None, *, operands: tuple = (), dropout_p: float = 0.0,
    empty: bool = False,
) -> str:
    """The backend that will run ``op`` on ``inputs``; raises if a named one cannot.

    Given the call's tensors as ``operands`` (and its ``dropout_p``): "reference" when one of them
    is empty or ``dropout_p`` is 1, after a named backend is checked (nothing to compute, or
    everything dropped: no kernel is launched, and no fallback is announced; the reference gives
    the empty, zero or undropped result, and :func:`last_backend` says 'reference'). ``empty``:
    the caller has found an operand empty itself (by :func:`is_empty`), instead of passing them."""
    wanted = requested_backend(backend)
    traced = torch.compiler.is_compiling()
    if not traced:  # a loop, not all() of a generator: this runs on every eager call
        for value in inputs.features.values():
            if type(value) is not int and type(value) is not bool:
                traced = True
                break
    if traced:
        # Traced (Dynamo; make_fx and export give symbolic sizes, which are neither hashable nor
        # fixed): the full path, leaving no state behind.
        name, fallback_reason = _select(op, inputs, wanted)
    else:
        key = (op, wanted, inputs.device, inputs.dtype, triton_interpret_mode(), *inputs.features.items())
        choice = _CHOICES.get(key)
        if choice is None:
            try:
                choice = _select(op, inputs, wanted)
            except BackendNotSupportedError as exc:
                choice = (None, str(exc))
            if len(_CHOICES) >= _CHOICES_MAX:
                _CHOICES.clear()
            _CHOICES[key] = choice
            if wanted == "auto":
                _approve(op, inputs, choice[0])
        name, fallback_reason = choice
        if name is None:
            raise BackendNotSupportedError(fallback_reason)
    if empty or dropout_p == 1.0 or is_empty(*operands):
        name, fallback_reason = "reference", ""
    _note_choice(op, name, fallback_reason)
    return name


def _select(op: str, inputs: Inputs, wanted: str) -> tuple[str, str]:
    """(the backend for ``op`` on ``inputs``, and why ``auto`` fell back to the reference, if it
    did); raises :class:`BackendNotSupportedError` when a named backend cannot serve them."""
    spec = _OPS[op]
    if wanted != "auto":
        support = spec.supports.get(wanted)
        reasons = (
            support.not_supported_reasons(inputs)
            if support is not None
            else [f"{op} has no {wanted} implementation"]
        )
        if reasons:
            raise BackendNotSupportedError(
                f"{op}: backend {wanted!r} cannot serve these inputs: " + "; ".join(reasons)
            )
        return wanted, ""
    rejected: list[str] = []
    for name in AUTO_ORDER.get(inputs.device.type, ()):
        support = spec.supports.get(name)
        if support is None:
            continue
        reasons = support.not_supported_reasons(inputs)
        if not reasons:
            return name, ""
        rejected.append(f"{name}: " + "; ".join(reasons))
    if "reference" not in spec.supports:
        raise BackendNotSupportedError(f"{op}: no backend can serve these inputs: " + " | ".join(rejected))
    return "reference", " | ".join(rejected) or f"no fused backend for {inputs.device.type} tensors"


def explain(op: str, inputs: Inputs) -> dict[str, list[str]]:
    """Every backend of ``op`` with the reasons it cannot serve ``inputs`` (empty = it can).

    A limit is checked only for the features ``inputs.features`` holds, so leaving them out asks
    about the device and dtype alone. The features the ops pass: scaled_dot_product_attention
    ``head_dim``, ``head_dim_v``, ``q_len``, ``k_len`` and ``dropout`` (bool); layer_norm and
    add_layer_norm ``hidden``; softmax ``n_cols``; linear_gelu and ffn ``gemm_dim`` (the largest dim
    of their GEMMs: rows, input, hidden or output features); every op
    ``forward_ad`` (bool: an input carries a forward-mode tangent), ``func_transform`` (bool: the
    call runs under ``torch.func.grad``/``vjp``/``jacrev``/``jvp``) and ``onnx_export`` (bool: traced
    by ``torch.onnx.export``), which only the reference serves.
    """
    return {name: s.not_supported_reasons(inputs) for name, s in _OPS[op].supports.items()}


def last_backend(op: str) -> str | None:
    """The backend that served the most recent eager call of ``op`` in this process (None before
    any). Under ``torch.compile`` it is recorded when a graph is traced: the backend the graph was
    traced with; running the compiled graph records nothing."""
    return _last_choice.get(op)
