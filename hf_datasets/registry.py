"""Classes by name from a table of "module:Class" strings, imported on first use (the
detector and mitigation registries share this)."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from hf_datasets.errors import ChexmemError


def registered_class(table: Mapping[str, str], name: str, kind: str) -> Any:
    """The class registered under `name`; an unknown name is a user error listing the known."""
    if name not in table:
        raise ChexmemError(f"unknown {kind} {name!r}; choose from {', '.join(table)}")
    module, cls = table[name].split(":")
    return getattr(importlib.import_module(module), cls)
