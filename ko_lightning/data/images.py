"""Image data that users already have on disk: a folder of image files, or a ``.npz``/``.npy`` uint8 array.

Typical inputs are CIFAR-10 (``(50000, 32, 32, 3)`` uint8), ImageNet-32/64 (the downsampled-ImageNet ``.npz``
files store flattened ``(N, 3 * s * s)`` CHW rows under the key ``data``) or a folder of PNG/JPEG files. Nothing is
ever downloaded. :class:`ImageDataModule` does not hold the set in memory: a uint8 ``.npy`` file is read in place by
rows, a large ``.npz`` member converted once to a ``.npy`` beside it, and folder images are decoded per batch, so a
process reads only the rows of its own batches (docs/scale.md §1). Class labels, when asked for, come from the
``.npz`` file or from class sub-folders (:mod:`ko_lightning.data.labels`).
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ko_lightning.data.base import IndexedTransform, SplitTensorDataModule, derive_seed, split_indices, split_sizes
from ko_lightning.data.labels import check_label_range, folder_class_labels, load_array_labels, pick_npz_key
from ko_lightning.data.npz_convert import npz_member_as_npy
from ko_lightning.data.rows import ArrayRows, FolderRows, RowSource, SplitRows, resize_nchw, to_nchw
from ko_lightning.likelihood.pixels import PixelMap

__all__ = [
    "IMAGE_EXTENSIONS",
    "NPZ_KEYS",
    "ImageDataModule",
    "load_image_folder",
    "load_image_array",
    "load_images",
    "load_labelled_images",
    "open_image_rows",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
"""File extensions read from image folders (case-insensitive)."""

NPZ_KEYS: tuple[str, ...] = ("x", "images", "arr_0", "data")
"""Keys tried, in order, when an ``.npz`` file is read without ``npz_key``."""


def _unreadable_image(file: Path, err: BaseException) -> ValueError:
    return ValueError(
        f"cannot read the image file {str(file)!r} ({type(err).__name__}: {err}): it is truncated or corrupt (or not "
        "an image); replace or remove it"
    )


def load_image_folder(path: str | Path, image_size: int | None = None) -> Tensor:
    """Read every image file under ``path`` (recursively, sorted by relative path) into one uint8 tensor.

    Images are converted to 1 channel if every file is grayscale (PIL mode ``"L"``), otherwise to RGB (alpha is
    dropped). With ``image_size`` each image is centre-cropped to a square and resized to ``image_size``; without
    it, all images must have the same size.

    Args:
        path: a folder containing ``.png``/``.jpg``/``.jpeg``/``.bmp``/``.webp`` files (any depth).
        image_size: optional side length of the (square) output images.

    Returns:
        uint8 tensor of shape ``(N, C, H, W)`` with ``C`` in ``{1, 3}``.

    Raises:
        FileNotFoundError: if ``path`` is not a folder or holds no image file.
        ValueError: naming the file if an image file is truncated or corrupt; if the images differ in size and no
            ``image_size`` is given.
    """
    root = Path(path)
    return _read_image_files(root, _image_files(root), image_size)


def _image_files(root: Path) -> list[Path]:
    """The image files under ``root`` (any depth), sorted by path: the order of :func:`load_image_folder`."""
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {str(root)!r}")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found under {str(root)!r}")
    return files


def _read_image_files(root: Path, files: list[Path], image_size: int | None) -> Tensor:
    """Decode ``files`` (found under ``root``) into one uint8 ``(N, C, H, W)`` tensor, as :func:`load_image_folder`."""
    rows = FolderRows(root, files, image_size, _unreadable_image)
    return rows[torch.arange(len(rows))]


def _to_uint8(array: np.ndarray, source: str) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.integer) and array.dtype != np.bool_:
        low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
        if low < 0 or high > 255:
            raise ValueError(
                f"{source}: expected pixel values in [0, 255], got integer values in [{low}, {high}] ({array.dtype})"
            )
        return array.astype(np.uint8)
    lo, hi = (float(array.min()), float(array.max())) if array.size and array.dtype != np.bool_ else (0.0, 0.0)
    raise ValueError(
        f"{source}: expected uint8 pixel values in [0, 255], got dtype {array.dtype} (values in [{lo:g}, {hi:g}]); "
        "store the raw 8-bit pixels (e.g. (x * 255).round().astype(np.uint8) for data in [0, 1])"
    )


_READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)
"""What numpy and zipfile raise for a truncated or corrupt ``.npy``/``.npz`` file."""


def _unreadable_array(source: str, err: BaseException) -> ValueError:
    return ValueError(
        f"cannot read the image array file {source!r} ({type(err).__name__}: {err}): it is truncated or corrupt, or "
        "not a .npy/.npz array file (pickled object arrays are refused); write it again with np.save/np.savez"
    )


def load_image_array(path: str | Path, image_size: int | None = None, npz_key: str | None = None) -> Tensor:
    """Read images from a ``.npz`` (or ``.npy``) file holding a uint8 array.

    Accepted layouts: ``(N, H, W, C)``, ``(N, C, H, W)`` (``C`` in ``{1, 3}``, detected), ``(N, H, W)`` grayscale,
    and ``(N, C * s * s)`` flattened CHW rows (the downsampled-ImageNet files). Integer arrays with values in
    ``[0, 255]`` are accepted too.

    Args:
        path: the ``.npz``/``.npy`` file.
        image_size: optional side length: images are centre-cropped to a square and resized (Lanczos).
        npz_key: the array's key; by default the first of :data:`NPZ_KEYS` present.

    Returns:
        uint8 tensor of shape ``(N, C, H, W)``.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: naming the file if it is truncated, corrupt or not an array file (pickled object arrays are
            refused: nothing is unpickled); for a missing key, a non-uint8 dtype, values outside ``[0, 255]`` or an
            unreadable shape.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"image array file not found: {str(file)!r}")
    source = str(file)
    if file.suffix.lower() == ".npy":
        try:
            array = np.load(file, allow_pickle=False)
        except _READ_ERRORS as err:
            raise _unreadable_array(source, err) from err
    else:
        try:
            archive = np.load(file, allow_pickle=False)
        except _READ_ERRORS as err:
            raise _unreadable_array(source, err) from err
        if not isinstance(archive, np.lib.npyio.NpzFile):  # np.load reads by content: a .npy under another name
            array = archive
        else:
            with archive:
                missing = "{source!r} has none of the keys {defaults}; its keys are {keys}: pass npz_key"
                key = pick_npz_key(list(archive.keys()), npz_key, "npz_key", NPZ_KEYS, source, missing)
                try:
                    array = archive[key]  # reads and checks the member: a truncated archive fails here
                except _READ_ERRORS as err:
                    raise _unreadable_array(f"{source}[{key!r}]", err) from err
                source = f"{source}[{key!r}]"
    array = to_nchw(_to_uint8(array, source), source)
    if image_size is not None:
        array = resize_nchw(array, image_size)
    return torch.from_numpy(np.ascontiguousarray(array))


