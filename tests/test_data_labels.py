"""Class labels from the data modules (``labels=True``): correct by construction, aligned with their samples through
splits, shuffling, flips and sharding, the same points as without labels, and errors that name the bad input."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader

from ko_lightning.data import (
    TOY2D_LABELLED_SAMPLERS,
    TOY2D_NUM_CLASSES,
    TOY2D_SAMPLERS,
    DigitsDataModule,
    ImageDataModule,
    TensorBatchDataset,
    Toy2DDataModule,
    checkerboard_square,
    load_labelled_images,
    on_checkerboard,
    sample_checkerboard_with_labels,
    sample_eight_gaussians_with_labels,
    sample_mixture12_with_labels,
    sample_moons_with_labels,
    sample_rings_with_labels,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _label_of_rows(data: Tensor, labels: Tensor) -> dict[tuple[float, ...], set[int]]:
    """Row of ``data`` (as a tuple) -> the labels it carries (a set: a data set may repeat an image)."""
    table: dict[tuple[float, ...], set[int]] = {}
    for row, label in zip(data.reshape(data.shape[0], -1).tolist(), labels.tolist(), strict=True):
        table.setdefault(tuple(row), set()).add(label)
    return table


def _assert_batches_aligned(batches: list, data: Tensor, labels: Tensor) -> int:
    """Every ``(x, y)`` batch pairs each sample with its own label in ``(data, labels)``; returns the sample count."""
    table = _label_of_rows(data, labels)
    count = 0
    for batch in batches:
        assert isinstance(batch, tuple) and len(batch) == 2
        x, y = batch
        assert y.dtype == torch.int64 and y.shape == (x.shape[0],)
        for row, label in zip(x.reshape(x.shape[0], -1).tolist(), y.tolist(), strict=True):
            assert label in table[tuple(row)]
        count += x.shape[0]
    return count


# ------------------------------------------------------------------------------------------------ digits
def test_digits_labels_are_sklearns_targets_of_the_same_images() -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    by_image = _label_of_rows(torch.as_tensor(digits.data, dtype=torch.float64), torch.as_tensor(digits.target))
    dm = DigitsDataModule(batch_size=128, labels=True, seed=1)
    assert dm.num_classes == 10
    for split in ("train", "val", "test"):
        labels = dm.labels_tensor(split)
        pixels = dm.denormalize(getattr(dm, f"{split}_tensor")()).round().double()  # back to the integers 0..16
        assert labels.dtype == torch.int64 and labels.shape == (pixels.shape[0],)
        for row, label in zip(pixels.reshape(len(pixels), -1).tolist(), labels.tolist(), strict=True):
            assert label in by_image[tuple(row)]  # the image is sklearn's, and so is its label
        assert torch.equal(labels, torch.as_tensor(digits.target)[dm.indices[split]])
    assert set(dm.labels_tensor().tolist()) == set(range(10))
    epoch = list(dm.train_dataloader())
    assert _assert_batches_aligned(epoch, dm.train_tensor(), dm.labels_tensor()) == 11 * 128
    assert _assert_batches_aligned(list(dm.test_dataloader()), dm.test_tensor(), dm.labels_tensor("test")) == 180


def test_digits_without_labels_are_unchanged() -> None:
    plain, labelled = (
        DigitsDataModule(batch_size=64, flatten=True),
        DigitsDataModule(batch_size=64, flatten=True, labels=True),
    )
    assert plain.num_classes is None
    batches, pairs = list(plain.train_dataloader()), list(labelled.train_dataloader())
    assert all(isinstance(b, Tensor) and b.shape == (64, 64) for b in batches)
    assert torch.equal(torch.cat(batches), torch.cat([x for x, _ in pairs]))  # the same batches, in the same order
    assert torch.equal(plain.train_tensor(), labelled.train_tensor()) and isinstance(labelled.train_tensor(), Tensor)
    with pytest.raises(ValueError, match=r"labels=False.*labels=True"):
        plain.labels_tensor()
    with pytest.raises(ValueError, match="split"):
        labelled.labels_tensor("training")


# ---------------------------------------------------------------------------------------------- toy samplers
_KWARGS = {"checkerboard": {}, "eight_gaussians": {"std": 0.05}, "moons": {"noise": 0.2}, "rings": {"noise": 0.03}}


@pytest.mark.parametrize("name", sorted(TOY2D_LABELLED_SAMPLERS))
def test_labelled_samplers_draw_the_same_points(name: str) -> None:
    kwargs = _KWARGS.get(name, {})
    generator = _gen(5)
    x, y = TOY2D_LABELLED_SAMPLERS[name](3000, generator, **kwargs)
    after = torch.rand(4, generator=generator)  # the generator has advanced by the same draws too
    reference = _gen(5)
    assert torch.equal(x, TOY2D_SAMPLERS[name](3000, reference, **kwargs))
    assert torch.equal(after, torch.rand(4, generator=reference))
    assert y.dtype == torch.int64 and y.shape == (3000,)
    assert set(y.tolist()) == set(range(TOY2D_NUM_CLASSES[name]))  # every class drawn, no other value


def _reference_draw(name: str, n: int, g: torch.Generator) -> Tensor:
    """The samplers as they were before the labels (their random draws in order), written out again."""
    if name == "checkerboard":
        corners = torch.tensor([(i, j) for i in range(-2, 2) for j in range(-2, 2) if (i + j) % 2 == 0]).float()
        return corners[torch.randint(0, 8, (n,), generator=g)] + torch.rand(n, 2, generator=g)
    if name == "eight_gaussians":
        angle = 2 * math.pi * torch.randint(0, 8, (n,), generator=g).float() / 8
        return 2.0 * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1) + 0.2 * torch.randn(n, 2, generator=g)
    if name == "moons":
        lower = torch.randint(0, 2, (n,), generator=g).bool()
        a = math.pi * torch.rand(n, generator=g)
        up, low = torch.stack([torch.cos(a), torch.sin(a)], 1), torch.stack([1 - torch.cos(a), 0.5 - torch.sin(a)], 1)
        return torch.where(lower[:, None], low, up) + 0.1 * torch.randn(n, 2, generator=g)
    if name == "rings":
        radius = 0.4 + 0.3 * torch.randint(0, 3, (n,), generator=g).float()
        a = 2 * math.pi * torch.rand(n, generator=g)
        return radius[:, None] * torch.stack([torch.cos(a), torch.sin(a)], 1) + 0.01 * torch.randn(n, 2, generator=g)
    assert name == "mixture12"
    means = 1.5 * torch.randn(10, 12, generator=torch.Generator().manual_seed(123))
    return means[torch.randint(0, 10, (n,), generator=g)] + 0.3 * torch.randn(n, 12, generator=g)


# the pinwheel was added with its labels (its own test checks that both samplers draw the same points)
@pytest.mark.parametrize("name", sorted(set(TOY2D_LABELLED_SAMPLERS) - {"pinwheel"}))
def test_samplers_draw_what_they_drew_before_labels(name: str) -> None:
    assert torch.equal(TOY2D_SAMPLERS[name](1000, _gen(9)), _reference_draw(name, 1000, _gen(9)))


def test_checkerboard_labels_are_the_squares_of_the_points() -> None:
    x, y = sample_checkerboard_with_labels(5000, _gen(0))
    assert bool(on_checkerboard(x).all())
    # independently: the black squares' lower-left corners in lexicographic order, found from floor(x)
    corners = [(i, j) for i in range(-2, 2) for j in range(-2, 2) if (i + j) % 2 == 0]
    expected = [corners.index((math.floor(a), math.floor(b))) for a, b in x.tolist()]
    assert y.tolist() == expected
    assert torch.equal(checkerboard_square(x), y)


def test_mixture_labels_are_the_components() -> None:
    std = 0.05
    x, y = sample_eight_gaussians_with_labels(4000, _gen(1), radius=2.0, std=std)
    centres = torch.tensor([[2 * math.cos(math.pi * k / 4), 2 * math.sin(math.pi * k / 4)] for k in range(8)])
    distances = torch.cdist(x, centres)
    assert torch.equal(distances.argmin(dim=1), y)  # centres 1.53 apart, 6 std of noise reach 0.3
    assert float(distances.gather(1, y[:, None]).max()) < 6 * std * math.sqrt(2)
    # mixture12 without noise: each point is its component's mean, a different one for each label
    x12, y12 = sample_mixture12_with_labels(500, _gen(2), std=0.0)
    means = {}
    for row, label in zip(x12.tolist(), y12.tolist(), strict=True):
        assert means.setdefault(label, row) == row
    assert len(means) == 10 and len({tuple(m) for m in means.values()}) == 10


def test_moon_and_ring_labels() -> None:
    x, y = sample_moons_with_labels(4000, _gen(3), noise=0.0)
    upper = (x[:, 0].pow(2) + x[:, 1].pow(2) - 1).abs() < 1e-5
    lower = ((x[:, 0] - 1).pow(2) + (x[:, 1] - 0.5).pow(2) - 1).abs() < 1e-5
    # label 0 on the upper circle's upper half, label 1 on the lower circle's lower half (sin(a) of a float32 a
    # near pi may be about -1e-7)
    assert bool((upper & (x[:, 1] >= -1e-6))[y == 0].all()) and bool((lower & (x[:, 1] <= 0.5 + 1e-6))[y == 1].all())
    r, k = sample_rings_with_labels(4000, _gen(4), noise=0.0)
    torch.testing.assert_close(r.norm(dim=1), 0.4 + 0.3 * k.float(), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------- toy module
def _toy(name: str, labels: bool, **kwargs) -> Toy2DDataModule:
    args = dict(n_train=2000, n_val=300, n_test=300, batch_size=500, seed=7, labels=labels)
    args.update(kwargs)
    return Toy2DDataModule(name, **args)


@pytest.mark.parametrize("name", ["checkerboard", "rings", "mixture12"])
def test_toy_module_labels_follow_the_points(name: str) -> None:
    plain, labelled = _toy(name, False), _toy(name, True)
    assert plain.num_classes is None and labelled.num_classes == TOY2D_NUM_CLASSES[name]
    for split in ("train", "val", "test"):  # the same normalized points with and without labels
        assert torch.equal(getattr(plain, f"{split}_tensor")(), getattr(labelled, f"{split}_tensor")())
    plain_epoch, epoch = list(plain.train_dataloader()), list(labelled.train_dataloader())
    assert all(isinstance(b, Tensor) for b in plain_epoch)
    assert torch.equal(torch.cat(plain_epoch), torch.cat([x for x, _ in epoch]))
    assert _assert_batches_aligned(epoch, labelled.train_tensor(), labelled.labels_tensor()) == 2000
    val = list(labelled.val_dataloader())
    assert _assert_batches_aligned(val, labelled.val_tensor(), labelled.labels_tensor("val")) == 300
    assert torch.equal(torch.cat([y for _, y in val]), labelled.labels_tensor("val"))  # in order
    raw = labelled.denormalize(labelled.test_tensor())
    labels = labelled.labels_tensor("test")
    if name == "rings":  # radii 0.3 apart, noise 0.01
        assert torch.equal(torch.round((raw.norm(dim=1) - 0.4) / 0.3).long(), labels)
    elif name == "checkerboard":  # away from the cell edges, where the normalization's rounding cannot move a point
        clear = ((raw - raw.round()).abs() > 1e-4).all(dim=1)
        assert int(clear.sum()) > 290 and torch.equal(checkerboard_square(raw[clear]), labels[clear])


def test_toy_labels_errors() -> None:
    with pytest.raises(ValueError, match=r"labels=True.*name='spiral'.*no classes"):
        Toy2DDataModule("spiral", labels=True)
    assert Toy2DDataModule("spiral", n_train=100, n_val=10, n_test=10, batch_size=10).num_classes is None
    with pytest.raises(ValueError, match=r"labels must have shape \(N,\) = \(4,\)"):
        TensorBatchDataset(torch.zeros(4, 2), labels=torch.zeros(3, dtype=torch.int64))


# ------------------------------------------------------------------------------------------------- images
def _coded_images(labels: np.ndarray) -> np.ndarray:
    """Constant images whose pixel value ``40 label + i mod 40`` encodes their label (and nearly their index)."""
    values = 40 * labels + np.arange(len(labels)) % 40
    return np.broadcast_to(values[:, None, None, None], (len(labels), 6, 6, 3)).astype(np.uint8)


def _decoded(x: Tensor) -> Tensor:
    """The labels encoded by :func:`_coded_images` in a batch in model space (or uint8 pixels)."""
    pixels = x if x.dtype == torch.uint8 else ImageDataModule.to_uint8(x)
    return pixels[:, 0, 0, 0].long() // 40


def test_npz_labels_follow_their_images(tmp_path: Path) -> None:
    labels = np.random.default_rng(0).integers(0, 5, size=60)
    np.savez(tmp_path / "train.npz", x=_coded_images(labels), labels=labels)
    test_labels = np.arange(7) % 3
    np.savez(tmp_path / "test.npz", images=_coded_images(test_labels), y=test_labels.astype(np.uint8))
    dm = ImageDataModule(
        str(tmp_path / "train.npz"), batch_size=8, val_fraction=0.25, labels=True, test_path=str(tmp_path / "test.npz")
    )
    assert dm.num_classes == int(labels.max()) + 1 and dm.class_names is None
    for split in ("train", "val", "test"):
        assert torch.equal(dm.labels_tensor(split), _decoded(dm.raw_tensor(split)))
        assert dm.raw_tensor(split).dtype == torch.uint8  # the helpers stay plain tensors
    assert torch.equal(dm.labels_tensor("val"), torch.as_tensor(labels)[dm.indices["val"]])
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        batches = list(loader)
        assert batches and all(torch.equal(y, _decoded(x)) for x, y in batches)
    assert torch.equal(torch.cat([y for _, y in dm.test_dataloader()]), torch.as_tensor(test_labels))
    plain = ImageDataModule(str(tmp_path / "train.npz"), batch_size=8, val_fraction=0.25)
    assert torch.equal(dm.train_tensor(), plain.train_tensor())
    assert torch.equal(torch.cat(list(plain.val_dataloader())), torch.cat([x for x, _ in dm.val_dataloader()]))


def test_labels_stay_with_flipped_images_and_under_sharding(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, size=48)
    images = rng.integers(0, 256, size=(48, 6, 6, 3), dtype=np.uint8)  # asymmetric: a flip shows
    images[:, 0, 0, :] = 40 * labels[:, None] + 3  # the label in the first column; the last column's pixel too
    images[:, 0, -1, :] = 40 * labels[:, None] + 3
    np.savez(tmp_path / "d.npz", x=images, labels=labels)
    dm = ImageDataModule(str(tmp_path / "d.npz"), batch_size=4, val_fraction=0.0, labels=True, random_flip=True)
    loader = dm.train_dataloader()
    flipped = 0
    for x, y in loader:
        assert torch.equal(y, _decoded(x))
        flipped += sum(not bool((dm.to_uint8(im) == dm.raw_tensor()).flatten(1).all(1).any()) for im in x)
    assert 0 < flipped < 48
    shards = []
    for rank in range(2):  # the sampler Lightning puts around the loader's own under DDP
        # each rank holds its own copy of the loader's sampler (in the same state)
        sampler = DistributedSamplerWrapper(copy.deepcopy(loader.sampler), num_replicas=2, rank=rank, shuffle=False)
        sampler.set_epoch(3)
        shards.append(list(DataLoader(loader.dataset, batch_size=None, sampler=sampler)))
    assert len(shards[0]) == len(shards[1]) == 6
    seen = [int(v) for shard in shards for x, y in shard for v in _decoded(x)]
    for shard in shards:
        assert all(torch.equal(y, _decoded(x)) for x, y in shard)
    assert sorted(seen) == sorted(labels.tolist())  # the two shards cover the epoch once


def _write_class_folders(root: Path, counts: dict[str, int], codes: dict[str, int] | None = None) -> None:
    """``root/<class>/[nested/]img_i.png``: gray images of value ``50 k + i``, ``k = codes[class]`` (default: the
    class's position among the sorted class names)."""
    codes = codes or {name: k for k, name in enumerate(sorted(counts))}
    for name, count in counts.items():
        for i in range(count):
            folder = root / name / ("nested" if i % 2 else "")
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((5, 5), 50 * codes[name] + i, dtype=np.uint8)).save(folder / f"img_{i}.png")


