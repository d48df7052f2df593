"""`chexmem mitigate generate | prune | evaluate`: inference-time mitigation and edited models.

- ``generate``: a prompt set generated with one mitigation (``--method NAME[:key=value,...]``),
  with images, magnitudes and the prompts actually used;
- ``prune``: a new model folder with NEMO's neurons zeroed in W_v (``--neurons`` is the
  ``neurons.json`` of ``chexmem neurons``, or a plain {layer: [channels]} file);
- ``evaluate``: several methods against no mitigation on the same prompts, seeds and copy
  threshold (`mitigate.evaluate`), as a table.

The embedding adjustment's stopping target is calibrated on held-out prompts unless given
(``--method embedding:target=...``): the 10th percentile of their step-1 scores
(``--target_quantile``; the study uses the same, `mitigate.embedding.TARGET_QUANTILE`).
Training-time mitigation is a set of trainer flags (``chexmem train --help``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from detect.cli import (
    add_model_flags,
    add_prompt_flags,
    add_trajectory_flags,
    write_json,
    write_table,
)
from hf_datasets.cliutils import add_config_flag
from hf_datasets.errors import ChexmemError
from mitigate.registry import parse_method


def build_method(
    name: str, settings: dict[str, Any], pipe: Any, config: Any, args: argparse.Namespace
) -> Any:
    """A mitigation object, with its target or neuron set filled in from the flags."""
    from mitigate.registry import make_mitigation

    settings = dict(settings)
    if name == "embedding" and settings.get("target") is None:
        held_out = held_out_prompts(args)
        method = make_mitigation(name, **settings)
        # prompt ids past any evaluated prompt's: the held-out seeds differ from theirs
        ids = list(range(100_000, 100_000 + len(held_out)))
        target = method.calibrate(pipe, held_out, config, args.target_quantile, ids)
        print(f"embedding target {target.value:.4f} (q{args.target_quantile} of held-out)")
        return method
    if name == "amg":
        return amg_method(args, settings)
    if name == "uce":
        return uce_method(args, settings)
    if name == "neurons":
        from mitigate.neurons import NeuronDeactivation

        if not args.neurons:
            raise ChexmemError("--method neurons needs --neurons (from `chexmem neurons`)")
        return NeuronDeactivation.from_json(args.neurons, **settings)
    return make_mitigation(name, **settings)


def amg_method(args: argparse.Namespace, settings: dict[str, Any]) -> Any:
    """Anti-memorization guidance against the training images of --training_dataset."""
    from hf_datasets.storage import load_dataset_dir
    from mitigate.amg import AntiMemorizationGuidance

    if not args.training_dataset:
        raise ChexmemError("--method amg needs the training images: give --training_dataset")
    dataset = load_dataset_dir(args.training_dataset)
    if args.calibration_split not in dataset:
        raise ChexmemError(
            f"--training_dataset has no split {args.calibration_split!r} (--calibration_split) "
            f"of held-out images; it has {', '.join(dataset)}"
        )
    train, held_out = dataset["train"], dataset[args.calibration_split]
    method = AntiMemorizationGuidance.from_images(
        list(train["image"]), list(train["prompt"]), list(held_out["image"]), **settings
    )
    print(f"amg: {len(train)} training images; similarity zero at NCC {method.reference:.4f}")
    return method


def uce_method(args: argparse.Namespace, settings: dict[str, Any]) -> Any:
    """Unified concept editing of the prompts of --erase_prompts, preserving the other
    prompts of --training_dataset's train split."""
    from detect.prompt_sets import read_prompt_file
    from hf_datasets.storage import load_dataset_dir
    from mitigate.uce import ConceptEdit

    if "prompts" not in settings:
        if not args.erase_prompts:
            raise ChexmemError("--method uce needs the prompts to erase: give --erase_prompts")
        settings["prompts"] = tuple(read_prompt_file(args.erase_prompts)["prompt"])
    erased = set(settings["prompts"])
    if "preserve_prompts" not in settings and args.training_dataset:
        captions = load_dataset_dir(args.training_dataset)["train"]["prompt"]
        settings["preserve_prompts"] = tuple(dict.fromkeys(c for c in captions if c not in erased))
    method = ConceptEdit(**settings)
    print(f"uce: {len(method.prompts)} prompts erased, {len(method.preserve_prompts)} preserved")
    return method


