import torch
import torch.nn.functional as F

from ._dropout import apply_dropout

# The activation codes the kernels take (the ops' internal ``approximate`` argument): GELU with
# F.gelu's ``approximate`` ("none": erf, "tanh"), or ReLU.
ACTIVATION_CODES = ("none", "tanh", "relu")


def activation_code(activation: str, approximate: str) -> str:
    """The kernels' code for ``activation`` ("gelu" or "relu") with GELU's ``approximate``; raises
    ``ValueError`` naming the argument for any other pair (``approximate`` is the GELU's alone)."""
    if activation == "gelu":
        if approximate not in ("none", "tanh"):
            raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
        return approximate
    if activation == "relu":
        if approximate != "none":
            raise ValueError(f"approximate applies to the GELU only: with activation='relu' it must be 'none', "
                             f"got {approximate!r}")
        return "relu"
    raise ValueError(f"activation must be 'gelu' or 'relu', got {activation!r}")


def activate(pre: torch.Tensor, code: str) -> torch.Tensor:
    """The activation of an activation code of :data:`ACTIVATION_CODES` applied to ``pre``."""
    if code == "relu":
        return F.relu(pre)
    if code not in ("none", "tanh"):
        raise ValueError(f"activation code must be one of {ACTIVATION_CODES}, got {code!r}")
    return F.gelu(pre, approximate=code)


def linear_activation(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, code: str
) -> torch.Tensor:
    """``act(input @ weight.T + bias)`` for an activation code of :data:`ACTIVATION_CODES`."""
    return activate(F.linear(input, weight, bias), code)


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
    activation: str = "gelu",
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The position-wise feed-forward block: ``dropout(linear(act(linear(x, w1, b1)), w2, b2))``,
    ``act`` the GELU (``approximate`` "none" or "tanh") or, with ``activation="relu"``, ReLU."""
    hidden = linear_activation(input, w1, b1, activation_code(activation, approximate))
    return apply_dropout(F.linear(hidden, w2, b2), dropout_p, dropout_mask)
