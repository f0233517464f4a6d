"""End-of-fit guidance report: class-conditional samples at several classifier-free guidance scales, scored by a
classifier (class accuracy, and FID in its feature space against the training data)."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor
from typing_extensions import override

from ko_lightning.batches import batch_data
from ko_lightning.callbacks.report_table import format_cell, write_report_table
from ko_lightning.callbacks.run_dir import resolve_run_dir
from ko_lightning.conditioning import Conditioning
from ko_lightning.metrics.fid_math import fid_from_features
from ko_lightning.metrics.images import display_images, display_tiles

__all__ = ["GuidanceReport", "ImageClassifier"]

ImageClassifier = Callable[[Tensor], tuple[Tensor, Tensor]]
"""A classifier for the report: ``images -> (features (B, F), logits (B, K))``. It receives the samples as the
datamodule shows them (``datamodule.to_display(x)``: images ``(B, C, H, W)`` in ``[0, 1]``; the samples themselves
when the datamodule has no ``to_display``), on the CPU, under ``torch.no_grad``; ``K`` must be the model's
``num_classes``. :class:`~ko_lightning.metrics.DigitsClassifier` is one (``classifier="digits"``)."""


def _cell(column: str, value: Any) -> str:
    return f"{value:g}" if column == "guidance_scale" else format_cell(value)


def _class_conditioning(module: Any, owner: str) -> Conditioning:
    conditioning = getattr(module, "conditioning", None)
    if not isinstance(conditioning, Conditioning) or conditioning.num_classes is None:
        described = conditioning.describe() if isinstance(conditioning, Conditioning) else "unconditional"
        raise ValueError(
            f"{owner} needs a class-conditional model: build its network with num_classes=K (class labels) and train "
            f"on labelled batches (a datamodule with labels=True); this model is {described}"
        )
    return conditioning


def _display(datamodule: Any, x: Tensor) -> Tensor:
    return datamodule.to_display(x) if datamodule is not None and hasattr(datamodule, "to_display") else x


def _reference(datamodule: Any, n: int) -> Tensor | None:
    """Up to ``n`` training samples (model space): ``train_tensor(n)``, else the first training batches."""
    if datamodule is None:
        return None
    if hasattr(datamodule, "train_tensor"):
        return datamodule.train_tensor(n).float()
    chunks, count = [], 0
    for index, batch in enumerate(datamodule.train_dataloader()):
        chunks.append(batch_data(batch, f"GuidanceReport: reference batch {index}"))
        count += chunks[-1].shape[0]
        if count >= n:
            break
    return torch.cat(chunks)[:n].float() if chunks else None


class GuidanceReport(L.Callback):
    """After fit (weight averaging already applied), sample every class at several guidance scales and report.

    For each scale ``w`` of ``guidance_scales`` the model draws ``num_per_class`` samples of each of its
    ``num_classes`` classes with ``euler_steps`` Euler steps, from the same initial noise for every scale
    (``model.sample(x0=..., cond=labels, guidance_scale=w)``: ``w = 0`` the unconditional model, ``w = 1`` the
    conditional one, other ``w`` classifier-free guidance at two network calls per step). Per scale it reports the
    NFE, the wall time and, with a classifier, the class accuracy (fraction of samples the classifier puts in the
    requested class) and the FID of the pooled samples against up to ``max_reference`` training samples in the
    classifier's feature space. Writes ``guidance.md`` (the table) and ``guidance.png`` (rows: scales; columns:
    classes) into the run directory and prints the table on rank 0; sampling runs on rank 0 alone, the directory
    is resolved in ``setup`` on every rank (``trainer.log_dir`` is a collective).

    Args:
        guidance_scales: the scales ``w`` to report.
        num_per_class: samples per class and scale.
        euler_steps: Euler steps per sample.
        classifier: ``"digits"`` (:func:`~ko_lightning.metrics.load_digits_classifier`, trained offline on first
            use and cached), an :data:`ImageClassifier`, or None (report NFE and time only).
        classifier_cache_dir: cache folder of the digits classifier (None: the package default).
        max_reference: training samples of the FID reference.
        batch_size: samples per ``sample`` call (the guided calls run on twice as many).
        num_shown: samples per class in the picture.
        seed: seed of the initial noise.

    Raises:
        ValueError: naming the argument for bad values; in ``setup``, naming ``GuidanceReport`` and
            ``num_classes``, for a model that is not class-conditional.
    """

    def __init__(
        self,
        guidance_scales: Sequence[float] = (0.0, 1.0, 2.0, 4.0),
        num_per_class: int = 100,
        euler_steps: int = 32,
        classifier: Literal["digits"] | ImageClassifier | None = None,
        classifier_cache_dir: str | None = None,
        max_reference: int = 10_000,
        batch_size: int = 1000,
        num_shown: int = 4,
        seed: int = 0,
    ) -> None:
        scales = tuple(float(w) for w in guidance_scales)
        if not scales or not all(math.isfinite(w) for w in scales) or len(set(scales)) != len(scales):
            raise ValueError(f"guidance_scales must list distinct finite numbers, got {guidance_scales!r}")
        for name, value, low in (
            ("num_per_class", num_per_class, 1),
            ("euler_steps", euler_steps, 1),
            ("max_reference", max_reference, 2),
            ("batch_size", batch_size, 1),
            ("num_shown", num_shown, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if not (classifier is None or classifier == "digits" or callable(classifier)):
            raise ValueError(f"classifier must be 'digits', a callable or None, got {classifier!r}")
        self.guidance_scales = scales
        self.num_per_class, self.euler_steps, self.max_reference = num_per_class, euler_steps, max_reference
        self.batch_size, self.num_shown, self.seed = batch_size, num_shown, int(seed)
        self.classifier = classifier
        self.classifier_cache_dir = classifier_cache_dir
        self.rows: list[dict[str, Any]] = []
        self.samples: dict[float, Tensor] = {}
        self.labels: Tensor | None = None
        self._run_dir: str | None = None
        self._classifier_fn: ImageClassifier | None = None  # "digits": the loaded classifier

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        _class_conditioning(pl_module, type(self).__name__)
        self._run_dir = resolve_run_dir(trainer)  # every rank: trainer.log_dir is a collective

    @override
    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        self.evaluate(pl_module, datamodule)
        run_dir = self._run_dir
        if run_dir is not None:
            os.makedirs(run_dir, exist_ok=True)
        self._write_table(run_dir, trainer.global_step)
        if run_dir is not None and self.num_shown > 0:
            self._write_picture(os.path.join(run_dir, "guidance.png"), datamodule)

    def _classify(self, images: Tensor) -> tuple[Tensor, Tensor]:
        if self._classifier_fn is None:
            if self.classifier == "digits":
                from ko_lightning.metrics import load_digits_classifier

                self._classifier_fn = load_digits_classifier(self.classifier_cache_dir)
            else:
                assert callable(self.classifier)
                self._classifier_fn = self.classifier
        classify = self._classifier_fn
        with torch.no_grad():
            parts = [classify(chunk) for chunk in images.split(self.batch_size)]
        return torch.cat([f for f, _ in parts]).float(), torch.cat([lg for _, lg in parts]).float()

    def evaluate(self, module: Any, datamodule: Any = None) -> list[dict[str, Any]]:
        """Sample and score every scale (what ``on_fit_end`` does before writing); fills and returns :attr:`rows`.

        Args:
            module: a class-conditional model with ``conditioning``, ``data_shape`` and
                ``sample(x0=, method=, steps=, cond=, guidance_scale=)`` (:class:`~ko_lightning.FlowMatching`).
            datamodule: the data (``to_display`` for the classifier and picture, ``train_tensor`` for the FID).
        """
        num_classes = _class_conditioning(module, type(self).__name__).num_classes
        assert num_classes is not None
        if module.data_shape is None:
            raise RuntimeError("GuidanceReport: the module has no data_shape (it saw no training batch)")
        labels = torch.arange(num_classes).repeat_interleave(self.num_per_class)
        gen = torch.Generator().manual_seed(self.seed)
        x0 = torch.randn((labels.shape[0], *module.data_shape), generator=gen)
        device = getattr(module, "device", torch.device("cpu"))
        reference_features = None
        if self.classifier is not None:
            reference = _reference(datamodule, self.max_reference)
            if reference is not None:
                reference_features = self._classify(_display(datamodule, reference))[0]
        self.rows, self.samples, self.labels = [], {}, labels
        for w in self.guidance_scales:
            start, chunks, nfe = time.perf_counter(), [], 0
            with torch.no_grad():
                for x_chunk, y_chunk in zip(x0.split(self.batch_size), labels.split(self.batch_size), strict=True):
                    result = module.sample(
                        x0=x_chunk.to(device), method="euler", steps=self.euler_steps, cond=y_chunk.to(device),
                        guidance_scale=w,
                    )  # fmt: skip
                    chunks.append(result.samples.float().cpu())
                    nfe = int(result.nfe)
            x, seconds = torch.cat(chunks), time.perf_counter() - start
            row: dict[str, Any] = {"guidance_scale": w, "nfe": nfe}
            if self.classifier is not None:
                features, logits = self._classify(_display(datamodule, x))
                if logits.ndim != 2 or logits.shape[1] != num_classes:
                    raise ValueError(
                        f"GuidanceReport: the classifier gives logits of shape {tuple(logits.shape)}, but the model "
                        f"has num_classes={num_classes}: it must give (B, {num_classes})"
                    )
                row["class_accuracy"] = float((logits.argmax(dim=1) == labels).double().mean())
                if reference_features is not None and x.shape[0] >= 2:
                    row["fid"] = fid_from_features(features, reference_features)
            self.rows.append({**row, "seconds": seconds})
            self.samples[w] = x
        return self.rows

    def _write_table(self, run_dir: str | None, step: int) -> None:
        n = len(self.labels) if self.labels is not None else 0
        preamble = [f"{n} samples per scale ({self.num_per_class} per class), Euler {self.euler_steps} steps."]
        if any("fid" in row for row in self.rows):
            preamble.append("FID: in the classifier's feature space, against the training split.")
        title = f"Classifier-free guidance after {step} training steps"
        write_report_table(self.rows, title, preamble, run_dir, "guidance.md", _cell)

    def _write_picture(self, file: str, datamodule: Any) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        assert self.labels is not None
        classes = int(self.labels.max()) + 1
        shown = min(self.num_shown, self.num_per_class)
        # sample j of class c sits at c * num_per_class + j; tile row j, column c
        index = torch.tensor([c * self.num_per_class + j for j in range(shown) for c in range(classes)])
        fig, axes = plt.subplots(len(self.rows), 1, figsize=(max(4.0, 0.6 * classes), 0.7 * shown * len(self.rows) + 1))
        for ax, row in zip(list(getattr(axes, "flat", [axes])), self.rows, strict=True):
            x = self.samples[row["guidance_scale"]]
            if x.ndim == 2 and x.shape[1] == 2:  # 2D data: one colour per class
                x = datamodule.denormalize(x) if hasattr(datamodule, "denormalize") else x
                ax.scatter(x[:, 0].numpy(), x[:, 1].numpy(), c=self.labels.numpy(), s=2, cmap="tab10")
                ax.set_aspect("equal")
            else:
                images = display_images(x[index], datamodule, (-1.0, 1.0))
                tiles = display_tiles(images, classes)
                ax.imshow(tiles, cmap="gray" if tiles.ndim == 2 else None)
                width = images.shape[-1] if images.ndim == 4 else math.isqrt(images.shape[1])
                ax.set_xticks(
                    [0.5 + q * (width + 1) + width / 2 for q in range(classes)], [str(c) for c in range(classes)]
                )
                ax.set_yticks([])
            metrics = ", ".join(f"{k} {row[k]:.3g}" for k in ("nfe", "class_accuracy", "fid") if k in row)
            ax.set_title(f"w = {row['guidance_scale']:g} ({metrics})", fontsize=9)
        fig.tight_layout()
        fig.savefig(file, dpi=90)
        plt.close(fig)
