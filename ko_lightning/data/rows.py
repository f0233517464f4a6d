"""Images read row by row on demand: a ``.npy`` file (or an array in memory), a folder of images, a split of either.

A *row source* has a ``shape`` ``(N, C, H, W)`` and returns the uint8 images of an index batch, ``rows[index]`` ->
``(len(index), C, H, W)``; the loaders index it with whole index batches (:class:`~ko_lightning.data.base.
TensorBatchDataset`), so a process only ever reads (or decodes) the images of its own batches (docs/scale.md §1).
The sources pickle by file name, not by content: loader workers and spawned DDP ranks reopen the file.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

__all__ = ["ArrayRows", "FolderRows", "RowSource", "SplitRows", "resize_nchw", "to_nchw"]


class RowSource(Protocol):
    """What the loaders index: ``shape`` ``(N, ...)`` and ``source[index]`` -> the rows of a LongTensor index."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def __getitem__(self, index: Tensor | int) -> Tensor: ...


def resize_uint8(image: np.ndarray, image_size: int) -> np.ndarray:
    """Centre-crop an ``(H, W)`` or ``(H, W, C)`` uint8 image to a square and resize it to ``image_size`` (Lanczos)."""
    from PIL import Image

    h, w = image.shape[:2]
    if (h, w) == (image_size, image_size):
        return image
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    pil = Image.fromarray(image[top : top + side, left : left + side])
    return np.asarray(pil.resize((image_size, image_size), Image.Resampling.LANCZOS))


def resize_nchw(array: np.ndarray, image_size: int) -> np.ndarray:
    """:func:`resize_uint8` applied to every image of a uint8 ``(N, C, H, W)`` array (a no-op at the right size)."""
    if array.shape[2:] == (image_size, image_size):
        return array
    hwc = array.transpose(0, 2, 3, 1)
    resized = np.stack([resize_uint8(im[..., 0] if im.shape[-1] == 1 else im, image_size) for im in hwc])
    return resized[:, None] if resized.ndim == 3 else resized.transpose(0, 3, 1, 2)


def to_nchw(array: np.ndarray, source: str) -> np.ndarray:
    """Bring a 2D (flattened CHW rows), 3D (N, H, W) or 4D (NHWC or NCHW) array to NCHW (a view: nothing is read).

    The layout is decided by ``array.shape[1:]`` only, so a batch of rows gets the layout of the whole array.
    """
    if array.ndim == 2:
        n, dim = array.shape
        for channels in (3, 1):
            side = math.isqrt(dim // channels)
            if channels * side * side == dim:
                return array.reshape(n, channels, side, side)
        raise ValueError(f"{source}: cannot read rows of length {dim} as square C x s x s images (C = 1 or 3)")
    if array.ndim == 3:
        return array[:, None]
    if array.ndim == 4:
        _, a, b, c = array.shape
        nhwc, nchw = c in (1, 3), a in (1, 3)
        if nhwc and (a == b or not nchw):
            return array.transpose(0, 3, 1, 2)
        if nchw:
            return array
        raise ValueError(
            f"{source}: cannot tell the channel axis of shape {array.shape}; expected NHWC or NCHW with 1 or 3 channels"
        )
    raise ValueError(f"{source}: expected an array of 2 to 4 dimensions (N, ...), got shape {array.shape}")


def _batch_index(index: Tensor | int) -> np.ndarray:
    return torch.as_tensor(index, dtype=torch.int64).reshape(-1).numpy()


class ArrayRows:
    """The images of a uint8 array: a C-ordered ``.npy`` file read by rows (``path``), or an array in memory.

    ``rows[index]`` reads each distinct row once, in increasing file order, with one positional read (``os.pread``)
    per run of consecutive rows, and restores the order of ``index``. The file is never mapped into memory: a
    memory map would count in the resident set every page it touches and, through the kernel's fault-around, the
    cached pages around them (docs/scale.md §1). With ``image_size`` each image of a batch is centre-cropped and
    resized as it is read.

    Args:
        path: a C-ordered uint8 ``.npy`` file (reopened after unpickling).
        array: or a uint8 array in memory (layouts of :func:`to_nchw`).
        source: the name used in error messages.
        image_size: optional side length of the output images.

    Raises:
        ValueError: naming ``source`` for a file that is not a C-ordered uint8 ``.npy`` array of 2 to 4 dimensions
            or is shorter than its header says, or a layout :func:`to_nchw` cannot read.
    """

    def __init__(
        self,
        path: str | Path | None = None,
        array: np.ndarray | None = None,
        source: str = "array",
        image_size: int | None = None,
    ) -> None:
        if (path is None) == (array is None):
            raise ValueError("ArrayRows needs exactly one of path and array")
        self.path = None if path is None else str(path)
        self.source = source
        self.image_size = image_size
        self._array = array
        self._fd: int | None = None
        if path is not None:
            header = np.load(path, mmap_mode="r", allow_pickle=False)  # the header only: the map is dropped
            if header.dtype != np.uint8 or not header.flags.c_contiguous or not 2 <= header.ndim <= 4:
                raise ValueError(f"{source}: expected a C-ordered uint8 array, got {header.dtype} {header.shape}")
            self._offset, native = int(header.offset), tuple(header.shape)
            del header
        else:
            native = tuple(array.shape)  # type: ignore[union-attr]
        self._native = native  # the stored shape (any layout of to_nchw)
        self._row_bytes = int(np.prod(native[1:], dtype=np.int64))
        n, (c, h, w) = native[0], _chw(native, source)
        self.shape: tuple[int, ...] = (n, c, h, w) if image_size is None else (n, c, image_size, image_size)

    @property
    def in_memory(self) -> bool:
        """True for an array held in memory, False for a file read by rows."""
        return self.path is None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fd"] = None  # each process opens the file itself
        return state

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.shape[0]

    def _read_sorted(self, rows: np.ndarray) -> np.ndarray:
        """The stored rows ``rows`` (sorted, distinct), shape ``(len(rows), *stored_shape[1:])``."""
        if self._array is not None:
            return np.asarray(self._array[rows])
        if self._fd is None:
            assert self.path is not None
            self._fd = os.open(self.path, os.O_RDONLY)
        out = np.empty((rows.shape[0], self._row_bytes), np.uint8)
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        for a, b in zip(np.r_[0, breaks], np.r_[breaks, rows.shape[0]], strict=True):
            count = int(b - a) * self._row_bytes
            buf = os.pread(self._fd, count, self._offset + int(rows[a]) * self._row_bytes)
            if len(buf) != count:
                raise ValueError(f"{self.source}: the file ends before row {int(rows[b - 1])}: it is truncated")
            out[a:b] = np.frombuffer(buf, np.uint8).reshape(int(b - a), self._row_bytes)
        return out.reshape(rows.shape[0], *self._native[1:])

    def __getitem__(self, index: Tensor | int) -> Tensor:
        idx = _batch_index(index)
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= self.shape[0]):
            raise IndexError(f"{self.source}: row index out of range 0..{self.shape[0] - 1}")
        distinct, inverse = np.unique(idx, return_inverse=True)  # sorted: sequential reads
        rows = to_nchw(self._read_sorted(distinct), self.source)[inverse]
        if self.image_size is not None:
            rows = resize_nchw(rows, self.image_size)
        return torch.from_numpy(np.ascontiguousarray(rows))


