"""FID and KID (and optionally IS), offline, with named reference statistics in a cache that cannot run code or lie.

Two feature spaces are supported:

* ``"inception-v3-compat"``: torch-fidelity's port of the TF Inception-v3 used by the original FID code. Its
  weights are never downloaded here: pass ``weights_path`` (or set ``KO_LIGHTNING_INCEPTION_WEIGHTS``) to a local
  copy of ``weights-inception-2015-12-05-6726825d.pth``. The file is read into memory and its SHA-256 is checked
  against :data:`INCEPTION_WEIGHTS_SHA256` *before* anything parses it; a mismatch is an error naming the file and
  both hashes. Only then is it loaded, with ``torch.load(weights_only=True)`` (tensors only, never code). To use a
  conversion of your own, pass its hash as ``weights_sha256``.
* ``"digits-classifier"``: a small CNN trained on the sklearn digits on first use
  (:mod:`ko_lightning.metrics.digits_features`), for 8 x 8 digit samples.

torch-fidelity provides the Inception network, the KID and IS formulas and the batching loop; nothing that
torch-fidelity would read from disk is used: its own weight loading, its feature caches (``*.pt`` files read with
``weights_only=False``) and ``calculate_metrics`` are bypassed. FID is computed here from features
(:func:`fid_from_features`, tested against ``scipy.linalg.sqrtm``).

Image conventions: tensors ``(N, C, H, W)``, either ``uint8`` in ``[0, 255]`` or floating point in ``value_range``
(default ``[0, 1]``, e.g. :meth:`DigitsDataModule.to_display`; ``(-1, 1)`` for :class:`ImageDataModule` model space).
Floats are quantized to 8 bits (``round(255 (x - lo) / (hi - lo))``) exactly as if the samples were saved as PNG,
the standard FID protocol. Grayscale images are repeated to 3 channels for Inception.

Reference statistics are cached under a name the user gives (``reference_name="digits-test"``): computed once,
then reused, also with ``reference=None``. One cache entry per (name, extractor weights, layer), in
``<cache_dir>/fidelity/``::

    <name>-<weights sha256[:12]>-<extractor>-features-<layer>-<file sha256[:16]>.npz   features, mu, sigma
    <name>-<weights sha256[:12]>-<extractor>-features-<layer>-reference.json           the note

The ``.npz`` holds ``features`` (float32 ``(N, D)``, for KID), ``mu`` and ``sigma`` (float64 mean and unbiased
covariance, for FID). It is read with ``numpy.load(allow_pickle=False)``: arrays only, never code. The JSON note
records the format, the reference name, the extractor, the layer, the SHA-256 of the extractor's weights file,
the SHA-256 of the reference pixels (uint8, after quantization), the number and shape of the images, the
``.npz`` file name and its SHA-256. An entry is reused only if the note is valid JSON, agrees with the request,
and the ``.npz`` bytes hash to the recorded value and hold finite arrays of the recorded shapes. Anything else
(a missing, truncated or corrupt note or ``.npz``, a hash mismatch) is never reused: with reference images given
the entry is rebuilt from them (with a warning naming the file); with ``reference=None`` it is an error naming the
file and saying how to clear it. The ``.npz`` is written first and the note last, each atomically, so a crash
leaves an uncertified file (rebuilt), never a wrong certificate. Passing *different* reference images under a
name whose entry is valid is an error rather than a silently stale FID.

Under DDP call :func:`compute_fid_kid` on *every* rank with ``gather_across_ranks=True`` (see there); never on
rank 0 only, since the gather is a collective.

FID between feature sets with means ``mu1, mu2`` and covariances ``S1, S2``::

    FID = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))

KID is the unbiased MMD^2 with the cubic kernel ``k(a, b) = (a.b / d + 1)^3``, averaged over ``kid_subsets``
random subsets of ``kid_subset_size`` samples from each set (reported as mean and standard deviation).

Example:
    >>> dm = DigitsDataModule(); dm.setup()  # doctest: +SKIP
    >>> result = compute_fid_kid(dm.to_display(samples), dm.to_display(dm.test_tensor()),
    ...                          reference_name="digits-test", kid_subset_size=100)  # doctest: +SKIP
    >>> result.fid, result.kid_mean  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Dataset

from ko_lightning.metrics.digits_features import (
    DIGITS_EXTRACTOR_NAME,
    _classifier_from_bytes,
    _fidelity_extractor_class,
    default_cache_dir,
    digits_classifier_path,
    load_digits_classifier_with_sha256,
    sha256_bytes,
)

__all__ = [
    "INCEPTION_EXTRACTOR_NAME",
    "INCEPTION_WEIGHTS_ENV_VAR",
    "INCEPTION_WEIGHTS_SHA256",
    "FidKidResult",
    "all_gather_samples",
    "compute_fid_kid",
    "extract_features",
    "fid_from_features",
    "kid_from_features",
    "to_uint8_images",
]

INCEPTION_EXTRACTOR_NAME = "inception-v3-compat"
"""torch-fidelity's name of the TF-compatible Inception-v3."""

INCEPTION_WEIGHTS_ENV_VAR = "KO_LIGHTNING_INCEPTION_WEIGHTS"
"""Environment variable read when ``weights_path`` is not given for Inception."""

INCEPTION_WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
"""SHA-256 of torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` (95,628,359 bytes), the file behind
``torch_fidelity.feature_extractor_inceptionv3.URL_INCEPTION_V3``.

torch-fidelity itself ships no hash beyond the 8-hex prefix ``6726825d`` in the file name (the torch hub
convention: the first hex digits of the file's SHA-256). The full value could not be computed here (no network,
no copy of the file); it is the value that several independent public projects record for this file after
downloading it (the same bytes as pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``), and it agrees with
the prefix in the official name."""

_INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
_EXTRACTORS = (INCEPTION_EXTRACTOR_NAME, DIGITS_EXTRACTOR_NAME)
_DEFAULT_LAYER = {INCEPTION_EXTRACTOR_NAME: "2048", DIGITS_EXTRACTOR_NAME: "64"}
_LAYERS = {
    INCEPTION_EXTRACTOR_NAME: ("64", "192", "768", "2048", "logits_unbiased", "logits"),
    DIGITS_EXTRACTOR_NAME: ("64", "logits"),
}
_SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
_CACHE_FORMAT = "ko_lightning.reference_features/2"
_ISC_LAYER = {INCEPTION_EXTRACTOR_NAME: "logits_unbiased", DIGITS_EXTRACTOR_NAME: "logits"}
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class FidKidResult:
    """The outcome of :func:`compute_fid_kid`.

    Attributes:
        fid: Frechet distance between the feature Gaussians (>= 0 up to round-off).
        kid_mean: mean of the KID subset estimates (``None`` when ``kid=False``); may be slightly negative.
        kid_std: standard deviation of the KID subset estimates (``None`` when ``kid=False``).
        isc_mean: Inception Score of the generated set (``None`` unless ``isc=True``).
        isc_std: its standard deviation over the splits.
        n_generated: number of generated samples used (all ranks together when gathered).
        n_reference: number of reference samples.
        reference_name: the cache name of the reference set (``None`` when not cached).
        feature_extractor: the feature extractor's name.
        feature_layer: the feature layer used for FID and KID.
    """

    fid: float
    kid_mean: float | None
    kid_std: float | None
    isc_mean: float | None
    isc_std: float | None
    n_generated: int
    n_reference: int
    reference_name: str | None
    feature_extractor: str
    feature_layer: str

    def metrics(self) -> dict[str, float]:
        """The computed numbers only (``fid`` and, when computed, ``kid_mean``/``kid_std``/``isc_mean``/``isc_std``),
        e.g. for ``LightningModule.log_dict``."""
        keys = ("fid", "kid_mean", "kid_std", "isc_mean", "isc_std")
        return {k: float(v) for k, v in asdict(self).items() if k in keys and v is not None}


