"""Tests of ko_lightning.data: samplers, normalization, splits, loaders, image reading and argument errors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from torch import Tensor

from kinetic_helpers import U32
from ko_lightning.data import (
    DigitsDataModule,
    ImageDataModule,
    IndexBatchSampler,
    Toy2DDataModule,
    load_images,
    on_checkerboard,
    sample_checkerboard,
    sample_eight_gaussians,
    sample_moons,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rows(x: Tensor) -> set[tuple[float, ...]]:
    return {tuple(r) for r in x.reshape(x.shape[0], -1).tolist()}


def _normalization_err(y: Tensor, mean: Tensor, scale: Tensor) -> Tensor:
    """Bound on the fp32 rounding of ``y = (x - mean) / scale`` against exact float64 statistics: the mean and
    scale rounded to fp32 (u |mean| and u |y|), the subtraction and the division: ``u (|mean| / scale + 3 |y|)``."""
    return U32 * (mean.double().abs() / scale.double() + 3 * y.double().abs())


def _round_trip_err(x: Tensor, mean: Tensor) -> Tensor:
    """Bound on ``|denormalize(normalize(x)) - x|`` in fp32: ``(x - m) / s`` then ``* s + m`` with the same fp32 s
    and m (the scale cancels exactly): two roundings of ``x - m`` in size, then of the result:
    ``u (3|x - m| + |x|)``."""
    x = x.double()
    return U32 * (3 * (x - mean.double()).abs() + x.abs())


# ------------------------------------------------------------------------------------------------ samplers
def test_checkerboard_samples_lie_on_black_squares() -> None:
    x = sample_checkerboard(20_000, _gen(0))
    assert x.shape == (20_000, 2) and x.dtype == torch.float32
    assert bool(on_checkerboard(x).all())
    assert x.min() >= -2 and x.max() < 2
    # all 8 black cells are used, about equally
    cells = torch.floor(x) + 2
    counts = torch.bincount((cells[:, 0] * 4 + cells[:, 1]).long(), minlength=16)
    assert (counts > 0).sum() == 8
    # each count is Binomial(20000, 1/8): within 4 standard deviations of its mean, max / min stays below
    mean, sd = 20_000 / 8, math.sqrt(20_000 * (1 / 8) * (7 / 8))
    assert counts.max() < (mean + 4 * sd) / (mean - 4 * sd) * counts[counts > 0].min()
    # white squares are rejected by the rule
    assert not bool(on_checkerboard(torch.tensor([[0.5, -0.5], [-0.5, 0.5], [1.5, -1.5], [2.5, 0.5]])).any())


def test_samplers_are_seeded_and_have_the_right_geometry() -> None:
    for sampler in (sample_checkerboard, sample_eight_gaussians, sample_moons):
        torch.testing.assert_close(sampler(100, _gen(3)), sampler(100, _gen(3)), atol=0, rtol=0)  # same seed
        assert not torch.equal(sampler(100, _gen(3)), sampler(100, _gen(4)))
    g = sample_eight_gaussians(4000, _gen(0), radius=2.0, std=0.05)
    # 6 standard deviations: P(any of 4000 radii beyond) ~ 4000 x 2e-9
    assert (g.norm(dim=1) - 2.0).abs().max() < 6 * 0.05
    angles = torch.round(torch.atan2(g[:, 1], g[:, 0]) / (math.pi / 4)) % 8
    assert len(torch.unique(angles)) == 8
    m = sample_moons(4000, _gen(0), noise=0.0)
    # fp32: each coordinate within 8u of the circle (cos / sin 4u, a shift by 1 or 1/2 and back 4u); squared and
    # summed (|coordinate| <= 1): <= 40u
    upper = (m[:, 0].pow(2) + m[:, 1].pow(2) - 1).abs() < 40 * U32
    lower = ((m[:, 0] - 1).pow(2) + (m[:, 1] - 0.5).pow(2) - 1).abs() < 40 * U32
    # each moon with probability 1/2: the upper fraction is within 4 binomial standard deviations of 1/2
    assert bool((upper | lower).all()) and abs(float(upper.float().mean()) - 0.5) < 4 * math.sqrt(0.25 / 4000)


# ------------------------------------------------------------------------------------------------- toy 2D
def _toy(**kwargs) -> Toy2DDataModule:
    args = dict(n_train=8000, n_val=1000, n_test=1000, batch_size=1000)
    args.update(kwargs)
    dm = Toy2DDataModule(**args)
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("name", ["checkerboard", "eight_gaussians", "moons"])
def test_toy2d_normalization(name: str) -> None:
    dm = _toy(name=name)
    x = dm.train_tensor()
    assert x.shape == (8000, 2) and dm.data_shape == (2,)
    # Exactly 0 and 1 for exact statistics; the fp32 normalization moves each value by <= err (measured in
    # float64, so that only the normalization's rounding counts).
    err = _normalization_err(x, dm.mean, dm.scale)
    assert bool((x.double().mean(dim=0).abs() <= err.mean(dim=0)).all())
    assert abs(x.double().pow(2).mean().item() - 1.0) <= float((2 * x.double().abs() * err + err**2).mean())
    assert dm.scale.ndim == 0  # one global scale: the geometry is kept
    for split in (dm.val_tensor(), dm.test_tensor()):  # normalized with the train statistics
        # Monte Carlo: 4 standard errors of the difference of the split's and the train set's means
        se = math.sqrt(1 / split.shape[0] + 1 / x.shape[0])
        assert bool((split.double().mean(dim=0).abs() <= 4 * se * split.double().std(dim=0)).all())
        sq = split.double().pow(2).mean(dim=1)  # per-sample ||x||^2 / d, mean 1 on the train set
        assert abs(sq.mean().item() - 1.0) <= 4 * se * sq.std().item()
    raw = torch.randn(50, 2) * 3
    back = dm.denormalize(dm.normalize(raw))
    assert bool(((back.double() - raw.double()).abs() <= _round_trip_err(raw, dm.mean)).all())


def test_toy2d_checkerboard_rule_holds_after_denormalization() -> None:
    dm = _toy()
    for split in (dm.train_tensor(), dm.val_tensor(), dm.test_tensor()):
        assert bool(on_checkerboard(dm.denormalize(split)).all())


def test_toy2d_splits_seeded_and_distinct() -> None:
    a, b, c = _toy(seed=0), _toy(seed=0), _toy(seed=1)
    # same seed, same operations on the same machine: equal (atol = rtol = 0)
    torch.testing.assert_close(a.train_tensor(), b.train_tensor(), atol=0, rtol=0)
    torch.testing.assert_close(a.val_tensor(), b.val_tensor(), atol=0, rtol=0)
    assert not torch.equal(a.train_tensor(), c.train_tensor())
    assert not torch.equal(a.train_tensor()[:1000], a.val_tensor())
    assert not torch.equal(a.val_tensor(), a.test_tensor())
    train = a.train_tensor()
    a.setup("fit")  # idempotent
    assert a.train_tensor() is train


def test_toy2d_train_loader_shuffles_whole_epochs() -> None:
    dm = _toy(n_train=5500)
    loader = dm.train_dataloader()
    assert len(loader) == 5
    epoch1 = list(loader)
    assert all(isinstance(b, torch.Tensor) and b.shape == (1000, 2) for b in epoch1)
    rows1 = torch.cat(epoch1)
    assert len(_rows(rows1)) == 5000  # no repeats within an epoch (drop_last drops 500)
    assert _rows(rows1) <= _rows(dm.train_tensor())
    epoch2 = torch.cat(list(loader))
    assert not torch.equal(rows1, epoch2)  # reshuffled
    # reproducible: the same rows in the same order
    torch.testing.assert_close(torch.cat(list(_toy(n_train=5500).train_dataloader())), rows1, atol=0, rtol=0)


def test_toy2d_eval_loaders_are_the_fixed_sets_in_order() -> None:
    dm = _toy(n_val=2500, batch_size=1000)
    batches = list(dm.val_dataloader())
    assert [b.shape[0] for b in batches] == [1000, 1000, 500]
    torch.testing.assert_close(torch.cat(batches), dm.val_tensor(), atol=0, rtol=0)  # the same rows
    torch.testing.assert_close(torch.cat(list(dm.test_dataloader())), dm.test_tensor(), atol=0, rtol=0)


def test_index_batch_sampler_shards_under_lightning_distributed_wrapper() -> None:
    sampler = IndexBatchSampler(100, 10, shuffle=True, drop_last=True, seed=0)
    ranks = []
    for rank in range(2):
        wrapped = DistributedSamplerWrapper(
            IndexBatchSampler(100, 10, shuffle=True, drop_last=True, seed=0), num_replicas=2, rank=rank, shuffle=False
        )
        wrapped.set_epoch(0)
        ranks.append([b.tolist() for b in wrapped])
    sampler.set_epoch(0)
    all_batches = [b.tolist() for b in sampler]
    assert len(ranks[0]) == len(ranks[1]) == 5
    assert sorted(ranks[0] + ranks[1]) == sorted(all_batches)


def test_toy2d_errors() -> None:
    with pytest.raises(ValueError, match=r"name='spirals'.*checkerboard.*eight_gaussians.*moons"):
        Toy2DDataModule(name="spirals")
    with pytest.raises(ValueError, match="batch_size"):
        Toy2DDataModule(n_train=100, batch_size=200)
    with pytest.raises(ValueError, match="n_val"):
        Toy2DDataModule(n_val=0)


# ------------------------------------------------------------------------------------------------- digits
def test_digits_normalization_and_round_trip() -> None:
    dm = DigitsDataModule(batch_size=128)
    dm.setup("fit")
    x = dm.train_tensor()
    assert dm.data_shape == (1, 8, 8) and x.shape[1:] == (1, 8, 8)
    # exactly 0 and 1 for exact statistics, up to the fp32 normalization's rounding (measured in float64)
    err = _normalization_err(x, dm.mean, dm.scale)
    assert bool((x.double().mean(dim=0).abs() <= err.mean(dim=0)).all())  # per-pixel mean removed
    # mean ||x||^2 / d = 1
    assert abs(x.double().pow(2).mean().item() - 1.0) <= float((2 * x.double().abs() * err + err**2).mean())
    pixels = dm.denormalize(x)
    # integer pixel values in [0, 16] come back, up to the fp32 round trip (u (3 |x - m| + |x|) <= 64u, as the
    # pixels x and the means m lie in [0, 16])
    back_err = 64 * U32
    assert pixels.min() >= -back_err and pixels.max() <= 16 + back_err
    torch.testing.assert_close(pixels, pixels.round(), atol=back_err, rtol=0)
    raw = torch.randint(0, 17, (5, 1, 8, 8)).float()
    back = dm.denormalize(dm.normalize(raw))
    assert bool(((back.double() - raw.double()).abs() <= _round_trip_err(raw, dm.mean)).all())
    display = dm.to_display(torch.randn(3, 1, 8, 8) * 3)
    assert display.shape == (3, 1, 8, 8) and display.min() >= 0 and display.max() <= 1
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, torch.Tensor) and batch.shape == (128, 1, 8, 8)


def test_digits_splits_disjoint_reproducible_and_seeded() -> None:
    a, b, c = DigitsDataModule(seed=0), DigitsDataModule(seed=0), DigitsDataModule(seed=1)
    for dm in (a, b, c):
        dm.setup()
    sizes = {k: len(v) for k, v in a.indices.items()}
    assert sizes == {"train": 1437, "val": 180, "test": 180}
    idx = [set(a.indices[k].tolist()) for k in ("train", "val", "test")]
    assert not (idx[0] & idx[1]) and not (idx[0] & idx[2]) and not (idx[1] & idx[2])
    assert len(idx[0] | idx[1] | idx[2]) == 1797
    for k in ("train", "val", "test"):
        assert torch.equal(a.indices[k], b.indices[k])
        assert not torch.equal(a.indices[k], c.indices[k])
    torch.testing.assert_close(a.train_tensor(), b.train_tensor(), atol=0, rtol=0)  # same split and statistics
    assert a.val_tensor().shape == (180, 1, 8, 8) and len(list(a.test_dataloader())) == 1


def test_digits_flatten_and_errors() -> None:
    dm = DigitsDataModule(batch_size=32, flatten=True, val_fraction=0.0)
    dm.setup()
    assert dm.data_shape == (64,)
    assert next(iter(dm.train_dataloader())).shape == (32, 64)
    assert dm.val_dataloader() == []
    assert dm.to_display(dm.train_tensor(2)).shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="val_fraction"):
        DigitsDataModule(val_fraction=1.2)
    with pytest.raises(ValueError, match="batch_size"):
        DigitsDataModule(batch_size=5000).setup()


# ------------------------------------------------------------------------------------------------- images
def _make_images(n: int = 12, size: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def _write_pngs(folder: Path, images: np.ndarray) -> None:
    from PIL import Image

    for i, im in enumerate(images):
        sub = folder / ("a" if i < len(images) // 2 else "b")  # nested folders are searched too
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(sub / f"img_{i:03d}.png")


def test_image_folder_and_npz_give_the_same_tensors(tmp_path: Path) -> None:
    images = _make_images()
    _write_pngs(tmp_path / "pngs", images)
    (tmp_path / "pngs" / "notes.txt").write_text("not an image")
    np.savez(tmp_path / "nhwc.npz", x=images)
    np.savez(tmp_path / "nchw.npz", mine=images.transpose(0, 3, 1, 2))
    np.savez(tmp_path / "flat.npz", data=images.transpose(0, 3, 1, 2).reshape(len(images), -1))
    expected = torch.from_numpy(images).permute(0, 3, 1, 2)
    assert torch.equal(load_images(tmp_path / "pngs"), expected)
    assert torch.equal(load_images(tmp_path / "nhwc.npz"), expected)
    assert torch.equal(load_images(tmp_path / "nchw.npz", npz_key="mine"), expected)
    assert torch.equal(load_images(tmp_path / "flat.npz"), expected)
    # resizing goes through the same code for both sources
    assert torch.equal(load_images(tmp_path / "pngs", image_size=4), load_images(tmp_path / "nhwc.npz", image_size=4))

    folder = ImageDataModule(str(tmp_path / "pngs"), batch_size=4, val_fraction=0.25, random_flip=False)
    array = ImageDataModule(str(tmp_path / "nhwc.npz"), batch_size=4, val_fraction=0.25, random_flip=False)
    assert folder.data_shape == array.data_shape == (3, 8, 8)
    for split in ("train", "val"):
        assert torch.equal(folder.raw_tensor(split), array.raw_tensor(split))
    assert folder.raw_tensor("train").dtype == torch.uint8 and len(folder.raw_tensor("val")) == 3
    assert torch.equal(torch.cat(list(folder.train_dataloader())), torch.cat(list(array.train_dataloader())))
    val = torch.cat(list(folder.val_dataloader()))
    raw_val = folder.raw_tensor("val").float()
    # u / 127.5 - 1 in fp32 (values in [-1, 1]): each side within 2u of the exact value (two roundings)
    torch.testing.assert_close(val, raw_val / 127.5 - 1, atol=4 * U32, rtol=0)
    assert val.min() >= -1 and val.max() <= 1
    # (u / 127.5 - 1 + 1) * 127.5 in fp32: four roundings, of sizes |u| / 127.5, |x|, |x + 1| and the result
    round_trip = U32 * (2 * raw_val + 127.5 * (val.abs() + (val + 1).abs()))
    assert bool(((folder.denormalize(val) - raw_val).abs() <= round_trip).all())
    assert torch.equal(folder.to_uint8(val), folder.raw_tensor("val"))


def test_image_grayscale_folder_and_3d_npz(tmp_path: Path) -> None:
    from PIL import Image

    gray = _make_images(6)[..., 0]
    (tmp_path / "g").mkdir()
    for i, im in enumerate(gray):
        Image.fromarray(im).save(tmp_path / "g" / f"{i}.png")
    np.savez(tmp_path / "g.npz", images=gray)
    assert load_images(tmp_path / "g").shape == (6, 1, 8, 8)
    assert torch.equal(load_images(tmp_path / "g"), load_images(tmp_path / "g.npz"))


def test_image_random_flip_and_split_reproducibility(tmp_path: Path) -> None:
    images = _make_images(40)
    np.savez(tmp_path / "d.npz", x=images)
    dm = ImageDataModule(str(tmp_path / "d.npz"), batch_size=8, val_fraction=0.2, seed=0)
    raw = dm.normalize(dm.raw_tensor("train"))
    torch.manual_seed(0)
    flips = 0
    for batch in dm.train_dataloader():
        for x in batch:
            match = (raw == x).flatten(1).all(1)
            match_flipped = (raw == x.flip(-1)).flatten(1).all(1)
            assert bool(match.any() or match_flipped.any())
            flips += int(not match.any())
    assert 0 < flips < 32  # some, not all, images were flipped
    same = ImageDataModule(str(tmp_path / "d.npz"), batch_size=8, val_fraction=0.2, seed=0)
    other = ImageDataModule(str(tmp_path / "d.npz"), batch_size=8, val_fraction=0.2, seed=1)
    same.setup()
    other.setup()
    assert torch.equal(dm.indices["val"], same.indices["val"])
    assert not torch.equal(dm.indices["val"], other.indices["val"])
    assert not set(dm.indices["val"].tolist()) & set(dm.indices["train"].tolist())


def test_image_test_path(tmp_path: Path) -> None:
    np.savez(tmp_path / "train.npz", x=_make_images(10, seed=0))
    np.savez(tmp_path / "test.npz", x=_make_images(5, seed=1))
    dm = ImageDataModule(str(tmp_path / "train.npz"), batch_size=2, val_fraction=0.0)
    assert dm.val_dataloader() == []
    with pytest.raises(ValueError, match="test_path"):
        dm.test_dataloader()
    dm = ImageDataModule(str(tmp_path / "train.npz"), batch_size=2, test_path=str(tmp_path / "test.npz"))
    assert torch.cat(list(dm.test_dataloader())).shape == (5, 3, 8, 8)


def test_image_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.npz"
    with pytest.raises(FileNotFoundError, match="nowhere.npz"):
        ImageDataModule(str(missing))
    with pytest.raises(FileNotFoundError, match="nowhere.npz"):
        load_images(missing)
    with pytest.raises(FileNotFoundError, match="test_path"):
        ImageDataModule(str(tmp_path), test_path=str(missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no image files"):
        load_images(tmp_path / "empty")

    np.savez(tmp_path / "float.npz", x=np.random.rand(4, 8, 8, 3).astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        ImageDataModule(str(tmp_path / "float.npz")).setup()
    np.savez(tmp_path / "big.npz", x=np.full((4, 8, 8, 3), 300, dtype=np.int16))
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        load_images(tmp_path / "big.npz")
    np.savez(tmp_path / "ok16.npz", x=np.full((4, 8, 8, 3), 200, dtype=np.int16))
    assert load_images(tmp_path / "ok16.npz").dtype == torch.uint8  # in-range integers are accepted
    np.savez(tmp_path / "keys.npz", foo=_make_images(4))
    with pytest.raises(ValueError, match="foo"):
        load_images(tmp_path / "keys.npz")
    with pytest.raises(ValueError, match="npz_key='bar'"):
        load_images(tmp_path / "keys.npz", npz_key="bar")
    np.savez(tmp_path / "shape.npz", x=np.zeros((4, 8, 8, 5), dtype=np.uint8))
    with pytest.raises(ValueError, match="channel"):
        load_images(tmp_path / "shape.npz")

    from PIL import Image

    (tmp_path / "mixed").mkdir()
    Image.fromarray(_make_images(1, 8)[0]).save(tmp_path / "mixed" / "a.png")
    Image.fromarray(_make_images(1, 6)[0]).save(tmp_path / "mixed" / "b.png")
    with pytest.raises(ValueError, match="image_size"):
        load_images(tmp_path / "mixed")
    assert load_images(tmp_path / "mixed", image_size=4).shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match="image_size"):
        ImageDataModule(str(tmp_path / "mixed"), image_size=0)
