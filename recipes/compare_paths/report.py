"""The written results of a comparison: markdown tables, the settings and definitions, hardware, and JSON."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
from pathlib import Path
from typing import Any

import lightning as L
import torch

from ko_lightning.callbacks import KOScheduleCallback
from ko_lightning.likelihood import DIGITS_LEVELS
from recipes.compare_paths.config import PATH_LABELS, CompareConfig
from recipes.compare_paths.evaluate import PathResult, eval_device

__all__ = ["hardware", "ko_numbers", "results_markdown", "results_tables", "write_json"]


def _fmt(value: float, digits: int = 4) -> str:
    return f"{value:.{digits}g}" if math.isfinite(value) else str(value)


def _metric_columns(config: CompareConfig) -> list[tuple[str, str, float]]:
    """(key, title, multiplier) of the per-solver quality metrics."""
    if config.is_digits:
        return [
            ("fid", "FID (digits-classifier features, vs train split)", 1.0),
            ("kid", "KID x 1e3 (digits-classifier features, vs train split)", 1e3),
        ]
    cols = [
        ("sw2", f"sliced Wasserstein-2 ({config.eval.sw_projections} directions, vs test set)", 1.0),
        (
            "mmd2",
            "MMD^2 x 1e3 (Gaussian kernels "
            + ", ".join(f"{b:g}" for b in config.eval.mmd_bandwidths)
            + ", vs test set)",
            1e3,
        ),
    ]
    if config.data_name == "checkerboard":
        cols.append(("on_board", "fraction of samples on the checkerboard squares", 1.0))
    return cols


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def results_tables(config: CompareConfig, rows: list[PathResult]) -> str:
    """The markdown tables: the main one (NLL, KE, first metric per solver, dopri5 NFE), one per further metric,
    and the wall times."""
    solvers = config.eval.solver_names()
    metrics = _metric_columns(config)
    key0, title0, mult0 = metrics[0]
    nll_title = "NLL bits/dim (pixels, 17 levels)" if config.is_digits else "NLL bits/dim (normalized units)"
    short = {"fid": "FID", "sw2": "SW2"}[key0]
    header = ["path", nll_title, "KE model", "KE path(lambda)"]
    header += [f"{short} {s.replace('euler ', 'Euler ')}" for s in solvers] + ["NFE dopri5"]
    body = []
    for r in rows:
        cells = [
            r.label,
            f"{_fmt(r.nll_bpd)} ± {_fmt(r.nll_bpd_se, 2)}",
            f"{_fmt(r.ke_model)} ± {_fmt(r.ke_model_se, 2)}",
            _fmt(r.ke_path),
        ]
        cells += [_fmt(r.solvers[s][key0] * mult0) for s in solvers] + [str(int(r.solvers["dopri5"]["nfe"]))]
        body.append(cells)
    parts = [f"### Main table ({short}: {title0})\n\n" + _table(header, body)]
    for key, title, mult in metrics[1:]:
        head = ["path"] + [s.replace("euler ", "Euler ") for s in solvers]
        body = [[r.label] + [_fmt(r.solvers[s][key] * mult) for s in solvers] for r in rows]
        parts.append(f"### {title}\n\n" + _table(head, body))
    head = ["path", "t_eps", "train s", "steps/s", "eval s", "NLL NFE/solve", "KE NFE"]
    body = [
        [
            r.label,
            _fmt(r.t_eps),
            f"{r.train_seconds:.1f}",
            f"{r.steps_per_second:.1f}",
            f"{r.eval_seconds:.1f}",
            f"{r.nll_nfe:.0f}",
            str(r.ke_model_nfe),
        ]
        for r in rows
    ]
    parts.append("### Wall time and solver cost\n\n" + _table(head, body))
    return "\n\n".join(parts) + "\n"


def hardware(config: CompareConfig) -> dict[str, Any]:
    """Platform, versions, threads and devices of the run."""
    device = eval_device(config)
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "torch_threads": torch.get_num_threads(),
        "accelerator": config.train.accelerator,
        "eval_device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def ko_numbers(callback: KOScheduleCallback) -> dict[str, float]:
    """The KO callback's final numbers: refreshes, installed ones, and Phi, KE_min, gamma floor of the last one."""
    installed = [r for r in callback.reports if r.installed]
    last = installed[-1] if installed else None
    return {
        "refreshes": float(len(callback.reports)),
        "installed": float(len(installed)),
        "phi": last.phi if last else math.nan,
        "ke_min": last.ke_min if last else math.nan,
        "gamma_floor": last.gamma_floor if last else math.nan,
        "refresh_seconds": float(sum(r.seconds.get("total", 0.0) for r in callback.reports)),
    }


