"""A small digits classifier whose hidden layer is the feature space of FID/KID on the sklearn digits.

Inception-v3 features mean little on 8 x 8 grayscale digits (and its weights are a 90 MB file we may not download),
so digits samples are compared in the feature space of a tiny convolutional classifier trained on the
scikit-learn digits themselves (bundled with sklearn: offline).

The classifier (:class:`DigitsClassifier`)::

    x in [0, 1], (B, 1, 8, 8)
    -> conv 3x3 (16) -> ReLU -> conv 3x3 (32) -> ReLU -> max-pool 2  # (B, 32, 4, 4)
    -> linear 512 -> 64 -> tanh                                      # "64": the FID/KID features
    -> linear 64 -> 10                                               # "logits": for the Inception Score

The feature layer uses tanh rather than ReLU: ReLU left about a third of the 64 units dead (zero variance, a
rank-deficient covariance); tanh keeps all 64 alive and bounded, which suits the Gaussian fit of FID.

Training (:func:`train_digits_classifier`) is deterministic: fixed seed, one CPU thread, full data set in memory,
Adam for a fixed number of epochs, no augmentation. A seeded 20 % of the 1797 images (359) is held out and the
held-out accuracy is stored in the checkpoint. Measured on CPU (torch 2.14, seed 0): held-out accuracy 0.9916
(356 / 359; seeds 1 and 2: 0.989 each), about 1 s of training on one idle core (3-7 s on a
busy shared 2-core machine).

On first use the classifier is trained and saved to ``<cache_dir>/digits_classifier_v1_seed<seed>.pt``, where
``cache_dir`` is, in order: the ``cache_dir`` argument, the ``KO_LIGHTNING_CACHE_DIR`` environment variable,
``$XDG_CACHE_HOME/ko_lightning``, ``~/.cache/ko_lightning``. Next to it a JSON note
(``digits_classifier_v1_seed<seed>.json``) records the SHA-256 of the ``.pt`` file and of the training data (the
sklearn digits), the seed and the format version. Later calls reuse the file only if the note is present, valid,
and matches both the file's bytes and the current data; otherwise (a missing, corrupt or mismatching note, a
truncated or tampered file) the classifier is retrained and the entry rewritten, with a warning naming the file.
The file is read once into memory, hashed, and loaded from those bytes with ``torch.load(weights_only=True)``, so
a planted pickle never runs code. Saves are atomic (temporary file, then rename), so ranks of a distributed job
training it at the same time never leave a partial file; a rank that finds a note and file from two different
writers retrains rather than trusting them.

The torch-fidelity adapter (:func:`register_digits_feature_extractor`) registers the classifier under the name
``"digits-classifier"`` with features ``"64"`` (default for FID, KID, PRC) and ``"logits"`` (default for ISC).
torch-fidelity is imported only when that function is called.

Example:
    >>> model = load_digits_classifier()  # doctest: +SKIP
    >>> model.heldout_accuracy  # doctest: +SKIP
    0.9916...
    >>> feats, logits = model(torch.rand(5, 1, 8, 8))  # doctest: +SKIP
    >>> feats.shape, logits.shape  # doctest: +SKIP
    (torch.Size([5, 64]), torch.Size([5, 10]))
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ko_lightning.metrics.files import atomic_write_bytes, sha256_bytes

__all__ = [
    "DIGITS_EXTRACTOR_NAME",
    "DigitsClassifier",
    "DigitsTrainingInfo",
    "default_cache_dir",
    "digits_classifier_note_path",
    "digits_classifier_path",
    "ensure_digits_classifier",
    "load_digits_classifier",
    "load_digits_classifier_with_sha256",
    "register_digits_feature_extractor",
    "train_digits_classifier",
]

DIGITS_EXTRACTOR_NAME = "digits-classifier"
"""Name of the digits feature extractor in torch-fidelity's registry."""

CACHE_ENV_VAR = "KO_LIGHTNING_CACHE_DIR"
"""Environment variable that overrides the default cache folder (``~/.cache/ko_lightning``)."""

_FORMAT_VERSION = 1  # bump when the architecture or the training recipe changes: it is part of the file name
_HELDOUT_FRACTION = 0.2
_EPOCHS = 15
_BATCH_SIZE = 64
_LR = 2e-3
_FEATURE_DIM = 64


def default_cache_dir() -> Path:
    """The cache folder: ``$KO_LIGHTNING_CACHE_DIR``, else ``$XDG_CACHE_HOME/ko_lightning``, else
    ``~/.cache/ko_lightning`` (not created here)."""
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "ko_lightning"


