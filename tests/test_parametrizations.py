"""Parametrization objects: exact conversions for an oracle network output, and the loss weights (docs/math.md §1.3).

Every reference below is written in closed form for two analytic paths and computed in float64 from the same fp32
draws, independently of ``PathCoefficients`` and of the conversion code under test:

- Cond-OT (``sigma_min = 0``): ``alpha = t``, ``sigma = 1 - t``, ``alpha' = 1``, ``sigma' = -1``;
- cosine: ``alpha = sin(pi t / 2)``, ``sigma = cos(pi t / 2)``, ``alpha' = (pi/2) cos``, ``sigma' = -(pi/2) sin``.

Tolerance: fp32 has unit roundoff 2**-24 = 6e-8. Each conversion is at most ~6 fp32 roundings of terms whose size is
the data scale times a coefficient ratio (``|sigma'/sigma|``, ``|alpha'/alpha|``, ``sigma/alpha``, ``beta``) of at
most 10 on ``t in [0.1, 0.9]``, so the error is below ~4e-6 of the largest entry; the checks allow 1e-5 of it. A
wrong formula (a sign, a missing factor, swapped coefficients) is off by O(1).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from ko_lightning import FlowMatching
from ko_lightning.nets import TimeMLP
from ko_lightning.objective import flow_matching_loss
from ko_lightning.parametrizations import PARAMETRIZATIONS, OutputParametrization, parametrization_from_name
from ko_lightning.paths import CondOTPath, CosinePath, GaussianPath
from ko_lightning.protocols import PathModule, SamplingModule

TIMES = (0.1, 0.3, 0.5, 0.7, 0.9)
HALF_PI = math.pi / 2


def _coefficients(path_name: str, t: float) -> tuple[float, float, float, float]:
    """``(alpha, sigma, alpha', sigma')`` in closed form (float64)."""
    if path_name == "condot":
        return t, 1.0 - t, 1.0, -1.0
    a, s = math.sin(HALF_PI * t), math.cos(HALF_PI * t)
    return a, s, HALF_PI * s, -HALF_PI * a


def _path(path_name: str) -> GaussianPath:
    return CondOTPath() if path_name == "condot" else CosinePath()


def _oracle_and_factor(name: str, t: float, path_name: str, x0: Tensor, x1: Tensor) -> tuple[Tensor, float]:
    """The exact network output for the draw ``(x0, x1, t)`` and the factor ``k_t`` with ``v - u = k_t (out - oracle)``.

    velocity: ``u``, ``k = 1``; x1: ``x1``, ``k = beta = alpha' - sigma' alpha / sigma``; eps: ``x0``,
    ``k = sigma' - alpha' sigma / alpha``; polar_v: ``cos(theta) x1 - sin(theta) x0``, ``k = r theta' =
    (sigma alpha' - alpha sigma') / r`` (docs/math.md §1.3).
    """
    a, s, da, ds = _coefficients(path_name, t)
    x0, x1 = x0.double(), x1.double()
    r = math.hypot(a, s)
    if name == "velocity":
        return da * x1 + ds * x0, 1.0
    if name == "x1":
        return x1, da - ds * a / s
    if name == "eps":
        return x0, ds - da * s / a
    return (s / r) * x1 - (a / r) * x0, (s * da - a * ds) / r


def _close(actual: Tensor, expected: Tensor) -> None:
    """Within 1e-5 of the largest entry of ``expected`` (see the module docstring for why)."""
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual.double(), expected.double(), rtol=1e-5, atol=1e-5 * scale)


def _draw(t: float, n: int = 64, dim: int = 3) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(int(1000 * t))
    return torch.randn(n, dim, generator=g), torch.randn(n, dim, generator=g), torch.full((n,), t)


@pytest.mark.parametrize("path_name", ["condot", "cosine"])
@pytest.mark.parametrize("name", ["velocity", "x1", "eps", "polar_v"])
def test_oracle_output_converts_to_the_conditional_velocity_and_to_x1(name: str, path_name: str) -> None:
    param = parametrization_from_name(name)
    for t_value in TIMES:
        x0, x1, t = _draw(t_value)
        sample = _path(path_name).sample(x0, x1, t)
        c = sample.coefficients
        oracle, _ = _oracle_and_factor(name, t_value, path_name, x0, x1)
        a, s, da, ds = _coefficients(path_name, t_value)
        _close(param.output_target(x0, x1, sample), oracle)
        out = oracle.float()
        _close(param.to_velocity(out, sample.x_t, c), da * x1.double() + ds * x0.double())
        _close(param.to_x1(out, sample.x_t, c), x1)
        net_x, net_t = param.net_input(sample.x_t, t, c)
        if name == "polar_v":  # (x_t / r, 2 theta / pi)
            r = math.hypot(a, s)
            _close(net_x, (a * x1.double() + s * x0.double()) / r)
            _close(net_t, torch.full((t.shape[0],), math.atan2(a, s) / HALF_PI, dtype=torch.float64))
        else:
            assert net_x is sample.x_t and net_t is t


@pytest.mark.parametrize("path_name", ["condot", "cosine"])
@pytest.mark.parametrize("name", ["velocity", "x1", "eps", "polar_v"])
def test_velocity_loss_is_the_output_loss_times_the_known_weight(name: str, path_name: str) -> None:
    """``(v - u)^2 = k_t^2 (out - target)^2`` pointwise (x1: ``k^2 = beta^2``; polar_v: ``k^2 = (r theta')^2``), so
    at one time the velocity-weighted loss is ``k_t^2`` times the output-space loss."""
    param = parametrization_from_name(name)
    path = _path(path_name)
    for t_value in TIMES:
        x0, x1, t = _draw(t_value)
        sample = path.sample(x0, x1, t)
        oracle, k = _oracle_and_factor(name, t_value, path_name, x0, x1)
        # an O(1) output error, so that v - u does not cancel to a tiny difference of large numbers
        delta = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        out = (oracle + delta).float()
        error = param.to_velocity(out, sample.x_t, sample.coefficients).double() - sample.target.double()
        _close(error, k * (out.double() - oracle))
        _close(param.velocity_weight(sample.coefficients), torch.full((x0.shape[0], 1), k * k, dtype=torch.float64))

        def net(x: Tensor, time: Tensor, out: Tensor = out) -> Tensor:  # the fixed output, whatever the input
            return out

        by_velocity = flow_matching_loss(net, param, path, x0, x1, t, "velocity")
        by_output = flow_matching_loss(net, param, path, x0, x1, t, "output")
        torch.testing.assert_close(by_velocity.double(), k * k * by_output.double(), rtol=1e-5, atol=0)


def test_registry_names_and_default_weightings() -> None:
    assert tuple(PARAMETRIZATIONS) == ("velocity", "x1", "eps", "polar_v")
    for name, param in PARAMETRIZATIONS.items():
        assert isinstance(param, OutputParametrization) and param.name == name
        assert param.default_loss_weighting == ("output" if name == "polar_v" else "velocity")
        assert parametrization_from_name(name) is param
    with pytest.raises(ValueError, match=r"parametrization must be one of \('velocity', 'x1', 'eps', 'polar_v'\)"):
        parametrization_from_name("score")


@pytest.mark.parametrize("name", ["velocity", "x1", "eps", "polar_v"])
def test_module_resolves_the_name_to_the_object_and_satisfies_the_callback_protocols(name: str) -> None:
    model = FlowMatching(TimeMLP(dim=2, hidden=8, depth=1), parametrization=name, data_shape=(2,))
    assert model.parametrization == name and model.param is PARAMETRIZATIONS[name]
    assert model.loss_weighting == PARAMETRIZATIONS[name].default_loss_weighting
    assert isinstance(model, PathModule)
    assert isinstance(model, SamplingModule)
    assert "param" not in dict(model.named_modules()) and "param" not in model.state_dict()
