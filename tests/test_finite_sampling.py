"""No silent NaN: every parametrization samples finite values on every shipped path, and NaN is an error.

Issue 8 part 5. The ``eps`` parametrization used to sample nothing but NaN (sampling started at t = 0, where
``alpha_0 = 0`` and the eps-to-velocity conversion divides by it). Sampling and likelihoods now integrate over the
trained range ``[t_eps, 1 - t_eps]``; a parametrization whose conversion is undefined at an end of that range is
an error that asks for ``t_eps > 0``, and a result that comes out non-finite is an error naming the
parametrization, the path and the time.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ko_lightning import FlowMatching
from ko_lightning.metrics.model_energy import model_kinetic_energy
from ko_lightning.nets import TimeMLP
from ko_lightning.paths import (
    CondOTPath,
    CosinePath,
    GaussianPath,
    LinearVPPath,
    PolynomialPath,
    TabulatedPath,
    VPPath,
)
from ko_lightning.sampling import SolverError, SolverSpec

pytestmark = pytest.mark.usefixtures("one_thread")

PARAMETRIZATIONS = ("velocity", "x1", "eps", "polar_v")
PATHS = {
    "condot": CondOTPath,
    "vp": VPPath,
    "cosine": CosinePath,
    "polynomial": PolynomialPath,
    "linear_vp": LinearVPPath,
    "tabulated": lambda: TabulatedPath.from_path(CosinePath(), n=65),
}
# Where each combination is singular, from the closed forms (independent of the code under test):
# - VP and linear-VP: sigma'_t = -alpha alpha' / sigma (VP) and -t / sigma_t (linear-VP) diverge at t = 1, for
#   every parametrization;
# - eps: x1 = (x_t - sigma eps) / alpha with alpha_0 = 0 on every path but VP (which is covered above);
# - x1: eps = (x_t - alpha x1) / sigma with sigma_1 = 0 on all these paths (Cond-OT with its default sigma_min = 0).
SINGULAR_AT_ONE = {"vp", "linear_vp"}


def needs_t_eps(parametrization: str, path: str) -> bool:
    return path in SINGULAR_AT_ONE or parametrization in ("eps", "x1")


def _model(parametrization: str, path: GaussianPath, t_eps: float) -> FlowMatching:
    torch.manual_seed(0)  # a random network: the conversions, not its training, decide whether NaN appears
    return FlowMatching(
        TimeMLP(dim=2, hidden=16, depth=2), path=path, parametrization=parametrization, t_eps=t_eps, data_shape=(2,)
    ).eval()


@pytest.mark.parametrize("path_name", list(PATHS))
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_finite_samples_and_likelihoods_for_every_parametrization_and_path(
    parametrization: str, path_name: str
) -> None:
    t_eps = 1e-3 if needs_t_eps(parametrization, path_name) else 0.0
    model = _model(parametrization, PATHS[path_name](), t_eps)
    x0 = torch.randn(256, 2, generator=torch.Generator().manual_seed(1))
    for steps in (2, 16):
        result = model.sample(x0=x0, method="euler", steps=steps)
        assert result.nfe == steps
        assert torch.isfinite(result.samples).all(), (parametrization, path_name, steps)
    for method in ("rk4", "heun"):  # these evaluate the velocity at the very end of the range, 1 - t_eps
        assert torch.isfinite(model.sample(x0=x0[:32], method=method, steps=4).samples).all(), method
    likelihood = model.log_prob(x0[:32], method="rk4", steps=4)
    assert torch.isfinite(likelihood.log_prob).all() and torch.isfinite(likelihood.x_noise).all()


def test_eps_on_the_cosine_path_no_longer_samples_nan() -> None:
    """The reported case: CosinePath(), t_eps = 1e-3, output weighting; every sample used to be NaN."""
    torch.manual_seed(0)
    model = FlowMatching(
        TimeMLP(dim=2, hidden=32, depth=2),
        path=CosinePath(),
        parametrization="eps",
        t_eps=1e-3,
        loss_weighting="output",
        data_shape=(2,),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(2)
    for _ in range(50):  # briefly trained on N((1, -0.5), 0.25 I)
        loss = model.loss(torch.tensor([1.0, -0.5]) + 0.5 * torch.randn(256, 2, generator=gen), generator=gen)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for steps in (2, 4, 8, 16, 64):
        samples = model.sample(512, steps=steps, generator=torch.Generator().manual_seed(3)).samples
        assert torch.isfinite(samples).all(), steps


@pytest.mark.parametrize("path_name", list(PATHS))
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_without_t_eps_a_singular_end_is_an_error_naming_it(parametrization: str, path_name: str) -> None:
    model = _model(parametrization, PATHS[path_name](), 0.0)
    if not needs_t_eps(parametrization, path_name):
        assert torch.isfinite(model.sample(8, method="rk4", steps=4).samples).all()
        return
    path_repr = repr(model.path).replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")
    match = rf"parametrization='{parametrization}', path={path_repr}.*Train \(and sample\) with t_eps > 0"
    with pytest.raises(ValueError, match=match):
        model.sample(8, steps=2)
    with pytest.raises(ValueError, match=match):
        model.log_prob(torch.zeros(2, 2), method="euler", steps=2)


class _NaNAfter(nn.Module):
    """A network that turns NaN for t > t_bad (as a diverged training run would, in part of the time range)."""

    def __init__(self, t_bad: float) -> None:
        super().__init__()
        self.t_bad = t_bad
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.where(t[:, None] > self.t_bad, x * math.nan, -self.scale * x)


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_a_network_returning_nan_is_an_error_naming_parametrization_path_and_t(parametrization: str) -> None:
    model = FlowMatching(
        _NaNAfter(0.5), path=CosinePath(), parametrization=parametrization, t_eps=1e-3, data_shape=(2,)
    )
    context = rf"FlowMatching\(parametrization='{parametrization}', path=CosinePath\(\), t_eps=0\.001\)"
    # Euler with 16 steps evaluates at t_k = 0.001 + 0.998 k / 16; the sparse checks (evaluations 1, 2, 4, 8, 16)
    # see finite values up to k = 7 (t = 0.4376) and NaN at k = 15 (t = 0.9366).
    expected = rf"{context}: the solution came out non-finite .* euler \(steps=16\)"
    with pytest.raises(SolverError, match=expected) as info:
        model.sample(16, steps=16)
    assert 0.5 < info.value.t <= 1.0 and "first seen at t = 0.9366" in str(info.value)
    with pytest.raises(SolverError, match=rf"{context}: the velocity returned NaN or inf at t = 0\.\d+ .* dopri5"):
        model.sample(16, method="dopri5")
    with pytest.raises(SolverError, match=rf"{context}: the log-likelihood came out non-finite"):
        model.log_prob(torch.zeros(4, 2), method="euler", steps=8)


def test_a_metric_of_a_nan_flow_is_an_error() -> None:
    model = FlowMatching(_NaNAfter(0.25), path=CondOTPath(), data_shape=(2,)).eval()
    x0 = torch.randn(8, 2, generator=torch.Generator().manual_seed(4))
    with pytest.raises(SolverError, match=r"the solution came out non-finite .* euler \(steps=8\)"):
        model_kinetic_energy(model.velocity, x0, SolverSpec("euler", steps=8))
    with pytest.raises(SolverError, match=r"the velocity returned NaN or inf at t = 0\.\d+ of \[0, 1\]") as info:
        model_kinetic_energy(model.velocity, x0)  # dopri5
    assert 0.25 < info.value.t <= 1.0
