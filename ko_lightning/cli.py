"""The ``ko-lightning`` command: LightningCLI over FlowMatching and any LightningDataModule.

``ko-lightning fit --config recipes/<name>.yaml`` trains; every argument can be overridden on the command line
(``--trainer.max_steps 500``). Two callbacks have their own groups, so they are addressed by name: the KO schedule
(:class:`~ko_lightning.callbacks.KOScheduleCallback`) is ``ko:`` / ``--ko.*`` (``--ko.warmup_steps 10``,
``--ko.enabled false``) and the end-of-fit report is ``report:`` / ``--report.*`` (``--report.num_samples 64``,
``--report null``). Without ``--config``, ``fit``/``validate``/``test`` use the embedded checkerboard demo
(``ko_lightning/configs/checkerboard.yaml``).

Every fit saves ``last.ckpt`` at its end (:class:`~ko_lightning.callbacks.last_checkpoint.LastCheckpoint`, unless
the config has its own ``ModelCheckpoint``); ``--ckpt_path last`` picks the newest ``last.ckpt`` under the run's
logger directory. ``validate``/``test`` without ``--ckpt_path`` warn that they score the untrained weights.
"""

from __future__ import annotations

import glob
import logging
import os
import sys
import warnings
from importlib import resources
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from ko_lightning.callbacks import KOScheduleCallback
from ko_lightning.callbacks.last_checkpoint import LastCheckpoint
from ko_lightning.module import FlowMatching
from ko_lightning.progress import EpochProgressBar

__all__ = ["DEFAULT_CONFIG", "KOLightningCLI", "main", "run_cli"]

DEFAULT_CONFIG = str(resources.files("ko_lightning") / "configs" / "checkerboard.yaml")
_SUBCOMMANDS_WITH_DEFAULT = ("fit", "validate", "test")
_GROUPS_HELP = (
    "{what} FlowMatching with ko_lightning. Besides --trainer.*, --model.* and --data.*: the KO schedule "
    "(KOScheduleCallback) is the group --ko.* (e.g. --ko.warmup_steps 10, --ko.every_n_steps 500, --ko.enabled "
    "false) and the end-of-fit sample report is --report.* (e.g. --report.num_samples 64, --report.euler_steps "
    "'[4, 16]', --report null); in a YAML config they are the top-level keys ko: and report:."
)
#: messages printed by Lightning or torch that the user did not cause and cannot act on (matched exactly)
_SILENCED_WARNINGS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning's _pytree on torch >= 2.10
    "LightningCLI's args parameter is intended",  # ``args`` *is* the command line here (default config put in)
    "The dirpath has changed from",  # every resume: a new run directory is the CLI's normal layout
)
_SILENCED_INFO_PREFIX = "💡 Tip:"  # Lightning's adverts for its cloud services


def _with_default_config(argv: list[str]) -> list[str]:
    has_config = any(a in ("--config", "-c") or a.startswith("--config=") for a in argv)
    if argv and argv[0] in _SUBCOMMANDS_WITH_DEFAULT and not has_config:
        # stderr: stdout stays clean for ``--print_config > cfg.yaml``, whose output must work as ``--config``
        print(
            f"ko-lightning: no --config given, using the embedded checkerboard demo ({DEFAULT_CONFIG})", file=sys.stderr
        )
        return [argv[0], "--config", DEFAULT_CONFIG, *argv[1:]]
    return argv


def _not_a_tip(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_SILENCED_INFO_PREFIX)


def last_checkpoint(trainer: L.Trainer) -> str | None:
    """The newest ``last*.ckpt`` of earlier runs: under the first logger's root (``save_dir/name``, every version),
    else ``default_root_dir``, and in every ``ModelCheckpoint``'s explicit ``dirpath``. No collective is used."""
    roots = [c.dirpath for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.dirpath]
    logger = trainer.loggers[0] if trainer.loggers else None
    if logger is not None and logger.save_dir is not None:
        roots.append(os.path.join(logger.save_dir, str(logger.name or "")))
    else:
        roots.append(trainer.default_root_dir)
    found = [f for root in roots for f in glob.glob(os.path.join(str(root), "**", "last*.ckpt"), recursive=True)]
    return max(found, key=os.path.getmtime) if found else None


