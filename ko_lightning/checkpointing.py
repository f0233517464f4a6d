"""What FlowMatching keeps in a checkpoint besides the weights (the path, the data shape, the noise seed), and the
checks that a checkpoint file is complete and was saved by a compatible module."""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from typing import Any

from ko_lightning.conditioning import Conditioning
from ko_lightning.likelihood import PixelMap
from ko_lightning.paths import GaussianPath
from ko_lightning.paths.serialization import path_from_state, path_to_state

__all__ = [
    "CHECKPOINT_KEY",
    "ModuleState",
    "check_checkpoint_file",
    "missing_state_message",
    "read_module_state",
    "write_module_state",
]

#: the checkpoint entry that holds :class:`ModuleState`.
CHECKPOINT_KEY = "ko_lightning"


@dataclass(frozen=True)
class ModuleState:
    """The schedule state a checkpoint restores.

    Attributes:
        path: the Gaussian path the model was trained on.
        data_shape: the shape of one sample, or None if the model had seen none.
        train_seed: the seed of the training noise stream, or None (an older checkpoint).
    """

    path: GaussianPath
    data_shape: tuple[int, ...] | None
    train_seed: int | None
    pixel_map: PixelMap | None = None


def write_module_state(
    checkpoint: dict[str, Any],
    path: GaussianPath,
    data_shape: tuple[int, ...] | None,
    parametrization: str,
    train_seed: int,
    conditioning: Conditioning | None = None,
    pixel_map: PixelMap | None = None,
) -> None:
    """Add the path (as plain tensors and strings), data shape, parametrization, noise seed, the network's
    conditioning (``num_classes`` / ``cond_dim``) and the data's pixel map (for bits/dim in data units) to
    ``checkpoint`` under :data:`CHECKPOINT_KEY` (merged into an entry that is already there)."""
    state = checkpoint.setdefault(CHECKPOINT_KEY, {})
    state["path"] = path_to_state(path)
    state["data_shape"] = data_shape
    state["parametrization"] = parametrization
    state["train_seed"] = train_seed
    conditioning = conditioning or Conditioning()
    state["conditioning"] = {"num_classes": conditioning.num_classes, "cond_dim": conditioning.cond_dim}
    state["pixel_map"] = None if pixel_map is None else pixel_map.to_state()


def _check_conditioning(saved: Any, conditioning: Conditioning) -> None:
    """A checkpoint's conditioning must be the network's (older checkpoints, without one, were unconditional)."""
    saved = saved if isinstance(saved, dict) else {}
    before = Conditioning(saved.get("num_classes"), saved.get("cond_dim"))
    if before != conditioning:
        raise ValueError(
            f"the checkpoint was saved from a network with {before.describe()}, but this FlowMatching's network has "
            f"{conditioning.describe()}: build the network with the checkpoint's num_classes / cond_dim"
        )


def read_module_state(
    checkpoint: dict[str, Any], parametrization: str, conditioning: Conditioning | None = None
) -> ModuleState | None:
    """The state :func:`write_module_state` saved, after checking that it fits a module with ``parametrization``.

    Everything is checked before the caller changes anything, so a rejected checkpoint leaves the module as it was.

    Returns:
        The saved state; None when the checkpoint has no :data:`CHECKPOINT_KEY` entry but only ``net.`` weights (an
        old or hand-made checkpoint: the caller warns with :func:`missing_state_message` and keeps its own state).

    Raises:
        ValueError: when there is no entry and the weights lie outside ``net.`` (the checkpoint comes from another
            module), the entry is malformed, it was saved with another parametrization (the network's output
            would be read as something else; the message names both), with another conditioning (``num_classes``
            / ``cond_dim``, both named), or its path or pixel map cannot be rebuilt.
    """
    state = checkpoint.get(CHECKPOINT_KEY)
    if state is None:
        weights = checkpoint.get("state_dict")
        foreign = sorted(k for k in weights if not k.startswith("net.")) if isinstance(weights, dict) else []
        if foreign:
            raise ValueError(
                f"this checkpoint was not saved by FlowMatching: it has no {CHECKPOINT_KEY!r} entry and its "
                f"state_dict holds {len(foreign)} entries outside 'net.' (e.g. {foreign[0]!r}); load it into "
                "the module class that saved it"
            )
        return None
    if not isinstance(state, dict) or "path" not in state:
        raise ValueError(
            f"the checkpoint's {CHECKPOINT_KEY!r} entry is malformed (expected a dict with a "
            f"'path'), got {type(state).__name__}"
        )
    saved = state.get("parametrization")
    if saved is not None and saved != parametrization:
        raise ValueError(
            f"the checkpoint was saved with parametrization={saved!r}, but this FlowMatching has "
            f"parametrization={parametrization!r}: its network predicts something else. Construct the "
            f"module with parametrization={saved!r} (load_from_checkpoint restores it unless overridden)"
        )
    _check_conditioning(state.get("conditioning"), conditioning or Conditioning())
    path = path_from_state(state["path"])  # may raise
    data_shape = state.get("data_shape")
    train_seed = state.get("train_seed")
    pixel_map = state.get("pixel_map")  # absent in older checkpoints
    return ModuleState(
        path=path,
        data_shape=None if data_shape is None else tuple(data_shape),
        train_seed=None if train_seed is None else int(train_seed),
        pixel_map=None if pixel_map is None else PixelMap.from_state(pixel_map),
    )


def missing_state_message(path: GaussianPath, data_shape: tuple[int, ...] | None) -> str:
    """The warning for a checkpoint without a :data:`CHECKPOINT_KEY` entry, naming the state the module keeps."""
    return (
        f"the checkpoint has no {CHECKPOINT_KEY!r} entry (saved by an older ko_lightning or edited by "
        f"hand): the weights load, but the path stays the constructor's {path!r} and data_shape stays "
        f"{data_shape}; if the model was trained on another path, pass it as path=... or call "
        "set_path()"
    )


def check_checkpoint_file(checkpoint_path: Any) -> None:
    """Check that a local checkpoint file exists and is a complete torch checkpoint, before Lightning reads it.

    A complete file is a zip archive (torch.save's format since torch 1.6; the end of the file holds the archive's
    directory, so a truncated file fails this check) or a legacy pickle. Remote URLs and file objects are left to
    Lightning.

    Raises:
        FileNotFoundError: naming the file, when it does not exist.
        ValueError: naming the file and its size, when it is truncated or corrupt.
    """
    if not isinstance(checkpoint_path, (str, os.PathLike)) or "://" in str(checkpoint_path):
        return
    path = os.fspath(checkpoint_path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint file {path!r} does not exist")
    if not os.path.isfile(path) or zipfile.is_zipfile(path):
        return
    with open(path, "rb") as handle:
        legacy = handle.read(1) == b"\x80"  # the pickle protocol opcode that starts a legacy torch.save file
    if not legacy:
        raise ValueError(
            f"checkpoint file {path!r} ({os.path.getsize(path)} bytes) is not a complete torch checkpoint (no zip "
            "central directory): it is truncated or corrupt, e.g. from an interrupted save or copy"
        )
