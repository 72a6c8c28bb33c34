"""A dependency-free line chart: an RGB raster drawn with torch and written as PNG with zlib.

Used for the residual patching sweep (alignment per layer). matplotlib is not a dependency, so this draws axes,
tick labels (a 3x5 pixel digit font), a dashed baseline and the curve with its points; the same raster is logged
to TensorBoard as an image.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

# 3x5 glyphs, rows top to bottom, 3 bits per row (MSB = left column)
_GLYPHS = {
    "0": (7, 5, 5, 5, 7), "1": (2, 6, 2, 2, 7), "2": (7, 1, 7, 4, 7), "3": (7, 1, 7, 1, 7), "4": (5, 5, 7, 1, 1),
    "5": (7, 4, 7, 1, 7), "6": (7, 4, 7, 5, 7), "7": (7, 1, 1, 1, 1), "8": (7, 5, 7, 5, 7), "9": (7, 5, 7, 1, 7),
    ".": (0, 0, 0, 0, 2), "-": (0, 0, 7, 0, 0),
}  # fmt: skip
_SCALE = 2  # glyph pixel size
_INK, _GRID, _CURVE, _BASE = (0, 0, 0), (215, 215, 215), (31, 119, 180), (214, 39, 40)


def _text(img: Tensor, x: int, y: int, text: str, color=_INK) -> None:
    """Draw ``text`` with its top-left corner at (x, y)."""
    for char in text:
        for row, bits in enumerate(_GLYPHS.get(char, (0,) * 5)):
            for col in range(3):
                if bits >> (2 - col) & 1:
                    y0, x0 = y + row * _SCALE, x + col * _SCALE
                    img[:, y0 : y0 + _SCALE, x0 : x0 + _SCALE] = torch.tensor(color, dtype=torch.uint8)[:, None, None]
        x += 4 * _SCALE


def _line(img: Tensor, p: tuple[float, float], q: tuple[float, float], color, dash: int = 0, width: int = 1) -> None:
    steps = int(max(abs(q[0] - p[0]), abs(q[1] - p[1]))) + 1
    for i in range(steps + 1):
        if dash and (i // dash) % 2:
            continue
        t = i / steps
        x, y = round(p[0] + t * (q[0] - p[0])), round(p[1] + t * (q[1] - p[1]))
        img[:, max(y - width // 2, 0) : y + width // 2 + 1, max(x - width // 2, 0) : x + width // 2 + 1] = torch.tensor(
            color, dtype=torch.uint8
        )[:, None, None]


def line_chart(
    xs: Sequence[int], ys: Sequence[float], baseline: float | None = None, width: int = 480, height: int = 300
) -> Tensor:
    """Draw ``ys`` against integer ``xs`` (and a dashed ``baseline``); returns a ``(3, H, W)`` uint8 raster.

    The y axis spans 0-100 when every value fits (alignment scores), else the data's range.
    """
    img = torch.full((3, height, width), 255, dtype=torch.uint8)
    left, right, top, bottom = 44, width - 16, 12, height - 28
    values = [v for v in [*ys, baseline] if v is not None]
    lo, hi = (0.0, 100.0) if not values or 0 <= min(values) <= max(values) <= 100 else (min(values), max(values))
    hi = hi if hi > lo else lo + 1.0
    x_lo, x_hi = min(xs), max(max(xs), min(xs) + 1)

    def px(x: float, y: float) -> tuple[float, float]:
        return left + (x - x_lo) / (x_hi - x_lo) * (right - left), bottom - (y - lo) / (hi - lo) * (bottom - top)

    for i in range(5):  # horizontal grid lines with labels
        y = lo + (hi - lo) * i / 4
        _line(img, px(x_lo, y), px(x_hi, y), _GRID)
        label = f"{y:.0f}" if hi - lo >= 8 else f"{y:.2f}"
        _text(img, 4, round(px(x_lo, y)[1]) - 5, label)
    every = max(1, len(xs) // 8)
    for x in xs[::every]:  # x tick labels: layer numbers
        _text(img, round(px(x, lo)[0]) - 3, bottom + 8, str(x))
    _line(img, (left, top), (left, bottom), _INK)
    _line(img, (left, bottom), (right, bottom), _INK)
    if baseline is not None:
        _line(img, px(x_lo, baseline), px(x_hi, baseline), _BASE, dash=4)
    points = [px(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
    for p, q in zip(points, points[1:], strict=False):
        _line(img, p, q, _CURVE, width=2)
    for p in points:
        _line(img, (p[0] - 2, p[1]), (p[0] + 2, p[1]), _CURVE, width=5)
    return img


def write_png(image: Tensor, path: str | Path) -> Path:
    """Write a ``(3, H, W)`` uint8 raster as an 8-bit RGB PNG."""
    _, height, width = image.shape
    rows = image.permute(1, 2, 0).contiguous().numpy()  # (H, W, 3)
    raw = b"".join(b"\x00" + rows[r].tobytes() for r in range(height))  # filter type 0 per scanline

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    )
    return path
