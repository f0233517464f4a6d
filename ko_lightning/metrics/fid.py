"""FID and KID (and optionally IS) through torch-fidelity, offline, with named and cached reference statistics.

Two feature spaces are supported:

* ``"inception-v3-compat"``: torch-fidelity's port of the TF Inception-v3 used by the original FID code. Its
  weights are never downloaded here: pass ``weights_path`` (or set ``KO_LIGHTNING_INCEPTION_WEIGHTS``) to a local
  copy of ``weights-inception-2015-12-05-6726825d.pth``.
* ``"digits-classifier"``: a small CNN trained on the sklearn digits on first use
  (:mod:`ko_lightning.metrics.digits_features`), for 8 x 8 digit samples.

Image conventions: tensors ``(N, C, H, W)``, either ``uint8`` in ``[0, 255]`` or floating point in ``value_range``
(default ``[0, 1]``, e.g. :meth:`DigitsDataModule.to_display`; ``(-1, 1)`` for :class:`ImageDataModule` model space).
Floats are quantized to 8 bits (``round(255 (x - lo) / (hi - lo))``) exactly as if the samples were saved as PNG,
the standard FID protocol. Grayscale images are repeated to 3 channels for Inception.

Reference statistics are cached under a name the user gives (``reference_name="digits-test"``): the reference
features (and FID mean/covariance) are computed once into ``<cache_dir>/fidelity`` by torch-fidelity's cache and
reused, also with ``reference=None``. A JSON note next to them records a SHA-256 of the reference pixels and of
the extractor weights, so reusing a name for different data is an error rather than a silently wrong FID.

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
import json
import math
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Dataset

from ko_lightning.metrics.digits_features import (
    DIGITS_EXTRACTOR_NAME,
    default_cache_dir,
    ensure_digits_classifier,
    register_digits_feature_extractor,
)

__all__ = [
    "INCEPTION_EXTRACTOR_NAME",
    "INCEPTION_WEIGHTS_ENV_VAR",
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

_INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
_EXTRACTORS = (INCEPTION_EXTRACTOR_NAME, DIGITS_EXTRACTOR_NAME)
_DEFAULT_LAYER = {INCEPTION_EXTRACTOR_NAME: "2048", DIGITS_EXTRACTOR_NAME: "64"}
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


class _CachedOnly(Dataset):
    """Stands in for a reference whose features are in the cache; reading it means the cache was incomplete."""

    def __init__(self, n: int, name: str) -> None:
        self.n, self.name = n, name

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Tensor:
        raise RuntimeError(
            f"the cached features of reference_name={self.name!r} are incomplete; pass the reference images again"
        )


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _resolve_extractor(
    feature_extractor: str, weights_path: str | Path | None, cache_dir: str | Path | None
) -> tuple[str, Path]:
    """The torch-fidelity name and the local weights file of the chosen extractor (training the digits one if
    needed). Nothing is downloaded."""
    if feature_extractor not in _EXTRACTORS:
        raise ValueError(f"feature_extractor must be one of {list(_EXTRACTORS)}, got {feature_extractor!r}")
    if feature_extractor == DIGITS_EXTRACTOR_NAME:
        register_digits_feature_extractor()
        if weights_path is None:
            return feature_extractor, ensure_digits_classifier(cache_dir)
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"digits classifier weights_path={str(path)!r} does not exist; pass weights_path=None to train it into "
                "the cache folder on first use"
            )
        return feature_extractor, path
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
    return feature_extractor, path


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


_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: Path) -> str:
    """SHA-256 of a file, memoized on (path, size, mtime) so a 90 MB Inception file is hashed once per process."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _FILE_HASHES[key] = digest.hexdigest()
    return _FILE_HASHES[key]


def _tensor_sha256(images: Tensor) -> str:
    digest = hashlib.sha256(str(tuple(images.shape)).encode())
    digest.update(images.numpy().tobytes())
    return digest.hexdigest()


