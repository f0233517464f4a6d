"""FID and KID (and optionally IS), offline, with named reference statistics in a cache that cannot run code or lie.

:func:`compute_fid_kid` puts the pieces together, each in a module of its own:

* :mod:`~ko_lightning.metrics.images`: image checks and the 8-bit quantization (``round(255 (x - lo) / (hi - lo))``,
  as if the samples were saved as PNG, the standard FID protocol);
* :mod:`~ko_lightning.metrics.extractors`: the feature spaces, ``"inception-v3-compat"`` (torch-fidelity's port of
  the TF Inception-v3, from a local weights file whose SHA-256 is checked before it is parsed:
  :mod:`~ko_lightning.metrics.inception`) and ``"digits-classifier"`` (a small CNN for 8 x 8 digits:
  :mod:`~ko_lightning.metrics.digits_features`);
* :mod:`~ko_lightning.metrics.fid_math`: the formulas, ``FID = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))``
  and KID, the unbiased MMD^2 with the cubic kernel ``k(a, b) = (a.b / d + 1)^3`` over random subsets;
* :mod:`~ko_lightning.metrics.fid_cache`: the reference statistics cached under a name (``.npz`` arrays certified
  by a JSON note of SHA-256 hashes; rebuilt or refused when they do not verify);
* :mod:`~ko_lightning.metrics.distributed`: the gather of the samples of all ranks and the agreement on failure.

torch-fidelity provides the Inception network, the KID and IS formulas and the batching loop; nothing that
torch-fidelity would read from disk is used: its own weight loading, its feature caches (``*.pt`` files read with
``weights_only=False``) and ``calculate_metrics`` are bypassed.

Under DDP call :func:`compute_fid_kid` on *every* rank with ``gather_across_ranks=True`` (see there); never on
rank 0 only, since the gather is a collective.

Example:
    >>> dm = DigitsDataModule(); dm.setup()  # doctest: +SKIP
    >>> result = compute_fid_kid(dm.to_display(samples), dm.to_display(dm.test_tensor()),
    ...                          reference_name="digits-test", kid_subset_size=100)  # doctest: +SKIP
    >>> result.fid, result.kid_mean  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from ko_lightning.metrics.checks import check_positive_int, check_sha256
from ko_lightning.metrics.digits_features import DIGITS_EXTRACTOR_NAME

# The collectives are bound to module names here so that tests can simulate several ranks by patching this module.
from ko_lightning.metrics.distributed import all_gather_samples
from ko_lightning.metrics.distributed import any_rank as _any_rank
from ko_lightning.metrics.distributed import broadcast_numbers as _broadcast_numbers
from ko_lightning.metrics.distributed import distributed_active as _dist_active
from ko_lightning.metrics.extractors import (
    ISC_LAYER,
    check_extractor,
    check_layer,
    extract_features,
    load_extractor,
    prepare_images,
    run_extractor,
)
from ko_lightning.metrics.fid_cache import (
    ReferenceCacheEntry,
    ReferenceStatistics,
    cached_reference,
    check_reference_name,
    reference_cache_root,
)
from ko_lightning.metrics.fid_math import (
    check_kid_counts,
    fid_from_features,
    fid_from_statistics,
    fid_statistics,
    kid_from_features,
)
from ko_lightning.metrics.images import images_sha256, to_uint8_images
from ko_lightning.metrics.inception import (
    INCEPTION_EXTRACTOR_NAME,
    INCEPTION_WEIGHTS_ENV_VAR,
    INCEPTION_WEIGHTS_SHA256,
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
    with SHA-256 hashes, keyed by the name, the extractor weights' hash and the layer; see
    :mod:`~ko_lightning.metrics.fid_cache`); later calls reuse them, and may pass ``reference=None``. Passing
    *different* reference images under a cached name raises instead of returning a stale FID; an entry that does
    not verify is rebuilt from ``reference`` or, with ``reference=None``, is an error naming the file.

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
        TypeError: naming ``generated`` or ``reference`` if it is not a tensor.
        FileNotFoundError: naming ``weights_path`` when the file does not exist (nothing is ever downloaded).
    """
    check_positive_int("batch_size", batch_size)
    check_positive_int("kid_subset_size", kid_subset_size)
    check_positive_int("kid_subsets", kid_subsets)
    check_positive_int("isc_splits", isc_splits)
    name = check_extractor(feature_extractor)
    layer = check_layer(name, feature_layer)
    expected_sha256 = check_sha256(weights_sha256)
    check_reference_name(reference_name)

    if gather_across_ranks and _dist_active():
        invalid: TypeError | ValueError | None = None
        try:
            local = prepare_images(generated, "generated", value_range, name)
        except (TypeError, ValueError) as exc:
            invalid = exc
        if _any_rank(invalid is not None):  # every rank takes the same branch: nobody is left waiting in a collective
            raise invalid if invalid is not None else ValueError("generated is invalid on another rank (see its error)")
        gen = all_gather_samples(local)
    else:
        gen = prepare_images(generated, "generated", value_range, name)
    n_gen = int(gen.shape[0])
    try:  # under DDP every rank must learn of a failure on any rank before the broadcast below
        values, n_ref = _metric_values(
            gen,
            reference,
            name,
            layer,
            reference_name,
            cache_dir,
            weights_path,
            expected_sha256,
            value_range,
            kid,
            kid_subset_size,
            kid_subsets,
            isc,
            isc_splits,
            batch_size,
            cuda,
            seed,
            verbose,
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
    ref = prepare_images(reference, "reference", value_range, name) if reference is not None else None
    ref_sha256 = images_sha256(ref) if ref is not None else None
    if reference_name is None and ref is None:
        raise ValueError("reference is None and no reference_name is given: pass the reference images")
    if ref is not None and tuple(gen.shape[1:]) != tuple(ref.shape[1:]):
        raise ValueError(f"generated images have shape {tuple(gen.shape[1:])}, the reference {tuple(ref.shape[1:])}")
    if ref is not None:
        _check_counts(n_gen, int(ref.shape[0]), kid, kid_subset_size, isc, isc_splits)

    isc_layer = ISC_LAYER[name]
    layers = [layer] + ([isc_layer] if isc and isc_layer != layer else [])
    extractor = load_extractor(name, weights_path, cache_dir, layers, expected_sha256)
    use_cuda = torch.cuda.is_available() if cuda is None else bool(cuda)

    reference_stats: ReferenceStatistics | None = None
    entry: ReferenceCacheEntry | None = None
    if reference_name is not None:
        entry = ReferenceCacheEntry(
            reference_cache_root(cache_dir), reference_name, name, layer, extractor.weights_sha256
        )
        reference_stats = cached_reference(entry, ref_sha256)
        if reference_stats is not None and list(gen.shape[1:]) != list(reference_stats.shape):
            raise ValueError(
                f"generated images have shape {list(gen.shape[1:])}, the reference {reference_stats.shape}"
            )
        if reference_stats is not None:
            _check_counts(n_gen, reference_stats.n, kid, kid_subset_size, isc, isc_splits)

    if reference_stats is None:
        assert ref is not None and ref_sha256 is not None  # cached_reference raises when neither is available
        ref_features = run_extractor(extractor, ref, batch_size, use_cuda, verbose)[layer]
        mu, sigma = fid_statistics(ref_features)
        reference_stats = ReferenceStatistics(
            ref_features, mu, sigma, ref_sha256, int(ref.shape[0]), list(ref.shape[1:])
        )
        if entry is not None:
            # Under DDP other ranks may be writing their own files of this entry right now: leave them.
            entry.write(reference_stats, prune_stale=not _dist_active())

    gen_features = run_extractor(extractor, gen, batch_size, use_cuda, verbose)
    gen_mu, gen_sigma = fid_statistics(gen_features[layer])
    nan = float("nan")
    values = [fid_from_statistics(gen_mu, gen_sigma, reference_stats.mu, reference_stats.sigma), nan, nan, nan, nan]
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
    """Enough samples for each metric asked for: 2 per set for FID, ``kid_subset_size``, ``isc_splits``."""
    if n_gen < 2 or n_ref < 2:
        raise ValueError(f"FID needs at least 2 samples per set (generated: {n_gen}, reference: {n_ref})")
    if kid:
        check_kid_counts(kid_subset_size, n_gen, n_ref)
    if isc and n_gen < isc_splits:
        raise ValueError(f"isc_splits={isc_splits} exceeds the {n_gen} generated samples")
