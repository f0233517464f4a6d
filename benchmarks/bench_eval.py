"""Cost of in-training evaluation (EvalCallback, docs/scale.md §4) on the digits recipe's network, and of check_finite.

Run: ``python benchmarks/bench_eval.py [--steps 60] [--every 20] [--samples 256] [--euler 8] [--out
benchmarks/results/eval.md]``.

Trains the digits recipe's U-Net (1.7M parameters, batch 256, EMA) for ``--steps`` steps with an evaluation every
``--every`` steps (``--samples`` samples, Euler ``--euler`` steps, the digits classifier as feature extractor, FID and
KID against the test split) and reports the seconds per evaluation, the training step time and the evaluation's
share of the wall time. Then times the batch check of ``check_finite`` off, immediate and deferred (CPU: the immediate
check's sync costs nothing here; the deferred mode is what accelerators use by default).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from datetime import date

import lightning as L
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.loggers import CSVLogger

from ko_lightning import FlowMatching
from ko_lightning.callbacks import EvalCallback
from ko_lightning.data import DigitsDataModule
from ko_lightning.finite_checks import FiniteChecks
from ko_lightning.metrics import load_digits_classifier
from ko_lightning.nets import UNet


def make_net() -> UNet:
    """The digits recipe's network (recipes/digits.yaml)."""
    return UNet(in_channels=1, image_size=8, base_channels=32, channel_mults=[1, 2, 2], num_res_blocks=2,
                attention_resolutions=[4])  # fmt: skip


class _StepTimes(L.Callback):
    """Wall time of each training step (batch start to batch end; the evaluation runs after, so is excluded)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, *args: object) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args: object) -> None:
        self.times.append(time.perf_counter() - self._start)


def _trainer(steps: int, callbacks: list[L.Callback], logger: object = False) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=logger, callbacks=callbacks,  # type: ignore[arg-type]
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     limit_val_batches=0)  # fmt: skip


def _finite_check_cost(reps: int) -> dict[str, float]:
    """Microseconds per batch of the data check alone, on a digits batch (256, 1, 8, 8), modes interleaved."""
    x = torch.randn(256, 1, 8, 8)
    checks = {"off": FiniteChecks(False), "immediate": FiniteChecks("immediate"), "deferred": FiniteChecks("deferred")}
    times: dict[str, list[float]] = {mode: [] for mode in checks}
    for _ in range(5):
        for mode, check in checks.items():
            start = time.perf_counter()
            for i in range(reps):
                check.data(x, "train", i, i, (1, 8, 8))
            times[mode].append((time.perf_counter() - start) / reps * 1e6)
    return {mode: statistics.median(t) for mode, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--euler", type=int, default=8)
    parser.add_argument("--finite-reps", type=int, default=2000)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        load_digits_classifier(cache_dir=tmp)  # trained once here, not inside the first evaluation
        torch.manual_seed(0)
        evaluation = EvalCallback(every_n_steps=args.every, num_samples=args.samples, steps=args.euler,
                                  batch_size=args.samples, cache_dir=tmp, cuda=False, kid_subset_size=100)  # fmt: skip
        steps = _StepTimes()
        start = time.perf_counter()
        trainer = _trainer(args.steps, [EMAWeightAveraging(decay=0.999), evaluation, steps], CSVLogger(tmp))
        trainer.fit(FlowMatching(make_net(), train_seed=0), DigitsDataModule(batch_size=256))
        wall = time.perf_counter() - start
    finite = _finite_check_cost(args.finite_reps)
    evals = [float(r["seconds"]) for r in evaluation.rows]
    step_s = statistics.median(steps.times)
    lines = [
        "# In-training evaluation cost (EvalCallback)",
        "",
        f"{date.today()}, {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread, CPU. "
        f"Digits recipe U-Net (1.7M parameters), batch 256, EMA; {args.samples} samples, Euler {args.euler} steps, "
        "digits-classifier features, FID + KID (subset 100, 100 subsets) against the 180 test images.",
        "",
        "| evaluation | seconds |",
        "|---|---|",
        *[f"| step {r['step']} | {s:.2f} |" for r, s in zip(evaluation.rows, evals, strict=True)],
        "",
        f"Median training step: {step_s:.3f} s. Whole fit: {wall:.1f} s for {args.steps} steps, of which "
        f"{sum(evals):.1f} s evaluation ({100 * sum(evals) / wall:.1f}%; logged eval/time_fraction at the last "
        f"evaluation: {100 * evaluation.rows[-1]['time_fraction']:.1f}%). One evaluation costs "
        f"{statistics.median(evals) / step_s:.1f} training steps.",
        "",
        "The data check of one training batch (256, 1, 8, 8) alone, median of 5 x 2000 calls (CPU; on a GPU the "
        "immediate check's cost is the device sync it forces, which the deferred mode avoids):",
        "",
        "| check_finite | microseconds per batch |",
        "|---|---|",
        *[f"| {k} | {v:.1f} |" for k, v in finite.items()],
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
