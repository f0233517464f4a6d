"""check_finite's deferred mode (the device-side record read every k steps, docs/scale.md §4), forced on the CPU:
the first bad batch is named with its step at the next read, training stops there, labels out of range are
recorded and neutralized; the immediate mode (the CPU default) still raises at the bad batch itself."""

from __future__ import annotations

import re

import lightning as L
import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from ko_lightning import FlowMatching
from ko_lightning.finite_checks import FiniteChecks, finite_mode
from ko_lightning.nets import TimeMLP

pytestmark = pytest.mark.usefixtures("one_thread")


def _batches(n: int, bad: dict[int, int]) -> list[Tensor]:
    """``n`` batches of 8 two-dimensional points; batch ``i`` in ``bad`` gets that many NaN entries."""
    gen = torch.Generator().manual_seed(0)
    out = [torch.randn(8, 2, generator=gen) for _ in range(n)]
    for i, count in bad.items():
        out[i].view(-1)[:count] = float("nan")
    return out


def _loader(n: int, bad: dict[int, int]) -> DataLoader:
    return DataLoader(_batches(n, bad), batch_size=None)  # each item is one whole batch, in order


def _trainer(max_steps: int) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )


def test_deferred_check_names_batch_3_at_the_next_read_and_stops_training_there() -> None:
    model = FlowMatching(TimeMLP(dim=2, hidden=8, depth=1), check_finite="deferred", check_finite_every=5)
    trainer = _trainer(max_steps=20)
    expected = r"train batch 3 \(step 3\) contains 2 non-finite value\(s\).*deferred check_finite at step 5"
    with pytest.raises(ValueError, match=expected):
        trainer.fit(model, train_dataloaders=_loader(20, {3: 2}))
    # Steps 0..4 were taken (batch 3's NaN went into step 3's update); batch 5's step never ran.
    assert trainer.global_step == 5
    assert not all(bool(torch.isfinite(p).all()) for p in model.parameters())  # the NaN did reach the weights


def test_deferred_check_runs_at_the_end_of_training() -> None:
    model = FlowMatching(TimeMLP(dim=2, hidden=8, depth=1), check_finite="deferred", check_finite_every=100)
    trainer = _trainer(max_steps=6)
    with pytest.raises(ValueError, match=r"train batch 4 \(step 4\) contains 1 non-finite.*at the end of training"):
        trainer.fit(model, train_dataloaders=_loader(6, {4: 1}))
    assert trainer.global_step == 6


def test_clean_batches_pass_the_deferred_check() -> None:
    model = FlowMatching(TimeMLP(dim=2, hidden=8, depth=1), check_finite="deferred", check_finite_every=2)
    trainer = _trainer(max_steps=7)
    trainer.fit(model, train_dataloaders=_loader(7, {}))
    assert trainer.global_step == 7
    assert model._finite.record is not None and model._finite.record.tolist() == [-1, -1, -1, -1]


def test_the_first_bad_batch_is_kept_and_the_record_is_exact() -> None:
    checks = FiniteChecks("deferred", every_n_steps=1000)
    for step, x in enumerate(_batches(10, {3: 5, 6: 1})):
        checks.data(x, "train", step, step, (2,))
    assert checks.record is not None and checks.record.tolist() == [3, 3, 5, 0]  # batch, step, values, labels
    with pytest.raises(ValueError, match=r"train batch 3 \(step 3\) contains 5 non-finite.*found by .* at step 9"):
        checks.check(9, "at step 9")


def test_deferred_labels_out_of_range_become_no_condition_and_are_reported() -> None:
    model = FlowMatching(TimeMLP(dim=2, hidden=8, depth=1, num_classes=3), check_finite="deferred")
    x = torch.zeros(4, 2)
    checks = model._finite
    good = checks.cond((x, torch.tensor([0, 1, 2, 3])), "train", 0, 0, model.conditioning, 4)  # 3: "no condition"
    assert good is not None and good.tolist() == [0, 1, 2, 3]
    bad = checks.cond((x, torch.tensor([0, 7, -1, 2])), "train", 1, 1, model.conditioning, 4)
    assert bad is not None and bad.tolist() == [0, 3, 3, 2]  # out of range -> the null label, no crash
    with pytest.raises(ValueError, match=r"train batch 1 \(step 1\) has 2 condition\(s\) out of range"):
        checks.check(1, "at step 1")


def test_immediate_mode_is_the_cpu_default_and_unchanged() -> None:
    batch = _batches(1, {0: 3})[0]
    for check_finite in (True, "auto", "immediate"):
        model = FlowMatching(TimeMLP(dim=2, hidden=8, depth=1), check_finite=check_finite)
        with pytest.raises(ValueError, match=re.escape("train batch 3 contains 3 non-finite value(s) (NaN or Inf)")):
            model.training_step(batch, 3)
        assert model._finite.record is None  # nothing deferred on the CPU
    unchecked = FlowMatching(TimeMLP(dim=2, hidden=8, depth=1), check_finite=False)
    assert not bool(torch.isfinite(unchecked.training_step(batch, 3)))  # no check: the NaN reaches the loss
    # Validation batches are checked immediately even in the deferred mode.
    deferred = FlowMatching(TimeMLP(dim=2, hidden=8, depth=1), check_finite="deferred")
    with pytest.raises(ValueError, match=r"val batch 2 contains 3 non-finite"):
        deferred._batch_tensor(batch, 2, "val")


@pytest.mark.parametrize(("value", "match"), [("sometimes", "check_finite"), (1, "check_finite")])
def test_bad_check_finite_is_named(value: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        finite_mode(value)
    with pytest.raises(ValueError, match="check_finite_every"):
        FiniteChecks(True, every_n_steps=0)
