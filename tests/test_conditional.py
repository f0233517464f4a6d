"""Conditional generation: conditions in batches and networks, condition dropout, classifier-free guidance, the
checkpointed conditioning, and a labelled 2D mixture learnt per class (docs/math.md §7)."""

from __future__ import annotations

import math
import warnings

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ko_lightning import FlowMatching, KOScheduleCallback
from ko_lightning.conditioning import Conditioning
from ko_lightning.nets import ConditionEmbedding, TimeMLP, UNet
from ko_lightning.paths import CondOTPath, GaussianPath


def _model(num_classes: int | None = 3, cond_dim: int | None = None, seed: int = 0, **kw: object) -> FlowMatching:
    torch.manual_seed(seed)
    net = TimeMLP(2, hidden=32, depth=2, num_classes=num_classes, cond_dim=cond_dim)
    return FlowMatching(net, data_shape=(2,), **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- guidance
def test_guidance_scale_one_is_the_conditional_sample_bit_for_bit_with_one_call_per_step() -> None:
    model = _model()
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(2))
    plain = model.sample(x0=x0, cond=y, steps=6)
    guided = model.sample(x0=x0, cond=y, guidance_scale=1.0, steps=6)
    assert torch.equal(plain.samples, guided.samples)
    assert guided.nfe == 6


def test_guidance_scale_zero_is_the_model_called_without_condition() -> None:
    model = _model()
    x0 = torch.randn(32, 2, generator=torch.Generator().manual_seed(3))
    y = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(4))
    unconditional = model.sample(x0=x0, steps=5)
    w0 = model.sample(x0=x0, cond=y, guidance_scale=0.0, steps=5)
    assert torch.equal(unconditional.samples, w0.samples)
    assert w0.nfe == 5
    # "no condition" is the null label: the same as passing label num_classes explicitly
    v_none = model.velocity(x0, torch.full((32,), 0.3))
    v_null = model.velocity(x0, torch.full((32,), 0.3), cond=torch.full((32,), 3))
    assert torch.equal(v_none, v_null)


def test_guided_euler_matches_an_independent_loop_and_counts_two_calls_per_step() -> None:
    model = _model(seed=5)
    x0 = torch.randn(16, 2, generator=torch.Generator().manual_seed(6))
    y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(7))
    w, steps = 2.5, 4
    result = model.sample(x0=x0, cond=y, guidance_scale=w, steps=steps)
    assert result.nfe == 2 * steps
    x = x0.clone()
    with torch.no_grad():
        for k in range(steps):
            t = torch.full((16,), k / steps)
            v_c = model.net(x, t, cond=y)
            v_u = model.net(x, t)
            x = x + (v_u + w * (v_c - v_u)) / steps
    # the batched call of twice the size and the two separate calls agree to fp32 rounding of a 2-layer MLP
    assert torch.allclose(result.samples, x, atol=1e-5, rtol=1e-5)


def test_float_conditions_take_a_learned_null_for_nan_rows() -> None:
    emb = ConditionEmbedding(8, cond_dim=3)
    with torch.no_grad():
        emb.null.copy_(torch.arange(8.0))
    cond = torch.tensor([[1.0, 2.0, 3.0], [float("nan")] * 3])
    out = emb(cond, 2, torch.device("cpu"))
    assert torch.equal(out[1], torch.arange(8.0))
    assert torch.allclose(out[0], emb.proj(cond[:1])[0])
    assert torch.equal(emb(None, 2, torch.device("cpu")), torch.arange(8.0).expand(2, 8))


def test_a_fresh_class_embedding_leaves_the_unconditional_network_as_it_was() -> None:
    torch.manual_seed(0)
    plain = UNet(1, 8, 16, (1, 2), 1, (), groups=8)
    torch.manual_seed(0)
    conditional = UNet(1, 8, 16, (1, 2), 1, (), groups=8, num_classes=10)
    assert conditional.cond_embedding is not None
    # the null row starts at zero: an unconditional call of the conditional net only adds 0 to the time embedding
    assert torch.equal(conditional.cond_embedding.table.weight[10], torch.zeros(64))
    assert sum(p.numel() for p in conditional.parameters()) - sum(p.numel() for p in plain.parameters()) == 11 * 64


# ---------------------------------------------------------------------------------------------- training
def test_condition_dropout_rate_is_within_its_binomial_error() -> None:
    n, p = 40_000, 0.3
    labels = torch.randint(0, 5, (n,), generator=torch.Generator().manual_seed(0))
    dropped = Conditioning(num_classes=5).drop(labels, p, torch.Generator().manual_seed(1))
    rate = float((dropped == 5).float().mean())
    assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / n)
    kept = dropped != 5
    assert torch.equal(dropped[kept], labels[kept])  # kept conditions are untouched
    floats = Conditioning(cond_dim=2).drop(torch.ones(n, 2), p, torch.Generator().manual_seed(1))
    assert torch.equal(torch.isnan(floats).all(dim=1), dropped == 5)  # same draws, a NaN row per dropped sample


