"""Speed and quality of ko_lightning.kinetic: the closed-form KO solver and the finite-set lambda estimator.

Run:  python benchmarks/bench_kinetic.py [--threads N] [--out benchmarks/results/kinetic.md]

1. ``solve_ko`` on a 512-node table (digits lambda) vs scipy L-BFGS-B minimizing the exact kinetic energy of a
   60-node polyline path (torch autograd gradients), from Cond-OT: wall time and kinetic energy of each.
2. ``separation_sums_from_data`` vs a naive implementation (per angle: ``torch.cdist``, square, ``softmax``,
   matmul; everything unchunked) with the same queries, on sklearn digits (1797 x 64) and on a synthetic
   50,000 x 3072 set: throughput in (query, angle) pairs per second, agreement, and peak memory (the peak
   resident set size above the baseline, read from /proc/self/status VmHWM after resetting it through
   /proc/self/clear_refs, in a forked child so the allocator state is fresh; plus the theoretical largest
   temporaries: ours ``4 (R C + 3 q C + R d + 2 C d)`` bytes for R rows, C data rows per chunk, q queries per
   block; naive ``4 (3 Q n + 3 Q d)`` for its Q x n matrices, not counting what ``torch.cdist`` allocates
   inside). Times are the best of a few alternating runs, because the CPU is shared with other jobs.
3. The data estimator's achieved FLOP rate as a fraction of this CPU's fp32 matmul rate, both measured in the same
   run: the matmul rate of a large ``torch.mm`` (2048 x 3072 times 3072 x 2048), and the estimator on the
   synthetic 50,000 x 3072 set with 256 queries x 8 angles in one block (query_chunk 2048), its FLOPs counted
   by the cost model of docs/scale.md §2.1 (:class:`ko_lightning.kinetic.data_kernel.KernelWork`: the Gram
   matmuls, the angle combination and the weighted sums actually run after pruning).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from scipy import optimize
from sklearn.datasets import load_digits

from ko_lightning.kinetic import (
    DataNormalization,
    SeparationFunction,
    SeparationSums,
    default_theta_grid,
    estimate_separation_from_data,
    kinetic_energy,
    separation_sums_from_queries,
    solve_ko,
)
from ko_lightning.kinetic.collectives import SingleProcess
from ko_lightning.kinetic.data_kernel import KernelWork
from ko_lightning.kinetic.sharded import sharded_separation_sums
from ko_lightning.paths import CondOTPath

MB = 2**20


# ---------------------------------------------------------------------------------------------- memory probes
def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _peak_rss_here(fn: Callable[[], object]) -> float | None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) to the current RSS
    except OSError:
        return None
    base = _status_kb("VmRSS")
    fn()
    peak = _status_kb("VmHWM")
    return None if base is None or peak is None else (peak - base) / 1024


def peak_rss_mib(fn: Callable[[], object]) -> float | None:
    """Peak resident memory that ``fn`` adds, in MiB, measured in a forked child (fresh allocator state).

    The child runs single-threaded; memory does not depend on the thread count.
    """
    if not hasattr(os, "fork"):
        return _peak_rss_here(fn)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: measure, report, leave without running the parent's cleanup
        os.close(read_end)
        torch.set_num_threads(1)  # an OpenMP pool does not survive fork: parallel regions would hang
        value = _peak_rss_here(fn)
        os.write(write_end, ("nan" if value is None else repr(value)).encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        text = pipe.read()
    os.waitpid(pid, 0)
    value = float(text) if text else math.nan
    return None if math.isnan(value) else value


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------- solver vs L-BFGS
def polyline_ke(a: torch.Tensor, s: torch.Tensor, t: torch.Tensor, lam: SeparationFunction) -> torch.Tensor:
    """Exact KE (8-point Gauss-Legendre per piece) of the piecewise-linear path through (a_k, s_k) at t_k."""
    x, w = (torch.from_numpy(v) for v in np.polynomial.legendre.leggauss(8))
    x, w = 0.5 * (x + 1), 0.5 * w
    dt = t[1:] - t[:-1]
    va, vs = (a[1:] - a[:-1]) / dt, (s[1:] - s[:-1]) / dt
    pa = a[:-1, None] + (a[1:] - a[:-1])[:, None] * x[None]
    ps = s[:-1, None] + (s[1:] - s[:-1])[:, None] * x[None]
    cross = ps * va[:, None] - pa * vs[:, None]
    gamma = lam.gamma(torch.atan2(pa, ps))
    dens = va[:, None] ** 2 + vs[:, None] ** 2 - (1 - gamma) * cross**2 / (pa**2 + ps**2)
    return ((dens * w[None]).sum(1) * dt).sum()


def lbfgs_path(lam: SeparationFunction, nodes: int = 60, maxiter: int = 3000) -> tuple[float, int]:
    t = np.linspace(0.0, 1.0, nodes) ** 2
    n = nodes - 2
    tt = torch.from_numpy(t)
    zero, one = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)

    def objective(z: np.ndarray) -> tuple[float, np.ndarray]:
        zt = torch.from_numpy(z).requires_grad_(True)
        ke = polyline_ke(torch.cat([zero, zt[:n], one]), torch.cat([one, zt[n:], zero]), tt, lam)
        ke.backward()
        return ke.item(), zt.grad.numpy().copy()

    z0 = np.concatenate([t[1:-1], 1.0 - t[1:-1]])
    res = optimize.minimize(
        objective, z0, jac=True, method="L-BFGS-B", bounds=[(0.0, 1.5)] * (2 * n),
        options={"maxiter": maxiter, "ftol": 1e-12, "gtol": 1e-8},
    )  # fmt: skip
    return float(res.fun), int(res.nit)


# ---------------------------------------------------------------------------------------------- naive estimator
def naive_lam(y: torch.Tensor, theta: torch.Tensor, yq: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Per angle: w = softmax(-||x_t - a y_k||^2 / 2 s^2) via torch.cdist, E[y|x] = w @ y; same estimator as ours."""
    d = y.shape[1]
    out = []
    for th in theta.tolist():
        a, s = math.sin(th), math.cos(th)
        x_t = a * yq + s * eps
        dist2 = torch.cdist(x_t / a, y) ** 2  # ||x - a y||^2 = a^2 ||x / a - y||^2, no scaled copy of y
        w = torch.softmax(dist2 * (-(a * a) / (2 * s * s)), dim=1)
        post = w @ y
        err = (((yq - post) ** 2).sum(1) / d).double()
        cv = err - (1 - ((post**2).sum(1) / d).double())
        beta = torch.cov(torch.stack([err, cv]))[0, 1] / cv.var() if float(cv.var()) > 0 else 0.0
        out.append(1 - float(err.mean() - beta * cv.mean()))
    return torch.tensor(out, dtype=torch.float64)


