"""Small helpers several test files share (fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path

from diffusers import StableDiffusionPipeline


def load_plain(folder: Path) -> StableDiffusionPipeline:
    """A model as plain diffusers loads it, progress bars off."""
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe
