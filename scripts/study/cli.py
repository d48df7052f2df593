"""`chexmem study --config FILE` and `chexmem demo`: flags from `StudyConfig`, then the run."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import scripts.study
from hf_datasets.errors import ChexmemError
from scripts.study.config import StudyConfig
from scripts.study.runner import assign_keys, dry_run, run_jobs


def write_text_atomic(path: Path, text: str) -> None:
    """Write a small file under a temporary name, then rename it into place."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    partial.replace(path)


def run_study(config: StudyConfig, force: set[str] = frozenset(), plan_only: bool = False) -> None:
    """Plan the study's jobs, then run what is not cached (or only check the plan)."""
    from scripts.study.plan import plan  # the stages import torch and diffusers: only to run

    if "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(1)  # tiny models on a small CPU: more threads are much slower
    jobs = plan(config)
    assign_keys(jobs)
    if plan_only:
        dry_run(config, jobs)
        return
    config.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(config.out / "study_config.json", json.dumps(asdict(config), indent=1))
    start = time.perf_counter()
    seconds = run_jobs(config, jobs, {"all"} if config.overwrite else set(force))
    timing = {"wall_seconds": time.perf_counter() - start, "jobs": seconds}
    write_text_atomic(config.out / ".study" / "timing.json", json.dumps(timing))
    print(f"== study finished in {time.perf_counter() - start:.1f} s; outputs in {config.out}/")
    if (config.out / "report.html").is_file():
        print(f"report: {config.out / 'report.html'} (and report.md, metrics.json)")


def config_from(args: argparse.Namespace) -> StudyConfig:
    """The StudyConfig of parsed flags."""
    return StudyConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(StudyConfig)})


def add_study_flags(p: argparse.ArgumentParser) -> None:
    """One flag per StudyConfig field (its help from the field), plus --force and --dry_run."""
    from hf_datasets.cliutils import add_config_flag

    for f in dataclasses.fields(StudyConfig):
        value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        meta = dict(f.metadata)
        help_text = f"{meta.pop('help')} (default: %(default)s)"
        if isinstance(value, bool):
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=value,
                           help=help_text)  # fmt: skip
        elif isinstance(value, list):
            kind = type(value[0]) if value else str
            p.add_argument(f"--{f.name}", nargs="*", type=kind, default=value, help=help_text)
        else:
            kind = meta.pop("type", type(value) if value is not None else str)
            p.add_argument(f"--{f.name}", type=kind, default=value, help=help_text, **meta)
    p.add_argument("--force", nargs="+", default=[], metavar="JOB",
                   help="rerun these jobs and all after them ('all': everything)")  # fmt: skip
    p.add_argument("--dry_run", action="store_true", help="check every job's plan; run nothing")
    p.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        metavar="SEED",
        help="run the whole study once per seed (OUTPUT_DIR/seed-K) and report the mean and sd "
        "of every detection figure (default: one study, --seed)",
    )
    add_config_flag(p)


def add_study_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `chexmem study` and `chexmem demo` (the study on the embedded default)."""

    def run(args: argparse.Namespace) -> None:
        if args.command == "study" and not args.config:
            raise ChexmemError("chexmem study needs --config FILE (e.g. configs/demo.yaml)")
        config = config_from(args)
        if not args.seeds:
            run_study(config, set(args.force), args.dry_run)
            return
        from scripts.study.seeds import seed_configs, write_seed_summary

        runs = seed_configs(config, args.seeds)
        for seed, settings in runs.items():
            print(f"==== seed {seed}: {settings.out}/")
            run_study(settings, set(args.force), args.dry_run)
        if not args.dry_run:
            write_seed_summary(config, {seed: c.out for seed, c in runs.items()})
            print(f"== over seeds: {config.out / 'report.html'} (and report.md, metrics.json)")

    for name, text in (
        ("study", "run a whole study from a YAML config (configs/*.yaml)"),
        ("demo", "run the study on the embedded default (CPU, offline)"),
    ):
        p = subparsers.add_parser(name, help=text, description=scripts.study.__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
        add_study_flags(p)
        p.set_defaults(func=run, _parser=p)
