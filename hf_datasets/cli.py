"""`chexmem data ...`: build, inspect and share chest X-ray datasets."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from datasets import DatasetDict

from hf_datasets.chexpert import CheXpertConfig, load_chexpert
from hf_datasets.cliutils import add_config_flag, read_yaml
from hf_datasets.duplicates import duplicated_rows, inject_duplicates
from hf_datasets.errors import ChexmemError
from hf_datasets.folder import FolderConfig, load_image_folder
from hf_datasets.labels import UncertaintyPolicy
from hf_datasets.phantom import PhantomConfig, generate_phantom
from hf_datasets.prompts import PromptConfig
from hf_datasets.show import show
from hf_datasets.storage import export_parquet, load_dataset_dir, push_dataset, save_dataset
from hf_datasets.summary import summarize

logger = logging.getLogger(__name__)


def _prompt_flags(parser: argparse.ArgumentParser) -> None:
    """Flags choosing how prompts are written."""
    group = parser.add_argument_group("prompts")
    group.add_argument(
        "--prompt_style",
        choices=("report", "labels"),
        default="report",
        help="report: radiology-report sentences (view, age, sex, findings); labels: "
        '"chest x-ray, finding, ..." (default: %(default)s)',
    )
    group.add_argument(
        "--prompt_seed",
        type=int,
        default=0,
        help="seed of the template choices (same seed: same prompt per row) (default: %(default)s)",
    )
    group.add_argument("--prompt_config", help="YAML of prompt options and templates (see README)")


def _prompt_config(args: argparse.Namespace) -> PromptConfig:
    """The PromptConfig the prompt flags describe."""
    data = read_yaml(args.prompt_config) if args.prompt_config else {}
    data.setdefault("style", args.prompt_style)
    data.setdefault("seed", args.prompt_seed)
    return PromptConfig.from_dict(data)


def _source_flags(parser: argparse.ArgumentParser) -> None:
    """Flags every file-based source shares."""
    parser.add_argument("--root", required=True, help="the dataset folder")
    parser.add_argument(
        "--uncertainty",
        choices=[p.value for p in UncertaintyPolicy],
        default="keep",
        help="uncertain (-1) labels: keep (prompts say 'possible ...'), ones (U-Ones: positive), "
        "zeros (U-Zeros: negative), ignore (U-Ignore: missing) (default: %(default)s)",
    )
    parser.add_argument(
        "--resolution",
        type=int,
        help="resize the shorter side to this many pixels (default: keep files as they are)",
    )
    parser.add_argument("--max_rows", type=int, help="keep only the first N rows (after filters)")
    parser.add_argument(
        "--no_verify", action="store_true", help="only check that images exist, do not decode them"
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first unreadable image instead of skipping it",
    )
    parser.add_argument(
        "--num_workers",
        type=int,
        default=1,
        help="processes that check and decode images (default: %(default)s)",
    )


def _output_flags(parser: argparse.ArgumentParser, split_fractions: bool = True) -> None:
    """Where the dataset goes: a folder, parquet, the Hub."""
    if split_fractions:
        parser.add_argument(
            "--split_fractions",
            type=float,
            nargs=3,
            default=[0.8, 0.1, 0.1],
            metavar=("TRAIN", "VAL", "TEST"),
            help="shares of patients in the train / validation / test splits; a patient's images "
            "all go to one split (default: %(default)s)",
        )
        parser.add_argument(
            "--seed",
            type=int,
            default=0,
            help="seed of the patient split (phantom: of the images too) (default: %(default)s)",
        )
    parser.add_argument("--out", required=True, help="output folder (save_to_disk)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument(
        "--parquet", help="also write one self-contained parquet file per split here"
    )
    parser.add_argument(
        "--push_to_hub", action="store_true", help="push to the Hub (needs HF_TOKEN)"
    )
    parser.add_argument(
        "--hub_dataset_id", help="Hub repo id for --push_to_hub, e.g. me/chexpert-prompts"
    )
    parser.add_argument(
        "--public", action="store_true", help="make the Hub dataset public (default: private)"
    )
    add_config_flag(parser)


def _source_options(args: argparse.Namespace) -> dict:
    """Keyword arguments of SourceOptions from the shared flags."""
    return {
        "uncertainty": args.uncertainty,
        "split_fractions": args.split_fractions,
        "seed": args.seed,
        "resolution": args.resolution,
        "max_rows": args.max_rows,
        "verify_images": not args.no_verify,
        "strict": args.strict,
        "num_workers": args.num_workers,
        "prompts": _prompt_config(args),
    }


def write_outputs(dataset: DatasetDict, args: argparse.Namespace) -> None:
    """Save to --out, optionally export parquet and push, then print a summary."""
    if args.push_to_hub and not args.hub_dataset_id:
        raise ChexmemError("--push_to_hub needs --hub_dataset_id")
    out = save_dataset(dataset, args.out, overwrite=args.overwrite)
    print(summarize(dataset))
    print(f"saved to {out}")
    if args.parquet:
        files = export_parquet(dataset, args.parquet, overwrite=args.overwrite)
        print(f"parquet: {', '.join(str(f) for f in files)}")
    if args.push_to_hub:
        print(f"pushed to {push_dataset(dataset, args.hub_dataset_id, private=not args.public)}")


def cmd_chexpert(args: argparse.Namespace) -> None:
    """Build a CheXpert dataset."""
    config = CheXpertConfig(
        root=args.root,
        frontal_only=args.frontal_only,
        official_valid=args.official_valid,
        **_source_options(args),
    )
    write_outputs(load_chexpert(config), args)


def cmd_folder(args: argparse.Namespace) -> None:
    """Build a dataset from an image folder with metadata.csv."""
    config = FolderConfig(
        root=args.root,
        metadata=args.metadata,
        image_dir=args.image_dir,
        prompt_column=args.prompt_column,
        findings_column=args.findings_column,
        patient_column=args.patient_column,
        **_source_options(args),
    )
    write_outputs(load_image_folder(config), args)


def cmd_phantom(args: argparse.Namespace) -> None:
    """Generate the phantom dataset."""
    config = PhantomConfig(
        num_patients=args.num_patients,
        max_studies_per_patient=args.max_studies_per_patient,
        resolution=args.resolution,
        seed=args.seed,
        split_fractions=args.split_fractions,
        num_workers=args.num_workers,
        prompts=_prompt_config(args),
    )
    write_outputs(generate_phantom(config), args)


def cmd_duplicate(args: argparse.Namespace) -> None:
    """Inject duplicates into a saved dataset's train split."""
    dataset = load_dataset_dir(args.dataset)
    counts = None
    if args.counts:
        try:
            counts = {int(k): int(v) for k, v in json.loads(Path(args.counts).read_text()).items()}
        except (OSError, ValueError, AttributeError) as error:
            raise ChexmemError(
                f"--counts {args.counts} must be a JSON object of row index: copies ({error})"
            ) from None
    if Path(args.out).resolve() == Path(args.dataset).resolve():
        raise ChexmemError("--out must differ from --dataset (the input is never modified)")
    result = inject_duplicates(
        dataset, num_rows=args.num_rows, copies=args.copies, counts=counts, seed=args.seed
    )
    write_outputs(result, args)


