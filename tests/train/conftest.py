"""Fixtures: fast training options (the tiny model and phantom data are in tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


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
