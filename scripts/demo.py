"""`chexmem demo`: the whole study on the embedded default (phantom data, tiny model, CPU).

Stages so far:
1. data: phantom chest radiographs with injected duplicates, saved with `save_to_disk`,
   and a contact sheet of duplicated and ordinary training rows.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

from hf_datasets.cliutils import add_config_flag
from hf_datasets.duplicates import inject_duplicates
from hf_datasets.phantom import PhantomConfig, generate_phantom
from hf_datasets.show import show
from hf_datasets.storage import save_dataset
from hf_datasets.summary import summarize


@dataclass
class DemoConfig:
    """What the demo runs; each field is a `chexmem demo` flag."""

    output_dir: str = "chexmem-demo"
    num_patients: int = 160
    max_studies_per_patient: int = 3
    resolution: int = 128
    duplicated_rows: int = 12
    copies: int = 20
    seed: int = 0
    overwrite: bool = False


def run_data_stage(config: DemoConfig) -> Path:
    """Phantom data with duplicates, saved, plus contact sheets; returns the dataset folder."""
    out = Path(config.output_dir)
    phantom = generate_phantom(
        PhantomConfig(
            num_patients=config.num_patients,
            max_studies_per_patient=config.max_studies_per_patient,
            resolution=config.resolution,
            seed=config.seed,
        )
    )
    dataset = inject_duplicates(
        phantom, num_rows=config.duplicated_rows, copies=config.copies, seed=config.seed
    )
    path = save_dataset(dataset, out / "data", overwrite=config.overwrite)
    print(summarize(dataset))
    train = dataset["train"]
    duplicated = train.filter(lambda c: c > 1, input_columns="copies")
    first_copies = (
        duplicated.select(range(config.duplicated_rows)) if config.duplicated_rows else duplicated
    )
    show(first_copies, out / "duplicated_rows.png", num=config.duplicated_rows, columns=4)
    show(train, out / "train_rows.png", num=16, columns=4)
    print(
        f"dataset: {path}\ncontact sheets: {out / 'duplicated_rows.png'}, {out / 'train_rows.png'}"
    )
    return path


def run_demo(config: DemoConfig) -> None:
    """Every stage of the demo, in order."""
    start = time.perf_counter()
    dup = f"{config.duplicated_rows} rows x {config.copies} copies"
    print(f"== data: {config.num_patients} phantom patients, duplicates {dup}")
    run_data_stage(config)
    print(
        f"== demo finished in {time.perf_counter() - start:.1f} s; outputs in {config.output_dir}/"
    )


def add_demo_command(subparsers: argparse._SubParsersAction) -> None:
    """Register `chexmem demo`."""
    p = subparsers.add_parser("demo", help="run the study on the embedded default (CPU, offline)")
    defaults = DemoConfig()
    for name, value in vars(defaults).items():
        if isinstance(value, bool):
            p.add_argument(f"--{name}", action="store_true", help=f"(default: {value})")
        else:
            p.add_argument(f"--{name}", type=type(value), default=value, help=f"(default: {value})")
    add_config_flag(p)
    p.set_defaults(
        func=lambda args: run_demo(DemoConfig(**{k: getattr(args, k) for k in vars(defaults)})),
        _parser=p,
    )
