"""Figures drawn with PIL alone (no plotting library needed): scatter plots and ROC curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

PALETTE = ["#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"]
SIZE, MARGIN = 480, 56


def _canvas(title: str, xlabel: str, ylabel: str) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    """A white canvas with a title, axis box and axis labels."""
    image = Image.new("RGB", (SIZE + 2 * MARGIN, SIZE + 2 * MARGIN), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([MARGIN, MARGIN, MARGIN + SIZE, MARGIN + SIZE], outline="black")
    draw.text((MARGIN, 12), title, fill="black")
    draw.text((MARGIN + SIZE // 2 - 4 * len(xlabel) // 2, MARGIN + SIZE + 30), xlabel, fill="black")
    draw.text((6, MARGIN - 20), ylabel, fill="black")
    return image, draw


def _ticks(draw: ImageDraw.ImageDraw, low: tuple[float, float], high: tuple[float, float]) -> None:
    """Five labelled ticks on each axis."""
    for k in range(5):
        f = k / 4
        x = MARGIN + f * SIZE
        y = MARGIN + SIZE - f * SIZE
        draw.line([x, MARGIN + SIZE, x, MARGIN + SIZE + 4], fill="black")
        draw.text(
            (x - 10, MARGIN + SIZE + 8), f"{low[0] + f * (high[0] - low[0]):.3g}", fill="black"
        )
        draw.line([MARGIN - 4, y, MARGIN, y], fill="black")
        draw.text((4, y - 5), f"{low[1] + f * (high[1] - low[1]):.3g}", fill="black")


def _legend(draw: ImageDraw.ImageDraw, names: Sequence[str]) -> None:
    """Coloured names in the top left of the axes."""
    for k, name in enumerate(names):
        colour = PALETTE[k % len(PALETTE)]
        y = MARGIN + 8 + 14 * k
        draw.rectangle([MARGIN + 8, y, MARGIN + 16, y + 8], fill=colour)
        draw.text((MARGIN + 22, y - 2), name, fill="black")


def scatter_plot(
    x: Sequence[float],
    y: Sequence[float],
    groups: Sequence[str],
    path: str | Path,
    title: str,
    xlabel: str,
    ylabel: str,
) -> Path:
    """Points coloured by group, axes fitted to the data; saved as PNG."""
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    pad_x = 0.05 * (xs.max() - xs.min() or 1.0)
    pad_y = 0.05 * (ys.max() - ys.min() or 1.0)
    low = (xs.min() - pad_x, ys.min() - pad_y)
    high = (xs.max() + pad_x, ys.max() + pad_y)
    image, draw = _canvas(title, xlabel, ylabel)
    _ticks(draw, low, high)
    names = list(dict.fromkeys(groups))
    for xi, yi, group in zip(xs, ys, groups, strict=True):
        px = MARGIN + (xi - low[0]) / (high[0] - low[0]) * SIZE
        py = MARGIN + SIZE - (yi - low[1]) / (high[1] - low[1]) * SIZE
        colour = PALETTE[names.index(group) % len(PALETTE)]
        draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=colour, outline="black")
    _legend(draw, names)
    image.save(path)
    return Path(path)


def roc_plot(
    curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path, title: str
) -> Path:
    """ROC curves (name -> (fpr, tpr)) with the chance diagonal; saved as PNG."""
    image, draw = _canvas(title, "false positive rate", "true positive rate")
    _ticks(draw, (0.0, 0.0), (1.0, 1.0))
    draw.line([MARGIN, MARGIN + SIZE, MARGIN + SIZE, MARGIN], fill="#bbbbbb")
    for k, (fpr, tpr) in enumerate(curves.values()):
        points = [
            (MARGIN + f * SIZE, MARGIN + SIZE - t * SIZE) for f, t in zip(fpr, tpr, strict=True)
        ]
        draw.line(points, fill=PALETTE[k % len(PALETTE)], width=3)
    _legend(draw, list(curves))
    image.save(path)
    return Path(path)
