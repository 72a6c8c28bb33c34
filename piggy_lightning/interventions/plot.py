"""A line chart of a metric per layer (the residual sweep), drawn with matplotlib's Agg canvas.

The figure is drawn off-screen (no pyplot, no display) and saved as PNG; the same raster is returned for
TensorBoard's ``add_image``.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    dpi = 100
    figure = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_subplot()
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())  # (H, W, 4)
    return torch.from_numpy(rgba[..., :3].copy()).permute(2, 0, 1)  # (3, H, W)