def test_training_step_reads_conditions_from_tuples_and_dicts_alike() -> None:
    model = _model(cond_dropout=0.5, train_seed=3)
    x = torch.randn(32, 2)
    y = torch.randint(0, 3, (32,))
    g = torch.Generator().manual_seed(0)
    from_tuple = model.loss(x, torch.Generator().manual_seed(0), model._batch_cond((x, y), 0, "train", 32), 0.5)
    from_dict = model.loss(
        x, torch.Generator().manual_seed(0), model._batch_cond({"x": x, "y": y}, 0, "train", 32), 0.5
    )
    assert torch.equal(from_tuple, from_dict)
    # the dropout is drawn after the times and noise, so p changes only which conditions are dropped
    t_eps = model.t_eps
    t = t_eps + (1 - 2 * t_eps) * torch.rand(32, generator=g)
    x0 = torch.randn(32, 2, generator=g)
    keep = torch.rand(32, generator=g) >= 0.5
    expected = model.loss_at(x0, x, t, torch.where(keep, y, torch.full_like(y, 3)))
    assert torch.equal(from_tuple, expected)


def test_a_conditional_network_without_labels_in_the_batch_is_an_error_naming_the_batch() -> None:
    model = _model()
    with pytest.raises(ValueError, match=r"train batch 7: the network is conditional \(num_classes=3\)"):
        model._batch_cond(torch.randn(4, 2), 7, "train", 4)


