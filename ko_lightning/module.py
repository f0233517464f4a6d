"""FlowMatching: the LightningModule that trains any ``net(x, t)`` on any Gaussian path."""

from __future__ import annotations

import functools
import math
import os
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from ko_lightning.batches import batch_data
from ko_lightning.paths import CondOTPath, GaussianPath, PathCoefficients, PathSample
from ko_lightning.paths.serialization import path_from_state, path_to_state
from ko_lightning.likelihood import BitsPerDimResult, LogProbResult, bits_per_dim, log_prob
from ko_lightning.sampling import ADAPTIVE_METHODS, SampleResult, SolverSpec, integrate
from ko_lightning.seeding import derive_seed

__all__ = ["FlowMatching", "Parametrization"]

Parametrization = Literal["velocity", "x1", "eps", "polar_v"]
_PARAMETRIZATIONS = ("velocity", "x1", "eps", "polar_v")
_CHECKPOINT_KEY = "ko_lightning"


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


def _draw_run_seed() -> int:
    """``PL_GLOBAL_SEED`` (``seed_everything``) if set, else a draw from the global RNG, in ``[0, 2**31)``."""
    seed = os.environ.get("PL_GLOBAL_SEED")
    return int(seed) % 2**31 if seed is not None else int(torch.randint(2**31, (1,)))


def _polar(c: PathCoefficients) -> tuple[Tensor, Tensor, Tensor]:
    """``(sin theta, cos theta, r)`` of ``(alpha, sigma) = r (sin theta, cos theta)``."""
    r = torch.sqrt(c.alpha**2 + c.sigma**2)
    return c.alpha / r, c.sigma / r, r


