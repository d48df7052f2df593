"""Prompt sets for detection: a text file, a table, or the prompts of a chexmem dataset.

Every source becomes one DataFrame with ``prompt_id`` (0..N-1, which fixes each prompt's
seeds), ``prompt`` and, when known, ``label`` (1 = memorized) and ``copies``. A chexmem
dataset gives each distinct prompt once, labelled memorized when its image was repeated
(``copies > 1``), which is the ground truth injected duplicates provide.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from hf_datasets.errors import ChexmemError


def read_prompt_file(path: str | Path) -> pd.DataFrame:
    """Prompts from .txt (one per line), .csv, .jsonl or .parquet (a `prompt` column)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ChexmemError(f"prompt file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        lines = [line.strip() for line in path.read_text().splitlines()]
        frame = pd.DataFrame({"prompt": [line for line in lines if line]})
    elif suffix == ".csv":
        frame = pd.read_csv(path)
    elif suffix == ".jsonl":
        frame = pd.read_json(path, lines=True)
    elif suffix == ".parquet":
        frame = pd.read_parquet(path)
    else:
        raise ChexmemError(f"prompt file {path} must be .txt, .csv, .jsonl or .parquet")
    if "prompt" not in frame.columns:
        raise ChexmemError(
            f"{path} has no 'prompt' column (it has: {', '.join(map(str, frame.columns))})"
        )
    return frame


def dataset_prompts(path: str | Path, split: str = "train") -> pd.DataFrame:
    """Each distinct prompt of a saved chexmem dataset split, with copies and label."""
    from hf_datasets.storage import load_dataset_dir

    splits = load_dataset_dir(Path(path).expanduser())
    if split not in splits:
        raise ChexmemError(f"no split {split!r} in {path}; it has {', '.join(splits)}")
    rows = splits[split].select_columns(
        [c for c in ("prompt", "copies", "patient_id") if c in splits[split].column_names]
    )
    frame = rows.to_pandas()
    if "copies" not in frame.columns:
        frame["copies"] = 1
    frame = frame.groupby("prompt", sort=False, as_index=False).agg(
        {c: "max" if c == "copies" else "first" for c in frame.columns if c != "prompt"}
    )
    frame["label"] = (frame["copies"] > 1).astype(int)
    frame["split"] = split
    return frame


def load_prompt_set(
    prompts: str | Path | None = None,
    dataset: str | Path | None = None,
    split: str = "train",
    num_prompts: int | None = None,
) -> pd.DataFrame:
    """The prompt set the CLI flags describe, with prompt ids."""
    if (prompts is None) == (dataset is None):
        raise ChexmemError("give the prompts with --prompts FILE or --dataset DIR (one of them)")
    frame = read_prompt_file(prompts) if prompts is not None else dataset_prompts(dataset, split)
    frame = frame.dropna(subset=["prompt"])
    if num_prompts is not None:
        frame = frame.head(num_prompts)
    if frame.empty:
        raise ChexmemError("the prompt set is empty")
    frame = frame.reset_index(drop=True)
    frame.insert(0, "prompt_id", range(len(frame)))
    return frame
