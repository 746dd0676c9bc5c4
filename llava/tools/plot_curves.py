"""Plot training curves of two or more runs from their ``metrics.jsonl`` files.

Usage::

    python -m llava.tools.plot_curves RUN_A/metrics.jsonl RUN_B/metrics.jsonl \\
        --labels baseline duet --metrics loss,learning_rate,tokens_per_s --out curves.png

One subplot per metric, x axis = optimizer step. A run that never logged a metric is left out of
that subplot; when a resumed run logged a step twice, the last value wins.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_METRICS = ("loss", "learning_rate", "tokens_per_s")


class MetricsFileError(ValueError):
    """A metrics file is missing, empty or not JSONL."""


def load_metrics(path: str | Path) -> list[dict]:
    """Rows of a ``metrics.jsonl`` file; raises :class:`MetricsFileError` if missing, empty or invalid."""
    path = Path(path)
    if not path.is_file():
        raise MetricsFileError(f"Metrics file not found: {path}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise MetricsFileError(f"{path}:{line_no} is not valid JSON: {err}") from err
            if isinstance(row, dict):
                rows.append(row)
    if not rows:
        raise MetricsFileError(f"Metrics file is empty: {path}")
    return rows


def metric_series(rows: Sequence[dict], metric: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of ``metric`` sorted by step; for a step logged twice the last row wins."""
    by_step: dict[int, float] = {}
    for row in rows:
        value, step = row.get(metric), row.get("step")
        if step is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            by_step[int(step)] = float(value)
        else:
            by_step.pop(int(step), None)  # a later non-finite value supersedes an earlier one
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def plot_runs(
    runs: Sequence[tuple[str, Sequence[dict]]],
    metrics: Sequence[str],
    out: str | Path,
) -> Path:
    """Draw ``metrics`` (one subplot each) for every ``(label, rows)`` run and save the figure to ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(metrics), 1, figsize=(8, 2.8 * len(metrics)), sharex=True, squeeze=False)
    for ax, metric in zip(axes[:, 0], metrics, strict=True):
        plotted = 0
        for label, rows in runs:
            steps, values = metric_series(rows, metric)
            if not steps:
                logger.info("Run %s has no '%s' values; left out of that subplot.", label, metric)
                continue
            ax.plot(steps, values, label=label, marker="." if len(steps) < 50 else None)
            plotted += 1
        ax.set_ylabel(metric)
        ax.grid(True, alpha=0.3)
        if plotted:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, f"no run logged '{metric}'", ha="center", va="center", transform=ax.transAxes)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _default_label(path: Path) -> str:
    """The run folder's name for ``<run>/metrics.jsonl``, else the file stem."""
    return path.parent.name if path.name == "metrics.jsonl" and path.parent.name else path.stem


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path, help="metrics.jsonl files, one per run")
    parser.add_argument("--labels", nargs="+", help="legend label per file (default: run folder name)")
    parser.add_argument("--metrics", default=",".join(DEFAULT_METRICS), help="comma-separated metric names to plot")
    parser.add_argument("--out", type=Path, default=Path("curves.png"), help="output image path")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    if args.labels is not None and len(args.labels) != len(args.files):
        parser.error(f"--labels has {len(args.labels)} names for {len(args.files)} files")
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    if not metrics:
        parser.error("--metrics names no metric")
    labels = args.labels or [_default_label(p) for p in args.files]
    try:
        runs = [(label, load_metrics(path)) for label, path in zip(labels, args.files, strict=True)]
    except MetricsFileError as err:
        logger.error("%s", err)
        return 2
    out = plot_runs(runs, metrics, args.out)
    logger.info("Wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