def _notes(config: CompareConfig, rows: list[PathResult], lam_points: int, weighting: str) -> list[str]:
    """The settings and definitions behind every column, one paragraph each."""
    ev = config.eval
    notes = [
        f"Same network, seed {config.seed} (identical initial weights), {config.train.max_steps} steps, batch "
        f"{config.train.batch_size}, Adam lr {config.train.lr:g} ({config.train.lr_schedule}), parametrization "
        f"'{config.parametrization}' with loss weighting '{weighting}', and the same noise and times at every "
        "step (train_seed) for every path"
        + (
            " (Cond-OT, logit-normal t draws its times from its own density, and so possibly other noise)."
            if any(r.name == "cond_ot_logit_normal" for r in rows)
            else "."
        ),
        "Training times t = t_eps + (1 - 2 t_eps) u, u ~ U[0, 1] (Cond-OT, logit-normal t: u = sigmoid(z), "
        "z ~ N(0, 1)): t_eps = "
        + ", ".join(f"{PATH_LABELS[r.name]} {r.t_eps:g}" for r in rows)
        + ". VP's sigma'_t diverges at t = 1, so it is trained with t_eps = 1e-3 and its samples, KE and likelihood "
        "are taken on [0, 1 - t_eps] (its NLL is the density of p_{1 - t_eps}, data smoothed by sigma ~ 0.01); "
        "the other paths use [0, 1]. VP also starts from alpha_0 = exp(-(beta_min + beta_max)/4) ~ 0.0066, not 0.",
        f"KO row: KOScheduleCallback({', '.join(f'{k}={v!r}' for k, v in config.ko_settings().items())}); the "
        "final KO path (after the last refresh) is the one evaluated and drawn in schedules.png.",
        f"Samples: {ev.n_samples} per solver from the same initial noise for every path and solver; Euler at "
        f"{', '.join(map(str, ev.euler_steps))} steps and dopri5 (atol {ev.atol:g}, rtol {ev.rtol:g}; its NFE "
        "in the main table).",
        f"KE model: (1/D) int ||v_theta||^2 dt along {ev.n_ke} dopri5 trajectories of the trained model "
        "(model_kinetic_energy), ± its standard error. KE path(lambda): analytic KE of the (final) path under the "
        f"separation function lambda estimated from {lam_points} training points (estimate_separation_from_data, "
        f"{ev.n_lambda_queries} queries per angle, {ev.n_theta} angles). Both per dimension, in normalized units "
        "(data normalized to second moment 1).",
    ]
    if config.is_digits:
        notes.append(
            "NLL: a discrete bound in pixel units on the test split. Pixels are integers 0..16 (17 levels); "
            "u ~ U[0, 1) per pixel, pixel + u in [0, 17), y = (pixel + u - mean) / scale is the model's space, "
            "log p_pixel >= log p_y(y) - D log(scale), bpd = -log p_pixel / (D ln 2) (a uniform model: "
            f"log2(17) = {math.log2(DIGITS_LEVELS):.3f}). dopri5 with the '{ev.divergence}' divergence "
            "(Hutchinson with one fixed Rademacher probe per solve for D = 64 under 'auto')."
            + (
                " Trained on dequantized pixels (train.dequantize), the distribution the bound evaluates; samples "
                "are shifted back by half a level before display."
                if config.train.dequantize
                else " Trained on the integer pixels themselves (train.dequantize false): the bound is loose."
            )
        )
        notes.append(
            "FID/KID: digits-classifier features (a small CNN trained on the sklearn digits), generated samples "
            "mapped to [0, 1] with to_display, against the training split; KID subset size "
            f"min({ev.kid_subset_size}, n_generated, n_reference). The lambda behind KE path(lambda) and the KO "
            "path is that of the training set (a finite set of 64-dimensional points), not of the population."
        )
    else:
        n_nll = ev.n_nll if ev.n_nll is not None else "all"
        notes.append(
            f"NLL: -log p(x) / (D ln 2) on {n_nll} held-out test points in the normalized data units (not the raw "
            f"coordinates), dopri5 with the '{ev.divergence}' divergence (exact for D = 2)."
        )
        notes.append(
            f"SW2 with {ev.sw_projections} random directions vs the test set; MMD^2 (unbiased, sum of Gaussian "
            f"kernels) on {min(ev.n_mmd, ev.n_samples)} samples vs as many test points, in normalized units."
            + (
                " On-board fraction: share of denormalized samples on the black squares (data: 1)."
                if config.data_name == "checkerboard"
                else ""
            )
        )
    return notes


