"""Dropout seeds: one per call, drawn where the op is called, passed to the kernels as an input."""

from __future__ import annotations

import torch


def draw_seed(dropout_p: float) -> torch.Tensor | None:
    """A CPU int64 scalar from torch's default generator, so that ``torch.manual_seed``
    reproduces the draw; None without dropout."""
    return torch.randint(0, 2**62, (), dtype=torch.int64) if dropout_p > 0.0 else None


def seed_int(seed: torch.Tensor | None) -> int:
    return int(seed) if seed is not None else 0