def test_checkpoints_keep_the_conditioning(tmp_path: object) -> None:
    model = _model(num_classes=4, train_seed=0)
    data = TensorDataset(torch.randn(64, 2), torch.randint(0, 4, (64,)))
    trainer = L.Trainer(
        max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, DataLoader(data, batch_size=32))
    ckpt = f"{tmp_path}/last.ckpt"
    trainer.save_checkpoint(ckpt)
    again = FlowMatching.load_from_checkpoint(ckpt, net=TimeMLP(2, hidden=32, depth=2, num_classes=4))
    x, t, y = torch.randn(8, 2), torch.rand(8), torch.randint(0, 4, (8,))
    assert torch.equal(again.velocity(x, t, cond=y), model.velocity(x, t, cond=y))
    with pytest.raises(ValueError, match=r"num_classes=4.*num_classes=5"):
        FlowMatching.load_from_checkpoint(ckpt, net=TimeMLP(2, hidden=32, depth=2, num_classes=5))
    with pytest.raises(ValueError, match=r"num_classes=4.*unconditional"):
        FlowMatching.load_from_checkpoint(ckpt, net=TimeMLP(2, hidden=32, depth=2))


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"cond": torch.tensor([0, 1, 3, 0])}, r"cond\[2\] = 3 is out of range"),
        ({"cond": torch.tensor([0.0, 1.0, 2.0, 0.0])}, "integer class labels"),
        ({"cond": torch.tensor([0, 1])}, r"shape \(4,\)"),
        ({"guidance_scale": 2.0}, "needs cond="),
        ({"cond": 1, "guidance_scale": float("nan")}, "guidance_scale must be finite"),
    ],
)
def test_bad_conditions_and_scales_are_errors_naming_the_argument(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        _model().sample(4, steps=2, **kwargs)  # type: ignore[arg-type]


def test_guidance_or_conditions_for_an_unconditional_model_are_errors() -> None:
    model = _model(num_classes=None)
    with pytest.raises(ValueError, match="guidance_scale=2.0 needs a conditional model"):
        model.sample(4, steps=2, cond=torch.zeros(4, dtype=torch.long), guidance_scale=2.0)
    with pytest.raises(ValueError, match="cond was given but the network is unconditional"):
        model.sample(4, steps=2, cond=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="cond_dropout=0.1 needs a conditional network"):
        FlowMatching(TimeMLP(2), cond_dropout=0.1)


def test_batch_labels_out_of_range_name_the_batch_and_the_sample() -> None:
    model = _model()
    batch = (torch.zeros(4, 2), torch.tensor([0, 2, 5, 1]))
    with pytest.raises(
        ValueError, match=r"train batch 3: condition\[2\] = 5 is out of range: labels must lie in \[0, 3\]"
    ):
        model._batch_cond(batch, 3, "train", 4)
    # the null label (3 = num_classes) is allowed in a batch: pre-dropped conditions
    assert model._batch_cond((torch.zeros(2, 2), torch.tensor([3, 0])), 0, "train", 2) is not None


def test_a_float_condition_of_the_wrong_width_names_its_shape() -> None:
    model = _model(num_classes=None, cond_dim=3)
    with pytest.raises(ValueError, match=r"cond must have shape \(4, 3\), got \(4, 2\)"):
        model.sample(4, steps=2, cond=torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"train batch 0: condition must have shape \(4, 3\)"):
        model._batch_cond((torch.zeros(4, 2), torch.zeros(4, 2)), 0, "train", 4)


# ---------------------------------------------------------------------------------------------- a labelled mixture
# three overlapping components (std 0.5, means 1.9 apart): a point of class k lies nearest to mean k with probability
# 0.946, so w = 1 can reach about that and guidance (w > 1) has room to sharpen the classes.
MEANS = 1.1 * torch.tensor([[1.0, 0.0], [-0.5, 0.75**0.5], [-0.5, -(0.75**0.5)]])


def _labelled_mixture(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    return MEANS[y] + 0.5 * torch.randn(n, 2, generator=g), y


def _component(x: torch.Tensor) -> torch.Tensor:
    return torch.cdist(x, MEANS).argmin(dim=1)


def test_a_class_conditional_model_puts_each_class_in_its_component_and_guidance_sharpens_it() -> None:
    x, y = _labelled_mixture(8192, 0)
    torch.manual_seed(0)
    model = FlowMatching(
        TimeMLP(2, hidden=128, depth=3, num_classes=3),
        cond_dropout=0.2,
        train_seed=0,
        optimizer=lambda p: torch.optim.Adam(p, lr=2e-3),
    )
    trainer = L.Trainer(
        max_steps=300, logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=512, shuffle=True))
    n = 600
    labels = torch.arange(3).repeat_interleave(n)
    x0 = torch.randn(3 * n, 2, generator=torch.Generator().manual_seed(1))
    hit = {}
    for w in (1.0, 3.0):
        samples = model.sample(x0=x0, cond=labels, guidance_scale=w, steps=32).samples
        hit[w] = float((_component(samples) == labels).float().mean())
    data_x, data_y = _labelled_mixture(100_000, 9)
    data_rate = float((_component(data_x) == data_y).float().mean())  # what the exact conditional gives (0.949)
    assert hit[1.0] >= 0.9
    assert abs(hit[1.0] - data_rate) < 0.03  # 1800 samples: SE 0.005; the rest is the model's error
    assert hit[3.0] > hit[1.0] + 0.02  # guidance sharpens the classes past the data's own overlap
    free = _component(model.sample(x0=x0, guidance_scale=None, steps=32).samples)
    shares = torch.bincount(free, minlength=3).float() / free.numel()
    assert bool((shares > 0.2).all()), shares  # w = 0 (no condition) covers every component (1/3 each)


# ---------------------------------------------------------------------------------------------- the KO callback
def _fit_with_ko(model: FlowMatching, data: TensorDataset) -> tuple[KOScheduleCallback, GaussianPath]:
    ko = KOScheduleCallback(plot=False, n_queries=256, n_theta=32)
    trainer = L.Trainer(
        max_steps=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[ko],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, DataLoader(data, batch_size=128))
    return ko, model.path


def test_the_callback_solves_a_conditional_model_from_the_conditional_lambda() -> None:
    """Each class a single point: E[x1 | x_t, c] = x_c exactly, so lambda_cond = 1 and the KO path is Cond-OT
    (docs/math.md §3.10). The same data without labels have lambda well below 1 at low SNR, and a KO path that
    is not Cond-OT: the test tells the two apart."""
    points = torch.tensor([[1.0, 0.0], [-0.5, 0.8], [-0.5, -0.8]])
    y = torch.arange(3).repeat(200)
    data = TensorDataset(points[y], y)
    ko, path = _fit_with_ko(_model(num_classes=3, train_seed=0), data)
    assert ko.separation is not None
    assert torch.allclose(ko.separation.lam_raw, torch.ones_like(ko.separation.lam_raw), atol=1e-6)
    t = torch.linspace(0, 1, 101)
    c, ref = path.coefficients(t), CondOTPath()(t)
    gap = max(float((c.alpha - ref.alpha).abs().max()), float((c.sigma - ref.sigma).abs().max()))
    assert gap < 1e-3
    _, plain = _fit_with_ko(_model(num_classes=None, train_seed=0), data)  # the labels are ignored
    c_plain = plain.coefficients(t)
    assert float((c_plain.alpha - ref.alpha).abs().max()) > 0.05


def test_bad_sample_sizes_are_named_before_the_condition_is_checked() -> None:
    model = _model()
    with pytest.raises(ValueError, match="num_samples must be a positive integer, got 2.5"):
        model.sample(2.5, cond=1, steps=2)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="x0 must be a tensor of initial noise"):
        model.sample(x0=[[0.0, 0.0]], cond=1, steps=2)  # type: ignore[arg-type]
