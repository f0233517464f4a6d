"""The command line under a real launcher: ``torchrun --nproc_per_node 2`` (gloo on the CPU), KO and checkpoints."""

from __future__ import annotations

import csv

import pytest
import torch
from launching import launch, torchrun

from ko_lightning import FlowMatching, KOScheduleCallback
from ko_lightning.kinetic import DataNormalization, kinetic_energy
from ko_lightning.nets import TimeMLP


def test_torchrun_two_ranks_refresh_ko_and_save_a_checkpoint_holding_it(tmp_path) -> None:
    """Two ranks, the embedded demo shrunk to 6 steps: the data init at step 0 and a model refresh at step 3. The
    last checkpoint (written by rank 0) must hold the path rank 0 reported: its kinetic energy under the saved
    lambda equals the ``ko/ke_new`` rank 0 logged at step 3."""
    command = torchrun(
        *("-m", "ko_lightning.cli", "fit"),
        *("--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"),
        *("--trainer.max_steps", "6", "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1"),
        *("--model.net.init_args.hidden", "32", "--model.net.init_args.depth", "2"),
        *("--data.init_args.n_train", "2048", "--data.init_args.n_val", "256", "--data.init_args.n_test", "256"),
        *("--data.init_args.batch_size", "128"),
        *("--ko.estimator", "model", "--ko.warmup_steps", "3", "--ko.every_n_steps", "3", "--ko.plot", "false"),
        *("--ko.n_queries", "64", "--ko.max_data", "512", "--report.num_samples", "16", "--report.euler_steps", "[2]"),
    )
    done = launch(command, tmp_path)
    output = done.stdout
    assert done.returncode == 0, output[-3000:]
    assert "KO refresh at step 0" in output and "KO refresh at step 3" in output
    run_dir = tmp_path / "runs" / "checkerboard" / "version_0"
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 6
    state = next(v for k, v in saved["callbacks"].items() if k.startswith("KOScheduleCallback"))
    assert state["refresh_count"] == 2 and state["last_refresh_step"] == 3
    ko = KOScheduleCallback(n_queries=64, max_data=512, estimator="model", warmup_steps=3, every_n_steps=3)
    ko.load_state_dict(state)
    model = FlowMatching.load_from_checkpoint(checkpoint, net=TimeMLP(dim=2, hidden=32, depth=2))
    assert type(model.path).__name__ == "TabulatedPath" and ko.separation is not None
    with open(run_dir / "metrics.csv") as fh:
        reported = [float(r["ko/ke_new"]) for r in csv.DictReader(fh) if r.get("ko/ke_new") and r["step"] == "3"]
    assert len(reported) == 1
    normalization = DataNormalization.from_state_dict(state["normalization"])
    ke = kinetic_energy(model.path, ko.separation, second_moment=normalization.second_moment)
    assert ke == pytest.approx(reported[0], rel=1e-3)