def digits_classifier_path(cache_dir: str | Path | None = None, seed: int = 0) -> Path:
    """Where the classifier trained with ``seed`` is (or will be) stored, e.g.
    ``<cache_dir>/digits_classifier_v1_seed0.pt``."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / f"digits_classifier_v{_FORMAT_VERSION}_seed{int(seed)}.pt"


def _to_unit_float(x: Tensor) -> Tensor:
    """uint8 pixels in [0, 255] -> float in [0, 1]; float input is taken to be in [0, 1] already."""
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    if not x.is_floating_point():
        raise ValueError(f"DigitsClassifier expects uint8 or floating point images, got dtype {x.dtype}")
    return x.float()


class DigitsClassifier(nn.Module):
    """A small CNN for 8 x 8 digits; ``forward`` returns ``(features, logits)``.

    ``features`` is the 64-d penultimate layer (after tanh, so in ``(-1, 1)``), the space in which FID and KID
    compare digits; ``logits`` are the 10 class scores. Inputs are ``(B, 1, 8, 8)`` images, uint8 in ``[0, 255]``
    or float in ``[0, 1]`` (0 = background, as :meth:`ko_lightning.data.DigitsDataModule.to_display` returns
    them); inside, pixels are mapped to ``2 x - 1``.

    Example:
        >>> model = DigitsClassifier()
        >>> features, logits = model(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
        >>> features.shape, logits.shape
        (torch.Size([2, 64]), torch.Size([2, 10]))

    Attributes:
        heldout_accuracy: accuracy on the held-out split measured at training time (``nan`` if unknown).
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, _FEATURE_DIM), nn.Tanh())
        self.head = nn.Linear(_FEATURE_DIM, 10)
        self.heldout_accuracy = float("nan")

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Images ``(B, 1, 8, 8)`` -> ``(features (B, 64), logits (B, 10))``."""
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, 8, 8):
            raise ValueError(f"DigitsClassifier expects images of shape (B, 1, 8, 8), got {tuple(x.shape)}")
        h = self.hidden(self.conv(_to_unit_float(x) * 2.0 - 1.0))
        return h, self.head(h)


@dataclass(frozen=True)
class DigitsTrainingInfo:
    """What :func:`train_digits_classifier` measured.

    Attributes:
        seed: the training seed (split, initialization and shuffling).
        heldout_accuracy: accuracy on the held-out images.
        n_train: number of training images.
        n_heldout: number of held-out images.
        epochs: training epochs.
        train_seconds: wall-clock training time.
    """

    seed: int
    heldout_accuracy: float
    n_train: int
    n_heldout: int
    epochs: int
    train_seconds: float


def _digits_unit_images() -> tuple[Tensor, Tensor]:
    """All 1797 sklearn digits as float images in [0, 1] of shape (N, 1, 8, 8), and their labels."""
    from sklearn.datasets import load_digits  # bundled with sklearn: no download

    bunch = load_digits()
    images = torch.as_tensor(bunch.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    # Round through uint8, the form in which FID sees images, so training and evaluation inputs match exactly.
    images = (images * 255.0).round() / 255.0
    return images, torch.as_tensor(bunch.target, dtype=torch.long)


def train_digits_classifier(seed: int = 0) -> tuple[DigitsClassifier, DigitsTrainingInfo]:
    """Train :class:`DigitsClassifier` on the sklearn digits, deterministically.

    A permutation seeded by ``seed`` holds out 20 % of the images (359 of 1797); the rest are used for
    ``15`` epochs of Adam (lr ``2e-3``, batch 64, cross-entropy). Everything runs on the CPU with one thread and
    a private random state (the global RNG and thread count are restored afterwards), so two calls with the same
    seed return bit-identical weights on the same machine and torch build.

    Args:
        seed: seed of the split, the initialization and the batch order.

    Returns:
        The trained model (in eval mode, ``heldout_accuracy`` set) and a :class:`DigitsTrainingInfo`.
    """
    images, labels = _digits_unit_images()
    order = torch.as_tensor(np.random.default_rng(seed).permutation(images.shape[0]))
    n_heldout = round(_HELDOUT_FRACTION * images.shape[0])
    heldout, train = order[:n_heldout], order[n_heldout:]
    x_train, y_train = images[train], labels[train]

    threads = torch.get_num_threads()
    start = time.perf_counter()
    try:
        torch.set_num_threads(1)  # one thread: reductions in a fixed order, hence reproducible weights
        with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
            torch.manual_seed(seed)
            model = DigitsClassifier()
            optimizer = torch.optim.Adam(model.parameters(), lr=_LR)
            generator = torch.Generator().manual_seed(seed)
            model.train()
            for _ in range(_EPOCHS):
                perm = torch.randperm(x_train.shape[0], generator=generator)
                for i in range(0, x_train.shape[0], _BATCH_SIZE):
                    idx = perm[i : i + _BATCH_SIZE]
                    _, logits = model(x_train[idx])
                    loss = nn.functional.cross_entropy(logits, y_train[idx])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
            model.eval()
            with torch.no_grad():
                _, logits = model(images[heldout])
            accuracy = float((logits.argmax(dim=1) == labels[heldout]).float().mean())
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - start
    model.heldout_accuracy = accuracy
    model.requires_grad_(False)
    info = DigitsTrainingInfo(
        seed=seed,
        heldout_accuracy=accuracy,
        n_train=int(train.numel()),
        n_heldout=n_heldout,
        epochs=_EPOCHS,
        train_seconds=seconds,
    )
    return model, info


_NOTE_FORMAT = "ko_lightning.digits_classifier/1"


def digits_classifier_note_path(weights: Path) -> Path:
    """The JSON note that certifies a cached classifier file (same name, ``.json`` suffix)."""
    return weights.with_suffix(".json")


@functools.cache
def _digits_data_sha256() -> str:
    """SHA-256 of the training data (the sklearn digits images and labels, as the classifier sees them)."""
    images, labels = _digits_unit_images()
    digest = hashlib.sha256(str(tuple(images.shape)).encode())
    digest.update(images.numpy().tobytes())
    digest.update(labels.numpy().tobytes())
    return digest.hexdigest()


def _classifier_from_bytes(data: bytes, path: Path) -> DigitsClassifier:
    """Load a checkpoint from its bytes (``weights_only=True``: tensors and plain containers, never code).

    Raises:
        ValueError: naming ``path`` if the bytes are not a readable classifier checkpoint.
    """
    try:
        checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        model = DigitsClassifier()
        model.load_state_dict(checkpoint["state_dict"])
        model.heldout_accuracy = float(checkpoint["info"]["heldout_accuracy"])
    except Exception as exc:  # truncated zip, planted pickle (refused), wrong keys or shapes: all one answer
        raise ValueError(
            f"{str(path)!r} is not a readable digits classifier checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc
    model.requires_grad_(False)
    return model.eval()


class _StaleCache(Exception):
    """A cache entry that cannot be trusted; the message says why."""


def _read_cached(path: Path, seed: int) -> tuple[DigitsClassifier, str]:
    """The cached classifier and its file's SHA-256, if its note certifies it; else ``_StaleCache(reason)``."""
    note_path = digits_classifier_note_path(path)
    if not note_path.is_file():
        raise _StaleCache(f"its note {str(note_path)!r} is missing")
    try:
        note = json.loads(note_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise _StaleCache(f"its note {str(note_path)!r} is not valid JSON ({exc})") from exc
    expected = {
        "format": _NOTE_FORMAT,
        "version": _FORMAT_VERSION,
        "seed": int(seed),
        "data_sha256": _digits_data_sha256(),
    }
    if not isinstance(note, dict) or not isinstance(note.get("file_sha256"), str):
        raise _StaleCache(f"its note {str(note_path)!r} has no file_sha256")
    for key, value in expected.items():
        if note.get(key) != value:
            raise _StaleCache(f"its note {str(note_path)!r} records {key}={note.get(key)!r}, expected {value!r}")
    data = path.read_bytes()
    actual = sha256_bytes(data)
    if actual != note["file_sha256"]:
        raise _StaleCache(f"its SHA-256 is {actual}, the note records {note['file_sha256']}")
    try:
        return _classifier_from_bytes(data, path), actual
    except ValueError as exc:
        raise _StaleCache(str(exc)) from exc


def _train_and_cache(path: Path, seed: int) -> tuple[DigitsClassifier, str]:
    """Train, write the checkpoint and then the note that certifies it; return the model and the file's hash."""
    model, info = train_digits_classifier(seed)
    buffer = io.BytesIO()
    torch.save({"state_dict": model.state_dict(), "info": vars(info) | {"version": _FORMAT_VERSION}}, buffer)
    data = buffer.getvalue()
    file_sha256 = sha256_bytes(data)
    atomic_write_bytes(data, path)
    note = {
        "format": _NOTE_FORMAT,
        "file": path.name,
        "file_sha256": file_sha256,
        "data_sha256": _digits_data_sha256(),
        "seed": int(seed),
        "version": _FORMAT_VERSION,
        "heldout_accuracy": info.heldout_accuracy,
        "torch_version": torch.__version__,
    }
    # The note goes last: a crash in between leaves a file without a note, which is rebuilt, never trusted.
    atomic_write_bytes(json.dumps(note, indent=1).encode(), digits_classifier_note_path(path))
    return model, file_sha256


def load_digits_classifier_with_sha256(
    cache_dir: str | Path | None = None, seed: int = 0, weights_path: str | Path | None = None, retrain: bool = False
) -> tuple[DigitsClassifier, str]:
    """Like :func:`load_digits_classifier`, and also return the SHA-256 of the weights file the model came from
    (the bytes that were hashed are the bytes that were loaded)."""
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"weights_path={str(path)!r} does not exist; pass weights_path=None to train the digits classifier "
                "into the cache folder on first use"
            )
        data = path.read_bytes()
        return _classifier_from_bytes(data, path), sha256_bytes(data)
    path = digits_classifier_path(cache_dir, seed)
    if not retrain and (path.is_file() or digits_classifier_note_path(path).is_file()):
        try:
            return _read_cached(path, seed)
        except (_StaleCache, OSError) as exc:
            warnings.warn(
                f"the cached digits classifier {str(path)!r} is not used ({exc}); retraining it (about a second) "
                "and rewriting the cache entry",
                stacklevel=3,
            )
    return _train_and_cache(path, seed)


