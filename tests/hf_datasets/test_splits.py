"""Patient-level split assignment."""

from __future__ import annotations

import pytest

from hf_datasets.errors import ChexmemError
from hf_datasets.splits import split_patients


def test_every_patient_in_exactly_one_split_with_expected_sizes() -> None:
    ids = [f"p{i}" for i in range(100)]
    assignment = split_patients(ids * 3, (0.8, 0.1, 0.1), seed=0)
    assert set(assignment) == set(ids)
    sizes = {
        s: sum(1 for v in assignment.values() if v == s) for s in ("train", "validation", "test")
    }
    assert sizes == {"train": 80, "validation": 10, "test": 10}


def test_independent_of_row_order_and_seeded() -> None:
    ids = [f"p{i}" for i in range(50)]
    assert split_patients(ids, (0.6, 0.2, 0.2), 1) == split_patients(ids[::-1], (0.6, 0.2, 0.2), 1)
    assert split_patients(ids, (0.6, 0.2, 0.2), 1) != split_patients(ids, (0.6, 0.2, 0.2), 2)


def test_small_sets_still_fill_every_requested_split() -> None:
    assignment = split_patients(["a", "b", "c", "d"], (0.8, 0.1, 0.1), seed=0)
    assert sorted(assignment.values()).count("train") == 2
    assert set(assignment.values()) == {"train", "validation", "test"}


@pytest.mark.parametrize("fractions", [(0.5, 0.5), (0.8, 0.3, 0.1), (-0.1, 0.6, 0.5)])
def test_bad_fractions(fractions: tuple[float, ...]) -> None:
    with pytest.raises(ChexmemError, match="split fractions"):
        split_patients(["a", "b"], fractions, 0)
