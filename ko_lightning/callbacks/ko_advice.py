"""Warnings for KO configurations that the measurements of docs/math.md §1.5 and §4.7 show to lose, and the check
that a conditional model's configuration can be estimated (docs/math.md §3.10)."""

from __future__ import annotations

from lightning.pytorch.utilities import rank_zero_warn

__all__ = [
    "check_conditional_setup",
    "losing_settings",
    "refresh_never_runs",
    "warn_if_known_to_lose",
    "warn_if_refresh_never_runs",
]


def losing_settings(
    parametrization: object, loss_weighting: object, gamma_floor: float | None, time_sampler: object = "auto"
) -> list[str]:
    """What in a (module, callback) configuration is measured to lose few-step sample quality with KO.

    Args:
        parametrization: the module's parametrization name.
        loss_weighting: the module's loss weighting.
        gamma_floor: the callback's floor (None: chosen by the KE price).
        time_sampler: the module's time sampler, by name (``str(sampler)``).

    Returns:
        One sentence per losing setting (empty when none).
    """
    found = []
    if parametrization == "polar_v" and loss_weighting == "output":
        found.append(
            "parametrization='polar_v' with loss_weighting='output' drops the velocity weight (r theta')^2 from the "
            "loss, so the network is least accurate where the KO path turns fastest; with KO it lost to the "
            "velocity parametrization at every Euler step count on three of four data sets (docs/math.md §4.7). Use "
            "parametrization='velocity' (the default) or loss_weighting='velocity'."
        )
    if gamma_floor is None:
        found.append(
            "gamma_floor=None picks the floor by the kinetic-energy price (<= 0.5%), which lets the path turn so "
            "fast near t = 0 that few-step samples collapse (docs/math.md §4.7). The default floor is 0.1."
        )
    if time_sampler == "uniform":
        found.append(
            "time_sampler='uniform' trains a KO path with its own uniform-time loss, which spends little of the "
            "training budget where the data separate; with it KO lost to Cond-OT and cosine at 8-64 Euler steps on "
            "the digits and the 12-d mixture (docs/math.md §1.5). The default ('auto') trains with half Cond-OT's "
            "weighting of noise levels."
        )
    return found


def warn_if_known_to_lose(pl_module: object, gamma_floor: float | None) -> None:
    """Rank 0: a ``UserWarning`` for each of :func:`losing_settings` (nothing else happens: the run goes on)."""
    parametrization = getattr(pl_module, "parametrization", None)
    loss_weighting = getattr(pl_module, "loss_weighting", None)
    time_sampler = str(getattr(pl_module, "time_sampler", "auto"))
    for message in losing_settings(parametrization, loss_weighting, gamma_floor, time_sampler):
        rank_zero_warn(f"KOScheduleCallback: {message}", category=UserWarning)


def check_conditional_setup(pl_module: object, estimator: str, init_from_data: bool) -> None:
    """A model conditioned on float vectors (``cond_dim``) has no per-class posterior over the data: its
    ``lambda_cond`` comes from the model estimator only (docs/math.md §3.10).

    Raises:
        ValueError: on every rank, naming ``estimator`` / ``init_from_data``, for a float-conditioned model with the
            data estimator or the initial estimate from data.
    """
    cond_dim = getattr(getattr(pl_module, "conditioning", None), "cond_dim", None)
    if cond_dim is None:
        return
    if estimator != "model" or init_from_data:
        raise ValueError(
            f"KOScheduleCallback: the model takes float conditions (cond_dim={cond_dim}), for which only "
            "the model estimator can measure lambda (docs/math.md §3.10): use estimator='model' and "
            f"init_from_data=False (got estimator={estimator!r}, init_from_data={init_from_data})"
        )


def refresh_never_runs(max_steps: int, warmup_steps: int, estimator: str, init_from_data: bool) -> str | None:
    """Why a KO setting cannot act within the run, or None when it can.

    Periodic refreshes run at optimizer steps ``warmup_steps, warmup_steps + every_n_steps, ...`` below
    ``max_steps`` (none at the last step: no training would follow on the new path). So with
    ``0 < max_steps <= warmup_steps`` none runs. That matters when the run relies on them: without
    ``init_from_data`` the path stays Cond-OT; with the ``"model"`` / ``"data+model"`` estimator the
    network's own lambda is never measured. The ``"data"`` estimator with ``init_from_data`` is complete at step 0
    (later refreshes only refine the same estimate), so it gets no message.

    Args:
        max_steps: the trainer's ``max_steps`` (``-1``: unbounded, never a problem).
        warmup_steps: the callback's first periodic refresh step.
        estimator: the callback's estimator.
        init_from_data: whether the callback solves KO from the data before the first step.

    Returns:
        The message, naming the settings to change, or None.
    """
    if max_steps <= 0 or warmup_steps < max_steps:
        return None
    fix = f"lower warmup_steps below {max_steps} (command line: --ko.warmup_steps {max_steps // 2}) or raise max_steps"
    if not init_from_data:
        return (
            f"warmup_steps={warmup_steps} >= max_steps={max_steps} and init_from_data=False: no KO refresh runs in "
            f"this fit, so the model trains on its initial path only; {fix}."
        )
    if estimator != "data":
        return (
            f"warmup_steps={warmup_steps} >= max_steps={max_steps}: the {estimator!r} refresh never runs in this "
            f"fit; the path stays the one solved from the data at step 0; {fix}."
        )
    return None


def warn_if_refresh_never_runs(max_steps: int, warmup_steps: int, estimator: str, init_from_data: bool) -> None:
    """Rank 0 (no collective): a ``UserWarning`` with :func:`refresh_never_runs`'s message, if any."""
    message = refresh_never_runs(max_steps, warmup_steps, estimator, init_from_data)
    if message is not None:
        rank_zero_warn(f"KOScheduleCallback: {message}", category=UserWarning)
