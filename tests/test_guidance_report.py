"""GuidanceReport: the conditional digits recipe end to end with its report, the report's numbers against an
independent recomputation, and stand-in models whose samples are known digits (the accuracy can fail)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import lightning as L
import pytest
import torch
from torch import Tensor

from ko_lightning import FlowMatching
from ko_lightning.callbacks import GuidanceReport
from ko_lightning.cli import run_cli
from ko_lightning.conditioning import Conditioning
from ko_lightning.data import DigitsDataModule
from ko_lightning.metrics import fid_from_features, load_digits_classifier
from ko_lightning.nets import UNet
from ko_lightning.sampling import SampleResult
from recipe_configs import shrink_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

_ROW = re.compile(r"^\| ([-0-9.e]+) \| (\d+) \| ([0-9.]+) \| ([-0-9.]+) \| ([0-9.]+) \|$", re.M)


@pytest.fixture(scope="module")
def classifier_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One digits classifier for the module (trained once, 1-7 s), outside the user's cache."""
    root = tmp_path_factory.mktemp("classifier")
    load_digits_classifier(cache_dir=root)
    yield root


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule(batch_size=32, labels=True)
    dm.setup()
    return dm


def test_conditional_digits_recipe_runs_and_its_report_matches_a_recomputation(
    tmp_path: Path, classifier_cache: Path
) -> None:
    small = shrink_recipe("digits_conditional.yaml", tmp_path, max_steps=3, classifier_cache_dir=classifier_cache)
    cli = run_cli(["fit", "--config", str(small)])
    model, dm, trainer = cli.model, cli.datamodule, cast(Any, cli.trainer)
    assert trainer.global_step == 3 and model.conditioning.num_classes == 10 and model.cond_dropout == 0.1
    report = next(cb for cb in trainer.callbacks if isinstance(cb, GuidanceReport))
    run_dir = Path(trainer.log_dir)
    assert (run_dir / "guidance.png").is_file()
    rows = _ROW.findall((run_dir / "guidance.md").read_text())
    steps = report.euler_steps
    nfe = [(float(w), int(n)) for w, n, *_ in rows]
    assert nfe == [(0.0, steps), (1.0, steps), (2.0, 2 * steps), (4.0, 2 * steps)]  # guided: two calls per step

    # Independently: the same noise and labels, sampled again, classified again, FID again.
    classifier = load_digits_classifier(cache_dir=classifier_cache)
    labels = torch.arange(10).repeat_interleave(report.num_per_class)
    x0 = torch.randn((labels.shape[0], 1, 8, 8), generator=torch.Generator().manual_seed(report.seed))
    with torch.no_grad():
        reference_features = classifier(dm.to_display(dm.train_tensor()))[0]
    for (w, _, accuracy, fid, _), row in zip(rows, report.rows, strict=True):
        samples = model.sample(x0=x0, method="euler", steps=steps, cond=labels, guidance_scale=float(w)).samples
        assert torch.equal(samples, report.samples[float(w)])  # same noise, labels and model: the same solve
        with torch.no_grad():
            features, logits = classifier(dm.to_display(report.samples[float(w)]))
        expected = float((logits.argmax(1) == labels).double().mean())
        assert row["class_accuracy"] == expected and float(accuracy) == pytest.approx(expected, abs=5e-5)
        assert row["fid"] == pytest.approx(fid_from_features(features, reference_features), rel=1e-9)
        assert float(fid) == pytest.approx(row["fid"], abs=5e-5)


class _KnownDigits:
    """A stand-in model whose "samples" are training digits of class ``(label + shift) % 10`` (shift 0: the requested
    class); the NFE is counted as a guided Euler solve would."""

    def __init__(self, dm: DigitsDataModule, shift: int) -> None:
        self.conditioning = Conditioning(num_classes=10)
        self.data_shape = (1, 8, 8)
        x, y = dm.train_tensor(), dm.labels_tensor("train")
        self.pools = [x[y == c] for c in range(10)]
        self.shift = shift

    def sample(self, *, x0: Tensor, method: str, steps: int, cond: Tensor, guidance_scale: float) -> SampleResult:
        assert method == "euler" and x0.shape == (cond.shape[0], 1, 8, 8)
        picks = [self.pools[(int(c) + self.shift) % 10][i % 50] for i, c in enumerate(cond)]
        return SampleResult(torch.stack(picks), steps * (1 if guidance_scale in (0.0, 1.0) else 2))


def test_accuracy_is_high_for_digits_of_the_requested_class_and_low_otherwise(
    digits: DigitsDataModule, classifier_cache: Path
) -> None:
    kwargs: dict[str, Any] = {"num_per_class": 20, "euler_steps": 5, "classifier_cache_dir": str(classifier_cache)}
    right = GuidanceReport(classifier="digits", **kwargs).evaluate(_KnownDigits(digits, 0), digits)
    wrong = GuidanceReport(classifier="digits", **kwargs).evaluate(_KnownDigits(digits, 3), digits)
    assert [r["nfe"] for r in right] == [5, 5, 10, 10]
    assert all(r["class_accuracy"] >= 0.9 for r in right), right
    assert all(r["class_accuracy"] <= 0.2 for r in wrong), wrong
    # FID sees only the pooled samples: real digits are close to the data whichever labels they answer
    assert all(0 <= r["fid"] < 1 for r in right + wrong), (right, wrong)
    none = GuidanceReport(guidance_scales=[0.0, 3.0], **kwargs).evaluate(_KnownDigits(digits, 0), digits)
    assert [sorted(r) for r in none] == [["guidance_scale", "nfe", "seconds"]] * 2  # no classifier: NFE only
    assert [r["nfe"] for r in none] == [5, 10]


def test_a_classifier_callable_is_used_and_its_class_count_checked(digits: DigitsDataModule) -> None:
    calls: list[int] = []

    def three_classes(images: Tensor) -> tuple[Tensor, Tensor]:
        calls.append(images.shape[0])
        return images.flatten(1), torch.zeros(images.shape[0], 3)

    report = GuidanceReport(guidance_scales=[1.0], num_per_class=2, euler_steps=1, classifier=three_classes)
    with pytest.raises(ValueError, match=r"num_classes=10"):
        report.evaluate(_KnownDigits(digits, 0), digits)
    assert calls  # the callable received the display images


def test_an_unconditional_model_is_an_error_naming_the_callback_and_num_classes() -> None:
    torch.manual_seed(0)
    model = FlowMatching(UNet(base_channels=8, channel_mults=[1], num_res_blocks=1, attention_resolutions=[], groups=4))
    with pytest.raises(ValueError, match=r"GuidanceReport.*num_classes.*unconditional"):
        GuidanceReport().setup(L.Trainer(logger=False), model, "fit")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"guidance_scales": []}, "guidance_scales"),
        ({"guidance_scales": [1.0, float("inf")]}, "guidance_scales"),
        ({"guidance_scales": [1.0, 1.0]}, "distinct"),
        ({"num_per_class": 0}, "num_per_class"),
        ({"euler_steps": 0}, "euler_steps"),
        ({"classifier": "inception"}, "classifier"),
    ],
)
def test_bad_arguments_are_errors_naming_them(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GuidanceReport(**kwargs)
