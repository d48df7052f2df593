"""Pushing a training result to the Hub: the exact folder is built and checked offline first."""

from __future__ import annotations

import fnmatch
from pathlib import Path

from huggingface_hub import create_repo, get_token, upload_folder

from hf_datasets.errors import ChexmemError

# samples_dropped.json names training images (source paths): never published
IGNORE_PATTERNS = [
    "checkpoint-*",
    "checkpoint-*/**",
    ".*",
    ".*/**",
    "logs/samples_rank*",
    "logs/samples_dropped.json",
]


def upload_files(output_dir: str | Path) -> list[str]:
    """The files `push_output` uploads (relative paths): weights, configs, card, logs, images."""
    root = Path(output_dir)
    files = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not any(fnmatch.fnmatch(rel, p) for p in IGNORE_PATTERNS):
            files.append(rel)
    return files


def push_output(output_dir: str | Path, repo_id: str, *, private: bool = True) -> str:
    """Create the repo if needed and upload the result folder; needs HF_TOKEN or a login."""
    token = get_token()
    if not token:
        raise ChexmemError("--push_to_hub needs a token: set HF_TOKEN or run `hf auth login`")
    repo = create_repo(repo_id, private=private, exist_ok=True, token=token).repo_id
    upload_folder(
        repo_id=repo,
        folder_path=str(output_dir),
        ignore_patterns=IGNORE_PATTERNS,
        commit_message="chexmem fine-tune",
        token=token,
    )
    return f"https://huggingface.co/{repo}"
