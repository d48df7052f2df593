"""The phantom dataset: deterministic, patient-level splits, labels and prompts per study."""

from __future__ import annotations

import numpy as np

from hf_datasets.label_stats import LabelSampler
from hf_datasets.labels import OBSERVATIONS
from hf_datasets.phantom import PhantomConfig, generate_phantom, patient_studies


def test_deterministic_and_independent_of_patient_count() -> None:
    small = generate_phantom(PhantomConfig(num_patients=6, resolution=64, seed=3))
    sampler = LabelSampler()
    rows = {r["source_path"]: r for part in small.values() for r in part}
    for index in (0, 5):
        again = patient_studies(
            index, PhantomConfig(num_patients=50, resolution=64, seed=3), sampler
        )
        for row in again:
            stored = rows[row["source_path"]]
            assert np.array_equal(np.asarray(stored["image"]), row["image"])
            assert stored["prompt"] == row["prompt"]
    other = patient_studies(0, PhantomConfig(resolution=64, seed=4), sampler)
    assert not np.array_equal(other[0]["image"], next(iter(rows.values()))["image"])


def test_splits_by_patient_with_several_studies() -> None:
    dataset = generate_phantom(PhantomConfig(num_patients=30, resolution=64, seed=0))
    patients = {s: set(p["patient_id"]) for s, p in dataset.items()}
    assert (
        len(patients["train"]) == 24
        and len(patients["validation"]) == 3
        and len(patients["test"]) == 3
    )
    assert not patients["train"] & (patients["validation"] | patients["test"])
    train = dataset["train"]
    studies_per_patient = [
        len({s for s, p in zip(train["study_id"], train["patient_id"], strict=True) if p == pid})
        for pid in patients["train"]
    ]
    assert max(studies_per_patient) > 1
    row = train[0]
    assert row["image"].size == (64, 64) and row["image"].mode == "L"
    assert row["view"] in ("AP", "PA") and row["sex"] in ("F", "M") and 18 <= row["age"] <= 90
    assert row["prompt"].startswith(f"Frontal {row['view']} chest radiograph of a")
    assert set(row) >= set(OBSERVATIONS)
    assert "labels follow CheXpert" in train.info.description


def test_labels_and_prompts_agree() -> None:
    dataset = generate_phantom(PhantomConfig(num_patients=20, resolution=64, seed=1))
    for row in dataset["train"].remove_columns("image"):
        if row["Cardiomegaly"] == 1.0:
            assert "cardiomegaly" in row["prompt"].lower()
        if row["No Finding"] == 1.0:
            assert "No acute cardiopulmonary abnormality." in row["prompt"]
