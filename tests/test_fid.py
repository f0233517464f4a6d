"""FID/KID through torch-fidelity: the digits feature extractor, reference caching, errors and the DDP gather.

Offline and CPU-only: the digits classifier is trained once per session into a temporary cache folder, and the
Inception path is exercised with a randomly initialized weights file written here (no download).
"""

from __future__ import annotations

import hashlib
import math
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import Tensor

from ko_lightning.data import DigitsDataModule
from ko_lightning.metrics.digits_features import (
    load_digits_classifier,
    register_digits_feature_extractor,
    train_digits_classifier,
)
from ko_lightning.metrics.fid import (
    all_gather_samples,
    compute_fid_kid,
    extract_features,
    fid_from_features,
    kid_from_features,
    to_uint8_images,
)

MIN_HELDOUT_ACCURACY = 0.97  # measured 0.992 (seed 0); a broken classifier or split would fall well below


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    """One intra-op thread (torch and BLAS): on a small, shared CPU, spinning thread pools made these tiny
    workloads up to 100x slower."""
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private cache folder holding the digits classifier, trained once for the whole session."""
    root = tmp_path_factory.mktemp("ko_cache")
    load_digits_classifier(cache_dir=root)
    return root


@pytest.fixture(scope="session")
def digits() -> dict[str, Tensor]:
    """The digits test and train splits as images in [0, 1]."""
    dm = DigitsDataModule()
    dm.setup()
    return {"test": dm.to_display(dm.test_tensor()), "train": dm.to_display(dm.train_tensor())}


def _noisy(images: Tensor, std: float, seed: int = 0) -> Tensor:
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    return (images + std * noise).clamp(0.0, 1.0)


# ------------------------------------------------------------------------------------------ classifier
def test_classifier_is_accurate_and_training_is_deterministic(cache_dir: Path) -> None:
    cached = load_digits_classifier(cache_dir=cache_dir)  # trained by the fixture, in this process
    model, info = train_digits_classifier(seed=0)  # a second training run
    assert info.n_train + info.n_heldout == 1797 and info.n_heldout == 359
    assert info.heldout_accuracy >= MIN_HELDOUT_ACCURACY
    assert cached.heldout_accuracy == info.heldout_accuracy
    a, b = cached.state_dict(), model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "two training runs with the same seed gave different weights"
    feats, logits = model(torch.zeros(3, 1, 8, 8, dtype=torch.uint8))
    assert feats.shape == (3, 64) and logits.shape == (3, 10)


def test_digits_extractor_is_registered_with_torch_fidelity() -> None:
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    name = register_digits_feature_extractor()
    assert register_digits_feature_extractor() == name  # idempotent
    assert FEATURE_EXTRACTORS_REGISTRY[name].get_default_feature_layer_for_metric("fid") == "64"


# ------------------------------------------------------------------------------------------------- FID
def test_identical_sets_have_zero_fid(cache_dir: Path, digits: dict[str, Tensor]) -> None:
    test = digits["test"]
    result = compute_fid_kid(test, test.clone(), cache_dir=cache_dir, kid_subset_size=50, cuda=False)
    assert abs(result.fid) < 1e-6
    assert result.n_generated == result.n_reference == 180
    assert result.kid_mean is not None and abs(result.kid_mean) < 0.2 and result.kid_std is not None
    # uint8 input is taken as is: the same images as uint8 give the same (zero) FID against the float version.
    as_uint8 = to_uint8_images(test)
    assert as_uint8.dtype == torch.uint8
    again = compute_fid_kid(as_uint8, test, cache_dir=cache_dir, kid=False, isc=True, cuda=False)
    assert abs(again.fid) < 1e-6 and again.kid_mean is None
    # Real digits of all ten classes, classified confidently: an Inception Score well above 1 and at most 10.
    assert again.isc_mean is not None and 5.0 < again.isc_mean <= 10.0


def test_fid_grows_monotonically_with_noise(cache_dir: Path, digits: dict[str, Tensor]) -> None:
    levels = [0.0, 0.1, 0.2, 0.3, 0.5]
    fids = [
        compute_fid_kid(
            _noisy(digits["test"], s),
            digits["train"],
            reference_name="digits-train",
            cache_dir=cache_dir,
            kid=False,
            cuda=False,
        ).fid
        for s in levels
    ]
    assert all(b > a for a, b in zip(fids[:-1], fids[1:], strict=True)), fids
    assert fids[-1] > 2.0 * fids[0]
    # The clean held-out split is close to the training split, but not identical.
    assert 0.0 < fids[0] < 5.0


def _scipy_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2.0 * covmean))


def _numpy_unbiased_kid(f1: np.ndarray, f2: np.ndarray) -> float:
    d, m = f1.shape[1], f1.shape[0]
    k = lambda a, b: (a @ b.T / d + 1.0) ** 3  # noqa: E731
    kxx, kyy, kxy = k(f1, f1), k(f2, f2), k(f1, f2)
    return float(
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()
    )


def test_fid_and_kid_agree_with_an_independent_computation(cache_dir: Path, digits: dict[str, Tensor]) -> None:
    clean, noisy = digits["test"], _noisy(digits["test"], 0.3, seed=1)
    f1 = extract_features(clean, cache_dir=cache_dir, cuda=False)
    f2 = extract_features(noisy, cache_dir=cache_dir, cuda=False)
    assert f1.shape == (180, 64) and f1.dtype == torch.float32
    expected = _scipy_fid(f1.double().numpy(), f2.double().numpy())
    assert expected > 0.1  # a non-trivial case
    assert fid_from_features(f1, f2) == pytest.approx(expected, rel=1e-6, abs=1e-9)
    # The full pipeline (images -> torch-fidelity -> FID) gives the same number.
    result = compute_fid_kid(clean, noisy, cache_dir=cache_dir, kid_subset_size=180, kid_subsets=1, cuda=False)
    assert result.fid == pytest.approx(expected, rel=1e-4)
    # One KID subset of all 180 samples is a permutation of each set: exactly the unbiased MMD^2 of the two sets.
    expected_kid = _numpy_unbiased_kid(f1.double().numpy(), f2.double().numpy())
    assert kid_from_features(f1, f2, kid_subset_size=180, kid_subsets=1)[0] == pytest.approx(expected_kid, rel=1e-6)
    assert result.kid_mean == pytest.approx(expected_kid, rel=1e-3)


# ------------------------------------------------------------------------------------------- caching
def test_reference_statistics_are_cached_by_name(cache_dir: Path, digits: dict[str, Tensor]) -> None:
    gen, ref = _noisy(digits["test"], 0.2), digits["test"]
    kwargs = dict(reference_name="digits-test", cache_dir=cache_dir, kid_subset_size=100, cuda=False)
    first = compute_fid_kid(gen, ref, **kwargs)
    cached = compute_fid_kid(gen, None, **kwargs)
    assert cached.fid == first.fid and cached.kid_mean == first.kid_mean
    assert cached.n_reference == 180 and cached.reference_name == "digits-test"
    files = sorted(p.name for p in (cache_dir / "fidelity").iterdir() if p.name.startswith("digits-test-"))
    assert any("features-64" in f for f in files) and any(f.endswith("reference.json") for f in files)
    # The same name with other images is refused, not silently answered from the stale cache.
    with pytest.raises(ValueError, match="different reference images"):
        compute_fid_kid(gen, digits["train"], reference_name="digits-test", cache_dir=cache_dir, kid=False, cuda=False)
    with pytest.raises(ValueError, match="no cached features of reference_name='never-computed'"):
        compute_fid_kid(gen, None, reference_name="never-computed", cache_dir=cache_dir, kid=False, cuda=False)
    with pytest.raises(ValueError, match="reference_name must be"):
        compute_fid_kid(gen, ref, reference_name="../escape", cache_dir=cache_dir, kid=False, cuda=False)


# -------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("generated", "reference", "match"),
    [
        (torch.full((10, 1, 8, 8), 1.5), None, r"generated has values in \[1\.5, 1\.5\], outside value_range"),
        (torch.full((10, 1, 8, 8), -0.2), None, r"generated has values .* outside value_range"),
        (torch.ones(10, 1, 8, 8, dtype=torch.int64), None, "generated must be uint8 .* got dtype torch.int64"),
        (torch.full((10, 1, 8, 8), float("nan")), None, "generated contains NaN"),
        (torch.rand(10, 8, 8), None, r"generated must have shape \(N, C, H, W\)"),
        (torch.rand(10, 3, 8, 8), None, r"generated must have shape \(N, 1, 8, 8\)"),
        (torch.rand(10, 1, 8, 8), torch.full((10, 1, 8, 8), 2.0), "reference has values"),
        (torch.rand(10, 1, 8, 8), torch.rand(10, 1, 8, 8).half() * 300, "reference has values"),
    ],
)
def test_bad_images_raise_errors_naming_the_argument(
    cache_dir: Path, generated: Tensor, reference: Tensor | None, match: str
) -> None:
    ref = torch.rand(10, 1, 8, 8) if reference is None else reference
    with pytest.raises(ValueError, match=match):
        compute_fid_kid(generated, ref, cache_dir=cache_dir, kid=False, cuda=False)


def test_float_images_are_quantized_like_8_bit_pngs() -> None:
    x = torch.tensor([0.0, 0.2, 0.5, 1.0]).reshape(1, 1, 2, 2)
    assert to_uint8_images(x).flatten().tolist() == [0, 51, 128, 255]
    assert to_uint8_images(2.0 * x - 1.0, value_range=(-1.0, 1.0)).flatten().tolist() == [0, 51, 128, 255]
    u = torch.tensor([[[[3, 200]]]], dtype=torch.uint8)
    assert torch.equal(to_uint8_images(u), u)  # uint8 is taken as is
    with pytest.raises(ValueError, match="value_range must be"):
        to_uint8_images(x, value_range=(1.0, 0.0))


def test_too_few_samples_for_the_kid_subset(cache_dir: Path, digits: dict[str, Tensor]) -> None:
    with pytest.raises(ValueError, match=r"kid_subset_size=500 exceeds .*generated: 180, reference: 1437"):
        compute_fid_kid(digits["test"], digits["train"], cache_dir=cache_dir, kid_subset_size=500, cuda=False)
    with pytest.raises(ValueError, match=r"kid_subset_size=1000 exceeds .*generated: 180"):
        kid_from_features(torch.randn(180, 4), torch.randn(2000, 4), kid_subset_size=1000)
    with pytest.raises(ValueError, match="kid_subset_size must be a positive int"):
        compute_fid_kid(digits["test"], digits["test"], cache_dir=cache_dir, kid_subset_size=0, cuda=False)


def test_missing_inception_weights_are_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KO_LIGHTNING_INCEPTION_WEIGHTS", raising=False)
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    missing = tmp_path / "no" / "weights-inception.pth"
    with pytest.raises(FileNotFoundError, match=r"weights_path='.*no/weights-inception\.pth'.*download https://"):
        compute_fid_kid(images, images, feature_extractor="inception-v3-compat", weights_path=missing, kid=False)
    with pytest.raises(ValueError, match="weights_path is required"):
        compute_fid_kid(images, images, feature_extractor="inception-v3-compat", kid=False)
    monkeypatch.setenv("KO_LIGHTNING_INCEPTION_WEIGHTS", str(missing))  # the env var is checked the same way
    with pytest.raises(FileNotFoundError, match="Inception weights file not found"):
        compute_fid_kid(images, images, feature_extractor="inception-v3-compat", kid=False)
    with pytest.raises(ValueError, match="feature_extractor must be one of"):
        compute_fid_kid(images, images, feature_extractor="inception", kid=False)


def _random_inception_weights(path: Path) -> None:
    """A randomly initialized (He-scaled) Inception state dict, built on the meta device: no download, no slow init."""
    import torch_fidelity.feature_extractor_inceptionv3 as inc

    with pytest.MonkeyPatch.context() as m:  # the constructor would otherwise fetch or read weights
        m.setattr(inc, "load_state_dict_from_url", lambda *args, **kwargs: None)
        m.setattr(inc.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state_dict: None)
        with torch.device("meta"):
            shapes = inc.FeatureExtractorInceptionV3("inception-v3-compat", ["64"]).state_dict()
    g = torch.Generator().manual_seed(0)
    state = {}
    for key, meta in shapes.items():
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "weight" and meta.ndim > 1:
            fan_in = meta[0].numel()
            state[key] = torch.randn(meta.shape, generator=g) * (2.0 / fan_in) ** 0.5
        elif leaf in ("weight", "running_var"):
            state[key] = torch.ones(meta.shape)
        else:
            state[key] = torch.zeros(meta.shape, dtype=meta.dtype)
    torch.save(state, path)


def test_inception_runs_from_a_local_weights_file(tmp_path: Path) -> None:
    weights = tmp_path / "inception.pth"
    _random_inception_weights(weights)
    # Not the published file: it is used only because its own hash is passed (the default is the published hash).
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    gray = torch.rand(4, 1, 12, 12, generator=torch.Generator().manual_seed(0))  # 1 channel: repeated to RGB
    result = compute_fid_kid(
        gray,
        1.0 - gray,
        feature_extractor="inception-v3-compat",
        weights_path=weights,
        weights_sha256=sha,
        feature_layer="64",
        kid_subset_size=4,
        cuda=False,
    )
    assert result.feature_layer == "64" and result.feature_extractor == "inception-v3-compat"
    assert math.isfinite(result.fid) and result.fid > 1e-4 and result.kid_mean is not None


# ---------------------------------------------------------------------------------------------- DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Fresh interpreters (not mp.spawn, which would re-import this module, scipy and Lightning in each child). The
# children exercise the collectives only; they never import torch-fidelity (slow), since the invalid-input path
# raises before any feature is extracted.
_DDP_SCRIPT = r"""
import sys
import torch
import torch.distributed as dist
from ko_lightning.metrics.fid import _broadcast_numbers, all_gather_samples, compute_fid_kid

