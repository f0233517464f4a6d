"""Image data read from disk, not copied (docs/scale.md §1): memory-mapped ``.npy`` files, ``.npz`` members converted
once, folders decoded per batch, splits as index sets, the KO callback's per-rank shard, and the peak memory."""

from __future__ import annotations

import importlib.util
import logging
import os
import pickle
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor

from ko_lightning.callbacks.ko_data import training_data
from ko_lightning.conditioning import Conditioning
from ko_lightning.data import ImageDataModule, npz_convert
from ko_lightning.data.rows import ArrayRows, FolderRows

ROOT = Path(__file__).resolve().parents[1]


def _images(n: int, h: int = 8, w: int = 8, seed: int = 0) -> np.ndarray:
    """Random uint8 NHWC images."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


def _expected(array_nhwc: np.ndarray, index: Tensor) -> Tensor:
    """The model-space batch of the given rows, by the formula of docs/math.md (u / 127.5 - 1), independently."""
    u = torch.from_numpy(np.ascontiguousarray(array_nhwc)).permute(0, 3, 1, 2)[index]
    return u.double().div(127.5).sub(1.0).float()


def _epochs(dm: ImageDataModule, epochs: int = 2) -> list[Tensor]:
    loader = dm.train_dataloader()
    out: list[Tensor] = []
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        out.extend(loader)
    return out


def test_npy_read_by_rows_gives_the_batches_of_the_in_memory_path(tmp_path: Path) -> None:
    """The same images as a memory-mapped ``.npy`` and as a (small, in-memory) ``.npz``: identical batches (random
    flips on: they are drawn from the batch indices), splits and tensors, each equal to its rows by the formula."""
    images = _images(60)
    np.save(tmp_path / "d.npy", images)
    np.savez(tmp_path / "d.npz", x=images)
    kw: dict[str, Any] = {"batch_size": 8, "val_fraction": 0.2, "seed": 3}
    mapped, memory = ImageDataModule(str(tmp_path / "d.npy"), **kw), ImageDataModule(str(tmp_path / "d.npz"), **kw)
    rows = mapped.split_rows("train").rows
    assert isinstance(rows, ArrayRows) and rows.path == str(tmp_path / "d.npy") and not rows.in_memory
    assert not (tmp_path / "d.x.npy").exists()  # a small .npz is read into memory, not converted
    for a, b in zip(_epochs(mapped), _epochs(memory), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(mapped.indices["train"], memory.indices["train"])
    train = mapped.indices["train"]
    torch.testing.assert_close(mapped.train_tensor(), _expected(images, train), rtol=0, atol=1e-6)
    assert torch.equal(mapped.train_tensor(5, start=7), memory.train_tensor()[7:12])
    assert torch.equal(mapped.raw_tensor("val"), torch.from_numpy(images).permute(0, 3, 1, 2)[mapped.indices["val"]])
    val = torch.cat(list(mapped.val_dataloader()))
    torch.testing.assert_close(val, _expected(images, mapped.indices["val"]), rtol=0, atol=1e-6)


def test_train_tensor_is_normalized_chunk_by_chunk_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 7 rows give bit for bit the one-shot ``normalize`` of the raw rows, for every start and count."""
    from ko_lightning.data import images as images_module

    np.save(tmp_path / "d.npy", _images(40))
    dm = ImageDataModule(str(tmp_path / "d.npy"), batch_size=4, val_fraction=0.0)
    monkeypatch.setattr(images_module, "_CHUNK_ROWS", 7)
    whole = dm.normalize(dm.raw_tensor("train"))
    assert torch.equal(dm.train_tensor(), whole)
    for start, n in ((0, 40), (3, 20), (13, 100), (40, 5)):
        assert torch.equal(dm.train_tensor(n, start=start), whole[start : start + n])
    with pytest.raises(ValueError, match="start"):
        dm.train_tensor(3, start=-1)


