import torch
import torch.nn.functional as F

from ._dropout import apply_dropout


def linear_gelu(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    approximate: str = "none",
) -> torch.Tensor:
    """``gelu(input @ weight.T + bias)``; ``approximate`` is "none" (erf) or "tanh"."""
    return F.gelu(F.linear(input, weight, bias), approximate=approximate)


def ffn(
    input: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    approximate: str = "none",
    dropout_p: float = 0.0,
    *,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The position-wise feed-forward block: ``dropout(linear(gelu(linear(x, w1, b1)), w2, b2))``."""
    hidden = linear_gelu(input, w1, b1, approximate)
    return apply_dropout(F.linear(hidden, w2, b2), dropout_p, dropout_mask)
