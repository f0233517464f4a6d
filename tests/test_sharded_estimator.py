"""The sharded data estimator (docs/scale.md §2) equals one process over the union of the shards.

In float64 the only differences are summation order (the ranks' partial sums are added in another order than one
process streams the rows): ~1e-15 relative per sum, so 1e-10 leaves a wide margin while any wrong combination
(a missing rescale, a rank's rows counted twice or not at all, a local m2) is off by far more.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from ko_lightning.kinetic import DataNormalization, SeparationSums, default_theta_grid, separation_sums_from_queries
from ko_lightning.kinetic.collectives import ReduceOp, TorchDistributed
from ko_lightning.kinetic.data_kernel import KernelWork
from ko_lightning.kinetic.estimators import separation_sums_from_data
from ko_lightning.kinetic.sharded import sharded_separation_sums

FIELDS = [f.name for f in dataclasses.fields(SeparationSums) if f.name != "theta"]
RTOL = 1e-10


class _Hub:
    """W threads exchange tensors through shared slots; every rank combines them in rank order (same result)."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world, timeout=30)
        self.slots: list[Tensor | None] = [None] * world

    def exchange(self, rank: int, tensor: Tensor) -> list[Tensor]:
        self.slots[rank] = tensor.clone()
        self.barrier.wait()
        out = [t for t in self.slots if t is not None]
        self.barrier.wait()
        return out


class ThreadReduce:
    """A fake :class:`~ko_lightning.kinetic.collectives.Reduce` for one thread per rank."""

    def __init__(self, hub: _Hub, rank: int) -> None:
        self.hub, self.rank, self.world_size = hub, rank, hub.world

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        return self.hub.exchange(self.rank, tensor)

    def all_reduce(self, tensor: Tensor, op: ReduceOp = "sum") -> Tensor:
        parts = self.hub.exchange(self.rank, tensor)
        combined = functools.reduce(torch.maximum if op == "max" else operator.add, parts)
        return tensor.copy_(combined)


def run_ranks(world: int, fn: Callable[[ThreadReduce], SeparationSums]) -> list[SeparationSums | BaseException]:
    hub = _Hub(world)
    results: list[SeparationSums | BaseException] = [RuntimeError("not run")] * world

    def target(rank: int) -> None:
        try:
            results[rank] = fn(ThreadReduce(hub, rank))
        except BaseException as err:  # noqa: BLE001 - reported to the test (a rank left alone times out)
            results[rank] = err

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def assert_same_sums(got: SeparationSums, want: SeparationSums, rtol: float = RTOL) -> None:
    for name in FIELDS:
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None) == (b is None), name
        if a is not None:
            scale = b.abs().max().clamp_min(1e-300)
            assert float((a - b).abs().max() / scale) <= rtol, (name, a, b)


