"""Peak and per-module memory of a model, plain against ``optimize()``d, measured in one run.

For each module the profiler reports

* ``activation_bytes``: bytes allocated during the module's forward that are still live when it
  returns (its output plus what it keeps for backward), summed over its calls, children included;
* ``saved_bytes``: bytes of the tensors autograd saved for backward while the module was the
  innermost one running (``self_saved_bytes``) and with its children (``saved_bytes``). Every
  saved tensor is seen through :func:`torch.autograd.graph.saved_tensors_hooks`; a storage is
  counted once, however many views of it are saved, and parameters are not counted;

and for the whole step the peak bytes allocated beyond what was live before it (parameters,
inputs and the optimizer's state are live before; gradients allocated during backward count),
and the forward's own peak (up to the step's output: activations, not gradients; in a small
model trained at a short length the parameters' gradients can dominate the step's peak, while
the forward peak and the bytes saved for backward show what fusion saves).
The model's own row, ``(model)``, is the whole step's, also when the step calls the model's parts
rather than the model (the Transformer's ``encode`` and ``decode``).
Bytes come from :class:`fused_attn.bench.harness.MemoryMeter`: CUDA allocator statistics, or on
CPU the profiler's record of every tensor allocation and free.

Each model runs one untimed warm-up step first, so that one-time allocations (lazy buffers,
library workspaces) are not charged to it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from ..bench.harness import MemoryMeter
from ..nn.transformer import observer


@dataclasses.dataclass
class ModuleMemory:
    name: str
    type: str
    calls: int = 0
    activation_bytes: int = 0
    self_saved_bytes: int = 0
    saved_bytes: int = 0


@dataclasses.dataclass
class MemoryProfile:
    peak_bytes: int
    forward_peak_bytes: int
    modules: list[ModuleMemory]

    @property
    def saved_bytes(self) -> int:
        """Bytes autograd saved for backward over the whole step (the model's row)."""
        return next(m.saved_bytes for m in self.modules if m.name == "(model)")

    def to_json(self) -> dict:
        return {"peak_bytes": self.peak_bytes, "forward_peak_bytes": self.forward_peak_bytes,
                "saved_bytes": self.saved_bytes, "modules": [dataclasses.asdict(m) for m in self.modules]}


def profile_model(
    model: nn.Module, step: Callable[[nn.Module], torch.Tensor], device: torch.device, *, training: bool
) -> MemoryProfile:
    """Runs ``step(model)`` once to warm up and once measured, and returns what it allocated.

    ``step`` returns the model's output; with ``training`` its sum is back-propagated (the
    gradients' memory counts in the peak), without it the step runs under ``torch.no_grad``.
    """
    device = torch.device(device)

    def run(mark: Callable[[str], None] = lambda label: None) -> None:
        with torch.set_grad_enabled(training):
            mark("step:start")
            out = step(model)
            mark("step:end")
            if training:
                out.float().sum().backward()

    run()
    model.zero_grad(set_to_none=True)

    rows = {name: ModuleMemory(name or "(model)", type(module).__name__) for name, module in model.named_modules()}
    names = {id(module): name for name, module in model.named_modules()}
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    meter = MemoryMeter(device)
    running: list[tuple[str, str]] = []  # (module name, marker label) of the forwards in progress
    finished: list[tuple[str, str]] = []
    seen_storages: set[int] = set()

    @observer
    def pre_hook(module: nn.Module, args) -> None:
        label = str(len(finished) + len(running))
        running.append((names[id(module)], label))
        meter.mark(label + ":start")

    @observer
    def post_hook(module: nn.Module, args, output) -> None:
        name, label = running.pop()
        meter.mark(label + ":end")
        finished.append((name, label))

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if running and storage.nbytes() and key not in param_storages and key not in seen_storages:
            seen_storages.add(key)
            rows[running[-1][0]].self_saved_bytes += storage.nbytes()
        return tensor

    handles = []
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(pre_hook))
        handles.append(module.register_forward_hook(post_hook, always_call=True))
    try:
        with meter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run(meter.mark)
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)

    for name, label in finished:
        rows[name].calls += 1
        rows[name].activation_bytes += meter.at(label + ":end") - meter.at(label + ":start")
    root = rows[""]
    if not root.calls:
        # A step that calls the model's parts (e.g. the Transformer's encode and decode) rather
        # than the model: its row is the step's, so that every profile has the model's total.
        root.calls = 1
        root.activation_bytes = meter.at("step:end") - meter.at("step:start")
    for name, row in rows.items():
        row.saved_bytes = sum(
            r.self_saved_bytes for n, r in rows.items() if n == name or not name or n.startswith(name + ".")
        )
    return MemoryProfile(meter.peak_bytes, meter.peak_until("step:end"), [r for r in rows.values() if r.calls])


def _ratio(fused: int, plain: int) -> float | None:
    return fused / plain if plain else None


def compare(plain: MemoryProfile, fused: MemoryProfile) -> dict:
    """The JSON document of ``fused-attn profile-memory``: both profiles and fused/plain of the
    step's peak (``ratio``), of the forward's (``forward_ratio``) and of the bytes saved for
    backward (``saved_ratio``; null in inference, where nothing is saved)."""
    return {
        "plain": plain.to_json(),
        "fused": fused.to_json(),
        "ratio": _ratio(fused.peak_bytes, plain.peak_bytes),
        "forward_ratio": _ratio(fused.forward_peak_bytes, plain.forward_peak_bytes),
        "saved_ratio": _ratio(fused.saved_bytes, plain.saved_bytes),
    }
