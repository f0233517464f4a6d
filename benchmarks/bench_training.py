"""Overhead of FlowMatching inside Lightning vs a hand-written PyTorch loop, and of `sample` vs bare odeint.

Run: ``python benchmarks/bench_training.py [--steps 150] [--repeats 3] [--out benchmarks/results/training.md]``.

Both sides of each comparison use the same network, batch, path, data loader and optimizer, and are measured
alternately (A B A B ...) in one process so that machine noise hits both; the table reports medians and ratios.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import date

import lightning as L
import torch
from torchdiffeq import odeint

from ko_lightning import FlowMatching
from ko_lightning.data import Toy2DDataModule
from ko_lightning.nets import TimeMLP
from ko_lightning.paths import CondOTPath


def make_net() -> torch.nn.Module:
    return TimeMLP(dim=2, hidden=512, depth=4)


class _StepTimer(L.Callback):
    """Wall time between the end of warm-up step ``warmup`` and the end of the last step."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start = 0.0
        self.end = 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()
        self.end = time.perf_counter()


def lightning_steps_per_s(dm: Toy2DDataModule, steps: int, warmup: int) -> float:
    torch.manual_seed(0)
    model = FlowMatching(make_net(), path=CondOTPath(), check_finite=True)
    timer = _StepTimer(warmup)
    trainer = L.Trainer(
        max_steps=steps + warmup,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[timer],
    )
    trainer.fit(model, dm)
    return steps / (timer.end - timer.start)


def plain_steps_per_s(dm: Toy2DDataModule, steps: int, warmup: int) -> float:
    """The same objective written by hand: x_t = t x1 + (1 - t) x0, target x1 - x0, MSE, Adam."""
    torch.manual_seed(0)
    net = make_net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    done, start = 0, 0.0
    while done < steps + warmup:
        for x1 in dm.train_dataloader():
            t = torch.rand(x1.shape[0])
            x0 = torch.randn_like(x1)
            x_t = t[:, None] * x1 + (1 - t[:, None]) * x0
            loss = (net(x_t, t) - (x1 - x0)).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
            if done == warmup:
                start = time.perf_counter()
            if done == steps + warmup:
                break
    return steps / (time.perf_counter() - start)


def sample_seconds(n: int, nfe: int) -> tuple[float, float]:
    torch.manual_seed(0)
    model = FlowMatching(make_net(), data_shape=(2,))
    model.eval()
    x0 = torch.randn(n, 2)
    start = time.perf_counter()
    model.sample(x0=x0, method="euler", steps=nfe)
    ours = time.perf_counter() - start

    grid = torch.linspace(0, 1, nfe + 1)
    net = model.net
    with torch.no_grad():
        start = time.perf_counter()
        odeint(
            lambda t, x: net(x, t.expand(n)),
            x0,
            torch.tensor([0.0, 1.0]),
            method="euler",
            options={"grid_constructor": lambda f, y0, t: grid},
        )
        bare = time.perf_counter() - start
    return ours, bare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    dm = Toy2DDataModule("checkerboard", n_train=200_000, batch_size=4096, seed=0)
    dm.setup("fit")
    lit, plain, ours, bare = [], [], [], []
    for _ in range(args.repeats):
        lit.append(lightning_steps_per_s(dm, args.steps, args.warmup))
        plain.append(plain_steps_per_s(dm, args.steps, args.warmup))
        o, b = sample_seconds(n=20_000, nfe=100)
        ours.append(o)
        bare.append(b)
    med = statistics.median
    rows = [
        ("training steps/s, FlowMatching in Lightning", med(lit)),
        ("training steps/s, hand-written loop", med(plain)),
        ("ratio Lightning / plain (target >= 0.95)", med(lit) / med(plain)),
        ("sample() seconds, 20k points, Euler 100 NFE", med(ours)),
        ("bare torchdiffeq.odeint seconds, same NFE", med(bare)),
        ("sample overhead vs odeint (target <= 3%)", med(ours) / med(bare) - 1.0),
    ]
    lines = [
        "# FlowMatching overhead",
        "",
        f"Setting: 2D checkerboard, TimeMLP 4x512 (0.82M parameters), batch 4096, Cond-OT, Adam; {args.steps} timed "
        f"steps after {args.warmup} warm-up steps; medians of {args.repeats} alternating repeats. "
        f"Hardware: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, CPU only. "
        f"torch {torch.__version__}, lightning {L.__version__}. Date: {date.today()}.",
        "",
        "| measure | value |",
        "|---|---|",
        *[f"| {name} | {value:.4g} |" for name, value in rows],
        "",
        "Per-repeat values: Lightning "
        + ", ".join(f"{v:.2f}" for v in lit)
        + "; plain "
        + ", ".join(f"{v:.2f}" for v in plain)
        + "; sample "
        + ", ".join(f"{v:.3f}" for v in ours)
        + "; odeint "
        + ", ".join(f"{v:.3f}" for v in bare)
        + ".",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
