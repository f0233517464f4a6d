"""Bits per dimension of integer data (8-bit images, the digits) under a flow: dequantize, solve, convert.

Both entry points share :class:`~ko_lightning.likelihood.pixels.PixelMap` (the dequantization and the discrete
bits/dim formula with its Jacobian term): :func:`bits_per_dim` for a velocity and data mapped onto a range,
:func:`pixel_bits_per_dim` for a trained model and pixels under a data module's ``(pixel - mean) / scale``.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import Tensor

from ko_lightning.likelihood.pixels import DIGITS_LEVELS, DequantizeMethod, PixelMap
from ko_lightning.likelihood.results import BitsPerDimResult, LogProbResult, PixelBpd
from ko_lightning.likelihood.solve import log_prob
from ko_lightning.likelihood.trace import DivergenceMethod, ProbeKind, VelocityFn
from ko_lightning.ode import SolverSpec

__all__ = ["LogProbModel", "bits_per_dim", "pixel_bits_per_dim"]

_LN2 = math.log(2.0)


class LogProbModel(Protocol):
    """What :func:`pixel_bits_per_dim` needs from a model (:class:`ko_lightning.FlowMatching` has it)."""

    @property
    def device(self) -> torch.device:
        """Where the model's parameters live."""
        ...

    def log_prob(
        self,
        x: Tensor,
        method: str = ...,
        steps: int | None = ...,
        atol: float | None = ...,
        rtol: float | None = ...,
        divergence: str = ...,
        generator: torch.Generator | None = ...,
    ) -> LogProbResult:
        """The model's log-density of data ``x`` in its own space (a batch at a time)."""
        ...


def bits_per_dim(
    velocity: VelocityFn,
    x: Tensor,
    solver: SolverSpec | None = None,
    divergence: DivergenceMethod = "auto",
    probe: ProbeKind = "rademacher",
    num_probes: int = 1,
    generator: torch.Generator | None = None,
    create_graph: bool | None = None,
    t_start: float = 1.0,
    t_end: float = 0.0,
    progress: bool = False,
    dequantize: DequantizeMethod = "uniform",
    num_bins: int = 256,
    data_range: tuple[float, float] = (-1.0, 1.0),
    context: str | None = None,
    pixel_map: PixelMap | None = None,
) -> BitsPerDimResult:
    """Bits per dimension of integer data (8-bit images) under a flow, with dequantization.

    With ``u = (x_int + w) / num_bins``, ``w ~ U[0, 1)^D``, and ``y = lo + (hi - lo) u`` the model's input,
    the probability of the discrete data is the mass of its cell, ``P(x_int) = num_bins^-D E_w[p_u(u)]`` with
    ``p_u(u) = p(y) (hi - lo)^D``. Jensen's inequality gives the standard dequantized bound

        -log2 P(x_int) / D  <=  -(E_w log p(y) + D log((hi - lo) / num_bins)) / (D ln 2),

    which this function estimates with one draw of ``w`` per sample (``+ 7`` bits for 8-bit data on ``[-1, 1]``).
    ``dequantize="center"`` uses ``w = 1/2`` instead (deterministic, not a bound).

    Args:
        velocity, solver, divergence, probe, num_probes, create_graph, t_start, t_end, progress, context: as in
            :func:`log_prob`.
        x: integer data: a uint8 tensor, or an integer-valued tensor in ``[0, num_bins - 1]``, shape ``(B, ...)``.
        generator: random generator for the dequantization noise (drawn first) and then the probes.
        dequantize: ``"uniform"`` (the bound) or ``"center"``.
        num_bins: number of levels (256 for 8-bit data).
        data_range: ``(lo, hi)``, the interval the model was trained on (default ``[-1, 1]``).
        pixel_map: the data's own map from integer pixels to the model's space (a data module's ``pixel_map()``,
            e.g. a per-pixel mean and a scale); given, it replaces ``num_bins`` and ``data_range``.

    Returns:
        ``BitsPerDimResult`` with ``bpd`` of shape ``(B,)``.

    Raises:
        ValueError: naming ``x`` for a wrong dtype, non-integer values or values outside ``[0, num_bins - 1]``;
            naming ``dequantize``, ``num_bins`` or ``data_range`` for bad settings.

    Example:
        >>> img = torch.randint(0, 256, (2, 1, 2, 2), dtype=torch.uint8)
        >>> bits_per_dim(lambda x, t: 0 * x, img, SolverSpec("euler", steps=1)).bpd.shape
        torch.Size([2])
    """
    pixel_map = PixelMap.from_range(num_bins, data_range) if pixel_map is None else pixel_map
    noise_device = x.device if torch.is_tensor(x) else torch.device("cpu")
    y = pixel_map.dequantize(x, dequantize, generator, noise_device, "x")
    num_dims = y[0].numel()
    result = log_prob(
        velocity,
        y,
        solver=solver,
        divergence=divergence,
        probe=probe,
        num_probes=num_probes,
        generator=generator,
        create_graph=create_graph,
        t_start=t_start,
        t_end=t_end,
        progress=progress,
        context=context,
    )
    log_det = pixel_map.log_det(num_dims)
    return BitsPerDimResult(
        bpd=pixel_map.bits_per_dim(result.log_prob, num_dims),
        log_prob_discrete=result.log_prob + log_det,
        log_det=log_det,
        num_dims=num_dims,
        std_error=None if result.std_error is None else result.std_error / (num_dims * _LN2),
        likelihood=result,
    )


def pixel_bits_per_dim(
    model: LogProbModel,
    pixels: Tensor,
    mean: Tensor,
    scale: Tensor | float,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    divergence: str = "auto",
    generator: torch.Generator | None = None,
    batch_size: int = 256,
    levels: int = DIGITS_LEVELS,
) -> PixelBpd:
    """Discrete bits/dim of integer pixels under a model trained in the normalized space ``(x - mean) / scale``.

    Dequantizes as :func:`~ko_lightning.likelihood.dequantize_pixels` (one ``u`` per pixel), computes ``log p_y``
    with ``model.log_prob`` (dopri5, data at ``t = 1 - t_eps``) and converts as
    :func:`~ko_lightning.likelihood.discrete_bits_per_dim`.

    Args:
        model: the trained flow.
        pixels: integer pixels in ``[0, levels - 1]``, shape ``(B, *data_shape)``.
        mean: per-pixel mean of the normalization.
        scale: global scale of the normalization.
        atol: dopri5 absolute tolerance.
        rtol: dopri5 relative tolerance.
        divergence: ``"auto"``, ``"exact"`` or ``"hutchinson"``.
        generator: source of the dequantization noise (all of it drawn first) and then of the Hutchinson probes.
        batch_size: samples per solve.
        levels: number of integer levels.

    Returns:
        :class:`PixelBpd` with the per-sample bits/dim (CPU, float64) and the total NFE.
    """
    pixel_map = PixelMap.from_normalization(torch.as_tensor(mean), scale, levels)
    y = pixel_map.dequantize(pixels, "uniform", generator, torch.device("cpu"), "pixels")
    num_dims = int(y[0].numel())
    out, nfe = [], 0
    for chunk in y.split(batch_size):
        res = model.log_prob(
            chunk.to(model.device), method="dopri5", atol=atol, rtol=rtol, divergence=divergence, generator=generator
        )
        out.append(res.log_prob.detach().double().cpu())
        nfe += res.nfe
    return PixelBpd(pixel_map.bits_per_dim(torch.cat(out), num_dims), nfe)
