"""Likelihood by the instantaneous change of variables: flows with known densities, estimators, shapes, bpd, grads."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from kinetic_helpers import U32, U64, gamma
from ko_lightning.likelihood import (
    EXACT_DIVERGENCE_MAX_DIM,
    bits_per_dim,
    bpd_from_log_prob,
    dequantize,
    divergence,
    evaluate_log_prob,
    log_prob,
    sample_with_log_prob,
    standard_normal_log_prob,
)
from ko_lightning.paths import CondOTPath, CosinePath, GaussianPath
from ko_lightning.sampling import SolverSpec

TIGHT = SolverSpec("dopri5", atol=1e-8, rtol=1e-8)


def _check_against_central_difference(grad: float, value_at, h: float = 1e-6) -> None:
    """``grad`` against the central difference of the float64 function ``value_at(step)`` at step ``h``.

    Truncation (h^2 f''' / 6) is a third of the difference's change from step 2h: allowed in full. Rounding: each
    value of a float64 objective of <= 1e4 operations is within gamma_1e4 (u64) of its terms' size, over 2h; the
    autograd gradient carries as much relatively.
    """
    up, down, up2, down2 = (value_at(step) for step in (h, -h, 2 * h, -2 * h))
    fd, fd2 = (up - down) / (2 * h), (up2 - down2) / (4 * h)
    rounding = gamma(1e4, U64) * ((abs(up) + abs(down)) / (2 * h) + abs(grad))
    assert abs(grad - fd) <= abs(fd2 - fd) + rounding, (grad, fd, fd2, rounding)


def _return_trip_errors(velocity, x0: Tensor, forward, backward, solver: SolverSpec) -> tuple[Tensor, Tensor]:
    """Bounds on ``|backward.x_noise - x0|`` and ``|backward.log_prob - forward.log_prob|`` for a forward solve
    and the backward solve from its end points, both with ``solver``: each solve's own error (its change from
    :func:`_looser`), and the forward end points' error carried back by the backward flow (the change of the
    backward solve when it starts from the looser forward end points instead)."""
    fwd_loose = sample_with_log_prob(velocity, x0, solver=_looser(solver))
    bwd_loose = log_prob(velocity, forward.x_data, solver=_looser(solver))
    carried = log_prob(velocity, fwd_loose.x_data, solver=solver)
    e_x = (backward.x_noise - bwd_loose.x_noise).abs().max() + (backward.x_noise - carried.x_noise).abs().max()
    e_lp = (forward.log_prob - fwd_loose.log_prob).abs().max() + (backward.log_prob - bwd_loose.log_prob).abs().max()
    return e_x, e_lp + (backward.log_prob - carried.log_prob).abs().max()


def _looser(solver: SolverSpec) -> SolverSpec:
    """The solve whose largest difference from ``solver``'s result bounds ``solver``'s discretization error.

    Adaptive (dopri5): 10x looser tolerances. Step control aims at an error proportional to the tolerance (~tol^(5/6)
    asymptotically); for any exponent p >= 1/2 the tight solve's error is <= |tight - loose| / (10^p - 1) <= 0.46
    |tight - loose|, so the whole difference bounds it. Fixed step (RK4, order 4): half the steps; the error is
    ~|y_N - y_(N/2)| / 15, bounded by the whole difference. In the max norm over the batch (the step control's,
    and pointwise the two errors may happen to coincide).
    """
    if solver.method == "dopri5":
        return SolverSpec("dopri5", atol=10 * solver.atol, rtol=10 * solver.rtol)
    return SolverSpec(solver.method, steps=solver.steps // 2)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """These solves make thousands of calls on tiny tensors, where intra-op thread hand-offs cost more than the
    arithmetic (10x on a busy 2-core machine): run the module on one thread and restore the setting after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _coefficients(path: GaussianPath, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Path coefficients in float64 at solver times, shaped (B, 1, ..., 1); fails on times outside [0, 1]."""
    assert bool(((t >= 0) & (t <= 1)).all()), f"velocity evaluated outside [0, 1]: {t.min()} .. {t.max()}"
    c = path.coefficients(t.to(torch.float64))
    shape = (-1, *([1] * (like.ndim - 1)))
    return tuple(v.reshape(shape).to(like.dtype) for v in (c.alpha, c.sigma, c.d_alpha, c.d_sigma))  # type: ignore


def gaussian_velocity(path: GaussianPath, mean: float, var: float):
    """Exact marginal velocity for x1 ~ N(mean, var I): x_t ~ N(a m, k^2 I), k^2 = a^2 var + s^2, so
    u_t(x) = a' m + (k'/k)(x - a m) with k'/k = (a a' var + s s') / k^2."""

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        a, s, da, ds = _coefficients(path, t, x)
        k2 = a * a * var + s * s
        return da * mean + (a * da * var + s * ds) / k2 * (x - a * mean)

    return velocity


def gaussian_log_density(x: Tensor, mean: float, var: float) -> Tensor:
    flat = x.reshape(x.shape[0], -1)
    return -0.5 * (flat.shape[1] * math.log(2 * math.pi * var) + (flat - mean).pow(2).sum(1) / var)


# Isotropic 2D mixture used by several tests: weights, means (K, 2), per-component variances (K,).
MIX_W = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
MIX_MU = torch.tensor([[-1.0, 0.5], [1.2, -0.3], [0.2, 1.5]], dtype=torch.float64)
MIX_V = torch.tensor([0.15, 0.3, 0.08], dtype=torch.float64)


def mixture_velocity(path: GaussianPath, weights: Tensor = MIX_W, means: Tensor = MIX_MU, variances: Tensor = MIX_V):
    """Exact marginal velocity u_t(x) = (s'/s) x + beta_t E[x1 | x_t = x] for an isotropic Gaussian mixture.

    Given component k, x_t ~ N(a mu_k, (a^2 v_k + s^2) I) and E[x1 | x_t, k] = mu_k + a v_k / (a^2 v_k + s^2)
    (x_t - a mu_k); the component posterior is the softmax of the weighted component densities of x_t.
    """

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        a, s, da, ds = _coefficients(path, t, x)  # (B, 1)
        mu, v, w = means.to(x), variances.to(x), weights.to(x)
        var_t = a * a * v + s * s  # (B, K)
        diff = x[:, None, :] - a[:, :, None] * mu[None]  # (B, K, D)
        logits = torch.log(w) - 0.5 * x.shape[1] * torch.log(var_t) - 0.5 * diff.pow(2).sum(-1) / var_t
        post = torch.softmax(logits, dim=1)
        cond_mean = mu[None] + (a * v / var_t)[..., None] * diff
        e_x1 = (post[..., None] * cond_mean).sum(1)
        beta = da - ds * a / s
        return (ds / s) * x + beta * e_x1

    return velocity


def mixture_log_density(x: Tensor, sigma_min: float) -> Tensor:
    """log of sum_k w_k N(x; mu_k, (v_k + sigma_min^2) I): the law of alpha_1 x1 + sigma_1 x0 at t = 1."""
    var = (MIX_V + sigma_min**2).to(x)
    diff2 = (x[:, None, :] - MIX_MU.to(x)[None]).pow(2).sum(-1)
    comp = -0.5 * x.shape[1] * torch.log(2 * math.pi * var) - 0.5 * diff2 / var
    return torch.logsumexp(torch.log(MIX_W.to(x)) + comp, dim=1)


def sample_mixture(n: int, sigma_min: float, generator: torch.Generator) -> Tensor:
    k = torch.multinomial(MIX_W, n, replacement=True, generator=generator)
    std = (MIX_V[k] + sigma_min**2).sqrt()[:, None]
    return MIX_MU[k] + std * torch.randn(n, 2, generator=generator, dtype=torch.float64)


class FlatMap(nn.Module):
    """A fixed nonlinear velocity of the flattened sample: v(z, t) = tanh(z W1 + t b) W2 + c z, reshaped back."""

    def __init__(self, dim: int, seed: int = 0, hidden: int = 16) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = nn.Parameter(torch.randn(dim, hidden, generator=g, dtype=torch.float64) / math.sqrt(dim))
        self.w2 = nn.Parameter(torch.randn(hidden, dim, generator=g, dtype=torch.float64) / math.sqrt(hidden))
        self.b = nn.Parameter(torch.randn(hidden, generator=g, dtype=torch.float64))
        self.c = nn.Parameter(torch.tensor(-0.3, dtype=torch.float64))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        z = x.reshape(x.shape[0], -1)
        out = torch.tanh(z @ self.w1.to(z) + t[:, None].to(z) * self.b.to(z)) @ self.w2.to(z) + self.c.to(z) * z
        return out.reshape(x.shape)


# ---------------------------------------------------------------------------------------------------- known densities
@pytest.mark.parametrize("path", [CondOTPath(sigma_min=0.3), CosinePath()], ids=["condot", "cosine"])
@pytest.mark.parametrize("shape", [(16, 3), (8, 1, 2, 2)], ids=["vector", "image"])
def test_gaussian_data_log_prob_matches_the_analytic_density(path: GaussianPath, shape: tuple[int, ...]) -> None:
    mean, var = 0.7, 0.4
    final_var = var + path.sigma_min**2  # x_1 = alpha_1 x1 + sigma_1 x0 = x1 + sigma_min x0
    velocity = gaussian_velocity(path, mean, var)
    x = mean + math.sqrt(final_var) * torch.randn(
        shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    x[0] += 2.5  # one point in the tail
    expected = gaussian_log_density(x, mean, final_var)
    result = log_prob(velocity, x, solver=TIGHT, divergence="exact")
    assert result.estimator == "exact" and result.log_prob.shape == (shape[0],)
    # float64 solve: its discretization error, bounded by the change from a looser solve (_looser); float64
    # rounding (~nfe x 1e-16 relative) is negligible next to it
    loose = log_prob(velocity, x, solver=_looser(TIGHT), divergence="exact")
    tol = (result.log_prob - loose.log_prob).abs().max() + gamma(result.nfe, U64) * expected.abs()
    assert bool(((result.log_prob - expected).abs() <= tol).all())
    # the same float64 numbers combined: default float64 tolerance (1e-7 relative) >> a few u64
    torch.testing.assert_close(result.prior_log_prob - result.divergence_integral, result.log_prob)
    # The latent is the exact inverse flow x0 = (x - a m) / k at t = 1 (k = sqrt(final_var)).
    tol = (result.x_noise - loose.x_noise).abs().max() + gamma(result.nfe, U64) * x.abs()
    assert bool(((result.x_noise - (x - mean) / math.sqrt(final_var)).abs() <= tol).all())
    if path.sigma_min > 0:  # the test can tell sigma_min apart: ignoring it would be far outside the tolerance
        assert (gaussian_log_density(x, mean, var) - expected).abs().max() > 1e-2

    # Default settings (fp32, dopri5 at 1e-5) on fp32 data are accurate to solver tolerance: the change from a
    # 10x looser solve (_looser), plus fp32 rounding: nfe evaluations each adding ~u of the state and of the
    # log-density, and the data rounded to fp32 (|d log p / dx| = |x - m| / var times u |x|).
    default = log_prob(velocity, x.float())
    assert default.log_prob.dtype == torch.float32
    loose = log_prob(velocity, x.float(), solver=_looser(SolverSpec("dopri5", atol=1e-5, rtol=1e-5)))
    flat = x.reshape(shape[0], -1)
    rounding = gamma(4 * default.nfe) * (expected.abs() + flat.abs().sum(1) ** 2)
    rounding = rounding + U32 * ((flat - mean).abs() * flat.abs()).sum(1) / final_var
    tol = (default.log_prob - loose.log_prob).double().abs().max() + rounding
    assert bool(((default.log_prob.double() - expected).abs() <= tol).all())


def test_gaussian_mixture_log_prob_matches_the_analytic_mixture_density() -> None:
    sigma_min = 0.1
    path = CondOTPath(sigma_min=sigma_min)
    gen = torch.Generator().manual_seed(1)
    x = torch.cat(
        [sample_mixture(48, sigma_min, gen), torch.tensor([[0.1, 0.6], [2.5, -1.5], [-2.0, 2.0]], dtype=torch.float64)]
    )
    expected = mixture_log_density(x, sigma_min)
    solver = SolverSpec("dopri5", atol=1e-7, rtol=1e-7)
    result = log_prob(mixture_velocity(path), x, solver=solver)
    assert result.estimator == "exact"  # "auto" with D = 2
    loose = log_prob(mixture_velocity(path), x, solver=_looser(solver))  # float64: discretization error only
    tol = (result.log_prob - loose.log_prob).abs().max() + gamma(result.nfe, U64) * expected.abs()
    assert bool(((result.log_prob - expected).abs() <= tol).all())
    # A nonlinear flow: a single Gaussian fitted to the mixture is nowhere near.
    assert (expected - gaussian_log_density(x, float(x.mean()), float(x.var()))).abs().max() > 0.5


def test_fixed_step_solvers_count_nfe_exactly_and_converge() -> None:
    path = CondOTPath(sigma_min=0.1)
    x = sample_mixture(16, 0.1, torch.Generator().manual_seed(2))
    expected = mixture_log_density(x, 0.1)
    errors = []
    for steps in (20, 40):
        res = log_prob(mixture_velocity(path), x, solver=SolverSpec("rk4", steps=steps))
        assert res.nfe == SolverSpec("rk4", steps=steps).expected_nfe == 4 * steps
        errors.append(float((res.log_prob - expected).abs().max()))
    # fourth order: doubling the steps divides the error by ~16 (> 6 allows a pre-asymptotic constant); the
    # absolute bound keeps two large errors from passing the ratio check (float64 rounding, ~1e-14, is far below)
    assert errors[1] < errors[0] / 6 and errors[1] < 1e-3, errors


# ---------------------------------------------------------------------------------------------------- estimators
@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_agrees_with_exact_within_its_standard_error(probe: str) -> None:
    dim, copies = 6, 300
    velocity = FlatMap(dim, seed=3)
    point = torch.randn(1, dim, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x = point.expand(copies, dim).clone()  # each copy gets its own probe
    solver = SolverSpec("rk4", steps=12)
    exact = log_prob(velocity, point, solver=solver, divergence="exact").log_prob[0]
    hutch = log_prob(
        velocity, x, solver=solver, divergence="hutchinson", probe=probe, generator=torch.Generator().manual_seed(5)
    )
    assert hutch.estimator == "hutchinson" and hutch.std_error is None and hutch.probes.shape == (1, copies, dim)
    spread = hutch.log_prob.std()
    assert spread > 1e-2  # the estimator is genuinely random here (a non-diagonal Jacobian), >> float64 rounding
    se = spread / math.sqrt(copies)
    # The same discretization (RK4, 12 steps) either way, and the Hutchinson trace is unbiased at every stage:
    # Monte Carlo only, 4 standard errors (two-sided 6e-5).
    assert abs(hutch.log_prob.mean() - exact) < 4 * se, (float(hutch.log_prob.mean()), float(exact), float(se))
    # The latents do not depend on the probes (float64; other batch sizes: rounding ~1e-15, default tolerance).
    torch.testing.assert_close(hutch.x_noise, log_prob(velocity, x[:2], solver=solver).x_noise[:1].expand(copies, dim))

    # Several probes per sample: the reported per-sample standard error matches the spread across samples.
    multi = log_prob(
        velocity,
        x[:100],
        solver=solver,
        divergence="hutchinson",
        probe=probe,
        num_probes=8,
        generator=torch.Generator().manual_seed(6),
    )
    assert multi.std_error is not None and multi.probes.shape == (8, 100, dim)
    ratio = float(multi.std_error.pow(2).mean().sqrt() / multi.log_prob.std())
    # Both estimate sigma_probe / sqrt(8): the spread over 100 samples to a relative standard error of
    # 1 / sqrt(2 x 99), the root mean square of 100 per-sample estimates from 8 probes each to sqrt(2 / 7) / (2
    # sqrt(100)) (a variance from 8 values, averaged, square-rooted). 4 standard errors of the ratio:
    rel_se = math.sqrt(1 / (2 * 99) + 2 / 7 / (4 * 100))
    assert 1 - 4 * rel_se < ratio < 1 + 4 * rel_se, ratio
    assert abs(multi.log_prob.mean() - exact) < 4 * multi.log_prob.std() / 10  # 4 standard errors of 100


def test_hutchinson_probe_is_fixed_for_the_whole_solve() -> None:
    # For a constant linear field v = A x the integrand eps^T A eps is constant in t when the probe is fixed:
    # the result is exactly log N(x0) - eps^T A eps, and an adaptive solver needs few steps.
    a = torch.tensor(
        [[0.3, 1.0, 0.0, -0.5], [-0.7, -0.2, 0.4, 0.0], [0.2, 0.0, 0.1, 0.9], [0.0, -1.1, 0.3, -0.4]],
        dtype=torch.float64,
    )
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    calls = 0

    def linear(z: Tensor, t: Tensor) -> Tensor:
        nonlocal calls
        calls += 1
        if calls > 400:  # a probe redrawn at each step makes the integrand noise: the solver would never finish
            raise RuntimeError("the adaptive solver is not converging")
        return z @ a.T

    res = log_prob(
        linear,
        x,
        solver=SolverSpec("dopri5", atol=1e-8, rtol=1e-8),
        divergence="hutchinson",
        generator=torch.Generator().manual_seed(8),
    )
    eps = res.probes[0]
    quad = ((eps @ a.T) * eps).sum(1)
    # A constant integrand is integrated exactly by any Runge-Kutta step: float64 rounding only, a few
    # roundings per evaluation (gamma(4 nfe)) of the sum of |terms|
    quad_terms = ((eps.abs() @ a.abs().T) * eps.abs()).sum(1)
    torch.testing.assert_close(
        res.divergence_integral, quad, atol=float(gamma(4 * res.nfe, U64) * quad_terms.max()), rtol=0
    )
    assert (quad - torch.trace(a)).abs().max() > 0.5  # the probe matters, so redrawing it would be caught
    loose = log_prob(
        lambda z, t: z @ a.T,
        x,
        solver=_looser(SolverSpec("dopri5", atol=1e-8, rtol=1e-8)),
        divergence="hutchinson",
        generator=torch.Generator().manual_seed(8),
    )
    tol = (res.x_noise - loose.x_noise).abs().max() + gamma(4 * res.nfe, U64) * x.abs().sum(1, keepdim=True)
    assert bool(((res.x_noise - x @ torch.linalg.matrix_exp(-a).T).abs() <= tol).all())
    assert res.nfe == calls < 200
    # The same generator seed reproduces the estimate.
    again = log_prob(
        lambda z, t: z @ a.T,
        x,
        solver=SolverSpec("dopri5", atol=1e-8, rtol=1e-8),
        divergence="hutchinson",
        generator=torch.Generator().manual_seed(8),
    )
    torch.testing.assert_close(again.log_prob, res.log_prob, atol=0, rtol=0)  # the same computation


def test_velocity_is_only_evaluated_inside_the_time_interval() -> None:
    # A slow field makes torchdiffeq's first-step heuristic and its steps overshoot the end of [0, 1]; a path
    # (x1/eps parametrizations, VP's square roots) is not defined there. CondOTPath.forward raises outside [0, 1].
    path = CondOTPath()

    def slow(x: Tensor, t: Tensor) -> Tensor:
        return 1e-3 * (1 + path(t).alpha[:, None]) * x  # x_t = x_0 exp(1e-3 (t + t^2 / 2))

    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(21))
    back = log_prob(slow, x)
    forward = sample_with_log_prob(slow, back.x_noise)
    # default solver (fp32 dopri5 at 1e-5): the change from a 10x looser solve (_looser) bounds each solve's
    # error; fp32 rounding adds ~u of the state per evaluation (gamma(4 nfe)), for the divergence integral of the
    # log-densities it is carried with; the return trip adds both directions' errors
    loose_spec = _looser(SolverSpec("dopri5", atol=1e-5, rtol=1e-5))
    back_loose = log_prob(slow, x, solver=loose_spec)
    fwd_loose = sample_with_log_prob(slow, back.x_noise, solver=loose_spec)
    e_back = (back.x_noise - back_loose.x_noise).abs().max() + gamma(4 * back.nfe) * x.abs()
    e_div = (back.divergence_integral - back_loose.divergence_integral).abs().max()
    e_div = e_div + gamma(4 * back.nfe) * (back.log_prob.abs() + back.prior_log_prob.abs())
    e_fwd = (forward.x_data - fwd_loose.x_data).abs().max() + gamma(4 * forward.nfe) * x.abs()
    assert bool(((back.x_noise - x * math.exp(-1.5e-3)).abs() <= e_back).all())
    assert bool(((back.divergence_integral - 3e-3).abs() <= e_div).all())
    assert bool(((forward.x_data - x).abs() <= e_fwd + e_back).all())


def test_auto_divergence_switches_at_the_documented_dimension() -> None:
    solver = SolverSpec("euler", steps=1)
    small = log_prob(lambda x, t: -x, torch.zeros(2, EXACT_DIVERGENCE_MAX_DIM), solver=solver)
    large = log_prob(lambda x, t: -x, torch.zeros(2, EXACT_DIVERGENCE_MAX_DIM + 1), solver=solver)
    assert (small.estimator, large.estimator) == ("exact", "hutchinson")
    assert EXACT_DIVERGENCE_MAX_DIM == 32
    # div(-x) = -D, integrated over [0, 1]; Rademacher probes are exact for a diagonal Jacobian. Sums of +-1
    # and one Euler step of length 1: integers, exact in fp32.
    torch.testing.assert_close(small.divergence_integral, torch.full((2,), -32.0), atol=0, rtol=0)
    torch.testing.assert_close(large.divergence_integral, torch.full((2,), -33.0), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------- shapes
def test_image_shaped_input_matches_its_flattened_version_and_traces_all_dims() -> None:
    shape = (5, 3, 2, 2)
    dim = 12
    net = FlatMap(dim, seed=9)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    t = torch.full((shape[0],), 0.4, dtype=torch.float64)

    # The divergence is the trace of the full (C*H*W) x (C*H*W) Jacobian of each sample.
    _, div = divergence(net, x, t)
    for b in range(shape[0]):
        jac = torch.autograd.functional.jacobian(
            lambda z: net(z.reshape(1, *shape[1:]), t[:1]).reshape(-1), x[b].reshape(-1)
        )
        torch.testing.assert_close(div[b], torch.trace(jac))  # float64, 12 terms: ~1e-15 << default 1e-7
    # The trace over channels at a single pixel (or over one channel's pixels) is a different number.
    jac0 = torch.autograd.functional.jacobian(
        lambda z: net(z.reshape(1, *shape[1:]), t[:1]).reshape(-1), x[0].reshape(-1)
    )
    assert abs(float(torch.diagonal(jac0)[::4].sum() - div[0])) > 1e-3  # >> float64 rounding

    solver = SolverSpec("rk4", steps=10)
    flat = x.reshape(shape[0], dim)
    for estimator in ("exact", "hutchinson"):
        img = log_prob(net, x, solver=solver, divergence=estimator, generator=torch.Generator().manual_seed(11))
        vec = log_prob(net, flat, solver=solver, divergence=estimator, generator=torch.Generator().manual_seed(11))
        assert img.x_noise.shape == shape
        # float64, the same arithmetic on reshaped tensors: 40 evaluations of a 12 x 16 network, rounding ~1e-14
        torch.testing.assert_close(img.log_prob, vec.log_prob, atol=1e-10, rtol=0)
        torch.testing.assert_close(img.x_noise.reshape(shape[0], dim), vec.x_noise, atol=1e-10, rtol=0)


# ---------------------------------------------------------------------------------------------------- directions
def test_forward_and_reverse_integration_agree() -> None:
    sigma_min = 0.1
    velocity = mixture_velocity(CondOTPath(sigma_min=sigma_min))
    x0 = torch.randn(32, 2, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    forward = sample_with_log_prob(velocity, x0, solver=TIGHT)
    backward = log_prob(velocity, forward.x_data, solver=TIGHT)
    # float64: each direction's discretization error is bounded by its change from a looser solve (_looser);
    # the forward error reaches the return trip through the backward flow, measured by solving back from the
    # looser forward end points; float64 rounding ~1e-14
    e_x, e_lp = _return_trip_errors(velocity, x0, forward, backward, TIGHT)
    assert bool(((backward.x_noise - x0).abs().amax(1) <= e_x + 1e-12).all())
    assert bool(((backward.log_prob - forward.log_prob).abs() <= e_lp + 1e-12).all())
    torch.testing.assert_close(forward.prior_log_prob, standard_normal_log_prob(x0))  # the same float64 formula
    # Both directions agree with the known density of the samples, so neither has a sign error.
    fwd_loose = sample_with_log_prob(velocity, x0, solver=_looser(TIGHT))
    e_fwd = (forward.log_prob - fwd_loose.log_prob).abs().max() + 1e-12
    assert bool(((forward.log_prob - mixture_log_density(forward.x_data, sigma_min)).abs() <= e_fwd).all())

    # Same with a fixed-step solver: the two directions differ by the solver's (small) error only, each bounded
    # by its change from half the steps (_looser).
    rk4 = SolverSpec("rk4", steps=60)
    fwd = sample_with_log_prob(velocity, x0, solver=rk4)
    bwd = log_prob(velocity, fwd.x_data, solver=rk4)
    e_rk4 = (fwd.log_prob - sample_with_log_prob(velocity, x0, solver=_looser(rk4)).log_prob).abs().max()
    e_rk4 = e_rk4 + (bwd.log_prob - log_prob(velocity, fwd.x_data, solver=_looser(rk4)).log_prob).abs().max()
    assert bool(((bwd.log_prob - fwd.log_prob).abs() <= e_rk4 + 1e-12).all())


# ---------------------------------------------------------------------------------------------------- bits/dim
def _expected_gaussian_log_density_per_dim(x_int: Tensor, var: float, uniform: bool) -> Tensor:
    """E_w log N(y; 0, var) summed over dims, y = -1 + 2 (x + w) / 256: y is uniform on [lo, hi] per dim,
    so E[y^2] = (lo^2 + lo hi + hi^2) / 3 (uniform) or the cell centre squared."""
    lo = -1.0 + 2.0 * x_int.double() / 256
    hi = lo + 2.0 / 256
    ey2 = (lo * lo + lo * hi + hi * hi) / 3 if uniform else ((lo + hi) / 2) ** 2
    return (-0.5 * math.log(2 * math.pi * var) - ey2 / (2 * var)).reshape(x_int.shape[0], -1).sum(1)


def test_bits_per_dim_with_uniform_dequantization_matches_an_independent_computation() -> None:
    sigma_min, var = 0.2, 0.25
    final_var = var + sigma_min**2  # the model density of y is N(0, final_var I)
    velocity = gaussian_velocity(CondOTPath(sigma_min=sigma_min), 0.0, var)
    image = torch.tensor([[[[100, 128], [140, 200]]]], dtype=torch.uint8)  # (1, 1, 2, 2): D = 4
    copies = 400
    x = image.expand(copies, 1, 2, 2).clone()
    solver = SolverSpec("dopri5", atol=1e-6, rtol=1e-6)
    res = bits_per_dim(velocity, x, solver=solver, generator=torch.Generator().manual_seed(13))
    d = 4
    assert res.num_dims == d and res.bpd.shape == (copies,)
    assert res.log_det == pytest.approx(d * math.log(2 / 256), rel=1e-12)  # float64
    bound = -(_expected_gaussian_log_density_per_dim(image, final_var, True) + d * math.log(2 / 256)) / (
        d * math.log(2)
    )
    se = float(res.bpd.std()) / math.sqrt(copies)
    # 4 standard errors of the Monte-Carlo mean; the solve's error, bounded by its change from a looser solve
    # on the same dequantization noise (_looser); fp32 rounding, ~u of the log-densities per evaluation
    loose = bits_per_dim(velocity, x, solver=_looser(solver), generator=torch.Generator().manual_seed(13))
    solve_err = float((res.bpd - loose.bpd).abs().max())
    rounding = (
        gamma(4 * res.likelihood.nfe) * float(res.likelihood.log_prob.abs().max() - res.log_det) / (d * math.log(2))
    )
    tol = 4 * se + solve_err + rounding
    assert abs(float(res.bpd.mean()) - float(bound)) < tol, (float(res.bpd.mean()), float(bound), se)

    # The bound sits just above the exact discrete bits/dim, -log2 P(x_int) / D with P the Gaussian mass of
    # the cell [lo, hi] of each dim (Jensen's gap is tiny for a cell much narrower than the density).
    lo = -1.0 + 2.0 * image.double() / 256
    std = math.sqrt(final_var)
    mass = torch.special.ndtr((lo + 2.0 / 256) / std) - torch.special.ndtr(lo / std)
    exact_bpd = -torch.log2(mass).sum() / d
    assert float(bound) >= float(exact_bpd) - 1e-9  # Jensen, up to float64 rounding (~1e-15)
    # Jensen's gap per dim, log E[p] - E[log p] over the cell: by Hoeffding's lemma at most (range of log p)^2 / 8,
    # the range being w max_cell |y| / final_var for the width w = 2 / 256 (in nats; bits: / ln 2)
    width = 2.0 / 256
    log_range = width * torch.maximum(lo.abs(), (lo + width).abs()) / final_var
    assert float(bound - exact_bpd) < float((log_range**2 / 8).sum() / (d * math.log(2)))

    # Cell centres: deterministic, equal to the closed form (no Monte Carlo at all).
    centre = bits_per_dim(velocity, image, solver=TIGHT, dequantize="center")
    closed = -(_expected_gaussian_log_density_per_dim(image, final_var, False) + d * math.log(2 / 256)) / (
        d * math.log(2)
    )
    # fp32 solve (the pixels are dequantized to fp32): its change from a looser solve plus its rounding
    log_p = float(centre.likelihood.log_prob.abs().max())
    scale = (log_p - centre.log_det) / (d * math.log(2))  # |terms| of the bits/dim, ~8 here
    centre_loose = bits_per_dim(velocity, image, solver=_looser(TIGHT), dequantize="center")
    tol = abs(float(centre.bpd[0] - centre_loose.bpd[0])) + gamma(4 * centre.likelihood.nfe) * scale
    assert float(centre.bpd[0]) == pytest.approx(float(closed), abs=tol)
    # bpd_from_log_prob with num_bins is the same conversion; without it, the continuous one (7 bits less here).
    # Both fp32: a few roundings (sum, division, product) of quantities up to the terms' scale + 8.
    conversion = 6 * U32 * (scale + 8)
    assert float(bpd_from_log_prob(centre.likelihood.log_prob, d, num_bins=256)[0]) == pytest.approx(
        float(centre.bpd[0]), abs=conversion
    )
    assert float(bpd_from_log_prob(centre.likelihood.log_prob, d)[0]) == pytest.approx(
        float(centre.bpd[0]) - 7.0, abs=conversion
    )


def test_dequantize_fills_each_cell_uniformly_and_accepts_integer_valued_floats() -> None:
    x = torch.randint(0, 256, (2000, 3), generator=torch.Generator().manual_seed(14), dtype=torch.uint8)
    y = dequantize(x, generator=torch.Generator().manual_seed(15))
    offset = (y.double() + 1.0) * 128 - x.double()  # the dequantization noise w
    # y in fp32: a few roundings of values <= 2 (<= 8u), times 128
    assert float(offset.min()) >= -1024 * U32 and float(offset.max()) < 1 + 1024 * U32
    # uniform on [0, 1): 4 standard errors of the mean (sd sqrt(1/12)) and of the standard deviation
    # (sqrt((mu4 - sigma^4) / (4 sigma^2 n)), mu4 = 1/80) over n = 6000 values
    n = offset.numel()
    se_mean = math.sqrt(1 / 12 / n)
    se_std = math.sqrt((1 / 80 - 1 / 144) / (4 / 12 * n))
    assert abs(float(offset.mean()) - 0.5) < 4 * se_mean and abs(float(offset.std()) - math.sqrt(1 / 12)) < 4 * se_std
    # the same noise through other fp32 affine maps of values <= 1: within 8u either way
    y01 = dequantize(x, data_range=(0.0, 1.0), generator=torch.Generator().manual_seed(15))
    torch.testing.assert_close(y01, (y + 1) / 2, atol=16 * U32, rtol=0)
    torch.testing.assert_close(
        dequantize(x.float(), generator=torch.Generator().manual_seed(15)), y, atol=16 * U32, rtol=0
    )
    torch.testing.assert_close(
        dequantize(x.long(), method="center"), -1 + 2 * (x.float() + 0.5) / 256, atol=16 * U32, rtol=0
    )


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (torch.full((2, 3), 0.5), r"x must hold integer values in \[0, 255\]"),
        (torch.full((2, 3), 256.0), r"x must lie in \[0, 255\]"),
        (torch.full((2, 3), -1, dtype=torch.int64), r"x must lie in \[0, 255\]"),
        (torch.ones(2, 3, dtype=torch.bool), "x must be uint8"),
        (torch.full((2, 3), float("nan")), "x contains non-finite"),
        (torch.zeros(3, dtype=torch.uint8), r"x must have shape \(B, \.\.\.\)"),
    ],
)
def test_bits_per_dim_rejects_bad_data_naming_the_argument(bad: Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        bits_per_dim(lambda x, t: -x, bad, solver=SolverSpec("euler", steps=1))


def test_bits_per_dim_rejects_bad_settings_naming_the_argument() -> None:
    x = torch.zeros(2, 3, dtype=torch.uint8)
    euler = SolverSpec("euler", steps=1)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        bits_per_dim(lambda x, t: -x, [[0, 1]], solver=euler)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_bins"):
        bits_per_dim(lambda x, t: -x, x, solver=euler, num_bins=1)
    with pytest.raises(ValueError, match="data_range"):
        bits_per_dim(lambda x, t: -x, x, solver=euler, data_range=(1.0, -1.0))
    with pytest.raises(ValueError, match="dequantize"):
        bits_per_dim(lambda x, t: -x, x, solver=euler, dequantize="gaussian")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"x must lie in \[0, 15\]"):
        bits_per_dim(lambda x, t: -x, x + 16, solver=euler, num_bins=16)


# ---------------------------------------------------------------------------------------------------- gradients
def test_gradients_flow_to_parameters_and_inputs_when_asked() -> None:
    net = FlatMap(2, seed=16, hidden=3)
    solver = SolverSpec("rk4", steps=6)
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(17), dtype=torch.float64)

    # Default: no graph, nothing to differentiate.
    plain = log_prob(net, x, solver=solver)
    assert not plain.log_prob.requires_grad

    def objective() -> Tensor:
        return log_prob(net, x, solver=solver, create_graph=True).log_prob.sum()

    objective().backward()
    with torch.no_grad():
        for param in (net.w1, net.c):
            grad = param.grad.clone()
            flat = param.view(-1)
            for i in range(flat.numel()):
                old = float(flat[i])

                def moved(step: float, flat: Tensor = flat, i: int = i, old: float = old) -> float:
                    flat[i] = old + step
                    value = float(objective())
                    flat[i] = old
                    return value

                _check_against_central_difference(grad.view(-1)[i].item(), moved)
    assert any(float(param.grad.abs().max()) > 1e-3 for param in (net.w1, net.c))  # >> the check's ~1e-5

    # Inputs that require grad switch gradients on by themselves (create_graph=None).
    xg = x.clone().requires_grad_(True)
    (grad_x,) = torch.autograd.grad(log_prob(net, xg, solver=solver).log_prob.sum(), xg)
    with torch.no_grad():
        for b, j in ((0, 0), (2, 1)):
            e = torch.zeros_like(x)
            e[b, j] = 1.0
            _check_against_central_difference(
                grad_x[b, j].item(),
                lambda step, e=e: float(log_prob(net, x + step * e, solver=solver).log_prob.sum()),
            )

    # Hutchinson with a fixed seed is a deterministic, differentiable function too.
    def hutch() -> Tensor:
        return log_prob(
            net,
            x,
            solver=solver,
            divergence="hutchinson",
            create_graph=True,
            generator=torch.Generator().manual_seed(18),
        ).log_prob.sum()

    net.zero_grad()
    hutch().backward()
    with torch.no_grad():
        old = float(net.c)

        def moved_c(step: float) -> float:
            net.c.fill_(old + step)
            value = float(hutch())
            net.c.fill_(old)
            return value

        _check_against_central_difference(net.c.grad.item(), moved_c)


# ---------------------------------------------------------------------------------------------------- data sets
def test_evaluate_log_prob_over_a_dataloader(capsys: pytest.CaptureFixture[str]) -> None:
    mean, var, sigma_min = -0.2, 0.5, 0.3
    final_var = var + sigma_min**2
    velocity = gaussian_velocity(CondOTPath(sigma_min=sigma_min), mean, var)
    data = mean + math.sqrt(final_var) * torch.randn(40, 3, generator=torch.Generator().manual_seed(19))
    loader = DataLoader(TensorDataset(data), batch_size=16)
    solver = SolverSpec("rk4", steps=20)
    res = evaluate_log_prob(velocity, loader, solver=solver, progress=True)
    expected = gaussian_log_density(data.double(), mean, final_var)
    assert res.num_samples == 40 and res.num_dims == 3 and res.nfe == 3 * 80
    # fp32 RK4: the change from half the steps bounds the discretization error (_looser); fp32 rounding, ~u of
    # the log-density per evaluation (gamma(4 x 80))
    loose = evaluate_log_prob(velocity, DataLoader(TensorDataset(data), batch_size=16), solver=_looser(solver))
    tol = float((res.log_probs - loose.log_probs).abs().max()) + gamma(4 * 80) * float(expected.abs().max())
    torch.testing.assert_close(res.log_probs, expected, atol=tol, rtol=0)
    assert res.mean_log_prob == pytest.approx(float(expected.mean()), abs=tol)
    # the standard error of 40 values each within tol: it moves by <= 2 tol / sqrt(40) (a standard deviation
    # moves by at most the largest change, in the sqrt(n / (n - 1)) form)
    assert res.log_prob_std_error == pytest.approx(float(expected.std()) / math.sqrt(40), abs=2 * tol / math.sqrt(40))
    # the same python floats divided by D ln 2 (a product by 1 / (D ln 2) against a division: ~2 u64)
    assert res.mean_bpd == pytest.approx(-res.mean_log_prob / (3 * math.log(2)), rel=1e-12)
    assert res.bpd_std_error == pytest.approx(res.log_prob_std_error / (3 * math.log(2)), rel=1e-12)
    assert "log-likelihood" in capsys.readouterr().out

    # Integer images through dequantization, stopping early.
    images = torch.randint(0, 256, (50, 1, 2, 2), generator=torch.Generator().manual_seed(20), dtype=torch.uint8)
    img_loader = DataLoader(TensorDataset(images, torch.zeros(50)), batch_size=10)
    quant = evaluate_log_prob(velocity, img_loader, solver=solver, dequantize="center", max_batches=2)
    direct = bits_per_dim(velocity, images[:20], solver=solver, dequantize="center")
    assert quant.num_samples == 20 and quant.num_dims == 4
    # the same fp32 solves in other batch sizes: each within fp32 rounding, gamma(4 x 80) of the bits/dim's
    # terms (|log p| and the log-determinant, over D ln 2)
    scale = float((direct.likelihood.log_prob.abs().max() - direct.log_det) / (4 * math.log(2)))
    assert quant.mean_bpd == pytest.approx(float(direct.bpd.mean()), abs=2 * gamma(4 * 80) * scale)


# ---------------------------------------------------------------------------------------------------- errors
def test_errors_name_the_bad_argument() -> None:
    x = torch.zeros(2, 3)
    euler = SolverSpec("euler", steps=1)
    with pytest.raises(ValueError, match="divergence"):
        log_prob(lambda z, t: -z, x, solver=euler, divergence="trace")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="probe"):
        log_prob(lambda z, t: -z, x, solver=euler, probe="sphere")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_probes"):
        log_prob(lambda z, t: -z, x, solver=euler, num_probes=0)
    with pytest.raises(ValueError, match="t_start > t_end"):
        log_prob(lambda z, t: -z, x, solver=euler, t_start=0.0, t_end=1.0)
    with pytest.raises(ValueError, match="t_end must lie in"):
        sample_with_log_prob(lambda z, t: -z, x, solver=euler, t_end=1.5)
    with pytest.raises(ValueError, match="velocity"):
        log_prob(lambda z, t: z[:, :2], x, solver=euler)
    with pytest.raises(TypeError, match="solver"):
        log_prob(lambda z, t: -z, x, solver="rk4")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="no_grad"):
        log_prob(lambda z, t: (-z).detach(), x, solver=euler)


# ---------------------------------------------------------------------------------------------------- a real model
def test_flow_matching_model_with_x1_parametrization() -> None:
    from ko_lightning import FlowMatching
    from ko_lightning.nets import TimeMLP

    torch.manual_seed(22)
    model = FlowMatching(
        TimeMLP(dim=2, hidden=16, depth=2, time_scale=1.0), path=CondOTPath(sigma_min=0.05), parametrization="x1"
    ).eval()
    x0 = torch.randn(16, 2, generator=torch.Generator().manual_seed(23))
    forward = sample_with_log_prob(model.velocity, x0)
    backward = log_prob(model.velocity, forward.x_data)
    assert torch.isfinite(backward.log_prob).all()
    # default solver (fp32 dopri5 at 1e-5): both solves' errors and the forward one carried back
    # (_return_trip_errors), plus fp32 rounding, ~u of the state and log-density per evaluation
    e_x, e_lp = _return_trip_errors(model.velocity, x0, forward, backward, SolverSpec("dopri5", atol=1e-5, rtol=1e-5))
    nfe = forward.nfe + backward.nfe
    e_x = e_x + gamma(4 * nfe) * float(forward.x_data.abs().max())
    e_lp = e_lp + gamma(4 * nfe) * float(forward.log_prob.abs().max() + forward.prior_log_prob.abs().max())
    torch.testing.assert_close(backward.x_noise, x0, atol=float(e_x), rtol=0)
    torch.testing.assert_close(backward.log_prob, forward.log_prob, atol=float(e_lp), rtol=0)
    # Exact and Hutchinson (several probes per sample) agree within the reported standard error.
    solver = SolverSpec("rk4", steps=20)
    exact = log_prob(model.velocity, forward.x_data, solver=solver, divergence="exact")
    hutch = log_prob(
        model.velocity,
        forward.x_data,
        solver=solver,
        divergence="hutchinson",
        num_probes=16,
        generator=torch.Generator().manual_seed(24),
    )
    z = (hutch.log_prob - exact.log_prob) / hutch.std_error.clamp_min(1e-12)
    # z is Student-t with 15 degrees of freedom (16 probes): P(|z| > 5) ~ 1.6e-4, so ~2.5e-3 for any of 16; the
    # mean of 16 z^2 has expectation 15/13 and standard deviation sqrt(3.39 / 16) = 0.46: 3 is 4 of them above
    assert float(z.abs().max()) < 5 and float(z.pow(2).mean()) < 3, z
    assert not any(p.grad is not None for p in model.parameters())  # no gradients unless asked
