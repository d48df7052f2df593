"""Shared test set-up: offline, one thread, isolated caches, and the shared real data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CHEXPERT_CSV = SHARED_DATA / "chexpert_train.csv.gz"
OPEN_CXR = SHARED_DATA / "open-cxr"


@pytest.fixture(autouse=True, scope="session")
def _isolated_hf_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep the datasets cache of a test run out of the user's home."""
    cache = tmp_path_factory.mktemp("hf_cache")
    os.environ["HF_DATASETS_CACHE"] = str(cache / "datasets")
    os.environ["HF_HOME"] = str(cache / "home")
    import datasets.config

    datasets.config.HF_DATASETS_CACHE = Path(os.environ["HF_DATASETS_CACHE"])


def needs(path: Path) -> pytest.MarkDecorator:
    """Skip a test cleanly when shared data is absent."""
    return pytest.mark.skipif(not path.exists(), reason=f"{path} is not present")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD pipeline folder made by chexmem's own builder (few VAE steps, for speed)."""
    from train.tiny_model import TinyModelConfig, build_tiny_pipeline

    out = tmp_path_factory.mktemp("models") / "tiny"
    return build_tiny_pipeline(out, TinyModelConfig(vae_train_steps=10), progress=False)


@pytest.fixture(scope="session")
def phantom_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Phantom data at 64 px (16 patients) with 2 rows repeated 4 times, saved to disk."""
    from hf_datasets.duplicates import inject_duplicates
    from hf_datasets.phantom import PhantomConfig, generate_phantom
    from hf_datasets.storage import save_dataset

    dataset = generate_phantom(PhantomConfig(num_patients=16, resolution=64, seed=0))
    dataset = inject_duplicates(dataset, num_rows=2, copies=4, seed=0)
    return save_dataset(dataset, tmp_path_factory.mktemp("data") / "phantom")


@pytest.fixture()
def base_args(tiny_model: Path, phantom_data: Path, tmp_path: Path) -> dict:
    """TrainConfig options for a fast run (override per test)."""
    return {
        "pretrained_model_name_or_path": str(tiny_model),
        "train_data_dir": str(phantom_data),
        "output_dir": str(tmp_path / "out"),
        "train_batch_size": 4,
        "max_train_steps": 6,
        "checkpointing_steps": 3,
        "logging_steps": 1,
        "report_to": "jsonl",
        "learning_rate": 1e-3,
    }
