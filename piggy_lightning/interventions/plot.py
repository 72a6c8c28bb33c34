"""Charts of the interventions, drawn with matplotlib's Agg canvas: a metric per layer (the residual sweep) and
grouped bars (the carrier scan's restored alignment per position and per span).

The figure is drawn off-screen (no pyplot, no display) and saved as PNG; the same raster is returned for
TensorBoard's ``add_image``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor


def line_chart(
    xs: Sequence[int],
    ys: Sequence[float | None],
    baseline: float | None,
    path: str | Path,
    xlabel: str = "layer",
    ylabel: str = "",
    size: tuple[int, int] = (480, 300),
) -> Tensor:
    """Plot ``ys`` against integer ``xs`` (gaps where None) and a dashed ``baseline``; save a PNG at ``path``.

    The y axis spans 0-100 when every value fits (alignment scores), else the data's range.

    Args:
        xs: Integer x positions (layers).
        ys: One value per x; None leaves a gap.
        baseline: A horizontal reference line; None draws none.
        path: The PNG file (parent directories are made).
        xlabel: The x axis label.
        ylabel: The y axis label.
        size: Width and height in pixels.

    Returns:
        The drawn chart as a ``(3, H, W)`` uint8 raster.
    """
    figure, canvas, axes = _canvas(size)
    values = [float("nan") if y is None else y for y in ys]
    axes.plot(list(xs), values, marker="o", color="tab:blue", label=ylabel or "patched")
    if baseline is not None:
        axes.axhline(baseline, linestyle="--", color="tab:red", label="baseline")
    seen = [v for v in [*ys, baseline] if v is not None]
    if not seen or 0 <= min(seen) <= max(seen) <= 100:
        axes.set_ylim(0, 100)
    axes.set_xticks(list(xs)[:: max(1, len(xs) // 8)])
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    axes.legend(loc="best", fontsize="small")
    figure.tight_layout()
    return _save(figure, canvas, path)


def bar_chart(
    groups: Mapping[str, Sequence[tuple[str, float | None]]],
    path: str | Path,
    ylabel: str = "",
    title: str = "",
    size: tuple[int, int] = (720, 340),
) -> Tensor:
    """Labelled bars in consecutive groups, one colour and legend entry per group, a line at 0; save a PNG.

    Args:
        groups: Group name -> ``(label, value)`` bars in order; a None value leaves its slot empty.
        path: The PNG file (parent directories are made).
        ylabel: The y axis label.
        title: The chart's title; empty draws none.
        size: Width and height in pixels.

    Returns:
        The drawn chart as a ``(3, H, W)`` uint8 raster.
    """
    figure, canvas, axes = _canvas(size)
    colours = ("tab:blue", "tab:orange", "tab:green", "tab:purple")
    x, ticks, labels = 0, [], []
    for g, (name, bars) in enumerate(groups.items()):
        xs = list(range(x, x + len(bars)))
        values = [float("nan") if v is None else v for _, v in bars]
        axes.bar(xs, values, color=colours[g % len(colours)], label=name)
        ticks += xs
        labels += [label for label, _ in bars]
        x += len(bars) + 1  # a gap between groups
    axes.axhline(0.0, color="black", linewidth=0.8)
    axes.set_xticks(ticks)
    axes.set_xticklabels(labels, rotation=90, fontsize="small")
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize="medium")
    axes.grid(alpha=0.3, axis="y")
    axes.legend(loc="best", fontsize="small")
    figure.tight_layout()
    return _save(figure, canvas, path)


_DPI = 100


def _canvas(size: tuple[int, int]):
    """An off-screen figure of ``size`` pixels, its Agg canvas and one axes."""
    figure = Figure(figsize=(size[0] / _DPI, size[1] / _DPI), dpi=_DPI)
    return figure, FigureCanvasAgg(figure), figure.add_subplot()


def _save(figure: Figure, canvas: FigureCanvasAgg, path: str | Path) -> Tensor:
    """Save ``figure`` as a PNG at ``path`` and return its raster ``(3, H, W)`` uint8."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=_DPI)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())  # (H, W, 4)
    return torch.from_numpy(rgba[..., :3].copy()).permute(2, 0, 1)  # (3, H, W)