def cmd_show(args: argparse.Namespace) -> None:
    """Write a PNG grid of images and prompts."""
    dataset = load_dataset_dir(args.dataset)
    if args.split not in dataset:
        raise ChexmemError(
            f"no split {args.split!r} in {args.dataset}; splits: {', '.join(dataset)}"
        )
    part = dataset[args.split]
    if args.duplicated_only:
        part = part.select(duplicated_rows(part))
    out = show(part, args.out, num=args.num, columns=args.columns, tile=args.tile, start=args.start)
    print(f"wrote {out} ({min(args.num, max(0, len(part) - args.start))} images of {args.split})")


def add_data_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `chexmem data <source>` subcommands."""
    data = subparsers.add_parser("data", help="build, inspect and share chest X-ray datasets")
    sub = data.add_subparsers(
        dest="data_command", required=True, metavar="{chexpert,folder,phantom,duplicate,show}"
    )

    p = sub.add_parser("chexpert", help="CheXpert v1.0 / -small from a local folder")
    _source_flags(p)
    p.add_argument("--frontal_only", action="store_true", help="drop lateral views")
    p.add_argument(
        "--official_valid", action="store_true", help="valid.csv becomes the validation split"
    )
    _prompt_flags(p)
    _output_flags(p)
    p.set_defaults(func=cmd_chexpert, _parser=p)

    p = sub.add_parser("folder", help="any image folder with metadata.csv")
    _source_flags(p)
    p.add_argument(
        "--metadata",
        default="metadata.csv",
        help="CSV with a file_name column, path relative to --root (default: %(default)s)",
    )
    p.add_argument(
        "--image_dir", help="folder the file names are relative to (default: --root or its images/)"
    )
    p.add_argument("--prompt_column", help="use this column verbatim as the prompt")
    p.add_argument(
        "--findings_column",
        default="findings",
        help="column of free text appended to label prompts (default: %(default)s)",
    )
    p.add_argument(
        "--patient_column", help="column identifying the patient (default: patient_id, ...)"
    )
    _prompt_flags(p)
    _output_flags(p)
    p.set_defaults(func=cmd_folder, _parser=p)

    p = sub.add_parser("phantom", help="synthetic chest radiographs (the embedded default)")
    p.add_argument(
        "--num_patients", type=int, default=200, help="synthetic patients (default: %(default)s)"
    )
    p.add_argument(
        "--max_studies_per_patient",
        type=int,
        default=3,
        help="cap on studies (visits) per patient, drawn as in CheXpert (default: %(default)s)",
    )
    p.add_argument(
        "--resolution",
        type=int,
        default=128,
        help="image side in pixels, square, 32 to 1024 (default: %(default)s)",
    )
    p.add_argument(
        "--num_workers",
        type=int,
        default=1,
        help="processes generating patients (default: %(default)s)",
    )
    _prompt_flags(p)
    _output_flags(p)
    p.set_defaults(func=cmd_phantom, _parser=p)

    p = sub.add_parser("duplicate", help="repeat training rows to study memorization")
    p.add_argument("--dataset", required=True, help="a saved dataset folder")
    p.add_argument(
        "--num_rows",
        type=int,
        default=10,
        help="how many training rows to repeat, at each copy count (default: %(default)s)",
    )
    p.add_argument(
        "--copies",
        type=int,
        nargs="+",
        default=[10],
        metavar="N",
        help="appearances of each chosen row in total, original included; several counts "
        "(e.g. 2 5 10 20) give --num_rows rows at each, a dose-response ground truth "
        "(default: 10)",
    )
    p.add_argument("--counts", help="JSON file {row_index: copies} instead of --num_rows/--copies")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the choice of rows (default: %(default)s)"
    )
    _output_flags(p, split_fractions=False)
    p.set_defaults(func=cmd_duplicate, _parser=p)

    p = sub.add_parser("show", help="PNG grid of images with their prompts")
    p.add_argument("--dataset", required=True, help="a saved dataset folder")
    p.add_argument("--split", default="train", help="split to show (default: %(default)s)")
    p.add_argument("--num", type=int, default=16, help="images in the grid (default: %(default)s)")
    p.add_argument(
        "--start", type=int, default=0, help="index of the first row shown (default: %(default)s)"
    )
    p.add_argument(
        "--columns", type=int, default=4, help="images per grid row (default: %(default)s)"
    )
    p.add_argument(
        "--tile", type=int, default=192, help="tile side in pixels (default: %(default)s)"
    )
    p.add_argument("--duplicated_only", action="store_true", help="only rows with injected copies")
    p.add_argument("--out", default="grid.png", help="output PNG file (default: %(default)s)")
    add_config_flag(p)
    p.set_defaults(func=cmd_show, _parser=p)
