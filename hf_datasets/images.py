"""Reading, checking and resizing chest radiographs with PIL (no torchvision)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm


def to_grayscale(image: Image.Image) -> Image.Image:
    """8-bit grayscale; 16-bit and float images are rescaled to their own range, not clipped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) / (high - low) if high > low else np.zeros_like(array)
        return Image.fromarray(np.round(scaled * 255).astype(np.uint8), mode="L")
    return image if image.mode == "L" else image.convert("L")


def resize_shorter_side(image: Image.Image, resolution: int) -> Image.Image:
    """Resize so the shorter side equals `resolution` (Lanczos), keeping the aspect ratio."""
    width, height = image.size
    scale = resolution / min(width, height)
    if scale == 1:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def png_bytes(image: Image.Image) -> bytes:
    """Lossless PNG encoding of a PIL image."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def check_image(path: str) -> str | None:
    """None when the file decodes completely, else a short reason ('missing', 'corrupt: ...')."""
    if not Path(path).is_file():
        return "missing"
    try:
        with Image.open(path) as image:
            image.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        return f"corrupt: {type(error).__name__}"
    return None


def check_exists(path: str) -> str | None:
    """None when the file exists, else 'missing' (the cheap check, without decoding)."""
    return None if Path(path).is_file() else "missing"


def check_images(
    paths: Sequence[str], *, decode: bool = True, num_workers: int = 1
) -> list[str | None]:
    """Check every image (fully decoding it unless `decode` is False) with a progress bar."""
    check = check_image if decode else check_exists
    desc = "checking images" if decode else "finding images"
    if num_workers <= 1 or len(paths) < 256:
        return [check(p) for p in tqdm(paths, desc=desc, unit="img", disable=len(paths) < 1000)]
    with ProcessPoolExecutor(num_workers) as pool:
        results = pool.map(check, paths, chunksize=256)
        return list(tqdm(results, total=len(paths), desc=desc, unit="img"))


def load_for_dataset(path: str, resolution: int | None) -> dict[str, bytes | str | None]:
    """The value stored in an `Image()` column: the path (decoded lazily) or resized PNG bytes."""
    if resolution is None:
        return {"path": path, "bytes": None}
    with Image.open(path) as image:
        small = resize_shorter_side(to_grayscale(image), resolution)
    return {"path": None, "bytes": png_bytes(small)}