def load_digits_classifier(
    cache_dir: str | Path | None = None, seed: int = 0, weights_path: str | Path | None = None, retrain: bool = False
) -> DigitsClassifier:
    """The digits classifier: loaded from the cache, or trained on first use and cached.

    A cached file is used only when its JSON note certifies it (SHA-256 of the file and of the training data);
    otherwise it is retrained and rewritten, with a warning (see the module docstring). Every file is loaded with
    ``torch.load(weights_only=True)``.

    Args:
        cache_dir: cache folder (default :func:`default_cache_dir`).
        seed: training seed; each seed has its own cache file.
        weights_path: load this checkpoint instead (a file written by this function); it must exist.
        retrain: train again and overwrite the cached file.

    Returns:
        The classifier in eval mode, on the CPU, with ``requires_grad`` off.

    Raises:
        FileNotFoundError: naming ``weights_path`` if it is given and does not exist.
        ValueError: naming ``weights_path`` if it is not a readable classifier checkpoint.
    """
    return load_digits_classifier_with_sha256(cache_dir, seed, weights_path, retrain)[0]


def ensure_digits_classifier(cache_dir: str | Path | None = None, seed: int = 0) -> Path:
    """Make sure the cached classifier file exists and is certified by its note (training it if needed); return
    its path."""
    load_digits_classifier_with_sha256(cache_dir, seed)
    return digits_classifier_path(cache_dir, seed)