def open_image_rows(path: str | Path, image_size: int | None = None, npz_key: str | None = None) -> RowSource:
    """The images of a folder or array file as a row source, read per index batch (docs/scale.md §1).

    A C-ordered uint8 ``.npy`` file is read in place by rows (:class:`~ko_lightning.data.rows.ArrayRows`); a large
    uint8 ``.npz`` member is converted once to a ``.npy`` file beside the archive
    (:func:`~ko_lightning.data.npz_convert.npz_member_as_npy`) and read likewise; the images of a folder are decoded
    when their rows are read. Anything else (small or non-uint8 arrays, an unwritable folder) is read
    into memory by :func:`load_image_array`. ``rows[index]`` equals ``load_images(...)[index]`` in every case.

    Raises:
        FileNotFoundError, ValueError: those of :func:`load_images` (a truncated image file only when it is read).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"image data path not found: {str(p)!r}")
    if p.is_dir():
        return FolderRows(p, _image_files(p), image_size, _unreadable_image)
    mapped = _mappable_npy(p, npz_key)
    if mapped is not None:
        return ArrayRows(path=mapped[0], source=mapped[1], image_size=image_size)
    return ArrayRows(array=load_image_array(p, image_size, npz_key).numpy(), source=str(p))


def _mappable_npy(file: Path, npz_key: str | None) -> tuple[Path, str] | None:
    """``(npy file, name for messages)`` holding the uint8 images of ``file`` to read by rows, or None."""
    source = str(file)
    try:
        opened = np.load(file, mmap_mode="r", allow_pickle=False)  # reads the header (or the zip directory) only
    except _READ_ERRORS as err:
        raise _unreadable_array(source, err) from err
    if isinstance(opened, np.lib.npyio.NpzFile):
        with opened:
            missing = "{source!r} has none of the keys {defaults}; its keys are {keys}: pass npz_key"
            key = pick_npz_key(list(opened.keys()), npz_key, "npz_key", NPZ_KEYS, source, missing)
        try:
            converted = npz_member_as_npy(file, key)
        except _READ_ERRORS as err:
            raise _unreadable_array(f"{source}[{key!r}]", err) from err
        return None if converted is None else (converted, f"{source}[{key!r}]")
    by_rows = opened.dtype == np.uint8 and opened.flags.c_contiguous and 2 <= opened.ndim <= 4
    return (file, source) if by_rows else None


def load_images(path: str | Path, image_size: int | None = None, npz_key: str | None = None) -> Tensor:
    """A folder (:func:`load_image_folder`) or a ``.npz``/``.npy`` file (:func:`load_image_array`) -> uint8 NCHW."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"image data path not found: {str(p)!r}")
    if p.is_dir():
        return load_image_folder(p, image_size)
    return load_image_array(p, image_size, npz_key)


