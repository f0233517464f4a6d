"""Evaluation metrics: sample distances for low-dimensional data, FID/KID with torch-fidelity's networks, and the
kinetic energy of a trained model.

torch-fidelity (and torchvision) load only when an FID/KID is computed, so this import stays light. Nothing read
from disk can run code: weights load with ``torch.load(weights_only=True)`` after a SHA-256 check, cached
reference features are ``.npz`` files read with ``allow_pickle=False`` and certified by a JSON note.

Modules: :mod:`~ko_lightning.metrics.distances` (sliced Wasserstein, MMD), :mod:`~ko_lightning.metrics.fid`
(:func:`compute_fid_kid`, built from ``images``, ``extractors``, ``inception``, ``digits_features``, ``fid_math``,
``fid_cache``, ``distributed`` and ``files``), :mod:`~ko_lightning.metrics.model_energy` (the kinetic energy of a
trained velocity field along its own trajectories).
"""

from ko_lightning.metrics.digits_features import DigitsClassifier, load_digits_classifier, train_digits_classifier
from ko_lightning.metrics.distances import mmd_rbf, sliced_wasserstein
from ko_lightning.metrics.fid import (
    INCEPTION_EXTRACTOR_NAME,
    INCEPTION_WEIGHTS_ENV_VAR,
    INCEPTION_WEIGHTS_SHA256,
    FidKidResult,
    all_gather_samples,
    compute_fid_kid,
    extract_features,
    fid_from_features,
    kid_from_features,
    to_uint8_images,
)
from ko_lightning.metrics.model_energy import ModelKineticEnergy, model_kinetic_energy

__all__ = [
    "INCEPTION_EXTRACTOR_NAME",
    "INCEPTION_WEIGHTS_ENV_VAR",
    "INCEPTION_WEIGHTS_SHA256",
    "DigitsClassifier",
    "FidKidResult",
    "ModelKineticEnergy",
    "all_gather_samples",
    "compute_fid_kid",
    "extract_features",
    "fid_from_features",
    "kid_from_features",
    "load_digits_classifier",
    "mmd_rbf",
    "model_kinetic_energy",
    "sliced_wasserstein",
    "to_uint8_images",
    "train_digits_classifier",
]
