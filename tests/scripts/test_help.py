"""Every flag of every `chexmem` command explains itself, and `--help` runs cleanly.

The walk covers every subcommand, nested ones (`chexmem data phantom`, `chexmem mitigate
evaluate`, ...) included, so a flag added anywhere without a help line fails here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Iterator

from scripts.cli import build_parser
from tests.conftest import REPO


def walk(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ("chexmem",)
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """(command path, parser) of the parser and of every subparser below it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            seen: set[int] = set()
            for name, sub in action.choices.items():
                if id(sub) not in seen:  # an alias names the same parser again
                    seen.add(id(sub))
                    yield from walk(sub, (*path, name))


def flags(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.Action]]:
    """(flag name, action) of every user-facing argument (not -h/--help, not sub-commands)."""
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        if action.help == argparse.SUPPRESS:
            continue
        long = [o for o in action.option_strings if o.startswith("--")]
        yield (long or action.option_strings or [action.dest])[0], action


def command_paths() -> list[tuple[str, ...]]:
    """Every command path below `chexmem`, e.g. ("data", "phantom")."""
    return [path[1:] for path, _ in walk(build_parser()) if len(path) > 1]


def test_every_flag_and_subcommand_has_help() -> None:
    missing = []
    for path, parser in walk(build_parser()):
        for name, action in flags(parser):
            if not (action.help and str(action.help).strip()):
                missing.append(f"{' '.join(path)} {name}")
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    if not (choice.help and choice.help.strip()):
                        missing.append(f"{' '.join(path)} {choice.dest} (subcommand)")
    assert not missing, "no help line:\n" + "\n".join(missing)


def test_every_default_is_stated_and_every_help_page_formats() -> None:
    unstated = []
    for path, parser in walk(build_parser()):
        parser.format_help()  # a stray % in a help string fails here, not in front of a user
        for name, action in flags(parser):
            default = action.default
            if action.required or default is None or default is False or default == []:
                continue  # nothing to state: a switch that is off, or no value
            if default == argparse.SUPPRESS or not action.help:
                continue  # no help at all is the other test's failure
            if "default" not in str(action.help):
                unstated.append(f"{' '.join(path)} {name} (default {default!r})")
    assert not unstated, "help does not state the default:\n" + "\n".join(unstated)


def test_train_help_lists_the_presets() -> None:
    from train.subset import PRESETS

    # the README says `chexmem train --help` lists them; train.config writes them out by hand
    train = dict(walk(build_parser()))[("chexmem", "train")]
    (preset,) = [a for a in train._actions if a.dest == "trainable_preset"]
    assert [name for name in PRESETS if name not in preset.help] == []
    assert " ".join(preset.help.split()) in " ".join(train.format_help().split())


# one process prints every command's help the way a user's `chexmem CMD --help` does
HELP_LOOP = """
import contextlib, io, json, sys
from scripts.cli import main
codes = {}
for path in json.loads(sys.argv[1]):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            main([*path, "--help"])
            codes[" ".join(path)] = "returned without exiting"
        except SystemExit as exit:
            codes[" ".join(path)] = exit.code if out.getvalue().startswith("usage:") else "no usage"
print(json.dumps(codes))
"""


def test_help_of_every_command_exits_0_without_warnings() -> None:
    paths = [[], *map(list, command_paths())]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONWARNINGS", None)  # what a user sees, with Python's default filters
    result = subprocess.run(
        [sys.executable, "-c", HELP_LOOP, json.dumps(paths)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    codes = json.loads(result.stdout.strip().splitlines()[-1])
    assert {k: v for k, v in codes.items() if v not in (0, None)} == {}
    assert len(codes) == len(paths)
    assert "warning" not in result.stderr.lower(), result.stderr[-3000:]
    assert result.stderr.strip() == "", result.stderr[-3000:]
