"""Image folder + metadata.csv source, on a synthetic folder and on the real open-cxr set."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from hf_datasets.errors import ChexmemError
from hf_datasets.folder import FolderConfig, load_image_folder
from tests.conftest import OPEN_CXR, needs
from tests.hf_datasets.conftest import write_folder


def test_labels_in_any_spelling_become_prompts(tmp_path: Path) -> None:
    dataset = load_image_folder(FolderConfig(root=str(write_folder(tmp_path))))
    rows = {r["source_path"]: r for part in dataset.values() for r in part.remove_columns("image")}
    assert len(rows) == 24
    row = rows["img/000.png"]
    assert row["Cardiomegaly"] == 1.0 and row["Pleural Effusion"] == -1.0 and row["Edema"] is None
    assert row["prompt"] == (
        "Frontal PA chest radiograph of a 30-year-old man. Cardiomegaly. Possible pleural effusion."
    )
    assert rows["img/001.png"]["prompt"].endswith("No pleural effusion.")


def test_prompt_column_is_used_verbatim(tmp_path: Path) -> None:
    root = write_folder(tmp_path, extra={"report": "Heart size is normal. Lungs are clear."})
    dataset = load_image_folder(FolderConfig(root=str(root)))
    assert set(dataset["train"]["prompt"]) == {"Heart size is normal. Lungs are clear."}


def test_without_patient_column_each_image_is_a_patient(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = write_folder(tmp_path)
    frame = pd.read_csv(root / "metadata.csv").drop(columns="patient_id")
    frame.to_csv(root / "metadata.csv", index=False)
    dataset = load_image_folder(FolderConfig(root=str(root)))
    assert "has no patient column" in caplog.text
    assert sum(len(set(p["patient_id"])) for p in dataset.values()) == 24


def test_bad_folder_input(tmp_path: Path) -> None:
    with pytest.raises(ChexmemError, match="does not exist"):
        load_image_folder(FolderConfig(root=str(tmp_path / "missing")))
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(ChexmemError, match=r"no metadata\.csv"):
        load_image_folder(FolderConfig(root=str(tmp_path / "empty")))
    root = write_folder(tmp_path / "nofile")
    pd.read_csv(root / "metadata.csv").rename(columns={"file_name": "image"}).to_csv(
        root / "metadata.csv", index=False
    )
    with pytest.raises(ChexmemError, match="lacks required column\\(s\\): file_name"):
        load_image_folder(FolderConfig(root=str(root)))
    root = write_folder(tmp_path / "badlabel")
    frame = pd.read_csv(root / "metadata.csv", dtype=str, keep_default_na=False)
    frame.loc[5, "cardiomegaly"] = "big"
    frame.to_csv(root / "metadata.csv", index=False)
    with pytest.raises(ChexmemError, match="row 7: column 'cardiomegaly'"):
        load_image_folder(FolderConfig(root=str(root)))
    with pytest.raises(ChexmemError, match="no patient column 'subject'"):
        load_image_folder(
            FolderConfig(root=str(write_folder(tmp_path / "p")), patient_column="subject")
        )


@needs(OPEN_CXR)
def test_open_cxr() -> None:
    dataset = load_image_folder(FolderConfig(root=str(OPEN_CXR), resolution=64, seed=0))
    rows = [r for part in dataset.values() for r in part]
    assert len(rows) == 208
    assert len({r["patient_id"] for r in rows}) == 62
    patients = {s: set(p["patient_id"]) for s, p in dataset.items()}
    assert (
        not patients["train"] & patients["test"] and not patients["train"] & patients["validation"]
    )
    first = next(r for r in rows if r["source_path"] == "cxr_00002.png")
    assert first["prompt"] == "Frontal AP chest radiograph of a man. COVID-19."
    assert first["image"].size == (64, 64) and first["image"].mode == "L"
    assert {r["view"] for r in rows} == {"AP", "PA"}
