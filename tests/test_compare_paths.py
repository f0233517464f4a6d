"""The path-comparison recipe: end to end at a tiny budget (checkerboard through the CLI, digits through the API),
the discrete digits bits/dim against independent computations, and config errors that name the bad key."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import Tensor, nn

from kinetic_helpers import U32, gamma
from ko_lightning.data import DigitsDataModule
from ko_lightning.likelihood import bpd_from_log_prob, dequantize_pixels, discrete_bits_per_dim, pixel_bits_per_dim
from ko_lightning.module import FlowMatching
from ko_lightning.paths import CondOTPath
from recipes.compare_paths import (
    PATH_LABELS,
    PATH_NAMES,
    ConfigError,
    config_from_dict,
    load_config,
    main,
    run_comparison,
)

ROOT = Path(__file__).resolve().parents[1]
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf", re.IGNORECASE)


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    """Tiny networks and ODE solves: one intra-op thread is much faster than two on a small shared CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _table_cells(markdown: str) -> list[list[str]]:
    """Body rows of every markdown table (header and separator lines dropped), cells without the first column."""
    rows, previous_was_table = [], False
    lines = markdown.splitlines()
    for i, line in enumerate(lines):
        is_table = line.startswith("|")
        if is_table and previous_was_table and not set(line) <= set("|-: "):
            header_follows = i + 1 < len(lines) and set(lines[i + 1]) <= set("|-: ") and lines[i + 1].strip()
            if not header_follows:
                rows.append([c.strip() for c in line.strip().strip("|").split("|")][1:])
        previous_was_table = is_table
    return rows


def _check_filled(result_dir: Path, paths: list[str], metric_keys: set[str]) -> None:
    """Every table cell a finite number, every number in results.json finite, every file written."""
    for name in ("results.md", "results.json", "samples.png", "schedules.png"):
        assert (result_dir / name).is_file() and (result_dir / name).stat().st_size > 0, name
    markdown = (result_dir / "results.md").read_text()
    cells = _table_cells(markdown)
    assert len(cells) >= 3 * len(paths)  # main, >= 1 further metric, timing tables: one row per path each
    for row in cells:
        for cell in row:
            numbers = _NUMBER.findall(cell)
            assert numbers, f"empty cell in {row}"
            assert all(math.isfinite(float(n)) for n in numbers), f"non-finite cell {cell!r} in {row}"
    for needle in (
        "platform",
        "cpu_count",
        "torch:",
        "Total wall time",
        "normalized units" if "sw2" in metric_keys else "17 levels",
    ):
        assert needle in markdown, needle
    payload = json.loads((result_dir / "results.json").read_text())
    assert [r["name"] for r in payload["rows"]] == paths
    for r in payload["rows"]:
        scalars = (
            "nll_bpd",
            "nll_bpd_se",
            "nll_nfe",
            "ke_model",
            "ke_model_se",
            "ke_path",
            "train_seconds",
            "eval_seconds",
            "steps_per_second",
        )
        for key in scalars:
            assert isinstance(r[key], float) and math.isfinite(r[key]), (r["name"], key, r[key])
        steps = payload["config"]["eval"]["euler_steps"]
        assert list(r["solvers"]) == [f"euler {n}" for n in steps] + ["dopri5"]
        for solver, metrics in r["solvers"].items():
            assert metric_keys <= set(metrics), (solver, metrics)
            assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values()), (solver, metrics)
        assert r["solvers"]["euler 4"]["nfe"] == 4.0 and r["solvers"]["dopri5"]["nfe"] >= 2
        assert (r["ko"] is not None) == (r["name"] in ("ko", "ko_paper"))
    ko = next(r for r in payload["rows"] if r["name"] == "ko")["ko"]
    assert ko["installed"] >= 1 and math.isfinite(ko["phi"])
    # the angle-grid row samples the Cond-OT model itself: same likelihood and dopri5 samples, other Euler samples
    rows = {r["name"]: r for r in payload["rows"]}
    if "cond_ot_angle" in rows:
        plain, angle = rows["cond_ot"], rows["cond_ot_angle"]
        quality = "sw2" if "sw2" in metric_keys else "fid"
        assert angle["nll_bpd"] == plain["nll_bpd"] and angle["train_seconds"] == plain["train_seconds"]
        assert angle["solvers"]["dopri5"][quality] == plain["solvers"]["dopri5"][quality]
        assert angle["solvers"]["euler 2"][quality] != plain["solvers"]["euler 2"][quality]
    if "cond_ot_logit_normal" in rows:  # a model of its own, trained on other times from the same start
        logit = rows["cond_ot_logit_normal"]
        assert logit["nll_bpd"] != rows["cond_ot"]["nll_bpd"] and logit["t_eps"] == 0.0
        assert "logit-normal t" in markdown


