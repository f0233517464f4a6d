"""Classifier-free guidance: the velocity ``v_uncond + w (v_cond - v_uncond)`` of a conditional model (docs/math.md §7).

With ``w = 1`` this is the conditional velocity and costs one network call per evaluation; with ``w = 0`` it is the
unconditional one (the model called without a condition), also one call. Any other ``w`` evaluates both halves in
one call on a batch twice the size, ``[x, x]`` with conditions ``[c, null]``, which counts as two network calls.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ko_lightning.conditioning import Conditioning

__all__ = ["GuidedVelocity", "check_guidance"]

#: ``velocity(x, t, cond)``; ``cond=None`` is "no condition".
ConditionalVelocityFn = Callable[[Tensor, Tensor, Tensor | None], Tensor]


def check_guidance(
    conditioning: Conditioning, cond: Any, guidance_scale: Any, batch_size: int
) -> tuple[Tensor | None, float]:
    """The condition and guidance scale of a sample, checked (each error names the argument).

    Returns:
        ``(cond, w)``: the checked condition (None: unconditional) and the scale (1 when ``cond`` is given without
        one; 0 means "no condition").

    Raises:
        ValueError: ``guidance_scale`` for an unconditional model, without ``cond``, or not finite; ``cond`` as
            :meth:`~ko_lightning.conditioning.Conditioning.check` says.
    """
    if guidance_scale is not None:
        if not conditioning.is_conditional:
            raise ValueError(
                f"guidance_scale={guidance_scale!r} needs a conditional model (a network with num_classes or "
                "cond_dim); this one is unconditional"
            )
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
            raise ValueError(f"guidance_scale must be a real number, got {guidance_scale!r}")
        if not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be finite, got {guidance_scale!r}")
        if cond is None:
            raise ValueError(
                f"guidance_scale={guidance_scale!r} needs cond= (the condition to guide towards); without cond the "
                "model samples unconditionally"
            )
    if cond is None:
        return None, 0.0
    checked = conditioning.check(cond, batch_size, "cond")
    return checked, 1.0 if guidance_scale is None else float(guidance_scale)


@dataclass(frozen=True)
class GuidedVelocity:
    """``v(x, t) = v(x, t, null) + w (v(x, t, cond) - v(x, t, null))`` for fixed per-sample conditions.

    Attributes:
        velocity: the model velocity ``velocity(x, t, cond)``.
        cond: one condition per sample (rows aligned with ``x``, on the model's device), or None for the
            unconditional model.
        scale: the guidance scale ``w``.
        null: the "no condition" value for the batch (needed when ``0 != w != 1``).
    """

    velocity: ConditionalVelocityFn
    cond: Tensor | None
    scale: float
    null: Tensor | None = None
    both: Tensor | None = field(init=False, default=None)  # [cond, null], built once: the solver calls us per step

    def __post_init__(self) -> None:
        if self.cond is not None and self.calls_per_evaluation == 2:
            if self.null is None:
                raise ValueError("a guided velocity with 0 != w != 1 needs the null condition")
            object.__setattr__(self, "both", torch.cat([self.cond, self.null]))

    @property
    def calls_per_evaluation(self) -> int:
        """Network calls per velocity evaluation: 2 when both halves are needed, else 1."""
        return 1 if self.cond is None or self.scale in (0.0, 1.0) else 2

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        if self.both is None:  # w = 0 or no condition: the unconditional model; w = 1: the conditional one
            return self.velocity(x, t, None if self.scale == 0.0 else self.cond)
        t2 = torch.cat([t, t]) if t.ndim == 1 else t
        v_cond, v_uncond = self.velocity(torch.cat([x, x]), t2, self.both).chunk(2)
        return v_uncond + self.scale * (v_cond - v_uncond)