class KOLightningCLI(LightningCLI):
    """LightningCLI with the ``ko`` and ``report`` callback groups, a last checkpoint at the end of every fit, a
    progress bar without a bogus epoch total, ``--ckpt_path last`` and clear hints for common mistakes."""

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(KOScheduleCallback, "ko")
        parser.add_lightning_class_args(Callback, "report", subclass_mode=True, required=False)

    @override
    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> L.Trainer:
        configured = [*(config.get("callbacks") or []), *callbacks]
        ko = [c for c in configured if isinstance(c, KOScheduleCallback)]
        if len(ko) > 1:
            raise ValueError(
                "KOScheduleCallback is configured twice: under trainer.callbacks and as the top-level ko: group. "
                "Keep only ko: (--ko.*; --ko.enabled false switches it off)."
            )
        if config.get("enable_progress_bar", True) is not False and not any(
            isinstance(c, ProgressBar) for c in configured
        ):
            callbacks.append(EpochProgressBar())
        if config.get("enable_checkpointing", True) is not False and not any(
            isinstance(c, ModelCheckpoint) for c in configured
        ):
            callbacks.append(LastCheckpoint())
        try:
            return super()._instantiate_trainer(config, callbacks)
        except (MisconfigurationException, RuntimeError) as err:
            if "gpu" not in str(err).lower() or torch.cuda.is_available():
                raise
            raise RuntimeError(
                f"{err} This config asks for GPUs (trainer.accelerator={config.get('accelerator')!r}) and this machine "
                "has none. To run it on the CPU override: --trainer.accelerator cpu --trainer.devices 1 "
                "--trainer.strategy auto (and, for a quick try, --trainer.max_steps 20)."
            ) from err

    @override
    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        ckpt_path = kwargs.get("ckpt_path")
        if ckpt_path == "last":
            found = last_checkpoint(self.trainer)
            if found is None:
                raise FileNotFoundError(
                    "--ckpt_path last: no last.ckpt under the run directories of this config "
                    f"({self.trainer.default_root_dir}); pass --ckpt_path <file>.ckpt"
                )
            kwargs["ckpt_path"] = found
            rank_zero_warn(f"ko-lightning {subcommand}: --ckpt_path last is {found}", category=UserWarning)
        elif ckpt_path is None and subcommand in ("validate", "test"):
            found = last_checkpoint(self.trainer)
            hint = f"--ckpt_path {found} (the newest last.ckpt) or --ckpt_path last" if found else "--ckpt_path <file>"
            rank_zero_warn(
                f"ko-lightning {subcommand} without --ckpt_path scores the model as the config builds it (untrained "
                f"weights), not a trained run; pass {hint}.",
                category=UserWarning,
            )
        return kwargs


def run_cli(argv: list[str] | None = None) -> LightningCLI:
    """Run the CLI on ``argv`` (default: ``sys.argv[1:]``) and return it (its ``trainer`` and ``model``)."""
    argv = _with_default_config(list(sys.argv[1:] if argv is None else argv))
    rank_zero_loggers = [logging.getLogger(f"lightning.{p}.utilities.rank_zero") for p in ("pytorch", "fabric")]
    for log in rank_zero_loggers:
        log.addFilter(_not_a_tip)
    try:
        with warnings.catch_warnings():
            for message in _SILENCED_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            return KOLightningCLI(
                FlowMatching,
                L.LightningDataModule,
                subclass_mode_data=True,
                save_config_kwargs={"overwrite": True},
                parser_kwargs={
                    s: {"description": _GROUPS_HELP.format(what=s.capitalize())} for s in ("fit", "validate", "test")
                },
                args=argv,
            )
    finally:
        for log in rank_zero_loggers:
            log.removeFilter(_not_a_tip)


def main() -> None:
    """Console entry point ``ko-lightning``.

    Under DDP the process group is destroyed before the process exits: left to the interpreter's exit, gloo's
    teardown aborts a rank now and then (measured with plain Lightning, no ko_lightning code, under
    ``ATEN_CPU_CAPABILITY=default``), turning a finished run into a failed one.
    """
    run_cli()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":  # pragma: no cover
    main()
