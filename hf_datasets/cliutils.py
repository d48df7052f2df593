"""Command-line plumbing every chexmem command shares: YAML defaults and readable errors."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from hf_datasets.errors import ChexmemError


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file holding one mapping."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ChexmemError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ChexmemError(f"config file {path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ChexmemError(f"config file {path} must hold a mapping of option: value")
    return data


def apply_config_file(
    top: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str] | None
) -> argparse.Namespace:
    """Re-parse with the YAML given by `--config` as defaults, so explicit flags still win.

    The subcommand's own parser must be stored in the namespace as `_parser`.
    """
    if not getattr(args, "config", None):
        return args
    parser: argparse.ArgumentParser = args._parser
    values = read_yaml(args.config)
    known = {a.dest for a in parser._actions}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ChexmemError(f"{args.config}: unknown option(s) {', '.join(unknown)}")
    parser.set_defaults(**values)
    return top.parse_args(argv)


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    """`--config FILE`: a YAML mapping of flag names (without dashes) to values."""
    parser.add_argument(
        "--config", help="YAML file of flag_name: value defaults (explicit flags win)"
    )


def setup_logging(verbose: bool = False) -> None:
    """Our packages log at INFO (DEBUG if verbose), libraries at WARNING, on stderr."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname).1s %(name)s: %(message)s")
    for package in ("hf_datasets", "detect", "mitigate", "train", "scripts"):
        logging.getLogger(package).setLevel(logging.DEBUG if verbose else logging.INFO)


def leave_process_group() -> None:
    """Under torchrun / accelerate launch: wait for every rank, then destroy the process group."""
    dist = sys.modules.get("torch.distributed")  # never import torch just to find none
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    # a rank that exits alone can deadlock in gloo's teardown: its worker thread may still
    # be freeing the last collective's tensors (which needs the GIL) while the exiting thread
    # joins it holding the GIL; in the barrier, the GIL is free until every rank arrives
    dist.barrier()
    dist.destroy_process_group()


def run_command(
    top: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str] | None
) -> int:
    """Run a parsed subcommand; user errors end in one line on stderr and exit code 2."""
    try:
        args = apply_config_file(top, args, argv)
        args.func(args)
        leave_process_group()
    except ChexmemError as error:
        print(f"chexmem: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("chexmem: interrupted", file=sys.stderr)
        return 130
    return 0
