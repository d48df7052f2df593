"""Duplicate injection into the training split only."""

from __future__ import annotations

from collections import Counter

import pytest

from hf_datasets.duplicates import inject_duplicates
from hf_datasets.errors import ChexmemError


def test_k_rows_times_c_copies(small_dataset) -> None:
    before = small_dataset
    after = inject_duplicates(before, num_rows=3, copies=5, seed=0)
    train = after["train"]
    assert len(train) == len(before["train"]) + 3 * 4
    appearances = Counter(train["source_path"])
    repeated = {p for p, n in appearances.items() if n > 1}
    assert len(repeated) == 3 and all(appearances[p] == 5 for p in repeated)
    for path, copies in zip(train["source_path"], train["copies"], strict=True):
        assert copies == appearances[path]
    for split in ("validation", "test"):
        assert after[split]["source_path"] == before[split]["source_path"]
        assert set(after[split]["copies"]) == {1}
    assert (
        "Duplicates injected into train: 3 row(s), 12 extra copies (seed 0)"
        in train.info.description
    )
    copy = train[len(train) - 1]
    original = train[train["source_path"].index(copy["source_path"])]
    assert copy["prompt"] == original["prompt"]
    assert copy["image"].tobytes() == original["image"].tobytes()


def test_deterministic_by_seed(small_dataset) -> None:
    first = inject_duplicates(small_dataset, num_rows=4, copies=2, seed=7)["train"]["source_path"]
    again = inject_duplicates(small_dataset, num_rows=4, copies=2, seed=7)["train"]["source_path"]
    other = inject_duplicates(small_dataset, num_rows=4, copies=2, seed=8)["train"]["source_path"]
    assert first == again and first != other


def test_per_row_counts(small_dataset) -> None:
    train = inject_duplicates(small_dataset, counts={0: 3, 2: 2})["train"]
    original = small_dataset["train"]["source_path"]
    appearances = Counter(train["source_path"])
    assert (
        appearances[original[0]] == 3
        and appearances[original[2]] == 2
        and appearances[original[1]] == 1
    )


def test_bad_requests(small_dataset) -> None:
    with pytest.raises(ChexmemError, match="cannot duplicate 999 rows"):
        inject_duplicates(small_dataset, num_rows=999, copies=2)
    with pytest.raises(ChexmemError, match="valid row indices"):
        inject_duplicates(small_dataset, counts={10_000: 2})
    twice = inject_duplicates(small_dataset, num_rows=2, copies=2)
    with pytest.raises(ChexmemError, match="already holds injected duplicates"):
        inject_duplicates(twice, num_rows=2, copies=2)


def test_duplicated_rows_lists_each_repeated_image_once(small_dataset) -> None:
    from hf_datasets.duplicates import duplicated_rows

    train = inject_duplicates(small_dataset, num_rows=3, copies=4, seed=1)["train"]
    first = duplicated_rows(train)
    paths = [train["source_path"][i] for i in first]
    assert len(first) == 3 and len(set(paths)) == 3
    assert all(train["copies"][i] == 4 for i in first)
    assert duplicated_rows(small_dataset["train"]) == []


def test_several_copy_counts_give_num_rows_rows_at_each_dose(small_dataset) -> None:
    train = inject_duplicates(small_dataset, num_rows=2, copies=[2, 3, 5], seed=3)["train"]
    appearances = Counter(train["source_path"])
    doses = Counter(n for n in appearances.values() if n > 1)
    assert doses == {2: 2, 3: 2, 5: 2}  # 2 distinct rows at each count
    assert len(train) == len(small_dataset["train"]) + 2 * (1 + 2 + 4)
    for path, copies in zip(train["source_path"], train["copies"], strict=True):
        assert copies == appearances[path]
    # one count: the same rows as before the dose design, so earlier studies do not move
    from hf_datasets.duplicates import choose_rows

    single = inject_duplicates(small_dataset, num_rows=3, copies=[4], seed=1)["train"]
    rows = choose_rows(len(small_dataset["train"]), 3, 1)
    original = small_dataset["train"]["source_path"]
    assert {p for p, n in Counter(single["source_path"]).items() if n > 1} == {
        original[i] for i in rows
    }
    with pytest.raises(ChexmemError, match="must differ"):
        inject_duplicates(small_dataset, num_rows=1, copies=[2, 2])
    with pytest.raises(ChexmemError, match="cannot duplicate 15 rows"):
        inject_duplicates(small_dataset, num_rows=5, copies=[2, 3, 4])
