"""The cache of FID/KID reference statistics: named entries that cannot run code or lie.

Reference statistics are cached under a name the user gives (``reference_name="digits-test"``): computed once,
then reused, also with ``reference=None``. One entry per (name, extractor weights, layer), in
``<cache_dir>/fidelity/``::

    <name>-<weights sha256[:12]>-<extractor>-features-<layer>-<file sha256[:16]>.npz   features, mu, sigma
    <name>-<weights sha256[:12]>-<extractor>-features-<layer>-reference.json           the note

The ``.npz`` holds ``features`` (float32 ``(N, D)``, for KID), ``mu`` and ``sigma`` (float64 mean and unbiased
covariance, for FID). It is read with ``numpy.load(allow_pickle=False)``: arrays only, never code. The JSON note
records the format, the reference name, the extractor, the layer, the SHA-256 of the extractor's weights file,
the SHA-256 of the reference pixels (uint8, after quantization), the number and shape of the images, the
``.npz`` file name and its SHA-256. An entry is reused only if the note is valid JSON, agrees with the request,
and the ``.npz`` bytes hash to the recorded value and hold finite arrays of the recorded shapes.

The rules (:func:`cached_reference`): anything else (a missing, truncated or corrupt note or ``.npz``, a hash
mismatch) is never reused: with reference images given the entry is rebuilt from them (with a warning naming the
file); with ``reference=None`` it is an error naming the file and saying how to clear it. The ``.npz`` is written
first and the note last, each atomically, so a crash leaves an uncertified file (rebuilt), never a wrong
certificate. Passing *different* reference images under a name whose entry is valid is an error rather than a
silently stale FID.
"""

from __future__ import annotations

import io
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ko_lightning.metrics.checks import SHA256_PATTERN
from ko_lightning.metrics.digits_features import default_cache_dir
from ko_lightning.metrics.files import atomic_write_bytes, sha256_bytes

__all__ = [
    "CACHE_FORMAT",
    "ReferenceCacheEntry",
    "ReferenceStatistics",
    "UntrustedCacheEntry",
    "cached_reference",
    "check_reference_name",
    "reference_cache_root",
]

CACHE_FORMAT = "ko_lightning.reference_features/2"
"""The note's ``format``; bump it when the entry's layout changes (older notes then no longer verify)."""

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a safe file name part: no separators, no leading dot


class UntrustedCacheEntry(Exception):
    """A cache entry that must not be reused; the message says which file and why."""


@dataclass
class ReferenceStatistics:
    """Reference features and FID statistics, fresh or from a verified cache entry.

    Attributes:
        features: float32 ``(N, D)`` features (for KID).
        mu: float64 ``(D,)`` mean (for FID).
        sigma: float64 ``(D, D)`` unbiased covariance (for FID).
        data_sha256: SHA-256 of the reference pixels (:func:`~ko_lightning.metrics.images.images_sha256`).
        n: number of reference images.
        shape: shape of one image, ``[C, H, W]``.
    """

    features: Tensor
    mu: np.ndarray
    sigma: np.ndarray
    data_sha256: str
    n: int
    shape: list[int]


def check_reference_name(reference_name: str | None) -> str | None:
    """``reference_name`` if it can be part of a file name (letters, digits, ``.``, ``_``, ``-``) or is ``None``.

    Raises:
        ValueError: naming ``reference_name`` otherwise.
    """
    if reference_name is not None and (not isinstance(reference_name, str) or not _NAME_PATTERN.match(reference_name)):
        raise ValueError(
            f"reference_name must be letters, digits, '.', '_' or '-' (a file name part), got {reference_name!r}"
        )
    return reference_name


