"""File helpers shared by the metric caches: SHA-256 of bytes and atomic writes.

Every cached file (the digits classifier, the FID reference statistics) is hashed from the very bytes that are
later parsed, and written so that a reader never sees a partial file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write_bytes", "sha256_bytes"]


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def atomic_write_bytes(data: bytes, path: Path) -> None:
    """Write ``data`` to ``path`` atomically, creating the folder if needed.

    The bytes go to a unique temporary file in the same folder, which is then renamed over ``path``: readers never
    see a partial file, and concurrent writers (DDP ranks) each leave a complete one.

    Args:
        data: the file's content.
        path: the destination.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # atomic on POSIX and Windows
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
