import torch


def apply_dropout(x: torch.Tensor, p: float, keep_mask: torch.Tensor | None) -> torch.Tensor:
    """Inverted dropout: zero the dropped elements and scale the kept ones by 1 / (1 - p).

    With ``keep_mask`` (True = keep) the draw is given; otherwise it is taken from torch's RNG.
    """
    if keep_mask is None:
        if p == 0.0:
            return x
        return torch.nn.functional.dropout(x, p, training=True)
    if p >= 1.0:
        return x * 0.0
    return x * keep_mask.to(x.dtype) / (1.0 - p)
