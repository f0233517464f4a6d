"""The γ-floor sweep of docs/math.md §4.7: one (data set, path, seed) per call, sliced W2 at Euler N, as JSON.

    python -m recipes.ko_floor_sweep rings ko:0.1 0            # KO solved once from the data with floor 0.1
    python -m recipes.ko_floor_sweep rings cond_ot 0           # or cosine

A plain training loop (no Lightning), so that many settings fit in a few minutes: a 4x256 ``TimeMLP``, batch 1024,
Adam 2e-3, 2000 steps, the velocity parametrization and loss, ``t ~ U[0, 1]``, one CPU thread. λ comes from 8192
training points (1024 queries, smoothing 1). The trained model samples 10,000 points on the time grid and on the
angle grid (docs/math.md §5.3) at N = 2, 4, 8, 16, 64, scored by sliced W2 (256 directions) against 10,000 fresh
points of the data set.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from ko_lightning import FlowMatching
from ko_lightning.data import TOY2D_SAMPLERS, moment_normalization
from ko_lightning.kinetic import estimate_separation_from_data, solve_ko
from ko_lightning.metrics import sliced_wasserstein
from ko_lightning.nets import TimeMLP
from ko_lightning.objective import flow_matching_loss
from ko_lightning.paths import CondOTPath, CosinePath, GaussianPath

__all__ = ["main", "sweep_one"]

STEPS = (2, 4, 8, 16, 64)


def _path(spec: str, x: torch.Tensor) -> GaussianPath:
    if spec == "cond_ot":
        return CondOTPath()
    if spec == "cosine":
        return CosinePath()
    if spec.startswith("ko:"):
        lam = estimate_separation_from_data(x[:8192], n_queries=1024, smoothing=1.0)
        return solve_ko(lam, gamma_floor=float(spec[3:])).path
    raise ValueError(f"path must be cond_ot, cosine or ko:<floor>, got {spec!r}")


def sweep_one(data: str, spec: str, seed: int, train_steps: int = 2000) -> dict[str, float | str | int]:
    """Train and score one setting (see the module docstring)."""
    sampler = TOY2D_SAMPLERS[data]
    reference_raw = sampler(200_000, torch.Generator().manual_seed(999))
    mean, scale = moment_normalization(reference_raw)
    x = (sampler(200_000, torch.Generator().manual_seed(seed)) - mean) / scale
    start = time.perf_counter()
    torch.manual_seed(seed)
    model = FlowMatching(TimeMLP(x.shape[1], hidden=256, depth=4), _path(spec, x), data_shape=tuple(x.shape[1:]))
    optimizer = torch.optim.Adam(model.net.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(train_steps):
        x1 = x[torch.randint(0, x.shape[0], (1024,), generator=gen)]
        t, x0 = torch.rand(1024, generator=gen), torch.randn(x1.shape, generator=gen)
        loss = flow_matching_loss(model.net, model.param, model.path, x0, x1, t, "velocity")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    out: dict[str, float | str | int] = {"data": data, "path": spec, "seed": seed}
    out["train_s"] = round(time.perf_counter() - start, 1)
    fresh = (sampler(10_000, torch.Generator().manual_seed(10_000 + seed)) - mean) / scale
    z = torch.randn(10_000, x.shape[1], generator=torch.Generator().manual_seed(7))
    for grid in ("time", "angle"):
        for n in STEPS:
            samples = model.sample(x0=z, steps=n, grid=grid).samples  # type: ignore[arg-type]
            sw2 = sliced_wasserstein(samples, fresh, 256, generator=torch.Generator().manual_seed(3))
            out[f"{grid}{n}"] = round(float(sw2), 4)
    return out


def main(argv: list[str] | None = None) -> int:
    """``DATA PATH SEED``: print one JSON line."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3:
        print(__doc__)
        return 2
    torch.set_num_threads(1)
    print(json.dumps(sweep_one(args[0], args[1], int(args[2]))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
