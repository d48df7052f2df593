"""The built-in phantom chest X-ray dataset: the embedded default's data, made offline.

Each synthetic patient has its own anatomy, sex and age, and one or more studies; each
study's labels are drawn to follow the label co-occurrence of CheXpert's training file
(`label_stats`), and the findings are drawn visibly into the radiograph (`phantom_render`).
Everything is a pure function of the seed: patient p always looks the same, whatever the
number of patients or processes.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict
from PIL import Image

from hf_datasets import label_stats, phantom_render, prompts
from hf_datasets.build import Exclusions, source_fingerprint
from hf_datasets.errors import ChexmemError
from hf_datasets.features import FEATURES, SPLITS, make_row
from hf_datasets.images import png_bytes
from hf_datasets.label_stats import LabelSampler
from hf_datasets.phantom_render import render, sample_anatomy, vary_study
from hf_datasets.prompts import PromptConfig, build_prompt
from hf_datasets.splits import check_fractions, split_patients


@dataclass(kw_only=True)
class PhantomConfig:
    """Options of the phantom source; the flags of `chexmem data phantom` share the names."""

    num_patients: int = 200
    max_studies_per_patient: int = 3
    resolution: int = 128
    seed: int = 0
    split_fractions: Sequence[float] = (0.8, 0.1, 0.1)
    num_workers: int = 1
    prompts: PromptConfig = field(default_factory=PromptConfig)

    def __post_init__(self) -> None:
        if self.num_patients < 1 or self.max_studies_per_patient < 1:
            raise ChexmemError("num_patients and max_studies_per_patient must be at least 1")
        if not 32 <= self.resolution <= 1024:
            raise ChexmemError(
                f"phantom resolution must be between 32 and 1024, not {self.resolution}"
            )


def patient_id(index: int) -> str:
    """'phantom00042' for patient 42."""
    return f"phantom{index:05d}"


def patient_studies(
    index: int, config: PhantomConfig, sampler: LabelSampler
) -> list[dict[str, Any]]:
    """All studies of one synthetic patient as rows (image as a uint8 array)."""
    rng = np.random.default_rng([config.seed, index])
    sex, age = sampler.sex(rng), sampler.age(rng)
    anatomy = sample_anatomy(rng, sex=sex, age=age)
    rows = []
    for study in range(1, sampler.num_studies(rng, config.max_studies_per_patient) + 1):
        labels = sampler.labels(rng)
        view = sampler.view(rng)
        study_age = min(90, age + study - 1)
        pixels = render(vary_study(anatomy, rng), labels, view, config.resolution, rng)
        pid = patient_id(index)
        path = f"phantom/{pid}/study{study}/view1_frontal.png"
        rows.append(
            make_row(
                pixels,
                labels,
                prompt=build_prompt(
                    labels, view=view, sex=sex, age=study_age, key=path, config=config.prompts
                ),
                patient_id=pid,
                study_id=f"{pid}/study{study}",
                view=view,
                sex=sex,
                age=study_age,
                source_path=path,
            )
        )
    return rows


def _generate(patients: list[int], config: PhantomConfig, code: str) -> Iterator[dict[str, Any]]:
    """Rows of the given patients with PNG-encoded images."""
    sampler = LabelSampler()
    for index in patients:
        for row in patient_studies(index, config, sampler):
            yield {
                **row,
                "image": {"bytes": png_bytes(Image.fromarray(row["image"])), "path": None},
            }


def generate_phantom(config: PhantomConfig | None = None) -> DatasetDict:
    """Phantom chest radiographs as train / validation / test splits, disjoint by patient."""
    config = config or PhantomConfig()
    fractions = check_fractions(config.split_fractions)
    ids = {patient_id(i): i for i in range(config.num_patients)}
    assignment = split_patients(list(ids), fractions, config.seed)
    code = source_fingerprint(sys.modules[__name__], phantom_render, label_stats, prompts)
    splits = {}
    for split in SPLITS:
        patients = [i for pid, i in ids.items() if assignment[pid] == split]
        if not patients:
            continue
        splits[split] = Dataset.from_generator(
            _generate,
            gen_kwargs={"patients": patients, "config": config, "code": code},
            features=FEATURES,
            split=split,
            num_proc=config.num_workers if config.num_workers > 1 and len(patients) > 1 else None,
        )
    description = (
        f"chexmem phantom chest radiographs: {config.num_patients} synthetic patients, "
        f"up to {config.max_studies_per_patient} studies each, {config.resolution} px, "
        f"seed {config.seed}; labels follow CheXpert train.csv co-occurrence; split "
        f"fractions {list(fractions)} by patient; prompt style {config.prompts.style}.\n"
        f"{Exclusions().describe()}"
    )
    for dataset in splits.values():
        dataset.info.description = description
    return DatasetDict(splits)
