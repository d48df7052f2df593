"""Every mitigation against no mitigation, on the same prompts, seeds and copy threshold.

`evaluate_methods` generates each prompt group with each method (`mitigate.base.generate`:
identical starting latents for all), matches every generation to the training set with one
embedder and one calibrated copy threshold, and reports per method and group: copy rate,
similarity to the prompt's own training image, nearest-training similarity, diversity, the
step-1 detection score after mitigation, FID / KID against real images with a named feature
extractor, conditioning fidelity (a findings classifier applied to the generations) and
runtime per prompt. Relative changes against the "none" row are added when it was run.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from detect.classifier import FindingsClassifier, conditioning_fidelity
from detect.evaluate import copy_rate, percentile_interval, relative_change_interval
from detect.magnitude import MagnitudeConfig, decode_latents
from detect.quality import ClassifierFeatures, fid, quality
from detect.similarity import Embedder, TrainingBank, match_generations, prompt_diversity
from hf_datasets.errors import ChexmemError
from mitigate.base import Mitigation, generate

# A quality measure of generated images against its own real reference: -> {metric: value}
QualityFn = Callable[[list[Any]], dict[str, float]]
# A conditioning measure: (generated images, (N, findings) labels of their prompts) -> value
FidelityFn = Callable[[list[Any], np.ndarray], float]
# The quality features of images, and FID of feature rows against the real reference
FeaturesFn = Callable[[list[Any]], np.ndarray]
FidFn = Callable[[np.ndarray], float]
FID_BOOTSTRAP = 200  # draws for FID's intervals (each draw is one FID: a matrix square root)


class ClassifierMetrics:
    """FID / KID (the classifier's features) against fixed real images, and conditioning
    fidelity (the classifier's findings against the prompts' labels)."""

    def __init__(self, classifier: FindingsClassifier, real_images: list[Any]) -> None:
        self.classifier = classifier
        self.extractor = ClassifierFeatures(classifier)
        self.real_features = self.extractor.features(real_images)

    def quality(self, images: list[Any] | np.ndarray) -> dict[str, float]:
        """FID and KID of generations (or their `features`) against the real images (NaN for
        fewer than 2)."""
        if len(images) < 2:
            return {"fid": float("nan"), "kid_mean": float("nan")}
        rows = images if isinstance(images, np.ndarray) else self.extractor.features(images)
        result = quality(self.real_features, rows, self.extractor)
        return {"fid": result.fid, "kid_mean": result.kid_mean}

    def features(self, images: list[Any]) -> np.ndarray:
        """The classifier's feature rows of images (what FID compares)."""
        return self.extractor.features(images)

    def fid_of(self, rows: np.ndarray) -> float:
        """FID of feature rows against the real images."""
        return fid(self.real_features, rows) if len(rows) >= 2 else float("nan")

    def fidelity(self, images: list[Any], labels: np.ndarray) -> float:
        """Mean AUC over findings of the classifier's prediction against the prompts' labels."""
        return float(conditioning_fidelity(self.classifier, images, labels).mean_auc)


@dataclass
class EvaluationSetup:
    """What stays fixed across methods: prompts, seeds, training bank, threshold, metrics."""

    prompts: pd.DataFrame  # columns: prompt, group; optional own_index (bank row, -1 unknown)
    bank: TrainingBank
    embedder: Embedder
    threshold: float  # copy threshold, calibrated once (detect.similarity.calibrate_threshold)
    config: MagnitudeConfig = field(default_factory=MagnitudeConfig)
    quality: QualityFn | None = None  # e.g. FID / KID against real images
    labels: np.ndarray | None = None  # (prompts, findings) with 1 / 0 / nan, for fidelity
    fidelity: FidelityFn | None = None
    score_steps: int = 1
    features: FeaturesFn | None = None  # with `fid_of`: FID's bootstrap intervals over prompts
    fid_of: FidFn | None = None

    def __post_init__(self) -> None:
        missing = {"prompt", "group"} - set(self.prompts.columns)
        if missing:
            raise ChexmemError(f"the prompt table needs the columns {sorted(missing)}")
        if self.labels is not None and len(self.labels) != len(self.prompts):
            raise ChexmemError("labels must have one row per prompt")


@dataclass
class MethodRun:
    """One method's generations and their matches."""

    name: str
    images: list[Any]  # grouped by prompt, config.num_generations each
    matches: pd.DataFrame  # match_generations' table plus group
    per_prompt: pd.DataFrame
    seconds_per_prompt: float
    description: dict[str, Any]
    facts: list[str] = field(default_factory=list)  # per_prompt columns of the method's own
    quality_rows: np.ndarray | None = None  # setup.features of `images`, when it has them


@dataclass
class MitigationReport:
    """The comparison table and every method's runs."""

    table: pd.DataFrame  # one row per (method, group)
    runs: dict[str, MethodRun]
    threshold: float
    embedder: str


def run_method(pipe: Any, setup: EvaluationSetup, name: str, mitigation: Mitigation) -> MethodRun:
    """Generate every prompt with one method and match its generations to the training set."""
    prompts = setup.prompts
    ids = list(range(len(prompts)))
    mitigated = generate(pipe, list(prompts["prompt"]), setup.config, mitigation, ids)
    images = decode_latents(pipe, mitigated.result.final_latents)
    n = setup.config.num_generations
    generation_prompt = np.repeat(ids, n)
    own = prompts["own_index"].to_numpy() if "own_index" in prompts else None
    features = setup.embedder.embed(images)
    matches = match_generations(
        features,
        setup.bank,
        generation_prompt,
        embedder=setup.embedder,
        threshold=setup.threshold,
        own_index=None
        if own is None
        else [None if i < 0 else int(i) for i in own[generation_prompt]],
    )
    matches["group"] = prompts["group"].to_numpy()[generation_prompt]
    per_prompt = prompts[["prompt", "group"]].copy()
    per_prompt["used_prompt"] = mitigated.prompts
    per_prompt["score"] = mitigated.result.scores(first_k=setup.score_steps)
    grouped = matches.groupby("prompt_id")
    per_prompt["copy_rate"] = grouped["is_copy"].apply(lambda f: float(f.astype(bool).mean()))
    per_prompt["nearest_similarity"] = grouped["nearest_similarity"].mean()
    per_prompt["own_similarity"] = grouped["own_similarity"].mean()
    per_prompt["diversity"] = prompt_diversity(features, generation_prompt, setup.embedder)
    facts = mitigation.prompt_facts()
    for column, values in facts.items():
        per_prompt[column] = np.asarray(values, dtype=float)
    rows = setup.features(images) if setup.features is not None else None
    return MethodRun(
        name, images, matches, per_prompt, mitigated.seconds_per_prompt, mitigated.mitigation,
        list(facts), rows,
    )  # fmt: skip


def copy_rate_fields(matches: pd.DataFrame) -> dict[str, float]:
    """copy_rate with its 95% bootstrap interval over prompts (`copy_rate_low` / `_high`)."""
    found = copy_rate(matches["is_copy"].astype(float), matches["prompt_id"], threshold=1.0)
    return {"copy_rate": found.rate, "copy_rate_low": found.low, "copy_rate_high": found.high}


def summarise(run: MethodRun, setup: EvaluationSetup) -> list[dict[str, Any]]:
    """One row per prompt group of a method's run."""
    rows = []
    n = setup.config.num_generations
    for group, prompts in run.per_prompt.groupby("group", sort=False):
        row: dict[str, Any] = {
            "method": run.name,
            "group": group,
            "prompts": len(prompts),
            **copy_rate_fields(run.matches[run.matches["group"] == group]),
            "own_similarity": float(prompts["own_similarity"].mean()),
            "nearest_similarity": float(prompts["nearest_similarity"].mean()),
            "diversity": float(prompts["diversity"].mean()),
            "score": float(prompts["score"].mean()),
            "seconds_per_prompt": run.seconds_per_prompt,
        }
        # the method's own facts, as the mean over the prompts they apply to (NaN: none)
        for column in run.facts:
            values = prompts[column].dropna()
            row[column] = float(values.mean()) if len(values) else float("nan")
        chosen = [i * n + j for i in prompts.index for j in range(n)]
        images = [run.images[k] for k in chosen]
        if setup.quality is not None:
            found = images if run.quality_rows is None else run.quality_rows[chosen]
            row.update(setup.quality(found))
        if setup.fidelity is not None and setup.labels is not None:
            labels = np.repeat(setup.labels[prompts.index.to_numpy()], n, axis=0)
            row["fidelity"] = setup.fidelity(images, labels)
        rows.append(row)
    return rows


def relative_changes(table: pd.DataFrame, baseline: str = "none") -> pd.DataFrame:
    """Add each metric's relative change against the baseline method of the same group."""
    if baseline not in set(table["method"]):
        return table
    base = table[table["method"] == baseline].set_index("group")
    out = table.copy()
    for metric in ("copy_rate", "fid", "kid_mean"):
        if metric not in table:
            continue
        reference = out["group"].map(base[metric])
        out[f"{metric}_change"] = (out[metric] - reference) / reference.where(reference != 0)
    return out


def evaluate_methods(
    pipe: Any, setup: EvaluationSetup, methods: Mapping[str, Mitigation]
) -> MitigationReport:
    """Run and summarise every method (put "none" first to get relative changes)."""
    runs: dict[str, MethodRun] = {}
    rows: list[dict[str, Any]] = []
    for name, mitigation in tqdm(methods.items(), desc="mitigations", disable=len(methods) < 2):
        runs[name] = run_method(pipe, setup, name, mitigation)
        rows += summarise(runs[name], setup)
    table = change_intervals(relative_changes(pd.DataFrame(rows)), runs)
    if setup.fid_of is not None and all(r.quality_rows is not None for r in runs.values()):
        table = fid_intervals(table, runs, setup.fid_of, setup.config.num_generations)
    return MitigationReport(table, runs, setup.threshold, setup.embedder.name)


def change_intervals(table: pd.DataFrame, runs: dict[str, MethodRun]) -> pd.DataFrame:
    """The copy-rate change's 95% interval, bootstrapping the same prompts under the method
    and under no mitigation together (`copy_rate_change_low` / `_high`)."""
    if "none" not in runs:
        return table
    out = table.copy()
    base = runs["none"].per_prompt
    for i, row in out.iterrows():
        chosen = base["group"] == row["group"]
        treated = runs[row["method"]].per_prompt.loc[chosen, "copy_rate"]
        low, high = relative_change_interval(treated, base.loc[chosen, "copy_rate"])
        out.loc[i, ["copy_rate_change_low", "copy_rate_change_high"]] = [low, high]
    return out


def fid_intervals(
    table: pd.DataFrame,
    runs: dict[str, MethodRun],
    fid_of: FidFn,
    n: int,
    n_boot: int = FID_BOOTSTRAP,
    seed: int = 0,
) -> pd.DataFrame:
    """FID's 95% interval (`fid_low` / `_high`), resampling a group's prompts with all their
    generations, and its relative change's (`fid_change_low` / `_high`): the same draws of
    prompts, for every method and for none."""
    groups = next(iter(runs.values())).per_prompt["group"].to_numpy()
    rng = np.random.default_rng(seed)
    draws = {}  # group -> (n_boot, generations) rows: each draw's prompts, all generations
    for group in dict.fromkeys(groups):
        picks = rng.choice(np.flatnonzero(groups == group), size=(n_boot, (groups == group).sum()))
        draws[group] = (picks[:, :, None] * n + np.arange(n)).reshape(n_boot, -1)
    found: dict[tuple[str, str], np.ndarray] = {}

    def boot(method: str, group: str) -> np.ndarray:
        """FID of every draw of this group under this method (NaN where it is degenerate)."""
        if (method, group) not in found:
            rows = runs[method].quality_rows
            found[method, group] = np.array([_fid_or_nan(fid_of, rows[d]) for d in draws[group]])
        return found[method, group]

    out = table.copy()
    with warnings.catch_warnings():  # the point estimate has warned about few images already
        warnings.filterwarnings("ignore", message="FID from", category=UserWarning)
        for i, row in out.iterrows():
            value = boot(row["method"], row["group"])
            out.loc[i, ["fid_low", "fid_high"]] = _finite_interval(value)
            if "none" in runs:
                change = value / boot("none", row["group"]) - 1.0
                out.loc[i, ["fid_change_low", "fid_change_high"]] = _finite_interval(change)
    return out


def _fid_or_nan(fid_of: FidFn, rows: np.ndarray) -> float:
    """FID of rows, NaN for a draw too degenerate for its square root (repeated prompts)."""
    try:
        return fid_of(rows)
    except ChexmemError:
        return float("nan")


def _finite_interval(draws: np.ndarray) -> tuple[float, float]:
    """The 95% percentile interval of the finite draws (NaN, NaN when there are none)."""
    finite = draws[np.isfinite(draws)]
    return percentile_interval(finite, 0.95) if len(finite) else (float("nan"), float("nan"))
