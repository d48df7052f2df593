"""CheXpert v1.0 / CheXpert-v1.0-small as a `DatasetDict` with patient-level splits.

Point `root` at the folder that holds `train.csv` and/or `valid.csv` (e.g.
`CheXpert-v1.0-small/`), or at the folder above it that holds only that one. Image paths in
the CSV start with the dataset's folder name
(`CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg`); they are resolved
against that folder, whatever it is called locally.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from datasets import DatasetDict

from hf_datasets.build import Exclusions, SourceOptions, assemble, split_by_patient
from hf_datasets.errors import ChexmemError
from hf_datasets.features import make_row
from hf_datasets.labels import (
    OBSERVATIONS,
    UncertaintyPolicy,
    apply_policy,
    normalise_sex,
    parse_age,
)
from hf_datasets.locate import dataset_folder
from hf_datasets.prompts import build_prompt

logger = logging.getLogger(__name__)

META_COLUMNS: tuple[str, ...] = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA")
REQUIRED_COLUMNS: tuple[str, ...] = META_COLUMNS + OBSERVATIONS
PATH_PATTERN = re.compile(r"(patient\d+)/(study\d+)/(view\d+)_(frontal|lateral)", re.IGNORECASE)
CSV_FILES: tuple[str, ...] = ("train.csv", "valid.csv")


@dataclass(kw_only=True)
class CheXpertConfig(SourceOptions):
    """Options of the CheXpert source; the CLI flags of `chexmem data chexpert` share the names."""

    root: str
    frontal_only: bool = False
    official_valid: bool = False


def read_label_csv(path: Path) -> pd.DataFrame:
    """A CheXpert label CSV with parsed labels; row numbers are 1-based file lines."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as error:
        raise ChexmemError(f"cannot read {path}: {error}") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise ChexmemError(f"{path} lacks required column(s): {', '.join(missing)}")
    frame.index = pd.RangeIndex(2, len(frame) + 2, name="line")  # line 1 is the header
    for name in OBSERVATIONS:
        frame[name] = _parse_label_column(frame[name], name, path)
    return frame


def _parse_label_column(column: pd.Series, name: str, path: Path) -> pd.Series:
    """Labels as float (1.0 / 0.0 / -1.0, NaN for blank); anything else is an error."""
    text = column.str.strip()
    numbers = pd.to_numeric(text, errors="coerce")
    bad = (numbers.isna() & (text != "")) | (numbers.notna() & ~numbers.isin([1.0, 0.0, -1.0]))
    if bad.any():
        line = int(bad.idxmax())
        raise ChexmemError(
            f"{path}, line {line}: column {name!r} has {column[line]!r}; "
            "expected 1.0, 0.0, -1.0 or blank"
        )
    return numbers.astype(float)


def resolve_image_path(root: Path, csv_path: str) -> Path:
    """Where a CSV `Path` lives under `root`: the leading dataset folder name is dropped."""
    parts = Path(csv_path).parts
    if parts and (parts[0] == root.name or parts[0].lower().startswith("chexpert")):
        parts = parts[1:]
    return root.joinpath(*parts)


def frame_to_rows(
    frame: pd.DataFrame, root: Path, config: CheXpertConfig, policy: UncertaintyPolicy
) -> list[dict[str, Any]]:
    """Rows in the shared schema (image = resolved path) from a parsed label frame."""
    rows = []
    labels_array = frame[list(OBSERVATIONS)].to_numpy()
    records = frame[list(META_COLUMNS)].to_dict("records")
    for line, record, label_values in zip(frame.index, records, labels_array, strict=True):
        match = PATH_PATTERN.search(record["Path"])
        if match is None:
            raise ChexmemError(
                f"line {line}: cannot read patient and study from Path {record['Path']!r} "
                "(expected .../patientNNNNN/studyN/viewN_frontal.jpg)"
            )
        patient, study = match.group(1), match.group(2)
        frontal = record["Frontal/Lateral"].strip().lower() == "frontal"
        view = (record["AP/PA"].strip() or None) if frontal else "Lateral"
        labels = {
            name: apply_policy(None if np.isnan(v) else float(v), policy)
            for name, v in zip(OBSERVATIONS, label_values, strict=True)
        }
        sex = normalise_sex(record["Sex"])
        age = parse_age(record["Age"])
        key = record["Path"]
        rows.append(
            make_row(
                str(resolve_image_path(root, record["Path"])),
                labels,
                prompt=build_prompt(
                    labels, view=view, sex=sex, age=age, key=key, config=config.prompts
                ),
                patient_id=patient,
                study_id=f"{patient}/{study}",
                view=view,
                sex=sex,
                age=age,
                source_path=record["Path"],
            )
        )
    return rows


def load_chexpert(config: CheXpertConfig) -> DatasetDict:
    """CheXpert as train / validation / test splits, disjoint by patient."""
    root = Path(config.root).expanduser()
    if not root.is_dir():
        raise ChexmemError(f"CheXpert root {root} does not exist or is not a folder")
    root = dataset_folder(root, CSV_FILES, "CheXpert")  # the folder the download unpacks to
    csvs = {name: root / name for name in CSV_FILES if (root / name).is_file()}
    if not csvs:
        raise ChexmemError(
            f"no train.csv or valid.csv in {root}: point --root at the CheXpert folder"
        )
    if config.official_valid and "valid.csv" not in csvs:
        raise ChexmemError(f"--official_valid needs {root / 'valid.csv'}, which does not exist")
    policy = config.policy()

    exclusions = Exclusions()
    rows = []
    for name, path in csvs.items():
        frame = read_label_csv(path)
        if config.frontal_only:
            lateral = frame["Frontal/Lateral"].str.strip().str.lower() != "frontal"
            exclusions.add(f"lateral view in {name} (frontal_only)", n=int(lateral.sum()))
            frame = frame[~lateral]
        unknown_age = int(frame["Age"].str.strip().isin(["0", "0.0", ""]).sum())
        if unknown_age:
            logger.info("%s: %d row(s) with age 0 or blank: age set to unknown", name, unknown_age)
        rows += frame_to_rows(frame, root, config, policy)
        logger.info("%s: %d rows", name, len(frame))
    description = (
        f"CheXpert from {root} ({', '.join(csvs)}); frontal_only={config.frontal_only}; "
        f"official_valid={config.official_valid}."
    )
    splitter = None
    if config.official_valid:
        splitter = partial(
            _official_valid_split, fractions=config.split_fractions, seed=config.seed
        )
    return assemble(rows, config, exclusions=exclusions, description=description, splitter=splitter)


def _official_valid_split(
    rows: list[dict[str, Any]], fractions: Sequence[float], seed: int
) -> dict[str, list[dict[str, Any]]]:
    """valid.csv as the validation split; train.csv patients split into train and test."""
    official = [r for r in rows if "/valid/" in r["source_path"]]
    others = [r for r in rows if "/valid/" not in r["source_path"]]
    kept = fractions[0] + fractions[2]
    by_split = split_by_patient(others, (fractions[0] / kept, 0.0, fractions[2] / kept), seed)
    by_split["validation"] = official
    return by_split