def reference_cache_root(cache_dir: str | Path | None) -> Path:
    """The folder of the reference entries: ``<cache_dir>/fidelity`` (default cache folder when ``None``)."""
    return (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / "fidelity"


class ReferenceCacheEntry:
    """One cache entry: a content-addressed ``.npz`` and the JSON note that certifies it (see the module
    docstring)."""

    def __init__(self, root: Path, reference_name: str, extractor: str, layer: str, weights_sha256: str) -> None:
        self.root, self.reference_name, self.extractor, self.layer = root, reference_name, extractor, layer
        self.weights_sha256 = weights_sha256
        self.stem = f"{reference_name}-{weights_sha256[:12]}-{extractor}-features-{layer}"
        self.note_path = root / f"{self.stem}-reference.json"
        self.file_pattern = re.compile(rf"^{re.escape(self.stem)}-[0-9a-f]{{16}}\.npz$")

    def files(self) -> list[Path]:
        """The note and every ``.npz`` of this entry that exists (what to delete to clear it)."""
        found = [self.note_path] if self.note_path.exists() else []
        if self.root.is_dir():
            found += sorted(p for p in self.root.iterdir() if self.file_pattern.match(p.name))
        return found

    def _expected_note(self) -> dict[str, str]:
        """The note's fields that identify the request (the rest describes the data)."""
        return {
            "format": CACHE_FORMAT,
            "reference_name": self.reference_name,
            "feature_extractor": self.extractor,
            "feature_layer": self.layer,
            "weights_sha256": self.weights_sha256,
        }

    def read(self) -> ReferenceStatistics | None:
        """The verified entry, ``None`` if nothing of it exists.

        Raises:
            UntrustedCacheEntry: naming the file, if anything of the entry exists but does not verify.
        """
        if not self.note_path.is_file():
            stray = self.files()
            if stray:
                raise UntrustedCacheEntry(f"{str(stray[0])!r} has no note ({str(self.note_path)!r} is missing)")
            return None
        note_name = repr(str(self.note_path))
        try:
            note = json.loads(self.note_path.read_bytes())
        except (ValueError, UnicodeDecodeError) as exc:
            raise UntrustedCacheEntry(f"the note {note_name} is not valid JSON ({exc})") from exc
        if not isinstance(note, dict):
            raise UntrustedCacheEntry(f"the note {note_name} is not a JSON object")
        for key, value in self._expected_note().items():
            if note.get(key) != value:
                raise UntrustedCacheEntry(f"the note {note_name} records {key}={note.get(key)!r}, expected {value!r}")
        file, file_sha, data_sha = note.get("file"), note.get("file_sha256"), note.get("data_sha256")
        n, shape = note.get("n_reference"), note.get("shape")
        if not (isinstance(file, str) and self.file_pattern.match(file)):
            raise UntrustedCacheEntry(f"the note {note_name} names no valid features file ({file!r})")
        if not (isinstance(file_sha, str) and SHA256_PATTERN.match(file_sha)):
            raise UntrustedCacheEntry(f"the note {note_name} has no valid file_sha256")
        if not (isinstance(data_sha, str) and SHA256_PATTERN.match(data_sha)):
            raise UntrustedCacheEntry(f"the note {note_name} has no valid data_sha256")
        if not (isinstance(n, int) and n >= 2 and isinstance(shape, list) and all(isinstance(v, int) for v in shape)):
            raise UntrustedCacheEntry(f"the note {note_name} has no valid n_reference/shape")
        path = self.root / file
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise UntrustedCacheEntry(f"{str(path)!r} named by the note cannot be read ({exc})") from exc
        actual = sha256_bytes(data)
        if actual != file_sha:
            raise UntrustedCacheEntry(f"{str(path)!r} has SHA-256 {actual}, its note records {file_sha}")
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as archive:  # arrays only: a pickle is refused
                arrays = {k: archive[k] for k in ("features", "mu", "sigma")}
        except Exception as exc:  # truncated zip, object arrays (pickles), missing arrays
            raise UntrustedCacheEntry(
                f"{str(path)!r} is not a readable features archive ({type(exc).__name__}: {exc})"
            ) from exc
        features, mu, sigma = arrays["features"], arrays["mu"], arrays["sigma"]
        ok = (
            features.dtype == np.float32
            and features.ndim == 2
            and features.shape[0] == n
            and mu.dtype == np.float64
            and mu.shape == (features.shape[1],)
            and sigma.dtype == np.float64
            and sigma.shape == (features.shape[1],) * 2
        )
        if not ok or not (np.isfinite(features).all() and np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise UntrustedCacheEntry(f"{str(path)!r} does not hold finite arrays of the shapes its note records")
        return ReferenceStatistics(torch.from_numpy(features), mu, sigma, data_sha, n, shape)

    def write(self, ref: ReferenceStatistics, prune_stale: bool = True) -> None:
        """Write the ``.npz`` (named by its own hash), then the note that certifies it.

        Args:
            ref: the statistics to cache.
            prune_stale: delete this entry's other ``.npz`` files afterwards. Pass ``False`` under DDP, where
                other ranks may be writing their own files right now.
        """
        buffer = io.BytesIO()
        np.savez(buffer, features=ref.features.numpy(), mu=ref.mu, sigma=ref.sigma)
        data = buffer.getvalue()
        file_sha = sha256_bytes(data)
        path = self.root / f"{self.stem}-{file_sha[:16]}.npz"
        atomic_write_bytes(data, path)
        note = {
            **self._expected_note(),
            "data_sha256": ref.data_sha256,
            "n_reference": ref.n,
            "shape": ref.shape,
            "file": path.name,
            "file_sha256": file_sha,
        }
        # Last, atomically: each writer's note names its own (content-addressed) file, so concurrent writers
        # (DDP ranks) leave a consistent entry whichever note lands last.
        atomic_write_bytes(json.dumps(note, indent=1).encode(), self.note_path)
        if prune_stale:
            for stale in self.files():
                if stale.suffix == ".npz" and stale != path:
                    stale.unlink(missing_ok=True)


def cached_reference(entry: ReferenceCacheEntry, reference_sha256: str | None) -> ReferenceStatistics | None:
    """The cached statistics to use for ``entry``, or ``None`` when they must be computed from the images given.

    Args:
        entry: the cache entry of the request.
        reference_sha256: :func:`~ko_lightning.metrics.images.images_sha256` of the reference images given, or
            ``None`` when ``reference=None`` (the cache must then answer).

    Returns:
        The verified statistics, or ``None`` if the entry is missing or untrusted and images were given (the caller
        computes the statistics and writes the entry).

    Raises:
        ValueError: with ``reference=None``, naming the files to delete for an untrusted entry, or the folder for a
            missing one; with images that differ from those the valid entry was made from, naming the files.
    """
    stats: ReferenceStatistics | None = None
    name, layer, extractor = entry.reference_name, entry.layer, entry.extractor
    try:
        stats = entry.read()
    except (UntrustedCacheEntry, OSError) as exc:
        files = ", ".join(repr(str(p)) for p in entry.files()) or repr(str(entry.note_path))
        if reference_sha256 is None:
            raise ValueError(
                f"reference is None but the cache entry of reference_name={name!r} (layer {layer!r}, "
                f"extractor {extractor!r}) cannot be trusted: {exc}. Pass the reference images to rebuild it, or "
                f"delete {files}"
            ) from exc
        # stacklevel 3: reported at the line in compute_fid_kid (via fid._metric_values), as before the split.
        warnings.warn(
            f"the cache entry of reference_name={name!r} is not reused ({exc}); rebuilding it from the "
            "reference images given",
            stacklevel=3,
        )
    if stats is None and reference_sha256 is None:
        raise ValueError(
            f"reference is None but no cached features of reference_name={name!r} (layer {layer!r}, "
            f"extractor {extractor!r}) are in {str(entry.root)!r}; pass the reference images once"
        )
    if stats is not None and reference_sha256 is not None and stats.data_sha256 != reference_sha256:
        raise ValueError(
            f"reference_name={name!r} is cached in {str(entry.root)!r} for different reference "
            f"images ({stats.n} images, shape {stats.shape}); use another reference_name or "
            f"delete {', '.join(repr(str(p)) for p in entry.files())}"
        )
    return stats
