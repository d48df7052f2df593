"""Any chest X-ray collection laid out as an image folder plus `metadata.csv`.

`metadata.csv` needs a `file_name` column (paths relative to the folder, or
to `image_dir` inside it; an `images/` subfolder is found by itself). When `root` itself has
no `metadata.csv`, its one subfolder that has one is used. Optional columns:
CheXpert observation names (any case, spaces or underscores) with 1 / 0 / -1 / blank values,
`prompt` or `text` (used verbatim), `report` (used verbatim unless `prompt_column` says
otherwise), `findings` (free text appended to a label-built prompt; parenthesised notes are
dropped), `view`, `sex`, `age`, `patient_id` and `study_id`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from datasets import DatasetDict

from hf_datasets.build import Exclusions, SourceOptions, assemble
from hf_datasets.errors import ChexmemError
from hf_datasets.features import make_row
from hf_datasets.labels import OBSERVATIONS, apply_policy, normalise_sex, parse_age, parse_label
from hf_datasets.locate import dataset_folder
from hf_datasets.prompts import build_prompt

logger = logging.getLogger(__name__)

PROMPT_COLUMNS: tuple[str, ...] = ("prompt", "text", "report")
PATIENT_COLUMNS: tuple[str, ...] = ("patient_id", "patient", "subject_id", "patient_key")


@dataclass(kw_only=True)
class FolderConfig(SourceOptions):
    """Options of the image-folder source; the flags of `chexmem data folder` share the names."""

    root: str
    metadata: str = "metadata.csv"
    image_dir: str | None = None
    prompt_column: str | None = None
    findings_column: str | None = "findings"
    patient_column: str | None = None


def _canonical(name: str) -> str:
    """Column name folded for matching: 'Pleural_Effusion' == 'pleural effusion'."""
    return re.sub(r"[\s_]+", " ", name).strip().lower()


def label_columns(columns: Sequence[str]) -> dict[str, str]:
    """Map CheXpert observation -> the metadata column holding it, for those present."""
    by_canonical = {_canonical(c): c for c in columns}
    return {
        obs: by_canonical[_canonical(obs)]
        for obs in OBSERVATIONS
        if _canonical(obs) in by_canonical
    }


def _pick_column(
    frame: pd.DataFrame, requested: str | None, candidates: Sequence[str], what: str
) -> str | None:
    """The requested column (which must exist) or the first candidate present."""
    if requested:
        if requested not in frame.columns:
            raise ChexmemError(
                f"metadata has no {what} column {requested!r}; columns: {', '.join(frame.columns)}"
            )
        return requested
    return next((c for c in candidates if c in frame.columns), None)


def _clean_findings(text: str) -> str:
    """Free-text findings as a sentence, without parenthesised notes."""
    text = re.sub(r"\s*\([^)]*\)", "", text).strip().rstrip(".")
    return f"{text}." if text else ""


def _image_root(root: Path, image_dir: str | None, file_names: pd.Series) -> Path:
    """Where file names are relative to: `image_dir`, else root, else root/images."""
    if image_dir is not None:
        return root / image_dir
    first = next((f for f in file_names if f), "")
    if first and not (root / first).exists() and (root / "images" / first).exists():
        logger.info("reading images from %s", root / "images")
        return root / "images"
    return root


def load_image_folder(config: FolderConfig) -> DatasetDict:
    """An image folder with `metadata.csv` as train / validation / test splits, by patient."""
    root = Path(config.root).expanduser()
    if not root.is_dir():
        raise ChexmemError(f"image folder {root} does not exist or is not a folder")
    root = dataset_folder(root, [config.metadata], "image")  # e.g. ROOT/images/metadata.csv
    meta_path = root / config.metadata
    if not meta_path.is_file():
        raise ChexmemError(
            f"no {config.metadata} in {root}: it must list file_name and optional labels"
        )
    try:
        frame = pd.read_csv(meta_path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as error:
        raise ChexmemError(f"cannot read {meta_path}: {error}") from None
    if "file_name" not in frame.columns:
        raise ChexmemError(f"{meta_path} lacks required column(s): file_name")
    if frame.empty:
        raise ChexmemError(
            f"{config.metadata} in {root} has no rows; add one row per image with columns "
            "file_name (relative to the folder) and optional labels, prompt, patient_id, "
            "view, sex, age"
        )
    policy = config.policy()
    prompt_column = _pick_column(frame, config.prompt_column, PROMPT_COLUMNS, "prompt")
    patient_column = _pick_column(frame, config.patient_column, PATIENT_COLUMNS, "patient")
    findings_column = config.findings_column if config.findings_column in frame.columns else None
    labels_of = label_columns(list(frame.columns))
    if patient_column is None:
        logger.warning(
            "%s has no patient column (%s): each image is treated as its own patient, so "
            "images of one patient may land in different splits",
            meta_path,
            ", ".join(PATIENT_COLUMNS),
        )

    image_root = _image_root(root, config.image_dir, frame["file_name"])
    rows = []
    for line, record in enumerate(frame.to_dict("records"), start=2):
        labels = {
            obs: apply_policy(parse_label(record[col], row=line, column=col), policy)
            for obs, col in labels_of.items()
        }
        view = (record.get("view") or record.get("AP/PA") or "").strip() or None
        sex, age = normalise_sex(record.get("sex")), parse_age(record.get("age", ""))
        file_name = record["file_name"]
        if prompt_column:
            prompt = record[prompt_column].strip()
        else:
            prompt = build_prompt(
                labels, view=view, sex=sex, age=age, key=file_name, config=config.prompts
            )
            if findings_column and record[findings_column].strip():
                prompt = f"{prompt} {_clean_findings(record[findings_column])}".strip()
        patient = record[patient_column].strip() if patient_column else ""
        rows.append(
            make_row(
                str(image_root / file_name),
                labels,
                prompt=prompt,
                patient_id=patient or Path(file_name).stem,
                study_id=(record.get("study_id") or "").strip() or Path(file_name).stem,
                view=view,
                sex=sex,
                age=age,
                source_path=file_name,
            )
        )

    description = (
        f"Image folder {root} ({config.metadata}, {len(frame)} rows); labels: "
        f"{', '.join(labels_of) or 'none'}; prompts from {prompt_column or 'labels'}; "
        f"patients from {patient_column or 'file names'}."
    )
    return assemble(rows, config, exclusions=Exclusions(), description=description)
