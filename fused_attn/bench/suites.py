"""Benchmark suites: each yields cases, and for each case the implementations to compare.

An implementation is a name and a zero-argument callable that runs the op once (forward, or
forward and backward). ``torch`` names PyTorch's own implementation, the baseline every
speed-up is reported against; ``reference`` is the package's plain PyTorch oracle; the others
are the fused backends that can serve the case on this machine.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

import fused_attn
from fused_attn import backends


@dataclasses.dataclass
class Case:
    suite: str
    shape: dict
    dtype: torch.dtype
    mode: str
    # bytes that must cross memory at least once (inputs read, outputs written), for GB/s
    min_bytes: int
    impls: dict[str, Callable[[], object]]
    skipped: dict[str, str]


def _fused_backends(op: str, inputs: backends.Inputs, wanted: list[str] | None) -> tuple[list[str], dict[str, str]]:
    ok, skipped = [], {}
    for name, reasons in backends.explain(op, inputs).items():
        if name == "reference" or (wanted and name not in wanted):
            continue
        if reasons:
            skipped[name] = "; ".join(reasons)
        else:
            ok.append(name)
    return ok, skipped


def _runner(forward: Callable[[], torch.Tensor], grad: torch.Tensor | None) -> Callable[[], object]:
    if grad is None:
        return forward

    def step() -> None:
        forward().backward(grad)

    return step


def layer_norm_cases(
    device: torch.device, dtype: torch.dtype, mode: str, sizes: list[tuple[int, int]], wanted: list[str] | None
) -> Iterator[Case]:
    for rows, hidden in sizes:
        training = mode == "fwd+bwd"
        x = torch.randn(rows, hidden, device=device, dtype=dtype, requires_grad=training)
        w = torch.randn(hidden, device=device, dtype=dtype, requires_grad=training)
        b = torch.randn(hidden, device=device, dtype=dtype, requires_grad=training)
        grad = torch.randn_like(x) if training else None
        elem = x.element_size()
        # forward reads x, writes y; backward reads dy and x, writes dx (parameters are negligible)
        moved = rows * hidden * elem * (2 + (3 if training else 0))
        inputs = backends.Inputs(device, dtype, {"hidden": hidden})
        names, skipped = _fused_backends("layer_norm", inputs, wanted)
        impls: dict[str, Callable[[], object]] = {
            "torch": _runner(lambda: F.layer_norm(x, (hidden,), w, b), grad),
            "reference": _runner(lambda: fused_attn.reference.layer_norm(x, (hidden,), w, b), grad),
        }
        for name in names:
            impls[name] = _runner(lambda name=name: fused_attn.layer_norm(x, (hidden,), w, b, backend=name), grad)
        yield Case("layer_norm", {"rows": rows, "hidden": hidden}, dtype, mode, moved, impls, skipped)


SUITES = {"layer_norm": layer_norm_cases}
