"""Wall-time overhead of KOScheduleCallback() with its default settings, and one refresh split into its phases.

Run: ``python benchmarks/bench_ko_callback.py --threads 1 [--out benchmarks/results/ko_callback.md]``.

Two settings (issue 10): a 50,000 x 2 checkerboard with a 4 x 256 MLP at batch 1024 over 2000 steps, and the digits
U-Net of ``recipes/digits.yaml`` at batch 256 over that recipe's steps. For each it measures, in one process: the median
training step on Cond-OT without the callback, the median step on the KO path the callback installed (the cost of
evaluating a tabulated path and of the default importance-sampled times, ``time_sampler="auto"``), the initialization
refresh, and the median of forced periodic refreshes (``target_standard_error=None``), split into estimate / all-reduce
/ solve / install. With the defaults a periodic refresh runs only while the merged estimate's standard error exceeds
``target_standard_error``; the number of periodic refreshes of a full run is counted from the precision the
initialization reached (0 when it already meets the target, else every scheduled one: an upper bound). Then

- refresh overhead = (init + n_periodic x periodic) / (max_steps x Cond-OT step);
- training time ratio = (max_steps x KO step + refreshes) / (max_steps x Cond-OT step), the target <= 1.05,

compositions of measured times, stated as such.
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


def _digits_steps() -> int:
    return int(yaml.safe_load((RECIPES / "digits.yaml").read_text())["trainer"]["max_steps"])


class _StepClock(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, *args) -> None:  # noqa: ANN002
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:  # noqa: ANN002
        self.times.append(time.perf_counter() - self._start)


def _fit(make_model, datamodule: L.LightningDataModule, steps: int, callbacks: list) -> _StepClock:
    clock = _StepClock()
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[*callbacks, clock],
    )
    trainer.fit(make_model(), datamodule)
    return clock


def measure(name: str, make_model, datamodule: L.LightningDataModule, max_steps: int, steps: int, refreshes: int):
    plain = statistics.median(_fit(make_model, datamodule, steps, []).times[5:])
    default = KOScheduleCallback(plot=False)
    on_ko = statistics.median(_fit(make_model, datamodule, steps, [default]).times[5:])
    init = default.reports[0].seconds["total"]
    # forced periodic refreshes at a short cadence (the same work as a scheduled one)
    forced = KOScheduleCallback(plot=False, every_n_steps=5, warmup_steps=5, target_standard_error=None)
    _fit(make_model, datamodule, 5 * refreshes, [forced])
    periodic = forced.reports[1:]
    phases = {k: statistics.median(r.seconds[k] for r in periodic) for k in periodic[0].seconds}
    final = default.estimate_is_final()  # the init estimate already meets the target: no periodic refresh
    # the callback never refreshes at the last step (nothing would be trained on the new path)
    n_periodic = 0 if final else sum(default.is_refresh_step(s) for s in range(1, max_steps))
    refresh_seconds = init + n_periodic * phases["total"]
    return {
        "name": name,
        "max_steps": max_steps,
        "t_plain": plain,
        "t_ko": on_ko,
        "init": init,
        "se": default.precision.max_standard_error(),
        "n_periodic": n_periodic,
        "phases": phases,
        "overhead": refresh_seconds / (max_steps * plain),
        "ratio": (max_steps * on_ko + refresh_seconds) / (max_steps * plain),
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
            "50,000 x 2 checkerboard, 4x256 MLP, batch 1024",
            lambda: FlowMatching(TimeMLP(dim=2, hidden=256, depth=4)),
            Toy2DDataModule("checkerboard", n_train=50_000, batch_size=1024),
            max_steps=2000,
            steps=60,
            refreshes=3,
        ),
        measure(
            "digits U-Net (1.8M), batch 256",
            lambda: FlowMatching(UNet(1, 8, 32, (1, 2, 2), 2, (4,))),
            DigitsDataModule(batch_size=256),
            max_steps=_digits_steps(),
            steps=20,
            refreshes=3,
        ),
    ]
    lines = [
        "# KOScheduleCallback() overhead at its default settings",
        "",
        f"Hardware: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, CPU "
        f"only; torch {torch.__version__}, lightning {L.__version__}; {date.today()}. Callback: "
        "`KOScheduleCallback(plot=False)` (n_queries 512, max_data 4096, n_theta 64, floor 0.1, "
        "target_standard_error 0.01). Overhead and ratio are compositions of the measured times (module docstring).",
        "",
        "| setting | steps | Cond-OT step (s) | KO step (s) | init refresh (s) | SE after init | periodic: estimate "
        "| solve | total | periodic refreshes | refresh overhead (target <= 3%) | training time vs Cond-OT "
        "(target <= 1.05) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p = r["phases"]
        lines.append(
            f"| {r['name']} | {r['max_steps']} | {r['t_plain']:.4f} | {r['t_ko']:.4f} | {r['init']:.3f} | "
            f"{r['se']:.4f} | {p['estimate']:.3f} | {p['solve']:.3f} | {p['total']:.3f} | {r['n_periodic']} | "
            f"{100 * r['overhead']:.2f}% | {r['ratio']:.3f} |"
        )
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
