"""The ``ko-lightning`` command: LightningCLI over FlowMatching and any LightningDataModule.

``ko-lightning fit --config recipes/<name>.yaml`` trains; every argument can be overridden on the command line
(``--trainer.max_steps 500``). Without ``--config``, ``fit``/``validate``/``test`` use the embedded checkerboard
demo (``ko_lightning/configs/checkerboard.yaml``).
"""

from __future__ import annotations

import sys
import warnings
from importlib import resources

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.cli import LightningCLI

from ko_lightning.module import FlowMatching

__all__ = ["DEFAULT_CONFIG", "main", "run_cli"]

DEFAULT_CONFIG = str(resources.files("ko_lightning") / "configs" / "checkerboard.yaml")
_SUBCOMMANDS_WITH_DEFAULT = ("fit", "validate", "test")


def _with_default_config(argv: list[str]) -> list[str]:
    has_config = any(a in ("--config", "-c") or a.startswith("--config=") for a in argv)
    if argv and argv[0] in _SUBCOMMANDS_WITH_DEFAULT and not has_config:
        # stderr: stdout stays clean for ``--print_config > cfg.yaml``, whose output must work as ``--config``
        print(
            f"ko-lightning: no --config given, using the embedded checkerboard demo ({DEFAULT_CONFIG})", file=sys.stderr
        )
        return [argv[0], "--config", DEFAULT_CONFIG, *argv[1:]]
    return argv


def run_cli(argv: list[str] | None = None) -> LightningCLI:
    """Run the CLI on ``argv`` (default: ``sys.argv[1:]``) and return it (its ``trainer`` and ``model``)."""
    argv = _with_default_config(list(sys.argv[1:] if argv is None else argv))
    with warnings.catch_warnings():
        # LightningCLI warns whenever ``args`` is given while sys.argv has arguments too; here ``args`` *is* the
        # command line (with the default config put in), so the warning would blame the user for nothing.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return LightningCLI(
            FlowMatching,
            L.LightningDataModule,
            subclass_mode_data=True,
            trainer_defaults={"callbacks": [RichProgressBar()]},
            save_config_kwargs={"overwrite": True},
            args=argv,
        )


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
