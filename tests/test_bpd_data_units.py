"""Bits/dim in the data's own units (docs/math.md §8): a known answer, the digits against the reference helper, and
the pixel map's trip through fit, checkpoint and ``to_pixels``."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import Tensor, nn

from ko_lightning import FlowMatching
from ko_lightning.data import DigitsDataModule
from ko_lightning.likelihood import DIGITS_LEVELS, PixelMap, pixel_bits_per_dim
from ko_lightning.nets import TimeMLP

T_EPS = 1e-3


class GaussianVelocity(nn.Module):
    """The exact Cond-OT marginal velocity of data ``N(0, s^2 I)``: ``v = x (t s^2 - (1 - t)) / sigma_t^2`` with
    ``sigma_t^2 = t^2 s^2 + (1 - t)^2`` (the marginal is ``N(0, sigma_t^2 I)``, scaled along t)."""

    def __init__(self, s: float) -> None:
        super().__init__()
        self.s2 = s * s
        self.anchor = nn.Parameter(torch.zeros(()))  # a parameter, so the module has a device

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        t = t.reshape(-1, *([1] * (x.ndim - 1)))
        return x * (t * self.s2 - (1 - t)) / (t * t * self.s2 + (1 - t) ** 2) + 0 * self.anchor


def _marginal_var(t: float, s: float) -> float:
    return t * t * s * s + (1 - t) ** 2


def test_bpd_of_a_known_gaussian_equals_the_dequantized_formula_per_sample_and_in_expectation() -> None:
    """Model density: the flow maps N(0, I) at t_eps to N(0, var I) at 1 - t_eps (linear flow), var =
    sigma^2(1 - t_eps) / sigma^2(t_eps). Pixels k, map y = (k + w - o) / c: per sample the bound is
    -(log N(y; 0, var) - D log c) / (D ln 2) with the call's own w; over w its mean has E[(k + w - o)^2] =
    (k - o)^2 + (k - o) + 1/3 in closed form."""
    s, c, levels, dim = 0.8, 6.0, 17, 4
    offset = torch.tensor([7.0, 8.0, 8.5, 6.0])
    pixel_map = PixelMap.from_normalization(offset, c, levels)
    model = FlowMatching(GaussianVelocity(s), data_shape=(dim,), t_eps=T_EPS)
    var = _marginal_var(1 - T_EPS, s) / _marginal_var(T_EPS, s)
    pixels = torch.tensor([[0, 16, 8, 3], [7, 8, 9, 6], [12, 1, 15, 10]], dtype=torch.uint8)

    def formula(sq: Tensor) -> Tensor:  # sq = ||y||^2 per sample
        log_p = -0.5 * sq / var - 0.5 * dim * math.log(2 * math.pi * var)
        return -(log_p - dim * math.log(c)) / (dim * math.log(2.0))

    got = model.bpd(pixels, atol=1e-9, rtol=1e-9, generator=torch.Generator().manual_seed(3), pixel_map=pixel_map)
    w = torch.rand(pixels.shape, generator=torch.Generator().manual_seed(3))  # the call's own draw (drawn first)
    y = (pixels.double() + w.double() - offset.double()) / c
    expected = formula((y * y).sum(1))
    # dopri5 at 1e-9 on a linear ODE is exact far below fp32; what is left is fp32 rounding of the state and the
    # log-density (|log p| ~ 13 nats, ulp 1e-6) over a few dozen operations, divided by D ln 2 = 2.8: < 2e-5 bits.
    assert torch.allclose(got.bpd.double(), expected, rtol=0, atol=2e-5), (got.bpd, expected)

    # Mean over many draws of w against the closed-form expectation (a Monte-Carlo mean: 6 standard errors).
    model.pixel_map = pixel_map  # as if recorded at fit time: no argument needed
    many = pixels.repeat(400, 1)
    draws = model.bpd(many, atol=1e-7, rtol=1e-7, generator=torch.Generator().manual_seed(4)).bpd.double()
    k = pixels.double() - offset.double()
    mean_sq = ((k * k + k + 1.0 / 3.0) / (c * c)).sum(1)
    exp_mean = formula(mean_sq)
    per_sample = draws.reshape(400, 3)
    se = per_sample.std(0) / math.sqrt(400)
    assert ((per_sample.mean(0) - exp_mean).abs() <= 6 * se + 2e-5).all(), (per_sample.mean(0), exp_mean, se)


def test_the_recorded_map_wins_over_8_bit_defaults_and_explicit_settings_override_it() -> None:
    model = FlowMatching(GaussianVelocity(1.0), data_shape=(2,), t_eps=T_EPS)
    pixels = torch.tensor([[3, 4], [0, 16]])
    eight_bit = model.bpd(pixels, method="euler", steps=20, generator=torch.Generator().manual_seed(0)).bpd
    model.pixel_map = PixelMap.from_normalization(8.0, 4.0, DIGITS_LEVELS)
    recorded = model.bpd(pixels, method="euler", steps=20, generator=torch.Generator().manual_seed(0)).bpd
    explicit = model.bpd(
        pixels, method="euler", steps=20, generator=torch.Generator().manual_seed(0), num_bins=256, data_range=(-1, 1)
    ).bpd
    assert torch.equal(explicit, eight_bit)
    # 8-bit on [-1, 1] has scale 128; the digits map scale 4: the Jacobian term alone differs by log2(128 / 4) = 5
    # bits/dim, and the density term differs too (other y): the numbers must not agree.
    assert (recorded - eight_bit).abs().min() > 1.0
    with pytest.raises(ValueError, match="pixel_map"):
        model.bpd(pixels, pixel_map=model.pixel_map, num_bins=17)
    with pytest.raises(ValueError, match=r"\[0, 16\]"):
        model.bpd(torch.tensor([[3, 17]]))


def _fitted_digits_model(tmp_path) -> tuple[FlowMatching, DigitsDataModule, str]:
    torch.manual_seed(0)
    dm = DigitsDataModule(batch_size=64, flatten=True)
    model = FlowMatching(TimeMLP(dim=64, hidden=32, depth=2), data_shape=(64,), train_seed=0)
    trainer = L.Trainer(
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        limit_val_batches=0,
    )
    trainer.fit(model, dm)
    path = str(tmp_path / "digits.ckpt")
    trainer.save_checkpoint(path)
    return model, dm, path


def test_digits_bpd_in_pixel_units_equals_the_reference_helper_and_survives_a_checkpoint(tmp_path) -> None:
    model, dm, ckpt = _fitted_digits_model(tmp_path)
    assert model.pixel_map is not None and model.pixel_map.levels == DIGITS_LEVELS
    pixels = dm.raw_tensor("test")[:8]
    assert pixels.dtype == torch.uint8 and int(pixels.max()) <= 16
    got = model.bpd(pixels, atol=1e-5, rtol=1e-5, generator=torch.Generator().manual_seed(1)).bpd.double()
    ref = pixel_bits_per_dim(model, pixels, dm.mean, dm.scale, generator=torch.Generator().manual_seed(1)).bpd
    # the same dequantization draw and the same dopri5 solve: equal up to fp32 rounding of the inputs (~1e-6 nats)
    assert torch.allclose(got, ref.double(), rtol=0, atol=1e-4), (got, ref)
    loaded = FlowMatching.load_from_checkpoint(ckpt, net=TimeMLP(dim=64, hidden=32, depth=2))
    assert loaded.pixel_map is not None
    assert torch.equal(torch.as_tensor(loaded.pixel_map.offset), torch.as_tensor(model.pixel_map.offset))
    assert loaded.pixel_map.scale == model.pixel_map.scale
    again = loaded.bpd(pixels, atol=1e-5, rtol=1e-5, generator=torch.Generator().manual_seed(1)).bpd.double()
    assert torch.allclose(again, got, rtol=0, atol=1e-5)


def test_to_pixels_inverts_the_data_normalization_and_clips_samples() -> None:
    dm = DigitsDataModule(batch_size=64)
    dm.setup()
    model = FlowMatching(TimeMLP(dim=64, hidden=8, depth=1), data_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="pixel_map"):
        model.to_pixels(dm.train_tensor(2))
    model.pixel_map = dm.pixel_map()
    raw = dm.raw_tensor("train")
    assert torch.equal(model.to_pixels(dm.train_tensor()), raw.to(torch.int64))
    far = torch.full((1, 1, 8, 8), 1e3)
    assert torch.equal(model.to_pixels(far), torch.full((1, 1, 8, 8), 16)) and int(model.to_pixels(-far).max()) == 0


def test_image_pixel_map_is_the_modules_normalization_and_round_trips_every_level() -> None:
    from ko_lightning.data import ImageDataModule

    levels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    pixel_map = ImageDataModule.pixel_map()
    # the cell's lower edge (w = 0) is the training value u / 127.5 - 1; "center" puts w = 1/2
    lower_edge = pixel_map.dequantize(levels, "center", None, torch.device("cpu"), "x") - 0.5 / pixel_map.scale
    assert torch.allclose(lower_edge, ImageDataModule.normalize(levels), rtol=0, atol=1e-6)
    assert torch.equal(pixel_map.to_pixels(ImageDataModule.normalize(levels)), levels.to(torch.int64))
