"""The conditional flow-matching loss: time sampling, the path draw and the weighting (docs/math.md §1.2, §1.3)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ko_lightning.parametrizations import LossWeighting, OutputParametrization
from ko_lightning.paths import GaussianPath, PathSample

__all__ = ["draw_time_and_noise", "flow_matching_loss", "sample_time"]


def sample_time(
    batch_size: int, device: torch.device, t_eps: float, generator: torch.Generator | None = None
) -> Tensor:
    """``t ~ U[t_eps, 1 - t_eps]``, shape ``(batch_size,)``, fp32."""
    u = torch.rand(batch_size, device=device, generator=generator)
    return t_eps + (1.0 - 2.0 * t_eps) * u


def draw_time_and_noise(x1: Tensor, t_eps: float, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Fresh times ``t ~ U[t_eps, 1 - t_eps]`` and noise ``x0 ~ N(0, I)`` (fp32, shaped like ``x1``) for a data batch.

    The times are drawn first, then the noise, both from ``generator``: the order fixes which numbers a seeded
    training step sees.
    """
    t = sample_time(x1.shape[0], x1.device, t_eps, generator)
    x0 = torch.randn(x1.shape, device=x1.device, generator=generator)
    return t, x0


def flow_matching_loss(
    net: Callable[[Tensor, Tensor], Tensor],
    parametrization: OutputParametrization,
    path: GaussianPath,
    x0: Tensor,
    x1: Tensor,
    t: Tensor,
    weighting: LossWeighting,
) -> Tensor:
    """The loss of ``net`` on the draw ``x_t = alpha_t x1 + sigma_t x0``, a mean over all elements, in fp32.

    - ``weighting="velocity"``: ``mean ||v(x_t, t) - (alpha'_t x1 + sigma'_t x0)||^2``, the flow-matching objective,
      with ``v`` the velocity the network output stands for.
    - ``weighting="output"``: ``mean ||out - target||^2`` in the network's output space (``target`` from
      :meth:`~ko_lightning.parametrizations.OutputParametrization.output_target`).

    The two differ pointwise by the factor
    :meth:`~ko_lightning.parametrizations.OutputParametrization.velocity_weight` and share their minimizer.

    Args:
        net: the network, called as the parametrization says.
        parametrization: how to call ``net`` and read its output.
        path: the Gaussian path.
        x0: noise, shaped like ``x1``.
        x1: data, shape ``(B, ...)``.
        t: times in ``[0, 1]``, shape ``(B,)``; not range-checked (they come from :func:`sample_time` or a caller
            that knows them).
        weighting: ``"velocity"`` or ``"output"``.
    """
    sample: PathSample = path.sample(x0, x1, t, validate=False)
    out = parametrization.net_output(net, sample.x_t, t, sample.coefficients)
    if weighting == "velocity":
        v = parametrization.to_velocity(out, sample.x_t, sample.coefficients)
        return (v - sample.target).pow(2).mean()
    return (out.float() - parametrization.output_target(x0, x1, sample)).pow(2).mean()
