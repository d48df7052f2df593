"""Image folder + metadata.csv source, on a synthetic folder and on the real open-cxr set."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pytest

from hf_datasets.errors import ChexmemError
from hf_datasets.folder import FolderConfig, load_image_folder
from hf_datasets.summary import summarize
from tests.conftest import OPEN_CXR, needs
from tests.helpers import assert_one_line_error, run_chexmem
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


def test_metadata_one_level_down_is_found(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    inner = write_folder(tmp_path / "download" / "images")
    with caplog.at_level(logging.INFO, logger="hf_datasets"):
        dataset = load_image_folder(FolderConfig(root=str(tmp_path / "download")))
    assert sum(len(part) for part in dataset.values()) == 24
    assert f"using the image folder {inner}" in caplog.text
    write_folder(tmp_path / "download" / "more", n=4)
    out = tmp_path / "out"
    result = run_chexmem("data", "folder", "--root", str(tmp_path / "download"), "--out", str(out))
    assert_one_line_error(result, "several image folders (images, more)", "point --root at one")
    assert not out.exists()


def test_metadata_with_only_a_header_says_to_add_rows(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "empty")
    header = (root / "metadata.csv").read_text().splitlines()[0]
    (root / "metadata.csv").write_text(header + "\n")
    out = tmp_path / "out"
    result = run_chexmem("data", "folder", "--root", str(root), "--out", str(out))
    line = assert_one_line_error(result, f"metadata.csv in {root} has no rows", "add one row per")
    assert "file_name" in line and "e.g." not in line
    assert not out.exists()


def test_nothing_left_without_examples_has_no_empty_example_tail(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "f")
    with pytest.raises(ChexmemError, match="beyond max_rows=0") as error:
        load_image_folder(FolderConfig(root=str(root), max_rows=0))
    assert "e.g." not in str(error.value) and "No rows were left out" not in str(error.value)


def test_summary_of_a_folder_without_labels_says_so(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "nolabels")
    frame = pd.read_csv(root / "metadata.csv", dtype=str, keep_default_na=False)
    frame.drop(columns=["cardiomegaly", "pleural_effusion"]).to_csv(
        root / "metadata.csv", index=False
    )
    text = summarize(load_image_folder(FolderConfig(root=str(root))))
    assert "no CheXpert labels" in text and "0%" not in text
    labelled = summarize(load_image_folder(FolderConfig(root=str(write_folder(tmp_path / "l")))))
    assert "most common in train: Cardiomegaly" in labelled and "No Finding" not in labelled
