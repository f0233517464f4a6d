"""An optional rich progress bar for the long likelihood computations (a no-op when disabled)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["progress_bar"]


@contextmanager
def progress_bar(enabled: bool, description: str, total: float | None, counted: bool) -> Iterator[Callable[..., None]]:
    """Yield ``update(completed, **fields)``; a rich progress bar when enabled, a no-op otherwise.

    ``counted``: show "done/total" (batches) rather than a percentage (fraction of the time interval).
    """
    if not enabled:
        yield lambda completed, **fields: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [TextColumn("[progress.description]{task.description}"), BarColumn()]
    columns.append(MofNCompleteColumn() if counted else TextColumn("{task.percentage:>5.1f}%"))
    columns += [TimeElapsedColumn(), TextColumn("{task.fields[info]}")]
    with Progress(*columns) as bar:
        task = bar.add_task(description, total=total, info="")

        def update(completed: float, **fields: Any) -> None:
            info = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
            bar.update(task, completed=completed, info=info)

        yield update
