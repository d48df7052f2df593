"""Checkpoints that are complete or absent: written under a temporary name, then renamed."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from hf_datasets.errors import ChexmemError

STATE_FILE = "chexmem_state.json"  # written last: the completion marker
PATTERN = re.compile(r"^checkpoint-(\d+)$")
NONFINITE_SUFFIX = ".nonfinite"  # a checkpoint whose weights gave a non-finite loss, set aside
# Fault tests only (tests/train/test_faults.py): CHEXMEM_FAULT_PAUSE_IN_SAVE="<step>:<phase>" makes
# the save of checkpoint-<step> write "<step>:<phase>" to <output_dir>/fault-paused and sleep 10
# minutes at <phase> ("partial": files staged, no marker yet; "saved": just renamed into place),
# so a test can kill -9 the run exactly there. Unset, as everywhere else, it does nothing.
FAULT_PAUSE_ENV = "CHEXMEM_FAULT_PAUSE_IN_SAVE"


def _fault_pause(output_dir: Path, step: int, phase: str) -> None:
    if os.environ.get(FAULT_PAUSE_ENV) == f"{step}:{phase}":
        (output_dir / "fault-paused").write_text(f"{step}:{phase}")
        time.sleep(600)


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Finished checkpoints (named checkpoint-N and holding the marker), oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in folder.iterdir()
        if (m := PATTERN.match(p.name)) and (p / STATE_FILE).is_file()
    ]
    return [p for _, p in sorted(found)]


def remove_stale(output_dir: str | Path) -> None:
    """Delete what a killed run left half-written or half-deleted (`.checkpoint-*` folders)."""
    folder = Path(output_dir)
    for path in folder.glob(".checkpoint-*") if folder.is_dir() else []:
        shutil.rmtree(path, ignore_errors=True)


def _remove(path: Path) -> None:
    """Rename aside, then delete: a kill mid-delete never leaves a half checkpoint-N."""
    aside = path.with_name(f".{path.name}.old")
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def prune_checkpoints(
    output_dir: str | Path, total_limit: int | None, keep: Path | None = None
) -> None:
    """Delete all but the newest `total_limit` checkpoints, never `keep` (the last good one)."""
    if total_limit is None:
        return
    for old in list_checkpoints(output_dir)[:-total_limit]:
        if keep is None or old.resolve() != Path(keep).resolve():
            _remove(old)


def set_aside(checkpoint: Path) -> Path:
    """Rename a checkpoint so that `latest` no longer picks it (kept for inspection)."""
    target = checkpoint.with_name(checkpoint.name + NONFINITE_SUFFIX)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(checkpoint, target)
    return target


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
    keep: Path | None = None,
) -> Path:
    """`accelerator.save_state` into `.checkpoint-N.tmp`, then rename to `checkpoint-N`.

    A crash or a failed write leaves at most a temporary folder, never a checkpoint that
    looks complete: the marker (STATE_FILE) is written once every process's files are in,
    all is fsynced, then renamed. Older checkpoints (never `keep`) are pruned only after the
    new one is in place.
    """
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    staging = output_dir / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process and staging.exists():
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(staging), safe_serialization=True)
        if accelerator.is_main_process:
            _fault_pause(output_dir, step, "partial")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (staging / STATE_FILE).write_text(json.dumps(state, indent=1))
            for path in [*staging.iterdir(), staging]:
                _fsync(path)
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        if final.exists():
            _remove(final)
        os.replace(staging, final)
        _fsync(output_dir)
        _fault_pause(output_dir, step, "saved")
        prune_checkpoints(output_dir, total_limit, keep)
    accelerator.wait_for_everyone()
    return final


def read_state(checkpoint: Path) -> dict[str, Any]:
    """The loop state saved with a checkpoint (step, epoch, batches done in that epoch)."""
    return json.loads((checkpoint / STATE_FILE).read_text())