# --------------------------------------------------------------------------------------------------- inputs
def to_uint8_images(images: Tensor, name: str = "images", value_range: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """Validate an image batch and return it as uint8 ``(N, C, H, W)`` on the CPU.

    ``uint8`` input is returned as is. Floating point input must be finite and lie in ``value_range`` (a slack of
    ``1e-6`` of its width absorbs round-off); it is mapped to ``round(255 (x - lo) / (hi - lo))``.

    Args:
        images: tensor of shape ``(N, C, H, W)``.
        name: the argument's name, used in error messages.
        value_range: ``(lo, hi)`` of floating point input.

    Raises:
        ValueError: naming ``name`` for a non-tensor, a wrong number of dimensions, an empty batch, a dtype other
            than uint8/float, non-finite values or values outside ``value_range``.
    """
    if not isinstance(images, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (N, C, H, W), got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"{name} must have shape (N, C, H, W), got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(images.shape)})")
    lo, hi = (float(v) for v in value_range)
    if not hi > lo:
        raise ValueError(f"value_range must be (lo, hi) with hi > lo, got {value_range}")
    images = images.detach().cpu()
    if images.dtype == torch.uint8:
        return images.contiguous()
    if not images.is_floating_point():
        raise ValueError(
            f"{name} must be uint8 in [0, 255] or floating point in value_range={value_range}, got dtype {images.dtype}"
        )
    x = images.double()
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    x_min, x_max = float(x.min()), float(x.max())
    slack = 1e-6 * (hi - lo)
    if x_min < lo - slack or x_max > hi + slack:
        raise ValueError(
            f"{name} has values in [{x_min:.4g}, {x_max:.4g}], outside value_range={value_range}; clamp generated "
            "samples to the data range first, or pass the right value_range"
        )
    return ((x - lo) * (255.0 / (hi - lo))).round().clamp(0, 255).to(torch.uint8).contiguous()


class _ImageSet(Dataset):
    """A uint8 image tensor as the map-style Dataset torch-fidelity reads one item at a time."""

    def __init__(self, images: Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> Tensor:
        return self.images[index]


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_layer(feature_extractor: str, feature_layer: str | None) -> str:
    layer = feature_layer or _DEFAULT_LAYER[feature_extractor]
    if layer not in _LAYERS[feature_extractor]:
        raise ValueError(
            f"feature_layer must be one of {list(_LAYERS[feature_extractor])} for {feature_extractor!r}, got {layer!r}"
        )
    return layer


def _check_sha256(weights_sha256: str | None) -> str | None:
    if weights_sha256 is None:
        return None
    if not isinstance(weights_sha256, str) or not _SHA256_PATTERN.match(weights_sha256.lower()):
        raise ValueError(f"weights_sha256 must be 64 hexadecimal digits, got {weights_sha256!r}")
    return weights_sha256.lower()


def _read_verified(path: Path, expected: str | None) -> tuple[bytes, str]:
    """The bytes of ``weights_path`` and their SHA-256, after checking the hash against ``expected`` (when given).

    The bytes that are hashed are the bytes that are later parsed, so the file cannot change in between.

    Raises:
        ValueError: naming the file and both hashes on a mismatch; nothing has parsed the file then.
    """
    data = path.read_bytes()
    actual = sha256_bytes(data)
    if expected is None or actual == expected:
        return data, actual
    how = (
        f"download the official {_INCEPTION_FILE} again"
        if expected == INCEPTION_WEIGHTS_SHA256
        else "check that the file is the one you meant"
    )
    raise ValueError(
        f"weights_path={str(path)!r} has SHA-256 {actual}, expected {expected}; the file was not loaded. Replace it "
        f"({how}), or, if you trust this exact file (e.g. your own conversion), pass weights_sha256={actual!r}"
    )


@dataclass
class _Extractor:
    """A ready feature extractor (a torch-fidelity ``FeatureExtractorBase``) and the SHA-256 of its weights."""

    module: Any
    name: str
    weights_sha256: str


def _inception_module(data: bytes, path: Path, layers: list[str]) -> Any:
    """torch-fidelity's Inception-v3 with the weights in ``data`` (already hash-checked), loaded safely."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle with code is refused here (weights_only), as is a truncated file
        raise ValueError(
            f"weights_path={str(path)!r} is not a readable Inception state dict ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise ValueError(f"weights_path={str(path)!r} is not a state dict (str -> tensor)")
    # torch-fidelity's constructor reads its weights with torch.load(weights_only=False). It is given a buffer
    # holding only the plain tensors loaded above, re-serialized here: no byte from disk is unpickled by it.
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    buffer.seek(0)
    try:
        return FeatureExtractorInceptionV3(INCEPTION_EXTRACTOR_NAME, layers, feature_extractor_weights_path=buffer)
    except RuntimeError as exc:  # load_state_dict: missing, unexpected or mis-shaped tensors
        raise ValueError(f"weights_path={str(path)!r} does not fit the Inception-v3 network: {exc}") from exc


def _load_extractor(
    feature_extractor: str,
    weights_path: str | Path | None,
    cache_dir: str | Path | None,
    layers: list[str],
    weights_sha256: str | None,
) -> _Extractor:
    """Build the chosen extractor from a local weights file (training the digits one if needed), checking the
    file's SHA-256 before it is parsed. Nothing is downloaded."""
    if feature_extractor not in _EXTRACTORS:
        raise ValueError(f"feature_extractor must be one of {list(_EXTRACTORS)}, got {feature_extractor!r}")
    if feature_extractor == DIGITS_EXTRACTOR_NAME:
        if weights_path is None:
            model, sha = load_digits_classifier_with_sha256(cache_dir)
            if weights_sha256 is not None and sha != weights_sha256:
                raise ValueError(
                    f"the cached digits classifier {str(digits_classifier_path(cache_dir))!r} has SHA-256 {sha}, "
                    f"expected weights_sha256={weights_sha256!r}"
                )
        else:
            path = Path(weights_path).expanduser()
            if not path.is_file():
                raise FileNotFoundError(
                    f"digits classifier weights_path={str(path)!r} does not exist; pass weights_path=None to train "
                    "it into the cache folder on first use"
                )
            data, sha = _read_verified(path, weights_sha256)
            model = _classifier_from_bytes(data, path)
        module = _fidelity_extractor_class()(DIGITS_EXTRACTOR_NAME, layers, model=model)
        return _Extractor(module, feature_extractor, sha)
    if weights_path is None:
        weights_path = os.environ.get(INCEPTION_WEIGHTS_ENV_VAR) or None
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    how = (
        f"FID/KID with feature_extractor={INCEPTION_EXTRACTOR_NAME!r} need torch-fidelity's Inception-v3 weights as a "
        f"local file ({_INCEPTION_FILE}); nothing is downloaded at run time. On a machine with internet access "
        f"download {URL_INCEPTION_V3}, copy it here, and pass weights_path=... or set {INCEPTION_WEIGHTS_ENV_VAR}."
    )
    if weights_path is None:
        raise ValueError(f"weights_path is required for {INCEPTION_EXTRACTOR_NAME!r}. {how}")
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights file not found: weights_path={str(path)!r}. {how}")
    data, sha = _read_verified(path, weights_sha256 or INCEPTION_WEIGHTS_SHA256)
    return _Extractor(_inception_module(data, path, layers), feature_extractor, sha)


def _run_extractor(
    extractor: _Extractor, images: Tensor, batch_size: int, cuda: bool, verbose: bool
) -> dict[str, Tensor]:
    """Features of uint8 ``images`` for every layer the extractor was built with, float32 on the CPU."""
    from torch_fidelity.utils import get_featuresdict_from_dataset

    module = extractor.module.cuda() if cuda else extractor.module
    feats = get_featuresdict_from_dataset(_ImageSet(images), module, batch_size, cuda, True, verbose)
    return {k: v.float() for k, v in feats.items()}


def _check_image_shape(images: Tensor, name: str, feature_extractor: str) -> Tensor:
    """Shape rules of each extractor; grayscale -> RGB for Inception."""
    shape = tuple(images.shape[1:])
    if feature_extractor == DIGITS_EXTRACTOR_NAME:
        if shape != (1, 8, 8):
            raise ValueError(
                f"{name} must have shape (N, 1, 8, 8) for {DIGITS_EXTRACTOR_NAME!r}, got {tuple(images.shape)}"
            )
        return images
    if shape[0] not in (1, 3):
        raise ValueError(
            f"{name} must have 1 or 3 channels for {INCEPTION_EXTRACTOR_NAME!r}, got shape {tuple(images.shape)}"
        )
    return images.expand(-1, 3, -1, -1).contiguous() if shape[0] == 1 else images


def _prepare(images: Tensor, name: str, value_range: tuple[float, float], feature_extractor: str) -> Tensor:
    return _check_image_shape(to_uint8_images(images, name, value_range), name, feature_extractor)


def _tensor_sha256(images: Tensor) -> str:
    digest = hashlib.sha256(str(tuple(images.shape)).encode())
    digest.update(images.numpy().tobytes())
    return digest.hexdigest()


def _atomic_write_bytes(data: bytes, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # atomic: concurrent writers never leave a partial file
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ------------------------------------------------------------------------------------------ reference cache
class _Untrusted(Exception):
    """A cache entry that must not be reused; the message says which file and why."""


@dataclass
class _Reference:
    """Reference features and FID statistics, fresh or from a verified cache entry."""

    features: Tensor  # float32 (N, D)
    mu: np.ndarray  # float64 (D,)
    sigma: np.ndarray  # float64 (D, D)
    data_sha256: str
    n: int
    shape: list[int]


class _ReferenceEntry:
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

    def read(self) -> _Reference | None:
        """The verified entry, ``None`` if nothing of it exists.

        Raises:
            _Untrusted: naming the file, if anything of the entry exists but does not verify.
        """
        if not self.note_path.is_file():
            stray = self.files()
            if stray:
                raise _Untrusted(f"{str(stray[0])!r} has no note ({str(self.note_path)!r} is missing)")
            return None
        note_name = repr(str(self.note_path))
        try:
            note = json.loads(self.note_path.read_bytes())
        except (ValueError, UnicodeDecodeError) as exc:
            raise _Untrusted(f"the note {note_name} is not valid JSON ({exc})") from exc
        if not isinstance(note, dict):
            raise _Untrusted(f"the note {note_name} is not a JSON object")
        expected = {
            "format": _CACHE_FORMAT,
            "reference_name": self.reference_name,
            "feature_extractor": self.extractor,
            "feature_layer": self.layer,
            "weights_sha256": self.weights_sha256,
        }
        for key, value in expected.items():
            if note.get(key) != value:
                raise _Untrusted(f"the note {note_name} records {key}={note.get(key)!r}, expected {value!r}")
        file, file_sha, data_sha = note.get("file"), note.get("file_sha256"), note.get("data_sha256")
        n, shape = note.get("n_reference"), note.get("shape")
        if not (isinstance(file, str) and self.file_pattern.match(file)):
            raise _Untrusted(f"the note {note_name} names no valid features file ({file!r})")
        if not (isinstance(file_sha, str) and _SHA256_PATTERN.match(file_sha)):
            raise _Untrusted(f"the note {note_name} has no valid file_sha256")
        if not (isinstance(data_sha, str) and _SHA256_PATTERN.match(data_sha)):
            raise _Untrusted(f"the note {note_name} has no valid data_sha256")
        if not (isinstance(n, int) and n >= 2 and isinstance(shape, list) and all(isinstance(v, int) for v in shape)):
            raise _Untrusted(f"the note {note_name} has no valid n_reference/shape")
        path = self.root / file
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise _Untrusted(f"{str(path)!r} named by the note cannot be read ({exc})") from exc
        actual = sha256_bytes(data)
        if actual != file_sha:
            raise _Untrusted(f"{str(path)!r} has SHA-256 {actual}, its note records {file_sha}")
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as archive:  # arrays only: a pickle is refused
                arrays = {k: archive[k] for k in ("features", "mu", "sigma")}
        except Exception as exc:  # truncated zip, object arrays (pickles), missing arrays
            raise _Untrusted(f"{str(path)!r} is not a readable features archive ({type(exc).__name__}: {exc})") from exc
        features, mu, sigma = arrays["features"], arrays["mu"], arrays["sigma"]
        ok = (
            features.dtype == np.float32 and features.ndim == 2 and features.shape[0] == n
            and mu.dtype == np.float64 and mu.shape == (features.shape[1],)
            and sigma.dtype == np.float64 and sigma.shape == (features.shape[1],) * 2
        )
        if not ok or not (np.isfinite(features).all() and np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise _Untrusted(f"{str(path)!r} does not hold finite arrays of the shapes its note records")
        return _Reference(torch.from_numpy(features), mu, sigma, data_sha, n, shape)

    def write(self, ref: _Reference) -> None:
        """Write the ``.npz`` (named by its own hash), then the note that certifies it; drop superseded files."""
        buffer = io.BytesIO()
        np.savez(buffer, features=ref.features.numpy(), mu=ref.mu, sigma=ref.sigma)
        data = buffer.getvalue()
        file_sha = sha256_bytes(data)
        path = self.root / f"{self.stem}-{file_sha[:16]}.npz"
        _atomic_write_bytes(data, path)
        note = {
            "format": _CACHE_FORMAT,
            "reference_name": self.reference_name,
            "feature_extractor": self.extractor,
            "feature_layer": self.layer,
            "weights_sha256": self.weights_sha256,
            "data_sha256": ref.data_sha256,
            "n_reference": ref.n,
            "shape": ref.shape,
            "file": path.name,
            "file_sha256": file_sha,
        }
        # Last, atomically: each writer's note names its own (content-addressed) file, so concurrent writers
        # (DDP ranks) leave a consistent entry whichever note lands last.
        _atomic_write_bytes(json.dumps(note, indent=1).encode(), self.note_path)
        if not _dist_active():  # other ranks may be writing their own files right now
            for stale in self.files():
                if stale.suffix == ".npz" and stale != path:
                    stale.unlink(missing_ok=True)


def _fid_statistics(features: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of ``(N, D)`` features, in float64."""
    f = features.detach().cpu().double().numpy()
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def _fid_from_statistics(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """``||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2))`` (torch-fidelity's and pytorch-fid's method).

    ``S1 S2`` is similar to the PSD matrix ``S1^(1/2) S2 S1^(1/2)``, so its eigenvalues are real and >= 0 up to
    round-off and ``Tr((S1 S2)^(1/2))`` is the sum of their square roots (real parts, for round-off).
    """
    diff = mu1 - mu2
    eigenvalues = np.linalg.eigvals(sigma1 @ sigma2).astype(np.complex128)
    tr_covmean = float(np.sqrt(eigenvalues).real.sum())
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


# ---------------------------------------------------------------------------------------------- distributed
def _dist_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _comm_device() -> torch.device:
    """NCCL only moves CUDA tensors; gloo (and others) work on the CPU."""
    if "nccl" in str(dist.get_backend()).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on some rank (so all ranks raise together instead of hanging)."""
    if not _dist_active():
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64, torch.int32)
_MAX_DIMS = 8


def all_gather_samples(samples: Tensor) -> Tensor:
    """Concatenate ``samples`` from all ranks (rank 0's first), identically on every rank.

    Ranks may hold different numbers of samples (first axis); the trailing shape and dtype must agree. Without an
    initialized process group, or with one process, ``samples`` is returned unchanged. Works with NCCL (CUDA
    tensors) and gloo (CPU). Must be called on every rank: it is a collective.

    Args:
        samples: this rank's tensor ``(n_rank, ...)`` (at most 7 trailing dimensions).

    Returns:
        ``(sum of n_rank, ...)`` on the device and dtype of ``samples``.

    Raises:
        ValueError: on every rank, if the ranks disagree on trailing shape or dtype.

    Example:
        >>> all_gather_samples(torch.zeros(3, 1, 8, 8)).shape  # one process: unchanged
        torch.Size([3, 1, 8, 8])
    """
    if not _dist_active():
        return samples
    if samples.ndim < 1 or samples.ndim > _MAX_DIMS or samples.dtype not in _DTYPES:
        raise ValueError(f"samples must have 1 to {_MAX_DIMS} dims and a dtype in {_DTYPES}, got {samples.dtype}")
    device = _comm_device()
    world = dist.get_world_size()
    # Exchange (dtype, ndim, shape) first so that unequal sizes are padded and mismatches raise on all ranks.
    meta = torch.zeros(2 + _MAX_DIMS, dtype=torch.int64)
    meta[0], meta[1] = _DTYPES.index(samples.dtype), samples.ndim
    meta[2 : 2 + samples.ndim] = torch.tensor(samples.shape)
    metas = [torch.empty_like(meta, device=device) for _ in range(world)]
    dist.all_gather(metas, meta.to(device))
    metas_cpu = [m.cpu() for m in metas]
    if any(not torch.equal(m[:2], meta[:2]) or not torch.equal(m[3:], meta[3:]) for m in metas_cpu):
        shapes = [tuple(int(v) for v in m[2 : 2 + int(m[1])]) for m in metas_cpu]
        dtypes = [str(_DTYPES[int(m[0])]) for m in metas_cpu]
        raise ValueError(f"ranks disagree on sample shape/dtype: shapes {shapes}, dtypes {dtypes}")
    counts = [int(m[2]) for m in metas_cpu]
    padded = torch.zeros((max(counts), *samples.shape[1:]), dtype=samples.dtype, device=device)
    padded[: samples.shape[0]] = samples.to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, counts)]).to(samples.device)


