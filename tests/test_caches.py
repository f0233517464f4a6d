"""Caches that cannot lie: an entry is reused only when its note certifies its files and the data it came from.

Reference features (``<cache_dir>/fidelity``) and the digits classifier cache are exercised with fast stand-ins
(a classifier with seeded random weights passed as ``weights_path``; a monkeypatched training run), so no test
trains the real classifier. A stale, missing, truncated or corrupt part of an entry must lead to a rebuild (with a
warning naming the file) or an error naming the file, never to reused numbers.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor

from ko_lightning.metrics.digits_features import (
    DigitsClassifier,
    digits_classifier_note_path,
    digits_classifier_path,
    load_digits_classifier,
)
from ko_lightning.metrics.fid import FidKidResult, compute_fid_kid, extract_features, fid_from_features

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits() -> Tensor:
    """The 1797 sklearn digits as images in [0, 1], shape (N, 1, 8, 8)."""
    from sklearn.datasets import load_digits

    return torch.as_tensor(load_digits().data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    """A digits classifier checkpoint with seeded random weights (a real, deterministic feature map)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DigitsClassifier()
    path = tmp_path / "digits.pt"
    torch.save({"state_dict": model.state_dict(), "info": {"heldout_accuracy": float("nan")}}, path)
    return path


def _noisy(images: Tensor, std: float, seed: int) -> Tensor:
    return (images + std * torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))).clamp(0, 1)


def _metrics(gen: Tensor, ref: Tensor | None, weights: Path, cache: Path, name: str | None) -> FidKidResult:
    return compute_fid_kid(
        gen,
        ref,
        reference_name=name,
        cache_dir=cache,
        weights_path=weights,
        kid_subset_size=100,
        kid_subsets=5,
        cuda=False,
    )


def _entry(cache: Path, name: str) -> tuple[Path, Path]:
    """(note, features file) of the layer-64 entry of ``name``."""
    notes = list((cache / "fidelity").glob(f"{name}-*-features-64-reference.json"))
    assert len(notes) == 1, notes
    return notes[0], notes[0].parent / json.loads(notes[0].read_text())["file"]


def test_stale_features_without_their_note_are_not_reused(tmp_path: Path, digits: Tensor, weights: Path) -> None:
    """The reported failure: set A cached under a name, its note deleted, then set B under the same name."""
    gen, set_a, set_b = digits[:300], digits[300:600], _noisy(digits[300:600], 0.3, seed=1)
    truth_b = _metrics(gen, set_b, weights, tmp_path, None)  # no cache involved
    truth_a = _metrics(gen, set_a, weights, tmp_path, "ref")
    # The two sets are far apart: reusing A's features would be visible.
    assert abs(truth_a.fid - truth_b.fid) > 0.1 * truth_b.fid
    note, features = _entry(tmp_path, "ref")
    note.unlink()
    with pytest.raises(ValueError, match=rf"{re.escape(str(features))}' has no note.*delete"):
        _metrics(gen, None, weights, tmp_path, "ref")  # nothing certifies the file: not used
    with pytest.warns(UserWarning, match=rf"{re.escape(str(features))}' has no note.*rebuilding"):
        again = _metrics(gen, set_b, weights, tmp_path, "ref")
    # Same features, same code, same process: the rebuilt entry gives exactly the uncached numbers for B.
    assert again.fid == truth_b.fid and again.kid_mean == truth_b.kid_mean
    assert not features.exists()  # A's orphaned features are removed
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rebuilt entry is certified for B: reused silently
        cached = _metrics(gen, None, weights, tmp_path, "ref")
    assert cached.fid == truth_b.fid and cached.n_reference == 300


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _rehash(note: Path, features: Path) -> None:
    """Forge the note so that its hash matches the (damaged) features file: the archive check must still hold."""
    data = json.loads(note.read_text())
    data["file_sha256"] = hashlib.sha256(features.read_bytes()).hexdigest()
    note.write_text(json.dumps(data))


def _edit_note(**changes: object) -> Callable[[Path, Path], None]:
    def edit(note: Path, features: Path) -> None:
        data = json.loads(note.read_text())
        data.update(changes)
        note.write_text(json.dumps(data))

    return edit