# ----------------------------------------------------------------------------------------------- end to end
def test_checkerboard_comparison_through_the_cli_fills_every_cell(tmp_path: Path) -> None:
    raw = yaml.safe_load((ROOT / "recipes" / "compare_paths.yaml").read_text())
    raw.update(
        {
            "paths": list(PATH_NAMES),
            "threads": 1,
            "data": {"name": "checkerboard", "n_train": 4096, "n_val": 64, "n_test": 512},
            "net": {"kind": "mlp", "hidden": 32, "depth": 2, "time_scale": 1.0},
        }
    )
    raw["train"].update({"batch_size": 256, "progress_bar": False})
    # A refresh at step 20 exercises a schedule swap in the middle of training, besides the initialization.
    raw["ko"].update({"every_n_steps": 20, "warmup_steps": 20, "n_queries": 64, "n_theta": 16, "max_data": 1024})
    raw["eval"].update(
        {
            "n_samples": 200,
            "n_nll": 64,
            "n_ke": 32,
            "n_lambda_data": 512,
            "n_lambda_queries": 32,
            "n_theta": 16,
            "n_mmd": 200,
            "n_plot": 200,
            "atol": 1e-3,
            "rtol": 1e-3,
            "sw_projections": 64,
        }
    )
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    assert main(["--config", str(config_file), "--train.max_steps", "30", "--out", str(out), "--quiet"]) == 0
    _check_filled(out, list(PATH_NAMES), {"nfe", "sw2", "mmd2", "on_board"})
    payload = json.loads((out / "results.json").read_text())
    assert payload["config"]["train"]["max_steps"] == 30
    vp = next(r for r in payload["rows"] if r["name"] == "vp")
    assert vp["t_eps"] == 1e-3 and all(r["t_eps"] == 0.0 for r in payload["rows"] if r["name"] != "vp")


def test_digits_comparison_with_a_tiny_unet_fills_every_cell(tmp_path: Path) -> None:
    raw = yaml.safe_load((ROOT / "recipes" / "compare_paths_digits.yaml").read_text())
    raw.update(
        {
            "paths": list(PATH_NAMES),
            "threads": 1,
            "out": str(tmp_path / "digits"),
            "net": {
                "kind": "unet",
                "in_channels": 1,
                "image_size": 8,
                "base_channels": 8,
                "channel_mults": [1, 2],
                "num_res_blocks": 1,
                "attention_resolutions": [],
                "mid_attention": False,
                "groups": 4,
            },
        }
    )
    raw["train"].update({"max_steps": 10, "batch_size": 64, "accelerator": "cpu", "progress_bar": False})
    raw["ko"].update({"n_queries": 32, "n_theta": 16, "max_data": 512})
    raw["eval"].update(
        {
            "n_samples": 48,
            "n_nll": 12,
            "nll_batch_size": 12,
            "n_ke": 8,
            "n_lambda_data": 256,
            "n_lambda_queries": 16,
            "n_theta": 16,
            "atol": 1e-3,
            "rtol": 1e-3,
            "device": "cpu",
            "fid_cache_dir": str(tmp_path / "cache"),
        }
    )
    result = run_comparison(config_from_dict(raw), verbose=False)
    _check_filled(result.out_dir, list(PATH_NAMES), {"nfe", "fid", "kid", "kid_std"})
    for row in result.rows:
        # a 10-step model is far from the data, but its bound is still a number of the right size
        assert 0.5 < row.nll_bpd < 50, (row.name, row.nll_bpd)
    assert "FID" in result.tables and "KID" in result.tables


