"""Class labels of image data on disk: an integer array in the images' ``.npz`` file, or the class sub-folders of an
image folder (``root/<class_name>/...``). Used by :class:`~ko_lightning.data.images.ImageDataModule` with
``labels=True``; labels are int64 tensors of shape ``(N,)``, one class index per image, in the images' order.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["LABEL_KEYS", "check_label_range", "folder_class_labels", "load_array_labels", "pick_npz_key"]

LABEL_KEYS: tuple[str, ...] = ("labels", "y")
"""Keys tried, in order, for the labels of an ``.npz`` file read without ``labels_key``."""

_READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)
"""What numpy and zipfile raise for a truncated or corrupt ``.npz`` file or member (or a pickled object array)."""


def _unreadable(source: str, err: BaseException) -> ValueError:
    return ValueError(
        f"cannot read the labels in {source!r} ({type(err).__name__}: {err}): the file is truncated or corrupt, or "
        "the labels are not a plain integer array (pickled object arrays are refused); write it again with np.savez"
    )


def pick_npz_key(
    keys: list[str], requested: str | None, argument: str, defaults: Sequence[str], source: str, missing: str
) -> str:
    """The member of an ``.npz`` file to read: ``requested`` if given (it must exist), else the first of
    ``defaults`` present.

    Raises:
        ValueError: naming ``argument`` when ``requested`` is absent; ``missing`` (formatted with ``source``,
            ``defaults`` and ``keys``) when no default is present.
    """
    if requested is not None:
        if requested not in keys:
            raise ValueError(f"{argument}={requested!r} is not in {source!r}; its keys are {keys}")
        return requested
    found = [k for k in defaults if k in keys]
    if not found:
        raise ValueError(missing.format(source=source, defaults=list(defaults), keys=keys))
    return found[0]


def load_array_labels(path: str | Path, num_images: int, labels_key: str | None = None) -> Tensor:
    """The class labels stored next to the images of an ``.npz`` file.

    Args:
        path: the ``.npz`` file (a ``.npy`` file holds one array, so it cannot carry labels).
        num_images: the number of images in the file: one label per image.
        labels_key: the labels' key; by default the first of :data:`LABEL_KEYS` present.

    Returns:
        int64 tensor of shape ``(num_images,)``: non-negative class indices, in the images' order.

    Raises:
        ValueError: naming the file (and the key) for a ``.npy`` file, a missing key, labels that are not integers
            (floats, bools), not of shape ``(num_images,)``, or negative; or if the member is unreadable (nothing
            is unpickled).
    """
    file = Path(path)
    source = str(file)
    try:
        archive = np.load(file, allow_pickle=False)
    except _READ_ERRORS as err:
        raise _unreadable(source, err) from err
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(
            f"labels=True, but {source!r} is a .npy array file, which holds the images only: store the images and "
            "their labels in one .npz file, e.g. np.savez(file, x=images, labels=labels)"
        )
    with archive:
        key = pick_npz_key(
            list(archive.keys()),
            labels_key,
            "labels_key",
            LABEL_KEYS,
            source,
            "labels=True, but {source!r} has none of the label keys {defaults}; its keys are {keys}: store the labels "
            "under 'labels' or pass labels_key",
        )
        where = f"{source}[{key!r}]"
        try:
            labels = archive[key]
        except _READ_ERRORS as err:
            raise _unreadable(where, err) from err
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{where}: class labels must be integers, got dtype {labels.dtype}; store the class indices as ints "
            "(e.g. labels.astype(np.int64))"
        )
    if labels.shape != (num_images,):
        raise ValueError(
            f"{where}: expected one label per image, shape ({num_images},) for the {num_images} images, got shape "
            f"{labels.shape}"
        )
    if labels.size and int(labels.min()) < 0:
        raise ValueError(f"{where}: class labels must be >= 0, got the value {int(labels.min())}")
    return torch.from_numpy(labels.astype(np.int64))


def check_label_range(labels: Tensor, num_classes: int, source: str) -> None:
    """Raise a ``ValueError`` naming ``source`` if a label is outside ``0..num_classes - 1``."""
    if labels.numel() and int(labels.max()) >= num_classes:
        raise ValueError(
            f"{source}: label {int(labels.max())} is out of range: the training data have {num_classes} classes "
            f"(0..{num_classes - 1})"
        )


def folder_class_labels(
    root: str | Path, files: Sequence[Path], class_names: Sequence[str] | None = None
) -> tuple[Tensor, tuple[str, ...]]:
    """The class of each image file of a folder ``root/<class_name>/...``, from its class sub-folder.

    The classes are the sub-folders of ``root`` sorted by name, class ``k`` the ``k``-th of them, unless
    ``class_names`` (e.g. the training set's) gives the order. Files may lie at any depth below their class folder.

    Args:
        root: the image folder.
        files: the image files under ``root``, in the order of the images.
        class_names: optional class order to index by; every sub-folder of ``root`` must be one of them.

    Returns:
        ``(labels, names)``: int64 labels ``(len(files),)`` and the class names they index.

    Raises:
        ValueError: naming the file for an image outside every class folder (directly in ``root``), naming the
            folder for a class folder without image files, or one that is not in ``class_names``.
    """
    root = Path(root)
    folders = sorted(d.name for d in root.iterdir() if d.is_dir())
    names = tuple(folders) if class_names is None else tuple(class_names)
    index = {name: k for k, name in enumerate(names)}
    for folder in folders:
        if folder not in index:
            raise ValueError(
                f"class folder {str(root / folder)!r} is not one of the training classes {list(names)}: the test "
                "images must be sorted into the training set's class folders"
            )
    labels, used = [], set()
    for file in files:
        parts = file.relative_to(root).parts
        if len(parts) < 2:
            raise ValueError(
                f"labels=True reads the classes from the sub-folders of {str(root)!r}, but the image file "
                f"{str(file)!r} lies in the folder itself: move every image into a class folder root/<class_name>/"
            )
        labels.append(index[parts[0]])
        used.add(parts[0])
    for folder in folders:
        if folder not in used:
            raise ValueError(f"the class folder {str(root / folder)!r} holds no image file: remove it or add images")
    return torch.tensor(labels, dtype=torch.int64), names
