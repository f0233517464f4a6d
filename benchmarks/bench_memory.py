"""Peak resident memory of image data on disk: before (the code in ``--before``) and after (this checkout).

Writes a ``N x 3 x 32 x 32`` uint8 ``.npy`` file (default N = 200,000, 586 MiB) and measures, each in a fresh
subprocess, the growth of the peak resident set size (``VmHWM``) over the process's peak after its imports:

- ``setup``: ``ImageDataModule.setup()``, 20 training batches of 128 and ``train_tensor(10000)``;
- ``fit``: a 2-step fit of a tiny UNet (batch 16) with ``KOScheduleCallback(max_data=10000)`` (cheap estimator
  settings; the data estimator runs once before the first step).

Usage::

    python benchmarks/bench_memory.py --before /tmp/ko_base  # prints a markdown table (docs/scale.md §1)

Results: benchmarks/results/memory.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

WORKER = r"""
import json, sys


def peak_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


import torch
import lightning as L
import ko_lightning
from ko_lightning import FlowMatching
from ko_lightning.callbacks import KOScheduleCallback
from ko_lightning.data import ImageDataModule
from ko_lightning.nets import UNet

torch.set_num_threads(1)
case, path = sys.argv[1], sys.argv[2]
torch.zeros(8, 8) @ torch.zeros(8, 8)  # first-use allocations of torch belong to the baseline
base = peak_mib()
if case == "setup":
    dm = ImageDataModule(path, batch_size=128, val_fraction=0.02, seed=0)
    dm.setup("fit")
    for _, batch in zip(range(20), dm.train_dataloader()):
        pass
    x = dm.train_tensor(10000)
    assert x.shape == (10000, 3, 32, 32), x.shape
else:
    L.seed_everything(0, verbose=False)
    dm = ImageDataModule(path, batch_size=16, val_fraction=0.0, seed=0)
    net = UNet(in_channels=3, image_size=32, base_channels=8, channel_mults=(1,), num_res_blocks=1, mid_attention=False)
    ko = KOScheduleCallback(
        every_n_steps=1000, warmup_steps=1000, max_data=10000, n_queries=8, n_theta=8, n_grid=64, batch_size=16,
        data_chunk=1024, plot=False,
    )
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[ko], num_sanity_val_steps=0,
    )
    trainer.fit(FlowMatching(net, data_shape=(3, 32, 32)), datamodule=dm)
    assert ko.refresh_count == 1, ko.refresh_count
print(json.dumps({"module": ko_lightning.__file__, "baseline_mib": base, "growth_mib": peak_mib() - base}))
"""


def write_images(path: Path, n: int, seed: int = 0, chunk: int = 20000) -> None:
    """A uint8 ``(n, 3, 32, 32)`` ``.npy`` file of random pixels, written in chunks (never held whole)."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, 3, 32, 32))
    rng = np.random.default_rng(seed)
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        out[a:b] = rng.integers(0, 256, size=(b - a, 3, 32, 32), dtype=np.uint8)
    out.flush()
    del out


def measure(case: str, data: Path, code_root: Path, timeout: float = 900) -> dict[str, float | str]:
    """Run the ``case`` worker with ``ko_lightning`` imported from ``code_root``; its JSON result."""
    env = {**os.environ, "PYTHONPATH": str(code_root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", WORKER, case, str(data)],
        capture_output=True,
        text=True,
        cwd=code_root,
        env=env,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{case} worker failed in {code_root}:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if not str(result["module"]).startswith(str(code_root)):
        raise RuntimeError(f"the worker imported {result['module']}, not the code under {code_root}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, default=None, help="checkout of the code before the change")
    parser.add_argument("--images", type=int, default=200_000, help="images in the generated .npy file")
    args = parser.parse_args()
    roots = ([("before", args.before)] if args.before else []) + [("after", ROOT)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "images.npy"
        write_images(data, args.images)
        size = data.stat().st_size / 2**20
        print(f"data: {args.images} x 3 x 32 x 32 uint8 .npy ({size:.0f} MiB)", file=sys.stderr, flush=True)
        for case, label in (
            ("setup", "setup + 20 batches + train_tensor(10000)"),
            ("fit", "2-step fit, KO max_data=10000"),
        ):
            for name, root in roots:
                print(f"measuring {case} ({name}) ...", file=sys.stderr, flush=True)
                r = measure(case, data, root)
                rows.append(f"| {label} | {name} | {r['baseline_mib']:.0f} | {r['growth_mib']:.0f} |")
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.system()}"
    print(f"Machine: {machine}")
    print(f"Data: {args.images:,} x 3 x 32 x 32 uint8 `.npy` ({size:.0f} MiB); peak RSS (VmHWM) in MiB\n")
    print("| work | code | peak RSS after imports | peak RSS growth |")
    print("|---|---|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
