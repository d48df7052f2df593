"""`chexmem study --seeds 0 1 2`: the whole study once per seed, then the spread of its figures.

Each seed is a complete study in ``OUTPUT_DIR/seed-K/`` (data, fine-tunes and detection all
drawn with seed K; cached and resumable like any study). ``OUTPUT_DIR/report.html`` (and
``report.md``, ``metrics.json``) then give, for every model and detector, the mean, the
sample standard deviation and the per-seed values of each detection figure (AUC and its
interval, TPR@1%FPR, Spearman with copies and with copy similarity, seconds per prompt,
AUC per copy count) and, where the seeds ran the mitigation stage, of every mitigation row:
each inference-time method on the memorized and the ordinary prompts, the training-time
filter and the capacity fine-tunes (copy rate, its change, FID and its change, the methods'
own facts, the number of memorized prompts).
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
# mitigation figures over seeds: (file, rows key, the key naming a row)
MITIGATION_ROWS = (("mitigation.json", "inference", "method"),
                   ("mitigation_models.json", "training", "model"),
                   ("mitigation_models.json", "capacity", "model"))  # fmt: skip
MITIGATION_FIGURES = ("copy_rate", "copy_rate_change", "fid", "fid_change", "target_reached",
                      "iterations", "guided_share", "trainable_share")  # fmt: skip
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
    return spread(values, ("model", "detector", "figure"))


def spread(values: dict[tuple, dict[int, float]], keys: Sequence[str]) -> pd.DataFrame:
    """One row per key tuple: its mean, sample sd (ddof 1), number of seeds and each value."""
    rows = []
    for key, per_seed in values.items():
        array = np.array(list(per_seed.values()))
        rows.append(
            {
                **dict(zip(keys, key, strict=True)),
                "mean": float(array.mean()),
                "sd": float(array.std(ddof=1)) if len(array) > 1 else float("nan"),
                "seeds": len(array),
                **{f"seed_{s}": v for s, v in per_seed.items()},
            }
        )
    return pd.DataFrame(rows, columns=[*keys, "mean", "sd", "seeds"] if not rows else None)


def mitigation_seed_table(folders: dict[int, Path]) -> pd.DataFrame:
    """Every mitigation row's figures over the seeds that ran the mitigation stage: one row
    per (part, name, group, figure); part: inference, training or capacity."""
    values: dict[tuple[str, str, str, str], dict[int, float]] = {}
    for seed, folder in folders.items():
        for file, part, name_key in MITIGATION_ROWS:
            path = folder / file
            if not path.is_file():
                continue
            summary = json.loads(path.read_text())
            if part == "inference" and "memorized_prompts" in summary:
                key = ("inference", "(flagged)", "memorized", "prompts")
                values.setdefault(key, {})[seed] = float(summary["memorized_prompts"])
            for row in summary.get(part, []):
                for figure in MITIGATION_FIGURES:
                    if row.get(figure) is not None and np.isfinite(row[figure]):
                        key = (part, row[name_key], row["group"], figure)
                        values.setdefault(key, {})[seed] = float(row[figure])
    return spread(values, ("part", "name", "group", "figure"))


def write_seed_summary(config: StudyConfig, folders: dict[int, Path]) -> pd.DataFrame:
    """OUTPUT_DIR/report.md, report.html and metrics.json: every figure's mean +- sd."""
    table = seed_table(folders)
    value = mean_sd(table)
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
    metrics = {"seeds": list(folders), "detection_over_seeds": records(table)}
    sections = [section]
    mitigation = mitigation_seed_table(folders)
    if len(mitigation):
        pooled = pooled_copy_rates(folders)
        sections.append(mitigation_section(mitigation, seeds, pooled))
        metrics["mitigation_over_seeds"] = records(mitigation)
        metrics["mitigation_pooled"] = records(pooled)
    write_report(config.out, f"chexmem study {config.name} over seeds {seeds}", sections, metrics)
    return table


