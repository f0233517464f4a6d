"""KOScheduleCallback: re-estimate the data separation function and re-solve the Kinetic-Optimal path in training.

The callback holds the Lightning side of a refresh: when to refresh, which data to estimate from, the collectives
between ranks, installing the path and reporting it. What a refresh computes from the pooled sums (check, merge,
solve, the numbers of the report) is :func:`ko_lightning.kinetic.solve_refresh`, which knows nothing of Lightning.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any, Literal, cast

import lightning as L
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from ko_lightning.callbacks.distributed import (
    PendingSums,
    all_reduce_sums,
    broadcast_from_rank_zero,
    compute_on_every_rank,
)
from ko_lightning.callbacks.ko_advice import (
    check_conditional_setup,
    warn_if_known_to_lose,
    warn_if_refresh_never_runs,
)
from ko_lightning.callbacks.ko_data import global_normalization, local_separation_sums, training_data
from ko_lightning.callbacks.ko_display import publish_refresh
from ko_lightning.callbacks.ko_state import callback_state, restore_callback_state
from ko_lightning.callbacks.protocol_check import require_protocol
from ko_lightning.callbacks.run_dir import resolve_run_dir
from ko_lightning.kinetic import (
    DataNormalization,
    RefreshOutcome,
    RefreshReport,
    SeparationFunction,
    SeparationSums,
    default_theta_grid,
    solve_refresh,
)
from ko_lightning.kinetic.precision import EstimatePrecision
from ko_lightning.kinetic.refresh import schedule_change
from ko_lightning.kinetic.solver import DEFAULT_GAMMA_FLOOR
from ko_lightning.paths import GaussianPath
from ko_lightning.protocols import PathModule
from ko_lightning.seeding import derive_seed

__all__ = ["KOScheduleCallback", "RefreshOutcome", "RefreshReport"]

Estimator = Literal["model", "data", "data+model"]
_ESTIMATORS = ("model", "data", "data+model")
_SAVED_SETTINGS = (
    "every_n_steps",
    "warmup_steps",
    "estimator",
    "n_queries",
    "n_theta",
    "smoothing",
    "gamma_floor",
    "sigma_min",
    "merge_previous",
    "max_data",
    "n_grid",
    "seed",
    "target_standard_error",
)
_SPAWN_WARNING = (
    "KOScheduleCallback under ddp_spawn: the main process gets the trained weights back but not the KO path (it is "
    "schedule state, not a weight). To sample on the path the model was trained on, load a checkpoint: "
    "FlowMatching.load_from_checkpoint(trainer.checkpoint_callback.best_model_path or last_model_path, net=...)."
)


#: the integer settings and their smallest allowed values.
_MINIMUMS = {
    "every_n_steps": 1,
    "warmup_steps": 0,
    "n_queries": 1,
    "n_theta": 4,
    "max_data": 2,
    "n_grid": 16,
    "batch_size": 1,
    "data_chunk": 1,
}


def _check_settings(settings: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first bad setting of ``settings`` (the constructor's arguments by name)."""
    for name, low in _MINIMUMS.items():
        value = settings[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    estimator, smoothing = settings["estimator"], settings["smoothing"]
    gamma_floor, sigma_min = settings["gamma_floor"], settings["sigma_min"]
    if estimator not in _ESTIMATORS:
        raise ValueError(f"estimator must be one of {_ESTIMATORS}, got {estimator!r}")
    if not (isinstance(smoothing, (int, float)) and smoothing >= 0):
        raise ValueError(f"smoothing must be >= 0, got {smoothing!r}")
    if gamma_floor is not None and not 0 < gamma_floor < 1:
        raise ValueError(f"gamma_floor must lie in (0, 1) or be None, got {gamma_floor!r}")
    if sigma_min is not None and not 0 <= sigma_min < 1:
        raise ValueError(f"sigma_min must lie in [0, 1) or be None, got {sigma_min!r}")
    target = settings["target_standard_error"]
    if target is not None and not (isinstance(target, (int, float)) and target > 0):
        raise ValueError(f"target_standard_error must be > 0 or None, got {target!r}")


class KOScheduleCallback(L.Callback):
    """Periodically re-estimate lambda and install the Kinetic-Optimal path, identically on every rank.

    At step ``warmup_steps`` and every ``every_n_steps`` after it (and, with ``init_from_data``, before the first
    step) each rank estimates partial sums of ``1 - lambda(theta)`` on its share of the queries (``"data"``: the
    closed-form posterior over the training set; ``"model"``: the network's x1-prediction error; ``"data+model"``:
    both, pooled), the sums are all-reduced, rank 0 solves the KO path in closed form
    (:func:`ko_lightning.kinetic.solve_refresh`) and broadcasts it, and every rank installs the same table with
    ``set_path`` at the step boundary (docs/architecture.md; the mathematics in docs/math.md §3 and §4).

    A lambda that is not finite or leaves ``[0, 1]`` keeps the previous path with a warning; any other failure, on
    any rank, raises on every rank. Each refresh logs ``ko/*`` metrics, prints a table on rank 0 and writes
    ``ko_schedule.png`` into the run directory. Checkpoints hold the separation function, the refresh count and the
    settings (the path is saved by ``FlowMatching``); ``setup`` checks the module against ``PathModule``.

    Args:
        every_n_steps: refresh period in optimizer steps (>= 1).
        warmup_steps: first model-based refresh at this step (>= 0).
        estimator: ``"model"``, ``"data"`` or ``"data+model"``.
        n_queries: queries per refresh over all ranks (each rank takes ``ceil(n_queries / world_size)``).
        n_theta: points of the angle grid (denser near 0).
        smoothing: Whittaker smoothing strength of the separation function.
        gamma_floor: regularization floor of the solver (default 0.1, measured: docs/math.md §4.7); None chooses
            the largest floor with a KE price <= 0.5%, measured to lose few-step sample quality.
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
        target_standard_error: ``"data"`` estimator with merging (its target never changes): skip periodic
            refreshes once the merged lambda's largest standard error is at most this; None: never skip.
    """

    def __init__(
        self,
        every_n_steps: int = 1000,
        warmup_steps: int = 500,
        estimator: Estimator = "data",
        n_queries: int = 512,
        n_theta: int = 64,
        smoothing: float = 1.0,
        gamma_floor: float | None = DEFAULT_GAMMA_FLOOR,
        sigma_min: float | None = None,
        init_from_data: bool = True,
        merge_previous: bool | None = None,
        max_data: int = 4096,
        n_grid: int = 512,
        batch_size: int = 2048,
        data_chunk: int = 4096,
        seed: int = 0,
        plot: bool = True,
        enabled: bool = True,
        target_standard_error: float | None = 0.01,
    ) -> None:
        _check_settings(locals())
        self.every_n_steps, self.warmup_steps, self.estimator = every_n_steps, warmup_steps, estimator
        self.n_queries, self.n_theta, self.smoothing = n_queries, n_theta, float(smoothing)
        self.gamma_floor, self.sigma_min, self.init_from_data = gamma_floor, sigma_min, bool(init_from_data)
        self.merge_previous = (estimator == "data") if merge_previous is None else bool(merge_previous)
        self.max_data, self.n_grid, self.batch_size, self.data_chunk = max_data, n_grid, batch_size, data_chunk
        self.seed, self.plot, self.enabled = int(seed), bool(plot), bool(enabled)
        self.target_standard_error = target_standard_error
        self.precision = EstimatePrecision()

        self.theta = default_theta_grid(n_theta)
        self.separation: SeparationFunction | None = None
        self.normalization: DataNormalization | None = None
        self.refresh_count = 0
        self.last_refresh_step = -1
        self.reports: list[RefreshReport] = []
        self._data: Tensor | None = None
        self._conditions: Tensor | None = None  # one per data row, for a conditional model (docs/math.md §3.10)
        self._run_dir: str | None = None

    # ------------------------------------------------------------------ settings and state
    def settings(self) -> dict[str, Any]:
        """The estimator settings (saved in checkpoints beside the separation function)."""
        return {name: getattr(self, name) for name in _SAVED_SETTINGS}

    @override
    def state_dict(self) -> dict[str, Any]:
        return callback_state(self)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        restore_callback_state(self, state_dict)

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.enabled:
            return
        require_protocol(pl_module, PathModule, type(self).__name__)
        if self.plot:  # every rank runs setup: resolve the directory here (trainer.log_dir is a collective)
            self._run_dir = resolve_run_dir(trainer)
        if isinstance(trainer.strategy.launcher, _MultiProcessingLauncher):
            rank_zero_warn(_SPAWN_WARNING, category=UserWarning)
        warn_if_known_to_lose(pl_module, self.gamma_floor)
        if stage == "fit":
            warn_if_refresh_never_runs(trainer.max_steps, self.warmup_steps, self.estimator, self.init_from_data)
        check_conditional_setup(pl_module, self.estimator, self.init_from_data)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled:
            return
        self._data, self._conditions = training_data(trainer, self.max_data, getattr(pl_module, "conditioning", None))
        if self.normalization is None:
            self.normalization = global_normalization(trainer, self._data)
        if self.init_from_data and self.refresh_count == 0 and trainer.global_step == 0:
            self.refresh(trainer, cast(PathModule, pl_module), estimator="data")

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.enabled or not self.is_refresh_step(trainer.global_step):
            return
        if trainer.global_step == self.last_refresh_step:  # several batches per optimizer step (accumulation)
            return
        if 0 < trainer.max_steps <= trainer.global_step:  # no training left on a new path: keep the trained one
            return
        if self.estimate_is_final():
            return
        self.refresh(trainer, cast(PathModule, pl_module))

    def estimate_is_final(self) -> bool:
        """True when a data-estimator refresh could only re-measure what is known: the estimate is merged and
        its largest standard error is at most ``target_standard_error`` (the same on every rank: it comes from
        all-reduced sums)."""
        if self.target_standard_error is None or self.estimator != "data" or not self.merge_previous:
            return False
        return self.precision.max_standard_error() <= self.target_standard_error

    def is_refresh_step(self, step: int) -> bool:
        """True at ``warmup_steps``, ``warmup_steps + every_n_steps``, ... (``step`` counts optimizer steps)."""
        return step >= self.warmup_steps and step > 0 and (step - self.warmup_steps) % self.every_n_steps == 0

    # ------------------------------------------------------------------ one refresh
    def refresh(self, trainer: L.Trainer, pl_module: PathModule, estimator: str | None = None) -> RefreshReport:
        """Estimate, all-reduce, solve (rank 0), broadcast and install; returns the report.

        Every rank takes the same branches: a failure while estimating on any rank, or while solving on rank 0,
        is made known to every rank through the collectives that follow, and every rank then raises together
        (a rank left waiting in a collective would hang the run).

        Raises:
            RuntimeError: on every rank, when the estimate failed on some rank or the solve failed unexpectedly
                on rank 0 (an implausible lambda is not an error: the previous path is kept, with a warning).
        """
        kind = estimator or self.estimator
        step = trainer.global_step
        report = RefreshReport(step=step, estimator=kind)
        t_start = time.perf_counter()
        task = partial(self.local_sums, pl_module, kind, self.refresh_count, trainer.global_rank, trainer.world_size)
        sums = compute_on_every_rank(
            trainer, task, f"KOScheduleCallback: the lambda estimate of the refresh at step {step}"
        )
        t_estimated = time.perf_counter()
        pooled = all_reduce_sums(trainer, sums)
        t_reduced = time.perf_counter()

        old_path = pl_module.path
        outcome = broadcast_from_rank_zero(
            trainer, lambda: self._solve(pooled, old_path), f"KOScheduleCallback: solving the KO path at step {step}"
        )
        t_solved = time.perf_counter()

        self.refresh_count += 1
        self.last_refresh_step = step
        if outcome.installed:
            assert outcome.table is not None  # what "installed" means
            new_path = outcome.table.to_path()
            pl_module.set_path(new_path)
            self.separation = outcome.separation
            self.precision.add(pooled, merged=self.merge_previous)
            report.installed = True
            if outcome.numbers is not None:
                report.record(outcome.numbers)
            if trainer.is_global_zero:
                report.max_delta_alpha, report.max_delta_sigma = schedule_change(old_path, new_path)
        else:
            report.reason = outcome.reason
            rank_zero_warn(
                f"KOScheduleCallback: refresh at step {step} kept the previous path: {report.reason}",
                category=RuntimeWarning,
            )
        report.record_times(t_start, t_estimated, t_reduced, t_solved, time.perf_counter())
        self.reports.append(report)
        if trainer.is_global_zero:
            _publish(self, trainer, pl_module, report, outcome, pooled)
        return report

    def local_sums(
        self, pl_module: PathModule, estimator: str, refresh_index: int, rank: int, world_size: int
    ) -> SeparationSums | PendingSums:
        """This rank's partial sums for refresh ``refresh_index`` (deterministic in seed, refresh and rank)."""
        if self._data is None or self.normalization is None:
            raise RuntimeError("KOScheduleCallback has no training data yet (on_train_start has not run)")
        share = -(-self.n_queries // world_size)  # ceil: the shares cover n_queries
        return local_separation_sums(
            pl_module,
            self._data,
            self.theta,
            estimator,
            self.normalization,
            n_queries=share,
            seed=derive_seed(self.seed, refresh_index, rank),
            data_chunk=self.data_chunk,
            batch_size=self.batch_size,
            conditions=self._conditions,
        )

    def _solve(self, sums: SeparationSums, old_path: GaussianPath) -> RefreshOutcome:
        """Rank 0: :func:`ko_lightning.kinetic.solve_refresh` with this callback's settings."""
        return solve_refresh(
            sums,
            old_path,
            sigma_min=self._sigma_min(old_path),
            smoothing=self.smoothing,
            previous=self.separation if self.merge_previous else None,
            gamma_floor=self.gamma_floor,
            second_moment=1.0 if self.normalization is None else self.normalization.second_moment,
            n_grid=self.n_grid,
            conditional=self._conditions is not None,
        )

    def _sigma_min(self, path: GaussianPath) -> float:
        return float(path.sigma_min) if self.sigma_min is None else self.sigma_min


def _publish(
    callback: KOScheduleCallback,
    trainer: L.Trainer,
    pl_module: PathModule,
    report: RefreshReport,
    outcome: RefreshOutcome,
    sums: SeparationSums,
) -> None:
    """Rank 0: log the numbers, print the table, draw the picture (no collectives in here)."""
    picture = callback.plot and report.installed and callback.separation is not None and callback._run_dir is not None
    publish_refresh(
        trainer.loggers,
        report,
        callback._run_dir if picture else None,
        callback.separation,
        outcome.old_schedule,
        pl_module.path,
        sums,
        callback._sigma_min(pl_module.path),
    )