# ----------------------------------------------------------------------------------------------- digits bpd
def test_discrete_bpd_arithmetic_matches_the_generic_dequantization_formula() -> None:
    """y = (pixel + u - mean) / scale is the generic map lo + (hi - lo)(pixel + u) / bins with bins = 17 and
    hi - lo = 17 / scale, shifted by a constant (unit Jacobian): both formulas must agree."""
    torch.manual_seed(0)
    log_p = torch.randn(10, dtype=torch.float64) * 30 - 100
    for scale in (0.25, 1.0, 5.9):
        ours = discrete_bits_per_dim(log_p, 64, scale)
        generic = bpd_from_log_prob(log_p, 64, num_bins=17, data_range=(0.0, 17.0 / scale))
        # float64, a few operations on values ~100: rounding ~1e-14 either way
        torch.testing.assert_close(ours, generic, rtol=1e-12, atol=1e-12)
    # a model uniform on the 17 unit cells: log p_y = D log(scale / 17) gives exactly log2(17) bits/dim
    uniform = discrete_bits_per_dim(torch.tensor(64 * math.log(5.9 / 17), dtype=torch.float64), 64, 5.9)
    assert float(uniform) == pytest.approx(math.log2(17), abs=1e-12)  # float64, as above


def test_dequantize_pixels_fills_the_unit_cell_and_rejects_non_integers() -> None:
    pixels = torch.randint(0, 17, (50, 1, 8, 8)).float()
    mean, scale = torch.rand(1, 8, 8) * 10, 5.0
    y = dequantize_pixels(pixels, mean, scale, torch.Generator().manual_seed(1))
    u = y * scale + mean - pixels
    # fp32 round trip: <= 5 roundings of values <= 17 + 10 (pixels, noise, means)
    slack = 5 * U32 * 27
    assert float(u.min()) >= -slack and float(u.max()) < 1 + slack and float(u.std()) > 0.2
    with pytest.raises(ValueError, match="integer"):
        dequantize_pixels(pixels + 0.5, mean, scale)
    with pytest.raises(ValueError, match=r"\[0, 16\]"):
        dequantize_pixels(pixels + 17, mean, scale)


class _GaussianVelocity(nn.Module):
    """Exact marginal velocity of Cond-OT (sigma_min = 0) for data N(mu, s^2 I): with m_t = t mu and
    v_t = t^2 s^2 + (1 - t)^2, u_t(x) = mu + (t s^2 - (1 - t)) / v_t (x - m_t); so the model's p_1 = N(mu, s^2 I)."""

    def __init__(self, mu: Tensor, s: float) -> None:
        super().__init__()
        self.register_buffer("mu", mu)
        self.s = s

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        t = t.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        var = t * t * self.s**2 + (1 - t) ** 2
        return self.mu + (t * self.s**2 - (1 - t)) / var * (x - t * self.mu)


