"""Figures drawn with PIL alone (no plotting library needed): scatter plots, ROC curves,
bar charts and token heat maps."""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from hf_datasets.errors import ChexmemError

PALETTE = ["#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"]
SIZE, MARGIN = 480, 56
# the axes of the square plots: left, top, width, height
BOX = (MARGIN, MARGIN, SIZE, SIZE)
BAR_HEIGHT, BAR_GAP = 14, 6
LABEL_WIDTH = 420  # longest bar label in pixels before it is shortened in the middle
HEAT_WIDTH, HEAT_LABEL_WIDTH, TOKEN_HEIGHT, TOKEN_GAP = 900, 160, 18, 4
HEAT_LOW, HEAT_HIGH = (255, 255, 255), (200, 20, 20)


def _canvas(
    title: str,
    xlabel: str,
    ylabel: str,
    box: tuple[int, int, int, int] = BOX,
    size: tuple[int, int] | None = None,
) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    """A white canvas with a title, axis box and axis labels."""
    left, top, width, height = box
    size = size or (left + width + MARGIN, top + height + MARGIN)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([left, top, left + width, top + height], outline="black")
    draw.text((left, 12), title, fill="black")
    draw.text((left + width // 2 - 4 * len(xlabel) // 2, top + height + 30), xlabel, fill="black")
    draw.text((6, top - 20), ylabel, fill="black")
    return image, draw


def _ticks(
    draw: ImageDraw.ImageDraw,
    low: tuple[float, float],
    high: tuple[float, float],
    box: tuple[int, int, int, int] = BOX,
    y_axis: bool = True,
) -> None:
    """Five labelled ticks on each axis (or on the x axis alone)."""
    left, top, width, height = box
    for k in range(5):
        f = k / 4
        x = left + f * width
        y = top + height - f * height
        draw.line([x, top + height, x, top + height + 4], fill="black")
        draw.text(
            (x - 10, top + height + 8), f"{low[0] + f * (high[0] - low[0]):.3g}", fill="black"
        )
        if y_axis:
            draw.line([left - 4, y, left, y], fill="black")
            draw.text(
                (left - MARGIN + 4, y - 5), f"{low[1] + f * (high[1] - low[1]):.3g}", fill="black"
            )


def _legend(
    draw: ImageDraw.ImageDraw, names: Sequence[str], origin: tuple[int, int] = (MARGIN, MARGIN)
) -> None:
    """Coloured names in the top left of the axes (or from `origin`)."""
    for k, name in enumerate(names):
        colour = PALETTE[k % len(PALETTE)]
        y = origin[1] + 8 + 14 * k
        draw.rectangle([origin[0] + 8, y, origin[0] + 16, y + 8], fill=colour)
        draw.text((origin[0] + 22, y - 2), name, fill="black")


def _save(image: Image.Image, path: str | Path) -> Path:
    """The image written as PNG to `path` in one step (readers never see half a file)."""
    out = Path(path)
    partial = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        image.save(partial, format="PNG")
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return out


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


def _shorten(draw: ImageDraw.ImageDraw, text: str, width: float) -> str:
    """`text`, cut in the middle with an ellipsis where it is wider than `width` pixels."""
    short, keep = text, len(text)
    while keep > 2 and draw.textlength(short) > width:
        keep -= 2
        short = f"{text[: keep // 2]}…{text[len(text) - keep // 2 :]}"
    return short


def bar_chart(
    labels: Sequence[str],
    values: Sequence[float],
    path: str | Path,
    title: str,
    xlabel: str,
    ylabel: str,
    groups: Sequence[str] | None = None,
) -> Path:
    """Horizontal bars, one per label from the top, optionally coloured by group; saved as PNG."""
    if len(labels) == 0:
        raise ChexmemError(f"bar chart {title!r} has no bars")
    if len(values) != len(labels) or (groups is not None and len(groups) != len(labels)):
        raise ChexmemError(
            f"bar chart {title!r}: {len(labels)} labels need as many values and groups"
        )
    xs = np.asarray(values, dtype=float)
    finite = xs[np.isfinite(xs)]
    low = min(0.0, float(finite.min())) if finite.size else 0.0
    high = max(0.0, float(finite.max())) if finite.size else 1.0
    high = high if high > low else low + 1.0
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    names = [_shorten(probe, str(label), LABEL_WIDTH) for label in labels]
    groups_seen = list(dict.fromkeys(groups)) if groups is not None else []
    legend_width = 30 + max((probe.textlength(str(g)) for g in groups_seen), default=0)
    left = int(max(probe.textlength(name) for name in names)) + 16
    height = len(labels) * (BAR_HEIGHT + BAR_GAP) + BAR_GAP
    box = (left, MARGIN, SIZE, height)
    size = (left + SIZE + MARGIN + int(legend_width), MARGIN + height + MARGIN)
    image, draw = _canvas(title, xlabel, ylabel, box, size)
    _ticks(draw, (low, 0.0), (high, 1.0), box, y_axis=False)
    zero = left + (0.0 - low) / (high - low) * SIZE
    for k, (name, value) in enumerate(zip(names, xs, strict=True)):
        y = MARGIN + BAR_GAP + k * (BAR_HEIGHT + BAR_GAP)
        draw.text((left - 8, y + BAR_HEIGHT / 2), name, fill="black", anchor="rm")
        if not math.isfinite(value):
            draw.text((zero + 4, y + BAR_HEIGHT / 2), "n/a", fill="#888888", anchor="lm")
            continue
        end = left + (value - low) / (high - low) * SIZE
        group = groups_seen.index(groups[k]) if groups is not None else 1
        draw.rectangle(
            [min(zero, end), y, max(zero, end), y + BAR_HEIGHT], fill=PALETTE[group % len(PALETTE)]
        )
        draw.text(
            (max(zero, end) + 4, y + BAR_HEIGHT / 2), f"{value:.4g}", fill="black", anchor="lm"
        )
    if low < 0:
        draw.line([zero, MARGIN, zero, MARGIN + height], fill="black")
    _legend(draw, [str(g) for g in groups_seen], (left + SIZE, MARGIN))
    return _save(image, path)


def _heat(shade: float) -> tuple[int, int, int]:
    """The colour of a 0..1 shade, white to strong red."""
    return tuple(round(a + shade * (b - a)) for a, b in zip(HEAT_LOW, HEAT_HIGH, strict=True))


def _row_shades(label: str, tokens: Sequence[str], significance: Sequence[float]) -> list[float]:
    """Each token's significance scaled to 0..1 by the row's largest (missing or negative: 0)."""
    if len(tokens) != len(significance):
        raise ChexmemError(
            f"heat map row {label!r} has {len(tokens)} tokens but {len(significance)} values"
        )
    scores = np.nan_to_num(np.asarray(significance, dtype=float), nan=0.0, posinf=0.0, neginf=0.0)
    scores = np.clip(scores, 0.0, None)
    top = float(scores.max()) if scores.size else 0.0
    return [float(s / top) if top > 0 else 0.0 for s in scores]


def _layout_row(
    draw: ImageDraw.ImageDraw, tokens: Sequence[str], start: int, end: int
) -> list[tuple[int, int, int, str]]:
    """(x, line, width, text) of each token box, wrapped onto new lines where `end` is reached."""
    placed, x, line = [], start, 0
    for token in tokens:
        text = _shorten(draw, str(token), end - start - 8)
        width = int(draw.textlength(text)) + 8
        if x > start and x + width > end:
            x, line = start, line + 1
        placed.append((x, line, width, text))
        x += width + TOKEN_GAP
    return placed


def _colour_scale(draw: ImageDraw.ImageDraw, x: int, y: int) -> None:
    """A white-to-red gradient from 0 to the row's largest significance."""
    draw.text((x - 6, y + 5), "0", fill="black", anchor="rm")
    for k in range(120):
        draw.line([x + k, y, x + k, y + 10], fill=_heat(k / 119))
    draw.rectangle([x, y, x + 120, y + 10], outline="#888888")
    draw.text((x + 126, y + 5), "row max", fill="black", anchor="lm")


def token_heatmap(
    rows: Sequence[tuple[str, Sequence[str], Sequence[float]]], path: str | Path, title: str
) -> Path:
    """Prompts as token boxes shaded by significance (white to red, per row), saved as PNG."""
    if len(rows) == 0:
        raise ChexmemError(f"heat map {title!r} has no prompts")
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    labels = [_shorten(probe, str(label), HEAT_LABEL_WIDTH) for label, _, _ in rows]
    start = int(max(probe.textlength(label) for label in labels)) + 2 * 16
    end = HEAT_WIDTH - 16
    shades = [_row_shades(str(label), tokens, sig) for label, tokens, sig in rows]
    layouts = [_layout_row(probe, tokens, start, end) for _, tokens, _ in rows]
    line_height = TOKEN_HEIGHT + TOKEN_GAP
    heights = [(max((row[1] for row in lay), default=0) + 1) * line_height for lay in layouts]
    image = Image.new("RGB", (HEAT_WIDTH, MARGIN + sum(heights) + 12 * len(rows) + 16), "white")
    draw = ImageDraw.Draw(image)
    draw.text((16, 12), title, fill="black")
    _colour_scale(draw, HEAT_WIDTH - 16 - 180, 14)
    y = MARGIN
    for label, layout, row_shades, height in zip(labels, layouts, shades, heights, strict=True):
        draw.text((16, y + TOKEN_HEIGHT / 2), label, fill="black", anchor="lm")
        for (x, line, width, text), shade in zip(layout, row_shades, strict=True):
            y0 = y + line * line_height
            draw.rectangle(
                [x, y0, x + width, y0 + TOKEN_HEIGHT], fill=_heat(shade), outline="#cccccc"
            )
            ink = "white" if shade > 0.6 else "black"  # dark red boxes need light text
            draw.text((x + 4, y0 + TOKEN_HEIGHT / 2), text, fill=ink, anchor="lm")
        y += height + 12
        draw.line([16, y - 6, HEAT_WIDTH - 16, y - 6], fill="#eeeeee")
    return _save(image, path)
