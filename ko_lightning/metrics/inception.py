"""torch-fidelity's TF-compatible Inception-v3, from a local, hash-checked weights file; nothing is downloaded.

The weights file (``weights-inception-2015-12-05-6726825d.pth``) is passed as ``weights_path`` or found through
``$KO_LIGHTNING_INCEPTION_WEIGHTS``. Its SHA-256 is checked against :data:`INCEPTION_WEIGHTS_SHA256` (or the hash
the user passes for a conversion of their own) *before* anything parses it (see
:func:`ko_lightning.metrics.extractors.read_verified_weights`); only then is it loaded, with
``torch.load(weights_only=True)``: tensors only, never code. torch-fidelity is imported only when the network is
built.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "INCEPTION_EXTRACTOR_NAME",
    "INCEPTION_FILE",
    "INCEPTION_WEIGHTS_ENV_VAR",
    "INCEPTION_WEIGHTS_SHA256",
    "inception_module",
    "inception_weights_file",
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

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
"""The official file name of the weights."""


def inception_weights_file(weights_path: str | Path | None) -> Path:
    """The local Inception weights file: ``weights_path``, else ``$KO_LIGHTNING_INCEPTION_WEIGHTS``.

    Args:
        weights_path: the file, or ``None`` to read the environment variable.

    Returns:
        The (existing) file's path, user-expanded.

    Raises:
        ValueError: if neither ``weights_path`` nor the environment variable is set; the message says where to get
            the file.
        FileNotFoundError: naming ``weights_path`` if the file does not exist (nothing is ever downloaded).
    """
    if weights_path is None:
        weights_path = os.environ.get(INCEPTION_WEIGHTS_ENV_VAR) or None
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    how = (
        f"FID/KID with feature_extractor={INCEPTION_EXTRACTOR_NAME!r} need torch-fidelity's Inception-v3 weights as a "
        f"local file ({INCEPTION_FILE}); nothing is downloaded at run time. On a machine with internet access "
        f"download {URL_INCEPTION_V3}, copy it here, and pass weights_path=... or set {INCEPTION_WEIGHTS_ENV_VAR}."
    )
    if weights_path is None:
        raise ValueError(f"weights_path is required for {INCEPTION_EXTRACTOR_NAME!r}. {how}")
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights file not found: weights_path={str(path)!r}. {how}")
    return path


def inception_module(data: bytes, path: Path, layers: list[str]) -> Any:
    """torch-fidelity's Inception-v3 with the weights in ``data`` (already hash-checked), loaded safely.

    Args:
        data: the bytes of the weights file, as hashed.
        path: the file they came from (for error messages).
        layers: the feature layers to provide (e.g. ``["2048", "logits_unbiased"]``).

    Returns:
        A torch-fidelity ``FeatureExtractorInceptionV3``.

    Raises:
        ValueError: naming ``path`` if the bytes are not a plain state dict (a pickle with code is refused) or do
            not fit the network.
    """
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
