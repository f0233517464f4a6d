"""Nothing read from a file runs code: planted pickles in every weights and cache path, unregistered path classes.

Each planted file is a pickle whose ``__reduce__`` opens (creates) a marker file: unpickling it the unsafe way
(``torch.load(weights_only=False)``, ``numpy.load(allow_pickle=True)``) creates the marker, which
:func:`test_the_planted_pickle_is_live` checks, so "the marker does not exist" means the code never ran.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from ko_lightning.metrics.digits_features import (
    DigitsClassifier,
    digits_classifier_note_path,
    digits_classifier_path,
    load_digits_classifier,
)
from ko_lightning.metrics.fid import INCEPTION_WEIGHTS_SHA256, compute_fid_kid, extract_features
from ko_lightning.paths import (
    CondOTPath,
    GaussianPath,
    PathCoefficients,
    PolynomialPath,
    TabulatedPath,
    VPPath,
    register_path,
)
from ko_lightning.paths.serialization import path_from_state, path_to_state

pytestmark = pytest.mark.usefixtures("one_thread")


class _Payload:
    """Unpickling this creates ``marker`` (``open(marker, "a")``): the stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "a"))


def _plant(path: Path, marker: Path) -> None:
    """A torch file that runs the payload when loaded with ``weights_only=False``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": _Payload(marker), "info": {"heldout_accuracy": 1.0}}, path)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _digits(n: int = 120, seed: int = 0) -> Tensor:
    """Random 8 x 8 images in [0, 1] (the cache logic does not need real digits)."""
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def _untrained_classifier(path: Path) -> Path:
    """A digits classifier checkpoint with seeded random weights: a real feature extractor, no training."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DigitsClassifier()
    torch.save({"state_dict": model.state_dict(), "info": {"heldout_accuracy": float("nan")}}, path)
    return path


def test_the_planted_pickle_is_live(tmp_path: Path) -> None:
    """Control: the planted file does run its payload when loaded the unsafe way (so the other tests mean
    something)."""
    marker = tmp_path / "control-marker"
    _plant(tmp_path / "planted.pt", marker)
    assert not marker.exists()
    torch.load(tmp_path / "planted.pt", weights_only=False)
    assert marker.exists()


# ------------------------------------------------------------------------------------------- Inception weights
def test_inception_hash_is_checked_before_the_file_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    # The published name carries the first 8 hex digits of the file's SHA-256 (torch hub convention).
    assert URL_INCEPTION_V3.endswith(f"-{INCEPTION_WEIGHTS_SHA256[:8]}.pth")
    marker = tmp_path / "code-ran"
    planted = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    _plant(planted, marker)
    actual = _sha256(planted)
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    # The error names the file and both hashes.
    match = rf"weights_path='{re.escape(str(planted))}' has SHA-256 {actual}, expected {INCEPTION_WEIGHTS_SHA256}"
    with pytest.raises(ValueError, match=match):
        compute_fid_kid(
            images, images, feature_extractor="inception-v3-compat", weights_path=planted, kid=False, cuda=False
        )
    with pytest.raises(ValueError, match=match):
        extract_features(images, "inception-v3-compat", weights_path=planted, cuda=False)
    monkeypatch.setenv("KO_LIGHTNING_INCEPTION_WEIGHTS", str(planted))  # the environment variable: same check
    with pytest.raises(ValueError, match=match):
        compute_fid_kid(images, images, feature_extractor="inception-v3-compat", kid=False, cuda=False)
    assert not marker.exists()


def test_inception_file_with_a_trusted_hash_is_still_never_unpickled(tmp_path: Path) -> None:
    """Even a file whose hash the user vouches for is read with weights_only=True: a pickle is refused."""
    marker = tmp_path / "code-ran"
    planted = tmp_path / "my-inception.pth"
    _plant(planted, marker)
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    with pytest.raises(ValueError, match=rf"weights_path='{re.escape(str(planted))}' is not a readable Inception"):
        compute_fid_kid(
            images,
            images,
            feature_extractor="inception-v3-compat",
            weights_path=planted,
            weights_sha256=_sha256(planted),
            kid=False,
            cuda=False,
        )
    assert not marker.exists()
    with pytest.raises(ValueError, match="weights_sha256 must be 64 hexadecimal digits"):
        compute_fid_kid(
            images,
            images,
            feature_extractor="inception-v3-compat",
            weights_path=planted,
            weights_sha256="6726825d",
            kid=False,
            cuda=False,
        )


