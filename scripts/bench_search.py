"""MemControl benchmark: a study with one sampler, then a full fine-tune of the same budget.

OMP_NUM_THREADS=1 python -m scripts.bench_search --sampler nsga2   # and --sampler random
OMP_NUM_THREADS=1 python -m scripts.bench_search --compare bench-search/nsga2 bench-search/random
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from detect.models import load_pipeline
from train.config import TrainConfig
from train.search import (
    Objective,
    SearchConfig,
    held_out_quality,
    hypervolume,
    memorization_score,
    run_search,
)
from train.trainer import train


def full_reference(config: SearchConfig, objective: Objective, learning_rate: float) -> dict:
    """Both objectives of a full-UNet fine-tune with the trials' steps and batch."""
    run = Path(config.output_dir) / "full-reference"
    result = train(
        TrainConfig(
            pretrained_model_name_or_path=config.pretrained_model_name_or_path,
            train_data_dir=config.train_data_dir,
            output_dir=str(run),
            overwrite_output_dir=True,
            mode="full",
            learning_rate=learning_rate,
            lr_scheduler="constant",
            max_train_steps=config.max_train_steps,
            train_batch_size=config.train_batch_size,
            checkpointing_steps=config.max_train_steps + 1,
            seed=config.seed,
            cache_latents=True,
            report_to="jsonl",
        )
    )
    pipe = load_pipeline(run)
    # a full fine-tune trains only the UNet too: the base model's inputs still apply
    inputs = objective.duplicated
    return {
        "memorization": memorization_score(
            pipe, inputs, config.memorization_batches, config.train_batch_size, config.seed
        ),
        "fid": held_out_quality(pipe, objective).fid,
        "trainable_share": result.trainable_params / result.total_params,
        "learning_rate": learning_rate,
    }


def compare(folders: list[str]) -> dict:
    """Hypervolume of each study's trials against one reference point (10% beyond the worst
    memorization and FID over all studies), so fronts of different studies compare."""
    tables = {f: pd.read_csv(Path(f) / "trials.csv").query("state == 'COMPLETE'") for f in folders}
    columns = ["memorization", "fid"]
    reference = np.max([t[columns].to_numpy(float).max(axis=0) for t in tables.values()], axis=0)
    reference = reference * 1.1
    return {
        "reference": reference.tolist(),
        **{f: hypervolume(t[columns].to_numpy(float), reference) for f, t in tables.items()},
    }


def main() -> None:
    """Run the study and the reference; print both."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--base", default="chexmem-demo/pretrained")
    p.add_argument("--data", default="chexmem-demo/data")
    p.add_argument("--sampler", choices=["nsga2", "random"], default="nsga2")
    p.add_argument("--n_trials", type=int, default=12)
    p.add_argument("--output_dir", default="bench-search")
    p.add_argument("--reference_lr", type=float, default=1e-4)
    p.add_argument("--compare", nargs="+", help="study folders: hypervolumes on one reference")
    args = p.parse_args()
    if args.compare:
        print(json.dumps(compare(args.compare), indent=1))
        return
    config = SearchConfig(
        pretrained_model_name_or_path=args.base,
        train_data_dir=args.data,
        output_dir=f"{args.output_dir}/{args.sampler}",
        sampler=args.sampler,
        n_trials=args.n_trials,
    )
    start = time.perf_counter()
    table = run_search(config)
    print(table.drop(columns=["block_mask"]).to_string())
    print(f"search {time.perf_counter() - start:.1f} s")
    reference = full_reference(config, Objective(config), args.reference_lr)
    print(json.dumps({"full_reference": reference}))


if __name__ == "__main__":
    main()
