"""Recipes through the `ko-lightning` CLI: the checkerboard demo and a CPU smoke run of the GPU image recipes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ko_lightning.callbacks import KOScheduleCallback
from ko_lightning.cli import DEFAULT_CONFIG, _with_default_config, run_cli
from ko_lightning.paths import TabulatedPath
from recipe_configs import IMAGE_RECIPES, RECIPES, shrink_recipe


def test_without_config_the_embedded_demo_is_used() -> None:
    assert _with_default_config(["fit", "--trainer.max_steps", "5"])[:3] == ["fit", "--config", DEFAULT_CONFIG]
    assert _with_default_config(["fit", "--config", "x.yaml"]) == ["fit", "--config", "x.yaml"]
    assert (RECIPES / "checkerboard.yaml").read_text() == Path(DEFAULT_CONFIG).read_text()


def test_print_config_without_config_writes_only_yaml_that_works_as_config(tmp_path) -> None:
    """`ko-lightning fit --print_config > cfg.yaml` put the "no --config given" banner on stdout, so `--config
    cfg.yaml` failed; and every command warned that "LightningCLI's args parameter is intended to run from within
    Python", which the user had not done. The banner now goes to stderr and the warning is gone."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "ko_lightning.cli", "fit"]
    first = subprocess.run([*command, "--print_config"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "no --config given" in first.stderr and "no --config given" not in first.stdout
    config = tmp_path / "cfg.yaml"
    config.write_text(first.stdout)
    assert yaml.safe_load(first.stdout)["trainer"]["max_steps"] == 4000
    again = subprocess.run(
        [*command, "--config", str(config), "--trainer.max_steps", "7", "--print_config"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert yaml.safe_load(again.stdout)["trainer"]["max_steps"] == 7
    for run in (first, again):
        assert "args parameter is intended" not in run.stderr + run.stdout


def test_checkerboard_demo_trains_with_ko_and_writes_its_report(tmp_path) -> None:
    cli = run_cli(
        [
            "fit",
            "--trainer.max_steps",
            "30",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
            "--trainer.val_check_interval",
            "30",
            "--data.init_args.n_train",
            "8192",
            "--data.init_args.n_val",
            "1024",
            "--data.init_args.n_test",
            "1024",
            "--model.lr_scheduler.init_args.T_max",
            "30",
        ]
    )
    run_dir = Path(cli.trainer.log_dir)
    assert isinstance(cli.model.path, TabulatedPath)  # the KO path installed by the callback
    ko = next(cb for cb in cli.trainer.callbacks if isinstance(cb, KOScheduleCallback))
    init = ko.reports[0]
    assert init.installed and init.ke_min <= init.ke_new <= init.ke_cond_ot  # optimality of the installed path
    for name in ("samples.png", "metrics.md", "ko_schedule.png", "config.yaml"):
        assert (run_dir / name).is_file(), name
    table = (run_dir / "metrics.md").read_text()
    rows = re.findall(r"^\| euler (\d+) \| (\d+) \|", table, flags=re.M)
    assert [(int(a), int(b)) for a, b in rows] == [(2, 2), (8, 8), (32, 32), (100, 100)]  # NFE = Euler steps


@pytest.mark.parametrize("recipe", IMAGE_RECIPES)
def test_gpu_image_recipe_smoke_on_cpu(tmp_path, recipe: str) -> None:
    """The GPU recipe's own code path (U-Net, bf16-mixed, EMA, KO callback, checkpoints) at toy size on the CPU."""
    config = yaml.safe_load((RECIPES / recipe).read_text())
    assert config["trainer"]["precision"] == "bf16-mixed" and config["trainer"]["strategy"] == "ddp"
    small = shrink_recipe(recipe, tmp_path)
    cli = run_cli(["fit", "--config", str(small)])
    assert cli.trainer.precision == "bf16-mixed"
    assert cli.trainer.global_step == 4
    ko = next(cb for cb in cli.trainer.callbacks if isinstance(cb, KOScheduleCallback))
    assert [r.step for r in ko.reports] == [0, 2]  # init, step 2; none at the last step (4)
    assert isinstance(cli.model.path, TabulatedPath)
    saved = sorted(p.name for p in (tmp_path / "ckpt").glob("*.ckpt"))
    assert "last.ckpt" in saved and any("step=4" in name for name in saved)
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert "current_model_state" in checkpoint  # EMA keeps both the averaged and the raw weights
    assert "ko_lightning" in checkpoint and checkpoint["ko_lightning"]["path"]["class"].endswith("TabulatedPath")
    if "conditional" in recipe:  # a class embedding and the guidance report: NFE per scale, no classifier columns
        assert cli.model.conditioning.num_classes == 10 and cli.model.cond_dropout == 0.1
        table = (Path(cli.trainer.log_dir) / "guidance.md").read_text()
        rows = re.findall(r"^\| ([0-9.]+) \| (\d+) \| [0-9.]+ \|$", table, flags=re.M)
        assert [(float(w), int(n)) for w, n in rows] == [(0, 2), (1, 2), (1.5, 4), (2, 4), (3, 4)]
