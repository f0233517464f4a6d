"""One-time conversion of an ``.npz`` member to a ``.npy`` file beside it, so that it can be read in place by rows.

An ``.npz`` archive is a zip file: its (possibly compressed) members cannot be read by row offset, and
``np.load(file)[key]`` reads a whole member into memory. A large uint8 image member is therefore copied once,
streamed through a bounded buffer, to ``<stem>.<key>.npy`` next to the archive (docs/scale.md §1); later runs reuse
that file while it is newer than the archive and holds the member's shape. Nothing is unpickled (object arrays are
never converted).
"""

from __future__ import annotations

import os
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
from lightning.pytorch.utilities import rank_zero_info

__all__ = ["NPZ_CONVERT_BYTES", "converted_npy_path", "npz_member_as_npy"]

NPZ_CONVERT_BYTES: int = 64 * 2**20
"""Members of at least this many bytes are converted to ``.npy``; smaller ones are read into memory."""

_COPY_BYTES = 64 * 2**20  # the streaming buffer: the conversion never holds more of the member than this


def converted_npy_path(path: Path, key: str) -> Path:
    """``<stem>.<key>.npy`` beside ``path``: where the member ``key`` of the archive ``path`` is converted to."""
    return path.with_name(f"{path.stem}.{key}.npy")


def _member_header(archive: zipfile.ZipFile, member: str) -> tuple[tuple[int, ...], bool, np.dtype] | None:
    """``(shape, fortran_order, dtype)`` of a ``.npy`` member; None for a format version without a public reader."""
    with archive.open(member) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(f)
        if version == (2, 0):
            return np.lib.format.read_array_header_2_0(f)
    return None


def npz_member_as_npy(path: Path, key: str) -> Path | None:
    """The ``.npy`` copy of the uint8 member ``key`` of the archive ``path`` (converted now if needed), or None.

    None means "read the member into memory": the member is small (below :data:`NPZ_CONVERT_BYTES`), not a
    C-ordered uint8 array (other dtypes need the value checks of the in-memory path), or the folder is not writable
    (then a warning names the file). A conversion logs one line before it starts, progress every quarter, and one
    when it is done; it writes a temporary file and renames it, so concurrent processes (DDP ranks) never see a
    partial copy.

    Raises:
        OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error: for a truncated or corrupt archive (the
            caller names the file).
    """
    with zipfile.ZipFile(path) as archive:
        member = f"{key}.npy"
        header = _member_header(archive, member)
        if header is None:
            return None
        shape, fortran, dtype = header
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if dtype != np.uint8 or fortran or len(shape) < 2 or nbytes < NPZ_CONVERT_BYTES:
            return None
        target = converted_npy_path(path, key)
        if target.is_file() and target.stat().st_mtime >= path.stat().st_mtime:
            try:
                done = np.load(target, mmap_mode="r", allow_pickle=False)
                if done.shape == tuple(shape) and done.dtype == np.uint8:
                    return target
            except (OSError, ValueError):
                pass  # a bad old copy: convert again
        tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
        try:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=tuple(shape))
        except OSError as err:
            warnings.warn(
                f"cannot write {str(target)!r} ({type(err).__name__}: {err}), the row-readable copy of "
                f"{str(path)!r}[{key!r}]: reading the whole member ({nbytes / 2**20:.0f} MiB) into memory instead",
                stacklevel=3,
            )
            return None
        rank_zero_info(
            f"ImageDataModule: converting {str(path)!r}[{key!r}] ({nbytes / 2**20:.0f} MiB) once to {str(target)!r}, "
            "which is read in place from now on"
        )
        try:
            _copy_member(archive, member, out, shape, str(path))
        except BaseException:
            del out
            tmp.unlink(missing_ok=True)
            raise
    out.flush()
    del out
    os.replace(tmp, target)
    return target


def _copy_member(archive: zipfile.ZipFile, member: str, out: np.ndarray, shape: tuple[int, ...], name: str) -> None:
    """Stream the rows of a C-ordered uint8 member into ``out`` through a bounded buffer, logging progress."""
    row = int(np.prod(shape[1:], dtype=np.int64))
    step = max(1, _COPY_BYTES // max(row, 1))
    start, quarter = time.monotonic(), 1
    with archive.open(member) as f:
        version = np.lib.format.read_magic(f)  # 1.0 or 2.0: _member_header returned None for others
        (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(f)
        flat = out.reshape(shape[0], row)
        for a in range(0, shape[0], step):
            b = min(a + step, shape[0])
            buf = f.read((b - a) * row)
            if len(buf) != (b - a) * row:
                raise EOFError(f"the member ends after {a} of {shape[0]} rows")
            flat[a:b] = np.frombuffer(buf, np.uint8).reshape(b - a, row)
            while shape[0] >= 4 and b >= quarter * shape[0] // 4 and quarter < 4:
                rank_zero_info(f"ImageDataModule: {name}: {25 * quarter}% converted ({time.monotonic() - start:.0f} s)")
                quarter += 1
    rank_zero_info(f"ImageDataModule: {name}: conversion done in {time.monotonic() - start:.1f} s")
