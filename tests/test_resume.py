"""Exact mid-epoch resume (issue 8 part 6): the training loader's position is part of the checkpoint.

A run interrupted at any step and resumed from its checkpoint must repeat the uninterrupted run exactly: the same
batches in the same order, hence the same per-step losses, final weights, EMA weights and KO path. The end-to-end
tests train a small :class:`~ko_lightning.FlowMatching` model on a 2D toy set with ``EMAWeightAveraging`` and the
KO callback; the loader tests check the saved position directly: plain, under Lightning's distributed wrapper, with
a loader worker, with the image module's random flips, and the warnings where a position cannot be restored.

Equality is exact (``torch.equal``, ``==``): the resumed run performs the same fp32 operations on the same inputs
in the same order on the same machine as the uninterrupted one, so there is no rounding difference to allow for.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint
from lightning.pytorch.utilities.data import _update_dataloader
from torch import Tensor
from torch.utils.data import DataLoader, SequentialSampler

from ko_lightning import FlowMatching, KOScheduleCallback
from ko_lightning.data import ImageDataModule, IndexBatchLoader, TensorBatchDataset, Toy2DDataModule, base, make_loader
from ko_lightning.nets import TimeMLP

pytestmark = pytest.mark.usefixtures("one_thread")

MAX_STEPS = 30
N_TRAIN, BATCH = 2048, 128  # 16 batches per epoch: epoch 0 is steps 0-15, epoch 1 steps 16-31
CKPT_EVERY = 8  # checkpoints after steps 8 (mid-epoch 0), 16 (end of epoch 0) and 24 (mid-epoch 1)


# ------------------------------------------------------------------------------------ end to end (Trainer)
class _Recorder(L.Callback):
    """Records the loss and the batch of every step, and the trained (not averaged) weights after the last step
    (at the end of fit ``EMAWeightAveraging`` copies the average into the model)."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}
        self.batches: dict[int, Tensor] = {}
        self.weights: dict[str, Tensor] = {}

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step - 1  # the step that produced this loss
        self.losses[step] = float(outputs["loss"])
        self.batches[step] = batch.detach().clone()
        self.weights = {k: v.detach().clone() for k, v in pl_module.net.state_dict().items()}


