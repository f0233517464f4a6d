"""Average comparison runs over seeds: ``python -m recipes.compare_paths.aggregate RESULTS.json ... [--out FILE]``.

Reads the ``results.json`` of several runs (one per seed and data set), groups them by data set and prints, per
data set, the mean and standard error over seeds of the sample quality of every row at every solver (sliced W2 for
vectors, FID for digits), the dopri5 NFE and the training time, then a verdict per step count for the
``ko`` row (KO with the package defaults) against the better of Cond-OT and cosine: *win* when its mean is lower,
*tie* within 5%, *loss* otherwise. Standard errors are ``std / sqrt(n_seeds)`` (``ddof = 1``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

__all__ = ["aggregate", "main", "verdicts"]

_BASELINES = ("cond_ot", "cosine")
_TIE = 1.05


def _mean_se(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return mean, se


def _quality_key(row: dict[str, Any]) -> str:
    first = next(iter(row["solvers"].values()))
    return "sw2" if "sw2" in first else "fid"


def verdicts(rows: dict[str, dict[str, list[float]]], solvers: list[str]) -> dict[str, str]:
    """``solver -> "win" | "tie" | "loss"`` of the ``ko`` row against the better baseline mean at that solver."""
    out = {}
    for solver in solvers:
        ko = statistics.fmean(rows["ko"][solver])
        best = min(statistics.fmean(rows[b][solver]) for b in _BASELINES if b in rows)
        out[solver] = "win" if ko <= best else ("tie" if ko <= _TIE * best else "loss")
    return out


def aggregate(files: list[Path]) -> str:
    """The markdown tables of ``files`` (``results.json`` of :func:`recipes.compare_paths.run_comparison`)."""
    by_data: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for file in files:
        payload = json.loads(Path(file).read_text())
        by_data[payload["data"]].append(payload)
    sections = []
    for data, runs in by_data.items():
        seeds = sorted(run["config"]["seed"] for run in runs)
        solvers = list(runs[0]["rows"][0]["solvers"])
        key = _quality_key(runs[0]["rows"][0])
        quality: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        extra: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        labels: dict[str, str] = {}
        for run in runs:
            for row in run["rows"]:
                labels[row["name"]] = row["label"]
                for solver in solvers:
                    quality[row["name"]][solver].append(row["solvers"][solver][key])
                extra[row["name"]]["nfe"].append(row["solvers"]["dopri5"]["nfe"])
                extra[row["name"]]["train"].append(row["train_seconds"])
                extra[row["name"]]["nll"].append(row["nll_bpd"])
        header = ["row", *[f"{key.upper()} {s}" for s in solvers], "NFE dopri5", "NLL bits/dim", "train s"]
        lines = [
            f"### {data} ({len(runs)} seeds: {', '.join(map(str, seeds))}; mean ± standard error)",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        for name in labels:
            cells = [labels[name]]
            for solver in solvers:
                mean, se = _mean_se(quality[name][solver])
                cells.append(f"{mean:.4f} ± {se:.4f}")
            for what, digits in (("nfe", 0), ("nll", 3), ("train", 1)):
                mean, se = _mean_se(extra[name][what])
                cells.append(f"{mean:.{digits}f} ± {se:.{digits}f}")
            lines.append("| " + " | ".join(cells) + " |")
        if "ko" in quality and any(b in quality for b in _BASELINES):
            verdict = verdicts(quality, solvers)
            lines += [
                "",
                "KO (package defaults) against the better of Cond-OT and cosine: "
                + ", ".join(f"{s}: {v}" for s, v in verdict.items())
                + ".",
            ]
            if "cond_ot" in extra:
                ratio = statistics.fmean(extra["ko"]["train"]) / statistics.fmean(extra["cond_ot"]["train"])
                lines.append(f"Training time of KO (package defaults) / Cond-OT: {ratio:.3f}.")
        sections.append("\n".join(lines))
    return "\n\n".join(sections) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Print (and with ``--out`` write) the aggregated tables; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("files", nargs="+", type=Path, help="results.json files of comparison runs")
    parser.add_argument("--out", type=Path, default=None, help="also write the tables to this file")
    args = parser.parse_args(argv)
    text = aggregate(args.files)
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