def pooled_copy_rates(folders: dict[int, Path], draws: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Per (method, group): the copy rate of every seed's prompts pooled, its 95% bootstrap
    interval (prompts resampled within each seed) and its change against none on the same
    draws; from each seed's mitigation_prompts.csv (seeds without one are left out)."""
    frames = {s: pd.read_csv(f / "mitigation_prompts.csv") for s, f in folders.items()
              if (f / "mitigation_prompts.csv").is_file()}  # fmt: skip
    rows: list[dict] = []
    rng = np.random.default_rng(seed)
    groups = dict.fromkeys(g for frame in frames.values() for g in frame["group"])
    for group in groups:
        tables = [t for t in (by_method(f, group) for f in frames.values()) if len(t)]
        methods = [m for m in tables[0].columns if all(m in t for t in tables)]
        if "none" not in methods:
            continue
        values = [t[methods].to_numpy(dtype=float) for t in tables]
        total = sum(len(v) for v in values)
        sums = sum(v[rng.integers(0, len(v), (draws, len(v)))].sum(axis=1) for v in values)
        boot = sums / total  # (draws, methods)
        point = np.concatenate(values).mean(axis=0)
        base = methods.index("none")
        with np.errstate(divide="ignore", invalid="ignore"):
            change = boot / boot[:, [base]] - 1.0
        for i, method in enumerate(methods):
            low, high = np.nanpercentile(change[:, i], [2.5, 97.5]) if i != base else (0, 0)
            rows.append({
                "method": method, "group": group, "seeds": len(values), "prompts": total,
                "copy_rate": point[i], "copy_rate_low": np.percentile(boot[:, i], 2.5),
                "copy_rate_high": np.percentile(boot[:, i], 97.5),
                "copy_rate_change": point[i] / point[base] - 1.0 if point[base] else np.nan,
                "copy_rate_change_low": low, "copy_rate_change_high": high,
            })  # fmt: skip
    return pd.DataFrame(rows)


def by_method(frame: pd.DataFrame, group: str) -> pd.DataFrame:
    """One group's per-prompt copy rates: a row per prompt, a column per method."""
    rows = frame[frame["group"] == group]
    return rows.pivot(index="prompt_index", columns="method", values="copy_rate")


def mean_sd(table: pd.DataFrame) -> list[str]:
    """Each row's mean +- sd, as the reports print it."""
    return [f"{m:.3f} +- {s:.3f}" for m, s in zip(table["mean"], table["sd"], strict=True)]


def records(table: pd.DataFrame) -> list[dict]:
    """A table as JSON rows, NaN as null."""
    return table.astype(object).where(table.notna(), None).to_dict(orient="records")


def mitigation_section(table: pd.DataFrame, seeds: str, pooled: pd.DataFrame) -> Section:
    """The mitigation rows' mean +- sd over the seeds, one table per part, and the pooled
    copy rates of the inference-time methods."""
    value = mean_sd(table)
    tables = []
    for part, rows in table.assign(value=value).groupby("part", sort=False):
        wide = rows.pivot_table(index=["name", "group"], columns="figure", values="value",
                                aggfunc="first")  # fmt: skip
        shown = [c for c in ("prompts", *MITIGATION_FIGURES) if c in wide]
        tables.append(
            Table(
                f"Mitigation over seeds: {part}",
                wide[shown].reset_index(),
                "mean +- sample sd over the seeds; changes relative to none (inference) or to "
                "the plain fine-tune (training); the per-seed values are in metrics.json.",
            )
        )
    if len(pooled):
        tables.insert(1, Table(
            "Inference-time methods, every seed's prompts pooled",
            pooled.round(4),
            "copy rate of all seeds' prompts together, 95% bootstrap interval (prompts "
            "resampled within each seed), and its change against none on the same draws.",
        ))  # fmt: skip
    return Section(
        "Mitigation over seeds",
        [
            f"Seeds {seeds}: each seed's flagged prompts, copy threshold and quality features "
            "are its own; every method within a seed shares them."
        ],
        tables=tables,
    )