rank, world, port, work = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
out = {}
try:
    out["gathered"] = all_gather_samples(torch.full((rank + 2, 3), float(rank)))  # 2 rows on rank 0, 3 on rank 1
    out["gathered_u8"] = all_gather_samples(torch.full((1, 1, 2, 2), rank + 7, dtype=torch.uint8))
    errors = []
    for bad in (torch.zeros(2, 3 + rank), torch.zeros(2, 3, dtype=torch.float64 if rank else torch.float32)):
        try:
            all_gather_samples(bad)
        except ValueError as exc:
            errors.append(str(exc))
    out["mismatch"] = errors
    out["broadcast"] = _broadcast_numbers([float(rank), 2.5])
    images = torch.rand(5, 1, 8, 8) * (3.0 if rank else 1.0)  # out of range on rank 1 only
    try:  # both ranks must raise, and neither may hang in a collective
        compute_fid_kid(images, images, kid=False, cuda=False, gather_across_ranks=True)
        out["bad_input"] = "no error"
    except ValueError as exc:
        out["bad_input"] = str(exc)
finally:
    torch.save(out, f"{work}/rank{rank}.pt")
    dist.destroy_process_group()
"""


def test_all_gather_samples_across_two_gloo_processes(tmp_path: Path) -> None:
    world, port = 2, _free_port()
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, *sys.path]), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _DDP_SCRIPT, str(r), str(world), str(port), str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]
    try:
        logs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, logs, strict=True):
        assert p.returncode == 0, err[-3000:]
    outs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    expected_rows = torch.cat([torch.full((2, 3), 0.0), torch.full((3, 3), 1.0)])
    for out in outs:
        assert torch.equal(out["gathered"], expected_rows)
        assert out["gathered_u8"].dtype == torch.uint8 and out["gathered_u8"].flatten().tolist() == [7] * 4 + [8] * 4
        assert len(out["mismatch"]) == 2 and all("ranks disagree" in e for e in out["mismatch"])
        assert out["broadcast"] == [0.0, 2.5]  # rank 0's numbers everywhere
    assert "generated has values" in outs[1]["bad_input"] and "another rank" in outs[0]["bad_input"]


def test_gathered_fid_equals_the_fid_of_the_full_set(
    cache_dir: Path, digits: dict[str, Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each rank holds half of the samples; with a (simulated) two-rank all-gather every rank computes the metric
    on the whole set, identically, and equal to the single-process result."""
    import ko_lightning.metrics.fid as fid_module

    test, train = digits["test"], digits["train"]
    halves = [test[:100], test[100:]]
    broadcasts: list[list[float]] = []
    monkeypatch.setattr(fid_module, "_dist_active", lambda: True)
    monkeypatch.setattr(fid_module, "_any_rank", lambda flag: flag)
    monkeypatch.setattr(fid_module, "all_gather_samples", lambda x: torch.cat([to_uint8_images(h) for h in halves]))
    monkeypatch.setattr(fid_module, "_broadcast_numbers", lambda v: broadcasts.append(v) or v)
    kwargs = dict(cache_dir=cache_dir, kid_subset_size=100, kid_subsets=10, cuda=False)
    per_rank = [compute_fid_kid(h, train, gather_across_ranks=True, **kwargs) for h in halves]
    assert per_rank[0] == per_rank[1] and per_rank[0].n_generated == 180 and len(broadcasts) == 2
    monkeypatch.setattr(fid_module, "_dist_active", lambda: False)
    single = compute_fid_kid(test, train, **kwargs)
    assert per_rank[0] == single


def test_gather_is_a_no_op_without_a_process_group() -> None:
    x = torch.arange(6).reshape(3, 2)
    assert all_gather_samples(x) is x
