"""What the network predicts, and how that prediction becomes a velocity: one small object per parametrization.

A Gaussian path ``x_t = alpha_t x1 + sigma_t x0`` (docs/math.md §1.1) has the conditional velocity
``u = alpha'_t x1 + sigma'_t x0``. At a fixed ``t`` every parametrization is an affine map of the network output to
that velocity, so the flow-matching loss in velocity units is a time-weighted MSE in the output space, and all
parametrizations have the same minimizer (docs/math.md §1.3). Each object answers four questions:

- :meth:`~OutputParametrization.net_input`: what ``net`` is called with;
- :meth:`~OutputParametrization.to_velocity`: network output to velocity;
- :meth:`~OutputParametrization.output_target`: what the network should output for a draw ``(x0, x1, t)``;
- :meth:`~OutputParametrization.to_x1`: the network's estimate of ``E[x1 | x_t]``;

plus its :attr:`~OutputParametrization.default_loss_weighting` and its :meth:`~OutputParametrization.velocity_weight`
(the factor between the two loss weightings). :func:`parametrization_from_name` resolves the names ``FlowMatching``
accepts (``"velocity"``, ``"x1"``, ``"eps"``, ``"polar_v"``) to these objects.

All conversions compute in fp32, also when the network runs under bf16 autocast.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar, Literal

import torch
from torch import Tensor

from ko_lightning.paths import PathCoefficients, PathSample

__all__ = [
    "PARAMETRIZATIONS",
    "EpsParametrization",
    "LossWeighting",
    "OutputParametrization",
    "ParametrizationName",
    "PolarVelocityParametrization",
    "VelocityParametrization",
    "X1Parametrization",
    "parametrization_from_name",
    "polar_coordinates",
]

ParametrizationName = Literal["velocity", "x1", "eps", "polar_v"]
#: ``"velocity"``: the MSE of the implied velocity (the flow-matching objective); ``"output"``: the plain MSE of the
#: network output against :meth:`OutputParametrization.output_target`. Same minimizer, different time weighting.
LossWeighting = Literal["velocity", "output"]
Pair = tuple[float, float]  # a value at both ends (lo, hi) of the integration range


def polar_coordinates(c: PathCoefficients) -> tuple[Tensor, Tensor, Tensor]:
    """``(sin theta, cos theta, r)`` of the polar form ``(alpha, sigma) = r (sin theta, cos theta)``.

    See docs/math.md §1.1. ``r = sqrt(alpha^2 + sigma^2) > 0`` on every path, so nothing here divides by a
    vanishing coefficient.
    """
    r = torch.sqrt(c.alpha**2 + c.sigma**2)
    return c.alpha / r, c.sigma / r, r


@dataclass(frozen=True)
class OutputParametrization(ABC):
    """How to call the network and how to read its output, for one parametrization (docs/math.md §1.3).

    Stateless: the path enters through the coefficients ``c`` (broadcast against ``x_t``) of each call.
    """

    #: the name ``FlowMatching(parametrization=...)`` and checkpoints use.
    name: ClassVar[str]
    #: the loss weighting ``FlowMatching`` picks when none is given.
    default_loss_weighting: ClassVar[LossWeighting] = "velocity"

    def net_input(self, x_t: Tensor, t: Tensor, c: PathCoefficients) -> tuple[Tensor, Tensor]:
        """The arguments of ``net``: ``(x_t, t)``, with ``t`` of shape ``(B,)``."""
        return x_t, t

    def net_output(
        self,
        net: Callable[..., Tensor],
        x_t: Tensor,
        t: Tensor,
        c: PathCoefficients,
        cond: Tensor | None = None,
    ) -> Tensor:
        """Run ``net`` on :meth:`net_input` (and ``cond=cond`` when a condition is given: an unconditional network is
        always called as ``net(x, t)``) and check that its output has the shape of ``x_t``.

        Raises:
            ValueError: naming both shapes, when the network's output and input differ in shape.
        """
        args = self.net_input(x_t, t, c)
        out = net(*args) if cond is None else net(*args, cond=cond)
        if out.shape != x_t.shape:
            raise ValueError(f"net output has shape {tuple(out.shape)} but its input x has {tuple(x_t.shape)}")
        return out

    @abstractmethod
    def to_velocity(self, out: Tensor, x_t: Tensor, c: PathCoefficients) -> Tensor:
        """The velocity ``v(x_t, t)`` the network output ``out`` stands for, fp32."""

    @abstractmethod
    def output_target(self, x0: Tensor, x1: Tensor, sample: PathSample) -> Tensor:
        """What the network should output for the draw ``sample`` of ``(x0, x1)`` (its regression target), fp32."""

    @abstractmethod
    def to_x1(self, out: Tensor, x_t: Tensor, c: PathCoefficients) -> Tensor:
        """The estimate of ``E[x1 | x_t]`` that the network output ``out`` stands for, fp32."""

    @abstractmethod
    def velocity_weight(self, c: PathCoefficients) -> Tensor:
        """``w_t`` with ``||to_velocity(out) - u||^2 = w_t ||out - output_target||^2``: the velocity loss as a weighted
        output-space loss (docs/math.md §1.3)."""

    def undefined_end(self, alpha: Pair, sigma: Pair, ends: Pair) -> str | None:
        """Why :meth:`to_velocity` is undefined at an end of ``ends = (lo, hi)``, or None where it is defined.

        Args:
            alpha: ``alpha_t`` at ``lo`` and ``hi``.
            sigma: ``sigma_t`` at ``lo`` and ``hi``.
            ends: ``(lo, hi)``, the range sampling and likelihoods integrate over.
        """
        return None


@dataclass(frozen=True)
class VelocityParametrization(OutputParametrization):
    """The network outputs the velocity itself: ``v = out``; weight 1.

    ``x1 = (v - (sigma'/sigma) x_t) / beta_t`` with ``beta_t = alpha' - sigma' alpha / sigma``.
    """

    name: ClassVar[str] = "velocity"

    def to_velocity(self, out: Tensor, x_t: Tensor, c: PathCoefficients) -> Tensor:
        return out.float()

    def output_target(self, x0: Tensor, x1: Tensor, sample: PathSample) -> Tensor:
        return sample.target

    def to_x1(self, out: Tensor, x_t: Tensor, c: PathCoefficients) -> Tensor:
        return c.x1_from_velocity(x_t, out)

    def velocity_weight(self, c: PathCoefficients) -> Tensor:
        return torch.ones_like(c.alpha)


@dataclass(frozen=True)
class X1Parametrization(OutputParametrization):
    """The network predicts the data: ``x1_hat = out``, ``v = (sigma'/sigma) x_t + beta_t x1_hat``.

    The conditional target has the same form with ``x1``, so ``v - u = beta_t (x1_hat - x1)``: the velocity loss is
    ``beta_t^2 ||x1_hat - x1||^2``. Undefined where ``sigma_t = 0`` (t = 1 with ``sigma_min = 0``).
    """

    name: ClassVar[str] = "x1"

    def to_velocity(self, out: Tensor, x_t: Tensor, c: PathCoefficients) -> Tensor:
        return c.velocity_from_x1(x_t, out)

    def output_target(self, x0: Tensor, x1: Tensor, sample: PathSample) -> Tensor:
        return x1.float()

    def to_x1(self, out: Tensor, x_t: Tensor, c: PathCoefficients) -> Tensor:
        return out.float()

    def velocity_weight(self, c: PathCoefficients) -> Tensor:
        return c.beta**2

    def undefined_end(self, alpha: Pair, sigma: Pair, ends: Pair) -> str | None:
        if sigma[1] > 0:
            return None
        return (
            f"parametrization 'x1' converts through eps = (x_t - alpha_t x1) / sigma_t and sigma_t = "
            f"{sigma[1]:g} at t = {ends[1]:g}"
        )


@dataclass(frozen=True)
class EpsParametrization(OutputParametrization):
    """The network predicts the noise: ``eps_hat = out``, ``v = (alpha'/alpha) x_t + (sigma' - alpha' sigma/alpha)
    eps_hat`` and ``x1 = (x_t - sigma_t eps_hat) / alpha_t``.

    The velocity weight is ``(sigma' - alpha' sigma / alpha)^2 = beta_t^2 / s_t^2``, singular where ``alpha_t = 0``
    (t = 0).
    """

    name: ClassVar[str] = "eps"

    def to_velocity(self, out: Tensor, x_t: Tensor, c: PathCoefficients) -> Tensor:
        return c.velocity_from_eps(x_t, out)

    def output_target(self, x0: Tensor, x1: Tensor, sample: PathSample) -> Tensor:
        return x0.float()

    def to_x1(self, out: Tensor, x_t: Tensor, c: PathCoefficients) -> Tensor:
        return c.x1_from_eps(x_t, out)

    def velocity_weight(self, c: PathCoefficients) -> Tensor:
        return (c.d_sigma - c.d_alpha * c.sigma / c.alpha) ** 2

    def undefined_end(self, alpha: Pair, sigma: Pair, ends: Pair) -> str | None:
        if alpha[0] > 0:
            return None
        return (
            f"parametrization 'eps' converts through x1 = (x_t - sigma_t eps) / alpha_t and alpha_t = "
            f"{alpha[0]:g} at t = {ends[0]:g} (the predicted noise does not determine E[x1 | x_t] there)"
        )


@dataclass(frozen=True)
class PolarVelocityParametrization(OutputParametrization):
    """Path-invariant: the angular velocity of the point rescaled to unit radius (docs/math.md §1.3, §5.2).

    With ``(alpha, sigma) = r (sin theta, cos theta)``, the network sees ``net(x_t / r, 2 theta / pi)`` and predicts
    ``v_theta = cos(theta) x1 - sin(theta) x0``. ``(x_t / r, v_theta)`` is ``(x1, x0)`` rotated by ``theta``, so

    - ``x1 = sin(theta) x_t / r + cos(theta) v_theta`` and ``x0 = cos(theta) x_t / r - sin(theta) v_theta``;
    - ``u = alpha' x1 + sigma' x0 = r' x_t / r + r theta' v_theta``, and the velocity weight is ``(r theta')^2``.

    No conversion divides by a coefficient that vanishes at an end (``r > 0``), and the function the network learns,
    ``E[v_theta | x_t / r, theta]``, is the same on every Gaussian path, so a schedule change does not invalidate it.
    ``(r theta')^2`` is large where a path turns fast (the KO path near t = 0, docs/math.md §4.5), so the default loss
    is the unweighted output MSE ``||v_hat - v_theta||^2``.
    """

    name: ClassVar[str] = "polar_v"
    default_loss_weighting: ClassVar[LossWeighting] = "output"

    def net_input(self, x_t: Tensor, t: Tensor, c: PathCoefficients) -> tuple[Tensor, Tensor]:
        """``(x_t / r, 2 theta / pi)``: the point at unit radius (in ``x_t``'s dtype) and the angle in ``[0, 1]``."""
        sin, cos, r = polar_coordinates(c)
        angle = torch.atan2(sin, cos).reshape(-1) * (2.0 / torch.pi)
        return (x_t.float() / r).to(x_t.dtype), angle

    def to_velocity(self, out: Tensor, x_t: Tensor, c: PathCoefficients) -> Tensor:
        sin, cos, r = polar_coordinates(c)
        x_unit, v = x_t.float() / r, out.float()
        return c.d_alpha * (sin * x_unit + cos * v) + c.d_sigma * (cos * x_unit - sin * v)

    def output_target(self, x0: Tensor, x1: Tensor, sample: PathSample) -> Tensor:
        sin, cos, _ = polar_coordinates(sample.coefficients)
        return cos * x1.float() - sin * x0.float()

    def to_x1(self, out: Tensor, x_t: Tensor, c: PathCoefficients) -> Tensor:
        sin, cos, r = polar_coordinates(c)
        return sin * (x_t.float() / r) + cos * out.float()

    def velocity_weight(self, c: PathCoefficients) -> Tensor:
        # r theta' = (sigma alpha' - alpha sigma') / r (docs/math.md §1.1)
        return ((c.sigma * c.d_alpha - c.alpha * c.d_sigma) ** 2) / (c.alpha**2 + c.sigma**2)


#: name -> parametrization, for the names ``FlowMatching`` accepts (the CLI, hyperparameters and checkpoints use them).
PARAMETRIZATIONS: Mapping[str, OutputParametrization] = MappingProxyType(
    {
        p.name: p
        for p in (VelocityParametrization(), X1Parametrization(), EpsParametrization(), PolarVelocityParametrization())
    }
)


def parametrization_from_name(name: str) -> OutputParametrization:
    """The parametrization called ``name`` (a key of :data:`PARAMETRIZATIONS`).

    Raises:
        ValueError: naming the accepted names and ``name``.

    Example:
        >>> parametrization_from_name("polar_v").default_loss_weighting
        'output'
    """
    if not isinstance(name, str) or name not in PARAMETRIZATIONS:
        raise ValueError(f"parametrization must be one of {tuple(PARAMETRIZATIONS)}, got {name!r}")
    return PARAMETRIZATIONS[name]
