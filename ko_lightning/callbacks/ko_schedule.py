"""KOScheduleCallback: re-estimate the data separation function and re-solve the Kinetic-Optimal path in training."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from ko_lightning.kinetic import (
    DataNormalization,
    SeparationFunction,
    SeparationSums,
    default_theta_grid,
    kinetic_energy,
    separation_sums_from_data,
    separation_sums_from_model,
    solve_ko,
)
from ko_lightning.batches import batch_data
from ko_lightning.callbacks.run_dir import resolve_run_dir
from ko_lightning.paths import CondOTPath, GaussianPath, TabulatedPath
from ko_lightning.seeding import derive_seed

__all__ = ["KOScheduleCallback", "RefreshOutcome", "RefreshReport"]

Estimator = Literal["model", "data", "data+model"]
_ESTIMATORS = ("model", "data", "data+model")
_SUM_FIELDS = tuple(f.name for f in dataclasses.fields(SeparationSums) if f.name != "theta")


@dataclass
class RefreshReport:
    """What one refresh did (logged under ``ko/`` and shown as a table on rank 0).

    Attributes:
        step: global step of the refresh (0 for the initialization before the first step).
        estimator: which estimator produced lambda.
        installed: whether the new path was installed (False: the previous path was kept, see ``reason``).
        reason: why a path was not installed.
        phi: cone angle ``Phi`` of the new solution.
        ke_min: exact minimum kinetic energy under the new lambda.
        ke_new: kinetic energy of the installed (regularized) path under the new lambda.
        ke_old: kinetic energy of the previous path under the new lambda.
        ke_cond_ot: kinetic energy of Cond-OT (same sigma_min) under the new lambda, for reference.
        gamma_floor: the regularization floor used.
        max_delta_alpha: ``max_t |alpha_new - alpha_old|``.
        max_delta_sigma: ``max_t |sigma_new - sigma_old|``.
        seconds: wall time per phase (estimate, all_reduce, solve, install) and in total.
    """

    step: int
    estimator: str
    installed: bool = False
    reason: str = ""
    phi: float = math.nan
    ke_min: float = math.nan
    ke_new: float = math.nan
    ke_old: float = math.nan
    ke_cond_ot: float = math.nan
    gamma_floor: float = math.nan
    max_delta_alpha: float = math.nan
    max_delta_sigma: float = math.nan
    seconds: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """Scalars for the loggers."""
        out = {
            "ko/phi": self.phi,
            "ko/ke_min": self.ke_min,
            "ko/ke_new": self.ke_new,
            "ko/ke_old": self.ke_old,
            "ko/ke_cond_ot": self.ke_cond_ot,
            "ko/gamma_floor": self.gamma_floor,
            "ko/max_delta_alpha": self.max_delta_alpha,
            "ko/max_delta_sigma": self.max_delta_sigma,
            "ko/installed": float(self.installed),
        }
        out.update({f"ko/seconds_{k}": v for k, v in self.seconds.items()})
        return out


@dataclass
class RefreshOutcome:
    """What rank 0 broadcasts after a solve: a new path, a reason to keep the previous one, or an error.

    Attributes:
        table: the new path's ``(t, alpha, sigma, alpha', sigma')`` grid (None when nothing is installed).
        separation: the separation function the path was solved from.
        numbers: :class:`RefreshReport` fields of the solution (``phi``, ``ke_min``, ...).
        old_schedule: ``(t, alpha, sigma)`` of the previous path on a dense grid, for the picture.
        reason: why the previous path is kept (an implausible estimate; training goes on).
        error: an unexpected failure on rank 0 (every rank raises).
    """

    table: tuple[Tensor, ...] | None = None
    separation: SeparationFunction | None = None
    numbers: dict[str, float] = field(default_factory=dict)
    old_schedule: tuple[Tensor, Tensor, Tensor] | None = None
    reason: str = ""
    error: str = ""

    @property
    def installed(self) -> bool:
        """True when the outcome carries a new path."""
        return self.table is not None and not self.error


class KOScheduleCallback(L.Callback):
    """Periodically re-estimate lambda and install the Kinetic-Optimal path, identically on every rank.

    At step ``warmup_steps`` and every ``every_n_steps`` after it (and, with ``init_from_data``, before the first
    step) the callback

    1. estimates partial sums of ``1 - lambda(theta)`` on a fixed angle grid, each rank on its own share of the
       ``n_queries`` queries (``"data"``: the closed-form posterior over the training set; ``"model"``: the
       network's x1-prediction error on training data; ``"data+model"``: both, pooled per grid point);
    2. all-reduces the sums across ranks (so lambda is the estimate over the union of the shares);
    3. solves the KO path in closed form (:func:`ko_lightning.kinetic.solve_ko`) on rank 0 and broadcasts the
       table, so every rank installs bit-identical buffers;
    4. installs it with ``FlowMatching.set_path`` at the step boundary; parameters and optimizer state are not
       touched.

    A refresh whose lambda is not finite or leaves ``[0, 1]`` (or whose solve fails) keeps the previous path and
    warns; training goes on. Each refresh logs ``ko/*`` metrics, prints a table on rank 0 and writes
    ``ko_schedule.png`` (lambda and the schedules) into the run directory. The separation function, the refresh
    count and the settings are saved in checkpoints (the path itself is saved by ``FlowMatching``).

    Pair it with ``FlowMatching(parametrization="polar_v")``: that network's function does not depend on the path,
    so a schedule swap does not invalidate what it has learned.

    Args:
        every_n_steps: refresh period in optimizer steps (>= 1).
        warmup_steps: first model-based refresh at this step (>= 0).
        estimator: ``"model"``, ``"data"`` or ``"data+model"``.
        n_queries: queries per refresh over all ranks (each rank takes ``ceil(n_queries / world_size)``).
        n_theta: points of the angle grid (denser near 0).
        smoothing: Whittaker smoothing strength of the separation function.
        gamma_floor: regularization floor of the solver; None chooses it (KE price <= 0.5%).
        sigma_min: end noise of the KO path; None takes the module's current ``path.sigma_min``.
        init_from_data: before the first step, install KO solved from the data estimator.
        merge_previous: pool each new estimate with the previous one (weighted by samples per grid point); None
            means True for ``"data"`` (same target every time) and False otherwise (the model improves).
        max_data: at most this many training samples are used as the data set / model queries' source.
        n_grid: nodes of the tabulated KO path.
        batch_size: batch size of the model estimator's forward passes.
        data_chunk: data rows per block of the finite-set posterior (bounds its memory).
        seed: base seed of the refresh queries (rank ``r`` of refresh ``k`` uses a seed from ``(seed, k, r)``).
        plot: write ``ko_schedule.png`` at each refresh.
        enabled: False makes the callback do nothing.
    """

    def __init__(
        self,
        every_n_steps: int = 1000,
        warmup_steps: int = 500,
        estimator: Estimator = "data",
        n_queries: int = 2048,
        n_theta: int = 64,
        smoothing: float = 1.0,
        gamma_floor: float | None = None,
        sigma_min: float | None = None,
        init_from_data: bool = True,
        merge_previous: bool | None = None,
        max_data: int = 50_000,
        n_grid: int = 512,
        batch_size: int = 2048,
        data_chunk: int = 4096,
        seed: int = 0,
        plot: bool = True,
        enabled: bool = True,
    ) -> None:
        for name, value, low in (
            ("every_n_steps", every_n_steps, 1), ("warmup_steps", warmup_steps, 0), ("n_queries", n_queries, 1),
            ("n_theta", n_theta, 4), ("max_data", max_data, 2), ("n_grid", n_grid, 16),
            ("batch_size", batch_size, 1), ("data_chunk", data_chunk, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if estimator not in _ESTIMATORS:
            raise ValueError(f"estimator must be one of {_ESTIMATORS}, got {estimator!r}")
        if not (isinstance(smoothing, (int, float)) and smoothing >= 0):
            raise ValueError(f"smoothing must be >= 0, got {smoothing!r}")
        if gamma_floor is not None and not 0 < gamma_floor < 1:
            raise ValueError(f"gamma_floor must lie in (0, 1) or be None, got {gamma_floor!r}")
        if sigma_min is not None and not 0 <= sigma_min < 1:
            raise ValueError(f"sigma_min must lie in [0, 1) or be None, got {sigma_min!r}")
        self.every_n_steps = every_n_steps
        self.warmup_steps = warmup_steps
        self.estimator: Estimator = estimator
        self.n_queries = n_queries
        self.n_theta = n_theta
        self.smoothing = float(smoothing)
        self.gamma_floor = gamma_floor
        self.sigma_min = sigma_min
        self.init_from_data = bool(init_from_data)
        self.merge_previous = (estimator == "data") if merge_previous is None else bool(merge_previous)
        self.max_data = max_data
        self.n_grid = n_grid
        self.batch_size = batch_size
        self.data_chunk = data_chunk
        self.seed = int(seed)
        self.plot = bool(plot)
        self.enabled = bool(enabled)

        self.theta = default_theta_grid(n_theta)
        self.separation: SeparationFunction | None = None
        self.normalization: DataNormalization | None = None
        self.refresh_count = 0
        self.last_refresh_step = -1
        self.reports: list[RefreshReport] = []
        self._data: Tensor | None = None
        self._run_dir: str | None = None

    # ------------------------------------------------------------------ settings and state
    def settings(self) -> dict[str, Any]:
        """The estimator settings (saved in checkpoints beside the separation function)."""
        return {
            "every_n_steps": self.every_n_steps, "warmup_steps": self.warmup_steps, "estimator": self.estimator,
            "n_queries": self.n_queries, "n_theta": self.n_theta, "smoothing": self.smoothing,
            "gamma_floor": self.gamma_floor, "sigma_min": self.sigma_min, "merge_previous": self.merge_previous,
            "max_data": self.max_data, "n_grid": self.n_grid, "seed": self.seed,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "refresh_count": self.refresh_count,
            "last_refresh_step": self.last_refresh_step,
            "separation": None if self.separation is None else self.separation.state_dict(),
            "normalization": None if self.normalization is None else {
                "mean": self.normalization.mean.cpu(), "second_moment": self.normalization.second_moment,
                "count": self.normalization.count},
            "settings": self.settings(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.refresh_count = int(state_dict["refresh_count"])
        self.last_refresh_step = int(state_dict["last_refresh_step"])
        if state_dict.get("separation") is not None:
            sep = SeparationFunction.constant_one(self.theta)
            sep.load_state_dict(state_dict["separation"])
            self.separation = sep
        norm = state_dict.get("normalization")
        if norm is not None:
            self.normalization = DataNormalization(norm["mean"], float(norm["second_moment"]), int(norm["count"]))
        saved = state_dict.get("settings", {})
        changed = {k: (v, self.settings().get(k)) for k, v in saved.items() if self.settings().get(k) != v}
        if changed:
            rank_zero_info(f"KOScheduleCallback: settings differ from the checkpoint's (saved, now): {changed}")

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Every rank runs setup: resolve the picture's directory here (trainer.log_dir is a collective).
        if self.enabled and self.plot:
            self._run_dir = resolve_run_dir(trainer)
        if self.enabled and isinstance(trainer.strategy.launcher, _MultiProcessingLauncher):
            rank_zero_warn(
                "KOScheduleCallback under ddp_spawn: the main process gets the trained weights back but not the KO "
                "path (it is schedule state, not a weight). To sample on the path the model was trained on, load a "
                "checkpoint: FlowMatching.load_from_checkpoint(trainer.checkpoint_callback.best_model_path or "
                "last_model_path, net=...).",
                category=UserWarning,
            )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled:
            return
        self._data = self._training_data(trainer)
        if self.normalization is None:
            self.normalization = self._global_normalization(trainer, self._data)
        if self.init_from_data and self.refresh_count == 0 and trainer.global_step == 0:
            self.refresh(trainer, pl_module, estimator="data")

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.enabled or not self.is_refresh_step(trainer.global_step):
            return
        if trainer.global_step == self.last_refresh_step:  # several batches per optimizer step (accumulation)
            return
        if 0 < trainer.max_steps <= trainer.global_step:  # no training left on a new path: keep the trained one
            return
        self.refresh(trainer, pl_module)

    def is_refresh_step(self, step: int) -> bool:
        """True at ``warmup_steps``, ``warmup_steps + every_n_steps``, ... (``step`` counts optimizer steps)."""
        return step >= self.warmup_steps and step > 0 and (step - self.warmup_steps) % self.every_n_steps == 0

    # ------------------------------------------------------------------ one refresh
    def refresh(self, trainer: L.Trainer, pl_module: L.LightningModule, estimator: str | None = None) -> RefreshReport:
        """Estimate, all-reduce, solve (rank 0), broadcast and install; returns the report.

        Every rank takes the same branches: a failure while estimating on any rank, or while solving on rank 0,
        is made known to every rank through the collectives that follow, and every rank then raises together
        (a rank left waiting in a collective would hang the run).

        Raises:
            RuntimeError: on every rank, when the estimate failed on some rank or the solve failed unexpectedly
                on rank 0 (an implausible lambda is not an error: the previous path is kept, with a warning).
        """
        estimator = estimator or self.estimator
        step = trainer.global_step
        report = RefreshReport(step=step, estimator=estimator)
        t_start = time.perf_counter()
        sums, local_error = None, None
        try:
            sums = self.local_sums(pl_module, estimator, self.refresh_count, trainer.global_rank, trainer.world_size)
        except Exception as err:  # noqa: BLE001 - reported to every rank below, then re-raised
            local_error = err
        failed_ranks = int(_reduce_sum(trainer, torch.tensor([float(local_error is not None)], dtype=torch.float64)))
        if failed_ranks:
            message = f"KOScheduleCallback: the lambda estimate of the refresh at step {step} failed on " \
                      f"{failed_ranks} of {trainer.world_size} rank(s)"
            if local_error is not None:
                raise RuntimeError(f"{message}; on this rank: {type(local_error).__name__}: {local_error}") \
                    from local_error
            raise RuntimeError(f"{message} (see the error printed by that rank)")
        assert sums is not None
        t_estimated = time.perf_counter()
        sums = self._all_reduce(trainer, pl_module, sums)
        t_reduced = time.perf_counter()

        outcome, solve_error = RefreshOutcome(), None
        if trainer.is_global_zero:
            try:
                outcome = self._solve(sums, pl_module.path)
            except Exception as err:  # noqa: BLE001 - broadcast first, so that no rank waits for ever
                solve_error = err
                outcome = RefreshOutcome(error=f"{type(err).__name__}: {err}")
        outcome = trainer.strategy.broadcast(outcome, src=0)
        if outcome.error:
            raise RuntimeError(f"KOScheduleCallback: solving the KO path at step {step} failed on rank 0: "
                               f"{outcome.error}") from solve_error
        t_solved = time.perf_counter()

        self.refresh_count += 1
        self.last_refresh_step = step
        if outcome.installed:
            old_path = pl_module.path
            new_path = TabulatedPath(*outcome.table)
            pl_module.set_path(new_path)
            self.separation = outcome.separation
            report.installed = True
            for name, value in outcome.numbers.items():
                setattr(report, name, value)
            if trainer.is_global_zero:
                self._path_change(old_path, new_path, report)
        else:
            report.reason = outcome.reason
            rank_zero_warn(f"KOScheduleCallback: refresh at step {step} kept the previous path: {report.reason}",
                           category=RuntimeWarning)
        t_installed = time.perf_counter()
        report.seconds = {
            "estimate": t_estimated - t_start, "all_reduce": t_reduced - t_estimated,
            "solve": t_solved - t_reduced, "install": t_installed - t_solved, "total": t_installed - t_start,
        }
        self.reports.append(report)
        if trainer.is_global_zero:
            self._publish(trainer, pl_module, report, outcome, sums)
        return report

    def _publish(
        self, trainer: L.Trainer, pl_module: L.LightningModule, report: RefreshReport, outcome: RefreshOutcome,
        sums: SeparationSums,
    ) -> None:
        """Rank 0: log the numbers, print the table, draw the picture (no collectives in here)."""
        from ko_lightning.callbacks.ko_report import print_refresh_table, save_schedule_picture

        for logger in trainer.loggers:
            logger.log_metrics(report.metrics(), step=report.step)
        print_refresh_table(report)
        if not (self.plot and report.installed and self.separation is not None and self._run_dir is not None):
            return
        try:
            save_schedule_picture(self._run_dir, report.step, self.separation, outcome.old_schedule,
                                  pl_module.path, sums, self._sigma_min(pl_module.path))
        except Exception as err:  # noqa: BLE001 - a picture is not worth stopping a run for
            rank_zero_warn(f"KOScheduleCallback: could not write ko_schedule.png into {self._run_dir}: "
                           f"{type(err).__name__}: {err}", category=RuntimeWarning)

    def local_sums(
        self, pl_module: L.LightningModule, estimator: str, refresh_index: int, rank: int, world_size: int
    ) -> SeparationSums:
        """This rank's partial sums for refresh ``refresh_index`` (deterministic in seed, refresh and rank)."""
        if self._data is None or self.normalization is None:
            raise RuntimeError("KOScheduleCallback has no training data yet (on_train_start has not run)")
        share = -(-self.n_queries // world_size)
        gen = torch.Generator().manual_seed(derive_seed(self.seed, refresh_index, rank))
        total: SeparationSums | None = None
        if estimator in ("data", "data+model"):
            total = separation_sums_from_data(
                self._data, self.theta, n_queries=share, normalization=self.normalization, generator=gen,
                data_chunk=self.data_chunk, device=pl_module.device,
            )
        if estimator in ("model", "data+model"):
            pick = torch.randperm(self._data.shape[0], generator=gen)[:share]
            x1 = self._data[pick].to(pl_module.device)
            with pl_module.eval_mode():
                model_sums = separation_sums_from_model(
                    pl_module.predict_x1, pl_module.path, x1, self.theta, normalization=self.normalization,
                    generator=torch.Generator(device=x1.device).manual_seed(int(gen.initial_seed()) + 1),
                    batch_size=self.batch_size,
                )
            model_sums = SeparationSums(model_sums.theta, model_sums.sq_error, model_sums.count,
                                        model_sums.sq_error_sq)
            total = model_sums if total is None else _pool(total, model_sums)
        assert total is not None
        return total

    # ------------------------------------------------------------------ helpers
    def _training_data(self, trainer: L.Trainer) -> Tensor:
        """At most ``max_data`` training samples, float32 on the CPU (the datamodule's ``train_tensor`` if it has
        one, else the first batches of the training loader: tensors, ``(x, ...)`` tuples or ``{"x": ...}`` dicts)."""
        datamodule = trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "train_tensor"):
            data = datamodule.train_tensor(self.max_data)
        else:
            chunks, count = [], 0
            for index, batch in enumerate(trainer.train_dataloader):
                x = batch_data(batch, f"KOScheduleCallback: training batch {index}")
                chunks.append(x.detach().cpu())
                count += x.shape[0]
                if count >= self.max_data:
                    break
            if not chunks:
                raise ValueError("KOScheduleCallback: the training dataloader yielded no batch")
            data = torch.cat(chunks)
        data = data[: self.max_data].float().cpu()
        if data.shape[0] < 2:
            raise ValueError(f"KOScheduleCallback needs at least 2 training samples, got {data.shape[0]}")
        if not bool(torch.isfinite(data).all()):
            raise ValueError("KOScheduleCallback: the training data contain non-finite values (NaN or Inf)")
        return data

    @staticmethod
    def _global_normalization(trainer: L.Trainer, data: Tensor) -> DataNormalization:
        """Mean and second moment over all ranks' data (sums all-reduced before dividing).

        Raises:
            ValueError: on every rank alike (the check follows the all-reduce), when the data are constant: the
                separation function of a single point is undefined (there is nothing to normalize by).
        """
        x = data.double().reshape(data.shape[0], -1)
        stats = torch.cat([x.sum(0), (x * x).sum(0), torch.tensor([float(x.shape[0])], dtype=torch.float64)])
        stats = _reduce_sum(trainer, stats)
        d = x.shape[1]
        n = stats[-1]
        mean = stats[:d] / n
        second = float((stats[d:2 * d] / n).sum() / d)
        v = float(((stats[d:2 * d] / n) - mean**2).sum() / d)
        # E x^2 - (E x)^2 cancels to rounding level (~1e-16 E x^2 in float64) for constant data.
        if not v > 1e-12 * max(second, 1e-300):
            raise ValueError(
                f"KOScheduleCallback: the training data are constant (per-dimension variance {v:.3g} over "
                f"{int(n)} samples); the Kinetic-Optimal path needs data that vary (disable the callback)"
            )
        return DataNormalization(mean.reshape(data.shape[1:]), v, int(n))

    def _all_reduce(self, trainer: L.Trainer, pl_module: L.LightningModule, sums: SeparationSums) -> SeparationSums:
        if trainer.world_size == 1:
            return sums
        present = [name for name in _SUM_FIELDS if getattr(sums, name) is not None]
        stacked = torch.stack([getattr(sums, name).double() for name in present])
        reduced = _reduce_sum(trainer, stacked)
        return SeparationSums(sums.theta, **{name: reduced[i] for i, name in enumerate(present)})

    def _sigma_min(self, path: GaussianPath) -> float:
        return float(path.sigma_min) if self.sigma_min is None else self.sigma_min

    def _solve(self, sums: SeparationSums, old_path: GaussianPath) -> RefreshOutcome:
        """Rank 0: turn sums into lambda and solve; an implausible estimate gives an outcome with a ``reason``."""
        raw = sums.lam
        if not bool(torch.isfinite(raw).all()):
            return RefreshOutcome(reason=f"lambda estimate has {int((~torch.isfinite(raw)).sum())} non-finite values")
        # Monte-Carlo noise may leave [0, 1] by a few standard errors; more than that means a broken estimate.
        slack = 6.0 * sums.standard_error + 1e-6
        if bool(((raw < -slack) | (raw > 1 + slack)).any()):
            return RefreshOutcome(reason="lambda estimate leaves [0, 1] beyond its Monte-Carlo error")
        try:
            separation = sums.to_function(self.smoothing)
            if self.merge_previous and self.separation is not None:
                separation = self.separation.merge(separation)
            v = self.normalization.second_moment if self.normalization is not None else 1.0
            solution = solve_ko(separation, sigma_min=self._sigma_min(old_path), gamma_floor=self.gamma_floor,
                                second_moment=v, n_grid=self.n_grid)
        except (ValueError, RuntimeError) as err:
            return RefreshOutcome(reason=f"{type(err).__name__}: {err}")
        numbers = {
            "phi": solution.phi, "ke_min": solution.ke_min, "ke_new": solution.ke,
            "gamma_floor": solution.gamma_floor,
            "ke_old": kinetic_energy(old_path, separation, second_moment=v, t_max=1.0 - 1e-5),
            "ke_cond_ot": kinetic_energy(CondOTPath(self._sigma_min(old_path)), separation, second_moment=v),
        }
        p = solution.path
        table = (p.t_grid.clone(), p.alpha_grid.clone(), p.sigma_grid.clone(), p.d_alpha_grid.clone(),
                 p.d_sigma_grid.clone())
        return RefreshOutcome(table=table, separation=separation, numbers=numbers,
                              old_schedule=_dense_schedule(old_path))

    @staticmethod
    def _path_change(old: GaussianPath, new: GaussianPath, report: RefreshReport) -> None:
        t = torch.linspace(0.0, 1.0, 1001, device=new.t_grid.device if isinstance(new, TabulatedPath) else "cpu")
        a, b = old(t.to(_path_device(old))), new(t)
        report.max_delta_alpha = float((a.alpha.cpu() - b.alpha.cpu()).abs().max())
        report.max_delta_sigma = float((a.sigma.cpu() - b.sigma.cpu()).abs().max())


def _path_device(path: GaussianPath) -> torch.device:
    buffers = list(path.buffers())
    return buffers[0].device if buffers else torch.device("cpu")


def _dense_schedule(path: GaussianPath, n: int = 401) -> tuple[Tensor, Tensor, Tensor]:
    t = torch.linspace(0.0, 1.0, n, device=_path_device(path))
    c = path(t)
    return t.cpu(), c.alpha.cpu(), c.sigma.cpu()


def _pool(a: SeparationSums, b: SeparationSums) -> SeparationSums:
    """Pool two estimators' sums per grid point (plain MSE form; the control variate needs both to have it)."""
    return SeparationSums(a.theta, a.sq_error + b.sq_error, a.count + b.count, a.sq_error_sq + b.sq_error_sq)


def _reduce_sum(trainer: L.Trainer, tensor: Tensor) -> Tensor:
    """All-reduce a float64 CPU tensor by sum through the strategy (moved to the root device for NCCL)."""
    if trainer.world_size == 1:
        return tensor
    device = trainer.strategy.root_device
    reduced = trainer.strategy.reduce(tensor.to(device), reduce_op="sum")
    return reduced.to("cpu", torch.float64)
