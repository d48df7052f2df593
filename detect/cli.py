"""`chexmem detect` and `chexmem tokens` (``accelerate launch -m detect`` shards `detect`).

`detect` writes to ``--output_dir``: ``magnitudes.parquet`` / ``.csv`` (one row per prompt,
generation and step), ``scores.csv`` (one row per prompt), and ``summary.json`` (settings,
timings and, when the prompts carry labels, AUC and TPR@1%FPR). Under ``accelerate launch``
(or ``torchrun``) every process scores its share of the prompts and the main process
gathers and writes the tables; seeds follow prompt ids, so the result is the same.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd
import torch

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
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")


def add_prompt_flags(p: argparse.ArgumentParser) -> None:
    """Flags naming the prompt set."""
    p.add_argument("--prompts", help="prompt file: .txt (one per line), .csv/.jsonl/.parquet")
    p.add_argument("--dataset", help="a saved chexmem dataset: its distinct prompts, labelled")
    p.add_argument("--split", default="train", help="dataset split (default: train)")
    p.add_argument("--num_prompts", type=int, help="use only the first N prompts")


def add_trajectory_flags(p: argparse.ArgumentParser, generations: int) -> None:
    """Flags of the sampling trajectory (Wen et al.'s reference values as defaults)."""
    p.add_argument("--num_inference_steps", type=int, default=50)
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--num_generations", type=int, default=generations, help="n per prompt")
    p.add_argument("--seed", type=int, default=0)


def write_table(frame: pd.DataFrame, out: Path, name: str) -> None:
    """A table as parquet and CSV, each written under a temporary name, then renamed."""
    for suffix, write in ((".parquet", frame.to_parquet), (".csv", frame.to_csv)):
        target = out / f"{name}{suffix}"
        partial = target.with_name(f".{target.name}.partial")
        write(partial, index=False)
        partial.replace(target)


def write_json(data: dict[str, Any], path: Path) -> None:
    """JSON written atomically."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(data, indent=1, default=str) + "\n")
    partial.replace(path)


def cmd_detect(args: argparse.Namespace) -> None:
    """Noise magnitudes of a prompt set, sharded over processes, with a summary."""
    from accelerate import PartialState
    from accelerate.utils import gather_object, parse_flag_from_env

    from detect.evaluate import detection
    from detect.magnitude import MagnitudeConfig, decode_latents, noise_magnitudes
    from detect.models import load_pipeline
    from detect.prompt_sets import load_prompt_set

    # PartialState, unlike Accelerator, does not read ACCELERATE_USE_CPU itself
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    prompts = load_prompt_set(args.prompts, args.dataset, args.split, args.num_prompts)
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
    out = Path(args.output_dir)
    if state.is_main_process:
        (out / "images" if args.save_images else out).mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()
    pipe = load_pipeline(args.model, device=state.device, dtype=DTYPES[args.dtype])
    start = time.perf_counter()
    rows = list(zip(prompts["prompt_id"], prompts["prompt"], strict=True))
    with state.split_between_processes(rows) as shard:
        ids = [int(i) for i, _ in shard]
        result = noise_magnitudes(
            pipe, [p for _, p in shard], config, prompt_ids=ids, keep_final=args.save_images
        )
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
    if not state.is_main_process:
        return
    table = pd.concat(tables, ignore_index=True).sort_values(["prompt_id", "generation", "step"])
    table = table.reset_index(drop=True)
    scores = prompts.copy()
    for k in sorted({1, args.first_k}):
        if k <= config.steps_run:
            scores[f"score_first_{k}"] = _scores(table, k).reindex(scores["prompt_id"]).values
    scores["score_all_steps"] = _scores(table, None).reindex(scores["prompt_id"]).values
    write_table(table, out, "magnitudes")
    write_table(scores, out, "scores")
    if args.save_images:
        frame = pd.DataFrame(images, columns=["prompt_id", "generation", "seed", "file_name"])
        write_table(frame.sort_values(["prompt_id", "generation"]), out, "images")
    summary: dict[str, Any] = {
        "model": str(args.model),
        "prompts": len(prompts),
        "config": asdict(config),
        "processes": state.num_processes,
        "seconds": round(seconds, 3),
        "seconds_per_prompt": round(seconds / len(prompts), 4),
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


def _scores(table: pd.DataFrame, first_k: int | None) -> pd.Series:
    """Mean magnitude per prompt over the first k steps (None: all) and all generations."""
    if first_k is not None:
        table = table[table["step"] < first_k]
    return table.groupby("prompt_id")["magnitude"].mean()


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
        print(render_terminal(significance))
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


def add_detect_flags(p: argparse.ArgumentParser) -> None:
    """Every flag of `chexmem detect` / `python -m detect`."""
    add_model_flags(p)
    add_prompt_flags(p)
    add_trajectory_flags(p, generations=4)
    p.add_argument(
        "--max_steps", type=int, help="stop each trajectory after this many steps (default: all)"
    )
    p.add_argument("--first_k", type=int, default=1, help="score: mean over the first k steps")
    p.add_argument("--batch_size", type=int, default=32, help="generations per UNet call")
    p.add_argument(
        "--save_images",
        action="store_true",
        help="also decode and save every generation (images/, listed in images.csv)",
    )
    p.add_argument("--output_dir", default="chexmem-detect")
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
    p.add_argument("--steps", type=int, default=1, help="first steps the gradient averages")
    p.add_argument("--top_k", type=int, default=3, help="trigger tokens removed in the check")
    p.add_argument("--output_dir", default="chexmem-tokens")
    add_config_flag(p)
    p.set_defaults(func=cmd_tokens, _parser=p)


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