@functools.cache
def _fidelity_extractor_class() -> type:
    """Build the torch-fidelity adapter class (deferred so that importing this module does not import
    torch-fidelity and torchvision)."""
    from torch_fidelity import FeatureExtractorBase

    class DigitsFeatureExtractor(FeatureExtractorBase):
        """torch-fidelity feature extractor around :class:`DigitsClassifier` (features ``"64"``, ``"logits"``)."""

        # torch-fidelity passes every calculate_metrics option as a keyword; the ones this extractor does not use
        # must be accepted and ignored, hence **kwargs here (the public ko_lightning API has no such catch-all).
        def __init__(
            self,
            name: str,
            features_list: list[str],
            feature_extractor_weights_path: str | None = None,
            model: DigitsClassifier | None = None,
            **kwargs: Any,
        ) -> None:
            super().__init__(name, features_list)
            # ``model``: an already loaded classifier (ko_lightning passes the one whose file bytes it hashed).
            if model is None:
                model = load_digits_classifier(weights_path=feature_extractor_weights_path)
            self.model = model

        @staticmethod
        def get_provided_features_list() -> tuple[str, ...]:
            return ("64", "logits")

        @staticmethod
        def get_default_feature_layer_for_metric(metric: str) -> str:
            return {"isc": "logits", "fid": "64", "kid": "64", "prc": "64"}[metric]

        @staticmethod
        def can_be_compiled() -> bool:
            return False

        @staticmethod
        def get_dummy_input_for_compile() -> Tensor:
            return torch.zeros(1, 1, 8, 8, dtype=torch.uint8)

        def forward(self, x: Tensor) -> tuple[Tensor, ...]:
            features, logits = self.model(x)
            out = {"64": features, "logits": logits}
            return tuple(out[name] for name in self.features_list)

    return DigitsFeatureExtractor


def register_digits_feature_extractor() -> str:
    """Register the digits classifier with torch-fidelity as ``"digits-classifier"`` (idempotent).

    torch-fidelity then builds it with ``feature_extractor="digits-classifier"`` and loads the checkpoint given as
    ``feature_extractor_weights_path`` (a file from :func:`ensure_digits_classifier`; with ``None`` the default
    cache file, trained if missing).

    Returns:
        The registered name.
    """
    from torch_fidelity import register_feature_extractor
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if DIGITS_EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(DIGITS_EXTRACTOR_NAME, _fidelity_extractor_class())
    return DIGITS_EXTRACTOR_NAME
