"""Argument checks shared by the public ops: each error names the argument and what was expected."""

from __future__ import annotations

import sys

import torch
import torch.autograd.forward_ad as forward_ad
from torch._C._functorch import TransformType
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

from .._extension import assume_constant

FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The dtypes the fused kernels of every op take (float64 runs the reference).
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DIFFERENTIATING = (TransformType.Grad, TransformType.Jvp)
# The features transform_features sets (backends._TRANSFORMS words why no fused backend serves them).
TRANSFORMS = ("forward_ad", "func_transform", "onnx_export")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_tensor(value: object, name: str, *, min_dim: int = 0, floating: bool = True) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.layout != torch.strided or value.is_nested:
        # The kernels index dense memory through strides; sparse and nested tensors have none to give.
        kind = "a nested tensor" if value.is_nested else f"layout {str(value.layout).replace('torch.', '')}"
        raise TypeError(f"{name} must be a dense (strided) tensor, got {kind}")
    if value.dim() < min_dim:
        dims = "dimension" if min_dim == 1 else "dimensions"
        raise ValueError(f"{name} must have at least {min_dim} {dims}, got shape {list(value.shape)}")
    if floating and value.dtype not in FLOATING:
        raise TypeError(
            f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got {dtype_name(value.dtype)}"
        )
    return value


def check_mask(value: object, name: str) -> torch.Tensor:
    """A mask: boolean (True = keep) or of a floating dtype the kernels read (added to the scores)."""
    mask = check_tensor(value, name, floating=False)
    if mask.dtype != torch.bool and mask.dtype not in FLOATING:
        raise TypeError(
            f"{name} must be a bool or floating tensor (float16, bfloat16, float32 or float64), "
            f"got {dtype_name(mask.dtype)}"
        )
    return mask


def broadcast_mask(
    value: object, name: str, like: torch.Tensor, like_name: str, shape: tuple[int, ...], target: str
) -> torch.Tensor:
    """``value`` checked as a mask (:func:`check_mask`) on ``like``'s device, as a view broadcast
    to ``shape`` (zero strides on the broadcast dims: the kernels read it in place); ``target``
    names ``shape`` in the message when it does not broadcast.

    A learned 16-bit mask (one that requires grad while grad mode is on) is given to the kernels
    in float32: its gradient, summed over the dims it broadcasts along, is then reduced in float32
    and rounded once, as the mask's own dtype would round each term.
    """
    mask = check_mask(value, name)
    check_same_device(mask, name, like, like_name)
    if mask.dim() > len(shape):
        raise ValueError(f"{name} must have at most {len(shape)} dimensions, got shape {list(mask.shape)}")
    if mask.requires_grad and torch.is_grad_enabled() and mask.dtype in (torch.float16, torch.bfloat16):
        mask = mask.float()
    try:
        return mask.expand(shape)
    except RuntimeError:
        raise ValueError(f"{name} of shape {list(mask.shape)} does not broadcast to {target} {list(shape)}") from None


def rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t`` as the contiguous 2-D [rows, width] the row-wise kernels take (no reshape call for
    an input that is one already: each saves host time on every call)."""
    return (t if t.dim() == 2 and t.shape[1] == width else t.reshape(-1, width)).contiguous()


def unrows(out: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A kernel's [rows, width] result viewed with the leading dims of ``shape``."""
    return out if out.dim() == len(shape) else out.view(*shape[:-1], out.shape[-1])


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records a call with these arguments; where it does not, the ops that keep
    tensors for their backward take their inference form instead."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def transform_features(*tensors: torch.Tensor | None) -> dict[str, bool]:
    """The backend features of a call that the fused ops cannot serve, which only the reference
    (plain differentiable torch) serves:

    - ``forward_ad``: one of ``tensors`` carries a forward-mode tangent (``torch.func.jvp``/
      ``jacfwd``, ``torch.autograd.forward_ad``). The fused ops have no forward derivative, and a
      custom op without one would pass the tangent over silently.
    - ``func_transform``: the call runs inside ``torch.func.grad``/``vjp``/``jacrev``/``jvp``,
      whose wrapped tensors the fused ops' autograd formulas (C++ autograd functions, and
      the generated ones of the Triton ops) cannot take. ``torch.func.vmap`` alone is no such
      transform: the fused ops run under it, once per batch element.
    - ``onnx_export``: the call is traced by ``torch.onnx.export``'s exporter (``dynamo=True``, the
      default). The fused kernels are no ONNX operators: the reference's plain ops, the same
      computation, are exported.

    Outside every transform and dual level it costs two comparisons and a query of the
    interpreter stack's level. Under ``torch.jit.trace`` (and so ``torch.onnx.export(...,
    dynamo=False)``) it raises a TypeError saying so (:func:`refuse_jit_trace`)."""
    refuse_jit_trace()
    features = {}
    if onnx_exporting():
        features[TRANSFORMS[2]] = True
    if forward_ad._current_level >= 0 and any(
        t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors
    ):
        features[TRANSFORMS[0]] = True
    # Dynamo cannot call the interpreter-stack queries while tracing (nor do they tell what the
    # compiled graph will run under): under torch.compile the check is left out.
    if (
        not torch.compiler.is_compiling()
        and torch._C._functorch.maybe_current_level() is not None
        and any(interpreter.key() in _DIFFERENTIATING for interpreter in retrieve_all_functorch_interpreters())
    ):
        features[TRANSFORMS[1]] = True
    return features


def cuda_graph_capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream. Without an initialised CUDA
    context none can be (and the query is not made: it would initialise one)."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def refuse_jit_trace() -> None:
    """Raises a TypeError under ``torch.jit.trace``: the tracer hands the ops their sizes as
    tensors, and would record one backend's op, chosen for the traced call's grad mode and shapes,
    in place of the dispatch."""
    if torch.compiler.is_compiling() or not torch._C._is_tracing():  # Dynamo cannot call the query
        return
    if onnx_exporting():
        raise TypeError(
            "torch.onnx.export(..., dynamo=False) records the model with torch.jit.trace, which cannot record the "
            "fused_attn ops; export with dynamo=True (the default), which exports their plain-PyTorch computation, "
            "or call fused_attn.restore(model) first"
        )
    raise TypeError(
        "torch.jit.trace cannot record the fused_attn ops (their dispatch, argument checks and backend "
        "choice, is Python run at each call); use torch.compile or torch.export, which capture them whole "
        "(fused_attn.restore(model) gives back the torch.nn modules, for TorchScript)"
    )


@assume_constant
def onnx_exporting() -> bool:
    """Whether ``torch.onnx.export`` is running (False while torch.onnx is not even imported); a
    constant to Dynamo, which the exporter may trace with."""
    onnx = sys.modules.get("torch.onnx")
    return onnx is not None and onnx.is_in_onnx_export()


def under_transform(features: dict) -> bool:
    """Whether a call's backend features (those of transform_features among them) say it runs
    under forward-mode AD, a torch.func transform or the ONNX exporter."""
    return any(features.get(name) for name in TRANSFORMS)


def check_same_device(value: torch.Tensor, name: str, like: torch.Tensor, like_name: str) -> None:
    if value.device != like.device:
        raise ValueError(f"{name} is on {value.device} but {like_name} is on {like.device}; they must share a device")


def python_scalar(value: object) -> object:
    """A NumPy scalar (np.float32(0.5), np.int64(3), which torch's functions take) as the Python
    number it holds; anything else as it is."""
    if type(value) in (int, float, bool) or type(value).__module__ != "numpy" or not hasattr(value, "item"):
        return value
    return value.item()


def is_finite_number(value: object) -> bool:
    """A real number (not a bool; NumPy's too) that is finite. ``v - v == 0`` rather than ``math.isfinite``:
    under ``torch.compile`` a float argument may be symbolic, which math functions refuse (a graph
    break); the difference is NaN exactly for inf and NaN, and a symbolic one is taken as finite."""
    value = python_scalar(value)
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value - value == 0


def check_eps(eps: object) -> float:
    if not is_finite_number(eps) or eps < 0:
        raise ValueError(f"eps must be a finite non-negative number, got {eps!r}")
    return float(eps)


def check_bool(value: object, name: str) -> None:
    """A flag must be a Python bool: a truthy stand-in (1, "no", a NumPy or tensor bool) is refused
    rather than read as one."""
    if not isinstance(value, bool):
        if isinstance(value, torch.Tensor):
            refuse_jit_trace()  # a flag computed from sizes, which the tracer gives as tensors
        kind = f"{type(value).__module__}.{type(value).__qualname__}"
        raise TypeError(f"{name} must be a Python bool, got {value!r} ({kind})")


def check_dropout_p(p: object) -> float:
    """A dropout probability in [0, 1], as torch's dropout takes (1 drops everything)."""
    p = python_scalar(p)
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1], got {p!r}")
    return float(p)


def check_param(
    param: object, name: str, input: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype | None = None
) -> torch.Tensor | None:
    """An optional parameter (weight, bias) of ``shape`` on ``input``'s device, cast to ``dtype``
    (default: the input's) and contiguous.

    The cast is differentiable, so the gradient still reaches the parameter in its own dtype. The
    kernels index parameters as dense vectors, so a strided or expanded view (e.g.
    ``bias.expand(n)``) is copied once here.
    """
    if param is None:
        return None
    param = check_tensor(param, name)
    if param.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(param.shape)}")
    check_same_device(param, name, input, "input")
    dtype = input.dtype if dtype is None else dtype
    if param.dtype != dtype:
        param = param.to(dtype)
    return param.contiguous()


def affine_dtype(input: torch.Tensor, weight: object, bias: object) -> torch.dtype:
    """The dtype the norms' kernels take their affine parameters (and give their gradients) in.

    float32 for a float16/bfloat16 input whose weight is float32 and whose bias is float32 or
    absent: the mixed precision of norms kept in float32 (and of CPU autocast, which leaves
    ``F.layer_norm`` a 16-bit input and float32 parameters). The kernels then read the parameters
    unrounded and sum their gradients into float32, as ``F.layer_norm`` does on CPU. Any other
    mix is cast to the input's dtype."""
    if (
        input.dtype in (torch.float16, torch.bfloat16)
        and isinstance(weight, torch.Tensor)
        and weight.dtype == torch.float32
        and (bias is None or isinstance(bias, torch.Tensor) and bias.dtype == torch.float32)
    ):
        return torch.float32
    return input.dtype
