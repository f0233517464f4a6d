"""Toy-size copies of the shipped recipes: the same callbacks and code paths, small enough for a CPU test."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import yaml

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
IMAGE_RECIPES = ("cifar10.yaml", "cifar10_conditional.yaml", "imagenet32.yaml", "imagenet64.yaml")
DIGITS_RECIPES = ("digits.yaml", "digits_conditional.yaml")
ALL_RECIPES = ("checkerboard.yaml", *DIGITS_RECIPES, *IMAGE_RECIPES)

_CALLBACK_OVERRIDES: dict[str, dict[str, Any]] = {
    "KOScheduleCallback": {
        "warmup_steps": 2,
        "every_n_steps": 2,
        "n_queries": 16,
        "n_theta": 8,
        "max_data": 32,
        "batch_size": 16,
    },
    "SampleReport": {"num_samples": 8, "euler_steps": [2], "time_budget": None},
    "GuidanceReport": {"num_per_class": 2, "euler_steps": 2, "num_shown": 1},
}


def tiny_image_file(directory: Path, n: int = 48, size: int = 8, num_classes: int = 10) -> Path:
    """A small uint8 NHWC ``.npz`` of random images, standing in for the data a GPU recipe reads, with random
    class labels ``0..num_classes - 1`` under ``labels`` (read by the conditional recipes only)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    labels = np.arange(n) % num_classes  # every class present, so the data have num_classes classes
    path = directory / "tiny.npz"
    np.savez(path, x=images, labels=rng.permutation(labels))
    return path


def shrink_recipe(
    recipe: str,
    directory: Path,
    max_steps: int = 4,
    accelerator: str = "cpu",
    devices: int = 1,
    strategy: str = "auto",
    classifier_cache_dir: Path | None = None,
) -> Path:
    """Write a toy-size copy of ``recipes/<recipe>`` into ``directory`` and return its path.

    Every callback, the logger, the precision and the parametrization of the recipe stay; only sizes shrink
    (steps, network width, data, estimator queries, report samples), and every output goes under ``directory``
    (the digits classifier of a guidance report too, unless ``classifier_cache_dir`` names a shared cache).
    """
    directory.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load((RECIPES / recipe).read_text())
    trainer = config["trainer"]
    trainer.update(
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        max_steps=max_steps,
        val_check_interval=max_steps,
        limit_val_batches=1,
        default_root_dir=str(directory),
    )
    trainer["logger"]["init_args"]["save_dir"] = str(directory)
    config["ko"] = {**(config.get("ko") or {}), **_CALLBACK_OVERRIDES["KOScheduleCallback"]}  # the --ko.* group
    report = config.get("report")  # the --report.* group: a SampleReport or a GuidanceReport
    for callback in [*trainer.get("callbacks", []), *([report] if report else [])]:
        args = callback.setdefault("init_args", {})
        name = callback["class_path"].rsplit(".", 1)[-1]
        args.update(_CALLBACK_OVERRIDES.get(name, {}))
        if name == "GuidanceReport":
            args["classifier_cache_dir"] = str(classifier_cache_dir or directory / "classifier_cache")
        if name in ("ModelCheckpoint", "LastCheckpoint"):
            args.update(every_n_train_steps=2, dirpath=str(directory / "ckpt"))
    model = config["model"]
    net = model["net"]["init_args"]
    data = config["data"]["init_args"]
    if recipe in IMAGE_RECIPES:
        net.update(image_size=8, base_channels=32, channel_mults=[1, 2], attention_resolutions=[4])
        data.update(path=str(tiny_image_file(directory)), batch_size=8, num_workers=0)
    elif recipe in DIGITS_RECIPES:
        net.update(base_channels=16, channel_mults=[1, 2], num_res_blocks=1, attention_resolutions=[])
        data.update(batch_size=32)
    else:  # 2D toys
        net.update(hidden=32, depth=2)
        data.update(n_train=4096, n_val=256, n_test=256, batch_size=128)
    if "lr_scheduler" in model:
        model["lr_scheduler"]["init_args"]["T_max"] = max_steps
    small = directory / f"small_{recipe}"
    small.write_text(yaml.safe_dump(config))
    return small
