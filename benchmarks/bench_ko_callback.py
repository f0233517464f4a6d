"""Wall-time overhead of KOScheduleCallback at the recipes' cadence, and one refresh split into its phases.

Run: ``python benchmarks/bench_ko_callback.py [--out benchmarks/results/ko_callback.md]``.

For each recipe (the callback and model settings of ``recipes/checkerboard.yaml`` and ``recipes/digits.yaml``)
it measures, in one process: the median training step time without the callback (timed steps after warm-up),
the initialization refresh (data estimator, before step 1) and the median periodic refresh, split into
estimate / all-reduce / solve / install. The overhead of a whole run is then
``(t_init + n_refresh * t_refresh) / (max_steps * t_step)`` with ``n_refresh`` the number of periodic refreshes
in ``max_steps`` steps: a composition of measured times, stated as such.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import lightning as L
import torch
import yaml

from ko_lightning import FlowMatching, KOScheduleCallback
from ko_lightning.data import DigitsDataModule, Toy2DDataModule
from ko_lightning.nets import TimeMLP, UNet

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def _ko_settings(recipe: str) -> tuple[dict, int]:
    config = yaml.safe_load((RECIPES / recipe).read_text())
    for cb in config["trainer"]["callbacks"]:
        if cb["class_path"].endswith("KOScheduleCallback"):
            return dict(cb.get("init_args", {})), int(config["trainer"]["max_steps"])
    raise ValueError(f"{recipe} has no KOScheduleCallback")


class _StepClock(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, *args) -> None:  # noqa: ANN002
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:  # noqa: ANN002
        self.times.append(time.perf_counter() - self._start)


def measure(name: str, recipe: str, make_model, datamodule: L.LightningDataModule, steps: int, refreshes: int):
    settings, max_steps = _ko_settings(recipe)
    settings["plot"] = False
    # Step time without the callback.
    clock = _StepClock()
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[clock],
    )
    trainer.fit(make_model(), datamodule)
    t_step = statistics.median(clock.times[5:])
    # Refreshes: the initialization plus `refreshes` periodic ones, at a short cadence (same work per refresh).
    timed = dict(settings, every_n_steps=5, warmup_steps=5)
    ko = KOScheduleCallback(**timed)
    trainer = L.Trainer(
        max_steps=5 * refreshes,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[ko],
    )
    trainer.fit(make_model(), datamodule)
    init, periodic = ko.reports[0], ko.reports[1:]
    phases = {k: statistics.median(r.seconds[k] for r in periodic) for k in periodic[0].seconds}
    ko_full = KOScheduleCallback(**settings)
    # the callback never refreshes at the last step (nothing would be trained on the new path)
    n_periodic = sum(ko_full.is_refresh_step(s) for s in range(1, max_steps))
    overhead = (init.seconds["total"] + n_periodic * phases["total"]) / (max_steps * t_step)
    return {
        "recipe": name,
        "estimator": settings.get("estimator", "data"),
        "max_steps": max_steps,
        "every_n_steps": settings.get("every_n_steps"),
        "t_step": t_step,
        "init": init.seconds["total"],
        "n_periodic": n_periodic,
        "phases": phases,
        "overhead": overhead,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [
        measure(
            "checkerboard",
            "checkerboard.yaml",
            lambda: FlowMatching(TimeMLP(dim=2, hidden=256, depth=4), parametrization="polar_v"),
            Toy2DDataModule("checkerboard", n_train=200_000, batch_size=2048),
            steps=60,
            refreshes=3,
        ),
        measure(
            "digits",
            "digits.yaml",
            lambda: FlowMatching(UNet(1, 8, 32, (1, 2, 2), 2, (4,)), parametrization="polar_v"),
            DigitsDataModule(batch_size=256),
            steps=20,
            refreshes=3,
        ),
    ]
    lines = [
        "# KOScheduleCallback overhead",
        "",
        f"Hardware: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, CPU "
        f"only; torch {torch.__version__}, lightning {L.__version__}; {date.today()}. Settings: the callback "
        "arguments of each recipe; overhead = (init + periodic refreshes in max_steps) / (max_steps x step time).",
        "",
        "| recipe | estimator | step (s) | init refresh (s) | refresh: estimate | all-reduce | solve | install | "
        "total | refreshes per run | overhead (target <= 3%) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p = r["phases"]
        lines.append(
            f"| {r['recipe']} | {r['estimator']} | {r['t_step']:.4f} | {r['init']:.3f} | {p['estimate']:.3f} | "
            f"{p['all_reduce']:.5f} | {p['solve']:.3f} | {p['install']:.4f} | {p['total']:.3f} | "
            f"{r['n_periodic']} every {r['every_n_steps']} of {r['max_steps']} | {100 * r['overhead']:.2f}% |"
        )
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