def _chw(native: tuple[int, ...], source: str) -> tuple[int, int, int]:
    """``(C, H, W)`` of an array of shape ``native`` in the layout :func:`to_nchw` reads it as."""
    _, c, h, w = to_nchw(np.empty((0, *native[1:]), np.uint8), source).shape
    return int(c), int(h), int(w)


class FolderRows:
    """The images of a list of files, decoded when their rows are read (in the process that reads them).

    The headers are read once at construction (cheap: no pixel data): they fix the channel count (1 if every file is
    grayscale, PIL mode ``"L"``, else RGB) and, without ``image_size``, check that all images have one size.

    Args:
        root: the folder (named in error messages).
        files: the image files, in row order.
        image_size: optional side length: each image is centre-cropped to a square and resized.
        unreadable: builds the error for a truncated or corrupt file (``unreadable(file, err)``).

    Raises:
        ValueError: from ``unreadable`` for a bad header; if the images differ in size and no ``image_size`` is given.
    """

    def __init__(
        self,
        root: Path,
        files: list[Path],
        image_size: int | None,
        unreadable: Callable[[Path, BaseException], Exception],
    ) -> None:
        from PIL import Image

        self.root, self.files, self.image_size, self.unreadable = root, files, image_size, unreadable
        modes, first = set(), None
        for f in files:
            try:
                with Image.open(f) as im:  # lazy: reads the header only
                    modes.add(im.mode)
                    hw = (im.size[1], im.size[0])
            except (OSError, ValueError, SyntaxError) as err:  # PIL raises all three for bad headers
                raise unreadable(f, err) from err
            first = first or hw
            if image_size is None and hw != first:
                raise ValueError(
                    f"images under {str(root)!r} differ in size ({first} vs {hw} for {f.name}); pass image_size to "
                    "crop and resize them"
                )
        self.mode = "L" if modes <= {"L"} else "RGB"
        side = (image_size, image_size) if image_size is not None else first or (0, 0)
        self.shape: tuple[int, ...] = (len(files), 1 if self.mode == "L" else 3, *side)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: Tensor | int) -> Tensor:
        from PIL import Image

        images = []
        for i in _batch_index(index).tolist():
            f = self.files[i]
            try:
                with Image.open(f) as im:
                    arr = np.asarray(im.convert(self.mode))  # decodes the whole file: a truncated one fails here
            except (OSError, ValueError, SyntaxError) as err:
                raise self.unreadable(f, err) from err
            images.append(arr if self.image_size is None else resize_uint8(arr, self.image_size))
        if not images:
            return torch.empty((0, *self.shape[1:]), dtype=torch.uint8)
        stacked = np.stack(images)  # (B, H, W) or (B, H, W, 3)
        stacked = stacked[:, None] if stacked.ndim == 3 else stacked.transpose(0, 3, 1, 2)
        return torch.from_numpy(np.ascontiguousarray(stacked))


class SplitRows:
    """A split of a row source: row ``i`` is row ``index[i]`` of ``rows`` (an index set, not a copy).

    Args:
        rows: the source (:class:`ArrayRows`, :class:`FolderRows` or a tensor).
        index: LongTensor of the source rows of the split, in split order.
    """

    def __init__(self, rows: RowSource | Tensor, index: Tensor) -> None:
        self.rows = rows
        self.index = index
        self.shape: tuple[int, ...] = (int(index.shape[0]), *rows.shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: Tensor | int) -> Tensor:
        return self.rows[self.index[torch.as_tensor(index, dtype=torch.int64)]]

    def read(self, start: int = 0, stop: int | None = None) -> Tensor:
        """Rows ``[start, stop)`` of the split as one uint8 tensor."""
        stop = self.shape[0] if stop is None else min(stop, self.shape[0])
        return self[torch.arange(start, max(start, stop))]
