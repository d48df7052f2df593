"""A PNG contact sheet of dataset rows: each image with its prompt underneath."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

from datasets import Dataset
from PIL import Image, ImageDraw, ImageFont

from hf_datasets.images import to_grayscale


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's built-in font at `size` px (the bitmap font where FreeType is missing)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError):
        return ImageFont.load_default()


def contact_sheet(
    images: Sequence[Image.Image],
    captions: Sequence[str],
    *,
    tile: int = 192,
    columns: int = 4,
    caption_lines: int = 7,
) -> Image.Image:
    """Tiles of `tile` px in a grid, each with up to `caption_lines` wrapped lines of caption."""
    font = _font(max(9, tile // 16))
    line_height = font.getbbox("Ag")[3] + 2
    chars = max(10, int(tile / (font.getbbox("x" * 20)[2] / 20)) - 1)
    rows = -(-len(images) // columns)
    cell_h = tile + caption_lines * line_height + 6
    sheet = Image.new("L", (columns * (tile + 4), rows * cell_h), color=255)
    draw = ImageDraw.Draw(sheet)
    for i, (image, caption) in enumerate(zip(images, captions, strict=True)):
        x, y = (i % columns) * (tile + 4) + 2, (i // columns) * cell_h + 2
        image = to_grayscale(image)
        scale = tile / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        thumb = image.resize(size, Image.Resampling.LANCZOS)
        sheet.paste(thumb, (x + (tile - thumb.width) // 2, y + (tile - thumb.height) // 2))
        lines = textwrap.wrap(caption, chars)
        if len(lines) > caption_lines:
            lines = [*lines[: caption_lines - 1], lines[caption_lines - 1][: chars - 1] + "…"]
        for j, line in enumerate(lines):
            draw.text((x, y + tile + 3 + j * line_height), line, fill=0, font=font)
    return sheet


def show(
    dataset: Dataset,
    out: str | Path,
    *,
    num: int = 16,
    columns: int = 4,
    tile: int = 192,
    start: int = 0,
) -> Path:
    """Write a contact sheet of rows start..start+num of `dataset` with their prompts."""
    rows = dataset.select(range(start, min(len(dataset), start + num)))
    captions = [
        f"{r['prompt']} [{r['patient_id']}" + (f", x{r['copies']}]" if r["copies"] > 1 else "]")
        for r in rows
    ]
    sheet = contact_sheet([r["image"] for r in rows], captions, tile=tile, columns=columns)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