class FlowMatching(L.LightningModule):
    """Flow matching on a Gaussian path ``x_t = alpha_t x1 + sigma_t x0`` (t = 0 noise, t = 1 data).

    The loss is the conditional flow-matching objective in velocity units,
    ``E_{t, x0, x1} || v_theta(x_t, t) - (alpha'_t x1 + sigma'_t x0) ||^2 / D`` (mean over all elements), with
    ``t ~ U[t_eps, 1 - t_eps]``. Path coefficients, targets and the loss are fp32, also under bf16 autocast.

    Parametrizations (what ``net`` predicts, converted to a velocity by the path):

    - ``"velocity"``: ``net(x_t, t)`` is the velocity.
    - ``"x1"`` / ``"eps"``: ``net(x_t, t)`` predicts data / noise; for ``"x1"`` the loss is
      ``beta_t^2 ||x1_hat - x1||^2`` (docs/math.md §1).
    - ``"polar_v"`` (path-invariant, docs/math.md §5): with ``r = sqrt(alpha^2 + sigma^2)`` and
      ``theta = atan2(alpha, sigma)``, the network sees ``net(x_t / r, 2 theta / pi)`` and predicts
      ``v_theta = cos(theta) x1 - sin(theta) x0``, the rate of change of ``x_t / r`` in angle. Then
      ``x1 = sin(theta) x_t/r + cos(theta) v_theta``, ``x0 = cos(theta) x_t/r - sin(theta) v_theta`` and
      ``u = alpha' x1 + sigma' x0``: no division by a vanishing coefficient at either end, and the function the
      network learns, ``E[v_theta | x_t / r, theta]``, is the same for every Gaussian path, so a schedule change
      (the KO callback) does not invalidate it. The velocity loss equals ``(r theta')^2 ||v_hat - v||^2``.

    Loss weighting: ``"velocity"`` is the flow-matching objective above; ``"output"`` is the plain MSE in the
    network's output space (``||x1_hat - x1||^2`` for ``"x1"``, ``||eps_hat - x0||^2`` for ``"eps"``,
    ``||v_hat - v_theta||^2`` for ``"polar_v"``). Both have the same minimizer. The velocity weight
    ``(r theta')^2`` of ``polar_v`` is bounded on Cond-OT (it is ``1 / r^2``, between 1 and 2) but large where a
    path turns fast, as the KO path does near t = 0 (docs/math.md §4), which makes the loss's variance explode; the
    default for ``polar_v`` is therefore ``"output"`` (the path then acts only through the distribution of angles
    it visits), and ``"velocity"`` for the other parametrizations.

    The path is schedule state, not a weight: it is not a registered submodule (so weight averaging and DDP buffer
    broadcasts leave it alone), it follows the module's device, and it is saved in and restored from checkpoints.
    Use :meth:`set_path` to change it (the KO callback does this).

    Args:
        net: any module with ``forward(x, t)``, ``t`` of shape ``(B,)``.
        path: the Gaussian path (default ``CondOTPath()``).
        parametrization: what ``net`` predicts: ``"velocity"``, ``"x1"``, ``"eps"`` or ``"polar_v"``.
        loss_weighting: ``"velocity"`` or ``"output"``; None picks ``"output"`` for ``polar_v``, else
            ``"velocity"``.
        optimizer: callable ``params -> Optimizer`` (default Adam, lr 1e-3).
        lr_scheduler: optional callable ``optimizer -> LRScheduler``, stepped every ``lr_scheduler_interval``.
        lr_scheduler_interval: ``"step"`` or ``"epoch"``.
        t_eps: train on ``t ~ U[t_eps, 1 - t_eps]``, in ``[0, 0.5)``; paths with a singular end (VP) need > 0.
        data_shape: shape of one sample; inferred from the first batch when None.
        val_seed: seed of the fixed noise and times used for validation/test losses (comparable across epochs).
        check_finite: raise on non-finite values in a batch (costs one device sync per step).
        train_seed: if set, the noise and times of training step ``k`` on rank ``r`` come from a generator seeded
            by ``(train_seed, k, r)``, so a resumed run draws exactly what an uninterrupted one would.

    Example:
        >>> from ko_lightning.nets import TimeMLP
        >>> model = FlowMatching(TimeMLP(dim=2), path=CondOTPath())
        >>> loss = model.loss(torch.randn(8, 2))
        >>> res = model.sample(16, steps=10)  # doctest: +SKIP
    """

    def __init__(
        self,
        net: nn.Module,
        path: GaussianPath | None = None,
        parametrization: Parametrization = "velocity",
        loss_weighting: Literal["velocity", "output"] | None = None,
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
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be a torch.nn.Module with forward(x, t), got {type(net).__name__}")
        if parametrization not in _PARAMETRIZATIONS:
            raise ValueError(f"parametrization must be one of {_PARAMETRIZATIONS}, got {parametrization!r}")
        if loss_weighting not in (None, "velocity", "output"):
            raise ValueError(f"loss_weighting must be 'velocity', 'output' or None, got {loss_weighting!r}")
        if not 0.0 <= float(t_eps) < 0.5:
            raise ValueError(f"t_eps must lie in [0, 0.5), got {t_eps!r}")
        if lr_scheduler_interval not in ("step", "epoch"):
            raise ValueError(f"lr_scheduler_interval must be 'step' or 'epoch', got {lr_scheduler_interval!r}")
        self.save_hyperparameters(ignore=["net", "path", "optimizer", "lr_scheduler"])
        self.net = net
        self.parametrization: Parametrization = parametrization
        if loss_weighting is None:
            loss_weighting = "output" if parametrization == "polar_v" else "velocity"
        self.loss_weighting = loss_weighting
        # Only plain, picklable state on the module: EMA deep-copies it and ddp_spawn pickles it.
        self.optimizer_factory = _plain_factory(optimizer)
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

    # ------------------------------------------------------------------ the path
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

    # ------------------------------------------------------------------ the objective
    def velocity(self, x: Tensor, t: Tensor) -> Tensor:
        """Model velocity ``v_theta(x, t)`` in fp32, whatever the parametrization (``t`` is checked to lie in
        ``[0, 1]``)."""
        return self._velocity(x, t, validate=True)

    def _solver_velocity(self, x: Tensor, t: Tensor) -> Tensor:
        """:meth:`velocity` for the ODE right-hand side: the integrators keep ``t`` inside ``[0, 1]``, so the range
        check (a device sync per evaluation on a GPU) is skipped."""
        return self._velocity(x, t, validate=False)

    def _velocity(self, x: Tensor, t: Tensor, validate: bool) -> Tensor:
        c = self.path.at(t, x, validate)
        return self._output_to_velocity(self._net_output(x, t, c), x, c)

    def predict_x1(self, x: Tensor, t: Tensor) -> Tensor:
        """Model estimate of ``E[x1 | x_t = x]`` in fp32 (used by the separation-function estimator)."""
        c = self.path.at(t, x)
        out = self._net_output(x, t, c)
        if self.parametrization == "polar_v":
            sin, cos, r = _polar(c)
            return sin * (x.float() / r) + cos * out.float()
        if self.parametrization == "x1":
            return out.float()
        if self.parametrization == "eps":
            return c.x1_from_eps(x, out)
        return c.x1_from_velocity(x, out)

    def _net_output(self, x_t: Tensor, t: Tensor, c: PathCoefficients) -> Tensor:
        """Run the network: on ``(x_t, t)``, or on ``(x_t / r, 2 theta / pi)`` for ``polar_v``."""
        if self.parametrization == "polar_v":
            sin, cos, r = _polar(c)
            angle = torch.atan2(sin, cos).reshape(-1) * (2.0 / torch.pi)
            out = self.net((x_t.float() / r).to(x_t.dtype), angle)
        else:
            out = self.net(x_t, t)
        if out.shape != x_t.shape:
            raise ValueError(f"net output has shape {tuple(out.shape)} but its input x has {tuple(x_t.shape)}")
        return out

    def _output_to_velocity(self, out: Tensor, x_t: Tensor, c: PathCoefficients) -> Tensor:
        if self.parametrization == "velocity":
            return out.float()
        if self.parametrization == "x1":
            return c.velocity_from_x1(x_t, out)
        if self.parametrization == "eps":
            return c.velocity_from_eps(x_t, out)
        sin, cos, r = _polar(c)
        x_unit, v = x_t.float() / r, out.float()
        return c.d_alpha * (sin * x_unit + cos * v) + c.d_sigma * (cos * x_unit - sin * v)

    def sample_time(self, batch_size: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
        """``t ~ U[t_eps, 1 - t_eps]``, shape ``(batch_size,)``, fp32."""
        u = torch.rand(batch_size, device=device, generator=generator)
        return self.t_eps + (1.0 - 2.0 * self.t_eps) * u

    def loss(self, x1: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Conditional flow-matching loss for a data batch ``x1`` (fresh noise and times)."""
        t = self.sample_time(x1.shape[0], x1.device, generator)
        x0 = torch.randn(x1.shape, device=x1.device, generator=generator)
        return self.loss_at(x0, x1, t)

    def loss_at(self, x0: Tensor, x1: Tensor, t: Tensor) -> Tensor:
        """Loss for given noise ``x0``, data ``x1`` and times ``t``: mean squared error in velocity units, or in
        the network's output space (``loss_weighting``)."""
        sample: PathSample = self.path.sample(x0, x1, t, validate=False)  # t comes from sample_time or a caller
        out = self._net_output(sample.x_t, t, sample.coefficients)
        if self.loss_weighting == "velocity":
            v = self._output_to_velocity(out, sample.x_t, sample.coefficients)
            return (v - sample.target).pow(2).mean()
        return (out.float() - self._output_target(sample, x0, x1)).pow(2).mean()

    def _output_target(self, sample: PathSample, x0: Tensor, x1: Tensor) -> Tensor:
        """What the network should output for this draw (its regression target in output space)."""
        if self.parametrization == "velocity":
            return sample.target
        if self.parametrization == "x1":
            return x1.float()
        if self.parametrization == "eps":
            return x0.float()
        sin, cos, _ = _polar(sample.coefficients)
        return cos * x1.float() - sin * x0.float()

    # ------------------------------------------------------------------ Lightning hooks
    def _batch_tensor(self, batch: Any, batch_idx: int, stage: str) -> Tensor:
        """The data tensor of a batch (a tensor, a tuple/list starting with one, or a dict; see
        :func:`ko_lightning.batches.batch_data`), as fp32.

        Every check runs before any state changes (``data_shape`` is only inferred from a valid batch), and each
        error names the stage and the batch index.

        Raises:
            TypeError: for a batch that is not a tensor, or whose dtype is not floating point (e.g. uint8 pixels:
                normalize them to floats first).
            ValueError: for an empty batch, samples of the wrong shape, or (``check_finite``) NaN/inf values.
        """
        where = f"{stage} batch {batch_idx}"
        if isinstance(batch, (list, tuple)) and len(batch) == 0:
            raise ValueError(f"{where} is an empty {type(batch).__name__}: expected a tensor of samples")
        x = batch_data(batch, where)
        if x.ndim == 0:
            raise ValueError(f"{where} is a 0-dim tensor: expected a batch of samples of shape (B, *data_shape)")
        if x.shape[0] == 0 or x.numel() == 0:
            # The mean loss over zero samples is NaN, and training would go on with it.
            raise ValueError(f"{where} is empty (shape {tuple(x.shape)}): the loss of zero samples is undefined; "
                             "check the data set split and the loader (e.g. a sampler that yields no indices)")
        if not x.is_floating_point():
            raise TypeError(
                f"{where} has dtype {x.dtype}; FlowMatching trains on floating point data in model space (e.g. "
                "pixels mapped to [-1, 1]), and integer values such as 0..255 would be taken as coordinates. "
                "Normalize the batch to floats first, e.g. with the data module's transform (ImageDataModule "
                "maps uint8 pixels u to u / 127.5 - 1)"
            )
        if self.data_shape is not None and tuple(x.shape[1:]) != self.data_shape:
            raise ValueError(f"{where}: samples have shape {tuple(x.shape[1:])}, "
                             f"expected data_shape {self.data_shape}")
        if self.check_finite:
            bad = int((~torch.isfinite(x)).sum())
            if bad:
                raise ValueError(f"{where} contains {bad} non-finite value(s) (NaN or Inf)")
        if self.data_shape is None:
            self.data_shape = tuple(x.shape[1:])
        return x.float()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x1 = self._batch_tensor(batch, batch_idx, "train")
        if not self._global_batch_reported:
            self._report_global_batch(x1.shape[0])
        # Everything random in step k on rank r comes from (seed, k, r): the noise and times through a generator,
        # the network's own randomness (dropout) through the global RNG, seeded inside a fork that restores it.
        # A resumed run therefore draws exactly what the uninterrupted run drew.
        step_seed = derive_seed(self._effective_train_seed(), self.global_step, self.global_rank)
        generator = torch.Generator(device=x1.device).manual_seed(step_seed)
        cuda = [x1.device] if x1.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda, device_type="cuda"):
            torch.manual_seed(derive_seed(step_seed, 1))
            loss = self.loss(x1, generator=generator)
        self.log("train/loss", loss, prog_bar=True, batch_size=x1.shape[0])
        return loss

    def _effective_train_seed(self) -> int:
        """``train_seed``, or the seed drawn for this run (:meth:`on_fit_start`) or restored from its checkpoint."""
        if self.train_seed is not None:
            return self.train_seed
        if self._run_seed is None:  # a training step outside Trainer.fit (e.g. a test calling it directly)
            self._run_seed = _draw_run_seed()
        return self._run_seed

    def on_fit_start(self) -> None:
        """Fix the seed of this run's training noise, identically on every rank (broadcast from rank 0).

        With ``train_seed=None`` it is ``PL_GLOBAL_SEED`` (set by ``seed_everything``) when present, else a fresh
        draw; either way it is saved in checkpoints, so a resumed run goes on with the same noise stream.
        """
        if self.train_seed is None and self._run_seed is None:
            self._run_seed = int(self.trainer.strategy.broadcast(_draw_run_seed(), src=0))

    def _fixed_noise_loss(self, batch: Any, batch_idx: int, stage: str) -> Tensor:
        x1 = self._batch_tensor(batch, batch_idx, stage)
        gen = torch.Generator(device=x1.device).manual_seed(self.val_seed + batch_idx)
        loss = self.loss(x1, generator=gen)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", sync_dist=True, batch_size=x1.shape[0])
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._fixed_noise_loss(batch, batch_idx, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._fixed_noise_loss(batch, batch_idx, "test")

    def _report_global_batch(self, per_device: int) -> None:
        self._global_batch_reported = True
        if self._trainer is None:
            return
        trainer = self.trainer
        accumulate = int(getattr(trainer, "accumulate_grad_batches", 1))
        world = int(trainer.world_size)
        global_batch = per_device * world * accumulate
        rank_zero_info(
            f"ko_lightning: global batch = {per_device} per device x {world} device(s) x {accumulate} "
            f"accumulation = {global_batch}"
        )
        self.log("global_batch_size", float(global_batch), rank_zero_only=True, batch_size=per_device)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.lr_scheduler_interval}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.setdefault(_CHECKPOINT_KEY, {})
        state["path"] = path_to_state(self.path)
        state["data_shape"] = self.data_shape
        state["parametrization"] = self.parametrization
        state["train_seed"] = self._effective_train_seed()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the path and data shape saved by :meth:`on_save_checkpoint`, after checking the checkpoint.

        Everything is checked before anything changes, so a rejected checkpoint leaves the module as it was.

        - No ``"ko_lightning"`` entry and weights outside ``net.``: the checkpoint comes from another module:
          ``ValueError``.
        - No ``"ko_lightning"`` entry but only ``net.`` weights (an old or hand-made checkpoint): a warning; the
          path and ``data_shape`` stay the constructor's.
        - Saved with another parametrization than this module's: ``ValueError`` naming both (the network's
          output would be read as something else).
        """
        state = checkpoint.get(_CHECKPOINT_KEY)
        if state is None:
            weights = checkpoint.get("state_dict")
            foreign = sorted(k for k in weights if not k.startswith("net.")) if isinstance(weights, dict) else []
            if foreign:
                raise ValueError(
                    f"this checkpoint was not saved by FlowMatching: it has no {_CHECKPOINT_KEY!r} entry and its "
                    f"state_dict holds {len(foreign)} entries outside 'net.' (e.g. {foreign[0]!r}); load it into "
                    "the module class that saved it"
                )
            warnings.warn(
                f"the checkpoint has no {_CHECKPOINT_KEY!r} entry (saved by an older ko_lightning or edited by "
                f"hand): the weights load, but the path stays the constructor's {self.path!r} and data_shape stays "
                f"{self.data_shape}; if the model was trained on another path, pass it as path=... or call "
                "set_path()",
                UserWarning,
                stacklevel=2,
            )
            return
        if not isinstance(state, dict) or "path" not in state:
            raise ValueError(f"the checkpoint's {_CHECKPOINT_KEY!r} entry is malformed (expected a dict with a "
                             f"'path'), got {type(state).__name__}")
        saved = state.get("parametrization")
        if saved is not None and saved != self.parametrization:
            raise ValueError(
                f"the checkpoint was saved with parametrization={saved!r}, but this FlowMatching has "
                f"parametrization={self.parametrization!r}: its network predicts something else. Construct the "
                f"module with parametrization={saved!r} (load_from_checkpoint restores it unless overridden)"
            )
        path = path_from_state(state["path"])  # may raise; nothing has changed yet
        self.set_path(path)
        if state.get("data_shape") is not None:
            self.data_shape = tuple(state["data_shape"])
        if state.get("train_seed") is not None:  # the resumed run goes on with the noise stream it started
            self._run_seed = int(state["train_seed"])

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """Lightning's ``load_from_checkpoint``, after checking that a local file is a readable checkpoint, so that
        a truncated or corrupt file is an error naming it (torch's own message does not).

        Unpickles nothing but tensors and plain containers (``weights_only=True``, the safe default; everything
        ko_lightning saves loads that way). Pass ``weights_only=False`` only for a checkpoint you trust that holds
        other objects.
        """
        _check_checkpoint_file(checkpoint_path)
        kwargs.setdefault("weights_only", True)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
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
    ) -> SampleResult:
        """Draw samples by solving ``dx/dt = v_theta(x, t)`` from noise ``x0 ~ N(0, I)`` at ``t = t_eps`` to
        ``t = 1 - t_eps``.

        The solve covers exactly the trained range ``[t_eps, 1 - t_eps]`` (``[0, 1]`` with the default
        ``t_eps = 0``): the network never saw times outside it, and a parametrization's conversion to a velocity
        can be singular at an end (``eps`` divides by ``alpha_t``, 0 at t = 0; ``x1`` by ``sigma_t``, 0 at
        t = 1 when ``sigma_min = 0``; VP's ``sigma'_t`` diverges at t = 1). The prior ``N(0, I)`` is placed at
        ``t_eps``, an approximation of ``p_{t_eps}`` of the same order as stopping at ``1 - t_eps``;
        :meth:`log_prob` uses the same convention, so both describe one model. Where the conversion is undefined
        at an end of the range this is a ``ValueError`` that says so (train with ``t_eps > 0``), and a result
        with NaN or inf is a :class:`~ko_lightning.sampling.SolverError` naming the parametrization, the path and
        the time: never a silent NaN.

        Fixed-step methods (euler, midpoint, heun, heun3, rk4) take ``steps`` (default 100); adaptive methods
        (dopri5, ...) take ``atol``/``rtol`` (default 1e-5) and ``max_num_steps``. A knob that does not belong to
        the method is an error. The network runs in eval mode.

        Args:
            num_samples: how many samples (noise drawn with ``generator``); or give ``x0``.
            x0: initial noise, shape ``(B, *data_shape)``, floating point.
            method: ODE method.
            steps: number of steps of a fixed-step method.
            atol: absolute tolerance of an adaptive method.
            rtol: relative tolerance of an adaptive method.
            generator: random generator for the initial noise.
            time_points: optional times at which to also return the trajectory: strictly increasing, starting
                at ``t_eps`` (where ``x0`` lives; 0 by default) and ending at or before ``1 - t_eps``. The
                samples are always the state at ``1 - t_eps``.
            max_num_steps: step attempts an adaptive method may take (default
                :data:`~ko_lightning.sampling.DEFAULT_MAX_NUM_STEPS`) before it stops with an error naming the
                method, tolerances and the time reached.

        Returns:
            ``SampleResult(samples, nfe, trajectory, time_points)``; ``nfe`` is the exact number of network calls.

        Raises:
            ValueError: naming the argument (``num_samples``, ``x0``, ``time_points``, a solver knob), or when the
                parametrization's conversion is undefined at an end of ``[t_eps, 1 - t_eps]`` on this path.
            ko_lightning.sampling.SolverError: for a non-finite result or an adaptive solve that cannot finish.
        """
        if (num_samples is None) == (x0 is None):
            raise ValueError("give exactly one of num_samples or x0")
        solver = self._solver(method, steps, atol, rtol, max_num_steps)
        t_start, t_end = self._solve_range()
        if x0 is None:
            if self.data_shape is None:
                raise ValueError("data_shape is unknown (the model has seen no batch): pass x0 or set data_shape")
            if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
                raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
            x0 = torch.randn((num_samples, *self.data_shape), generator=generator,
                             device=generator.device if generator is not None else "cpu")
        else:
            self._check_noise(x0)
        with self.eval_mode():
            return integrate(self._solver_velocity, x0.to(self.device).float(), solver, t_start=t_start,
                             t_end=t_end, time_points=time_points, context=self._context())

    def _check_noise(self, x0: Any) -> None:
        """``x0`` must be a finite floating point tensor of shape ``(B, *data_shape)``."""
        if not torch.is_tensor(x0):
            raise TypeError(f"x0 must be a tensor of initial noise, got {type(x0).__name__}")
        if not x0.is_floating_point():
            raise TypeError(f"x0 must be floating point noise, got dtype {x0.dtype}")
        if x0.ndim < 1 or x0.shape[0] == 0 or x0.numel() == 0:
            raise ValueError(f"x0 must hold at least one sample, got shape {tuple(x0.shape)}")
        if self.data_shape is not None and tuple(x0.shape[1:]) != self.data_shape:
            raise ValueError(f"x0 has samples of shape {tuple(x0.shape[1:])}, expected data_shape {self.data_shape}")
        bad = int((~torch.isfinite(x0)).sum())
        if bad:
            raise ValueError(f"x0 contains {bad} non-finite value(s) (NaN or Inf)")

    def _context(self) -> str:
        """How solver errors name this model: its parametrization, path and trained range."""
        return f"FlowMatching(parametrization={self.parametrization!r}, path={self.path!r}, t_eps={self.t_eps:g})"

    def _solve_range(self) -> tuple[float, float]:
        """``(t_eps, 1 - t_eps)``, the interval sampling and likelihoods integrate over, after checking that the
        path's coefficients are finite at both ends and that the parametrization's conversion to a velocity is
        defined there (``eps`` needs ``alpha_t > 0`` at ``t_eps``, ``x1`` needs ``sigma_t > 0`` at
        ``1 - t_eps``). Inside the range paths are smooth with ``alpha, sigma > 0``.

        Raises:
            ValueError: naming the parametrization, the path, the end and the remedy (``t_eps > 0``).
        """
        lo, hi = self.t_eps, 1.0 - self.t_eps
        c = self.path(torch.tensor([lo, hi], dtype=torch.float32, device=self.device))
        alpha, sigma, d_alpha, d_sigma = torch.stack([c.alpha, c.sigma, c.d_alpha, c.d_sigma]).cpu().tolist()
        problems = []
        for k, t in enumerate((lo, hi)):
            values = {"alpha": alpha[k], "sigma": sigma[k], "alpha'": d_alpha[k], "sigma'": d_sigma[k]}
            bad = [name for name, v in values.items() if not math.isfinite(v)]
            if bad:
                problems.append(f"{', '.join(bad)} not finite at t = {t:g}")
        if self.parametrization == "eps" and not alpha[0] > 0:
            problems.append(
                f"parametrization 'eps' converts through x1 = (x_t - sigma_t eps) / alpha_t and alpha_t = "
                f"{alpha[0]:g} at t = {lo:g} (the predicted noise does not determine E[x1 | x_t] there)"
            )
        if self.parametrization == "x1" and not sigma[1] > 0:
            problems.append(
                f"parametrization 'x1' converts through eps = (x_t - alpha_t x1) / sigma_t and sigma_t = "
                f"{sigma[1]:g} at t = {hi:g}"
            )
        if problems:
            raise ValueError(
                f"{self._context()}: the velocity is undefined at an end of the range [t_eps, 1 - t_eps] = "
                f"[{lo:g}, {hi:g}] that sampling and likelihoods integrate over: " + "; ".join(problems)
                + ". Train (and sample) with t_eps > 0, e.g. t_eps=1e-3, so that the range avoids the singular end."
            )
        return lo, hi

    @contextmanager
    def eval_mode(self) -> Iterator[None]:
        """Run the network in eval mode (dropout off), restoring the previous mode afterwards."""
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

    @staticmethod
    def _solver(
        method: str, steps: int | None, atol: float | None, rtol: float | None, max_num_steps: int | None = None
    ) -> SolverSpec:
        """One knob per mode; a fixed-step method without ``steps`` takes 100."""
        if steps is None and atol is None and rtol is None and max_num_steps is None and (
            method not in ADAPTIVE_METHODS
        ):
            steps = 100
        return SolverSpec(method=method, steps=steps, atol=atol, rtol=rtol, max_num_steps=max_num_steps)

    # ------------------------------------------------------------------ likelihood
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
        """Log-density of data ``x`` under the model flow (instantaneous change of variables).

        ``log p(x) = log N(x_{t_eps}; 0, I) - int_{t_eps}^{1 - t_eps} div v_theta(x_t, t) dt``, integrated from
        the data at ``t = 1 - t_eps`` back to ``t_eps``: the same model :meth:`sample` draws from (see there for
        the range; ``[0, 1]`` with the default ``t_eps = 0``). See :func:`ko_lightning.likelihood.log_prob`: exact
        divergence up to 32 dimensions, else Hutchinson with one fixed probe per solve. Gradients flow to ``x``
        when it requires grad. Runs in eval mode.

        Raises:
            ValueError: for bad arguments, or a parametrization undefined at an end of the range (as in
                :meth:`sample`).
            ko_lightning.sampling.SolverError: when the result is NaN or inf (naming the parametrization, the
                path and the time), or an adaptive solve exhausts ``max_num_steps``.
        """
        t_start, t_end = self._solve_range()
        with self.eval_mode():
            return log_prob(self._solver_velocity, x.to(self.device),
                            self._solver(method, steps, atol, rtol, max_num_steps), divergence=divergence,
                            generator=generator, t_start=t_end, t_end=t_start, progress=progress,
                            context=self._context())

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
        """Bits per dimension of integer images ``x`` (uint8 or integer-valued, in ``[0, num_bins - 1]``).

        Uniform dequantization into ``data_range`` and the 8-bit term:
        ``bpd = -(log p(y) + D log((hi - lo) / num_bins)) / (D ln 2)``, an upper bound on ``-log2 P(x) / D``
        (see :func:`ko_lightning.likelihood.bits_per_dim`), with ``log p`` as in :meth:`log_prob`. Runs in eval
        mode.
        """
        t_start, t_end = self._solve_range()
        with self.eval_mode():
            return bits_per_dim(self._solver_velocity, x.to(self.device),
                                self._solver(method, steps, atol, rtol, max_num_steps), divergence=divergence,
                                generator=generator, t_start=t_end, t_end=t_start, progress=progress,
                                num_bins=num_bins, data_range=data_range, context=self._context())


def _check_checkpoint_file(checkpoint_path: Any) -> None:
    """A local checkpoint file must exist and be a complete zip archive (torch.save's format since torch 1.6; the
    end of the file holds the archive's directory, so a truncated file fails this check) or a legacy pickle; else
    an error naming the file. Remote URLs and file objects are left to Lightning."""
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
