"""The feature extractors of FID/KID: names and layers, hash-checked loading from local files, running them.

Two feature spaces are supported:

* ``"inception-v3-compat"``: torch-fidelity's port of the TF Inception-v3 used by the original FID code
  (:mod:`ko_lightning.metrics.inception`); its weights are a local file whose SHA-256 is checked before it is read.
* ``"digits-classifier"``: a small CNN trained on the sklearn digits on first use
  (:mod:`ko_lightning.metrics.digits_features`), for 8 x 8 digit samples.

Nothing is downloaded, and nothing torch-fidelity would read from disk itself is used: its weight loading and
feature caches are bypassed. Grayscale images are repeated to 3 channels for Inception.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ko_lightning.metrics.checks import check_positive_int, check_sha256
from ko_lightning.metrics.digits_features import (
    DIGITS_EXTRACTOR_NAME,
    _classifier_from_bytes,
    _fidelity_extractor_class,
    digits_classifier_path,
    load_digits_classifier_with_sha256,
)
from ko_lightning.metrics.files import sha256_bytes
from ko_lightning.metrics.images import ImageSet, to_uint8_images
from ko_lightning.metrics.inception import (
    INCEPTION_EXTRACTOR_NAME,
    INCEPTION_FILE,
    INCEPTION_WEIGHTS_SHA256,
    inception_module,
    inception_weights_file,
)

__all__ = [
    "DEFAULT_LAYER",
    "EXTRACTORS",
    "ISC_LAYER",
    "LAYERS",
    "Extractor",
    "check_extractor",
    "check_layer",
    "extract_features",
    "load_extractor",
    "prepare_images",
    "read_verified_weights",
    "run_extractor",
]

EXTRACTORS = (INCEPTION_EXTRACTOR_NAME, DIGITS_EXTRACTOR_NAME)
"""The supported feature extractors."""

DEFAULT_LAYER = {INCEPTION_EXTRACTOR_NAME: "2048", DIGITS_EXTRACTOR_NAME: "64"}
"""Feature layer of FID and KID when none is given."""

LAYERS = {
    INCEPTION_EXTRACTOR_NAME: ("64", "192", "768", "2048", "logits_unbiased", "logits"),
    DIGITS_EXTRACTOR_NAME: ("64", "logits"),
}
"""The layers each extractor provides."""

ISC_LAYER = {INCEPTION_EXTRACTOR_NAME: "logits_unbiased", DIGITS_EXTRACTOR_NAME: "logits"}
"""The logits layer the Inception Score is computed from."""


@dataclass
class Extractor:
    """A ready feature extractor (a torch-fidelity ``FeatureExtractorBase``) and the SHA-256 of its weights."""

    module: Any
    name: str
    weights_sha256: str


def check_extractor(feature_extractor: str) -> str:
    """``feature_extractor`` if it is one of :data:`EXTRACTORS`.

    Raises:
        ValueError: naming ``feature_extractor`` otherwise.
    """
    if feature_extractor not in EXTRACTORS:
        raise ValueError(f"feature_extractor must be one of {list(EXTRACTORS)}, got {feature_extractor!r}")
    return feature_extractor


def check_layer(feature_extractor: str, feature_layer: str | None) -> str:
    """The feature layer to use: ``feature_layer``, or the extractor's default when ``None``.

    Raises:
        ValueError: naming ``feature_layer`` if the extractor does not provide it.
    """
    layer = feature_layer or DEFAULT_LAYER[feature_extractor]
    if layer not in LAYERS[feature_extractor]:
        raise ValueError(
            f"feature_layer must be one of {list(LAYERS[feature_extractor])} for {feature_extractor!r}, got {layer!r}"
        )
    return layer


def prepare_images(images: Tensor, name: str, value_range: tuple[float, float], feature_extractor: str) -> Tensor:
    """``images`` as uint8 (:func:`~ko_lightning.metrics.images.to_uint8_images`) in the shape the extractor takes.

    The digits classifier takes ``(N, 1, 8, 8)``; Inception takes 1 or 3 channels, grayscale being repeated to RGB.

    Raises:
        TypeError: naming ``name`` if ``images`` is not a tensor.
        ValueError: naming ``name`` for a wrong dtype, value range or shape.
    """
    images = to_uint8_images(images, name, value_range)
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


def read_verified_weights(path: Path, expected: str | None) -> tuple[bytes, str]:
    """The bytes of ``weights_path`` and their SHA-256, after checking the hash against ``expected`` (when given).

    The bytes that are hashed are the bytes that are later parsed, so the file cannot change in between.

    Args:
        path: the weights file.
        expected: its expected SHA-256 (lower-case hex), or ``None`` to accept any file.

    Returns:
        ``(data, sha256)``.

    Raises:
        ValueError: naming the file and both hashes on a mismatch; nothing has parsed the file then.
    """
    data = path.read_bytes()
    actual = sha256_bytes(data)
    if expected is None or actual == expected:
        return data, actual
    how = (
        f"download the official {INCEPTION_FILE} again"
        if expected == INCEPTION_WEIGHTS_SHA256
        else "check that the file is the one you meant"
    )
    raise ValueError(
        f"weights_path={str(path)!r} has SHA-256 {actual}, expected {expected}; the file was not loaded. Replace it "
        f"({how}), or, if you trust this exact file (e.g. your own conversion), pass weights_sha256={actual!r}"
    )


def load_extractor(
    feature_extractor: str,
    weights_path: str | Path | None,
    cache_dir: str | Path | None,
    layers: list[str],
    weights_sha256: str | None,
) -> Extractor:
    """Build the chosen extractor from a local weights file, checking the file's SHA-256 before it is parsed.

    The digits classifier is trained into ``cache_dir`` on first use when ``weights_path`` is ``None``; Inception
    needs a local file (see :func:`~ko_lightning.metrics.inception.inception_weights_file`). Nothing is downloaded.

    Args:
        feature_extractor: one of :data:`EXTRACTORS`.
        weights_path: the weights file, or ``None`` (digits: the cached classifier; Inception: the environment
            variable).
        cache_dir: cache folder of the digits classifier.
        layers: the feature layers to provide.
        weights_sha256: expected SHA-256 of the weights (Inception default: :data:`INCEPTION_WEIGHTS_SHA256`).

    Raises:
        ValueError: for an unknown extractor, a hash mismatch, or an unreadable weights file (naming it).
        FileNotFoundError: naming ``weights_path`` when the file does not exist.
    """
    check_extractor(feature_extractor)
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
            data, sha = read_verified_weights(path, weights_sha256)
            model = _classifier_from_bytes(data, path)
        module = _fidelity_extractor_class()(DIGITS_EXTRACTOR_NAME, layers, model=model)
        return Extractor(module, feature_extractor, sha)
    path = inception_weights_file(weights_path)
    data, sha = read_verified_weights(path, weights_sha256 or INCEPTION_WEIGHTS_SHA256)
    return Extractor(inception_module(data, path, layers), feature_extractor, sha)


def run_extractor(
    extractor: Extractor, images: Tensor, batch_size: int, cuda: bool, verbose: bool
) -> dict[str, Tensor]:
    """Features of uint8 ``images`` for every layer the extractor was built with, float32 on the CPU.

    Args:
        extractor: from :func:`load_extractor`.
        images: uint8 ``(N, C, H, W)`` from :func:`prepare_images`.
        batch_size: images per forward pass.
        cuda: run on the current CUDA device.
        verbose: show torch-fidelity's progress bar on stderr.

    Returns:
        ``{layer: (N, D_layer) float32}``.
    """
    from torch_fidelity.utils import get_featuresdict_from_dataset

    module = extractor.module.cuda() if cuda else extractor.module
    feats = get_featuresdict_from_dataset(ImageSet(images), module, batch_size, cuda, True, verbose)
    return {k: v.float() for k, v in feats.items()}


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
    """Features of ``images`` from the feature extractors :func:`~ko_lightning.metrics.fid.compute_fid_kid` uses.

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
    check_positive_int("batch_size", batch_size)
    check_extractor(feature_extractor)
    layer = check_layer(feature_extractor, feature_layer)
    images = prepare_images(images, "images", value_range, feature_extractor)
    extractor = load_extractor(feature_extractor, weights_path, cache_dir, [layer], check_sha256(weights_sha256))
    use_cuda = torch.cuda.is_available() if cuda is None else bool(cuda)
    return run_extractor(extractor, images, batch_size, use_cuda, False)[layer]
