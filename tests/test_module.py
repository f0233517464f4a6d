"""FlowMatching: training improves samples, checkpoints restore weights and path, EMA, errors, fp32 math."""

from __future__ import annotations

import functools
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging

from kinetic_helpers import ELEMENTARY_REL, PATH_COEFF_REL, U32, gamma
from ko_lightning import FlowMatching
from ko_lightning.data import Toy2DDataModule
from ko_lightning.metrics import sliced_wasserstein
from ko_lightning.nets import TimeMLP
from ko_lightning.paths import CondOTPath, CosinePath, TabulatedPath


def _trainer(tmp_path, max_steps: int, **kwargs) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        limit_val_batches=0,
        **kwargs,
    )


def _sliced_w2(model: FlowMatching, reference: torch.Tensor) -> float:
    samples = model.sample(2000, steps=50, generator=torch.Generator().manual_seed(7)).samples
    return float(sliced_wasserstein(samples, reference, generator=torch.Generator().manual_seed(8)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short checkerboard fit on a tabulated (non-default) path, shared by the tests below."""
    L.seed_everything(0)
    tmp = tmp_path_factory.mktemp("fit")
    dm = Toy2DDataModule("checkerboard", n_train=20_480, n_val=2_000, n_test=2_000, batch_size=1024, seed=0)
    dm.setup("fit")
    dm.setup("test")
    reference = torch.cat(list(dm.test_dataloader()))
    path = TabulatedPath.from_path(CosinePath(), n=129)
    model = FlowMatching(
        TimeMLP(dim=2, hidden=256, depth=3, time_scale=1.0),
        path=path,
        data_shape=(2,),
        optimizer=functools.partial(torch.optim.Adam, lr=3e-3),
    )
    untrained = _sliced_w2(model, reference)
    trainer = _trainer(tmp, 600, enable_checkpointing=False)
    trainer.fit(model, dm)
    ckpt = tmp / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    return model, ckpt, reference, untrained


def test_short_fit_improves_distance_to_fresh_data(trained) -> None:
    model, _, reference, untrained = trained
    after = _sliced_w2(model, reference)
    # Untrained: samples stay near N(0, I), SW2 about 0.19 in normalized units; 600 steps bring it to about 0.07.
    print(f"sliced W2 untrained {untrained:.4f}, after 600 steps {after:.4f}")
    assert after < 0.6 * untrained, (untrained, after)


def test_checkpoint_round_trip_gives_identical_samples_on_the_same_path(trained) -> None:
    model, ckpt, _, _ = trained
    loaded = FlowMatching.load_from_checkpoint(ckpt, net=TimeMLP(dim=2, hidden=256, depth=3, time_scale=1.0))
    assert isinstance(loaded.path, TabulatedPath)  # the constructor default (Cond-OT) was replaced
    t = torch.linspace(0, 1, 11)
    torch.testing.assert_close(loaded.path(t).alpha, model.path(t).alpha, atol=0, rtol=0)
    a = model.sample(64, steps=8, generator=torch.Generator().manual_seed(3)).samples
    b = loaded.sample(64, steps=8, generator=torch.Generator().manual_seed(3)).samples
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_ema_weights_are_used_after_fit(tmp_path) -> None:
    L.seed_everything(1)
    dm = Toy2DDataModule("moons", n_train=4_096, n_val=512, n_test=512, batch_size=256, seed=1)
    model = FlowMatching(TimeMLP(dim=2, hidden=32, depth=2), path=CondOTPath())
    ema = EMAWeightAveraging(decay=0.9)
    raw_snapshots: list[dict[str, torch.Tensor]] = []

    class Snapshot(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            raw_snapshots.append({k: v.detach().clone() for k, v in pl_module.net.state_dict().items()})

    _trainer(tmp_path, 30, callbacks=[ema, Snapshot()], enable_checkpointing=False).fit(model, dm)
    # Independent EMA over the raw weights after each step (decay 0.9, first update copies).
    expected = {k: v.clone() for k, v in raw_snapshots[0].items()}
    for snap in raw_snapshots[1:]:
        for k in expected:
            expected[k] = 0.9 * expected[k] + 0.1 * snap[k]
    # Either fp32 update (0.9 e + 0.1 w, or a lerp) rounds by <= 3u (|e| + |w|) per step; the average contracts
    # old errors by 0.9 per step, so each side stays within 3u 2 max|w| / (1 - 0.9) of exact arithmetic.
    for k, v in model.net.state_dict().items():
        largest = max(float(snap[k].abs().max()) for snap in raw_snapshots)
        torch.testing.assert_close(v, expected[k], atol=2 * 3 * U32 * 2 * largest / (1 - 0.9), rtol=0)


def test_x1_parametrization_loss_is_beta_squared_weighted() -> None:
    torch.manual_seed(0)
    net = TimeMLP(dim=3, hidden=16, depth=2)
    path = CosinePath()
    model = FlowMatching(net, path=path, parametrization="x1")
    x0, x1 = torch.randn(128, 3), torch.randn(128, 3)
    t = 0.05 + 0.9 * torch.rand(128)
    x1_hat = net(path.sample(x0, x1, t).x_t, t)
    a, s = torch.sin(torch.pi * t / 2)[:, None], torch.cos(torch.pi * t / 2)[:, None]
    beta = (torch.pi / 2) * (s + a * a / s)  # alpha' - sigma' alpha / sigma for the cosine path
    expected = (beta**2 * (x1_hat - x1) ** 2).mean()
    # Relative, all terms positive: the model's beta from its fp32 coefficients (two terms of one sign, each within
    # PATH_COEFF_REL, three roundings), this beta (sin / cos, a fp32 argument moved by 2u, four roundings), both
    # squared; two fp32 means of 384 terms.
    beta_model = 2 * PATH_COEFF_REL + 3 * U32
    beta_here = ELEMENTARY_REL + math.pi * U32 + 4 * U32
    rel = 2 * (beta_model + beta_here) + 2 * gamma(384 + 4)
    torch.testing.assert_close(model.loss_at(x0, x1, t), expected, rtol=rel, atol=0)


def test_loss_is_fp32_under_bf16_autocast() -> None:
    model = FlowMatching(TimeMLP(dim=2, hidden=16, depth=2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.loss(torch.randn(32, 2))
    assert loss.dtype == torch.float32


def test_non_finite_batch_names_batch_and_count() -> None:
    model = FlowMatching(TimeMLP(dim=2, hidden=16, depth=2))
    batch = torch.randn(16, 2)
    batch[3, 0] = float("nan")
    batch[5, 1] = float("inf")
    with pytest.raises(ValueError, match=r"train batch 7 contains 2 non-finite"):
        model.training_step(batch, 7)


def test_wrong_sample_shape_is_named() -> None:
    model = FlowMatching(TimeMLP(dim=2, hidden=16, depth=2), data_shape=(2,))
    with pytest.raises(ValueError, match=r"train batch 0: samples have shape \(3,\)"):
        model.training_step(torch.randn(4, 3), 0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"t_eps": 0.5}, "t_eps"),
        ({"parametrization": "score"}, "parametrization"),
        ({"lr_scheduler_interval": "batch"}, "lr_scheduler_interval"),
        ({"loss_weighting": "l1"}, "loss_weighting"),
    ],
)
def test_bad_module_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FlowMatching(TimeMLP(dim=2, hidden=8, depth=1), **kwargs)


def test_sample_argument_errors() -> None:
    model = FlowMatching(TimeMLP(dim=2, hidden=8, depth=1), data_shape=(2,))
    with pytest.raises(ValueError, match="exactly one of num_samples or x0"):
        model.sample()
    with pytest.raises(ValueError, match="steps applies to fixed-step"):
        model.sample(4, method="dopri5", steps=10)
    with pytest.raises(ValueError, match="unknown method"):
        model.sample(4, method="leapfrog")


def test_optimizer_and_scheduler_are_configurable() -> None:
    model = FlowMatching(
        TimeMLP(dim=2, hidden=8, depth=1),
        optimizer=functools.partial(torch.optim.SGD, lr=0.5),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=10),
    )
    config = model.configure_optimizers()
    assert isinstance(config["optimizer"], torch.optim.SGD) and config["optimizer"].param_groups[0]["lr"] == 0.5
    assert config["lr_scheduler"]["interval"] == "step"


class _ExactPolarNet(torch.nn.Module):
    """E[v_theta | x_t / r, theta] for Gaussian data N(m, v I): the optimal polar_v network, written per angle.

    With u = x_t / r = sin x1 + cos x0 ~ N(sin m, k^2), k^2 = sin^2 v + cos^2:
    E[x1 | u] = m + sin v (u - sin m) / k^2, E[x0 | u] = cos (u - sin m) / k^2, v_theta = cos E[x1] - sin E[x0].
    """

    def __init__(self, mean: float, var: float) -> None:
        super().__init__()
        self.mean, self.var = mean, var

    def forward(self, u: torch.Tensor, angle01: torch.Tensor) -> torch.Tensor:
        theta = (angle01 * torch.pi / 2)[:, None]
        sin, cos = torch.sin(theta), torch.cos(theta)
        k2 = sin**2 * self.var + cos**2
        centred = u - sin * self.mean
        return cos * (self.mean + sin * self.var * centred / k2) - sin * (cos * centred / k2)


@pytest.mark.parametrize(
    "path",
    [CondOTPath(0.01), CosinePath(), TabulatedPath.from_path(CosinePath(), n=257)],
    ids=["condot", "cosine", "tabulated"],
)
def test_polar_parametrization_is_path_invariant(path) -> None:
    """One network, exact for Gaussian data, gives the exact marginal velocity on every path."""
    mean, var = 0.6, 0.4
    model = FlowMatching(_ExactPolarNet(mean, var), path=path, parametrization="polar_v")
    x = torch.randn(300, 2, generator=torch.Generator().manual_seed(0)) * 1.5
    t = 0.02 + 0.96 * torch.rand(300, generator=torch.Generator().manual_seed(1))
    c = path.at(t, x)
    k2 = c.alpha**2 * var + c.sigma**2
    exact = c.d_alpha * mean + (c.alpha * c.d_alpha * var + c.sigma * c.d_sigma) / k2 * (x - c.alpha * mean)
    # Both sides combine the same terms through ~16 fp32 operations (the model also through its polar angle and
    # the net's sin / cos of it, ELEMENTARY_REL each) from coefficients within PATH_COEFF_REL: first order,
    # <= 8 PATH_COEFF_REL of the terms' magnitude (the tabulated path's slopes included).
    a, sg, da, ds = (v.double().abs() for v in (c.alpha, c.sigma, c.d_alpha, c.d_sigma))
    ax = x.double().abs()
    terms = da * mean + (a * da * var + sg * ds) / k2.double() * (ax + a * mean)
    assert bool(((model.velocity(x, t) - exact).double().abs() <= 8 * PATH_COEFF_REL * terms).all())
    # and its x1 prediction is the Gaussian posterior mean
    post = mean + c.alpha * var * (x - c.alpha * mean) / k2
    terms = mean + a * var * (ax + a * mean) / k2.double()
    assert bool(((model.predict_x1(x, t) - post).double().abs() <= 8 * PATH_COEFF_REL * terms).all())


def test_polar_conversion_recovers_the_conditional_target() -> None:
    path = CosinePath()
    model = FlowMatching(TimeMLP(dim=3, hidden=8, depth=1), path=path, parametrization="polar_v")
    g = torch.Generator().manual_seed(4)
    x0, x1 = torch.randn(64, 3, generator=g), torch.randn(64, 3, generator=g)
    t = torch.rand(64, generator=g)
    s = path.sample(x0, x1, t)
    c = path.at(t, x0)
    theta = torch.atan2(c.alpha, c.sigma)
    v_theta = torch.cos(theta) * x1 - torch.sin(theta) * x0
    # The same coefficients on both sides, so only the arithmetic rounds: atan2, cos, sin (ELEMENTARY_REL each),
    # and ~10 fp32 operations on terms of size (|alpha'| + |sigma'|) (|x0| + |x1|) (r = 1 on the cosine path).
    terms = (c.d_alpha.abs() + c.d_sigma.abs()).double() * (x0.abs() + x1.abs()).double()
    err = (model._output_to_velocity(v_theta, s.x_t, c) - s.target).double().abs()
    assert bool((err <= (3 * ELEMENTARY_REL + 10 * U32) * terms).all())


def test_module_log_prob_matches_the_gaussian_density() -> None:
    """FlowMatching.log_prob with the exact polar network of N(m, v I) data gives log N(x; m, v + sigma_min^2)."""
    mean, var, sigma_min = 0.6, 0.4, 0.2
    model = FlowMatching(_ExactPolarNet(mean, var), path=CondOTPath(sigma_min), parametrization="polar_v")
    x = mean + torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    total_var = var + sigma_min**2
    expected = (-0.5 * (x - mean) ** 2 / total_var - 0.5 * torch.log(torch.tensor(2 * torch.pi * total_var))).sum(1)
    result = model.log_prob(x, atol=1e-7, rtol=1e-7)
    # fp32 solve: its discretization error (the change from a 10x looser solve bounds it, as in
    # test_likelihood._looser) and its rounding, ~u of the log-density per evaluation; the fp32 expectation
    # rounds 3 x 4 times its terms.
    loose = model.log_prob(x, atol=1e-6, rtol=1e-6)
    scale = expected.abs() + 3 * abs(math.log(2 * math.pi * total_var))
    tol = (result.log_prob - loose.log_prob).abs().max() + (gamma(4 * result.nfe) + gamma(12)) * scale
    assert bool(((result.log_prob - expected).abs() <= tol).all())


@pytest.mark.parametrize("parametrization", ["x1", "eps", "polar_v"])
def test_output_weighting_is_the_plain_mse_of_the_network_output(parametrization: str) -> None:
    torch.manual_seed(1)
    net = TimeMLP(dim=3, hidden=16, depth=2)
    path = CosinePath()
    model = FlowMatching(net, path=path, parametrization=parametrization, loss_weighting="output")
    x0, x1 = torch.randn(64, 3), torch.randn(64, 3)
    t = 0.05 + 0.9 * torch.rand(64)
    x_t = path.sample(x0, x1, t).x_t
    theta = (torch.pi / 2) * t[:, None]  # cosine path: alpha = sin(pi t / 2), sigma = cos(pi t / 2), r = 1
    if parametrization == "polar_v":
        out, target = net(x_t, 2 * theta[:, 0] / torch.pi), torch.cos(theta) * x1 - torch.sin(theta) * x0
        # the model's target and angle from its fp32 coefficients: cos / sin of angles within a few u
        target_err = (2 * ELEMENTARY_REL + 8 * U32) * (x0.abs() + x1.abs())
    else:
        out, target = net(x_t, t), (x1 if parametrization == "x1" else x0)
        target_err = torch.zeros_like(x0)  # the target itself
    # (out - target)^2 moves by <= 2 |out - target| target_err (the net's output is the same computation), and
    # the two fp32 means of 192 positive terms by gamma(192 + 2) each
    expected = (out - target).pow(2).mean()
    tol = (2 * (out - target).abs() * target_err).mean() + 2 * gamma(192 + 2) * expected
    torch.testing.assert_close(model.loss_at(x0, x1, t), expected, atol=float(tol.detach()), rtol=0)
    assert FlowMatching(net, parametrization="polar_v").loss_weighting == "output"
    assert FlowMatching(net, parametrization="x1").loss_weighting == "velocity"
