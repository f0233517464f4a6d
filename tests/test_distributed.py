"""Multi-process training as users launch it (gloo on the CPU), with every default on: no rank may hang.

Each launch runs in its own process group with a timeout, so a deadlock fails the test instead of hanging CI.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from launching import launch, torchrun

from recipe_configs import ALL_RECIPES, shrink_recipe

SCRIPTS = Path(__file__).resolve().parent / "scripts"


def ko_lightning_command() -> list[str]:
    """The installed ``ko-lightning`` console script (as a user runs it), else the module it points to."""
    script = Path(sys.executable).parent / "ko-lightning"
    return [str(script)] if script.is_file() else ["-m", "ko_lightning.cli"]


def test_readme_torchrun_launch_of_the_default_demo_finishes_with_every_output(tmp_path) -> None:
    """The reported deadlock, exactly: the embedded demo (KO refresh, picture, CSV logger, sample report) on two
    torchrun ranks hung at the first refresh, since rank 0 alone called the collective ``trainer.log_dir``."""
    done = launch(
        torchrun(
            *ko_lightning_command(),
            "fit",
            "--trainer.accelerator",
            "cpu",
            "--trainer.devices",
            "2",
            "--trainer.strategy",
            "ddp",
            "--trainer.max_steps",
            "60",
        ),
        tmp_path,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    assert "KO refresh at step 0" in done.stdout
    run_dir = tmp_path / "runs" / "checkerboard" / "version_0"
    for name in ("ko_schedule.png", "samples.png", "metrics.md", "metrics.csv", "config.yaml"):
        assert (run_dir / name).is_file(), name
    assert "| euler 100 | 100 |" in (run_dir / "metrics.md").read_text()
    assert not (tmp_path / "ko_schedule.png").exists()  # nothing dropped into the working directory


def test_every_recipe_and_both_refresh_failures_under_torchrun(tmp_path) -> None:
    """Every shipped recipe at toy size on two ranks (KO, EMA, bf16, checkpoints, reports as configured), then a
    refresh that fails on rank 0 (solve) and one that fails on rank 1 only (estimate): both ranks must end."""
    configs = [
        shrink_recipe(recipe, tmp_path / recipe.removesuffix(".yaml"), devices=2, strategy="ddp")
        for recipe in ALL_RECIPES
    ]
    jobs = [f"config:{c}" for c in configs] + ["fail:solve", "fail:estimate"]
    done = launch(torchrun(str(SCRIPTS / "ddp_torchrun_jobs.py"), str(tmp_path), *jobs), tmp_path)
    assert done.returncode == 0, done.stdout[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert [r["job"] for r in rank0] == [r["job"] for r in rank1] == jobs
    for recipe, a, b in zip(ALL_RECIPES, rank0[: len(ALL_RECIPES)], rank1[: len(ALL_RECIPES)], strict=True):
        assert a["finished"] and b["finished"], (recipe, a["error"], b["error"])
        assert a["global_step"] == b["global_step"] == 4
        assert a["refreshes"] == b["refreshes"] == [0, 2]  # init and step 2; none at the last step
        assert a["path"] == b["path"], recipe  # bit-identical KO tables on both ranks
        run_dirs = list((tmp_path / recipe.removesuffix(".yaml")).glob("*/version_0"))
        assert len(run_dirs) == 1 and (run_dirs[0] / "ko_schedule.png").is_file(), recipe
        if "conditional" in recipe:  # the guidance report samples on rank 0 alone, after both ranks set it up
            assert (run_dirs[0] / "guidance.md").is_file() and (run_dirs[0] / "guidance.png").is_file(), recipe
    solve0, solve1 = rank0[-2]["error"], rank1[-2]["error"]
    assert "solving the KO path at step 3 failed on rank 0: ZeroDivisionError" in solve0
    assert "solving the KO path at step 3 failed on rank 0: ZeroDivisionError" in solve1
    est0, est1 = rank0[-1]["error"], rank1[-1]["error"]
    assert "failed on 1 of 2 rank(s)" in est0 and "see the error printed by that rank" in est0
    assert "failed on 1 of 2 rank(s)" in est1 and "MemoryError: planted failure" in est1


def test_gpu_recipe_with_ema_under_lightnings_own_launcher(tmp_path) -> None:
    """cifar10 (EMA, bf16-mixed, KO, checkpoints) with two devices under Lightning's subprocess launcher: EMA's deep
    copy of the module used to fail (the CLI's optimizer factory reached the launcher's process handles)."""
    config = shrink_recipe("cifar10.yaml", tmp_path, devices=2, strategy="ddp")
    done = launch([sys.executable, "-m", "ko_lightning.cli", "fit", "--config", str(config)], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "cannot pickle" not in done.stdout
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 4 and "current_model_state" in last  # EMA kept raw and averaged weights
    assert last["ko_lightning"]["path"]["class"].endswith("TabulatedPath")


def test_ddp_spawn_with_the_callbacks_defaults_and_a_logger(tmp_path) -> None:
    """KOScheduleCallback with its defaults (picture on), a CSV logger, the sample report and checkpoints."""
    done = launch([sys.executable, str(SCRIPTS / "ddp_spawn_defaults.py"), str(tmp_path)], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert set(result["files"]) == {"version_0"}  # both ranks agreed on one run directory
    files = set(result["files"]["version_0"])
    assert {"ko_schedule.png", "samples.png", "metrics.md", "metrics.csv", "checkpoints"} <= files
    assert done.stdout.count("KO refresh at step") == 3  # init, steps 10 and 20, printed by rank 0 only
    # ddp_spawn hands the main process the weights only: the callback says where the trained path is.
    assert "ddp_spawn" in done.stdout and "load_from_checkpoint" in done.stdout
