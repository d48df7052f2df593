"""Duplicate injection: repeat chosen training rows so that memorization has ground truth."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from datasets import Dataset, DatasetDict, concatenate_datasets

from hf_datasets.errors import ChexmemError


def choose_rows(num_rows: int, k: int, seed: int) -> list[int]:
    """k distinct row indices out of `num_rows`, drawn by seed, in ascending order."""
    if not 0 <= k <= num_rows:
        raise ChexmemError(f"cannot duplicate {k} rows of a training split with {num_rows} rows")
    return sorted(int(i) for i in np.random.default_rng(seed).choice(num_rows, k, replace=False))


def duplicate_rows(train: Dataset, counts: Mapping[int, int]) -> Dataset:
    """The split with row i appearing counts[i] times in all, and `copies` set on every copy."""
    bad = {i: c for i, c in counts.items() if not 0 <= i < len(train) or c < 1}
    if bad:
        raise ChexmemError(f"duplicate counts need valid row indices and counts >= 1, got {bad}")
    if any(c > 1 for c in train["copies"]):
        raise ChexmemError("the training split already holds injected duplicates")
    copies = np.ones(len(train), dtype=np.int32)
    for index, count in counts.items():
        copies[index] = count
    marked = train.remove_columns("copies").add_column(
        "copies", copies.tolist(), feature=train.features["copies"]
    )
    extra = [i for i, c in sorted(counts.items()) for _ in range(c - 1)]
    if not extra:
        return marked
    return concatenate_datasets([marked, marked.select(extra)])


def dose_counts(num_train: int, num_rows: int, copies: Sequence[int], seed: int) -> dict[int, int]:
    """`num_rows` distinct rows at each copy count (a dose-response design), drawn by seed."""
    copies = [int(c) for c in copies]
    if not copies or min(copies) < 1:
        raise ChexmemError(f"copies must be at least 1, got {copies}")
    if len(set(copies)) != len(copies):
        raise ChexmemError(f"copy counts must differ from each other, got {copies}")
    rows = choose_rows(num_train, num_rows * len(copies), seed)
    # the draw order, not the sorted order, decides each row's dose
    order = np.random.default_rng(seed + 1).permutation(rows)
    return {int(row): copies[k // num_rows] for k, row in enumerate(order)}


def inject_duplicates(
    dataset: DatasetDict,
    *,
    num_rows: int = 0,
    copies: int | Sequence[int] = 1,
    counts: Mapping[int, int] | None = None,
    seed: int = 0,
) -> DatasetDict:
    """Repeat `num_rows` training rows `copies` times each (or per-row `counts`).

    With several `copies` (e.g. 2, 5, 10, 20), `num_rows` rows get each count: a dose-response
    ground truth. Only the train split changes; validation and test never get duplicates.
    The `copies` column of every row says how many times its image appears in the training
    set.
    """
    if "train" not in dataset:
        raise ChexmemError("duplicate injection needs a 'train' split")
    if counts is None:
        doses = [copies] if isinstance(copies, int) else list(copies)
        counts = dose_counts(len(dataset["train"]), num_rows, doses, seed)
    train = duplicate_rows(dataset["train"], counts)
    repeated = sum(1 for c in counts.values() if c > 1)
    note = (
        f"\nDuplicates injected into train: {repeated} row(s), "
        f"{sum(counts.values()) - len(counts)} extra copies (seed {seed})."
    )
    train.info.description = (dataset["train"].info.description or "") + note
    return DatasetDict({**dataset, "train": train})


def duplicated_rows(split: Dataset) -> list[int]:
    """Index of the first row of each image that appears more than once (`copies` > 1)."""
    seen: set[str] = set()
    first = []
    for index, (path, copies) in enumerate(zip(split["source_path"], split["copies"], strict=True)):
        if copies > 1 and path not in seen:
            seen.add(path)
            first.append(index)
    return first