def test_file_rows_pickle_by_name_not_by_content(tmp_path: Path) -> None:
    """Loader workers and spawned ranks receive the file name: the pickle is small and reads the same rows."""
    images = _images(2000, 16, 16)  # 1.5 MiB of pixels
    np.save(tmp_path / "d.npy", images)
    dm = ImageDataModule(str(tmp_path / "d.npy"), batch_size=8, val_fraction=0.0)
    split = dm.split_rows("train")
    blob = pickle.dumps(split.rows)
    assert len(blob) < 10_000
    index = torch.tensor([5, 1999, 0, 5, 77])
    assert torch.equal(pickle.loads(blob)[index], torch.from_numpy(images).permute(0, 3, 1, 2)[index])


def test_a_large_npz_member_is_converted_once_beside_the_archive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    images = _images(50)
    labels = np.arange(50) % 4
    np.savez_compressed(tmp_path / "d.npz", x=images, labels=labels)
    reference = ImageDataModule(str(tmp_path / "d.npz"), batch_size=5, labels=True)  # in memory (small)
    monkeypatch.setattr(npz_convert, "NPZ_CONVERT_BYTES", 0)
    monkeypatch.setattr(npz_convert, "_COPY_BYTES", 1000)  # streams in several pieces
    with caplog.at_level(logging.INFO):
        dm = ImageDataModule(str(tmp_path / "d.npz"), batch_size=5, labels=True)
        dm.setup()
    converted = tmp_path / "d.x.npy"
    assert converted.is_file() and [r for r in caplog.records if "converting" in r.getMessage()]
    assert np.array_equal(np.load(converted), images)
    rows = dm.split_rows("train").rows
    assert isinstance(rows, ArrayRows) and rows.path == str(converted)
    for (x, y), (x0, y0) in zip(_epochs(dm), _epochs(reference), strict=True):
        assert torch.equal(x, x0) and torch.equal(y, y0)
    # reused while newer than the archive; converted again once the archive changes
    stamp = converted.stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO):
        ImageDataModule(str(tmp_path / "d.npz"), batch_size=5).setup()
    assert converted.stat().st_mtime_ns == stamp and not [r for r in caplog.records if "converting" in r.getMessage()]
    np.savez(tmp_path / "d.npz", x=images[::-1].copy())
    os.utime(tmp_path / "d.npz", ns=(stamp + 10**9, stamp + 10**9))
    fresh = ImageDataModule(str(tmp_path / "d.npz"), batch_size=5, val_fraction=0.0, random_flip=False)
    fresh.setup()
    assert np.array_equal(np.load(converted), images[::-1])
    torch.testing.assert_close(fresh.train_tensor(), _expected(images[::-1], fresh.indices["train"]), rtol=0, atol=1e-6)


def test_an_unwritable_folder_falls_back_to_memory_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = _images(30)
    np.savez(tmp_path / "d.npz", images=images)
    monkeypatch.setattr(npz_convert, "NPZ_CONVERT_BYTES", 0)

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(np.lib.format, "open_memmap", refuse)
    with pytest.warns(UserWarning, match=r"d\.images\.npy.*into memory"):
        dm = ImageDataModule(str(tmp_path / "d.npz"), batch_size=5, val_fraction=0.0, random_flip=False)
        dm.setup()
    assert not list(tmp_path.glob("*.npy*"))
    torch.testing.assert_close(dm.train_tensor(), _expected(images, dm.indices["train"]), rtol=0, atol=1e-6)


def test_folder_images_are_decoded_per_batch(tmp_path: Path) -> None:
    """A folder is decoded per batch: ``train_tensor(n)`` reads only its ``n`` files, so a corrupt file outside
    them goes unnoticed until its batch, whose error names it."""
    images = _images(12)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:02d}.png")
    dm = ImageDataModule(str(folder), batch_size=4, val_fraction=0.0, random_flip=False)
    assert isinstance(dm.split_rows("train").rows, FolderRows)
    np.save(tmp_path / "d.npy", images)  # the same images in the same order (sorted file names)
    same = ImageDataModule(str(tmp_path / "d.npy"), batch_size=4, val_fraction=0.0, random_flip=False)
    for a, b in zip(_epochs(dm), _epochs(same), strict=True):
        assert torch.equal(a, b)
    train = dm.indices["train"]
    torch.testing.assert_close(dm.train_tensor(), _expected(images, train), rtol=0, atol=1e-6)
    bad = folder / f"{int(train[-1]):02d}.png"  # the last training row: outside train_tensor(4)
    bad.write_bytes(bad.read_bytes()[:60])  # header kept, pixels cut
    fresh = ImageDataModule(str(folder), batch_size=4, val_fraction=0.0, random_flip=False)
    torch.testing.assert_close(fresh.train_tensor(4), _expected(images, train[:4]), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=bad.name + r".*truncated or corrupt"):
        fresh.raw_tensor("train")