def test_pixel_bpd_of_a_model_with_known_density_matches_the_direct_computation() -> None:
    dm = DigitsDataModule(batch_size=64, seed=0)
    dm.setup()
    pixels = dm.denormalize(dm.test_tensor()[:6]).round()
    mu, s = 0.3 * torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(2)), 0.9
    model = FlowMatching(_GaussianVelocity(mu, s), CondOTPath(), parametrization="velocity", data_shape=(1, 8, 8))
    res = pixel_bits_per_dim(
        model,
        pixels,
        dm.mean,
        dm.scale,
        atol=1e-7,
        rtol=1e-7,
        divergence="exact",
        generator=torch.Generator().manual_seed(5),
    )
    # Independently: z = pixel + u has density N(mean + scale mu, (scale s)^2) per pixel in pixel units (same u).
    u = torch.rand(pixels.shape, generator=torch.Generator().manual_seed(5))
    z = (pixels + u).double()
    scale = float(dm.scale)
    log_pz = torch.distributions.Normal(dm.mean.double() + scale * mu.double(), scale * s).log_prob(z).sum((1, 2, 3))
    direct = -log_pz / (64 * math.log(2))
    # The solve's error: its change from a 10x looser solve bounds it (dopri5's error shrinks at least like
    # tol^(1/2)). fp32 rounding: ~u of the log-density's terms per evaluation, and the fp32 map y = (z - mean) /
    # scale (2u of |z| + |mean|, over scale) times |d log p / dy| = |y - mu| / s^2, summed over the 64 pixels.
    loose = pixel_bits_per_dim(
        model,
        pixels,
        dm.mean,
        dm.scale,
        atol=1e-6,
        rtol=1e-6,
        divergence="exact",
        generator=torch.Generator().manual_seed(5),
    )
    y = (z - dm.mean.double()) / scale
    map_err = (2 * U32 * (z.abs() + dm.mean.double().abs()) / scale * (y - mu.double()).abs() / s**2).sum((1, 2, 3))
    log_terms = log_pz.abs() + 64 * abs(math.log(scale))
    tol = (res.bpd - loose.bpd).abs().max() + (gamma(4 * res.nfe) * log_terms + map_err) / (64 * math.log(2))
    assert bool(((res.bpd - direct).abs() <= tol).all())
    assert res.nfe > 0


# ----------------------------------------------------------------------------------------------- config errors
def test_shipped_configs_load() -> None:
    board = load_config(ROOT / "recipes" / "compare_paths.yaml")
    assert board.data_name == "checkerboard" and board.paths == ["cond_ot", "cond_ot_angle", "cosine", "ko_paper", "ko"]
    assert board.parametrization == "velocity" and board.t_eps_of("vp") == 1e-3 and board.t_eps_of("ko") == 0.0
    assert board.ko_settings() == {"plot": False} and board.train.max_steps == 2000  # the package defaults
    assert board.ko_settings("ko_paper")["gamma_floor"] == 0.01
    digits = load_config(ROOT / "recipes" / "compare_paths_digits.yaml", {"train.max_steps": 7, "paths": ["ko"]})
    assert digits.is_digits and digits.net["kind"] == "unet" and digits.train.max_steps == 7
    assert digits.paths == ["ko"] and digits.train.dequantize