class _DropoutMLP(torch.nn.Module):
    """A TimeMLP whose output goes through dropout: randomness inside the network, drawn from the global RNG."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = TimeMLP(dim=2, hidden=32, depth=2, time_embed_dim=16)
        self.dropout = torch.nn.Dropout(0.2)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.dropout(self.mlp(x, t))


def _fit(root: Path, ckpt_path: Path | None, global_seed: int = 0) -> dict[str, Any]:
    """Train (or resume from ``ckpt_path``) to MAX_STEPS; checkpoints go to ``root/ckpt``."""
    L.seed_everything(global_seed, verbose=False)
    dm = Toy2DDataModule("checkerboard", n_train=N_TRAIN, n_val=256, n_test=256, batch_size=BATCH, seed=0)
    # Defaults only (train_seed=None): the run's noise seed is fixed at fit start and saved in the checkpoint, and the
    # dropout of step k is seeded from it too; a resumed run under another global seed must still repeat the run.
    model = FlowMatching(_DropoutMLP())
    ema = EMAWeightAveraging(decay=0.9)
    # The model estimator makes the KO path depend on the trained weights (the data estimator would not see a
    # changed batch order).
    ko = KOScheduleCallback(
        every_n_steps=5,
        warmup_steps=5,
        estimator="model",
        n_queries=256,
        n_theta=16,
        n_grid=64,
        max_data=1024,
        plot=False,
    )
    recorder = _Recorder()
    checkpoints = ModelCheckpoint(
        dirpath=root / "ckpt", every_n_train_steps=CKPT_EVERY, save_top_k=-1, filename="{step}"
    )
    trainer = L.Trainer(
        max_steps=MAX_STEPS,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        limit_val_batches=0,
        callbacks=[ema, ko, recorder, checkpoints],
        deterministic=True,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    assert ema._average_model is not None
    state = {f"net.{k}": v for k, v in recorder.weights.items()}
    state.update({f"ema.{k}": v.detach().clone() for k, v in ema._average_model.state_dict().items()})
    state.update({f"path.{k}": v.detach().clone() for k, v in model.path.state_dict().items()})
    return {
        "recorder": recorder,
        "state": state,
        "refreshes": ko.refresh_count,
        "warnings": [str(w.message) for w in caught],
    }


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("uninterrupted")
    return root, _fit(root, None)


@pytest.mark.parametrize("resume_step", [8, 16, 24])
def test_resume_with_ema_and_ko_repeats_the_uninterrupted_run(
    uninterrupted: tuple[Path, dict[str, Any]], tmp_path: Path, resume_step: int
) -> None:
    root, full = uninterrupted
    resumed = _fit(tmp_path, root / "ckpt" / f"step={resume_step}.ckpt", global_seed=1)
    # Lightning warns when it resumes mid-epoch with a loader that has no state_dict; ours has one.
    assert not [w for w in resumed["warnings"] if "not resumable" in w]
    assert sorted(resumed["recorder"].losses) == list(range(resume_step, MAX_STEPS))
    for step in range(resume_step, MAX_STEPS):
        assert torch.equal(resumed["recorder"].batches[step], full["recorder"].batches[step]), f"batch {step}"
        assert resumed["recorder"].losses[step] == full["recorder"].losses[step], f"loss of step {step}"
    assert resumed["refreshes"] == full["refreshes"]
    assert any(k.startswith("path.") for k in full["state"])  # the KO path is tabulated: its table is compared
    assert resumed["state"].keys() == full["state"].keys()
    for key, value in full["state"].items():
        assert torch.equal(resumed["state"][key], value), f"{key} differs after resume from step {resume_step}"


def test_resume_without_the_loader_state_differs(
    uninterrupted: tuple[Path, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Control: with the loaders of before issue 8 (a plain ``DataLoader``, no state), the same resume changes the
    batch order, so the test above can fail. The uninterrupted run is the same with either loader."""

    def plain_loader(*args: Any, **kwargs: Any) -> DataLoader:
        loader = make_loader(*args, **kwargs)
        return DataLoader(loader.dataset, batch_size=None, sampler=loader.sampler)

    monkeypatch.setattr(base, "make_loader", plain_loader)
    _, full = uninterrupted
    plain_full = _fit(tmp_path / "full", None)
    assert all(torch.equal(plain_full["state"][k], v) for k, v in full["state"].items())
    resumed = _fit(tmp_path / "resumed", tmp_path / "full" / "ckpt" / "step=8.ckpt")
    assert [w for w in resumed["warnings"] if "not resumable" in w]
    assert not torch.equal(resumed["recorder"].batches[8], full["recorder"].batches[8])
    assert any(resumed["recorder"].losses[s] != full["recorder"].losses[s] for s in range(8, MAX_STEPS))
    assert not all(torch.equal(resumed["state"][k], v) for k, v in full["state"].items())


# ------------------------------------------------------------------------------------ loader state
def _epochs(loader: IndexBatchLoader, epochs: range) -> list[list[Tensor]]:
    """The batches of the given epochs, with ``set_epoch`` called as Lightning does."""
    out = []
    for epoch in epochs:
        loader.sampler.set_epoch(epoch)
        out.append(list(loader))
    return out


def _interrupt(loader: IndexBatchLoader, epoch: int, k: int) -> dict[str, int]:
    """Use ``k`` batches of ``epoch``, then return the loader's state."""
    loader.sampler.set_epoch(epoch)
    iterator = iter(loader)
    for _ in range(k):
        next(iterator)
    return loader.state_dict()


def _resume(loader: IndexBatchLoader, state: dict[str, int], epoch: int) -> Iterator[Tensor]:
    """Lightning's order on resume: ``load_state_dict``, create the iterator, then ``set_epoch``."""
    loader.load_state_dict(state)
    iterator = iter(loader)
    loader.sampler.set_epoch(epoch)
    return iterator


def _ids(n: int) -> Tensor:
    return torch.arange(n, dtype=torch.float32)[:, None]  # a batch shows its indices


@pytest.mark.parametrize("epoch", [0, 1])
@pytest.mark.parametrize("k", [1, 2, 4, 5])
def test_loader_state_resumes_at_any_position(epoch: int, k: int) -> None:
    def make() -> IndexBatchLoader:
        return make_loader(_ids(43), 8, shuffle=True, drop_last=True, seed=3)

    reference = _epochs(make(), range(4))  # 5 batches per epoch
    state = _interrupt(make(), epoch, k)
    assert state == {"epoch": epoch, "batches": k, "num_batches": 5}
    resumed = make()
    if k < 5:
        rest = list(_resume(resumed, state, epoch))
        assert len(rest) == 5 - k
        assert all(torch.equal(a, b) for a, b in zip(rest, reference[epoch][k:], strict=True))
    else:  # saved at the end of the pass: the resumed run starts the next epoch
        rest = list(_resume(resumed, state, epoch + 1))
        assert all(torch.equal(a, b) for a, b in zip(rest, reference[epoch + 1], strict=True))
    after = epoch + 2 if k == 5 else epoch + 1  # and the epoch after goes on as usual
    assert all(
        torch.equal(a, b) for a, b in zip(_epochs(resumed, range(after, after + 1))[0], reference[after], strict=True)
    )


