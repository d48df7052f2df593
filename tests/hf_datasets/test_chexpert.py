"""CheXpert source on real label rows with images written at their paths."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pytest

from hf_datasets.chexpert import CheXpertConfig, load_chexpert, resolve_image_path
from hf_datasets.errors import ChexmemError
from hf_datasets.labels import OBSERVATIONS
from tests.helpers import assert_one_line_error, run_chexmem


def _all_rows(dataset) -> list[dict]:
    """Every row of every split, without decoding images."""
    return [row for part in dataset.values() for row in part.remove_columns("image")]


def test_every_column_parsed_from_real_rows(chexpert_root: Path, real_rows: pd.DataFrame) -> None:
    dataset = load_chexpert(CheXpertConfig(root=str(chexpert_root)))
    rows = {r["source_path"]: r for r in _all_rows(dataset)}
    assert len(rows) == len(real_rows) + 3
    first = rows["CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"]
    assert first["patient_id"] == "patient00001"
    assert first["study_id"] == "patient00001/study1"
    assert (first["sex"], first["age"], first["view"]) == ("F", 68, "AP")
    assert first["No Finding"] == 1.0 and first["Support Devices"] == 1.0
    assert first["Pneumothorax"] == 0.0 and first["Cardiomegaly"] is None
    assert first["prompt"] == (
        "Frontal AP chest radiograph of a 68-year-old woman. "
        "No acute cardiopulmonary abnormality. No pneumothorax. Support devices present."
    )
    second = rows["CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg"]
    assert second["Cardiomegaly"] == -1.0 and second["Lung Opacity"] == 1.0
    assert second["prompt"] == (
        "Frontal AP chest radiograph of an 87-year-old woman. Lung opacity and fracture. "
        "Possible cardiomegaly, edema, consolidation, atelectasis and pleural effusion."
    )
    lateral = rows["CheXpert-v1.0-small/train/patient00002/study1/view2_lateral.jpg"]
    assert lateral["view"] == "Lateral" and lateral["prompt"].startswith("Lateral chest radiograph")
    assert all(r["copies"] == 1 for r in rows.values())


def test_splits_are_disjoint_by_patient_and_deterministic(chexpert_root: Path) -> None:
    config = CheXpertConfig(root=str(chexpert_root), split_fractions=(0.6, 0.2, 0.2), seed=3)
    first, second = load_chexpert(config), load_chexpert(config)
    patients = {split: set(part["patient_id"]) for split, part in first.items()}
    assert all(patients[s] for s in ("train", "validation", "test"))
    assert not (patients["train"] & patients["validation"])
    assert not (patients["train"] & patients["test"])
    assert not (patients["validation"] & patients["test"])
    for split in first:
        assert first[split]["source_path"] == second[split]["source_path"]
    other = load_chexpert(
        CheXpertConfig(root=str(chexpert_root), split_fractions=(0.6, 0.2, 0.2), seed=4)
    )
    assert set(other["test"]["patient_id"]) != patients["test"]


@pytest.mark.parametrize(
    ("policy", "expected"), [("keep", -1.0), ("ones", 1.0), ("zeros", 0.0), ("ignore", None)]
)
def test_uncertainty_policies(chexpert_root: Path, policy: str, expected: float | None) -> None:
    dataset = load_chexpert(CheXpertConfig(root=str(chexpert_root), uncertainty=policy))
    rows = {r["source_path"]: r for r in _all_rows(dataset)}
    row = rows["CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg"]
    assert row["Cardiomegaly"] == expected
    assert row["Lung Opacity"] == 1.0


def test_frontal_only_counts_what_it_drops(chexpert_root: Path, real_rows: pd.DataFrame) -> None:
    dataset = load_chexpert(CheXpertConfig(root=str(chexpert_root), frontal_only=True))
    rows = _all_rows(dataset)
    lateral_train = int((real_rows["Frontal/Lateral"] == "Lateral").sum())
    assert all(r["view"] != "Lateral" for r in rows)
    assert len(rows) == len(real_rows) - lateral_train + 2
    description = dataset["train"].info.description
    assert (
        f"{lateral_train} row(s) left out: lateral view in train.csv (frontal_only)" in description
    )


def test_images_are_lazy_paths_or_resized_bytes(chexpert_root: Path) -> None:
    lazy = load_chexpert(CheXpertConfig(root=str(chexpert_root), max_rows=6))["train"]
    stored = lazy.data.column("image").to_pylist()[0]
    assert stored["bytes"] is None and Path(stored["path"]).is_file()
    assert lazy[0]["image"].size == (320, 384)
    small = load_chexpert(CheXpertConfig(root=str(chexpert_root), max_rows=6, resolution=64))[
        "train"
    ]
    stored = small.data.column("image").to_pylist()[0]
    assert stored["bytes"] is not None
    image = small[0]["image"]
    assert min(image.size) == 64 and image.mode == "L"


def test_max_rows_limits_and_is_recorded(chexpert_root: Path, real_rows: pd.DataFrame) -> None:
    dataset = load_chexpert(CheXpertConfig(root=str(chexpert_root), max_rows=10))
    assert sum(len(p) for p in dataset.values()) == 10
    assert (
        f"{len(real_rows) + 3 - 10} row(s) left out: beyond max_rows=10"
        in dataset["train"].info.description
    )


def test_corrupt_and_missing_images_are_counted_and_skipped(
    chexpert_root: Path, real_rows: pd.DataFrame, caplog: pytest.LogCaptureFixture
) -> None:
    paths = list(real_rows["Path"])
    (chexpert_root.parent / paths[0]).unlink()
    (chexpert_root.parent / paths[1]).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with caplog.at_level(logging.WARNING):
        dataset = load_chexpert(CheXpertConfig(root=str(chexpert_root)))
    assert sum(len(p) for p in dataset.values()) == len(real_rows) + 3 - 2
    description = dataset["train"].info.description
    assert "1 row(s) left out: missing image" in description
    assert "1 row(s) left out: corrupt image" in description
    assert "skipping 2 image(s)" in caplog.text
    with pytest.raises(ChexmemError, match="2 image\\(s\\) cannot be used"):
        load_chexpert(CheXpertConfig(root=str(chexpert_root), strict=True))


def test_truncated_jpeg_is_corrupt(chexpert_root: Path, real_rows: pd.DataFrame) -> None:
    target = chexpert_root.parent / real_rows["Path"][0]
    target.write_bytes(target.read_bytes()[:400])
    dataset = load_chexpert(CheXpertConfig(root=str(chexpert_root)))
    assert "1 row(s) left out: corrupt image" in dataset["train"].info.description


def test_unknown_label_value_names_the_line(chexpert_root: Path, real_rows: pd.DataFrame) -> None:
    frame = real_rows.copy()
    frame.loc[4, "Edema"] = "maybe"
    frame.to_csv(chexpert_root / "train.csv", index=False)
    with pytest.raises(ChexmemError, match=r"train.csv, line 6: column 'Edema' has 'maybe'"):
        load_chexpert(CheXpertConfig(root=str(chexpert_root)))
    frame.loc[4, "Edema"] = "2.0"
    frame.to_csv(chexpert_root / "train.csv", index=False)
    with pytest.raises(ChexmemError, match="line 6"):
        load_chexpert(CheXpertConfig(root=str(chexpert_root)))


def test_missing_columns_are_named(chexpert_root: Path, real_rows: pd.DataFrame) -> None:
    real_rows.drop(columns=["Edema", "AP/PA"]).to_csv(chexpert_root / "train.csv", index=False)
    with pytest.raises(ChexmemError, match="lacks required column\\(s\\): AP/PA, Edema"):
        load_chexpert(CheXpertConfig(root=str(chexpert_root)))


def test_missing_root_and_csv(tmp_path: Path) -> None:
    with pytest.raises(ChexmemError, match="does not exist"):
        load_chexpert(CheXpertConfig(root=str(tmp_path / "nowhere")))
    with pytest.raises(ChexmemError, match=r"no train\.csv or valid\.csv"):
        load_chexpert(CheXpertConfig(root=str(tmp_path)))


def test_root_above_the_download_finds_the_chexpert_folder(
    chexpert_root: Path, real_rows: pd.DataFrame, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="hf_datasets"):
        dataset = load_chexpert(CheXpertConfig(root=str(chexpert_root.parent)))
    assert sum(len(part) for part in dataset.values()) == len(real_rows) + 3
    assert f"using the CheXpert folder {chexpert_root}" in caplog.text


def test_root_with_several_chexpert_folders_names_them(chexpert_root: Path) -> None:
    other = chexpert_root.parent / "CheXpert-v1.0"
    other.mkdir()
    (other / "valid.csv").write_text((chexpert_root / "valid.csv").read_text())
    out = chexpert_root.parent / "out"
    result = run_chexmem("data", "chexpert", "--root", str(chexpert_root.parent), "--out", str(out))
    assert_one_line_error(result, "CheXpert-v1.0, CheXpert-v1.0-small", "point --root at one")
    assert not out.exists()


def test_official_valid_layout(chexpert_root: Path) -> None:
    dataset = load_chexpert(CheXpertConfig(root=str(chexpert_root), official_valid=True))
    assert sorted(set(dataset["validation"]["patient_id"])) == ["patient64541", "patient64542"]
    assert len(dataset["validation"]) == 3
    assert not set(dataset["train"]["patient_id"]) & set(dataset["test"]["patient_id"])
    assert all(v in (0.0, 1.0) for name in OBSERVATIONS for v in dataset["validation"][name])


def test_valid_csv_alone(chexpert_root: Path) -> None:
    (chexpert_root / "train.csv").unlink()
    dataset = load_chexpert(
        CheXpertConfig(root=str(chexpert_root), split_fractions=(1.0, 0.0, 0.0))
    )
    assert len(dataset["train"]) == 3 and len(dataset["validation"]) == 0


def test_path_resolution_ignores_local_folder_name(tmp_path: Path) -> None:
    renamed = tmp_path / "my-chexpert"
    assert resolve_image_path(
        renamed, "CheXpert-v1.0-small/train/patient1/study1/view1_frontal.jpg"
    ) == (renamed / "train/patient1/study1/view1_frontal.jpg")
    assert resolve_image_path(renamed, "train/p/s/v.jpg") == renamed / "train/p/s/v.jpg"