def held_out_prompts(args: argparse.Namespace) -> list[str]:
    """Prompts of non-memorized data to calibrate targets on."""
    from detect.prompt_sets import load_prompt_set

    if not (args.calibration_prompts or args.calibration_dataset):
        raise ChexmemError(
            "the embedding target needs held-out prompts: --calibration_prompts or "
            "--calibration_dataset (or give embedding:target=VALUE)"
        )
    frame = load_prompt_set(
        args.calibration_prompts, args.calibration_dataset, args.calibration_split, None
    )
    return list(frame["prompt"][: args.num_calibration])


def trajectory_config(args: argparse.Namespace) -> Any:
    """The sampling trajectory every method shares."""
    from detect.magnitude import MagnitudeConfig

    return MagnitudeConfig(
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        num_generations=args.num_generations,
        seed=args.seed,
        batch_size=args.batch_size,
    )


def cmd_generate(args: argparse.Namespace) -> None:
    """Generate a prompt set with one mitigation; save images, magnitudes and a summary."""
    from detect.cli import DTYPES
    from detect.magnitude import decode_latents
    from detect.models import load_pipeline
    from detect.prompt_sets import load_prompt_set
    from mitigate.base import generate

    prompts = load_prompt_set(args.prompts, args.dataset, args.split, args.num_prompts)
    pipe = load_pipeline(args.model, dtype=DTYPES[args.dtype])
    config = trajectory_config(args)
    label, name, settings = parse_method(args.method)
    mitigation = build_method(name, settings, pipe, config, args)
    ids = [int(i) for i in prompts["prompt_id"]]
    result = generate(pipe, list(prompts["prompt"]), config, mitigation, ids)
    out = Path(args.output_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    files = []
    images = decode_latents(pipe, result.result.final_latents, args.batch_size)
    keys = [(i, j) for i in ids for j in range(config.num_generations)]
    for image, (prompt_id, generation) in zip(images, keys, strict=True):
        files.append((prompt_id, generation, f"images/p{prompt_id:05d}_g{generation:02d}.png"))
        image.save(out / files[-1][2])
    write_table(result.result.table, out, "magnitudes")
    used = prompts.assign(used_prompt=result.prompts)
    used["score"] = used["prompt_id"].map(result.result.scores(first_k=1))
    write_table(used, out, "prompts")
    write_table(
        pd.DataFrame(files, columns=["prompt_id", "generation", "file_name"]), out, "images"
    )
    write_json(
        {
            "model": args.model,
            "method": label,
            "mitigation": result.mitigation,
            "seconds_per_prompt": round(result.seconds_per_prompt, 4),
            "seconds_mitigation": round(result.seconds_mitigation, 3),
            "mean_score": float(used["score"].mean()),
        },
        out / "summary.json",
    )
    print(f"{label}: mean step-1 score {used['score'].mean():.4f}, {len(images)} images in {out}/")


def cmd_prune(args: argparse.Namespace) -> None:
    """Zero NEMO's neurons in W_v for good and save the edited model folder."""
    from mitigate.neurons import NeuronDeactivation, prune_model

    method = NeuronDeactivation.from_json(args.neurons, min_frequency=args.min_frequency)
    start = time.perf_counter()
    out = prune_model(args.model, method.neurons, args.output_dir, overwrite=args.overwrite)
    count = sum(len(c) for c in method.neurons.values())
    print(f"{count} neurons zeroed; model saved to {out} in {time.perf_counter() - start:.1f} s")


def cmd_evaluate(args: argparse.Namespace) -> None:
    """Every method against no mitigation on the same prompts, seeds and copy threshold."""
    from detect.calibration import given
    from detect.cli import DTYPES
    from detect.models import load_pipeline
    from detect.prompt_sets import read_prompt_file
    from detect.similarity import NCCEmbedder, TrainingBank, calibrate_threshold
    from hf_datasets.storage import load_dataset_dir
    from mitigate.evaluate import EvaluationSetup, evaluate_methods

    frame = read_prompt_file(args.prompts)  # checked before anything heavy is loaded
    if "group" not in frame:
        frame["group"] = "all"
    dataset = load_dataset_dir(args.dataset)
    train, heldout = dataset[args.split], dataset[args.heldout_split]
    embedder = NCCEmbedder(size=args.size)
    bank = TrainingBank.from_images(train["image"], embedder, patient_ids=train["patient_id"])
    calibration = (
        given("copy threshold", args.copy_threshold)
        if args.copy_threshold is not None
        else calibrate_threshold(heldout["image"], bank, embedder, args.percentile)
    )
    threshold = calibration.value
    print(f"copy threshold {threshold:.4f} ({embedder.name})")
    pipe = load_pipeline(args.model, dtype=DTYPES[args.dtype])
    config = trajectory_config(args)
    if "own_index" not in frame and "train_index" in frame:
        frame["own_index"] = frame["train_index"]
    setup = EvaluationSetup(frame, bank, embedder, threshold, config)
    if args.classifier:
        from detect.classifier import FindingsClassifier, label_matrix
        from mitigate.evaluate import ClassifierMetrics

        metrics = ClassifierMetrics(FindingsClassifier.load(args.classifier), train["image"])
        labels = label_matrix(train)
        own = frame["own_index"].to_numpy() if "own_index" in frame else np.full(len(frame), -1)
        setup.quality, setup.fidelity = metrics.quality, metrics.fidelity
        setup.features, setup.fid_of = metrics.features, metrics.fid_of
        setup.labels = np.where((own >= 0)[:, None], labels[np.maximum(own, 0)], np.nan)
        print(f"quality features: {metrics.extractor.name}")
    args.training_dataset = args.training_dataset or args.dataset
    methods = {}
    for spec in args.methods:
        label, name, settings = parse_method(spec)
        methods[label] = build_method(name, settings, pipe, config, args)
    report = evaluate_methods(pipe, setup, methods)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_table(report.table, out, "mitigation")
    per_prompt = pd.concat(
        [run.per_prompt.assign(method=name) for name, run in report.runs.items()]
    )
    write_table(per_prompt, out, "mitigation_per_prompt")
    write_json(
        {
            "model": args.model,
            "threshold": threshold,
            "threshold_calibration": calibration.record(),
            "embedder": report.embedder,
            "methods": {name: run.description for name, run in report.runs.items()},
            "table": report.table.to_dict(orient="records"),
        },
        out / "mitigation.json",
    )
    columns = ["method", "group", "copy_rate", "own_similarity", "diversity", "score"]
    columns += [c for c in ("fid", "fidelity") if c in report.table]
    print(report.table[[*columns, "seconds_per_prompt"]].to_string(index=False))


def add_calibration_flags(p: argparse.ArgumentParser) -> None:
    """Flags of the held-out prompts that calibrate the embedding target."""
    p.add_argument(
        "--calibration_prompts",
        help="held-out (non-memorized) prompt file that calibrates the embedding target",
    )
    p.add_argument("--calibration_dataset", help="...or a dataset with a held-out split")
    p.add_argument(
        "--calibration_split",
        default="test",
        help="split of --calibration_dataset (default: %(default)s)",
    )
    p.add_argument(
        "--num_calibration",
        type=int,
        default=64,
        help="held-out prompts the target is calibrated on (default: %(default)s)",
    )
    p.add_argument(
        "--target_quantile",
        type=float,
        default=0.1,  # = mitigate.embedding.TARGET_QUANTILE (not imported: it loads torch)
        help="embedding target: this quantile of the held-out prompts' step-1 scores, in (0, 1] "
        "(default: %(default)s)",
    )
    p.add_argument("--neurons", help="neurons.json of `chexmem neurons` (for method neurons)")
    p.add_argument(
        "--training_dataset",
        help="saved dataset for method amg: generations are guided away from its train split; "
        "its --calibration_split sets the similarity's zero (evaluate: --dataset by default); "
        "for method uce: its train prompts, less the erased ones, are preserved",
    )
    p.add_argument(
        "--erase_prompts",
        help="prompt file (e.g. the flagged prompts) whose prompts method uce edits away",
    )


def add_mitigate_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `chexmem mitigate ...`."""
    from mitigate.registry import MITIGATIONS

    names = ", ".join(MITIGATIONS)
    top = subparsers.add_parser("mitigate", help="reduce memorization at inference time")
    commands = top.add_subparsers(dest="mitigate_command", required=True)

    p = commands.add_parser("generate", help="generate a prompt set with one mitigation")
    add_model_flags(p)
    add_prompt_flags(p)
    add_trajectory_flags(p, generations=4)
    p.add_argument(
        "--method",
        required=True,
        help=f"NAME[:key=value,...], e.g. random_tokens; names: {names}",
    )
    add_calibration_flags(p)
    p.add_argument(
        "--batch_size",
        type=int,
        default=32,
        help="generations per UNet call (default: %(default)s)",
    )
    p.add_argument(
        "--output_dir",
        default="chexmem-mitigate",
        help="folder for images/, magnitudes, prompts.csv, summary.json (default: %(default)s)",
    )
    add_config_flag(p)
    p.set_defaults(func=cmd_generate, _parser=p)

    p = commands.add_parser("prune", help="save a model with memorization neurons zeroed")
    add_model_flags(p)
    p.add_argument("--neurons", required=True, help="neurons.json of `chexmem neurons`")
    p.add_argument(
        "--min_frequency",
        type=int,
        default=1,
        help="zero only neurons found for at least N prompts (default: %(default)s)",
    )
    p.add_argument("--output_dir", required=True, help="folder of the edited model")
    p.add_argument("--overwrite", action="store_true", help="replace --output_dir if it exists")
    add_config_flag(p)
    p.set_defaults(func=cmd_prune, _parser=p)

    p = commands.add_parser("evaluate", help="compare mitigations on the same prompts and seeds")
    add_model_flags(p)
    p.add_argument("--prompts", required=True, help="CSV: prompt, group, own_index (optional)")
    p.add_argument("--dataset", required=True, help="the saved training dataset")
    p.add_argument(
        "--split",
        default="train",
        help="training split: the images copies are searched among (default: %(default)s)",
    )
    p.add_argument(
        "--heldout_split",
        default="test",
        help="split of real images that calibrates the copy threshold (default: %(default)s)",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=["none", "random_tokens", "attention_scaling"],
        help=f"methods to compare, each [LABEL=]NAME[:key=value,...]; names: {names} "
        "(default: none random_tokens attention_scaling)",
    )
    add_trajectory_flags(p, generations=4)
    add_calibration_flags(p)
    p.add_argument(
        "--size",
        type=int,
        default=64,
        help="images are resized to this side in pixels for pixel NCC (default: %(default)s)",
    )
    p.add_argument(
        "--percentile",
        type=float,
        default=95.0,
        help="copy threshold: this percentile of held-out images' nearest-training NCC "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--copy_threshold",
        type=float,
        help="NCC at or above which a generation is a copy (default: from --percentile)",
    )
    p.add_argument(
        "--classifier",
        help="a findings classifier folder (detect.classifier): adds FID / KID with its "
        "features against the training images, and conditioning fidelity",
    )
    p.add_argument(
        "--batch_size",
        type=int,
        default=32,
        help="generations per UNet call (default: %(default)s)",
    )
    p.add_argument(
        "--output_dir",
        default="chexmem-mitigate",
        help="folder for the mitigation table and mitigation.json (default: %(default)s)",
    )
    add_config_flag(p)
    p.set_defaults(func=cmd_evaluate, _parser=p)