def _broadcast_numbers(values: list[float]) -> list[float]:
    """Rank 0's numbers on every rank, so logged metrics are bit-identical even if GPU kernels differ slightly."""
    if not _dist_active():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.broadcast(t, src=0)
    return [float(v) for v in t.cpu()]


# ------------------------------------------------------------------------------------------------- features
def extract_features(
    images: Tensor,
    feature_extractor: str = DIGITS_EXTRACTOR_NAME,
    *,
    feature_layer: str | None = None,
    weights_path: str | Path | None = None,
    weights_sha256: str | None = None,
    cache_dir: str | Path | None = None,
    value_range: tuple[float, float] = (0.0, 1.0),
    batch_size: int = 64,
    cuda: bool | None = None,
) -> Tensor:
    """Features of ``images`` from the feature extractors :func:`compute_fid_kid` uses.

    Args:
        images: ``(N, C, H, W)``, uint8 or float in ``value_range``.
        feature_extractor: ``"digits-classifier"`` or ``"inception-v3-compat"``.
        feature_layer: layer name (default ``"64"`` for digits, ``"2048"`` for Inception).
        weights_path: local weights file (required for Inception; optional for digits).
        weights_sha256: expected SHA-256 of ``weights_path``, checked before it is read (default for Inception:
            :data:`INCEPTION_WEIGHTS_SHA256`).
        cache_dir: cache folder of the digits classifier (default :func:`default_cache_dir`).
        value_range: range of floating point input.
        batch_size: images per forward pass.
        cuda: run on the current CUDA device (default: when CUDA is available).

    Returns:
        float32 features ``(N, D)`` on the CPU.

    Example:
        >>> extract_features(torch.rand(10, 1, 8, 8), cuda=False).shape  # doctest: +SKIP
        torch.Size([10, 64])
    """
    _check_positive_int("batch_size", batch_size)
    if feature_extractor not in _EXTRACTORS:
        raise ValueError(f"feature_extractor must be one of {list(_EXTRACTORS)}, got {feature_extractor!r}")
    layer = _check_layer(feature_extractor, feature_layer)
    images = _prepare(images, "images", value_range, feature_extractor)
    extractor = _load_extractor(feature_extractor, weights_path, cache_dir, [layer], _check_sha256(weights_sha256))
    use_cuda = torch.cuda.is_available() if cuda is None else bool(cuda)
    return _run_extractor(extractor, images, batch_size, use_cuda, False)[layer]