def test_class_folder_labels(tmp_path: Path) -> None:
    _write_class_folders(tmp_path / "train", {"dog": 6, "ant": 5, "cat": 7})
    # dog is training class 2, but the test set's second class folder: labelled 2
    _write_class_folders(tmp_path / "test", {"ant": 2, "dog": 3}, codes={"ant": 0, "dog": 2})
    images, labels, names = load_labelled_images(tmp_path / "train")
    assert names == ("ant", "cat", "dog") and images.shape == (18, 1, 5, 5)
    assert torch.equal(labels, images[:, 0, 0, 0].long() // 50)
    assert torch.bincount(labels).tolist() == [5, 7, 6]
    dm = ImageDataModule(
        str(tmp_path / "train"), batch_size=4, val_fraction=0.2, labels=True, test_path=str(tmp_path / "test")
    )
    assert dm.class_names == ("ant", "cat", "dog") and dm.num_classes == 3
    for split in ("train", "val"):
        assert torch.equal(dm.labels_tensor(split), dm.raw_tensor(split)[:, 0, 0, 0].long() // 50)
    test = dm.labels_tensor("test")
    assert torch.equal(test, dm.raw_tensor("test")[:, 0, 0, 0].long() // 50) and set(test.tolist()) == {0, 2}
    assert all(torch.equal(y, dm.to_uint8(x)[:, 0, 0, 0].long() // 50) for x, y in dm.train_dataloader())


def _match(path: Path, *rest: str) -> str:
    return re.escape(str(path)) + ".*" + ".*".join(rest)


def test_bad_labels_are_errors_naming_the_file_and_key(tmp_path: Path) -> None:
    images = _coded_images(np.zeros(6, dtype=np.int64))

    def npz(name: str, **arrays) -> str:
        np.savez(tmp_path / name, x=images, **arrays)
        return str(tmp_path / name)

    cases = [
        (npz("count.npz", labels=np.zeros(5, np.int64)), r"\['labels'\].*one label per image.*\(6,\).*\(5,\)"),
        (npz("shape.npz", y=np.zeros((6, 1), np.int64)), r"\['y'\].*\(6,\).*\(6, 1\)"),
        (npz("float.npz", labels=np.zeros(6, np.float32)), r"\['labels'\].*integers.*float32"),
        (npz("bool.npz", labels=np.zeros(6, bool)), r"\['labels'\].*integers.*bool"),
        (npz("negative.npz", labels=np.array([0, 1, -1, 0, 1, 0])), r"\['labels'\].*>= 0.*-1"),
        (npz("missing.npz", targets=np.zeros(6, np.int64)), r"label keys \['labels', 'y'\].*targets"),
    ]
    for file, match in cases:
        with pytest.raises(ValueError, match=re.escape(file) + ".*" + match):
            ImageDataModule(file, batch_size=2, labels=True).setup()
    with pytest.raises(ValueError, match=r"labels_key='classes' is not in .*missing\.npz.*targets"):
        ImageDataModule(str(tmp_path / "missing.npz"), batch_size=2, labels=True, labels_key="classes").setup()
    assert torch.equal(load_labelled_images(tmp_path / "missing.npz", labels_key="targets")[1], torch.zeros(6).long())
    with pytest.raises(ValueError, match="labels_key='targets' is only read with labels=True"):
        ImageDataModule(str(tmp_path / "missing.npz"), labels_key="targets")
    np.save(tmp_path / "plain.npy", images)
    with pytest.raises(ValueError, match=_match(tmp_path / "plain.npy", r"\.npy", r"\.npz")):
        ImageDataModule(str(tmp_path / "plain.npy"), batch_size=2, labels=True).setup()
    # test labels beyond the training classes
    npz("train.npz", labels=np.arange(6) % 3)
    npz("test.npz", labels=np.arange(6) % 4)
    dm = ImageDataModule(str(tmp_path / "train.npz"), 2, labels=True, test_path=str(tmp_path / "test.npz"))
    with pytest.raises(ValueError, match=_match(tmp_path / "test.npz", "label 3", "3 classes")):
        dm.test_dataloader()


def test_bad_class_folders_are_errors_naming_the_file_or_folder(tmp_path: Path) -> None:
    _write_class_folders(tmp_path / "loose", {"a": 2, "b": 2})
    stray = tmp_path / "loose" / "stray.png"
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(stray)
    with pytest.raises(ValueError, match=_match(stray, "class folder")):
        ImageDataModule(str(tmp_path / "loose"), batch_size=2, labels=True).setup()
    assert ImageDataModule(str(tmp_path / "loose"), batch_size=2).raw_tensor().shape[0] == 5  # fine without labels
    _write_class_folders(tmp_path / "empty", {"a": 2, "b": 2})
    (tmp_path / "empty" / "c").mkdir()
    with pytest.raises(ValueError, match=_match(tmp_path / "empty" / "c", "no image")):
        load_labelled_images(tmp_path / "empty")
    _write_class_folders(tmp_path / "train", {"a": 4, "b": 4})
    _write_class_folders(tmp_path / "test", {"a": 1, "z": 1})
    dm = ImageDataModule(str(tmp_path / "train"), 2, labels=True, test_path=str(tmp_path / "test"))
    with pytest.raises(ValueError, match=_match(tmp_path / "test" / "z", "training classes")):
        dm.labels_tensor("test")
    np.savez(tmp_path / "ints.npz", x=_coded_images(np.zeros(6, np.int64)), labels=np.arange(6) % 2)
    dm = ImageDataModule(str(tmp_path / "ints.npz"), 2, labels=True, test_path=str(tmp_path / "train"))
    with pytest.raises(ValueError, match=_match(tmp_path / "train", "class folders", "without class names")):
        dm.raw_tensor("test")


def test_pinwheel_arms_are_one_shape_rotated_and_match_their_labels() -> None:
    """Undoing each point's arm rotation ``2 pi k / 5`` must give one distribution for every arm (the shape is
    five-fold symmetric). Undoing also the radius-dependent rotation ``0.25 exp(rho)`` leaves the point
    ``(rho, tau)``: its tangential part ``tau = |x| sin(residual angle)`` must have the standard deviation 0.05 it was
    drawn with (``|x| = sqrt(rho^2 + tau^2)`` stands in for ``rho``, off by ``tau^2 / (2 rho)``)."""
    from ko_lightning.data import sample_pinwheel, sample_pinwheel_with_labels

    x, arm = sample_pinwheel_with_labels(20_000, torch.Generator().manual_seed(0))
    assert torch.equal(x, sample_pinwheel(20_000, torch.Generator().manual_seed(0)))
    counts = torch.bincount(arm, minlength=5).double()
    assert float(((counts - 4000) ** 2 / 4000).sum()) < 18.47  # chi-square, 4 degrees of freedom, P = 0.001
    back = 2 * math.pi * arm.double() / 5
    c, s = torch.cos(-back), torch.sin(-back)
    xd = x.double()
    unrotated = torch.stack([xd[:, 0] * c - xd[:, 1] * s, xd[:, 0] * s + xd[:, 1] * c], dim=1)
    means = torch.stack([unrotated[arm == k].mean(0) for k in range(5)])
    se = unrotated.std(0) / math.sqrt(4000)
    assert bool(((means - means.mean(0)).abs() <= 5 * se).all()), means  # the same shape on every arm
    radius = unrotated.norm(dim=1)
    residual = torch.atan2(unrotated[:, 1], unrotated[:, 0]) - 0.25 * torch.exp(radius)
    tau = radius * torch.sin(residual)
    inner = radius > 0.4  # away from the centre, where tau / rho is small
    # the sample std of 0.05 z has a standard error of 0.05 / sqrt(2 n) (about 0.5% of 0.05 here): 5% is ample
    assert abs(float(tau[inner].std()) - 0.05) < 0.05 * 0.05
    assert float(tau[inner].abs().max()) < 0.05 * 5.5  # |z| > 5.5 has probability 4e-8 per draw
