"""What a conditional network is conditioned on, and the "no condition" value that classifier-free guidance needs.

Two kinds of condition (docs/math.md §7):

- **class labels**: an integer tensor ``(B,)`` with values in ``[0, num_classes - 1]``; the index ``num_classes`` is
  the "no condition" token.
- **float conditions**: a tensor ``(B, cond_dim)``; a row of NaN is "no condition" (a network maps it to a learned
  null embedding).

A network is conditional when it has an attribute ``num_classes`` or ``cond_dim`` that is not None (``TimeMLP`` and
``UNet`` have both, None unless asked for); it is then called as ``net(x, t, cond=...)``, and ``cond=None`` means
"no condition" for the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["Conditioning"]


def _optional_positive_int(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    return value


@dataclass(frozen=True)
class Conditioning:
    """The condition a network takes: ``num_classes`` labels, ``cond_dim`` floats, or none (both None).

    Attributes:
        num_classes: number of classes ``K`` (labels ``0..K-1``; ``K`` is "no condition"), or None.
        cond_dim: width ``k`` of a float condition ``(B, k)``, or None.
    """

    num_classes: int | None = None
    cond_dim: int | None = None

    def __post_init__(self) -> None:
        _optional_positive_int("num_classes", self.num_classes)
        _optional_positive_int("cond_dim", self.cond_dim)
        if self.num_classes is not None and self.cond_dim is not None:
            raise ValueError(
                f"give num_classes or cond_dim, not both (got num_classes={self.num_classes}, cond_dim={self.cond_dim})"
            )

    @classmethod
    def of(cls, net: Any) -> Conditioning:
        """The conditioning a network declares through its ``num_classes`` / ``cond_dim`` attributes."""
        return cls(getattr(net, "num_classes", None), getattr(net, "cond_dim", None))

    @property
    def is_conditional(self) -> bool:
        """Whether the network takes a condition at all."""
        return self.num_classes is not None or self.cond_dim is not None

    def describe(self) -> str:
        """``num_classes=K``, ``cond_dim=k`` or ``unconditional``: how errors name the network's conditioning."""
        if self.num_classes is not None:
            return f"num_classes={self.num_classes}"
        if self.cond_dim is not None:
            return f"cond_dim={self.cond_dim}"
        return "unconditional"

    def check(
        self, cond: Any, batch_size: int, name: str = "cond", allow_null: bool = False, check_values: bool = True
    ) -> Tensor:
        """``cond`` checked against this conditioning and the batch size (a Python int class is broadcast).

        Args:
            cond: labels ``(B,)`` (or one int for all) or floats ``(B, cond_dim)``.
            batch_size: ``B``.
            name: how errors name the argument (``"cond"``, ``"train batch 3: labels"``).
            allow_null: accept the "no condition" value (label ``num_classes``, a NaN row).
            check_values: also check the values (labels in range, finite floats): one device sync; False checks
                dtype and shape only.

        Returns:
            The condition as a tensor: int64 labels ``(B,)`` or fp32 ``(B, cond_dim)``.

        Raises:
            ValueError: naming ``name`` for an unconditional network, a wrong shape, labels out of range, or
                non-finite float conditions; TypeError for the wrong dtype.
        """
        if not self.is_conditional:
            raise ValueError(
                f"{name} was given but the network is unconditional: build it with num_classes=K (class labels) or "
                "cond_dim=k (float conditions), or leave the condition out"
            )
        if isinstance(cond, int) and not isinstance(cond, bool) and self.num_classes is not None:
            cond = torch.full((batch_size,), cond, dtype=torch.long)
        if not torch.is_tensor(cond):
            raise TypeError(f"{name} must be a tensor (or one int class), got {type(cond).__name__}")
        if self.num_classes is not None:
            return self._check_labels(cond, batch_size, name, allow_null, check_values)
        return self._check_floats(cond, batch_size, name, allow_null, check_values)

    def _check_labels(self, cond: Tensor, batch_size: int, name: str, allow_null: bool, check_values: bool) -> Tensor:
        assert self.num_classes is not None
        if cond.is_floating_point() or cond.is_complex() or cond.dtype == torch.bool:
            raise TypeError(
                f"{name} must hold integer class labels for a network with num_classes={self.num_classes}, "
                f"got dtype {cond.dtype}"
            )
        if cond.ndim == 2 and cond.shape[1] == 1:
            cond = cond[:, 0]
        if tuple(cond.shape) != (batch_size,):
            raise ValueError(f"{name} must have shape ({batch_size},) (one label per sample), got {tuple(cond.shape)}")
        if not check_values:
            return cond.long()
        top = self.num_classes + (1 if allow_null else 0)
        bad = (cond < 0) | (cond >= top)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"{name}[{i}] = {int(cond[i])} is out of range: labels must lie in [0, {top - 1}] for "
                f"num_classes={self.num_classes}"
                + (f" (index {self.num_classes} is 'no condition')" if allow_null else "")
            )
        return cond.long()

    def _check_floats(self, cond: Tensor, batch_size: int, name: str, allow_null: bool, check_values: bool) -> Tensor:
        if not cond.is_floating_point():
            raise TypeError(
                f"{name} must be a float tensor for a network with cond_dim={self.cond_dim}, got {cond.dtype}"
            )
        if tuple(cond.shape) != (batch_size, self.cond_dim):
            raise ValueError(f"{name} must have shape ({batch_size}, {self.cond_dim}), got {tuple(cond.shape)}")
        if not check_values:
            return cond.float()
        finite = torch.isfinite(cond)
        null_rows = torch.isnan(cond).all(dim=1) if allow_null else torch.zeros_like(finite[:, 0])
        bad = ~(finite.all(dim=1) | null_rows)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"{name}[{i}] has non-finite values; float conditions must be finite"
                + (" (a row of all NaN is 'no condition')" if allow_null else "")
            )
        return cond.float()

    def null(self, batch_size: int, device: torch.device | str = "cpu") -> Tensor:
        """The "no condition" value for ``batch_size`` samples: label ``num_classes``, or rows of NaN."""
        if self.num_classes is not None:
            return torch.full((batch_size,), self.num_classes, dtype=torch.long, device=device)
        if self.cond_dim is not None:
            return torch.full((batch_size, self.cond_dim), float("nan"), device=device)
        raise ValueError("an unconditional network has no 'no condition' value")

    def drop(self, cond: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
        """Replace each sample's condition by "no condition" with probability ``p`` (classifier-free guidance
        training). One uniform number per sample is drawn from ``generator``, also when ``p == 0``, so that the
        noise stream of a step does not depend on ``p``."""
        keep = torch.rand(cond.shape[0], device=cond.device, generator=generator) >= p
        null = self.null(cond.shape[0], cond.device)
        mask = keep if cond.ndim == 1 else keep[:, None]
        return torch.where(mask, cond, null)
