"""`chexmem study --seeds 0 1 2`: the whole study once per seed, then the spread of its figures.

Each seed is a complete study in ``OUTPUT_DIR/seed-K/`` (data, fine-tunes and detection all
drawn with seed K; cached and resumable like any study). ``OUTPUT_DIR/report.html`` (and
``report.md``, ``metrics.json``) then give, for every model and detector, the mean, the
sample standard deviation and the per-seed values of each detection figure (AUC and its
interval, TPR@1%FPR, Spearman with copies and with copy similarity, seconds per prompt,
AUC per copy count).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from hf_datasets.errors import ChexmemError
from scripts.report import Section, Table, write_report
from scripts.study.config import StudyConfig

FIGURES = ("auc", "auc_low", "auc_high", "tpr_at_1pct_fpr", "spearman_copies",
           "spearman_similarity", "seconds_per_prompt")  # fmt: skip
SHOWN = ("auc", "tpr_at_1pct_fpr", "spearman_copies", "spearman_similarity", "seconds_per_prompt")


def seed_configs(config: StudyConfig, seeds: Sequence[int]) -> dict[int, StudyConfig]:
    """One study per seed, each in OUTPUT_DIR/seed-K."""
    if len(set(seeds)) != len(seeds) or not seeds:
        raise ChexmemError(f"--seeds must be distinct integers, got {list(seeds)}")
    return {
        seed: dataclasses.replace(config, seed=seed, output_dir=str(config.out / f"seed-{seed}"))
        for seed in seeds
    }


def seed_table(folders: dict[int, Path]) -> pd.DataFrame:
    """Every detection figure of every seed's detection.json: one row per model, detector,
    figure, with its mean, sd (ddof 1) and each seed's value."""
    values: dict[tuple[str, str, str], dict[int, float]] = {}
    for seed, folder in folders.items():
        path = folder / "detection.json"
        if not path.is_file():
            raise ChexmemError(f"seed {seed} has no {path}: run its study first")
        for model, result in json.loads(path.read_text())["models"].items():
            for copies, rate in result.get("copy_rate_by_copies", {}).items():  # ground truth
                figure = f"copy_rate_copies_{copies}"
                values.setdefault((model, "(copy rate)", figure), {})[seed] = float(rate["rate"])
            for detector, figures in result.get("detectors", {}).items():
                found = {f: figures[f] for f in FIGURES if figures.get(f) is not None}
                found |= {f"auc_copies_{k}": v for k, v in figures.get("by_copies", {}).items()}
                for figure, value in found.items():
                    values.setdefault((model, detector, figure), {})[seed] = float(value)
    rows = []
    for (model, detector, figure), per_seed in values.items():
        array = np.array(list(per_seed.values()))
        rows.append(
            {
                "model": model,
                "detector": detector,
                "figure": figure,
                "mean": float(array.mean()),
                "sd": float(array.std(ddof=1)) if len(array) > 1 else float("nan"),
                "seeds": len(array),
                **{f"seed_{s}": v for s, v in per_seed.items()},
            }
        )
    return pd.DataFrame(rows)


def write_seed_summary(config: StudyConfig, folders: dict[int, Path]) -> pd.DataFrame:
    """OUTPUT_DIR/report.md, report.html and metrics.json: every figure's mean +- sd."""
    table = seed_table(folders)
    value = [f"{m:.3f} +- {s:.3f}" for m, s in zip(table["mean"], table["sd"], strict=True)]
    wide = table.assign(value=value).pivot_table(
        index=["model", "detector"], columns="figure", values="value", aggfunc="first"
    )
    shown = [c for c in SHOWN if c in wide] + sorted(c for c in wide if c.startswith("auc_copies"))
    shown += sorted(c for c in wide if c.startswith("copy_rate_copies"))  # the ground truth
    seeds = ", ".join(map(str, folders))
    section = Section(
        "Detection over seeds",
        [f"Seeds {seeds}: each its own data, fine-tunes and detection (reports in seed-K/)."],
        tables=[
            Table(
                "Each detector's figures, mean +- sample sd over the seeds",
                wide[shown].reset_index(),
                "AUC and TPR@1%FPR: duplicated vs held-out prompts; auc_copies_K: duplicated "
                "rows with K copies vs held-out; Spearman over every prompt; rows '(copy "
                "rate)': copy_rate_copies_K, the share of generations that copy a training "
                "image, for prompts of rows with K copies (0: held-out, 1: ordinary).",
            )
        ],
    )
    figures = table.astype(object).where(table.notna(), None).to_dict(orient="records")
    metrics = {"seeds": list(folders), "detection_over_seeds": figures}
    write_report(config.out, f"chexmem study {config.name} over seeds {seeds}", [section], metrics)
    return table
