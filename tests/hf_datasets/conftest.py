"""Fixtures: a CheXpert-like folder holding REAL label rows with images written at their paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.conftest import CHEXPERT_CSV, OPEN_CXR

NUM_PATIENTS = 14


def _source_images() -> list[Image.Image]:
    """Real radiographs from open-cxr when present, else smooth random grayscale images."""
    if (OPEN_CXR / "images").is_dir():
        paths = sorted((OPEN_CXR / "images").glob("*.png"))[:24]
        return [Image.open(p).convert("L") for p in paths]
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).resize((256, 256))
        for _ in range(8)
    ]


def write_images(root: Path, paths: list[str]) -> None:
    """Write a JPEG at each CSV path (non-square, like CheXpert-small) under root's parent."""
    sources = _source_images()
    for i, rel in enumerate(paths):
        target = root.parent / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        sources[i % len(sources)].resize((320, 384)).save(target, quality=90)


@pytest.fixture(scope="session")
def real_rows() -> pd.DataFrame:
    """Rows of the real CheXpert training file for the first patients (skip if absent)."""
    if not CHEXPERT_CSV.exists():
        pytest.skip(f"{CHEXPERT_CSV} is not present")
    frame = pd.read_csv(CHEXPERT_CSV, dtype=str, keep_default_na=False, nrows=200)
    patients = frame["Path"].str.extract(r"(patient\d+)")[0]
    keep = patients.isin(sorted(set(patients))[:NUM_PATIENTS])
    return frame[keep].reset_index(drop=True)


@pytest.fixture()
def chexpert_root(tmp_path: Path, real_rows: pd.DataFrame) -> Path:
    """CheXpert-v1.0-small/ with train.csv (real rows) and valid.csv, images at their paths."""
    root = tmp_path / "CheXpert-v1.0-small"
    root.mkdir()
    real_rows.to_csv(root / "train.csv", index=False)
    valid = real_rows.head(3).copy()
    valid["Path"] = [
        "CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg",
        "CheXpert-v1.0-small/valid/patient64542/study1/view1_frontal.jpg",
        "CheXpert-v1.0-small/valid/patient64542/study1/view2_lateral.jpg",
    ]
    valid["Frontal/Lateral"] = ["Frontal", "Frontal", "Lateral"]
    valid["AP/PA"] = ["AP", "PA", ""]
    obs = list(valid.columns[5:])
    valid[obs] = valid[obs].replace({"": "0.0", "-1.0": "1.0"})  # valid.csv has no blanks or -1
    valid.to_csv(root / "valid.csv", index=False)
    write_images(root, list(real_rows["Path"]) + list(valid["Path"]))
    return root


def write_folder(root: Path, n: int = 24, patients: int = 8, extra: dict | None = None) -> Path:
    """An image folder with metadata.csv: snake_case label columns, sex, age, patient ids."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    records = []
    for i in range(n):
        name = f"img/{i:03d}.png"
        (root / "img").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (48, 40), dtype=np.uint8)).save(root / name)
        records.append(
            {
                "file_name": name,
                "patient_id": f"pt{i % patients}",
                "sex": "F" if i % 2 else "M",
                "age": str(30 + i),
                "view": "PA",
                "cardiomegaly": "1" if i % 3 == 0 else "",
                "pleural_effusion": "-1" if i % 4 == 0 else "0",
                **(extra or {}),
            }
        )
    pd.DataFrame(records).to_csv(root / "metadata.csv", index=False)
    return root


@pytest.fixture()
def small_dataset(tmp_path: Path):
    """A DatasetDict from a small synthetic image folder (24 rows, 8 patients)."""
    from hf_datasets.folder import FolderConfig, load_image_folder

    return load_image_folder(
        FolderConfig(root=str(write_folder(tmp_path / "folder")), split_fractions=(0.5, 0.25, 0.25))
    )
