"""Prompt sets for detection: a text file, a table, or the prompts of a chexmem dataset.

Every source becomes one DataFrame with ``prompt_id`` (0..N-1, which fixes each prompt's
seeds), ``prompt`` and, when known, ``label`` (1 = memorized) and ``copies``. A chexmem
dataset gives each distinct prompt once, labelled memorized when its image was repeated
(``copies > 1``), which is the ground truth injected duplicates provide.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pandas as pd
from pyarrow import ArrowException

from hf_datasets.errors import ChexmemError

logger = logging.getLogger(__name__)


def read_text(path: Path) -> str:
    """A text file as UTF-8 (a leading byte-order mark dropped); other encodings are an error."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ChexmemError(
            f"prompt file {path} is not UTF-8: byte 0x{data[error.start]:02x} at offset "
            f"{error.start} (line {line}); save it as UTF-8"
        ) from None


def read_prompt_file(path: str | Path) -> pd.DataFrame:
    """Prompts from .txt (one per line), .csv, .jsonl or .parquet (a `prompt` column)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ChexmemError(f"prompt file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".csv", ".jsonl", ".parquet"):
        raise ChexmemError(f"prompt file {path} must be .txt, .csv, .jsonl or .parquet")
    try:
        if suffix == ".txt":
            lines = [line.strip() for line in read_text(path).splitlines()]
            frame = pd.DataFrame({"prompt": [line for line in lines if line]})
            if len(frame) < len(lines):
                logger.info("%s: skipped %d blank line(s)", path, len(lines) - len(frame))
        elif suffix == ".csv":
            frame = pd.read_csv(io.StringIO(read_text(path)))
        elif suffix == ".jsonl":
            frame = pd.read_json(io.StringIO(read_text(path)), lines=True)
        else:
            frame = pd.read_parquet(path)
    except (ValueError, OSError, pd.errors.ParserError, ArrowException) as error:
        # EmptyDataError and bad JSON are ValueErrors; a broken parquet file an ArrowException
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ChexmemError(f"cannot read prompt file {path}: {first}") from None
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
