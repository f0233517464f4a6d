"""The conditional flow-matching loss: time sampling, the path draw and the weighting (docs/math.md §1.2, §1.3)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ko_lightning.parametrizations import LossWeighting, OutputParametrization
from ko_lightning.paths import GaussianPath, PathSample
from ko_lightning.time_samplers import AutoTime, TabulatedImportanceTime, TimeSampler, UniformTime

__all__ = ["draw_time_and_noise", "draw_times", "flow_matching_loss", "sample_time"]


def sample_time(
    batch_size: int,
    device: torch.device,
    t_eps: float,
    generator: torch.Generator | None = None,
    sampler: TimeSampler | None = None,
) -> Tensor:
    """``t = t_eps + (1 - 2 t_eps) u`` with ``u`` from ``sampler`` (default ``u ~ U[0, 1]``), shape ``(batch_size,)``,
    fp32 (docs/math.md §1.4). Importance samplers need their path: :func:`draw_time_and_noise`."""
    if isinstance(sampler, (AutoTime, TabulatedImportanceTime)):
        raise ValueError(f"the {sampler} time sampler draws on a path: use draw_time_and_noise(..., path=...)")
    u = (sampler or UniformTime())(batch_size, generator, device)
    return t_eps + (1.0 - 2.0 * t_eps) * u


def draw_time_and_noise(
    x1: Tensor,
    t_eps: float,
    generator: torch.Generator | None = None,
    sampler: TimeSampler | None = None,
    path: GaussianPath | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Fresh times, noise ``x0 ~ N(0, I)`` (fp32, shaped like ``x1``) and per-sample loss weights for a data batch.

    The times come from :func:`sample_time`, or, for an importance sampler (``"speed"``, ``"cond_ot_snr"``, or
    ``"auto"`` on a KO path; docs/math.md §1.4, §1.5), from its density on ``path`` together with the weights
    ``c(t) / q(t)``; the weights are None otherwise. The times are drawn first, then the noise, both from
    ``generator``: the order fixes which numbers a seeded training step sees.
    """
    t, weights = draw_times(x1.shape[0], x1.device, t_eps, generator, sampler, path)
    x0 = torch.randn(x1.shape, device=x1.device, generator=generator)
    return t, x0, weights


def draw_times(
    batch_size: int,
    device: torch.device,
    t_eps: float,
    generator: torch.Generator | None = None,
    sampler: TimeSampler | None = None,
    path: GaussianPath | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Training times in ``[t_eps, 1 - t_eps]`` and, for an importance sampler on ``path``, their loss weights
    ``c(t) / q(t)`` (None for the other samplers; docs/math.md §1.4, §1.5)."""
    chosen = sampler.for_path(path) if isinstance(sampler, AutoTime) else sampler
    if isinstance(chosen, TabulatedImportanceTime):
        if path is None:
            raise ValueError(f"the {chosen} time sampler needs the path it samples on")
        return chosen.weighted_times(path, batch_size, generator, device, t_eps)
    return sample_time(batch_size, device, t_eps, generator, chosen), None


def flow_matching_loss(
    net: Callable[..., Tensor],
    parametrization: OutputParametrization,
    path: GaussianPath,
    x0: Tensor,
    x1: Tensor,
    t: Tensor,
    weighting: LossWeighting,
    cond: Tensor | None = None,
    weights: Tensor | None = None,
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
        cond: the condition of each sample for a conditional network (passed as ``net(..., cond=cond)``), or None.
        weights: per-sample weights ``(B,)`` of an importance sampler of ``t`` (the mean of ``weights * error``), or
            None.
    """
    sample: PathSample = path.sample(x0, x1, t, validate=False)
    out = parametrization.net_output(net, sample.x_t, t, sample.coefficients, cond)
    if weighting == "velocity":
        v = parametrization.to_velocity(out, sample.x_t, sample.coefficients)
        error = (v - sample.target).pow(2)
    else:
        error = (out.float() - parametrization.output_target(x0, x1, sample)).pow(2)
    if weights is None:
        return error.mean()
    return (weights.reshape(-1, *([1] * (error.ndim - 1))) * error).mean()