def _atomic_write_json(obj: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
        os.replace(tmp, path)  # atomic: concurrent ranks writing the same note never leave a partial file
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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
    cache_dir: str | Path | None = None,
    value_range: tuple[float, float] = (0.0, 1.0),
    batch_size: int = 64,
    cuda: bool | None = None,
) -> Tensor:
    """Features of ``images`` from a torch-fidelity feature extractor (the ones :func:`compute_fid_kid` uses).

    Args:
        images: ``(N, C, H, W)``, uint8 or float in ``value_range``.
        feature_extractor: ``"digits-classifier"`` or ``"inception-v3-compat"``.
        feature_layer: layer name (default ``"64"`` for digits, ``"2048"`` for Inception).
        weights_path: local weights file (required for Inception; optional for digits).
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
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

    _check_positive_int("batch_size", batch_size)
    name, path = _resolve_extractor(feature_extractor, weights_path, cache_dir)
    layer = feature_layer or _DEFAULT_LAYER[name]
    images = _prepare(images, "images", value_range, name)
    use_cuda = torch.cuda.is_available() if cuda is None else bool(cuda)
    extractor = create_feature_extractor(
        name, [layer], cuda=use_cuda, feature_extractor_weights_path=str(path), verbose=False
    )
    feats = get_featuresdict_from_dataset(_ImageSet(images), extractor, batch_size, use_cuda, True, False)
    return feats[layer].float()


def fid_from_features(features1: Tensor, features2: Tensor) -> float:
    """FID between two feature sets ``(N1, D)`` and ``(N2, D)``, via torch-fidelity's statistics and formula.

    ``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`` with unbiased sample covariances, in float64.

    Raises:
        ValueError: if the sets are not 2-D with the same ``D`` or have fewer than 2 samples.

    Example:
        >>> x = torch.randn(500, 4, generator=torch.Generator().manual_seed(0))
        >>> fid_from_features(x, x) < 1e-9, round(fid_from_features(x, x + 1.0), 6)  # a shift by 1 in 4 dims
        (True, 4.0)
    """
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

    for name, f in (("features1", features1), ("features2", features2)):
        if f.ndim != 2 or f.shape[0] < 2:
            raise ValueError(f"{name} must have shape (N, D) with N >= 2, got {tuple(f.shape)}")
    if features1.shape[1] != features2.shape[1]:
        raise ValueError(f"feature dimensions differ: {features1.shape[1]} vs {features2.shape[1]}")
    s1 = fid_features_to_statistics(features1.detach().cpu().double())
    s2 = fid_features_to_statistics(features2.detach().cpu().double())
    return float(fid_statistics_to_metric(s1, s2, False)[KEY_METRIC_FID])


def kid_from_features(
    features1: Tensor, features2: Tensor, kid_subset_size: int, kid_subsets: int = 100, seed: int = 2020
) -> tuple[float, float]:
    """KID (mean, std over subsets) between two feature sets, via torch-fidelity (cubic polynomial kernel).

    Raises:
        ValueError: naming ``kid_subset_size`` if a set has fewer samples than it.
    """
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

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
    """FID and KID of ``generated`` against ``reference`` with torch-fidelity, offline.

    The reference statistics can be cached under ``reference_name`` (e.g. ``"digits-test"``, ``"cifar10-train"``):
    the first call computes the reference features into ``<cache_dir>/fidelity`` (torch-fidelity's cache, keyed by
    the name and a hash of the extractor weights); later calls reuse them, and may pass ``reference=None``. Passing
    *different* reference images under a cached name raises instead of returning a stale FID.

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
        feature_layer: feature layer for FID and KID (default ``"64"`` for digits, ``"2048"`` for Inception).
        value_range: ``(lo, hi)`` of floating point images, e.g. ``(-1.0, 1.0)`` for model-space CIFAR samples.
        kid: also compute KID.
        kid_subset_size: samples per KID subset (torch-fidelity's default 1000; lower it for small sets).
        kid_subsets: number of KID subsets.
        isc: also compute the Inception Score of ``generated`` (from the extractor's logits; one extra pass).
        isc_splits: splits of the Inception Score.
        batch_size: images per forward pass of the extractor.
        cuda: run the extractor on the current CUDA device (default: when CUDA is available).
        seed: seed of the KID subsets and the IS shuffling.
        gather_across_ranks: gather ``generated`` from all ranks first (see above).
        verbose: let torch-fidelity print progress to stderr.

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
            either set, for a missing Inception ``weights_path``, for a bad ``reference_name``, for
            ``reference=None`` without cached statistics, or for a cached name reused with different images.
        FileNotFoundError: naming ``weights_path`` when the file does not exist (nothing is ever downloaded).
    """
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("kid_subset_size", kid_subset_size)
    _check_positive_int("kid_subsets", kid_subsets)
    _check_positive_int("isc_splits", isc_splits)
    if feature_extractor not in _EXTRACTORS:
        raise ValueError(f"feature_extractor must be one of {list(_EXTRACTORS)}, got {feature_extractor!r}")

    if gather_across_ranks and _dist_active():
        error: ValueError | None = None
        try:
            local = _prepare(generated, "generated", value_range, feature_extractor)
        except ValueError as exc:
            error = exc
        if _any_rank(error is not None):  # every rank takes the same branch: nobody is left waiting in a collective
            raise error if error is not None else ValueError("generated is invalid on another rank (see its error)")
        gen = all_gather_samples(local)
    else:
        gen = _prepare(generated, "generated", value_range, feature_extractor)

    name, weights = _resolve_extractor(feature_extractor, weights_path, cache_dir)
    layer = feature_layer or _DEFAULT_LAYER[name]
    n_gen = int(gen.shape[0])

    ref_dataset: Dataset
    cache_kwargs: dict[str, Any] = {"cache": False}
    if reference_name is None:
        if reference is None:
            raise ValueError("reference is None and no reference_name is given: pass the reference images")
        ref = _prepare(reference, "reference", value_range, name)
        n_ref, ref_dataset = int(ref.shape[0]), _ImageSet(ref)
    else:
        if not isinstance(reference_name, str) or not _NAME_PATTERN.match(reference_name):
            raise ValueError(
                f"reference_name must be letters, digits, '.', '_' or '-' (a file name part), got {reference_name!r}"
            )
        weights_hash = _file_sha256(weights)
        cache_root = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / "fidelity"
        cache_name = f"{reference_name}-{weights_hash[:12]}"  # new extractor weights -> new cache entry
        note_path = cache_root / f"{cache_name}-{name}-reference.json"
        note = json.loads(note_path.read_text()) if note_path.is_file() else None
        if reference is not None:
            ref = _prepare(reference, "reference", value_range, name)
            data_hash = _tensor_sha256(ref)
            if note is not None and note["data_sha256"] != data_hash:
                raise ValueError(
                    f"reference_name={reference_name!r} is cached in {str(cache_root)!r} for different reference "
                    f"images ({note['n_reference']} images, shape {note['shape']}); use another reference_name or "
                    f"delete {str(cache_root / cache_name)}-*"
                )
            if note is None:
                note = {
                    "reference_name": reference_name,
                    "feature_extractor": name,
                    "weights_sha256": weights_hash,
                    "data_sha256": data_hash,
                    "n_reference": int(ref.shape[0]),
                    "shape": list(ref.shape[1:]),
                }
                _atomic_write_json(note, note_path)  # written before the features, which then belong to these data
            ref_dataset = _ImageSet(ref)
        else:
            features_file = cache_root / f"{cache_name}-{name}-features-{layer}.pt"
            stats_file = cache_root / f"{cache_name}-{name}-stat-fid-{layer}.pt"
            if note is None or not (features_file.is_file() or (not kid and stats_file.is_file())):
                raise ValueError(
                    f"reference is None but no cached features of reference_name={reference_name!r} (layer {layer!r}, "
                    f"extractor {name!r}) are in {str(cache_root)!r}; pass the reference images once"
                )
            ref_dataset = _CachedOnly(int(note["n_reference"]), reference_name)
        n_ref = int(note["n_reference"])
        if list(gen.shape[1:]) != list(note["shape"]):
            raise ValueError(f"generated images have shape {list(gen.shape[1:])}, the reference {note['shape']}")
        cache_kwargs = {"cache": True, "cache_root": str(cache_root), "input2_cache_name": cache_name}
    if reference_name is None and tuple(gen.shape[1:]) != tuple(ref.shape[1:]):
        raise ValueError(f"generated images have shape {tuple(gen.shape[1:])}, the reference {tuple(ref.shape[1:])}")

    if n_gen < 2 or n_ref < 2:
        raise ValueError(f"FID needs at least 2 samples per set (generated: {n_gen}, reference: {n_ref})")
    if kid:
        _check_kid_counts(kid_subset_size, n_gen, n_ref)
    if isc and n_gen < isc_splits:
        raise ValueError(f"isc_splits={isc_splits} exceeds the {n_gen} generated samples")

    from torch_fidelity import (  # imported late: argument errors need neither torch-fidelity nor torchvision
        KEY_METRIC_FID,
        KEY_METRIC_ISC_MEAN,
        KEY_METRIC_ISC_STD,
        KEY_METRIC_KID_MEAN,
        KEY_METRIC_KID_STD,
        calculate_metrics,
    )

    use_cuda = torch.cuda.is_available() if cuda is None else bool(cuda)
    common: dict[str, Any] = {
        "feature_extractor": name,
        "feature_extractor_weights_path": str(weights),
        "batch_size": batch_size,
        "cuda": use_cuda,
        "rng_seed": seed,
        "verbose": verbose,
        "save_cpu_ram": True,  # loader without worker processes: the data are already an in-memory tensor
    }
    out = calculate_metrics(
        input1=_ImageSet(gen),
        input2=ref_dataset,
        fid=True,
        kid=kid,
        feature_layer_fid=layer,
        feature_layer_kid=layer,
        kid_subset_size=kid_subset_size,
        kid_subsets=kid_subsets,
        **common,
        **cache_kwargs,
    )
    if isc:
        # A separate unary call, so that the reference cache holds only the FID/KID layer.
        out.update(
            calculate_metrics(
                input1=_ImageSet(gen), isc=True, feature_layer_isc=_ISC_LAYER[name], isc_splits=isc_splits, cache=False,
                **common,
            )
        )
    nan = math.nan
    values = [
        float(out[KEY_METRIC_FID]),
        float(out.get(KEY_METRIC_KID_MEAN, nan)),
        float(out.get(KEY_METRIC_KID_STD, nan)),
        float(out.get(KEY_METRIC_ISC_MEAN, nan)),
        float(out.get(KEY_METRIC_ISC_STD, nan)),
    ]
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
