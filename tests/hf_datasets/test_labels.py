"""Label parsing, uncertainty policies and metadata normalisation."""

from __future__ import annotations

import math

import pytest

from hf_datasets.errors import ChexmemError
from hf_datasets.labels import (
    UncertaintyPolicy,
    apply_policy,
    normalise_sex,
    parse_age,
    parse_label,
)


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("1.0", 1.0),
        ("1", 1.0),
        (" 0.0 ", 0.0),
        ("-1", -1.0),
        ("", None),
        (math.nan, None),
        (None, None),
        (-1.0, -1.0),
    ],
)
def test_parse_label(raw: object, value: float | None) -> None:
    assert parse_label(raw, row=2, column="Edema") == value


@pytest.mark.parametrize("raw", ["yes", "2", "0.5"])
def test_parse_label_rejects_with_row_and_column(raw: str) -> None:
    with pytest.raises(ChexmemError, match="row 7: column 'Edema'"):
        parse_label(raw, row=7, column="Edema")


def test_policies() -> None:
    assert apply_policy(-1.0, UncertaintyPolicy.KEEP) == -1.0
    assert apply_policy(-1.0, UncertaintyPolicy.ONES) == 1.0
    assert apply_policy(-1.0, UncertaintyPolicy.ZEROS) == 0.0
    assert apply_policy(-1.0, UncertaintyPolicy.IGNORE) is None
    for policy in UncertaintyPolicy:
        assert apply_policy(1.0, policy) == 1.0
        assert apply_policy(0.0, policy) == 0.0
        assert apply_policy(None, policy) is None


def test_metadata_normalisation() -> None:
    assert [normalise_sex(s) for s in ("Female", "M", "male", "Unknown", None, "")] == [
        "F",
        "M",
        "M",
        None,
        None,
        None,
    ]
    assert [parse_age(a) for a in ("68", "0", "", "n/a", 41.0, "72.5")] == [
        68,
        None,
        None,
        None,
        41,
        72,
    ]
