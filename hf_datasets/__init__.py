"""Chest X-ray datasets as Hugging Face datasets: CheXpert, image folders, and phantoms.

Every source gives a `datasets.DatasetDict` (train / validation / test, split by patient)
whose rows follow `hf_datasets.features.FEATURES`: image, prompt, the 14 CheXpert
observations, patient_id, study_id, view, sex, age, source_path and copies.
"""

from hf_datasets.chexpert import CheXpertConfig, load_chexpert
from hf_datasets.duplicates import inject_duplicates
from hf_datasets.errors import ChexmemError
from hf_datasets.features import FEATURES
from hf_datasets.folder import FolderConfig, load_image_folder
from hf_datasets.labels import OBSERVATIONS, UncertaintyPolicy
from hf_datasets.phantom import PhantomConfig, generate_phantom
from hf_datasets.prompts import PromptConfig, build_prompt
from hf_datasets.storage import export_parquet, load_dataset_dir, save_dataset

__all__ = [
    "FEATURES",
    "OBSERVATIONS",
    "CheXpertConfig",
    "ChexmemError",
    "FolderConfig",
    "PhantomConfig",
    "PromptConfig",
    "UncertaintyPolicy",
    "build_prompt",
    "export_parquet",
    "generate_phantom",
    "inject_duplicates",
    "load_chexpert",
    "load_dataset_dir",
    "load_image_folder",
    "save_dataset",
]
