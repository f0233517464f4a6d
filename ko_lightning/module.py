"""FlowMatching: the LightningModule that trains any ``net(x, t)`` on any Gaussian path.

The module is the Lightning glue; the pieces it wires together live in small modules of their own:
:mod:`ko_lightning.parametrizations` (what the network predicts), :mod:`ko_lightning.objective` (the loss),
:mod:`ko_lightning.training_noise` (per-step seeding), :mod:`ko_lightning.checkpointing` (checkpoint state and file
checks), :mod:`ko_lightning.model_flow` (sampling and likelihoods over the trained range) and
:func:`ko_lightning.batches.check_batch`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from ko_lightning.batches import check_batch
from ko_lightning.checkpointing import (
    check_checkpoint_file,
    missing_state_message,
    read_module_state,
    write_module_state,
)
from ko_lightning.likelihood import BitsPerDimResult, LogProbResult
from ko_lightning.model_flow import ModelFlow
from ko_lightning.objective import draw_time_and_noise, flow_matching_loss, sample_time
from ko_lightning.parametrizations import (
    LossWeighting,
    OutputParametrization,
    ParametrizationName,
    parametrization_from_name,
)
from ko_lightning.paths import CondOTPath, GaussianPath, PathCoefficients, SampleGrid
from ko_lightning.sampling import SampleResult
from ko_lightning.training_noise import draw_run_seed, step_randomness

__all__ = ["FlowMatching", "Parametrization"]

#: the names ``FlowMatching(parametrization=...)`` accepts (:data:`ko_lightning.parametrizations.PARAMETRIZATIONS`).
Parametrization = ParametrizationName


def _default_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-3)


def _plain_factory(factory: Any) -> Any:
    """A command-line factory reduced to ``functools.partial(cls, **init_args)``.

    jsonargparse (LightningCLI) hands the module ``partial(call_without_instantiate_context, instantiator, cls,
    **init_args)``, whose instantiator reaches the CLI, the trainer and the launcher's process handles. Such a
    factory cannot be deep-copied or pickled, which breaks ``EMAWeightAveraging`` (it deep-copies the module) and
    ``ddp_spawn`` (it pickles it). The instantiator adds nothing for optimizers and schedulers, so the plain class
    call is the same factory. Anything else is returned unchanged.
    """
    if (
        isinstance(factory, functools.partial)
        and getattr(factory.func, "__module__", "").startswith("jsonargparse")
        and len(factory.args) == 2
        and isinstance(factory.args[1], type)
    ):
        return functools.partial(factory.args[1], **factory.keywords)
    return factory


def _checked(
    net: Any, parametrization: Any, loss_weighting: Any, t_eps: Any, lr_scheduler_interval: Any
) -> tuple[OutputParametrization, LossWeighting]:
    """Check FlowMatching's arguments (each error names the argument).

    Returns:
        The parametrization object that converts the network's output, and the loss weighting (the
        parametrization's default when ``loss_weighting`` is None).
    """
    if not isinstance(net, nn.Module):
        raise TypeError(f"net must be a torch.nn.Module with forward(x, t), got {type(net).__name__}")
    param = parametrization_from_name(parametrization)
    if loss_weighting not in (None, "velocity", "output"):
        raise ValueError(f"loss_weighting must be 'velocity', 'output' or None, got {loss_weighting!r}")
    if not 0.0 <= float(t_eps) < 0.5:
        raise ValueError(f"t_eps must lie in [0, 0.5), got {t_eps!r}")
    if lr_scheduler_interval not in ("step", "epoch"):
        raise ValueError(f"lr_scheduler_interval must be 'step' or 'epoch', got {lr_scheduler_interval!r}")
    return param, param.default_loss_weighting if loss_weighting is None else loss_weighting


def _report_global_batch(module: L.LightningModule, per_device: int) -> None:
    """Log (rank 0) and print once the global batch: per-device batch x devices x gradient accumulation."""
    if module._trainer is None:
        return
    trainer = module.trainer
    accumulate = int(getattr(trainer, "accumulate_grad_batches", 1))
    world = int(trainer.world_size)
    global_batch = per_device * world * accumulate
    rank_zero_info(
        f"ko_lightning: global batch = {per_device} per device x {world} device(s) x {accumulate} "
        f"accumulation = {global_batch}"
    )
    module.log("global_batch_size", float(global_batch), rank_zero_only=True, batch_size=per_device)


class FlowMatching(L.LightningModule):
    """Flow matching on a Gaussian path ``x_t = alpha_t x1 + sigma_t x0`` (t = 0 noise, t = 1 data).

    Trains ``net`` on ``E || v_theta(x_t, t) - (alpha'_t x1 + sigma'_t x0) ||^2 / D``, ``t ~ U[t_eps, 1 - t_eps]``, in
    fp32 (:mod:`ko_lightning.objective`); :attr:`param` is what ``net`` predicts (docs/math.md §1.3). The path is
    schedule state, not a weight: outside the parameters and buffers (weight averaging and DDP broadcasts leave it
    alone), on the module's device, saved in checkpoints, changed by :meth:`set_path` (the KO callback does).

    Args:
        net: any module with ``forward(x, t)``, ``t`` of shape ``(B,)``.
        path: the Gaussian path (default ``CondOTPath()``).
        parametrization: ``"velocity"``, ``"x1"``, ``"eps"`` or ``"polar_v"`` (path-invariant, docs/math.md §5.2).
        loss_weighting: ``"velocity"`` or ``"output"`` (plain MSE of the net output); None: ``"output"`` for polar_v.
        optimizer: callable ``params -> Optimizer`` (default Adam, lr 1e-3).
        lr_scheduler: optional callable ``optimizer -> LRScheduler``, stepped every ``lr_scheduler_interval``.
        lr_scheduler_interval: ``"step"`` or ``"epoch"``.
        t_eps: train on ``t ~ U[t_eps, 1 - t_eps]``, in ``[0, 0.5)``; paths with a singular end (VP) need > 0.
        data_shape: shape of one sample; inferred from the first batch when None.
        val_seed: seed of the fixed noise and times of validation/test losses (comparable across epochs).
        check_finite: raise on non-finite values in a batch (one device sync per step).
        train_seed: seed of the training noise, mixed with step and rank (exact resume); None: drawn at fit start.
    """

    def __init__(
        self,
        net: nn.Module,
        path: GaussianPath | None = None,
        parametrization: Parametrization = "velocity",
        loss_weighting: LossWeighting | None = None,
        optimizer: OptimizerCallable = _default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["step", "epoch"] = "step",
        t_eps: float = 0.0,
        data_shape: tuple[int, ...] | None = None,
        val_seed: int = 1234,
        check_finite: bool = True,
        train_seed: int | None = None,
    ) -> None:
        super().__init__()
        self.param, self.loss_weighting = _checked(net, parametrization, loss_weighting, t_eps, lr_scheduler_interval)
        self.save_hyperparameters(ignore=["net", "path", "optimizer", "lr_scheduler"])
        self.net = net
        self.parametrization: Parametrization = parametrization  # the name: hyperparameters and checkpoints hold it
        self.optimizer_factory = _plain_factory(optimizer)  # picklable: EMA deep-copies us, ddp_spawn pickles us
        self.lr_scheduler_factory = _plain_factory(lr_scheduler)
        self.lr_scheduler_interval = lr_scheduler_interval
        self.t_eps = float(t_eps)
        self.data_shape: tuple[int, ...] | None = tuple(data_shape) if data_shape is not None else None
        self.val_seed = int(val_seed)
        self.check_finite = bool(check_finite)
        self.train_seed = None if train_seed is None else int(train_seed)
        self.set_path(CondOTPath() if path is None else path)
        self._global_batch_reported = False
        self._run_seed: int | None = None  # train_seed=None: drawn at fit start, restored from checkpoints

    @property
    def path(self) -> GaussianPath:
        """The current Gaussian path (on this module's device)."""
        path: GaussianPath = self.__dict__["_path"]
        buffer = next(path.buffers(), None)
        if buffer is not None and buffer.device != self.device:
            path.to(self.device)
        return path

    def set_path(self, path: GaussianPath) -> None:
        """Install a new path (kept out of the module's parameters and buffers on purpose; see class doc)."""
        if not isinstance(path, GaussianPath):
            raise TypeError(f"path must be a ko_lightning.paths.GaussianPath, got {type(path).__name__}")
        object.__setattr__(self, "_path", path)

    def velocity(self, x: Tensor, t: Tensor) -> Tensor:
        """Model velocity ``v_theta(x, t)`` in fp32, whatever the parametrization (``t`` checked to lie in [0, 1])."""
        return self._solver_velocity(x, t, validate=True)

    def _solver_velocity(self, x: Tensor, t: Tensor, validate: bool = False) -> Tensor:
        """:meth:`velocity` for the ODE solvers, which keep ``t`` in [0, 1]: by default no range check (a sync)."""
        c = self.path.at(t, x, validate)
        return self._output_to_velocity(self.param.net_output(self.net, x, t, c), x, c)

    def _output_to_velocity(self, out: Tensor, x_t: Tensor, c: PathCoefficients) -> Tensor:
        return self.param.to_velocity(out, x_t, c)

    def predict_x1(self, x: Tensor, t: Tensor) -> Tensor:
        """Model estimate of ``E[x1 | x_t = x]`` in fp32 (used by the separation-function estimator)."""
        c = self.path.at(t, x)
        return self.param.to_x1(self.param.net_output(self.net, x, t, c), x, c)

    def sample_time(self, batch_size: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
        """``t ~ U[t_eps, 1 - t_eps]``, shape ``(batch_size,)``, fp32."""
        return sample_time(batch_size, device, self.t_eps, generator)

    def loss(self, x1: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Conditional flow-matching loss for a data batch ``x1`` (fresh noise and times)."""
        t, x0 = draw_time_and_noise(x1, self.t_eps, generator)
        return self.loss_at(x0, x1, t)

    def loss_at(self, x0: Tensor, x1: Tensor, t: Tensor) -> Tensor:
        """Loss for given noise, data and times (:func:`ko_lightning.objective.flow_matching_loss`)."""
        return flow_matching_loss(self.net, self.param, self.path, x0, x1, t, self.loss_weighting)

    def _batch_tensor(self, batch: Any, batch_idx: int, stage: str) -> Tensor:
        """The data of a batch, checked (:func:`~ko_lightning.batches.check_batch`), as fp32."""
        x = check_batch(batch, f"{stage} batch {batch_idx}", self.data_shape, self.check_finite)
        self.data_shape = tuple(x.shape[1:])  # the first batch fixes an unknown shape; later ones were checked
        return x.float()

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x1 = self._batch_tensor(batch, batch_idx, "train")
        if not self._global_batch_reported:
            self._global_batch_reported = True
            _report_global_batch(self, x1.shape[0])
        with step_randomness(self._noise_seed(), self.global_step, self.global_rank, x1.device) as generator:
            loss = self.loss(x1, generator=generator)
        self.log("train/loss", loss, prog_bar=True, batch_size=x1.shape[0])
        return loss

    def _noise_seed(self) -> int:
        """``train_seed``, else this run's seed: from :meth:`on_fit_start`, the checkpoint, or (outside a fit) drawn."""
        if self.train_seed is not None:
            return self.train_seed
        self._run_seed = draw_run_seed() if self._run_seed is None else self._run_seed
        return self._run_seed

    @override
    def on_fit_start(self) -> None:
        """With ``train_seed=None``, fix the run's noise seed on every rank (``PL_GLOBAL_SEED`` or a draw on rank 0)."""
        if self.train_seed is None and self._run_seed is None:
            self._run_seed = int(self.trainer.strategy.broadcast(draw_run_seed(), src=0))

    def _fixed_noise_loss(self, batch: Any, batch_idx: int, stage: str) -> Tensor:
        x1 = self._batch_tensor(batch, batch_idx, stage)
        loss = self.loss(x1, generator=torch.Generator(device=x1.device).manual_seed(self.val_seed + batch_idx))
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", sync_dist=True, batch_size=x1.shape[0])
        return loss

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._fixed_noise_loss(batch, batch_idx, "val")

    @override
    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._fixed_noise_loss(batch, batch_idx, "test")

    @override
    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = {"scheduler": self.lr_scheduler_factory(optimizer), "interval": self.lr_scheduler_interval}
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        write_module_state(checkpoint, self.path, self.data_shape, self.parametrization, self._noise_seed())

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore path, data shape and noise seed (:func:`~ko_lightning.checkpointing.read_module_state` checks)."""
        state = read_module_state(checkpoint, self.parametrization)
        if state is None:  # only net weights: they load, the rest stays the constructor's
            rank_zero_warn(missing_state_message(self.path, self.data_shape), category=UserWarning, stacklevel=5)
            return
        self.set_path(state.path)
        if state.data_shape is not None:
            self.data_shape = state.data_shape
        if state.train_seed is not None:  # the resumed run goes on with the noise stream it started
            self._run_seed = state.train_seed

    @classmethod
    @override
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        """Lightning's, after :func:`~ko_lightning.checkpointing.check_checkpoint_file`; ``weights_only=True`` unless
        given: unpickles only tensors and plain containers (all ko_lightning saves). Pass False only if you trust it."""
        check_checkpoint_file(checkpoint_path)
        kwargs.setdefault("weights_only", True)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    @contextmanager
    def eval_mode(self) -> Iterator[None]:
        """Run the network in eval mode (dropout off), restoring the previous mode afterwards."""
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

    def _flow(self) -> ModelFlow:
        """This model's flow over its trained range ``[t_eps, 1 - t_eps]``, as the ODE solvers see it."""
        return ModelFlow(self._solver_velocity, self.path, self.param, self.t_eps, self.data_shape, self.device)

    def sample(
        self,
        num_samples: int | None = None,
        x0: Tensor | None = None,
        method: str = "euler",
        steps: int | None = None,
        atol: float | None = None,
        rtol: float | None = None,
        generator: torch.Generator | None = None,
        time_points: Tensor | None = None,
        max_num_steps: int | None = None,
        grid: SampleGrid | None = None,
    ) -> SampleResult:
        """Samples: solve ``dx/dt = v_theta(x, t)`` from ``x0 ~ N(0, I)`` at ``t_eps`` to ``1 - t_eps``, in eval mode.
        Arguments, defaults and errors: :meth:`ko_lightning.model_flow.ModelFlow.sample` (``grid="angle"``, the
        default on a solved KO path, steps equally in the path's angle)."""
        with self.eval_mode():
            return self._flow().sample(
                num_samples, x0, method, steps, atol, rtol, generator, time_points, max_num_steps, grid
            )

    def log_prob(
        self,
        x: Tensor,
        method: str = "dopri5",
        steps: int | None = None,
        atol: float | None = None,
        rtol: float | None = None,
        divergence: str = "auto",
        generator: torch.Generator | None = None,
        progress: bool = False,
        max_num_steps: int | None = None,
    ) -> LogProbResult:
        """Log-density of data ``x`` under the flow :meth:`sample` draws from, in eval mode.
        Arguments and errors: :meth:`ko_lightning.model_flow.ModelFlow.log_prob`."""
        with self.eval_mode():
            return self._flow().log_prob(x, method, steps, atol, rtol, divergence, generator, progress, max_num_steps)

    def bpd(
        self,
        x: Tensor,
        method: str = "dopri5",
        steps: int | None = None,
        atol: float | None = None,
        rtol: float | None = None,
        divergence: str = "auto",
        num_bins: int = 256,
        data_range: tuple[float, float] = (-1.0, 1.0),
        generator: torch.Generator | None = None,
        progress: bool = False,
        max_num_steps: int | None = None,
    ) -> BitsPerDimResult:
        """Bits per dimension of integer images ``x`` in ``[0, num_bins - 1]``, in eval mode.
        Arguments and errors: :meth:`ko_lightning.model_flow.ModelFlow.bpd`."""
        with self.eval_mode():
            return self._flow().bpd(
                x, method, steps, atol, rtol, divergence, num_bins, data_range, generator, progress, max_num_steps
            )