def _problem(n: int = 90, d: int = 6, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Clustered float64 data (the posterior is neither uniform nor a point mass over the grid) and 3 labels."""
    g = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.randn(5, d, generator=g, dtype=torch.float64)
    x = centres[torch.arange(n) % 5] + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64)
    labels = (torch.arange(n) * 7 % 3).long()
    return x, labels


SHARDS = [(0, 35), (35, 60), (60, 90)]  # uneven, as the last rank of ceil(n / W) shards is
QUERIES = [torch.tensor([3, 0, 34, 10, 10]), torch.tensor([2, 24]), torch.tensor([0, 29, 5, 17])]


def _single_process(x: Tensor, noise: Tensor, labels: Tensor | None, theta: Tensor) -> SeparationSums:
    index = torch.cat([q + a for q, (a, _) in zip(QUERIES, SHARDS, strict=True)])
    norm = DataNormalization.from_data(x)
    return separation_sums_from_queries(
        x, theta, index, noise, norm, query_chunk=24, data_chunk=16, labels=labels, dtype=torch.float64
    )


def _sharded(x: Tensor, noise: Tensor, labels: Tensor | None, theta: Tensor, query_chunk: int = 24) -> SeparationSums:
    norm = DataNormalization.from_data(x)
    starts = torch.tensor([0] + [len(q) for q in QUERIES]).cumsum(0)

    def rank_sums(reduce: ThreadReduce) -> SeparationSums:
        a, b = SHARDS[reduce.rank]
        q = QUERIES[reduce.rank]
        return sharded_separation_sums(
            x[a:b],
            theta,
            q,
            noise[int(starts[reduce.rank]) : int(starts[reduce.rank + 1])],
            norm,
            reduce,
            query_chunk=query_chunk,
            data_chunk=16,
            labels=None if labels is None else labels[a:b],
            dtype=torch.float64,
        )

    results = run_ranks(len(SHARDS), rank_sums)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return functools.reduce(operator.add, results)  # type: ignore[arg-type]  # all are sums here


@pytest.mark.parametrize("conditional", [False, True])
def test_three_simulated_shards_equal_one_process_over_the_union(conditional: bool) -> None:
    x, labels = _problem()
    lab = labels if conditional else None
    theta = default_theta_grid(12)
    noise = torch.randn(11, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    want = _single_process(x, noise, lab, theta)
    assert_same_sums(_sharded(x, noise, lab, theta), want)
    # a second block layout (one query per block) gives the same sums: the blocks of all ranks stay aligned
    assert_same_sums(_sharded(x, noise, lab, theta, query_chunk=12), want)
    # and the shards matter: a rank's posterior over its own rows alone is a different estimate
    alone = separation_sums_from_queries(
        x[:35], theta, QUERIES[0], noise[:5], DataNormalization.from_data(x), dtype=torch.float64
    )
    assert float((alone.sq_error - want.sq_error).abs().max()) > 1e-3


def test_the_log_sum_exp_redo_is_taken_by_every_rank_and_is_exact() -> None:
    """Noise aligned with the data makes some point beat the own one by > 709 nats: exp overflows in float64
    on some rank, every rank redoes the block with the running maximum, and the result is still the union's."""
    x, _ = _problem()
    theta = default_theta_grid(6)
    y = (x - x.mean(0)) / x.var(0, unbiased=False).mean().sqrt()
    index = torch.cat([q + a for q, (a, _) in zip(QUERIES, SHARDS, strict=True)])
    far = (index + 45) % 90  # each query's noise points at a point on another rank, hard
    noise = 400.0 * (y[far] - y[index])
    want = _single_process(x, noise, None, theta)
    works = [KernelWork() for _ in SHARDS]
    norm = DataNormalization.from_data(x)
    starts = torch.tensor([0] + [len(q) for q in QUERIES]).cumsum(0)

    def rank_sums(reduce: ThreadReduce) -> SeparationSums:
        a, b = SHARDS[reduce.rank]
        sl = slice(int(starts[reduce.rank]), int(starts[reduce.rank + 1]))
        return sharded_separation_sums(
            x[a:b], theta, QUERIES[reduce.rank], noise[sl], norm, reduce, 24, 16, dtype=torch.float64,
            work=works[reduce.rank],
        )  # fmt: skip

    results = run_ranks(3, rank_sums)
    assert all(w.redone_blocks > 0 for w in works)
    assert len({w.redone_blocks for w in works}) == 1  # the same branches on every rank
    assert_same_sums(functools.reduce(operator.add, results), want)  # type: ignore[arg-type]


def test_a_bad_argument_on_one_rank_raises_on_every_rank() -> None:
    x, _ = _problem()
    norm = DataNormalization.from_data(x)

    def rank_sums(reduce: ThreadReduce) -> SeparationSums:
        a, b = SHARDS[reduce.rank]
        q = QUERIES[reduce.rank]
        noise = torch.zeros(len(q) + (reduce.rank == 1), 6)  # rank 1's noise has one row too many
        return sharded_separation_sums(x[a:b], default_theta_grid(4), q, noise, norm, reduce)

    results = run_ranks(3, rank_sums)
    assert all(isinstance(r, RuntimeError) and "failed on 1 of 3 rank(s)" in str(r) for r in results), results
    assert "noise must have shape" in str(results[1])


def test_separation_sums_from_data_draws_from_each_shard_and_pools_the_union() -> None:
    """The callback's entry point: rank r draws its queries from its shard with its own generator."""
    x, labels = _problem()
    norm = DataNormalization.from_data(x)
    theta = default_theta_grid(8)
    d = x.shape[1]
    index, noise = [], []
    for r, (a, b) in enumerate(SHARDS):  # the drawing recipe of separation_sums_from_data, 7 queries per rank
        gen = torch.Generator().manual_seed(100 + r)
        index.append(torch.randperm(b - a, generator=gen)[:7] + a)
        noise.append(torch.randn((7, d), generator=gen))
    want = separation_sums_from_queries(
        x, theta, torch.cat(index), torch.cat(noise), norm, labels=labels, dtype=torch.float64
    )

    def rank_sums(reduce: ThreadReduce) -> SeparationSums:
        a, b = SHARDS[reduce.rank]
        return separation_sums_from_data(
            x[a:b], theta, 7, norm, torch.Generator().manual_seed(100 + reduce.rank), labels=labels[a:b],
            reduce=reduce, dtype=torch.float64,
        )  # fmt: skip

    assert_same_sums(functools.reduce(operator.add, run_ranks(3, rank_sums)), want)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- real gloo, 2 ranks
def _gloo_rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x, labels = _problem()
        half = 45
        a, b = (0, half) if rank == 0 else (half, 90)
        q = [torch.tensor([0, 44, 7, 7]), torch.tensor([1, 30, 44])][rank]
        noise = torch.randn(7, 6, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
        mine = noise[:4] if rank == 0 else noise[4:]
        reduce = TorchDistributed()
        for name, lab in (("plain", None), ("labels", labels[a:b])):
            sums = sharded_separation_sums(
                x[a:b], default_theta_grid(10), q, mine, DataNormalization.from_data(x), reduce, 16, 16,
                labels=lab, dtype=torch.float64,
            )  # fmt: skip
            stacked = torch.stack([getattr(sums, f) for f in FIELDS])
            dist.all_reduce(stacked)
            if rank == 0:
                torch.save(stacked, Path(out_dir) / f"{name}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_equal_one_process_over_the_union(tmp_path: Path) -> None:
    mp.spawn(_gloo_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    x, labels = _problem()
    index = torch.tensor([0, 44, 7, 7, 46, 75, 89])
    noise = torch.randn(7, 6, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    for name, lab in (("plain", None), ("labels", labels)):
        want = separation_sums_from_queries(
            x, default_theta_grid(10), index, noise, DataNormalization.from_data(x), 16, 16, labels=lab,
            dtype=torch.float64,
        )  # fmt: skip
        got = torch.load(tmp_path / f"{name}.pt")
        assert_same_sums(SeparationSums(want.theta, **{f: got[i] for i, f in enumerate(FIELDS)}), want)