def test_the_logit_normal_row_starts_from_the_same_weights_and_trains_on_logit_normal_times() -> None:
    from recipes.compare_paths.build import build_model

    config = load_config(ROOT / "recipes" / "compare_paths.yaml", {"paths": ["cond_ot", "cond_ot_logit_normal"]})
    plain, logit = (build_model(config, name, (2,)) for name in config.paths)
    assert str(plain.time_sampler) == "uniform" and str(logit.time_sampler) == "logit_normal(0, 1)"
    assert isinstance(logit.path, CondOTPath) and logit.hparams["time_sampler"] == "logit_normal(0, 1)"
    for a, b in zip(plain.state_dict().values(), logit.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # the same seed: identical initial weights
    assert (
        PATH_LABELS["cond_ot_logit_normal"] == "Cond-OT, logit-normal t"
        and config.t_eps_of("cond_ot_logit_normal") == 0
    )


def test_a_row_time_sampler_override_reaches_the_model() -> None:
    from recipes.compare_paths.build import build_model

    default = load_config(ROOT / "recipes" / "compare_paths.yaml", {"paths": ["ko"]})
    override = load_config(
        ROOT / "recipes" / "compare_paths.yaml", {"paths": ["ko"], "time_samplers": {"ko": "cond_ot_snr(0.25)"}}
    )
    assert str(build_model(default, "ko", (2,)).time_sampler) == "auto"
    assert str(build_model(override, "ko", (2,)).time_sampler) == "cond_ot_snr(0.25)"


@pytest.mark.parametrize(
    ("raw", "needle", "listed"),
    [
        ({"trian": {}}, "'trian'", "train"),
        ({"train": {"lr_rate": 0.1}}, "'lr_rate'", "'train'"),
        ({"eval": {"n_sample": 10}}, "'n_sample'", "'eval'"),
        ({"data": {"name": "checkerboard", "n_points": 5}}, "'n_points'", "n_train"),
        ({"net": {"kind": "mlp", "width": 5}}, "'width'", "hidden"),
        ({"ko": {"every_n_step": 5}}, "'every_n_step'", "every_n_steps"),
        ({"t_eps": {"ddpm": 0.1}}, "'ddpm'", "'t_eps'"),
        ({"paths": ["cond_ot", "rectified"]}, "rectified", "cosine"),
        ({"train": {"max_steps": "many"}}, '"train.max_steps"', "int"),
        ({"time_samplers": {"rectified": "uniform"}}, "'time_samplers.rectified'", "cond_ot"),
        ({"time_samplers": {"ko": "speedy"}}, "'time_samplers.ko'", "cond_ot_snr"),
    ],
)
def test_bad_config_keys_are_named_with_the_valid_ones(raw: dict[str, Any], needle: str, listed: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    assert needle in str(info.value) and listed in str(info.value)


def test_cli_reports_a_bad_key_and_exits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config_file = tmp_path / "bad.yaml"
    config_file.write_text("seed: 0\ntrain:\n  max_step: 10\n")
    with pytest.raises(SystemExit) as info:
        main(["--config", str(config_file), "--out", str(tmp_path / "never")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "'train'" in err and "'max_step'" in err and "max_steps" in err
    with pytest.raises(SystemExit):
        main(["--config", str(ROOT / "recipes" / "compare_paths.yaml"), "--eval.bogus", "1"])
    assert "--eval.bogus" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_aggregate_averages_seeds_and_judges_ko_against_the_better_baseline(tmp_path: Path) -> None:
    from recipes.compare_paths.aggregate import aggregate

    def run(seed: int, sw2: dict[str, float]) -> Path:
        rows = [
            {
                "name": name,
                "label": name,
                "train_seconds": 10.0 + seed,
                "nll_bpd": 1.0,
                "solvers": {"euler 2": {"sw2": value, "nfe": 2.0}, "dopri5": {"sw2": value, "nfe": 100.0}},
            }
            for name, value in sw2.items()
        ]
        file = tmp_path / f"seed{seed}.json"
        file.write_text(json.dumps({"data": "toy", "config": {"seed": seed}, "rows": rows}))
        return file

    # means: cond_ot 0.30, cosine 0.20, ko 0.2075 (within 5% of 0.20: a tie); standard error of ko over the two
    # seeds: |0.205 - 0.21| / 2 = 0.0025
    files = [run(0, {"cond_ot": 0.3, "cosine": 0.2, "ko": 0.205}), run(1, {"cond_ot": 0.3, "cosine": 0.2, "ko": 0.21})]
    text = aggregate(files)
    assert "2 seeds: 0, 1" in text
    assert "| ko | 0.2075 ± 0.0025 |" in text
    assert "euler 2: tie" in text
    assert "Training time of KO (package defaults) / Cond-OT: 1.000." in text
    files = [run(0, {"cond_ot": 0.3, "cosine": 0.2, "ko": 0.25})]
    assert "euler 2: loss" in aggregate(files)
    files = [run(0, {"cond_ot": 0.3, "cosine": 0.2, "ko": 0.19})]
    assert "euler 2: win" in aggregate(files)
