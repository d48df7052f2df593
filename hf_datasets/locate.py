"""Find a dataset's folder when the user points one level too high (the unpacked download)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from hf_datasets.errors import ChexmemError

logger = logging.getLogger(__name__)


def holds_any(folder: Path, names: Sequence[str]) -> bool:
    """Whether `folder` holds a file of one of these names."""
    return any((folder / name).is_file() for name in names)


def dataset_folder(root: Path, names: Sequence[str], what: str, flag: str = "--root") -> Path:
    """`root` when it holds one of `names`, else its one child that does.

    No such child: `root` is returned (the caller says what is missing). Several: an error
    naming them, so the user can pick one.
    """
    if holds_any(root, names):
        return root
    children = sorted(c for c in root.iterdir() if c.is_dir() and holds_any(c, names))
    if not children:
        return root
    if len(children) > 1:
        raise ChexmemError(
            f"{root} holds several {what} folders ({', '.join(c.name for c in children)}); "
            f"point {flag} at one of them"
        )
    logger.info("using the %s folder %s (found inside %s)", what, children[0], root)
    return children[0]
