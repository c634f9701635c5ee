"""``FusedLayerNorm``: ``torch.nn.LayerNorm`` running on the fused kernels."""

from __future__ import annotations

import torch
from torch import nn

from ..ops import layer_norm
from ._fused import Fused


class FusedLayerNorm(Fused, nn.LayerNorm):
    """:class:`torch.nn.LayerNorm` computed by :func:`fused_attn.layer_norm`.

    Same constructor (``normalized_shape, eps, elementwise_affine, bias, device, dtype``),
    parameters, ``state_dict`` keys and ``extra_repr``; ``backend`` (attribute) picks the kernel
    backend (None: the package's policy). Nested tensors (which torch's LayerNorm also takes)
    go to torch's forward.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.is_nested:
            return super().forward(input)
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps, backend=self.backend)
