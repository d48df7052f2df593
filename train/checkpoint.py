"""Checkpoints that are complete or absent: written under a temporary name, then renamed."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from hf_datasets.errors import ChexmemError

STATE_FILE = "chexmem_state.json"
PATTERN = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in folder.iterdir()
        if (m := PATTERN.match(p.name)) and p.is_dir()
    ]
    return [p for _, p in sorted(found)]


def resolve_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    """The checkpoint `--resume_from_checkpoint` names ('latest' or a path), or None."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume).expanduser()
    if not (path / STATE_FILE).is_file():
        raise ChexmemError(f"{path} is not a chexmem checkpoint (no {STATE_FILE})")
    return path


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | Path,
    step: int,
    state: dict[str, Any],
    total_limit: int | None,
) -> Path:
    """`accelerator.save_state` into `.checkpoint-N.tmp`, then rename to `checkpoint-N`.

    A crash or a failed write leaves at most a temporary folder, never a checkpoint that
    looks complete; older checkpoints are pruned only after the new one is in place.
    """
    final = Path(output_dir) / f"checkpoint-{step}"
    staging = Path(output_dir) / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process and staging.exists():
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(staging), safe_serialization=True)
        if accelerator.is_main_process:
            (staging / STATE_FILE).write_text(json.dumps(state, indent=1))
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
        if total_limit is not None:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def read_state(checkpoint: Path) -> dict[str, Any]:
    """The loop state saved with a checkpoint (step, epoch, batches done in that epoch)."""
    return json.loads((checkpoint / STATE_FILE).read_text())