def _ranks(dm: Any, max_data: int, world: int, conditioning: Conditioning | None = None) -> list[Any]:
    return [
        training_data(SimpleNamespace(datamodule=dm, global_rank=r, world_size=world), max_data, conditioning)  # type: ignore[arg-type]
        for r in range(world)
    ]


@pytest.mark.parametrize(("max_data", "world"), [(10, 3), (10, 1), (7, 4), (100, 3)])
def test_each_rank_takes_its_shard_of_the_first_max_data_rows(tmp_path: Path, max_data: int, world: int) -> None:
    """Rank r gets rows [r m, (r + 1) m) of the first n = min(max_data, N_train) rows, m = ceil(n / w), with
    their labels: disjoint, in order, the union exactly the first n rows."""
    images, labels = _images(40), np.arange(40) % 3
    np.savez(tmp_path / "d.npz", x=images, labels=labels)
    dm = ImageDataModule(str(tmp_path / "d.npz"), batch_size=4, val_fraction=0.25, labels=True)
    n = min(max_data, 30)
    m = -(-n // world)
    shards = _ranks(dm, max_data, world, Conditioning(num_classes=3))
    for r, (x, y) in enumerate(shards):
        assert x.shape[0] == max(0, min((r + 1) * m, n) - r * m)
        assert y is not None and y.shape[0] == x.shape[0]
    assert torch.equal(torch.cat([x for x, _ in shards]), dm.train_tensor(n))
    assert torch.equal(torch.cat([y for _, y in shards]), dm.labels_tensor("train")[:n])


def test_a_datamodule_without_shard_reading_is_cut_the_same_way() -> None:
    """A user datamodule whose ``train_tensor(n)`` takes no ``start``: the shards are cut from its first rows."""
    data = torch.arange(60.0).reshape(20, 3)
    foreign = SimpleNamespace(train_tensor=lambda n=None: data if n is None else data[:n])
    shards = [x for x, _ in _ranks(foreign, 11, 3)]
    assert [s.shape[0] for s in shards] == [4, 4, 3]
    assert torch.equal(torch.cat(shards), data[:11])
    with pytest.raises(ValueError, match="at least 2 training samples"):
        _ranks(SimpleNamespace(train_tensor=lambda n=None: data[:1]), 11, 2)


# ------------------------------------------------------------------------------------ peak memory
def _bench() -> Any:
    spec = importlib.util.spec_from_file_location("bench_memory", ROOT / "benchmarks" / "bench_memory.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_peak_memory_of_a_200000_image_npy_stays_bounded(tmp_path: Path) -> None:
    """On a 200,000 x 3 x 32 x 32 uint8 ``.npy`` (586 MiB), each in a fresh process: setup + 20 batches +
    ``train_tensor(10000)``, and a 2-step fit with ``KOScheduleCallback(max_data=10000)``, raise the peak RSS by at
    most 600 MiB (they read 10,000 rows: 117 MiB as float32; the whole set as float32 would be 2,344 MiB)."""
    bench = _bench()
    data = tmp_path / "images.npy"
    bench.write_images(data, 200_000)
    try:
        setup = bench.measure("setup", data, ROOT)
        fit = bench.measure("fit", data, ROOT)
    finally:
        data.unlink()
    assert setup["growth_mib"] <= 600, setup
    assert fit["growth_mib"] <= 600, fit
