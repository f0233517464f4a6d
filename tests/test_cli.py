"""The ``ko-lightning`` command as a new user meets it: named callback groups, checkpoints, resume, evaluation, and
an output without noise the user did not cause."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from ko_lightning import FlowMatching, KOScheduleCallback
from ko_lightning.callbacks.ko_advice import refresh_never_runs
from ko_lightning.callbacks.sample_report import plan_report
from ko_lightning.cli import run_cli
from ko_lightning.data import Toy2DDataModule
from ko_lightning.nets import TimeMLP
from ko_lightning.paths import CondOTPath, TabulatedPath
from ko_lightning.progress import EpochProgressBar, epoch_description


def _small_demo(root: Path) -> list[str]:
    """Overrides that shrink the embedded demo: a 2 x 32 MLP on 512 points in batches of 128 (4 per epoch)."""
    return [
        *("--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root)),
        *("--trainer.limit_val_batches", "1", "--model.net.init_args.hidden", "32", "--model.net.init_args.depth", "2"),
        *("--data.init_args.n_train", "512", "--data.init_args.n_val", "256", "--data.init_args.n_test", "256"),
        *("--data.init_args.batch_size", "128"),
    ]


def _ko(cli: object) -> KOScheduleCallback:
    return next(c for c in cli.trainer.callbacks if isinstance(c, KOScheduleCallback))  # type: ignore[attr-defined]


def test_named_overrides_checkpoint_resume_and_validate_from_the_command_line(tmp_path) -> None:
    """``--ko.*`` / ``--report.*`` reach their callbacks; a run shorter than the validation interval still saves
    ``last.ckpt`` (with the KO path); ``--ckpt_path last`` resumes it; ``validate`` without a checkpoint warns and
    names it; ``validate --ckpt_path last`` scores the trained model on its KO path."""
    demo = _small_demo(tmp_path)
    ko_args = ["--ko.estimator", "model", "--ko.warmup_steps", "5", "--ko.every_n_steps", "5"]
    report_args = ["--report.num_samples", "16", "--report.euler_steps", "[2, 3]"]
    cli = run_cli(["fit", *demo, *ko_args, *report_args, "--trainer.max_steps", "12"])
    ko = _ko(cli)
    assert (ko.estimator, ko.warmup_steps, ko.every_n_steps) == ("model", 5, 5)
    assert [r.step for r in ko.reports] == [0, 5, 10]  # the data init, then warmup 5 + k x 5 below max_steps 12
    run_dir = tmp_path / "checkerboard" / "version_0"
    rows = re.findall(r"^\| euler (\d+) \| (\d+) \|", (run_dir / "metrics.md").read_text(), flags=re.M)
    assert rows == [("2", "2"), ("3", "3")]  # the report's overrides
    with open(run_dir / "metrics.csv") as fh:  # 4 batches per epoch < log_every_n_steps (50): still logged
        logged = [float(r["global_batch_size"]) for r in csv.DictReader(fh) if r.get("global_batch_size")]
    assert logged == [128.0]
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 12  # validation (every 1000 steps) never ran: saved at the end of the fit
    assert saved["ko_lightning"]["path"]["class"].endswith("TabulatedPath")

    resumed = run_cli(["fit", *demo, *ko_args, *report_args, "--trainer.max_steps", "16", "--ckpt_path", "last"])
    assert resumed.trainer.global_step == 16
    assert _ko(resumed).refresh_count == 4 and [r.step for r in _ko(resumed).reports] == [15]  # 3 restored + 15
    newest = tmp_path / "checkerboard" / "version_1" / "checkpoints" / "last.ckpt"
    assert torch.load(newest, map_location="cpu", weights_only=True)["global_step"] == 16

    with pytest.warns(UserWarning, match="without --ckpt_path scores the model as the config builds it") as caught:
        fresh = run_cli(["validate", *demo])
    assert any(str(newest) in str(w.message) for w in caught)  # the message names the checkpoint to pass
    assert isinstance(fresh.model.path, CondOTPath)  # untrained, on the config's path: what the warning says
    scored = run_cli(["validate", *demo, "--ckpt_path", "last"])
    assert isinstance(scored.model.path, TabulatedPath)  # the KO path came back from the checkpoint
    assert torch.isfinite(scored.trainer.callback_metrics["val/loss"])


def test_the_progress_bar_can_be_switched_off_and_shows_no_bogus_epoch_total(tmp_path) -> None:
    """The CLI used to add a RichProgressBar always, so ``--trainer.enable_progress_bar false`` failed."""
    cli = run_cli(["fit", *_small_demo(tmp_path), "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false"])
    assert cli.trainer.global_step == 2 and cli.trainer.progress_bar_callback is None
    assert epoch_description(9, -1) == "Epoch 9"  # Lightning printed "Epoch 9/-2" for max_steps runs
    assert epoch_description(3, None) == "Epoch 3"
    assert epoch_description(3, 10) == "Epoch 3/9"  # epochs count from 0
    assert issubclass(EpochProgressBar, L.pytorch.callbacks.RichProgressBar)


def test_the_ko_never_runs_warning() -> None:
    assert refresh_never_runs(-1, 10**6, "model", False) is None  # unbounded run
    assert refresh_never_runs(1000, 999, "model", False) is None  # a refresh at step 999 < 1000
    assert refresh_never_runs(1000, 1000, "data", True) is None  # the data init is the whole estimate
    never = refresh_never_runs(1000, 1000, "data", False)
    assert never is not None and "init_from_data=False" in never and "--ko.warmup_steps 500" in never
    model = refresh_never_runs(500, 1000, "data+model", True)
    assert model is not None and "'data+model' refresh never runs" in model
    ko = KOScheduleCallback(warmup_steps=50, estimator="model", init_from_data=False, plot=False)
    trainer = L.Trainer(
        max_steps=3, callbacks=[ko], logger=False, enable_progress_bar=False, enable_checkpointing=False
    )
    data = Toy2DDataModule("checkerboard", n_train=256, n_val=128, n_test=128, batch_size=64)
    with pytest.warns(UserWarning, match=r"warmup_steps=50 >= max_steps=3 and init_from_data=False"):
        trainer.fit(FlowMatching(TimeMLP(dim=2, hidden=16, depth=1)), data)
    assert ko.refresh_count == 0


def test_report_budget_arithmetic() -> None:
    """cost(n, S) = per_step x n / N x sum(S): 4000 x (2, 8, 32, 100) at 0.125 s per step costs 17.75 s (binary
    fractions: the comparisons are exact)."""
    full = (2, 8, 32, 100)
    assert plan_report(4000, full, 0.125, 17.75) == (4000, full)  # fits exactly
    assert plan_report(4000, full, 0.125, 8.875) == (2000, full)  # half the budget, half the samples
    # 10 s per step, 1 s budget: n floors at 16 (cost 5.68 s), then 100 (1.68 s) and 32 (0.4 s) are dropped
    assert plan_report(4000, full, 10.0, 1.0) == (16, (2, 8))
    assert plan_report(4000, (100, 2), 1e9, 1.0) == (16, (2,))  # the smallest step count always stays
    assert plan_report(8, full, 1e9, 1.0)[0] == 8  # never below the configured count's floor


def test_gpu_recipe_on_a_cpu_machine_names_the_overrides(tmp_path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    data = tmp_path / "tiny.npz"
    import numpy as np

    np.savez(data, x=np.zeros((16, 8, 8, 3), dtype=np.uint8))
    recipe = str(Path(__file__).resolve().parent.parent / "recipes" / "cifar10.yaml")
    with pytest.raises(RuntimeError, match="--trainer.accelerator cpu --trainer.devices 1 --trainer.strategy auto"):
        run_cli(["fit", "--config", recipe, "--data.init_args.path", str(data)])


def test_default_demo_prints_no_warning_or_tip_and_help_names_the_ko_group(tmp_path) -> None:
    """Every line the demo prints, read in a subprocess: no args warning, no Lightning _pytree deprecation, no
    cloud tips; and ``fit --help`` says where the KO options are."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "ko_lightning.cli", "fit"]
    run = subprocess.run(
        [*command, "--trainer.max_steps", "20", "--data.init_args.n_train", "4096"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-3000:]
    assert (
        "KO refresh at step 0" in output
        and "| euler 100 | 100 |" in (tmp_path / "runs" / "checkerboard" / "version_0" / "metrics.md").read_text()
    )
    for noise in ("Warning", "warn(", "args parameter is intended", "LeafSpec", "Tip:"):
        assert noise not in output, (noise, output[-3000:])
    assert re.search(r"Epoch \d+/-", output) is None  # (rich draws no bar into a pipe; epoch_description is tested)
    assert (tmp_path / "runs" / "checkerboard" / "version_0" / "checkpoints" / "last.ckpt").is_file()
    helped = subprocess.run([*command, "--help"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert helped.returncode == 0
    text = " ".join(helped.stdout.split())  # argparse wraps the description
    assert "the KO schedule (KOScheduleCallback) is the group --ko.*" in text and "--report.num_samples 64" in text
    assert re.search(r"^\s+--ko.warmup_steps", helped.stdout, flags=re.M)  # the group's options are listed
