"""Evaluate one trained row: held-out NLL, kinetic energy, and sample quality per solver.

- NLL in bits/dim: for 2D data ``-log p(x) / (D ln 2)`` in the normalized data units (dopri5); for the digits the
  discrete bound in pixel units of :func:`ko_lightning.likelihood.pixel_bits_per_dim`.
- Kinetic energy: the model's own ``(1/D) int ||v||^2 dt`` along its dopri5 trajectories
  (:func:`ko_lightning.metrics.model_kinetic_energy`), beside the analytic KE of its (final) path under the data
  separation function (:func:`ko_lightning.kinetic.kinetic_energy`, docs/math.md §2).
- Samples with Euler at a few step counts and with dopri5, all from the same noise: sliced Wasserstein-2, MMD^2
  and the on-board fraction for 2D data; FID/KID in the digits-classifier feature space for the digits.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ko_lightning.data import DigitsDataModule, Toy2DDataModule, on_checkerboard
from ko_lightning.kinetic import SeparationFunction, kinetic_energy
from ko_lightning.likelihood import DIGITS_LEVELS, pixel_bits_per_dim
from ko_lightning.metrics import compute_fid_kid, mmd_rbf, model_kinetic_energy, sliced_wasserstein
from ko_lightning.module import FlowMatching
from ko_lightning.sampling import SolverSpec
from recipes.compare_paths.config import PATH_GRIDS, PATH_LABELS, CompareConfig

__all__ = ["PathResult", "digits_display", "eval_device", "evaluate_path"]

_LN2 = math.log(2.0)

# Offsets of config.seed, one per random stream of the evaluation (the same for every path: common random numbers).
_SAMPLE_NOISE, _KE_NOISE, _NLL_NOISE, _SW_DIRECTIONS = 1, 2, 3, 5


@dataclass
class PathResult:
    """Everything measured for one path (one row of the tables).

    Attributes:
        name: path key (``"cond_ot"``, ...).
        label: display name.
        t_eps: training time margin; samples, likelihoods and KE use ``[0, 1 - t_eps]``.
        nll_bpd: mean held-out NLL in bits/dim (2D: normalized units; digits: discrete pixel bound).
        nll_bpd_se: its standard error over the points.
        nll_nfe: dopri5 evaluations per likelihood solve (mean over batches).
        ke_model: the model's kinetic energy along its dopri5 trajectories.
        ke_model_se: its standard error over the trajectories.
        ke_model_nfe: NFE of that solve.
        ke_path: analytic KE of the (final) path under lambda of the training data.
        solvers: per solver (``"euler 2"``, ..., ``"dopri5"``): ``nfe``, ``seconds`` and the quality metrics.
        train_seconds: wall time of training (incl. KO refreshes).
        eval_seconds: wall time of the evaluation.
        steps_per_second: training throughput.
        ko: the KO callback's final numbers (refreshes, Phi, KE_min, gamma floor), for the KO row.
    """

    name: str
    label: str
    t_eps: float
    nll_bpd: float = math.nan
    nll_bpd_se: float = math.nan
    nll_nfe: float = math.nan
    ke_model: float = math.nan
    ke_model_se: float = math.nan
    ke_model_nfe: int = 0
    ke_path: float = math.nan
    solvers: dict[str, dict[str, float]] = field(default_factory=dict)
    train_seconds: float = math.nan
    eval_seconds: float = math.nan
    steps_per_second: float = math.nan
    ko: dict[str, float] | None = None


def eval_device(config: CompareConfig) -> torch.device:
    """Where the evaluation runs: CUDA when asked for, or under ``"auto"`` when training was not on the CPU."""
    if config.eval.device == "cuda" or (
        config.eval.device == "auto" and config.train.accelerator != "cpu" and torch.cuda.is_available()
    ):
        return torch.device("cuda")
    return torch.device("cpu")


@torch.no_grad()
def _generate(model: FlowMatching, x0: Tensor, solver: SolverSpec, grid: str | None) -> tuple[Tensor, int]:
    """:meth:`FlowMatching.sample` from ``x0`` over the model's range ``[t_eps, 1 - t_eps]``, on ``grid`` (None:
    the path's default) for a fixed-step solver."""
    knobs: dict[str, Any] = (
        {"atol": solver.atol, "rtol": solver.rtol} if solver.steps is None else {"steps": solver.steps, "grid": grid}
    )
    res = model.sample(x0=x0.to(model.device), method=solver.method, **knobs)
    return res.samples.float().cpu(), res.nfe


