"""Bad input gets a clear error that names the argument, batch or file, and leaves the module as it was.

Covers issue 8 part 4 for the module, the solvers and the paths: empty and integer batches, time points outside
the solve, adaptive solves that cannot finish (step budget, step-size underflow, NaN velocity), non-finite path
constructor arguments and tables, and checkpoints that do not belong to the module or are damaged.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from ko_lightning import FlowMatching
from ko_lightning.likelihood import log_prob
from ko_lightning.nets import TimeMLP
from ko_lightning.paths import CondOTPath, CosinePath, PolynomialPath, TabulatedPath, VPPath
from ko_lightning.sampling import DEFAULT_MAX_NUM_STEPS, SolverError, SolverSpec, integrate

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(**kwargs) -> FlowMatching:
    torch.manual_seed(0)
    return FlowMatching(TimeMLP(dim=2, hidden=8, depth=1), **kwargs)


# ---------------------------------------------------------------------------------------------------- batches
@pytest.mark.parametrize("stage", ["train", "val", "test"])
@pytest.mark.parametrize(
    "batch",
    [torch.zeros(0, 2), [torch.zeros(0, 2)], [], torch.zeros(4, 0)],
    ids=["tensor", "tuple", "empty-list", "zero-width"],
)
def test_empty_batch_names_stage_and_index_and_changes_nothing(stage: str, batch) -> None:
    model = _model()  # data_shape unknown: it must not be inferred from a rejected batch
    step = {"train": model.training_step, "val": model.validation_step, "test": model.test_step}[stage]
    with pytest.raises(ValueError, match=rf"{stage} batch 5 is (empty|an empty list)"):
        step(batch, 5)
    assert model.data_shape is None


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # a training step without a Trainer
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.int32, torch.bool])
def test_integer_batch_names_batch_dtype_and_says_to_normalize(dtype: torch.dtype) -> None:
    model = _model()
    batch = torch.randint(0, 256, (8, 2)).to(dtype)
    with pytest.raises(TypeError, match=rf"train batch 3 has dtype {dtype}.*[Nn]ormalize the batch to floats"):
        model.training_step(batch, 3)
    assert model.data_shape is None
    # The same data normalized to floats trains (finite loss) and then fixes data_shape.
    loss = model.training_step(batch.float() / 127.5 - 1.0, 3)
    assert torch.isfinite(loss) and model.data_shape == (2,)


def test_integer_data_to_log_prob_points_to_bits_per_dim() -> None:
    with pytest.raises(TypeError, match="x must be a floating point tensor.*bits_per_dim"):
        log_prob(lambda x, t: -x, torch.zeros(4, 2, dtype=torch.uint8), solver=SolverSpec("euler", steps=2))


# ---------------------------------------------------------------------------------------------------- time points
@pytest.mark.parametrize(
    ("time_points", "match"),
    [
        ([0.5], r"time_points must start at the start of the solve, t = 0 "),  # used to return the noise
        ([1.0, 0.5, 0.0], r"time_points must start at the start of the solve"),  # used to run backwards
        ([0.0, 0.5, 0.5], r"time_points must be strictly increasing"),
        ([0.0, 0.7, 0.3], r"time_points must be strictly increasing"),
        ([0.0, 0.5, 2.0], r"time_points must lie within the span of the solve \[0, 1\], got 2"),  # ran past 1
        ([0.0, float("nan")], r"time_points must be finite"),
        ([[0.0, 1.0]], r"time_points must be a non-empty 1D tensor"),
    ],
)
def test_bad_time_points_are_errors_naming_time_points(time_points: list, match: str) -> None:
    model = _model(data_shape=(2,))
    with pytest.raises(ValueError, match=match):
        model.sample(4, steps=4, time_points=torch.tensor(time_points))


def test_time_points_start_at_t_eps_and_end_at_or_before_one_minus_t_eps() -> None:
    model = _model(data_shape=(2,), t_eps=0.01)
    x0 = torch.randn(5, 2, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=r"must start at the start of the solve, t = 0.01 .*got 0"):
        model.sample(x0=x0, steps=4, time_points=torch.tensor([0.0, 0.5]))
    with pytest.raises(ValueError, match=r"within the span of the solve \[0.01, 0.99\], got 1"):
        model.sample(x0=x0, steps=4, time_points=torch.tensor([0.01, 0.5, 1.0]))
    full = model.sample(x0=x0, steps=8)
    res = model.sample(x0=x0, steps=8, time_points=torch.tensor([0.01, 0.25, 0.5]))
    assert res.trajectory is not None and res.trajectory.shape == (3, 5, 2)
    torch.testing.assert_close(res.trajectory[0], x0, atol=0, rtol=0)  # the first point is the noise itself
    # The samples are the state at 1 - t_eps whatever the requested times: the same 8 uniform Euler steps run.
    torch.testing.assert_close(res.samples, full.samples, atol=1e-6, rtol=0)
    assert res.nfe == full.nfe == 8


# ---------------------------------------------------------------------------------------------------- solver limits
class _CallLimit:
    """A velocity that raises after ``limit`` calls, so a missing step budget fails the test instead of hanging."""

    def __init__(self, velocity, limit: int) -> None:
        self.velocity, self.limit, self.calls = velocity, limit, 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls > self.limit:
            raise AssertionError(f"still integrating after {self.limit} velocity calls: no step budget")
        return self.velocity(x, t)


def test_stiff_field_under_dopri5_ends_with_the_default_step_budget() -> None:
    # dx/dt = -1e8 x: dopri5's stability bound allows dt of about 3.3e-8, so [0, 1] would take ~3e7 steps.
    # The default budget is 10,000 step attempts, 6 evaluations each (dopri5 is FSAL), plus the first-step probe.
    velocity = _CallLimit(lambda x, t: -1e8 * x, limit=10 * 6 * DEFAULT_MAX_NUM_STEPS)
    with pytest.raises(SolverError) as info:
        integrate(velocity, torch.ones(3, 2), SolverSpec("dopri5"))
    message = str(info.value)
    assert "dopri5" in message and "atol=1e-05" in message and "rtol=1e-05" in message, message
    assert f"stopped after {DEFAULT_MAX_NUM_STEPS} step attempts (max_num_steps)" in message, message
    assert info.value.method == "dopri5" and info.value.t is not None and 0.0 <= info.value.t < 1e-2
    assert f"at t = {info.value.t:.6g} of [0, 1]" in message
    assert velocity.calls <= 6 * DEFAULT_MAX_NUM_STEPS + 8


def test_step_budget_is_a_knob_of_sample_and_log_prob() -> None:
    class Stiff(nn.Module):
        """Stiff in the direction of the solve: -1e8 x forwards (sampling), +1e8 x backwards (likelihood)."""

        def __init__(self, rate: float) -> None:
            super().__init__()
            self.rate = rate

        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.rate * x

    model = FlowMatching(Stiff(-1e8), data_shape=(2,))
    with pytest.raises(SolverError, match=r"dopri5 \(atol=0.001, rtol=0.001, max_num_steps=50\) stopped after 50"):
        model.sample(4, method="dopri5", atol=1e-3, rtol=1e-3, max_num_steps=50)
    model = FlowMatching(Stiff(1e8), data_shape=(2,))
    with pytest.raises(SolverError, match=r"FlowMatching\(parametrization='velocity'.*stopped after 30 step"):
        model.log_prob(torch.ones(2, 2), max_num_steps=30)
    with pytest.raises(ValueError, match="max_num_steps applies to adaptive methods only"):
        model.sample(4, method="euler", steps=4, max_num_steps=10)


@pytest.mark.parametrize("value", [0, -3, 2.5, True])
def test_bad_step_budget_is_named(value) -> None:
    with pytest.raises(ValueError, match="max_num_steps must be an integer >= 1"):
        SolverSpec("dopri5", max_num_steps=value)


def test_nan_velocity_under_an_adaptive_solver_says_so() -> None:
    # torchdiffeq reports this as an AssertionError "underflow in dt 0.0" (the step size becomes NaN, then 0).
    nan_after_half = _CallLimit(lambda x, t: torch.where(t[:, None] < 0.5, -x, x * math.nan), limit=100_000)
    with pytest.raises(
        SolverError,
        match=r"the velocity returned NaN or inf at t = 0\.\d+ of \[0, 1\] \(in the step "
        r"from t = 0\.\d+\) under dopri5 \(atol=1e-05, rtol=1e-05",
    ) as info:
        integrate(nan_after_half, torch.ones(4, 2), SolverSpec("dopri5"))
    assert 0.5 < info.value.t <= 1.0  # a time at which the velocity really was NaN


def test_singular_field_step_underflow_says_what_happened() -> None:
    # dx/dt = 10 x^2, x(0) = 1 has the solution 1 / (1 - 10 t), which blows up at t = 0.1.
    with pytest.raises(SolverError, match=r"dopri5 .*: the step size underflowed .* of \[0, 1\]") as info:
        integrate(_CallLimit(lambda x, t: 10 * x * x, limit=100_000), torch.ones(4, 2), SolverSpec("dopri5"))
    assert abs(info.value.t - 0.1) < 1e-3  # the blow-up time, reached to the solver's accuracy


# ---------------------------------------------------------------------------------------------------- paths
@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: VPPath(beta_max=math.inf), "beta_max must be finite"),
        (lambda: VPPath(beta_min=math.inf, beta_max=math.inf), "beta_min must be finite"),
        (lambda: VPPath(beta_min=math.nan), "beta_min must be finite"),
        (lambda: VPPath(beta_min=0.0), "beta_min must be > 0"),
        (lambda: VPPath(beta_min=1.0, beta_max=0.5), "beta_max must be >= beta_min"),
        (lambda: VPPath(beta_min=1.0, beta_max=1e4), "beta_min \\+ beta_max must be <= 300"),
        (lambda: CondOTPath(sigma_min=math.nan), "sigma_min must be finite"),
        (lambda: CondOTPath(sigma_min=math.inf), "sigma_min must be finite"),
        (lambda: CondOTPath(sigma_min=1.0), r"sigma_min must lie in \[0, 1\)"),
        (lambda: CondOTPath(sigma_min=-0.1), r"sigma_min must lie in \[0, 1\)"),
        (lambda: PolynomialPath(n=math.inf), "n must be finite"),
        (lambda: PolynomialPath(n=math.nan), "n must be finite"),
        (lambda: PolynomialPath(n=0.0), "n must be > 0"),
    ],
)
def test_non_finite_or_out_of_range_path_arguments_are_named(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    "make", [lambda: VPPath(beta_max="20"), lambda: CondOTPath(sigma_min=None), lambda: PolynomialPath(n=True)]
)
def test_non_numeric_path_arguments_are_type_errors(make) -> None:
    with pytest.raises(TypeError, match="must be a real number"):
        make()


def _table(n: int = 5) -> dict[str, torch.Tensor]:
    t = torch.linspace(0, 1, n, dtype=torch.float64)
    return {"t": t, "alpha": t.clone(), "sigma": 1 - t}


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: d["t"].__setitem__(2, math.nan), r"t has 1 non-finite value"),
        (lambda d: d["t"].__setitem__(2, d["t"][1]), r"t must be strictly increasing, but t\[2\] = 0.25 <= t\[1\]"),
        (lambda d: d["t"].__setitem__(3, 0.1), r"t must be strictly increasing, but t\[3\]"),
        (lambda d: d["alpha"].__setitem__(1, math.inf), "alpha has 1 non-finite value"),
        (lambda d: d["sigma"].__setitem__(4, math.nan), "sigma has 1 non-finite value"),
        (lambda d: d.__setitem__("d_alpha", torch.full((5,), math.inf)), "d_alpha has 5 non-finite value"),
    ],
)
def test_bad_tables_are_named_and_leave_the_path_unchanged(edit, match: str) -> None:
    path = TabulatedPath.from_path(CosinePath(), n=9)
    before = {k: v.clone() for k, v in path.state_dict().items()}
    table = _table()
    edit(table)
    with pytest.raises(ValueError, match=match):
        TabulatedPath(**table)
    with pytest.raises(ValueError, match=match):
        path.set_table(**table)
    for k, v in path.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------- checkpoints
def _save(module: L.LightningModule, file: Path) -> Path:
    trainer = L.Trainer(
        logger=False,
        max_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=file.parent,
    )
    trainer.strategy.connect(module)
    trainer.save_checkpoint(file)
    return file


class _Other(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(2, 2)


def test_checkpoint_of_another_module_is_an_error(tmp_path: Path) -> None:
    file = _save(_Other(), tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match=r"not saved by FlowMatching.*'encoder.bias'"):
        FlowMatching.load_from_checkpoint(file, net=TimeMLP(dim=2, hidden=8, depth=1), weights_only=False)


def test_checkpoint_without_package_state_warns_and_keeps_the_constructor_path(tmp_path: Path) -> None:
    source = _model(data_shape=(2,), path=CosinePath())
    file = _save(source, tmp_path / "fm.ckpt")
    checkpoint = torch.load(file, weights_only=False)
    del checkpoint["ko_lightning"]
    torch.save(checkpoint, file)
    with pytest.warns(UserWarning, match=r"no 'ko_lightning' entry.*path stays the constructor's CondOTPath"):
        loaded = FlowMatching.load_from_checkpoint(
            file, net=TimeMLP(dim=2, hidden=8, depth=1), path=CondOTPath(), weights_only=False
        )
    assert isinstance(loaded.path, CondOTPath)
    for k, v in source.state_dict().items():  # the weights did load
        torch.testing.assert_close(loaded.state_dict()[k], v, atol=0, rtol=0)


def test_checkpoint_with_another_parametrization_names_both_and_changes_nothing(tmp_path: Path) -> None:
    file = _save(_model(data_shape=(2,), path=CosinePath()), tmp_path / "velocity.ckpt")
    with pytest.raises(ValueError, match=r"saved with parametrization='velocity'.*has parametrization='x1'"):
        FlowMatching.load_from_checkpoint(
            file, net=TimeMLP(dim=2, hidden=8, depth=1), parametrization="x1", weights_only=False
        )
    # Directly on a live module: the path and data shape stay as they were.
    target = _model(parametrization="eps", path=CondOTPath(sigma_min=0.1), data_shape=None)
    checkpoint = torch.load(file, weights_only=False)
    with pytest.raises(ValueError, match=r"parametrization='velocity'.*parametrization='eps'"):
        target.on_load_checkpoint(checkpoint)
    assert isinstance(target.path, CondOTPath) and target.path.sigma_min == 0.1 and target.data_shape is None


def test_truncated_or_missing_checkpoint_file_is_named(tmp_path: Path) -> None:
    file = _save(_model(data_shape=(2,)), tmp_path / "fm.ckpt")
    data = file.read_bytes()
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"checkpoint file '{truncated}' .*truncated or corrupt"):
        FlowMatching.load_from_checkpoint(truncated, net=TimeMLP(dim=2, hidden=8, depth=1))
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint" * 8)
    with pytest.raises(ValueError, match=rf"checkpoint file '{junk}'"):
        FlowMatching.load_from_checkpoint(junk, net=TimeMLP(dim=2, hidden=8, depth=1))
    missing = tmp_path / "missing.ckpt"
    with pytest.raises(FileNotFoundError, match=rf"checkpoint file '{missing}' does not exist"):
        FlowMatching.load_from_checkpoint(missing, net=TimeMLP(dim=2, hidden=8, depth=1))
