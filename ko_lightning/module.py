"""FlowMatching: the LightningModule that trains any ``net(x, t)`` on any Gaussian path.

The module is the Lightning glue; the pieces it wires together live in small modules of their own:
:mod:`ko_lightning.parametrizations` (what the network predicts), :mod:`ko_lightning.objective` (the loss),
:mod:`ko_lightning.training_noise` (per-step seeding), :mod:`ko_lightning.checkpointing` (checkpoint state and file
checks), :mod:`ko_lightning.model_flow` (sampling and likelihoods over the trained range) and
:func:`ko_lightning.batches.check_batch`.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from ko_lightning.checkpointing import (
    check_checkpoint_file,
    missing_state_message,
    read_module_state,
    write_module_state,
)
from ko_lightning.conditioning import Conditioning
from ko_lightning.finite_checks import FiniteChecks, FiniteMode
from ko_lightning.inference import FlowInference
from ko_lightning.likelihood import PixelMap, data_pixel_map
from ko_lightning.objective import draw_time_and_noise, draw_times, flow_matching_loss
from ko_lightning.parametrizations import (
    LossWeighting,
    OutputParametrization,
    ParametrizationName,
    parametrization_from_name,
)
from ko_lightning.paths import CondOTPath, GaussianPath
from ko_lightning.time_samplers import TimeSamplerSpec, make_time_sampler, time_sampler_name
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
    net: Any, parametrization: Any, loss_weighting: Any, t_eps: Any, lr_scheduler_interval: Any, cond_dropout: Any
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
    if isinstance(cond_dropout, bool) or not isinstance(cond_dropout, (int, float)) or not 0 <= cond_dropout <= 1:
        raise ValueError(f"cond_dropout must be a probability in [0, 1], got {cond_dropout!r}")
    if cond_dropout > 0 and not Conditioning.of(net).is_conditional:
        raise ValueError(
            f"cond_dropout={cond_dropout} needs a conditional network (num_classes or cond_dim); this one is "
            "unconditional"
        )
    return param, param.default_loss_weighting if loss_weighting is None else loss_weighting


def _report_global_batch(module: L.LightningModule, per_device: int) -> None:
    """Log (rank 0) and print once the global batch: per-device batch x devices x gradient accumulation.

    Written straight to every logger at the current step: through ``module.log`` it reached ``metrics.csv`` only
    when the step was a logging step (``log_every_n_steps``), so an epoch shorter than that lost it.
    """
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
    if trainer.is_global_zero:  # no collective in here: rank 0 alone writes
        for logger in trainer.loggers:
            logger.log_metrics({"global_batch_size": float(global_batch)}, step=trainer.global_step)


class FlowMatching(FlowInference, L.LightningModule):
    """Flow matching on a Gaussian path ``x_t = alpha_t x1 + sigma_t x0`` (t = 0 noise, t = 1 data).

    Trains ``net`` on ``E || v_theta(x_t, t) - (alpha'_t x1 + sigma'_t x0) ||^2 / D`` over ``t`` in
    ``[t_eps, 1 - t_eps]`` (uniform unless ``time_sampler`` says otherwise), in fp32 (:mod:`ko_lightning.objective`);
    :attr:`param` is what ``net`` predicts (docs/math.md §1.3). The path is
    schedule state, not a weight: outside the parameters and buffers (weight averaging and DDP broadcasts leave it
    alone), on the module's device, saved in checkpoints, changed by :meth:`set_path` (the KO callback does).

    Sampling, likelihoods and classifier-free guidance come from :class:`~ko_lightning.inference.FlowInference`.

    Args:
        net: any module with ``forward(x, t)``, ``t`` of shape ``(B,)``; a conditional one (an attribute
            ``num_classes`` or ``cond_dim``) takes ``forward(x, t, cond=None)`` and trains on batches ``(x, y)`` or
            ``{"x": ..., "y": ...}`` (docs/math.md §7).
        path: the Gaussian path (default ``CondOTPath()``).
        parametrization: ``"velocity"``, ``"x1"``, ``"eps"`` or ``"polar_v"`` (path-invariant, docs/math.md §5.2).
        loss_weighting: ``"velocity"`` or ``"output"`` (plain MSE of the net output); None: ``"output"`` for polar_v.
        optimizer: callable ``params -> Optimizer`` (default Adam, lr 1e-3).
        lr_scheduler: optional callable ``optimizer -> LRScheduler``, stepped every ``lr_scheduler_interval``.
        lr_scheduler_interval: ``"step"`` or ``"epoch"``.
        t_eps: train on ``t ~ U[t_eps, 1 - t_eps]``, in ``[0, 0.5)``; paths with a singular end (VP) need > 0.
        data_shape: shape of one sample; inferred from the first batch when None.
        val_seed: seed of the fixed noise and times of validation/test losses (comparable across epochs).
        check_finite: raise on non-finite values in a batch, and on labels out of range: True checks each batch on
            the CPU and, on accelerators, keeps a device-side record read every ``check_finite_every`` steps, at
            the end and before checkpoints (no sync per step; docs/scale.md §4); "immediate"/"deferred" force one.
        check_finite_every: steps between reads of the deferred record.
        train_seed: seed of the training noise, mixed with step and rank (exact resume); None: drawn at fit start.
        cond_dropout: probability that a training sample's condition is replaced by "no condition" (classifier-free
            guidance training; drawn from the step's seeded generator).
        time_sampler: the density of training times (docs/math.md §1.4, §1.5): ``"auto"`` (uniform; on a solved KO
            path half its own loss and half Cond-OT's weighting of noise levels, ``"cond_ot_snr(0.5)"``),
            ``"uniform"``, ``"cond_ot_snr(share)"``, ``"speed"``, ``"logit_normal"``, ``"logit_normal(m, s)"`` or a
            callable ``(batch_size, generator) -> u``.
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
        check_finite: bool | FiniteMode = True,
        check_finite_every: int = 100,
        train_seed: int | None = None,
        cond_dropout: float = 0.0,
        time_sampler: TimeSamplerSpec = "auto",
    ) -> None:
        super().__init__()
        self.param, self.loss_weighting = _checked(
            net, parametrization, loss_weighting, t_eps, lr_scheduler_interval, cond_dropout
        )
        self.time_sampler = make_time_sampler(time_sampler)
        self.save_hyperparameters(ignore=["net", "path", "optimizer", "lr_scheduler", "time_sampler"])
        self.hparams["time_sampler"] = time_sampler_name(self.time_sampler)  # a name, also for a callable
        self.net = net
        self.conditioning = Conditioning.of(net)
        self.cond_dropout = float(cond_dropout)
        self.parametrization: Parametrization = parametrization  # the name: hyperparameters and checkpoints hold it
        self.optimizer_factory = _plain_factory(optimizer)  # picklable: EMA deep-copies us, ddp_spawn pickles us
        self.lr_scheduler_factory = _plain_factory(lr_scheduler)
        self.lr_scheduler_interval = lr_scheduler_interval
        self.t_eps = float(t_eps)
        self.data_shape: tuple[int, ...] | None = tuple(data_shape) if data_shape is not None else None
        self.val_seed = int(val_seed)
        self.check_finite = check_finite
        self._finite = FiniteChecks(check_finite, check_finite_every)
        self.train_seed = None if train_seed is None else int(train_seed)
        self.set_path(CondOTPath() if path is None else path)
        self._global_batch_reported = False
        self._run_seed: int | None = None  # train_seed=None: drawn at fit start, restored from checkpoints
        self.pixel_map: PixelMap | None = None  # the data's units for bpd/to_pixels: set at fit start, checkpointed

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

    def sample_time(self, batch_size: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
        """Training times in ``[t_eps, 1 - t_eps]`` from :attr:`time_sampler` on the current path, shape
        ``(batch_size,)`` (an importance sampler's times, whose loss weights :meth:`loss` applies)."""
        return draw_times(batch_size, device, self.t_eps, generator, self.time_sampler, self.path)[0]

    def loss(
        self,
        x1: Tensor,
        generator: torch.Generator | None = None,
        cond: Tensor | None = None,
        cond_dropout: float = 0.0,
    ) -> Tensor:
        """Conditional flow-matching loss for a data batch ``x1`` (fresh times, then noise, then the condition
        dropout, all from ``generator``); ``cond``: its conditions (conditional networks)."""
        t, x0, weights = draw_time_and_noise(x1, self.t_eps, generator, self.time_sampler, self.path)
        if cond is not None:
            cond = self.conditioning.drop(cond, cond_dropout, generator)
        return self.loss_at(x0, x1, t, cond, weights)

    def loss_at(
        self, x0: Tensor, x1: Tensor, t: Tensor, cond: Tensor | None = None, weights: Tensor | None = None
    ) -> Tensor:
        """Loss for given noise, data, times, conditions and importance weights
        (:func:`ko_lightning.objective.flow_matching_loss`)."""
        return flow_matching_loss(self.net, self.param, self.path, x0, x1, t, self.loss_weighting, cond, weights)

    def _batch_tensor(self, batch: Any, batch_idx: int, stage: str) -> Tensor:
        """The data of a batch, checked (:func:`~ko_lightning.batches.check_batch`), as fp32."""
        x = self._finite.data(batch, stage, batch_idx, self.global_step, self.data_shape)
        self.data_shape = tuple(x.shape[1:])  # the first batch fixes an unknown shape; later ones were checked
        return x.float()

    def _batch_cond(self, batch: Any, batch_idx: int, stage: str, batch_size: int) -> Tensor | None:
        """The conditions of a batch for a conditional network (checked), else None (:func:`batch_condition`)."""
        return self._finite.cond(batch, stage, batch_idx, self.global_step, self.conditioning, batch_size)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x1 = self._batch_tensor(batch, batch_idx, "train")
        cond = self._batch_cond(batch, batch_idx, "train", x1.shape[0])
        self._finite.maybe_check(self.global_step)  # deferred check_finite: a sync every k steps
        if not self._global_batch_reported:
            self._global_batch_reported = True
            _report_global_batch(self, x1.shape[0])
        with step_randomness(self._noise_seed(), self.global_step, self.global_rank, x1.device) as generator:
            loss = self.loss(x1, generator, cond, self.cond_dropout)
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
        """With ``train_seed=None``, fix the run's noise seed on every rank (``PL_GLOBAL_SEED`` or a draw on rank 0);
        record the data module's pixel map (the data's units for :meth:`bpd` and :meth:`to_pixels`)."""
        if self.train_seed is None and self._run_seed is None:
            self._run_seed = int(self.trainer.strategy.broadcast(draw_run_seed(), src=0))
        self.pixel_map = data_pixel_map(getattr(self.trainer, "datamodule", None), self.pixel_map)

    def _fixed_noise_loss(self, batch: Any, batch_idx: int, stage: str) -> Tensor:
        x1 = self._batch_tensor(batch, batch_idx, stage)
        cond = self._batch_cond(batch, batch_idx, stage, x1.shape[0])
        generator = torch.Generator(device=x1.device).manual_seed(self.val_seed + batch_idx)
        loss = self.loss(x1, generator, cond)  # the conditional model's loss: no condition dropout
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
    def on_train_end(self) -> None:
        self._finite.check(self.global_step, "at the end of training")

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._finite.check(self.global_step, "before saving a checkpoint")  # never save a poisoned model
        write_module_state(
            checkpoint,
            self.path,
            self.data_shape,
            self.parametrization,
            self._noise_seed(),
            self.conditioning,
            self.pixel_map,
        )

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore path, data shape and noise seed (:func:`~ko_lightning.checkpointing.read_module_state` checks)."""
        state = read_module_state(checkpoint, self.parametrization, self.conditioning)
        if state is None:  # only net weights: they load, the rest stays the constructor's
            rank_zero_warn(missing_state_message(self.path, self.data_shape), category=UserWarning, stacklevel=5)
            return
        self.set_path(state.path)
        if state.data_shape is not None:
            self.data_shape = state.data_shape
        if state.train_seed is not None:  # the resumed run goes on with the noise stream it started
            self._run_seed = state.train_seed
        if state.pixel_map is not None:
            self.pixel_map = state.pixel_map

    @classmethod
    @override
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        """Lightning's, after :func:`~ko_lightning.checkpointing.check_checkpoint_file`; ``weights_only=True`` unless
        given: unpickles only tensors and plain containers (all ko_lightning saves). Pass False only if you trust it."""
        check_checkpoint_file(checkpoint_path)
        kwargs.setdefault("weights_only", True)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
