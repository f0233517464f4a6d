"""What the callbacks need from a module: a structural type, so that any LightningModule with these members works.

:class:`ko_lightning.FlowMatching` satisfies both protocols; a user's own module can too, without inheriting from it.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from ko_lightning.paths import GaussianPath
from ko_lightning.sampling import SampleResult

__all__ = ["PathModule", "SamplingModule"]


@runtime_checkable
class PathModule(Protocol):
    """A module trained on a replaceable Gaussian path that can estimate ``E[x1 | x_t]`` (the KO callback's needs)."""

    @property
    def path(self) -> GaussianPath:
        """The current path, on the module's device."""
        ...

    @property
    def device(self) -> torch.device:
        """Where the network's parameters live."""
        ...

    def set_path(self, path: GaussianPath) -> None:
        """Install a new path at a step boundary (parameters and optimizer state untouched)."""
        ...

    def predict_x1(self, x: Tensor, t: Tensor) -> Tensor:
        """The model's estimate of ``E[x1 | x_t = x]`` in fp32, ``t`` of shape ``(B,)``. A conditional module
        (one with a ``conditioning``, docs/math.md §7) also takes ``cond=`` and returns ``E[x1 | x_t = x, cond]``."""
        ...

    def eval_mode(self) -> AbstractContextManager[None]:
        """A context in which the network runs in eval mode (restoring the previous mode afterwards)."""
        ...


@runtime_checkable
class SamplingModule(Protocol):
    """A module that draws samples by solving its flow ODE (the sample report's needs)."""

    data_shape: tuple[int, ...] | None

    def sample(self, *, x0: Tensor, method: str, steps: int) -> SampleResult:
        """Samples from initial noise ``x0`` with a fixed-step ``method`` of ``steps`` steps."""
        ...