CORRUPTIONS: dict[str, tuple[Callable[[Path, Path], None], str, str]] = {
    # name: (damage, file named in the message, what the message says)
    "truncated features": (lambda n, f: _truncate(f), "features", "has SHA-256 .* its note records"),
    "truncated features, forged hash": (
        lambda n, f: (_truncate(f), _rehash(n, f)),
        "features",
        "is not a readable features archive",
    ),
    "features deleted": (lambda n, f: f.unlink(), "features", "cannot be read"),
    "truncated note": (lambda n, f: _truncate(n), "note", "is not valid JSON"),
    "note not JSON": (lambda n, f: n.write_text("{'not': json"), "note", "is not valid JSON"),
    "note not an object": (lambda n, f: n.write_text("[1, 2]"), "note", "is not a JSON object"),
    "note names another file": (_edit_note(file="../../digits.pt"), "note", "names no valid features file"),
    "note for other weights": (_edit_note(weights_sha256="0" * 64), "note", "records weights_sha256"),
    "note without hash": (_edit_note(file_sha256=None), "note", "has no valid file_sha256"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_damaged_reference_entry_is_rebuilt_or_an_error_naming_the_file(
    tmp_path: Path, digits: Tensor, weights: Path, corruption: str
) -> None:
    damage, culprit, message = CORRUPTIONS[corruption]
    gen, ref = digits[:200], digits[200:400]
    first = _metrics(gen, ref, weights, tmp_path, "ref")
    note, features = _entry(tmp_path, "ref")
    damage(note, features)
    named = note if culprit == "note" else features
    with pytest.raises(ValueError, match=rf"cannot be trusted: .*{re.escape(str(named))}'.*{message}.*delete"):
        _metrics(gen, None, weights, tmp_path, "ref")
    with pytest.warns(UserWarning, match=rf"{re.escape(str(named))}'.*{message}.*rebuilding"):
        rebuilt = _metrics(gen, ref, weights, tmp_path, "ref")
    assert rebuilt.fid == first.fid and rebuilt.kid_mean == first.kid_mean
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _metrics(gen, None, weights, tmp_path, "ref").fid == first.fid


def test_a_valid_entry_is_reused_and_other_images_are_refused(tmp_path: Path, digits: Tensor, weights: Path) -> None:
    gen, ref = digits[:200], digits[200:400]
    first = _metrics(gen, ref, weights, tmp_path, "ref")
    note, features = _entry(tmp_path, "ref")
    record = json.loads(note.read_text())
    assert record["n_reference"] == 200 and record["shape"] == [1, 8, 8] and record["feature_layer"] == "64"
    assert features.name.startswith("ref-") and features.suffix == ".npz"
    stamp = features.stat().st_mtime_ns
    assert _metrics(gen, None, weights, tmp_path, "ref").fid == first.fid
    assert _metrics(gen, ref, weights, tmp_path, "ref").fid == first.fid
    assert features.stat().st_mtime_ns == stamp  # reused, not rewritten
    # The cached statistics give the FID of the features themselves (tested against scipy in test_fid.py): the
    # same float64 arithmetic on the same float32 features, so only round-off in the last bits could differ.
    direct = fid_from_features(
        extract_features(gen, weights_path=weights, cuda=False), extract_features(ref, weights_path=weights, cuda=False)
    )
    assert first.fid == pytest.approx(direct, rel=1e-12, abs=1e-15)
    with pytest.raises(ValueError, match="different reference images"):
        _metrics(gen, digits[400:600], weights, tmp_path, "ref")


# ------------------------------------------------------------------------------------------ digits classifier
def _classifier_entry(cache: Path) -> tuple[Path, Path]:
    weights = digits_classifier_path(cache)
    return digits_classifier_note_path(weights), weights


CLASSIFIER_CORRUPTIONS: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "note deleted": (lambda n, w: n.unlink(), "is missing"),
    "note not JSON": (lambda n, w: _truncate(n), "is not valid JSON"),
    "weights truncated": (lambda n, w: _truncate(w), "its SHA-256 is .* the note records"),
    "weights truncated, forged hash": (lambda n, w: (_truncate(w), _rehash(n, w)), "not a readable"),
    "weights deleted": (lambda n, w: w.unlink(), "No such file"),
    "other training data": (_edit_note(data_sha256="0" * 64), "records data_sha256"),
    "other seed": (_edit_note(seed=1), "records seed=1"),
}


@pytest.mark.parametrize("corruption", list(CLASSIFIER_CORRUPTIONS))
def test_the_digits_classifier_cache_is_retrained_unless_certified(
    tmp_path: Path, fake_training: list[int], corruption: str
) -> None:
    damage, message = CLASSIFIER_CORRUPTIONS[corruption]
    first = load_digits_classifier(cache_dir=tmp_path)
    note, weights = _classifier_entry(tmp_path)
    assert fake_training == [0] and note.is_file() and weights.is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = load_digits_classifier(cache_dir=tmp_path)  # certified: loaded, not retrained
    assert fake_training == [0]
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values(), strict=True))
    damage(note, weights)
    with pytest.warns(UserWarning, match=rf"{re.escape(str(weights))}' is not used .*{message}"):
        load_digits_classifier(cache_dir=tmp_path)
    assert fake_training == [0, 0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_digits_classifier(cache_dir=tmp_path)  # the rewritten entry is certified again
    assert fake_training == [0, 0]


def test_a_truncated_explicit_weights_file_is_an_error_naming_it(tmp_path: Path, weights: Path) -> None:
    _truncate(weights)
    with pytest.raises(ValueError, match=rf"{re.escape(str(weights))}' is not a readable digits classifier"):
        load_digits_classifier(weights_path=weights)
    images = torch.rand(10, 1, 8, 8)
    with pytest.raises(ValueError, match=rf"{re.escape(str(weights))}' is not a readable digits classifier"):
        compute_fid_kid(images, images, weights_path=weights, kid=False, cuda=False)
    # The same for Inception weights whose (truncated) bytes the caller vouches for with their hash.
    inception = tmp_path / "inception.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, inception)
    _truncate(inception)
    sha = hashlib.sha256(inception.read_bytes()).hexdigest()
    rgb = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    with pytest.raises(ValueError, match=rf"{re.escape(str(inception))}' is not a readable Inception state dict"):
        compute_fid_kid(
            rgb,
            rgb,
            feature_extractor="inception-v3-compat",
            weights_path=inception,
            weights_sha256=sha,
            kid=False,
            cuda=False,
        )


def test_under_ddp_a_cache_failure_on_one_rank_stops_every_rank(
    tmp_path: Path, digits: Tensor, weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rank whose cache entry is missing (e.g. a node-local cache) raises; the others must not go on to wait in
    the broadcast of the results. Two ranks are simulated: the collectives are replaced by their outcomes."""
    from ko_lightning.metrics import fid as fid_module

    flags: list[bool] = []
    broadcasts: list[list[float]] = []
    monkeypatch.setattr(fid_module, "_dist_active", lambda: True)
    monkeypatch.setattr(fid_module, "all_gather_samples", lambda x: x)
    monkeypatch.setattr(fid_module, "_broadcast_numbers", lambda v: broadcasts.append(v) or v)
    gen, ref = digits[:200], digits[200:400]
    kwargs = {"cache_dir": tmp_path, "weights_path": weights, "kid": False, "cuda": False, "gather_across_ranks": True}
    # The failing rank: its own error, after telling the others (the all-reduce sees True).
    monkeypatch.setattr(fid_module, "_any_rank", lambda flag: flags.append(flag) or flag)
    with pytest.raises(ValueError, match="no cached features of reference_name='node-local'"):
        compute_fid_kid(gen, None, reference_name="node-local", **kwargs)
    assert flags == [False, True] and broadcasts == []  # (input check, outcome); no broadcast reached
    # A healthy rank while another failed (the second all-reduce, on the outcome, returns True): it stops too,
    # before the broadcast.
    flags.clear()
    monkeypatch.setattr(fid_module, "_any_rank", lambda flag: flags.append(flag) or len(flags) == 2)
    with pytest.raises(RuntimeError, match="failed on another rank"):
        compute_fid_kid(gen, ref, **kwargs)
    assert flags == [False, False] and broadcasts == []