def _check_feature_pair(features1: Tensor, features2: Tensor) -> None:
    for name, f in (("features1", features1), ("features2", features2)):
        if not isinstance(f, Tensor) or f.ndim != 2 or f.shape[0] < 2:
            raise ValueError(f"{name} must be a tensor of shape (N, D) with N >= 2, got {getattr(f, 'shape', f)!r}")
    if features1.shape[1] != features2.shape[1]:
        raise ValueError(f"feature dimensions differ: {features1.shape[1]} vs {features2.shape[1]}")


def fid_from_features(features1: Tensor, features2: Tensor) -> float:
    """FID between two feature sets ``(N1, D)`` and ``(N2, D)``.

    ``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`` with unbiased sample covariances, in float64.

    Raises:
        ValueError: if the sets are not 2-D with the same ``D`` or have fewer than 2 samples.

    Example:
        >>> x = torch.randn(500, 4, generator=torch.Generator().manual_seed(0))
        >>> fid_from_features(x, x) < 1e-9, round(fid_from_features(x, x + 1.0), 6)  # a shift by 1 in 4 dims
        (True, 4.0)
    """
    _check_feature_pair(features1, features2)
    return _fid_from_statistics(*_fid_statistics(features1), *_fid_statistics(features2))


def kid_from_features(
    features1: Tensor, features2: Tensor, kid_subset_size: int, kid_subsets: int = 100, seed: int = 2020
) -> tuple[float, float]:
    """KID (mean, std over subsets) between two feature sets, with torch-fidelity's formula (cubic polynomial
    kernel, unbiased MMD^2; pure arithmetic on the tensors given).

    Raises:
        ValueError: naming ``kid_subset_size`` if a set has fewer samples than it.
    """
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    _check_feature_pair(features1, features2)
    _check_positive_int("kid_subset_size", kid_subset_size)
    _check_positive_int("kid_subsets", kid_subsets)
    _check_kid_counts(kid_subset_size, features1.shape[0], features2.shape[0])
    out = kid_features_to_metric(
        features1.detach().cpu().double(),
        features2.detach().cpu().double(),
        kid_subset_size=kid_subset_size,
        kid_subsets=kid_subsets,
        rng_seed=seed,
        verbose=False,
    )
    return float(out[KEY_METRIC_KID_MEAN]), float(out[KEY_METRIC_KID_STD])


