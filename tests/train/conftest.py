"""Fixtures: the real tiny base model (built once, short VAE training) and phantom data."""

from __future__ import annotations

from pathlib import Path

import pytest

from hf_datasets.duplicates import inject_duplicates
from hf_datasets.phantom import PhantomConfig, generate_phantom
from hf_datasets.storage import save_dataset


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD pipeline folder made by chexmem's own builder (few VAE steps, for speed)."""
    from train.tiny_model import TinyModelConfig, build_tiny_pipeline

    out = tmp_path_factory.mktemp("models") / "tiny"
    return build_tiny_pipeline(out, TinyModelConfig(vae_train_steps=10), progress=False)


@pytest.fixture(scope="session")
def phantom_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Phantom data at 64 px (16 patients) with 2 rows repeated 4 times, saved to disk."""
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