def _model_ke(model: FlowMatching, x0: Tensor, solver: SolverSpec, t_end: float) -> tuple[float, float, int]:
    """Model KE over ``[0, t_end]``: solve the time-rescaled field ``T v(x, s T)`` on ``s in [0, 1]``, whose
    ``int_0^1 ||.||^2 ds`` equals ``T int_0^T ||v||^2 dt``, and divide by ``T``."""
    model.eval()

    def rescaled(x: Tensor, s: Tensor) -> Tensor:
        return t_end * model.velocity(x, s * t_end)

    ke = model_kinetic_energy(rescaled, x0.to(model.device), solver)
    return ke.mean / t_end, ke.standard_error / t_end, ke.nfe


def _nll_2d(model: FlowMatching, x: Tensor, config: CompareConfig) -> tuple[Tensor, float]:
    """Per-point ``-log p(x) / (D ln 2)`` (normalized units) and the mean NFE per solve."""
    values, nfes = [], []
    gen = torch.Generator().manual_seed(config.seed + _NLL_NOISE)
    for chunk in x.split(config.eval.nll_batch_size):
        res = model.log_prob(
            chunk.to(model.device),
            method="dopri5",
            atol=config.eval.atol,
            rtol=config.eval.rtol,
            divergence=config.eval.divergence,
            generator=gen,
        )
        values.append(-res.log_prob.detach().double().cpu() / (chunk[0].numel() * _LN2))
        nfes.append(res.nfe)
    return torch.cat(values), float(sum(nfes) / len(nfes))


def _nll_digits(model: FlowMatching, x: Tensor, config: CompareConfig, dm: DigitsDataModule) -> tuple[Tensor, float]:
    """Per-image discrete bits/dim in pixel units (:func:`pixel_bits_per_dim`) and the mean NFE per solve."""
    ev = config.eval
    assert dm.mean is not None and dm.scale is not None  # set by setup()
    gen = torch.Generator().manual_seed(config.seed + _NLL_NOISE)
    res = pixel_bits_per_dim(
        model,
        _digits_pixels(dm, x),
        dm.mean,
        dm.scale,
        atol=ev.atol,
        rtol=ev.rtol,
        divergence=ev.divergence,
        generator=gen,
        batch_size=ev.nll_batch_size,
    )
    n_batches = -(-x.shape[0] // ev.nll_batch_size)
    return res.bpd, res.nfe / n_batches


def _mean_se(x: Tensor) -> tuple[float, float]:
    x = x.double()
    se = float(x.std(unbiased=True) / math.sqrt(x.numel())) if x.numel() > 1 else math.nan
    return float(x.mean()), se


def _digits_pixels(dm: DigitsDataModule, x: Tensor) -> Tensor:
    """Normalized data -> the integer pixel values it came from (exact up to float round-off)."""
    return dm.denormalize(x).round().clamp(0, DIGITS_LEVELS - 1)


def digits_display(dm: DigitsDataModule, x: Tensor, dequantized: bool) -> Tensor:
    """Generated samples -> [0, 1] images; a model of ``pixel + u`` is shifted back by the cell centre 1/2."""
    if dequantized:
        assert dm.scale is not None  # set by setup()
        x = x - 0.5 / float(dm.scale)
    return dm.to_display(x)


def _fid_reference_name(config: CompareConfig, dm: DigitsDataModule) -> str:
    if config.eval.fid_reference_name:
        return config.eval.fid_reference_name
    # The cache checks a hash of the reference pixels: one name per split keeps different splits apart.
    return f"digits-train-seed{config.seed}-val{dm.val_fraction:g}-test{dm.test_fraction:g}"


def _quality(
    config: CompareConfig,
    dm: Toy2DDataModule | DigitsDataModule,
    samples: Tensor,
    reference: Tensor,
    reference_display: Tensor | None,
) -> dict[str, float]:
    """Sample-quality metrics of one solver setting."""
    ev = config.eval
    if isinstance(dm, DigitsDataModule):
        assert reference_display is not None
        images = digits_display(dm, samples, config.train.dequantize)
        subset = min(ev.kid_subset_size, images.shape[0], reference_display.shape[0])
        fk = compute_fid_kid(
            images,
            reference_display,
            feature_extractor="digits-classifier",
            reference_name=_fid_reference_name(config, dm),
            cache_dir=ev.fid_cache_dir,
            value_range=(0.0, 1.0),
            kid_subset_size=subset,
            seed=config.seed,
            cuda=eval_device(config).type == "cuda",
        )
        assert fk.kid_mean is not None and fk.kid_std is not None  # KID is on by default
        return {"fid": fk.fid, "kid": float(fk.kid_mean), "kid_std": float(fk.kid_std)}
    gen = torch.Generator().manual_seed(config.seed + _SW_DIRECTIONS)
    out = {"sw2": float(sliced_wasserstein(samples, reference, ev.sw_projections, generator=gen))}
    n = min(ev.n_mmd, samples.shape[0], reference.shape[0])
    out["mmd2"] = float(mmd_rbf(samples[:n], reference[:n], tuple(ev.mmd_bandwidths)))
    if config.data_name == "checkerboard":
        out["on_board"] = float(on_checkerboard(dm.denormalize(samples)).float().mean())
    return out


def evaluate_path(
    config: CompareConfig,
    name: str,
    model: FlowMatching,
    dm: Toy2DDataModule | DigitsDataModule,
    lam: SeparationFunction,
    log: Callable[[str], None] = lambda m: None,
) -> tuple[PathResult, dict[str, Tensor]]:
    """Evaluate one trained model.

    Args:
        config: the comparison's config.
        name: the path key of the row.
        model: the trained model (moved to :func:`eval_device`).
        dm: the data module (test split for the NLL and 2D references, train split for the digits' FID).
        lam: separation function of the training data, behind the analytic KE column.
        log: progress printer.

    Returns:
        The row, and the samples per solver (for the picture).
    """
    ev = config.eval
    t_eps = config.t_eps_of(name)
    t_end = 1.0 - t_eps
    row = PathResult(name=name, label=PATH_LABELS[name], t_eps=t_eps)
    model.to(eval_device(config)).eval()
    data_shape = tuple(model.data_shape or ())
    test = dm.test_tensor()

    start = time.perf_counter()
    n_nll = test.shape[0] if ev.n_nll is None else min(ev.n_nll, test.shape[0])
    if isinstance(dm, DigitsDataModule):
        bpd, row.nll_nfe = _nll_digits(model, test[:n_nll], config, dm)
    else:
        bpd, row.nll_nfe = _nll_2d(model, test[:n_nll], config)
    row.nll_bpd, row.nll_bpd_se = _mean_se(bpd)
    log(
        f"{name}: NLL {row.nll_bpd:.4f} bits/dim ({n_nll} points, NFE {row.nll_nfe:.0f}, "
        f"{time.perf_counter() - start:.1f}s)"
    )

    start = time.perf_counter()
    x0_ke = torch.randn((ev.n_ke, *data_shape), generator=torch.Generator().manual_seed(config.seed + _KE_NOISE))
    row.ke_model, row.ke_model_se, row.ke_model_nfe = _model_ke(model, x0_ke, ev.solver_spec("dopri5"), t_end)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the divergence warning does not apply below t = 1
        row.ke_path = kinetic_energy(model.path, lam, second_moment=1.0, t_max=t_end)
    log(
        f"{name}: KE model {row.ke_model:.4f} +- {row.ke_model_se:.4f} (NFE {row.ke_model_nfe}), "
        f"KE path {row.ke_path:.4f} ({time.perf_counter() - start:.1f}s)"
    )

    x0 = torch.randn((ev.n_samples, *data_shape), generator=torch.Generator().manual_seed(config.seed + _SAMPLE_NOISE))
    if isinstance(dm, DigitsDataModule):
        reference = dm.train_tensor()
        reference_display: Tensor | None = dm.to_display(reference)
    else:
        reference, reference_display = test, None
    samples: dict[str, Tensor] = {}
    for solver in ev.solver_names():
        start = time.perf_counter()
        x, nfe = _generate(model, x0, ev.solver_spec(solver), PATH_GRIDS.get(name))
        elapsed = time.perf_counter() - start
        if not bool(torch.isfinite(x).all()):
            raise RuntimeError(f"path {name!r}: {solver} produced non-finite samples")
        metrics = {"nfe": float(nfe), "seconds": elapsed, **_quality(config, dm, x, reference, reference_display)}
        row.solvers[solver] = metrics
        samples[solver] = x[: max(ev.n_plot, 36)]
        log(f"{name}: {solver}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    return row, samples