# --------------------------------------------------------------------------------------------- digits weights
def test_planted_digits_classifier_files_never_run(tmp_path: Path, fake_training: list[int]) -> None:
    calls = fake_training
    marker = tmp_path / "code-ran"
    load_digits_classifier(cache_dir=tmp_path)
    assert calls == [0]
    # An attacker replaces the cached file and forges its note (matching hash): it is refused and retrained.
    cached = digits_classifier_path(tmp_path)
    _plant(cached, marker)
    note_path = digits_classifier_note_path(cached)
    note = json.loads(note_path.read_text())
    note["file_sha256"] = _sha256(cached)
    note_path.write_text(json.dumps(note))
    with pytest.warns(UserWarning, match=rf"{re.escape(str(cached))}.*not a readable digits classifier"):
        model = load_digits_classifier(cache_dir=tmp_path)
    assert calls == [0, 0] and isinstance(model, DigitsClassifier)
    # A planted explicit weights_path is an error naming the file.
    planted = tmp_path / "planted-digits.pt"
    _plant(planted, marker)
    with pytest.raises(ValueError, match=rf"{re.escape(str(planted))}.*not a readable digits classifier"):
        load_digits_classifier(weights_path=planted)
    with pytest.raises(ValueError, match=rf"{re.escape(str(planted))}.*not a readable digits classifier"):
        compute_fid_kid(_digits(), _digits(seed=1), weights_path=planted, kid=False, cuda=False)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------- reference cache
def test_planted_pickles_in_the_reference_cache_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    weights = _untrained_classifier(tmp_path / "digits.pt")
    w12 = _sha256(weights)[:12]
    cache = tmp_path / "cache"
    root = cache / "fidelity"
    gen, ref = _digits(100, seed=0), _digits(100, seed=1)
    kwargs = {"cache_dir": cache, "weights_path": weights, "kid_subset_size": 50, "kid_subsets": 3, "cuda": False}
    # A complete entry in torch-fidelity's format (its *.pt are read with weights_only=False) plus the note that
    # ko_lightning 0.1 trusted: the features and statistics are planted pickles.
    stem = f"planted-{w12}-digits-classifier"
    for name in (f"{stem}-features-64.pt", f"{stem}-stat-fid-64.pt", f"{stem}-features-logits.pt"):
        _plant(root / name, marker)
    old_note = {"data_sha256": "0" * 64, "n_reference": 100, "shape": [1, 8, 8], "weights_sha256": _sha256(weights)}
    (root / f"{stem}-reference.json").write_text(json.dumps(old_note))
    with pytest.raises(ValueError, match="no cached features of reference_name='planted'"):
        compute_fid_kid(gen, None, reference_name="planted", **kwargs)
    fresh = compute_fid_kid(gen, ref, **kwargs)
    first = compute_fid_kid(gen, ref, reference_name="planted", **kwargs)
    assert first.fid == fresh.fid  # the planted files were not used
    assert not marker.exists()
    # Now a pickle inside the .npz itself (an object array), with a note forged to match its hash.
    note_path = root / f"{stem}-features-64-reference.json"
    note = json.loads(note_path.read_text())
    npz = root / note["file"]
    buffer = io.BytesIO()
    np.savez(buffer, features=np.array([_Payload(marker)], dtype=object), mu=np.zeros(64), sigma=np.eye(64))
    npz.write_bytes(buffer.getvalue())
    note["file_sha256"] = _sha256(npz)
    note_path.write_text(json.dumps(note))
    with pytest.raises(ValueError, match=rf"{re.escape(str(npz))}' is not a readable features archive"):
        compute_fid_kid(gen, None, reference_name="planted", **kwargs)
    with pytest.warns(UserWarning, match="rebuilding it"):
        rebuilt = compute_fid_kid(gen, ref, reference_name="planted", **kwargs)
    assert rebuilt.fid == fresh.fid
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ path classes
def test_an_unregistered_path_class_is_refused_and_nothing_is_imported(capsys: pytest.CaptureFixture) -> None:
    sys.modules.pop("this", None)  # "this" prints the Zen of Python when imported
    with pytest.raises(ValueError, match=r"path class 'this:s' is not registered.*@ko_lightning\.paths\.register_path"):
        path_from_state({"class": "this:s", "init": {}, "buffers": {}})
    assert "this" not in sys.modules
    assert capsys.readouterr().out == ""
    for name in ("os:system", "ko_lightning.paths.base:GaussianPath", "subprocess:Popen"):
        with pytest.raises(ValueError, match=re.escape(repr(name))):
            path_from_state({"class": name, "init": {"args": "echo hi"}})


