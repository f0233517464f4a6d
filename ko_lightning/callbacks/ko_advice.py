"""Warnings for KO configurations that the measurements of docs/math.md §4.7 show to lose, and the check that a
conditional model's configuration can be estimated (docs/math.md §3.10)."""

from __future__ import annotations

from lightning.pytorch.utilities import rank_zero_warn

__all__ = ["check_conditional_setup", "losing_settings", "warn_if_known_to_lose"]


def losing_settings(parametrization: object, loss_weighting: object, gamma_floor: float | None) -> list[str]:
    """What in a (module, callback) configuration is measured to lose few-step sample quality with KO.

    Args:
        parametrization: the module's parametrization name.
        loss_weighting: the module's loss weighting.
        gamma_floor: the callback's floor (None: chosen by the KE price).

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
    return found


def warn_if_known_to_lose(pl_module: object, gamma_floor: float | None) -> None:
    """Rank 0: a ``UserWarning`` for each of :func:`losing_settings` (nothing else happens: the run goes on)."""
    parametrization = getattr(pl_module, "parametrization", None)
    loss_weighting = getattr(pl_module, "loss_weighting", None)
    for message in losing_settings(parametrization, loss_weighting, gamma_floor):
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
