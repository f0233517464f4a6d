"""Sinusoidal embedding of a scalar conditioning (time, or any real value such as a log-SNR)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["SinusoidalTimeEmbedding", "expand_time"]


def expand_time(t: Tensor | float, batch_size: int, device: torch.device | None = None) -> Tensor:
    """Return the conditioning as a float tensor of shape ``(batch_size,)``.

    Accepts a Python number, a 0-d tensor or a one-element tensor (broadcast to the batch), or a tensor of shape
    ``(batch_size,)`` / ``(batch_size, 1)``.

    Raises:
        ValueError: naming ``t`` if its shape does not fit the batch.
    """
    t = torch.as_tensor(t, device=device)
    if t.numel() == 1:
        return t.reshape(1).expand(batch_size)
    if t.ndim == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.ndim != 1 or t.shape[0] != batch_size:
        raise ValueError(f"t must have shape ({batch_size},) (or be a scalar), got {tuple(t.shape)}")
    return t


class SinusoidalTimeEmbedding(nn.Module):
    """Transformer-style sinusoidal features of a scalar ``t`` (DDPM's timestep embedding).

    With ``h = dim // 2`` frequencies ``w_k = max_period^(-k / h)``, ``k = 0..h-1``:

        emb(t) = [cos(scale * t * w_0), ..., cos(scale * t * w_{h-1}), sin(scale * t * w_0), ..., sin(...)]

    (a zero column is appended when ``dim`` is odd). ``scale = 1000`` makes ``t in [0, 1]`` resolve like DDPM's
    integer steps 0..1000; any real ``t`` is accepted (e.g. a log-SNR, for which ``scale`` around 1 to 100 suits
    better). Computed in fp32 whatever the input dtype.

    Args:
        dim: output dimension (>= 2).
        max_period: the longest period ``2 pi max_period`` of the features (in units of ``scale * t``).
        scale: multiplier applied to ``t`` before the features.

    Example:
        >>> emb = SinusoidalTimeEmbedding(64)
        >>> emb(torch.rand(8)).shape
        torch.Size([8, 64])
    """

    def __init__(self, dim: int, max_period: float = 10_000.0, scale: float = 1000.0) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2:
            raise ValueError(f"dim must be an int >= 2, got {dim!r}")
        if not max_period > 1:
            raise ValueError(f"max_period must be > 1, got {max_period}")
        self.dim = dim
        self.max_period = float(max_period)
        self.scale = float(scale)

    def forward(self, t: Tensor) -> Tensor:
        """Embed ``t`` of shape ``(B,)`` into ``(B, dim)`` (fp32)."""
        if t.ndim != 1:
            raise ValueError(f"t must have shape (B,), got {tuple(t.shape)}")
        half = self.dim // 2
        # frequencies are rebuilt in fp32 on every call (cheap), so they survive .half()/.to(bfloat16) of the model
        k = torch.arange(half, dtype=torch.float32, device=t.device)
        freqs = torch.exp(-math.log(self.max_period) * k / half)
        args = (self.scale * t.float())[:, None] * freqs[None, :]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
        if self.dim % 2:
            emb = nn.functional.pad(emb, (0, 1))
        return emb

    def extra_repr(self) -> str:
        return f"dim={self.dim}, max_period={self.max_period:g}, scale={self.scale:g}"