def bench_estimator(
    name: str, y: torch.Tensor, n_theta: int, n_queries: int, query_chunk: int, data_chunk: int, repeats: int
) -> list[str]:
    n, d = y.shape
    theta = default_theta_grid(n_theta)
    g = torch.Generator().manual_seed(0)
    index = torch.randperm(n, generator=g)[:n_queries]
    eps = torch.randn(n_queries, d, generator=g)
    identity = DataNormalization(torch.zeros(d, dtype=torch.float64), 1.0, n)  # y is already normalized
    pairs = n_theta * n_queries

    def ours() -> torch.Tensor:
        s = separation_sums_from_queries(y, theta, index, eps, identity, query_chunk=query_chunk, data_chunk=data_chunk)
        # the naive version's estimator: the control variate D1 alone (ours also has D2, which moves lambda ~1e-3)
        return SeparationSums(s.theta, s.sq_error, s.count, s.sq_error_sq, s.cv_sum, s.cv_sq, s.cv_cross).lam

    def naive() -> torch.Tensor:
        return naive_lam(y, theta, y[index], eps)

    mem_ours, mem_naive = peak_rss_mib(ours), peak_rss_mib(naive)  # before anything warms this process
    lam_ours, t_ours = timed(ours)
    lam_naive, t_naive = timed(naive)
    for _ in range(repeats - 1):  # best of `repeats`, alternating: the CPU is shared, timings are noisy
        t_ours = min(t_ours, timed(ours)[1])
        t_naive = min(t_naive, timed(naive)[1])
    diff = float((lam_ours - lam_naive).abs().max())  # type: ignore[operator]
    per_block = max(1, query_chunk // n_theta)
    rows = min(query_chunk, n_theta * per_block, pairs)
    c = min(data_chunk, n)
    theory_ours = 4 * (rows * c + 3 * per_block * c + rows * d + 2 * c * d) / MB
    theory_naive = 4 * (3 * n_queries * n + 3 * n_queries * d) / MB

    def mem(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.0f} MiB"

    setting = f"{name}: n={n}, d={d}, {n_theta} angles x {n_queries} queries"
    return [
        f"| estimator time (best of {repeats}) | {setting} | {t_ours:.2f} s ({pairs / t_ours:,.0f} pairs/s) | "
        f"{t_naive:.2f} s ({pairs / t_naive:,.0f} pairs/s) | {t_naive / t_ours:.1f}x faster |",
        f"| estimator peak RSS above baseline (theoretical temporaries) | {setting}; query_chunk={query_chunk}, "
        f"data_chunk={data_chunk} | {mem(mem_ours)} ({theory_ours:.0f} MiB) | {mem(mem_naive)} "
        f"({theory_naive:.0f} MiB) | max abs diff of lambda {diff:.1e} |",
    ]


def matmul_rate(repeats: int = 5) -> float:
    """Best fp32 ``torch.mm`` rate (FLOP/s) of a 2048 x 3072 by 3072 x 2048 product (``2 m k n`` FLOPs)."""
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(2048, 3072, generator=g), torch.randn(3072, 2048, generator=g)
    out = torch.empty(2048, 2048)
    torch.mm(a, b, out=out)  # warm-up
    best = min(timed(lambda: torch.mm(a, b, out=out))[1] for _ in range(repeats))
    return 2.0 * 2048 * 3072 * 2048 / best


def bench_flop_rate(y: torch.Tensor, n_theta: int, n_queries: int, query_chunk: int, repeats: int) -> list[str]:
    """The estimator's achieved FLOP rate (FLOPs of docs/scale.md §2.1) over the matmul rate, measured alternately."""
    n, d = y.shape
    g = torch.Generator().manual_seed(3)
    index = torch.randperm(n, generator=g)[:n_queries]
    eps = torch.randn(n_queries, d, generator=g)
    identity = DataNormalization(torch.zeros(d, dtype=torch.float64), 1.0, n)
    theta = default_theta_grid(n_theta)
    peak, best = 0.0, math.inf
    works = [KernelWork() for _ in range(repeats)]
    for work in works:  # alternate: both see the same load on the shared CPU
        peak = max(peak, matmul_rate())
        start = time.perf_counter()
        sharded_separation_sums(y, theta, index, eps, identity, SingleProcess(), query_chunk, work=work)
        best = min(best, time.perf_counter() - start)
    work = works[-1]  # the same work in every run
    rate = work.flops / best
    dense = 4.0 * n_queries * n * d + 2.0 * n_theta * n_queries * n * d
    return [
        f"| fp32 matmul rate (best of {repeats}) | torch.mm 2048 x 3072 x 2048 | {peak / 1e9:.1f} GFLOP/s | | |",
        f"| estimator FLOP rate (best of {repeats}) | synthetic: n={n}, d={d}, {n_theta} angles x {n_queries} "
        f"queries, query_chunk={query_chunk}; {work.flops / 1e9:.0f} GFLOP counted ({100 * work.flops / dense:.0f}% "
        f"of the unpruned {dense / 1e9:.0f}) | {best:.2f} s, {rate / 1e9:.1f} GFLOP/s | matmul {peak / 1e9:.1f} "
        f"GFLOP/s | {100 * rate / peak:.0f}% of the matmul rate |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a 2-core machine shared with other jobs, two OpenMP threads "
        "spin against them and small ops slow down 10-50x)",
    )
    parser.add_argument("--big-n", type=int, default=50_000, help="rows of the synthetic set")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows: list[str] = []

    # ---- solver
    digits = torch.from_numpy(load_digits().data).float()
    lam = estimate_separation_from_data(digits, default_theta_grid(64), n_queries=1024, smoothing=1.0)
    for _ in range(3):
        solve_ko(lam)
    times = []
    for _ in range(50):
        start = time.perf_counter()
        sol = solve_ko(lam)
        times.append(time.perf_counter() - start)
    t_solve = statistics.median(times)
    ke_table = kinetic_energy(sol.path, lam)
    start = time.perf_counter()
    ke_lbfgs, nit = lbfgs_path(lam)
    t_lbfgs = time.perf_counter() - start
    rows.append(
        f"| solve_ko, 512-node table | digits lambda (64 angles) | {1e3 * t_solve:.2f} ms median of 50 "
        f"(min {1e3 * min(times):.2f}) | L-BFGS-B, 60-node polyline: {t_lbfgs:.1f} s ({nit} iterations) | "
        f"{t_lbfgs / t_solve:,.0f}x faster |"
    )
    rows.append(
        f"| kinetic energy | digits lambda; KE_min = {sol.ke_min:.5f} | KO (floor {sol.gamma_floor:g}): "
        f"{sol.ke:.5f} (table by quadrature: {ke_table:.5f}) | L-BFGS-B polyline: {ke_lbfgs:.5f}; Cond-OT: "
        f"{kinetic_energy(CondOTPath(), lam):.5f} | KO price {100 * sol.ke_price_relative:.2f}% |"
    )

    # ---- estimator
    y_digits = DataNormalization.from_data(digits).normalize(digits)
    rows += bench_estimator("digits", y_digits, 32, 512, 1024, 2048, repeats=7)
    del y_digits
    g = torch.Generator().manual_seed(1)
    d, k = 3072, 64
    # Image-like synthetic set: rank-64 structure with a decaying spectrum plus isotropic noise, normalized.
    basis = torch.randn(k, d, generator=g) * (1.0 / torch.arange(1, k + 1).float().sqrt())[:, None]
    big = torch.randn(args.big_n, k, generator=g) @ basis
    big.add_(torch.randn(args.big_n, d, generator=g), alpha=0.3)
    big.sub_(big.mean(0))
    big.mul_(1.0 / float(big.pow(2).mean().sqrt()))
    rows += bench_estimator("synthetic", big, 8, 64, 1024, 2048, repeats=2)
    rows += bench_flop_rate(big, 8, 256, 2048, repeats=2)

    header = [
        f"Setting: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s) on a "
        f"2-core CPU shared with other jobs (load average {Path('/proc/loadavg').read_text().split()[0]}), "
        f"torch {torch.__version__}, {datetime.date.today().isoformat()}.",
        "",
        "| what | setting | ours | baseline | ratio / note |",
        "|---|---|---|---|---|",
    ]
    text = "\n".join(header + rows) + "\n"
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