def test_shipped_paths_round_trip_in_the_existing_format() -> None:
    # Checkpoints written before the registry name the class the same way and still load.
    old_state = {
        "class": "ko_lightning.paths.analytic:VPPath",
        "init": {"beta_min": 0.3, "beta_max": 7.0},
        "buffers": {},
    }
    vp = path_from_state(old_state)
    assert isinstance(vp, VPPath) and (vp.beta_min, vp.beta_max) == (0.3, 7.0)
    for path in (CondOTPath(), PolynomialPath(3.0), TabulatedPath.from_path(CondOTPath(), n=9)):
        state = path_to_state(path)
        assert state["class"] == f"{type(path).__module__}:{type(path).__qualname__}"
        t = torch.linspace(0.05, 0.95, 7)
        torch.testing.assert_close(path_from_state(state)(t).alpha, path(t).alpha)


def test_user_path_classes_load_once_registered() -> None:
    class SquarePath(GaussianPath):
        def __init__(self, scale: float = 1.0) -> None:
            super().__init__()
            self.scale = scale

        def coefficients(self, t: Tensor) -> PathCoefficients:
            return PolynomialPath(2.0).coefficients(t)

    with pytest.warns(UserWarning, match="is not registered"):
        state = path_to_state(SquarePath(2.0))
    with pytest.raises(ValueError, match="SquarePath' is not registered"):
        path_from_state(state)
    assert register_path(SquarePath) is SquarePath
    rebuilt = path_from_state(state)
    assert type(rebuilt) is SquarePath and rebuilt.scale == 2.0
    with pytest.raises(TypeError, match="subclass of GaussianPath"):
        register_path(dict)


def test_a_planted_training_checkpoint_runs_no_code_on_load_or_resume(tmp_path: Path) -> None:
    """``FlowMatching.load_from_checkpoint`` and ``Trainer.fit(ckpt_path=...)`` unpickle plain data only."""
    import lightning as L

    from ko_lightning import FlowMatching
    from ko_lightning.data import Toy2DDataModule
    from ko_lightning.nets import TimeMLP

    def model() -> FlowMatching:
        return FlowMatching(TimeMLP(dim=2, hidden=16, depth=1))

    def trainer(steps: int) -> L.Trainer:
        return L.Trainer(
            max_steps=steps,
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            limit_val_batches=0,
            default_root_dir=tmp_path,
        )

    dm = Toy2DDataModule("moons", n_train=256, n_val=64, n_test=64, batch_size=64)
    fit = trainer(2)
    fit.fit(model(), dm)
    fit.save_checkpoint(tmp_path / "clean.ckpt")
    FlowMatching.load_from_checkpoint(tmp_path / "clean.ckpt", net=TimeMLP(dim=2, hidden=16, depth=1))  # loads
    checkpoint = torch.load(tmp_path / "clean.ckpt", weights_only=True)
    marker = tmp_path / "marker"
    checkpoint["hyper_parameters"]["planted"] = _Payload(marker)
    torch.save(checkpoint, tmp_path / "planted.ckpt")
    with pytest.raises(Exception, match="(?i)weights.only|unpickl"):
        FlowMatching.load_from_checkpoint(tmp_path / "planted.ckpt", net=TimeMLP(dim=2, hidden=16, depth=1))
    with pytest.raises(Exception, match="(?i)weights.only|unpickl"):
        trainer(4).fit(model(), dm, ckpt_path=tmp_path / "planted.ckpt")
    assert not marker.exists()
