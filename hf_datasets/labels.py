"""CheXpert observations, label values and uncertainty policies."""

from __future__ import annotations

import math
from enum import Enum

from hf_datasets.errors import ChexmemError

OBSERVATIONS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)

POSITIVE, NEGATIVE, UNCERTAIN = 1.0, 0.0, -1.0


class UncertaintyPolicy(str, Enum):
    """What to do with uncertain (-1) labels (Irvin et al. 2019)."""

    KEEP = "keep"  # leave -1 in place; prompts say "possible ..."
    ONES = "ones"  # U-Ones: uncertain -> positive
    ZEROS = "zeros"  # U-Zeros: uncertain -> negative
    IGNORE = "ignore"  # U-Ignore: uncertain -> missing (None), masked out downstream


def parse_label(value: object, *, row: int, column: str) -> float | None:
    """One CheXpert cell as 1.0 / 0.0 / -1.0, or None when blank (not mentioned)."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text == "":
            return None
        try:
            value = float(text)
        except ValueError:
            raise ChexmemError(
                f"row {row}: column {column!r} has {text!r}; expected 1.0, 0.0, -1.0 or blank"
            ) from None
    number = float(value)  # type: ignore[arg-type]
    if math.isnan(number):
        return None
    if number not in (POSITIVE, NEGATIVE, UNCERTAIN):
        raise ChexmemError(
            f"row {row}: column {column!r} has {value!r}; expected 1.0, 0.0, -1.0 or blank"
        )
    return number


def apply_policy(value: float | None, policy: UncertaintyPolicy) -> float | None:
    """Map an uncertain label according to the policy; other values pass through."""
    if value != UNCERTAIN or policy is UncertaintyPolicy.KEEP:
        return value
    if policy is UncertaintyPolicy.ONES:
        return POSITIVE
    if policy is UncertaintyPolicy.ZEROS:
        return NEGATIVE
    return None


def normalise_sex(value: object) -> str | None:
    """'F', 'M' or None from the spellings found in chest X-ray metadata."""
    text = str(value).strip().lower() if value is not None else ""
    if text in ("f", "female", "woman", "w"):
        return "F"
    if text in ("m", "male", "man"):
        return "M"
    return None


def parse_age(value: object) -> int | None:
    """Age in whole years, or None when blank, not a number, or not above 0."""
    try:
        age = float(str(value).strip())
    except ValueError:
        return None
    if math.isnan(age) or age <= 0:
        return None
    return int(age)
