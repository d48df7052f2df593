"""Copy similarity: how close is a generated image to its nearest training image.

Pixel normalised cross-correlation (NCC), the measure used for chest X-rays by Akbar et
al.: images are grayscale, resized to a common size, centred and scaled to unit norm, so the
dot product of two is their Pearson correlation over pixels (1 = identical up to brightness
and contrast). The nearest-neighbour search runs over the training set in chunks, so memory
stays bounded whatever its size.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from hf_datasets.images import to_grayscale


def ncc_features(images: Iterable[Image.Image], size: int = 64) -> np.ndarray:
    """(N, size*size) float32 rows: each image resized, centred and scaled to unit norm."""
    rows = []
    for image in images:
        small = to_grayscale(image).resize((size, size), Image.Resampling.BILINEAR)
        vector = np.asarray(small, dtype=np.float32).ravel()
        vector = vector - vector.mean()
        rows.append(vector / max(float(np.linalg.norm(vector)), 1e-6))
    return np.stack(rows) if rows else np.zeros((0, size * size), dtype=np.float32)


@dataclass
class Neighbours:
    """For each query: the index of its nearest bank row and the similarity to it."""

    index: np.ndarray
    similarity: np.ndarray


def nearest(queries: np.ndarray, bank: np.ndarray, chunk: int = 8192) -> Neighbours:
    """Nearest bank row of each query by dot product (NCC for `ncc_features`), in chunks."""
    best = np.full(len(queries), -np.inf, dtype=np.float32)
    index = np.zeros(len(queries), dtype=np.int64)
    for start in range(0, len(bank), chunk):
        scores = queries @ bank[start : start + chunk].T
        local = scores.argmax(axis=1)
        values = scores[np.arange(len(queries)), local]
        better = values > best
        best[better] = values[better]
        index[better] = local[better] + start
    return Neighbours(index=index, similarity=best)


def similarity_to(queries: np.ndarray, references: np.ndarray) -> np.ndarray:
    """Row-wise similarity of query i to reference i."""
    return np.einsum("ij,ij->i", queries, references)


def mean_pairwise(features: Sequence[np.ndarray]) -> float:
    """Mean similarity between distinct rows: a prompt's diversity (lower = more diverse)."""
    stacked = np.stack(features)
    scores = stacked @ stacked.T
    n = len(stacked)
    return float((scores.sum() - np.trace(scores)) / max(1, n * (n - 1)))
