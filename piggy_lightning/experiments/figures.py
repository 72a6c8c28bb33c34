"""Figures of a grid report, drawn with matplotlib: one per experiment and metric.

An experiment whose first non-replicate axis has numeric values (λ, an interleaving ratio, a train-set size, a
layer) is drawn as lines over that axis, one line per combination of its other axes; any other experiment as bars,
one per row. Error bars are the sample standard deviation over the replicates (none with a single replicate).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt  # noqa: E402


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _mean_sd(values: dict[str, float]) -> tuple[float, float] | None:
    if not values:
        return None
    vals = list(values.values())
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def draw(rows: list[dict[str, Any]], axes: list[str], metric: str, title: str, path: Path) -> Path | None:
    """Draw ``metric`` over an experiment's ``rows`` (see ``report.experiment_rows``) into ``path``; None if empty."""
    points = [(r["coords"], _mean_sd(r["values"].get(metric, {}))) for r in rows]
    points = [(c, m) for c, m in points if m is not None]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    x_axis = axes[0] if axes else None
    numeric = x_axis is not None and all(_number(c[x_axis]) is not None for c, _ in points)
    if numeric:
        series: dict[str, list[tuple[float, float, float]]] = {}
        for coords, (mean, sd) in points:
            name = ", ".join(f"{a}={coords[a]}" for a in axes[1:]) or metric
            series.setdefault(name, []).append((_number(coords[x_axis]), mean, sd))
        for name, pts in series.items():
            pts.sort()
            ax.errorbar(
                [p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3, label=name
            )
        ax.set_xlabel(x_axis)
        if len(series) > 1:
            ax.legend(fontsize=7)
    else:
        labels = [", ".join(str(c[a]) for a in axes) or "run" for c, _ in points]
        ax.bar(range(len(points)), [m[0] for _, m in points], yerr=[m[1] for _, m in points], capsize=3)
        ax.set_xticks(range(len(points)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    return save(fig, path)


def save(fig: Any, path: Path) -> Path:
    """Lay out, write and close a report figure."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
