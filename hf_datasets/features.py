"""The row schema every chexmem dataset shares, whatever its source."""

from __future__ import annotations

from typing import Any

from datasets import Features, Image, Value

from hf_datasets.labels import OBSERVATIONS

FEATURES = Features(
    {
        "image": Image(),
        "prompt": Value("string"),
        **{name: Value("float32") for name in OBSERVATIONS},
        "patient_id": Value("string"),
        "study_id": Value("string"),
        "view": Value("string"),
        "sex": Value("string"),
        "age": Value("int32"),
        "source_path": Value("string"),
        "copies": Value("int32"),
    }
)

SPLITS: tuple[str, ...] = ("train", "validation", "test")


def make_row(
    image: Any,
    labels: dict[str, float | None],
    *,
    prompt: str,
    patient_id: str,
    study_id: str,
    view: str | None,
    sex: str | None,
    age: int | None,
    source_path: str,
) -> dict[str, Any]:
    """A row in the shared schema; observations missing from `labels` are None."""
    return {
        "image": image,
        "prompt": prompt,
        **{name: labels.get(name) for name in OBSERVATIONS},
        "patient_id": patient_id,
        "study_id": study_id,
        "view": view,
        "sex": sex,
        "age": age,
        "source_path": source_path,
        "copies": 1,
    }