def _check_kid_counts(kid_subset_size: int, n_generated: int, n_reference: int) -> None:
    if n_generated < kid_subset_size or n_reference < kid_subset_size:
        raise ValueError(
            f"kid_subset_size={kid_subset_size} exceeds the number of samples (generated: {n_generated}, reference: "
            f"{n_reference}); lower kid_subset_size to at most {min(n_generated, n_reference)} or pass more samples"
        )


# -------------------------------------------------------------------------------------------------- metrics
def compute_fid_kid(
    generated: Tensor,
    reference: Tensor | None,
    *,
    feature_extractor: str = DIGITS_EXTRACTOR_NAME,
    reference_name: str | None = None,
    cache_dir: str | Path | None = None,
    weights_path: str | Path | None = None,
    weights_sha256: str | None = None,
    feature_layer: str | None = None,
    value_range: tuple[float, float] = (0.0, 1.0),
    kid: bool = True,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    isc: bool = False,
    isc_splits: int = 10,
    batch_size: int = 64,
    cuda: bool | None = None,
    seed: int = 2020,
    gather_across_ranks: bool = False,
    verbose: bool = False,
) -> FidKidResult:
    """FID and KID of ``generated`` against ``reference``, offline.

    The reference statistics can be cached under ``reference_name`` (e.g. ``"digits-test"``, ``"cifar10-train"``):
    the first call computes the reference features into ``<cache_dir>/fidelity`` (an ``.npz`` plus a JSON note
    with SHA-256 hashes, keyed by the name, the extractor weights' hash and the layer; see the module docstring);
    later calls reuse them, and may pass ``reference=None``. Passing *different* reference images under a cached
    name raises instead of returning a stale FID; an entry that does not verify is rebuilt from ``reference`` or,
    with ``reference=None``, is an error naming the file.

    Distributed use (DDP): call this on every rank with the rank's own ``generated`` and
    ``gather_across_ranks=True``. The samples of all ranks are gathered (:func:`all_gather_samples`), every rank
    computes the metrics on the full set (no rank-0-only collective, hence no deadlock), and rank 0's numbers are
    broadcast so every rank returns identical values (log them with ``sync_dist=False``). ``reference`` must be
    the full reference set on every rank. Invalid input on one rank raises on all ranks.

    Args:
        generated: samples ``(N, C, H, W)``, uint8 in ``[0, 255]`` or float in ``value_range``.
        reference: reference images in the same format, or ``None`` to use the cache of ``reference_name``.
        feature_extractor: ``"digits-classifier"`` (8 x 8 digits, 1 channel) or ``"inception-v3-compat"``.
        reference_name: cache name of the reference set (letters, digits, ``.``, ``_``, ``-``); ``None``: no cache.
        cache_dir: cache folder (default: ``$KO_LIGHTNING_CACHE_DIR`` or ``~/.cache/ko_lightning``); holds the
            digits classifier and, under ``fidelity/``, the reference features and statistics.
        weights_path: local weights file: required for Inception (or ``$KO_LIGHTNING_INCEPTION_WEIGHTS``), optional
            for the digits classifier (default: trained on first use into ``cache_dir``).
        weights_sha256: expected SHA-256 of the weights file, checked before the file is parsed. Default for
            Inception: :data:`INCEPTION_WEIGHTS_SHA256` (torch-fidelity's published file); pass the hash of your own
            converted file to use that instead. For the digits classifier it is checked only when given.
        feature_layer: feature layer for FID and KID (default ``"64"`` for digits, ``"2048"`` for Inception).
        value_range: ``(lo, hi)`` of floating point images, e.g. ``(-1.0, 1.0)`` for model-space CIFAR samples.
        kid: also compute KID.
        kid_subset_size: samples per KID subset (torch-fidelity's default 1000; lower it for small sets).
        kid_subsets: number of KID subsets.
        isc: also compute the Inception Score of ``generated`` (from the extractor's logits, in the same pass).
        isc_splits: splits of the Inception Score.
        batch_size: images per forward pass of the extractor.
        cuda: run the extractor on the current CUDA device (default: when CUDA is available).
        seed: seed of the KID subsets and the IS shuffling.
        gather_across_ranks: gather ``generated`` from all ranks first (see above).
        verbose: show torch-fidelity's progress bars on stderr.

    Returns:
        A :class:`FidKidResult`.

    Example:
        >>> dm = DigitsDataModule(); dm.setup()  # doctest: +SKIP
        >>> ref = dm.to_display(dm.test_tensor())  # (180, 1, 8, 8) in [0, 1]  # doctest: +SKIP
        >>> r = compute_fid_kid(dm.to_display(samples), ref, reference_name="digits-test",
        ...                     kid_subset_size=100)  # doctest: +SKIP
        >>> r = compute_fid_kid(more, None, reference_name="digits-test", kid_subset_size=100)  # doctest: +SKIP
        >>> # CIFAR-10 with Inception, model-space samples in [-1, 1], in on_validation_epoch_end under DDP:
        >>> r = compute_fid_kid(local_samples, ref_uint8, feature_extractor="inception-v3-compat",
        ...                     weights_path="/data/weights-inception-2015-12-05-6726825d.pth",
        ...                     reference_name="cifar10-train", value_range=(-1.0, 1.0),
        ...                     gather_across_ranks=True)  # doctest: +SKIP
        >>> self.log_dict(r.metrics())  # doctest: +SKIP

    Raises:
        ValueError: naming the argument for a wrong dtype, shape or value range, for ``kid_subset_size`` larger than
            either set, for a missing Inception ``weights_path``, for a weights file whose SHA-256 differs from
            ``weights_sha256`` (naming the file and both hashes), for a bad ``reference_name``, for
            ``reference=None`` without a valid cache entry (naming the file and how to clear it), or for a cached
            name reused with different images.
        FileNotFoundError: naming ``weights_path`` when the file does not exist (nothing is ever downloaded).
    """
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("kid_subset_size", kid_subset_size)
    _check_positive_int("kid_subsets", kid_subsets)
    _check_positive_int("isc_splits", isc_splits)
    if feature_extractor not in _EXTRACTORS:
        raise ValueError(f"feature_extractor must be one of {list(_EXTRACTORS)}, got {feature_extractor!r}")
    name = feature_extractor
    layer = _check_layer(name, feature_layer)
    expected_sha256 = _check_sha256(weights_sha256)
    if reference_name is not None and (
        not isinstance(reference_name, str) or not _NAME_PATTERN.match(reference_name)
    ):
        raise ValueError(
            f"reference_name must be letters, digits, '.', '_' or '-' (a file name part), got {reference_name!r}"
        )

    if gather_across_ranks and _dist_active():
        invalid: ValueError | None = None
        try:
            local = _prepare(generated, "generated", value_range, name)
        except ValueError as exc:
            invalid = exc
        if _any_rank(invalid is not None):  # every rank takes the same branch: nobody is left waiting in a collective
            raise invalid if invalid is not None else ValueError("generated is invalid on another rank (see its error)")
        gen = all_gather_samples(local)
    else:
        gen = _prepare(generated, "generated", value_range, name)
    n_gen = int(gen.shape[0])
    try:  # under DDP every rank must learn of a failure on any rank before the broadcast below
        values, n_ref = _metric_values(
            gen, reference, name, layer, reference_name, cache_dir, weights_path, expected_sha256, value_range, kid,
            kid_subset_size, kid_subsets, isc, isc_splits, batch_size, cuda, seed, verbose,
        )
        error: Exception | None = None
    except Exception as exc:  # noqa: BLE001 - re-raised below, here and (as a pointer to it) on the other ranks
        error, values, n_ref = exc, [float("nan")] * 5, 0
    if gather_across_ranks and _dist_active() and _any_rank(error is not None) and error is None:
        raise RuntimeError("compute_fid_kid failed on another rank (see its error); stopping on every rank")
    if error is not None:
        raise error
    if gather_across_ranks:
        values = _broadcast_numbers(values)
    fid, kid_mean, kid_std, isc_mean, isc_std = values
    return FidKidResult(
        fid=fid,
        kid_mean=kid_mean if kid else None,
        kid_std=kid_std if kid else None,
        isc_mean=isc_mean if isc else None,
        isc_std=isc_std if isc else None,
        n_generated=n_gen,
        n_reference=n_ref,
        reference_name=reference_name,
        feature_extractor=name,
        feature_layer=layer,
    )


