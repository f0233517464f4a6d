"""Sinusoidal embedding of a scalar conditioning (time, or any real value such as a log-SNR), and learned embeddings
of class labels and float conditions."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ko_lightning.conditioning import Conditioning

__all__ = ["ConditionEmbedding", "SinusoidalTimeEmbedding", "expand_time"]


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


class ConditionEmbedding(nn.Module):
    """A learned embedding of a class label or a float condition, with a learned "no condition" entry.

    - ``num_classes=K``: ``nn.Embedding(K + 1, dim)``; labels ``0..K-1`` and ``K`` = "no condition".
    - ``cond_dim=k``: ``Linear(k, dim)`` of the condition; a row of NaN (or ``cond=None``) takes a learned null
      vector instead.

    The networks add it to their time embedding (docs/math.md §7). The null entry starts at zero, so an unconditional
    call of a fresh network is the plain time-conditioned network.

    Args:
        dim: embedding size.
        num_classes: number of classes, or None.
        cond_dim: width of a float condition, or None (exactly one of the two is given).
    """

    def __init__(self, dim: int, num_classes: int | None = None, cond_dim: int | None = None) -> None:
        super().__init__()
        if not Conditioning(num_classes, cond_dim).is_conditional:  # Conditioning checks each and "not both"
            raise ValueError("give exactly one of num_classes or cond_dim, got neither")
        self.num_classes = num_classes
        self.cond_dim = cond_dim
        if num_classes is not None:
            self.table = nn.Embedding(num_classes + 1, dim)
            with torch.no_grad():
                self.table.weight[num_classes].zero_()
        else:
            assert cond_dim is not None
            self.proj = nn.Linear(cond_dim, dim)
            self.null = nn.Parameter(torch.zeros(dim))

    def forward(self, cond: Tensor | None, batch_size: int, device: torch.device) -> Tensor:
        """Embed ``cond`` (labels ``(B,)`` or floats ``(B, cond_dim)``; None: "no condition") into ``(B, dim)``.

        Only shapes are checked here (no device sync: this runs in every training step and every ODE evaluation);
        ``FlowMatching`` checks label values where conditions enter (batches, ``sample``, ``velocity``), with
        :meth:`~ko_lightning.conditioning.Conditioning.check`.

        Raises:
            ValueError: naming ``cond`` for a wrong shape or dtype.
        """
        if self.num_classes is not None:
            if cond is None:
                cond = torch.full((batch_size,), self.num_classes, dtype=torch.long, device=device)
            if cond.is_floating_point() or tuple(cond.shape) != (batch_size,):
                raise ValueError(
                    f"cond must be integer labels of shape ({batch_size},), got {cond.dtype} {tuple(cond.shape)}"
                )
            return self.table(cond.long())
        if cond is None:
            return self.null.expand(batch_size, -1)
        if tuple(cond.shape) != (batch_size, self.cond_dim):
            raise ValueError(f"cond must have shape ({batch_size}, {self.cond_dim}), got {tuple(cond.shape)}")
        is_null = torch.isnan(cond).any(dim=1, keepdim=True)
        emb = self.proj(torch.nan_to_num(cond.to(self.proj.weight.dtype), nan=0.0))
        return torch.where(is_null, self.null.to(emb.dtype).expand_as(emb), emb)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}" if self.num_classes is not None else f"cond_dim={self.cond_dim}"
