"""One table of report rows, written as markdown into the run directory and printed with rich (rank 0 callers)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["format_cell", "write_report_table"]


def format_cell(value: Any) -> str:
    """Floats to 4 decimals, anything else as ``str`` (missing cells are ``""``)."""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def write_report_table(
    rows: Sequence[dict[str, Any]],
    title: str,
    preamble: Sequence[str],
    run_dir: str | None,
    file_name: str,
    cell: Callable[[str, Any], str] = lambda column, value: format_cell(value),
) -> None:
    """Write ``rows`` (columns in order of first appearance) as a markdown table to ``run_dir/file_name`` (after
    ``# title`` and the ``preamble`` paragraphs) and print them as a rich table; without ``run_dir`` only print.

    Args:
        rows: the report rows, ``column -> value``.
        title: the heading of the file and the printed table.
        preamble: paragraphs between the heading and the table.
        run_dir: where to write, or None.
        file_name: the markdown file's name.
        cell: ``(column, value) -> text`` of one cell (default :func:`format_cell`).
    """
    columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[cell(c, row.get(c, "")) for c in columns] for row in rows]
    lines = [f"# {title}", ""]
    for paragraph in preamble:
        lines += [paragraph, ""]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "---|" * len(columns))
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    if run_dir is not None:
        with open(os.path.join(run_dir, file_name), "w") as fh:
            fh.write("\n".join(lines) + "\n")
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"ko_lightning {title[0].lower()}{title[1:]}" + (f" ({run_dir})" if run_dir else ""))
        for c in columns:
            table.add_column(c)
        for row in cells:
            table.add_row(*row)
        Console().print(table)
    except ImportError:  # pragma: no cover - rich is a dependency; keep the report if it is missing
        print("\n".join(lines))
