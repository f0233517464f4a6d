"""Truncated or corrupt data files (issue 8 part 4): every read error names the file, and nothing is unpickled."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ko_lightning.data import ImageDataModule, load_image_array, load_image_folder, load_images


def _images(n: int = 6) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8)


def _truncate(file: Path, keep: float = 0.6) -> Path:
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])
    return file


def _names(file: Path) -> str:
    return re.escape(str(file))


@pytest.mark.parametrize("keep", [0.1, 0.6, 0.95])
def test_truncated_npy_is_an_error_naming_the_file(tmp_path: Path, keep: float) -> None:
    file = tmp_path / "x.npy"
    np.save(file, _images())
    _truncate(file, keep)
    with pytest.raises(ValueError, match=_names(file) + r".*truncated or corrupt"):
        load_image_array(file)


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
@pytest.mark.parametrize("keep", [0.1, 0.6, 0.95])
def test_truncated_npz_is_an_error_naming_the_file(tmp_path: Path, save, keep: float) -> None:
    file = tmp_path / "x.npz"
    save(file, x=_images(20))
    _truncate(file, keep)
    with pytest.raises(ValueError, match=_names(file) + r".*truncated or corrupt"):
        load_images(file)


def test_garbage_npz_and_corrupt_member_are_errors_naming_the_file(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(os.urandom(500))
    with pytest.raises(ValueError, match=_names(garbage)):
        load_image_array(garbage)
    # A member whose bytes are damaged in the middle (same length): the zip CRC check catches it.
    file = tmp_path / "flipped.npz"
    np.savez(file, x=_images(20))
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=_names(file) + r"\['x'\].*truncated or corrupt"):
        load_image_array(file)


class _Plant:
    """Unpickling this object would create the file named ``marker``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_arrays_are_refused_without_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    objects = np.empty(2, dtype=object)
    objects[0], objects[1] = _Plant(str(marker)), _Plant(str(marker))
    npy, npz, raw = tmp_path / "obj.npy", tmp_path / "obj.npz", tmp_path / "raw.npy"
    np.save(npy, objects, allow_pickle=True)
    np.savez(npz, x=objects)
    raw.write_bytes(pickle.dumps(_Plant(str(marker))))  # a plain pickle named .npy
    for file in (npy, npz, raw):
        with pytest.raises(ValueError, match=_names(file)):
            load_image_array(file)
    assert not marker.exists()


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for i, image in enumerate(_images(4)):
        Image.fromarray(image).save(folder / "sub" / f"{i}.png")
    return folder


def test_truncated_image_in_a_folder_is_an_error_naming_the_file(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    assert load_image_folder(folder).shape == (4, 3, 8, 8)
    bad = _truncate(folder / "sub" / "2.png", 0.5)  # header intact, pixel data cut
    with pytest.raises(ValueError, match=_names(bad) + r".*truncated or corrupt"):
        load_image_folder(folder)
    dm = ImageDataModule(str(folder), batch_size=2, val_fraction=0.0)
    dm.setup("fit")  # reads the headers only: images are decoded per batch (docs/scale.md §1)
    with pytest.raises(ValueError, match=_names(bad)):
        list(dm.train_dataloader())  # its 2 batches cover all 4 images


def test_non_image_file_with_an_image_extension_is_an_error_naming_the_file(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    bad = folder / "notes.jpg"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match=_names(bad) + r".*truncated or corrupt"):
        load_images(folder)