def results_markdown(
    config: CompareConfig,
    rows: list[PathResult],
    tables: str,
    total_seconds: float,
    lam_points: int,
    weighting: str,
    hardware_info: dict[str, Any],
) -> str:
    """The content of ``results.md``: tables, the KO callback's summary, wall time, settings and hardware."""
    ko_line = ""
    ko = next((r.ko for r in rows if r.ko is not None), None)
    if ko is not None:
        ko_line = (
            f"\nKO callback: {int(ko['installed'])} of {int(ko['refreshes'])} refreshes installed; final "
            f"Phi {_fmt(ko['phi'])}, KE_min {_fmt(ko['ke_min'])} (under the callback's lambda), gamma floor "
            f"{_fmt(ko['gamma_floor'])}, {ko['refresh_seconds']:.1f}s in refreshes.\n"
        )
    return "\n".join(
        [
            f"# Path comparison on {config.data_name}",
            "",
            "## Results",
            "",
            tables,
            ko_line,
            f"Total wall time: {total_seconds:.1f}s "
            f"({sum(r.train_seconds for r in rows):.1f}s training, {sum(r.eval_seconds for r in rows):.1f}s "
            "evaluation).",
            "",
            "## Settings and definitions",
            "",
            *[f"- {n}" for n in _notes(config, rows, lam_points, weighting)],
            f"- Network: {config.net}; data: {config.data}.",
            "",
            "## Hardware",
            "",
            *[f"- {k}: {v}" for k, v in hardware_info.items()],
            "",
            "Pictures: samples.png (samples per solver for each path), schedules.png (lambda(theta), alpha_t and "
            "sigma_t of every path incl. the final KO one).",
            "",
        ]
    )


def _json_safe(obj: Any) -> Any:
    """Non-finite floats as strings (JSON has no NaN), keys as strings, tuples as lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_json(
    path: Path,
    config: CompareConfig,
    rows: list[PathResult],
    hardware_info: dict[str, Any],
    total_seconds: float,
    lam_points: int,
) -> Path:
    """Write ``results.json``: every row, the config, the hardware and the wall time; returns ``path``."""
    payload = {
        "data": config.data_name,
        "rows": [dataclasses.asdict(r) for r in rows],
        "config": config.to_dict(),
        "hardware": hardware_info,
        "total_seconds": total_seconds,
        "lambda_points": lam_points,
    }
    path.write_text(json.dumps(_json_safe(payload), indent=1))
    return path
