"""`chexmem detect`, `tokens`, `neurons`, `similarity` (``accelerate launch -m detect`` shards).

`detect` writes to ``--output_dir``: ``magnitudes.parquet`` / ``.csv`` (one row per prompt,
generation and step), ``scores.csv`` (one row per prompt), and ``summary.json`` (settings,
timings and, when the prompts carry labels, AUC and TPR@1%FPR). Under ``accelerate launch``
(or ``torchrun``) every process scores its share of the prompts and the main process
gathers and writes the tables; seeds follow prompt ids, so the result is the same.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from detect.registry import DETECTORS
from hf_datasets.cliutils import add_config_flag, run_command, setup_logging
from hf_datasets.errors import ChexmemError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """Flags naming the model and its precision."""
    p.add_argument(
        "--model",
        "--pretrained_model_name_or_path",
        dest="model",
        required=True,
        help="a fine-tune output folder (full, LoRA or subset), a pipeline folder or a Hub id",
    )
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="float32",
        help="precision the model runs in; float16 / bfloat16 halve GPU memory "
        "(default: %(default)s)",
    )


def add_prompt_flags(p: argparse.ArgumentParser) -> None:
    """Flags naming the prompt set."""
    p.add_argument(
        "--prompts", help="prompt file: .txt (one per line), .csv/.jsonl/.parquet (or --dataset)"
    )
    p.add_argument(
        "--dataset", help="a saved chexmem dataset: its distinct prompts, labelled (or --prompts)"
    )
    p.add_argument("--split", default="train", help="split of --dataset (default: %(default)s)")
    p.add_argument("--num_prompts", type=int, help="use only the first N prompts (default: all)")


def add_trajectory_flags(p: argparse.ArgumentParser, generations: int) -> None:
    """Flags of the sampling trajectory (Wen et al.'s reference values as defaults)."""
    p.add_argument(
        "--num_inference_steps",
        type=int,
        default=50,
        help="denoising steps of the sampler (DDIM) (default: %(default)s)",
    )
    p.add_argument(
        "--guidance_scale",
        type=float,
        default=7.5,
        help="classifier-free guidance scale; 1: no guidance (default: %(default)s)",
    )
    p.add_argument(
        "--num_generations",
        type=int,
        default=generations,
        help="generations (initial noises) per prompt (default: %(default)s)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="base seed: generation j of prompt i starts from seed + 1000 i + j "
        "(default: %(default)s)",
    )


def write_table(frame: pd.DataFrame, out: Path, name: str) -> None:
    """A table as parquet and CSV, each written under a temporary name, then renamed."""
    for suffix, write in ((".parquet", frame.to_parquet), (".csv", frame.to_csv)):
        target = out / f"{name}{suffix}"
        partial = target.with_name(f".{target.name}.partial")
        write(partial, index=False)
        partial.replace(target)


def write_json(data: dict[str, Any], path: Path) -> None:
    """Strict JSON (NaN and infinities as null) written atomically, under a partial name of
    its own so that concurrent writers never mix."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(_strict(data), indent=1, default=str, allow_nan=False) + "\n")
    partial.replace(path)


def _strict(value: Any) -> Any:
    """The value with non-finite floats replaced by None, recursively."""
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    if isinstance(value, float | np.floating) and not np.isfinite(value):
        return None
    return value


def cmd_detect(args: argparse.Namespace) -> None:
    """Noise magnitudes of a prompt set, sharded over processes, with a summary."""
    from accelerate import PartialState
    from accelerate.utils import gather_object, parse_flag_from_env

    from detect.base import SamplingPass
    from detect.evaluate import detection
    from detect.magnitude import MagnitudeConfig, decode_latents, noise_magnitudes
    from detect.models import load_pipeline
    from detect.prompt_sets import load_prompt_set
    from detect.registry import make_detectors

    # PartialState, unlike Accelerator, does not read ACCELERATE_USE_CPU itself
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    prompts = load_prompt_set(args.prompts, args.dataset, args.split, args.num_prompts)
    detectors = make_detectors(args.detector)
    config = MagnitudeConfig(
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        num_generations=args.num_generations,
        max_steps=args.max_steps,
        seed=args.seed,
        batch_size=args.batch_size,
        progress=state.is_local_main_process,
    )
    if args.save_images and config.max_steps is not None:
        raise ChexmemError("--save_images needs whole trajectories: drop --max_steps")
    pipe = load_pipeline(args.model, device=state.device, dtype=DTYPES[args.dtype])
    out = Path(args.output_dir)  # made once the model loaded: a bad --model writes nothing
    if state.is_main_process:
        (out / "images" if args.save_images else out).mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()
    start = time.perf_counter()
    rows = list(zip(prompts["prompt_id"], prompts["prompt"], strict=True))
    with state.split_between_processes(rows) as shard:
        ids = [int(i) for i, _ in shard]
        texts = [p for _, p in shard]
        keep_first = any(d.needs_first_step for d in detectors)
        result = noise_magnitudes(
            pipe, texts, config, ids, keep_final=args.save_images, keep_first_step=keep_first
        )
        shared = SamplingPass(
            pipe, texts, ids, config, result.table, args.first_k, result.first_step
        )
        pass_seconds = time.perf_counter() - start
        shard_scores, own_seconds = {}, {}
        for detector in detectors:
            began = time.perf_counter()
            shard_scores[detector.name] = detector.score(shared)
            own_seconds[detector.name] = time.perf_counter() - began
    seconds = time.perf_counter() - start
    images = []
    if args.save_images and ids:
        decoded = decode_latents(pipe, result.final_latents, args.batch_size)
        generations = result.table[result.table["step"] == 0][["prompt_id", "generation", "seed"]]
        for image, (prompt_id, generation, seed) in zip(
            decoded, generations.itertuples(index=False), strict=True
        ):
            name = f"images/p{prompt_id:05d}_g{generation:02d}.png"
            image.save(out / name)
            images.append((prompt_id, generation, seed, name))
    tables = gather_object([result.table])
    images = gather_object(images)
    parts = gather_object([shard_scores])
    timings = gather_object([(pass_seconds, own_seconds)])
    if not state.is_main_process:
        return
    table = pd.concat(tables, ignore_index=True).sort_values(["prompt_id", "generation", "step"])
    table = table.reset_index(drop=True)
    scores, columns = prompts.copy(), {}
    for detector in detectors:
        frame = pd.concat([part[detector.name] for part in parts])
        columns[detector.name] = list(frame.columns)
        for column in frame.columns:
            scores[column] = frame[column].reindex(scores["prompt_id"]).values
    write_table(table, out, "magnitudes")
    write_table(scores, out, "scores")
    if args.save_images:
        frame = pd.DataFrame(images, columns=["prompt_id", "generation", "seed", "file_name"])
        write_table(frame.sort_values(["prompt_id", "generation"]), out, "images")
    summary: dict[str, Any] = {
        "model": str(args.model),
        "prompts": len(prompts),
        "config": asdict(config),
        "detectors": columns,  # each detector's columns of scores.csv
        "processes": state.num_processes,
        "seconds": round(seconds, 3),
        "seconds_per_prompt": round(seconds / len(prompts), 4),
        # each detector's cost: the shared pass (slowest process) plus its own calls
        "detector_seconds_per_prompt": {
            d.name: round(max(p + own[d.name] for p, own in timings) / len(prompts), 4)
            for d in detectors
        },
    }
    if "label" in scores and scores["label"].nunique() == 2:
        summary["detection"] = {
            column: detection(scores["label"], scores[column]).to_dict()
            for column in scores.columns
            if column.startswith("score_")
        }
    write_json(summary, out / "summary.json")
    n = config.num_generations
    print(f"scored {len(prompts)} prompts x {n} generations in {seconds:.1f} s")
    for column, result in summary.get("detection", {}).items():
        print(f"  {column}: AUC {result['auc']:.3f}, TPR@1%FPR {result['tpr_at_1pct_fpr']:.3f}")
    print(f"wrote {out}/magnitudes.parquet, scores.csv, summary.json")


def cmd_tokens(args: argparse.Namespace) -> None:
    """Token significance of prompts, the removal check, terminal and HTML renderings."""
    from detect.models import load_pipeline
    from detect.prompt_sets import load_prompt_set
    from detect.tokens import (
        TokenConfig,
        removal_check,
        render_html,
        render_terminal,
        token_significance,
        use_color,
    )

    if args.prompt:
        prompts = pd.DataFrame({"prompt_id": [0], "prompt": [args.prompt]})
    else:
        prompts = load_prompt_set(args.prompts, args.dataset, args.split, args.num_prompts)
    config = TokenConfig(
        steps=args.steps,
        num_generations=args.num_generations,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
        top_k=args.top_k,
    )
    pipe = load_pipeline(args.model, dtype=DTYPES[args.dtype])
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    frames, checks, pages = [], [], []
    for prompt_id, prompt in zip(prompts["prompt_id"], prompts["prompt"], strict=True):
        significance = token_significance(pipe, prompt, config, int(prompt_id))
        frame = significance.to_frame()
        frame.insert(0, "prompt_id", int(prompt_id))
        frames.append(frame)
        check = removal_check(pipe, significance, config, int(prompt_id))
        checks.append({"prompt_id": int(prompt_id), **check, "special": significance.special})
        pages.append(render_html(significance))
        print(render_terminal(significance, color=use_color(sys.stdout)))
        print(
            f"  without {', '.join(check['removed'])}: score "
            f"{check['score_before']:.3f} -> {check['score_after']:.3f}"
        )
    write_table(pd.concat(frames, ignore_index=True), out, "tokens")
    write_json({"config": asdict(config), "removal": checks}, out / "tokens.json")
    page = "<!doctype html><meta charset=utf-8><title>chexmem trigger tokens</title>" + "".join(
        pages
    )
    (out / "tokens.html").write_text(page)
    lowered = sum(c["lowered"] for c in checks)
    print(f"removing the top tokens lowered {lowered} of {len(checks)} prompt scores")
    print(f"wrote {out}/tokens.parquet, tokens.csv, tokens.json, tokens.html")


EMBEDDERS = ("ncc", "ssim", "msssim", "tiled_l2")


def make_embedder(name: str, size: int) -> Any:
    """The copy-similarity embedder a `--embedder` name stands for."""
    from detect import similarity

    return {
        "ncc": similarity.NCCEmbedder,
        "ssim": similarity.SSIMEmbedder,
        "msssim": similarity.MSSSIMEmbedder,
        "tiled_l2": similarity.TiledL2Embedder,
    }[name](size=size)


def read_generations(folder: Path) -> tuple[pd.DataFrame, list[Any]]:
    """Generated images: a `chexmem detect --save_images` folder (images.csv) or any PNGs."""
    from PIL import Image

    listing = folder / "images.csv"
    if listing.is_file():
        frame = pd.read_csv(listing)
    else:
        files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))
        frame = pd.DataFrame({"prompt_id": range(len(files)), "generation": 0, "file_name": files})
    if frame.empty:
        raise ChexmemError(f"{folder} holds no generated images (images.csv or *.png)")
    images = []
    for name in frame["file_name"]:
        with Image.open(folder / name) as image:
            images.append(image.convert("L"))
    return frame, images


def cmd_similarity(args: argparse.Namespace) -> None:
    """Nearest training images of generations, a calibrated copy threshold, copy rates."""
    from detect.calibration import given
    from detect.similarity import SearchConfig, TrainingBank, calibrate_threshold, detect_copies
    from hf_datasets.storage import load_dataset_dir

    folder = Path(args.generations)
    frame, generated = read_generations(folder)
    splits = load_dataset_dir(Path(args.dataset).expanduser())
    for split in (args.split, args.heldout_split):
        if split not in splits:
            raise ChexmemError(f"no split {split!r} in {args.dataset}; it has {', '.join(splits)}")
    train = splits[args.split]
    embedder = make_embedder(args.embedder, args.size)
    search = SearchConfig(max_memory_mb=args.max_memory_mb)
    columns = train.column_names
    bank = TrainingBank.from_images(
        train["image"],
        embedder,
        patient_ids=train["patient_id"] if "patient_id" in columns else None,
        image_ids=train["source_path"] if "source_path" in columns else None,
        study_ids=train["study_id"] if "study_id" in columns else None,
    )
    calibration = (
        given("copy threshold", args.copy_threshold)
        if args.copy_threshold is not None
        else calibrate_threshold(
            splits[args.heldout_split]["image"], bank, embedder, args.percentile, search
        )
    )
    threshold = calibration.value
    own = None
    scores = folder / "scores.csv"
    if scores.is_file() and "train_index" in pd.read_csv(scores, nrows=0).columns:
        rows = pd.read_csv(scores).set_index("prompt_id")["train_index"]
        own = [None if rows.get(i, -1) < 0 else int(rows[i]) for i in frame["prompt_id"]]
    report = detect_copies(
        generated, bank, frame["prompt_id"], embedder, threshold, own, config=search
    )
    table = report.table
    table["generation"] = frame["generation"].to_numpy()
    table.insert(2, "file_name", frame["file_name"].to_numpy())
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_table(table, out, "matches")
    write_table(report.summary.reset_index(), out, "prompts")
    summary = {
        "generations": len(table),
        "prompts": int(table["prompt_id"].nunique()),
        "embedder": report.embedder,
        "threshold": threshold,
        "threshold_from": "given (--copy_threshold)"
        if args.copy_threshold is not None
        else f"{args.percentile}th percentile of {args.heldout_split} images' "
        f"nearest-{args.split} similarity",
        "threshold_calibration": calibration.record(),
        "copy_rate": report.copy_rate,
        "mean_nearest_similarity": float(table["nearest_similarity"].mean()),
    }
    write_json(summary, out / "summary.json")
    print(
        f"{len(table)} generations vs {len(train)} training images ({report.embedder}): "
        f"copy threshold {threshold:.4f}, copy rate {report.copy_rate:.1%}"
    )
    print(f"wrote {out}/matches.parquet, prompts.csv, summary.json")


def cmd_neurons(args: argparse.Namespace) -> None:
    """NEMO: the cross-attention value neurons that carry each prompt's memorization."""
    from detect.calibration import given
    from detect.models import load_pipeline
    from detect.neurons import (
        NemoConfig,
        calibrate_threshold,
        localize_prompts,
        reference_statistics,
    )
    from detect.prompt_sets import load_prompt_set

    prompts = load_prompt_set(args.prompts, args.dataset, args.split, args.num_prompts)
    if args.memorized_only:
        if "label" not in prompts:
            raise ChexmemError("--memorized_only needs prompts with a label (a --dataset)")
        prompts = prompts[prompts["label"] == 1]
    reference = load_prompt_set(
        args.reference_prompts, args.reference_dataset, args.reference_split, args.num_reference
    )
    config = NemoConfig(
        num_seeds=args.num_seeds,
        num_inference_steps=args.num_inference_steps,
        noise_step_index=args.noise_step_index,
        seed=args.seed,
        include_up_blocks=args.include_up_blocks,
    )
    pipe = load_pipeline(args.model, dtype=DTYPES[args.dtype])
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    stats = reference_statistics(
        pipe, list(reference["prompt"]), config, cache_dir=args.cache_dir or out / "reference"
    )
    calibration = (
        given("tau_mem", args.tau_mem)
        if args.tau_mem is not None
        else calibrate_threshold(pipe, list(reference["prompt"]), config)
    )
    tau = calibration.value
    report = localize_prompts(
        pipe, list(prompts["prompt"]), stats, tau, config, list(prompts["prompt_id"])
    )
    seconds = time.perf_counter() - start
    summary = report.summary.merge(prompts, on="prompt_id", how="left")
    write_table(summary, out, "neurons_per_prompt")
    write_table(report.frequency, out, "neuron_frequency")
    write_table(report.per_layer, out, "neurons_per_layer")
    write_json(
        {
            "tau_mem": tau,
            "tau_mem_from": "given" if args.tau_mem is not None else "calibrated on reference",
            "tau_mem_calibration": calibration.record(),
            "reference_prompts": len(reference),
            "reference_from_cache": stats.from_cache,
            "config": asdict(config),
            "seconds": round(seconds, 3),
            "neurons": {str(r.prompt_id): r.neurons for r in report.results},
        },
        out / "neurons.json",
    )
    memorized = int(summary["memorized"].sum())
    print(f"tau_mem {tau:.4f}; {memorized} of {len(summary)} prompts memorized (NEMO)")
    for result in report.results:
        if result.memorized:
            print(
                f"  prompt {result.prompt_id}: {result.num_neurons} neurons, SSIM "
                f"{result.similarity:.3f} -> {result.score_final:.3f} blocked"
            )
    print(f"wrote {out}/neurons.json, neurons_per_prompt.csv, neuron_frequency.csv")


def add_detect_flags(p: argparse.ArgumentParser) -> None:
    """Every flag of `chexmem detect` / `python -m detect`."""
    add_model_flags(p)
    add_prompt_flags(p)
    add_trajectory_flags(p, generations=4)
    p.add_argument(
        "--max_steps", type=int, help="stop each trajectory after this many steps (default: all)"
    )
    p.add_argument(
        "--first_k",
        type=int,
        default=1,
        help="also score each prompt by its mean noise magnitude over the first k sampling "
        "steps (default: %(default)s)",
    )
    p.add_argument(
        "--detector",
        nargs="+",
        choices=list(DETECTORS),
        default=["magnitude"],
        metavar="NAME",
        help=f"detectors to score with, one pass over the prompts ({', '.join(DETECTORS)}; "
        "default: magnitude)",
    )
    p.add_argument(
        "--batch_size",
        type=int,
        default=32,
        help="generations per UNet call (default: %(default)s)",
    )
    p.add_argument(
        "--save_images",
        action="store_true",
        help="also decode and save every generation (images/, listed in images.csv)",
    )
    p.add_argument(
        "--output_dir",
        default="chexmem-detect",
        help="folder for magnitudes, scores.csv and summary.json (default: %(default)s)",
    )
    add_config_flag(p)


def add_detect_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `chexmem detect` and `chexmem tokens`."""
    p = subparsers.add_parser("detect", help="noise-magnitude memorization scores of prompts")
    add_detect_flags(p)
    p.set_defaults(func=cmd_detect, _parser=p)

    p = subparsers.add_parser("tokens", help="trigger tokens: which words drive the score")
    add_model_flags(p)
    p.add_argument("--prompt", help="one prompt (or use --prompts / --dataset)")
    add_prompt_flags(p)
    add_trajectory_flags(p, generations=4)
    p.add_argument(
        "--steps",
        type=int,
        default=1,
        help="first sampling steps the token gradient is averaged over (default: %(default)s)",
    )
    p.add_argument(
        "--top_k",
        type=int,
        default=3,
        help="trigger tokens whose words the removal check deletes (default: %(default)s)",
    )
    p.add_argument(
        "--output_dir",
        default="chexmem-tokens",
        help="folder for tokens.csv/.parquet, tokens.json, tokens.html (default: %(default)s)",
    )
    add_config_flag(p)
    p.set_defaults(func=cmd_tokens, _parser=p)

    p = subparsers.add_parser("neurons", help="NEMO: localize memorization neurons")
    add_model_flags(p)
    add_prompt_flags(p)
    p.add_argument("--memorized_only", action="store_true", help="only prompts labelled 1")
    p.add_argument("--reference_prompts", help="non-memorized prompts for the statistics")
    p.add_argument("--reference_dataset", help="...or a dataset whose split is not memorized")
    p.add_argument(
        "--reference_split",
        default="test",
        help="split of --reference_dataset (default: %(default)s)",
    )
    p.add_argument("--num_reference", type=int, help="use only the first N reference prompts")
    p.add_argument(
        "--num_seeds",
        type=int,
        default=10,
        help="initial noises per prompt whose noise predictions are compared, >= 2 "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--num_inference_steps",
        type=int,
        default=50,
        help="steps of the DDIM schedule the measured timestep comes from (default: %(default)s)",
    )
    p.add_argument(
        "--noise_step_index",
        type=int,
        default=0,
        help="index of the measured timestep in that schedule; 0: t = T as in the paper, "
        "1: the public code (default: %(default)s)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="base seed: seed j of prompt i is seed + 1000 i + j (default: %(default)s)",
    )
    p.add_argument(
        "--include_up_blocks",
        action="store_true",
        help="also search the up blocks' cross-attention (the paper: down and mid only)",
    )
    p.add_argument(
        "--tau_mem",
        type=float,
        help="SSIM memorization threshold tau_mem (default: mean + 1 std of the reference "
        "prompts' largest pairwise SSIM)",
    )
    p.add_argument("--cache_dir", help="reference statistics cache (default: OUT/reference)")
    p.add_argument(
        "--output_dir",
        default="chexmem-neurons",
        help="folder for neurons.json and the per-prompt / per-layer tables (default: %(default)s)",
    )
    add_config_flag(p)
    p.set_defaults(func=cmd_neurons, _parser=p)

    p = subparsers.add_parser(
        "similarity", help="copy check: nearest training images of generated images"
    )
    p.add_argument(
        "--generations", required=True, help="a `chexmem detect --save_images` folder or PNGs"
    )
    p.add_argument("--dataset", required=True, help="the saved training dataset")
    p.add_argument("--split", default="train", help="the training split (default: train)")
    p.add_argument(
        "--heldout_split",
        default="test",
        help="split of real held-out images that calibrates the copy threshold "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--embedder",
        choices=EMBEDDERS,
        default="ncc",
        help="similarity: ncc (pixel normalised cross-correlation), ssim, msssim (multi-scale "
        "SSIM), tiled_l2 (Carlini et al.'s tiled L2) (default: %(default)s)",
    )
    p.add_argument(
        "--size",
        type=int,
        default=64,
        help="images are resized to this side in pixels before comparing (default: %(default)s)",
    )
    p.add_argument(
        "--percentile",
        type=float,
        default=95.0,
        help="copy threshold: this percentile of held-out images' nearest-training similarity "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--copy_threshold",
        type=float,
        help="use this copy threshold instead of calibrating one on --heldout_split (in the "
        "--embedder's similarity; default: calibrated)",
    )
    p.add_argument(
        "--max_memory_mb",
        type=int,
        default=512,
        help="working memory of the nearest-neighbour search in MB (default: %(default)s)",
    )
    p.add_argument(
        "--output_dir",
        default="chexmem-similarity",
        help="folder for matches, prompts.csv and summary.json (default: %(default)s)",
    )
    add_config_flag(p)
    p.set_defaults(func=cmd_similarity, _parser=p)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m detect` / `accelerate launch -m detect`: the flags of `chexmem detect`."""
    parser = argparse.ArgumentParser(prog="python -m detect", description=cmd_detect.__doc__)
    add_detect_flags(parser)
    parser.set_defaults(func=cmd_detect, _parser=parser)
    args = parser.parse_args(argv)
    setup_logging()
    return run_command(parser, args, argv)


if __name__ == "__main__":
    sys.exit(main())