def _metric_values(
    gen: Tensor,
    reference: Tensor | None,
    name: str,
    layer: str,
    reference_name: str | None,
    cache_dir: str | Path | None,
    weights_path: str | Path | None,
    expected_sha256: str | None,
    value_range: tuple[float, float],
    kid: bool,
    kid_subset_size: int,
    kid_subsets: int,
    isc: bool,
    isc_splits: int,
    batch_size: int,
    cuda: bool | None,
    seed: int,
    verbose: bool,
) -> tuple[list[float], int]:
    """``[fid, kid_mean, kid_std, isc_mean, isc_std]`` (NaN where not computed) and the reference size: the work
    of :func:`compute_fid_kid` after the generated samples are validated (and gathered)."""
    n_gen = int(gen.shape[0])
    ref = _prepare(reference, "reference", value_range, name) if reference is not None else None
    ref_sha256 = _tensor_sha256(ref) if ref is not None else ""
    if reference_name is None and ref is None:
        raise ValueError("reference is None and no reference_name is given: pass the reference images")
    if ref is not None and tuple(gen.shape[1:]) != tuple(ref.shape[1:]):
        raise ValueError(f"generated images have shape {tuple(gen.shape[1:])}, the reference {tuple(ref.shape[1:])}")
    if ref is not None:
        _check_counts(n_gen, int(ref.shape[0]), kid, kid_subset_size, isc, isc_splits)

    isc_layer = _ISC_LAYER[name]
    layers = [layer] + ([isc_layer] if isc and isc_layer != layer else [])
    extractor = _load_extractor(name, weights_path, cache_dir, layers, expected_sha256)
    use_cuda = torch.cuda.is_available() if cuda is None else bool(cuda)

    reference_stats: _Reference | None = None
    entry: _ReferenceEntry | None = None
    if reference_name is not None:
        cache_root = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / "fidelity"
        entry = _ReferenceEntry(cache_root, reference_name, name, layer, extractor.weights_sha256)
        try:
            reference_stats = entry.read()
        except (_Untrusted, OSError) as exc:
            files = ", ".join(repr(str(p)) for p in entry.files()) or repr(str(entry.note_path))
            if ref is None:
                raise ValueError(
                    f"reference is None but the cache entry of reference_name={reference_name!r} (layer {layer!r}, "
                    f"extractor {name!r}) cannot be trusted: {exc}. Pass the reference images to rebuild it, or "
                    f"delete {files}"
                ) from exc
            warnings.warn(
                f"the cache entry of reference_name={reference_name!r} is not reused ({exc}); rebuilding it from the "
                "reference images given",
                stacklevel=2,
            )
        if reference_stats is None and ref is None:
            raise ValueError(
                f"reference is None but no cached features of reference_name={reference_name!r} (layer {layer!r}, "
                f"extractor {name!r}) are in {str(cache_root)!r}; pass the reference images once"
            )
        if reference_stats is not None and ref is not None and reference_stats.data_sha256 != ref_sha256:
            raise ValueError(
                f"reference_name={reference_name!r} is cached in {str(cache_root)!r} for different reference "
                f"images ({reference_stats.n} images, shape {reference_stats.shape}); use another reference_name or "
                f"delete {', '.join(repr(str(p)) for p in entry.files())}"
            )
        if reference_stats is not None and list(gen.shape[1:]) != list(reference_stats.shape):
            raise ValueError(
                f"generated images have shape {list(gen.shape[1:])}, the reference {reference_stats.shape}"
            )
        if reference_stats is not None:
            _check_counts(n_gen, reference_stats.n, kid, kid_subset_size, isc, isc_splits)

    if reference_stats is None:
        assert ref is not None
        ref_features = _run_extractor(extractor, ref, batch_size, use_cuda, verbose)[layer]
        mu, sigma = _fid_statistics(ref_features)
        reference_stats = _Reference(ref_features, mu, sigma, ref_sha256, int(ref.shape[0]), list(ref.shape[1:]))
        if entry is not None:
            entry.write(reference_stats)

    gen_features = _run_extractor(extractor, gen, batch_size, use_cuda, verbose)
    gen_mu, gen_sigma = _fid_statistics(gen_features[layer])
    nan = float("nan")
    values = [_fid_from_statistics(gen_mu, gen_sigma, reference_stats.mu, reference_stats.sigma), nan, nan, nan, nan]
    if kid:
        values[1:3] = kid_from_features(
            gen_features[layer], reference_stats.features, kid_subset_size, kid_subsets, seed
        )
    if isc:
        from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

        out = isc_features_to_metric(gen_features[isc_layer], splits=isc_splits, shuffle=True, rng_seed=seed)
        values[3:5] = [float(out[KEY_METRIC_ISC_MEAN]), float(out[KEY_METRIC_ISC_STD])]
    return values, reference_stats.n


def _check_counts(n_gen: int, n_ref: int, kid: bool, kid_subset_size: int, isc: bool, isc_splits: int) -> None:
    if n_gen < 2 or n_ref < 2:
        raise ValueError(f"FID needs at least 2 samples per set (generated: {n_gen}, reference: {n_ref})")
    if kid:
        _check_kid_counts(kid_subset_size, n_gen, n_ref)
    if isc and n_gen < isc_splits:
        raise ValueError(f"isc_splits={isc_splits} exceeds the {n_gen} generated samples")
