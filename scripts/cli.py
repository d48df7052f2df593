"""The `chexmem` command: study, demo, data, model, train, search, detect, ..., mitigate."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from detect.cli import add_detect_commands
from hf_datasets.cli import add_data_commands
from hf_datasets.cliutils import run_command, setup_logging
from mitigate.cli import add_mitigate_commands
from scripts.study.cli import add_study_commands
from train.cli import add_model_command, add_train_command
from train.search import add_search_command


def version() -> str:
    """The installed chexmem's version."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        number = installed("chexmem")
    except PackageNotFoundError:
        number = "unknown (not installed)"
    return number


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="chexmem",
        description="Fine-tune Stable Diffusion on chest X-rays; measure, explain and reduce "
        "memorization.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {version()}", help="print the version"
    )
    subparsers = parser.add_subparsers(
        dest="command",
        required=True,
        metavar="{study,demo,data,model,train,search,detect,tokens,neurons,similarity,mitigate}",
    )
    add_study_commands(subparsers)
    add_data_commands(subparsers)
    add_model_command(subparsers)
    add_train_command(subparsers)
    add_search_command(subparsers)
    add_detect_commands(subparsers)
    add_mitigate_commands(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; user errors end in one line and exit code 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    return run_command(parser, args, argv)


if __name__ == "__main__":
    sys.exit(main())