@pytest.mark.parametrize("rank", [0, 1])
def test_loader_state_reaches_the_shard_under_lightnings_distributed_wrapper(rank: int) -> None:
    def make() -> IndexBatchLoader:
        loader = make_loader(_ids(80), 8, shuffle=True, drop_last=True, seed=3)
        # What Lightning does under DDP (training: shuffle=True, seed from PL_GLOBAL_SEED).
        wrapper = DistributedSamplerWrapper(loader.sampler, num_replicas=2, rank=rank, shuffle=True, seed=0)
        wrapped = _update_dataloader(loader, wrapper)
        assert isinstance(wrapped, IndexBatchLoader) and wrapped.sampler is wrapper
        return wrapped

    reference = _epochs(make(), range(2))  # 10 batches per epoch, 5 per rank
    state = _interrupt(make(), 1, 2)
    assert state == {"epoch": 1, "batches": 2, "num_batches": 5}
    # Under DDP the wrapper draws the whole pass when the iterator is created, before Lightning's set_epoch: the
    # restored epoch must already be in place then.
    rest = list(_resume(make(), state, 1))
    assert all(torch.equal(a, b) for a, b in zip(rest, reference[1][2:], strict=True))


def test_loader_state_counts_delivered_not_prefetched_batches_with_a_worker() -> None:
    def make() -> IndexBatchLoader:
        return make_loader(_ids(64), 8, shuffle=True, drop_last=True, seed=3, num_workers=1)

    reference = _epochs(make(), range(1))[0]
    loader = make()
    state = _interrupt(loader, 0, 3)  # the worker has prefetched beyond batch 3 by now
    del loader
    assert state == {"epoch": 0, "batches": 3, "num_batches": 8}
    rest = list(_resume(make(), state, 0))
    assert all(torch.equal(a, b) for a, b in zip(rest, reference[3:], strict=True))


def test_image_random_flips_repeat_on_resume_whatever_the_global_rng(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, size=(50, 6, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=images)

    def make() -> IndexBatchLoader:
        return ImageDataModule(str(tmp_path / "d.npz"), batch_size=8, val_fraction=0.2, seed=0).train_dataloader()

    torch.manual_seed(0)
    reference = _epochs(make(), range(2))
    torch.manual_seed(0)
    state = _interrupt(make(), 1, 2)
    torch.manual_seed(123)  # Lightning does not restore the global RNG
    rest = list(_resume(make(), state, 1))
    assert all(torch.equal(a, b) for a, b in zip(rest, reference[1][2:], strict=True))
    # The flips are random all the same: some images of the epoch are flipped, some not.
    dm = ImageDataModule(str(tmp_path / "d.npz"), batch_size=8, val_fraction=0.2, seed=0, random_flip=False)
    plain = _epochs(dm.train_dataloader(), range(2))
    pairs = [(a, b) for x, y in zip(reference[1], plain[1], strict=True) for a, b in zip(x, y, strict=True)]
    flipped = [bool(torch.equal(a, b.flip(-1))) for a, b in pairs]
    assert 0 < sum(flipped) < len(flipped)


def test_loader_state_that_cannot_be_restored_warns() -> None:
    state = _interrupt(make_loader(_ids(64), 8, shuffle=True, drop_last=True), 0, 3)
    other = make_loader(_ids(64), 4, shuffle=True, drop_last=True)  # 16 batches per epoch, not 8
    with pytest.warns(UserWarning, match=r"had 8 batches per epoch, this one has 16.*resumes from its first batch"):
        rest = list(_resume(other, state, 0))
    assert len(rest) == 16
    plain = IndexBatchLoader(TensorBatchDataset(_ids(8)), batch_size=None, sampler=SequentialSampler(range(8)))
    with pytest.warns(UserWarning, match=r"cannot restore the training loader's position.*SequentialSampler"):
        plain.load_state_dict(state)
