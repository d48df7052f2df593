"""Saving, loading, exporting and pushing chexmem datasets without ever leaving half a dataset."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from datasets import Dataset, DatasetDict, load_from_disk
from datasets.table import embed_table_storage
from huggingface_hub import get_token

from hf_datasets.errors import ChexmemError

REQUIRED_COLUMNS: tuple[str, ...] = ("image", "prompt")


def replace_dir(staged: Path, out: Path, overwrite: bool) -> None:
    """Move a finished folder to `out`; an existing `out` is replaced only if `overwrite`."""
    if out.exists():
        if not overwrite:
            shutil.rmtree(staged, ignore_errors=True)
            raise ChexmemError(f"{out} already exists; pass --overwrite to replace it")
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        out.rename(old)
        staged.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staged.rename(out)


def save_dataset(dataset: DatasetDict, out: str | Path, *, overwrite: bool = False) -> Path:
    """`save_to_disk` into a temporary sibling folder, then rename it into place."""
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise ChexmemError(f"{out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        dataset.save_to_disk(str(staged))
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    replace_dir(staged, out, overwrite)
    return out


def load_dataset_dir(path: str | Path) -> DatasetDict:
    """A dataset saved by chexmem (or any `save_to_disk` folder) with image and prompt columns."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ChexmemError(f"dataset folder {path} does not exist")
    try:
        loaded = load_from_disk(str(path))
    except FileNotFoundError:
        raise ChexmemError(
            f"{path} is not a saved dataset (no dataset_dict.json or state.json)"
        ) from None
    dataset = loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})
    for split, part in dataset.items():
        missing = [c for c in REQUIRED_COLUMNS if c not in part.column_names]
        if missing:
            raise ChexmemError(f"{path} split {split!r} lacks column(s): {', '.join(missing)}")
    return dataset


def embed_images(dataset: Dataset) -> Dataset:
    """The same rows with image bytes inside the table, so exported files stand alone."""
    embedded = dataset.with_format("arrow").map(embed_table_storage, batched=True)
    return embedded.with_format(None)


def export_parquet(dataset: DatasetDict, out: str | Path, *, overwrite: bool = False) -> list[Path]:
    """One self-contained parquet file per split (`<split>.parquet`), images embedded."""
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    staged.mkdir()
    for split, part in dataset.items():
        embed_images(part).to_parquet(str(staged / f"{split}.parquet"))
    replace_dir(staged, out, overwrite)
    return sorted(out.glob("*.parquet"))


def push_dataset(dataset: DatasetDict, repo_id: str, *, private: bool = True) -> str:
    """Push to the Hub as parquet with embedded images; needs a token (HF_TOKEN or login)."""
    token = get_token()
    if not token:
        raise ChexmemError("pushing to the Hub needs a token: set HF_TOKEN or run `hf auth login`")
    dataset.push_to_hub(repo_id, private=private, token=token)
    return f"https://huggingface.co/datasets/{repo_id}"
