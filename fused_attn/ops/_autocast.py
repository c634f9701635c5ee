"""Autocast: each public op casts its inputs as PyTorch's autocast casts those of its counterpart.

Under ``torch.autocast`` PyTorch runs matmul-like ops (``F.linear``, ``torch.matmul``,
``F.scaled_dot_product_attention``) in the autocast dtype on every device. ``F.layer_norm`` and
``torch.softmax`` run in float32 under CUDA autocast and in their inputs' dtype under CPU
autocast (neither is on the CPU autocast lists). The ops apply the same policy in the public
function, before validation and backend selection, so that every backend (the reference
included) sees the same dtypes, the choice of backend is made for the dtype that will run, and
the casts are ordinary differentiable ``Tensor.to`` calls (gradients return in the caller's
dtype). The custom ops below the public functions have no autocast rule: called directly, they
run in the dtype they are given.
"""

from __future__ import annotations

import torch

# The policies of the ops' PyTorch counterparts.
LOWER_PRECISION = "lower_precision"  # linear, matmul, scaled_dot_product_attention
FLOAT32_ON_CUDA = "float32_on_cuda"  # layer_norm, softmax


def autocast_dtype(policy: str, device: torch.device) -> torch.dtype | None:
    """The dtype an op of ``policy`` runs in on ``device`` under the current autocast, or None
    when autocast leaves its inputs as they are."""
    device_type = device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return None
    if policy == LOWER_PRECISION:
        return torch.get_autocast_dtype(device_type)
    if policy == FLOAT32_ON_CUDA:
        return torch.float32 if device_type == "cuda" else None
    raise ValueError(f"unknown autocast policy {policy!r}")


def cast(value: object, dtype: torch.dtype | None) -> object:
    """``value`` in ``dtype`` when autocast would cast it: a float16, bfloat16 or float32 tensor
    (floating masks and parameters included; float64 is left alone, as autocast leaves it)."""
    if dtype is None or not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return value
    return value if value.dtype == torch.float64 else value.to(dtype)


# One call answering "is autocast on for any device?" (absent from older torch: then the per-device
# question is asked). Dynamo is left the per-device path, which it knows.
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None)


def autocast_inputs(policy: str, like: object, *values: object) -> tuple:
    """``values`` cast for an op of ``policy`` on ``like``'s device (unchanged without autocast,
    or when ``like`` is not a tensor: validation reports that)."""
    if _any_autocast is not None and not torch.compiler.is_compiling() and not _any_autocast():
        return values
    if not isinstance(like, torch.Tensor):
        return values
    dtype = autocast_dtype(policy, like.device)
    return values if dtype is None else tuple(cast(v, dtype) for v in values)