def load_labelled_images(
    path: str | Path,
    image_size: int | None = None,
    npz_key: str | None = None,
    labels_key: str | None = None,
    class_names: tuple[str, ...] | None = None,
) -> tuple[Tensor, Tensor, tuple[str, ...] | None]:
    """:func:`load_images` and the class label of every image.

    From a folder, the classes are its sub-folders ``path/<class_name>/`` sorted by name (or indexed by
    ``class_names``), see :func:`~ko_lightning.data.labels.folder_class_labels`; from an ``.npz`` file, the
    integer array under ``labels_key`` (default: ``labels``, else ``y``), see
    :func:`~ko_lightning.data.labels.load_array_labels`.

    Returns:
        ``(images, labels, names)``: uint8 ``(N, C, H, W)``, int64 ``(N,)`` (label ``i`` of image ``i``), and the
        class names of a folder (None for an array file).

    Raises:
        FileNotFoundError: if ``path`` does not exist or a folder holds no image.
        ValueError: those of :func:`load_images`, and for missing, mis-shaped, non-integer or negative labels
            (naming the file and the key), or images outside a class folder (naming the file).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"image data path not found: {str(p)!r}")
    if p.is_dir():
        files = _image_files(p)
        labels, names = folder_class_labels(p, files, class_names)  # before decoding: fails fast
        return _read_image_files(p, files, image_size), labels, names
    images = load_image_array(p, image_size, npz_key)
    return images, load_array_labels(p, images.shape[0], labels_key), None


def _open_labelled(
    path: str, image_size: int | None, npz_key: str | None, labels_key: str | None, class_names: tuple[str, ...] | None
) -> tuple[RowSource, Tensor, tuple[str, ...] | None]:
    """:func:`load_labelled_images` with the images as a row source (:func:`open_image_rows`)."""
    p = Path(path)
    if p.is_dir():
        files = _image_files(p)
        labels, names = folder_class_labels(p, files, class_names)
        return FolderRows(p, files, image_size, _unreadable_image), labels, names
    rows = open_image_rows(p, image_size, npz_key)
    return rows, load_array_labels(p, rows.shape[0], labels_key), None


_CHUNK_ROWS = 4096
"""Rows converted to float at a time by :meth:`ImageDataModule.train_tensor`."""


def _index_generator(seed: int, index: Tensor) -> torch.Generator:
    """A generator seeded by ``seed`` and every index of a batch: a stream of its own for every batch of every epoch
    (the training batches are slices of a fresh random permutation), the same wherever the batch is produced."""
    key = np.asarray([seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF], np.uint32)
    entropy = np.concatenate([key, index.reshape(-1).numpy().astype(np.uint32)])
    s0, s1 = np.random.SeedSequence(entropy).generate_state(2, np.uint32)
    return torch.Generator().manual_seed((int(s0) << 31) ^ int(s1))


class _ToSignedUnit(IndexedTransform):
    """uint8 batch -> float in [-1, 1], with an optional random horizontal flip of each image (p = 1/2).

    The flips are drawn from a generator seeded by ``seed`` and the batch's indices, not from the global RNG, so
    they repeat exactly on a resumed run and do not depend on loader workers.
    """

    def __init__(self, random_flip: bool, seed: int = 0) -> None:
        self.random_flip = random_flip
        self.seed = int(seed)

    def __call__(self, batch: Tensor, index: Tensor) -> Tensor:
        x = batch.float().div_(127.5).sub_(1.0)
        if self.random_flip:
            flip = torch.rand(x.shape[0], generator=_index_generator(self.seed, index)) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x


class ImageDataModule(SplitTensorDataModule):
    """Images from disk, as float tensors in ``[-1, 1]`` of shape ``(B, C, H, W)``.

    The pixels are kept as uint8 (:meth:`raw_tensor`) so that evaluation can dequantize them for bits/dim; batches
    are ``x = u / 127.5 - 1`` for uint8 pixels ``u``, with a random horizontal flip on the training batches (drawn
    from ``seed`` and the batch's indices, so a resumed run repeats them exactly). A seeded ``val_fraction`` of
    ``path`` is held out for validation; the test set comes from ``test_path``.

    The loaders are those of :class:`~ko_lightning.data.base.SplitTensorDataModule`: shuffled training batches (random
    flips if enabled, last incomplete batch dropped); the validation split and the images of ``test_path`` in order,
    without flips (the validation loader is an empty list when ``val_fraction == 0``; the test loader raises a
    ``ValueError`` if no ``test_path`` was given).

    With ``labels=True`` batches are tuples ``(x, y)``, ``y`` the int64 class labels ``(B,)`` of the batch's images:
    from the ``.npz`` file (key ``labels`` or ``y``, or ``labels_key``: integers ``>= 0``, one per image) or from
    the class sub-folders of an image folder (``path/<class_name>/*.png``, classes sorted by folder name). The labels
    are split with their images and indexed with the same index batches (so they follow them through the
    shuffling, flips and DDP sharding); :meth:`labels_tensor` gives those of a split, aligned with
    :meth:`raw_tensor`. The labels of ``test_path`` are read the same way (class folders must be training classes).

    Args:
        path: a folder of image files (searched recursively) or a ``.npz``/``.npy`` uint8 array file.
        batch_size: batch size of all loaders (train reshuffles every epoch and drops the last incomplete batch).
        val_fraction: fraction of ``path`` held out for validation (0: no validation loader).
        image_size: optional side length; images are centre-cropped to a square and resized (Lanczos).
        seed: seed of the split and of the shuffling.
        num_workers: loader worker processes (0 reads in the main process; use workers for image folders, whose
            batches are decoded from their files, and for slow disks).
        random_flip: flip training images horizontally with probability 1/2.
        npz_key: key of the array in an ``.npz`` file (default: the first of ``x``, ``images``, ``arr_0``, ``data``).
        test_path: optional folder or array file of the test set (read like ``path``).
        labels: yield ``(x, y)`` batches with the class labels.
        labels_key: key of the labels in an ``.npz`` file (default: the first of ``labels``, ``y``).

    Attributes:
        data_shape: ``(C, H, W)`` (reading the data on first access).
        num_classes: with ``labels=True``, the number of class folders, or ``1 + `` the largest label of ``path``'s
            array file; None without labels (reading the data on first access).
        class_names: the class folder names (class ``k`` is ``class_names[k]``), None for array files or without
            labels (reading the data on first access).

    Raises:
        FileNotFoundError: naming ``path`` (or ``test_path``) if it does not exist.
        ValueError: for non-uint8 pixel data, values outside ``[0, 255]`` or unreadable shapes; for bad labels
            (naming the file and the key, see :func:`load_labelled_images`); naming ``labels_key`` if it is given
            without ``labels=True``.

    Example:
        >>> dm = ImageDataModule("data/cifar10_train.npz", test_path="data/cifar10_test.npz")  # doctest: +SKIP
        >>> dm.setup("fit")  # doctest: +SKIP
        >>> dm.data_shape  # doctest: +SKIP
        (3, 32, 32)
    """

    def __init__(
        self,
        path: str,
        batch_size: int = 128,
        val_fraction: float = 0.02,
        image_size: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        random_flip: bool = True,
        npz_key: str | None = None,
        test_path: str | None = None,
        labels: bool = False,
        labels_key: str | None = None,
    ) -> None:
        super().__init__(batch_size, seed, num_workers, labels)  # validates batch_size and num_workers
        if labels_key is not None and not labels:
            raise ValueError(f"labels_key={labels_key!r} is only read with labels=True")
        bad_size = isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0
        if image_size is not None and bad_size:
            raise ValueError(f"image_size must be a positive int or None, got {image_size!r}")
        split_sizes(100, val_fraction)  # validates val_fraction early
        for name, value in (("path", path), ("test_path", test_path)):
            if value is not None and not Path(value).exists():
                raise FileNotFoundError(f"{name} not found: {str(value)!r}")
        self.save_hyperparameters(logger=False)
        self.path = str(path)
        self.val_fraction = val_fraction
        self.image_size = image_size
        self.random_flip = random_flip
        self.npz_key = npz_key
        self.test_path = None if test_path is None else str(test_path)
        self.labels_key = labels_key
        self.indices: dict[str, Tensor] = {}
        self._rows: dict[str, SplitRows] = {}  # split name -> index set into the images on disk
        self._class_names: tuple[str, ...] | None = None
        self._num_classes: int | None = None

    # ------------------------------------------------------------------ data
    def setup(self, stage: str | None = None) -> None:
        """Open and split the data (once; later calls do nothing). The test set is opened when first needed.

        Nothing is copied: the images stay on disk (read by rows, or decoded per batch for a folder) and a split is
        an index set into them (docs/scale.md §1)."""
        if "train" in self._rows:
            return
        labels: Tensor | None = None
        if self.labels:
            rows, labels, names = _open_labelled(self.path, self.image_size, self.npz_key, self.labels_key, None)
            self._class_names = names
            largest = int(labels.max()) if labels.numel() else -1
            self._num_classes = len(names) if names is not None else largest + 1
        else:
            rows = open_image_rows(self.path, self.image_size, self.npz_key)
        n_train, n_val, _ = split_sizes(rows.shape[0], self.val_fraction)
        if self.batch_size > n_train:
            raise ValueError(f"batch_size={self.batch_size} exceeds the {n_train} training images")
        train_idx, val_idx = split_indices(rows.shape[0], [n_train, n_val], self.seed)
        self.indices = {"train": train_idx, "val": val_idx}
        if labels is not None:
            self._labels = {"train": labels[train_idx], "val": labels[val_idx]}
        self._rows["train"], self._rows["val"] = SplitRows(rows, train_idx), SplitRows(rows, val_idx)

    def split_rows(self, split: str = "train") -> SplitRows:
        """The images of a split (``"train"``, ``"val"`` or ``"test"``) as rows read on demand:
        ``split_rows(s)[index]`` is ``raw_tensor(s)[index]`` without reading the other images."""
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        self.setup()
        if split == "test" and "test" not in self._rows:
            if self.test_path is None:
                raise ValueError("no test set: pass test_path to ImageDataModule")
            test_labels = None
            if self.labels:
                test, test_labels = self._read_test_labelled(self.test_path)
            else:
                test = open_image_rows(self.test_path, self.image_size, self.npz_key)
            if tuple(test.shape[1:]) != self.data_shape:
                raise ValueError(
                    f"test_path images have shape {tuple(test.shape[1:])}, the training images {self.data_shape}; "
                    "pass image_size to resize both"
                )
            if test_labels is not None:
                self._labels["test"] = test_labels
            self._rows["test"] = SplitRows(test, torch.arange(test.shape[0]))
        return self._rows[split]

    def raw_tensor(self, split: str = "train") -> Tensor:
        """The uint8 pixels of a split (``"train"``, ``"val"`` or ``"test"``), shape ``(N, C, H, W)``: read into
        memory at every call, for small data (the loaders and :meth:`train_tensor` read only the rows they need)."""
        return self.split_rows(split).read()

    def _read_test_labelled(self, test_path: str) -> tuple[RowSource, Tensor]:
        """The images and labels of ``test_path``, indexed like the training classes."""
        if Path(test_path).is_dir() and self._class_names is None:
            raise ValueError(
                f"test_path {test_path!r} is a folder of class folders, but the training labels of {self.path!r} "
                "are integers without class names: give the test set as an .npz file with labels"
            )
        test, labels, _ = _open_labelled(test_path, self.image_size, self.npz_key, self.labels_key, self._class_names)
        assert self._num_classes is not None
        check_label_range(labels, self._num_classes, f"test_path {test_path!r}")
        return test, labels

    @property
    def num_classes(self) -> int | None:
        """The number of classes with ``labels=True`` (reads the data if needed), None without labels."""
        if not self.labels:
            return None
        self.setup()
        return self._num_classes

    @property
    def class_names(self) -> tuple[str, ...] | None:
        """The class folder names (class ``k`` is ``class_names[k]``); None for array files or without labels."""
        if not self.labels:
            return None
        self.setup()
        return self._class_names

    @property
    def data_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image (reads the data if needed)."""
        self.setup()
        c, h, w = self._rows["train"].shape[1:]
        return (int(c), int(h), int(w))

    @staticmethod
    def normalize(u: Tensor) -> Tensor:
        """Pixel values in ``[0, 255]`` (uint8 or float) -> model space ``u / 127.5 - 1`` in ``[-1, 1]``."""
        return u.float() / 127.5 - 1.0

    @staticmethod
    def denormalize(x: Tensor) -> Tensor:
        """Model space -> float pixel values ``(x + 1) * 127.5`` (the exact inverse of :meth:`normalize`)."""
        return (x + 1.0) * 127.5

    @staticmethod
    def to_uint8(x: Tensor) -> Tensor:
        """Model space -> uint8 pixels (rounded and clipped to ``[0, 255]``)."""
        return ((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)

    @staticmethod
    def to_display(x: Tensor) -> Tensor:
        """Model space -> images in ``[0, 1]`` for plotting."""
        return ((x + 1.0) / 2.0).clamp(0.0, 1.0)

    @staticmethod
    def pixel_map() -> PixelMap:
        """The map from 8-bit pixels to model space that :meth:`normalize` applies, ``y = (pixel + w - 127.5) /
        127.5``: what ``model.bpd`` dequantizes with (docs/math.md §8)."""
        return PixelMap(offset=127.5, scale=127.5, levels=256)

    def train_tensor(self, n: int | None = None, start: int = 0) -> Tensor:
        """The training set in model space, float ``(N, C, H, W)``, or its rows ``[start, start + n)`` (a random
        subset, since the split is in random order): the input of the KO separation estimator.

        Only those rows are read, and converted to float chunk by chunk into the output (peak memory: the float
        output, ``4 n C H W`` bytes, plus one chunk), never the whole set (docs/scale.md §1).
        """
        rows = self.split_rows("train")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        stop = rows.shape[0] if n is None else min(start + n, rows.shape[0])
        start = min(start, stop)
        out = torch.empty((stop - start, *rows.shape[1:]), dtype=torch.float32)
        for a in range(start, stop, _CHUNK_ROWS):
            b = min(a + _CHUNK_ROWS, stop)
            chunk = out[a - start : b - start]  # normalized in place: u / 127.5 - 1, as normalize(u), no temporaries
            chunk.copy_(rows.read(a, b)).div_(127.5).sub_(1.0)
        return out

    @property
    def train_size(self) -> int:
        """The number of training images (opens the data if needed)."""
        return self.split_rows("train").shape[0]

    # --------------------------------------------------------------- loaders
    def _split(self, split: str) -> SplitRows:
        return self.split_rows(split)  # uint8 rows read per batch: the loaders map each batch to [-1, 1]

    def _batch_transform(self, train: bool) -> _ToSignedUnit:
        return _ToSignedUnit(self.random_flip and train, seed=derive_seed(self.seed, 4))
