from collections.abc import Sequence

import torch

from ._dropout import apply_dropout


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Statistics in at least float32, as any careful implementation keeps them.
    return torch.promote_types(dtype, torch.float32)


def layer_norm(
    input: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` over the trailing ``normalized_shape`` dims."""
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    dims = tuple(range(-len(normalized_shape), 0))
    x = input.to(_compute_dtype(input.dtype))
    mean = x.mean(dim=dims, keepdim=True)
    # Refined by the mean deviation, which takes the mean's own rounding out: in a constant row it
    # would otherwise be every deviation, scaled by rstd = 1 / sqrt(eps) (1e6 at eps=1e-12).
    mean = mean + (x - mean).mean(dim=dims, keepdim=True)
    centred = x - mean
    var = (centred * centred).mean(dim=dims, keepdim=True)
    out = centred * torch.rsqrt(var + eps)
    if weight is not None:
        out = out * weight.to(out.dtype)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.to(input.dtype)


def add_layer_norm(
    input: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    dropout_p: float = 0.0,
    input_bias: torch.Tensor | None = None,
    *,
    return_prenorm: bool = False,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """BERT's "Add & Norm": ``layer_norm(residual + dropout(input + input_bias))``.

    With ``return_prenorm`` also returns the sum fed to the norm (the residual stream of pre-LN models).
    """
    h = input if input_bias is None else input + input_bias
    prenorm = residual + apply_dropout(h, dropout_p, dropout_mask)
    out = layer_norm(prenorm, (prenorm.shape[-1],), weight, bias, eps)
    return (out, prenorm) if return_prenorm else out
