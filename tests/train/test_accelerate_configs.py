"""The shipped accelerate launch configs parse with accelerate's own loader."""

from __future__ import annotations

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

REPO = Path(__file__).resolve().parents[2]
LAUNCH_CONFIGS = sorted((REPO / "configs" / "accelerate").glob("*.yaml"))
CONFIGS = [REPO / "accelerate_config.yaml", *LAUNCH_CONFIGS]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads(path: Path) -> None:
    config = load_config_from_file(str(path))
    assert config.mixed_precision == "bf16"
    assert config.num_processes >= 1


def test_all_kinds_are_shipped() -> None:
    kinds = {load_config_from_file(str(p)).distributed_type.value for p in CONFIGS}
    assert kinds == {"NO", "MULTI_GPU", "FSDP", "DEEPSPEED"}
