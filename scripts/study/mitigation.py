"""The study's mitigation stage: every method against none, on the same prompts and seeds.

Two parts, run as two processes side by side (`python -m scripts.study.mitigation --study
OUT/study_config.json --part methods|models`):
1. `methods`: inference-time methods on the CFG model, on the prompts detection flags as
   memorized (training prompts whose step-1 score reaches the 95th percentile of held-out
   prompts') and on ordinary training prompts it does not flag (`mitigation.json`);
2. `models` (`mitigation_models.json`): the training-time filter (the CFG fine-tune made
   with it, same data, steps and seed, against the plain one) and capacity control (full,
   LoRA and parameter-subset fine-tunes of one pretrained base), on the duplicated rows and
   the ordinary prompts.

Fixed across all of them: the copy threshold (95th percentile of held-out real images'
nearest-training NCC), the generations' seeds, and the quality features (a findings
classifier trained here on the training split; FID / KID against the distinct training
images, conditioning fidelity from the prompts' labels).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from datasets import concatenate_datasets

from detect.calibration import Calibration
from detect.classifier import ClassifierConfig, label_matrix, train_classifier
from detect.cli import write_json
from detect.magnitude import MagnitudeConfig
from detect.neurons import NemoConfig, calibrate_threshold, localize_prompts, reference_statistics
from detect.similarity import NCCEmbedder, TrainingBank, nearest
from detect.similarity import calibrate_threshold as copy_threshold
from hf_datasets.errors import ChexmemError
from hf_datasets.show import contact_sheet
from hf_datasets.storage import load_dataset_dir
from mitigate.base import Mitigation, StudySetup
from mitigate.embedding import TARGET_QUANTILE, calibrate_target
from mitigate.evaluate import (
    ClassifierMetrics,
    EvaluationSetup,
    MitigationReport,
    evaluate_methods,
)
from mitigate.neurons import NeuronDeactivation, perturbation_robustness
from mitigate.registry import mitigation_class, with_settings
from scripts.study.config import MORE_HELD_OUT, study_methods


def flagged_prompts(frame: pd.DataFrame, target: float) -> pd.DataFrame:
    """Memorized: training prompts scoring >= target; ordinary: unflagged ordinary prompts."""
    training = frame["group"] != "held_out"
    flagged = frame[training & (frame["score_step1"] >= target)].assign(group="memorized")
    ordinary = frame[(frame["group"] == "ordinary") & (frame["score_step1"] < target)]
    table = pd.concat([flagged, ordinary.assign(group="ordinary")], ignore_index=True)
    return table.rename(columns={"train_index": "own_index"})


def ground_truth_prompts(frame: pd.DataFrame) -> pd.DataFrame:
    """The duplicated rows and the ordinary training prompts, as injected."""
    table = frame[frame["group"].isin(["duplicated", "ordinary"])].reset_index(drop=True)
    return table.rename(columns={"train_index": "own_index"})


def scored_prompts(frame: pd.DataFrame, source: str, target: float) -> tuple[pd.DataFrame, str]:
    """The memorized and ordinary prompts the methods are scored on, and what they are:
    `source` flagged (detector score >= target) or duplicated (the injected ground truth)."""
    if source == "duplicated":
        prompts = ground_truth_prompts(frame).replace({"group": {"duplicated": "memorized"}})
        return prompts, "duplicated training prompts (the injected ground truth)"
    if source != "flagged":
        raise ChexmemError(f"mitigation_prompts must be flagged or duplicated, not {source!r}")
    chosen = (f"training prompts flagged (step-1 score >= {target:.3f}, the 95th percentile "
              "of held-out prompts)")  # fmt: skip
    return flagged_prompts(frame, target), chosen


def localize(pipe: Any, memorized: list[str], reference: list[str], steps: int, seed: int) -> Any:
    """NEMO's neurons of the memorized prompts (reference: held-out prompts), and tau_mem."""
    nemo = NemoConfig(num_seeds=6, num_inference_steps=steps, seed=seed, progress=False)
    stats = reference_statistics(pipe, reference, nemo)
    tau = calibrate_threshold(pipe, reference, nemo, fix=MORE_HELD_OUT)
    return localize_prompts(pipe, memorized, stats, tau, nemo), tau


def nemo_termination(summary: pd.DataFrame, tau_mem: float) -> dict[str, Any]:
    """How many prompts NEMO found memorized, on how many its search ended by its rule, and on
    how many the rule was within reach (score <= tau_mem with every searched neuron blocked)."""
    removed = summary[summary["removed"]] if len(summary) else summary
    memorized = summary[summary["memorized"]] if len(summary) else summary
    ceiling = memorized["score_all_blocked"] if "score_all_blocked" in memorized else pd.Series()
    return {
        "prompts": len(summary),
        "memorized": len(memorized),
        "removed": len(removed),
        "removed_share": len(removed) / len(summary) if len(summary) else float("nan"),
        "median_neurons": float(removed["num_neurons"].median()) if len(removed) else 0.0,
        "within_reach": int((ceiling <= tau_mem).sum()),
        "median_score_all_blocked": float(ceiling.median()) if len(ceiling) else float("nan"),
    }


def comparison_grid(
    report: MitigationReport, own_index: list[int], train_images: list[Any], path: Path, n: int
) -> None:
    """First generation of n memorized prompts under every method, then the prompt's own
    training image (`own_index`: its training row, by prompt position)."""
    methods = list(report.runs)
    per = report.runs[methods[0]].per_prompt
    chosen = list(per.index[per["group"] == "memorized"][:n])
    k = len(report.runs[methods[0]].images) // len(per)
    tiles, captions = [], []
    for i in chosen:
        for name in methods:
            run = report.runs[name]
            tiles.append(run.images[i * k])
            row = run.matches[(run.matches["prompt_id"] == i)].iloc[0]
            captions.append(f"{name}: NCC {row['nearest_similarity']:.2f}")
        tiles.append(train_images[int(own_index[i])])
        captions.append("own training image")
    contact_sheet(tiles, captions, tile=96, columns=len(methods) + 1, caption_lines=2).save(path)


def compare_models(
    config: Any,
    models: dict[str, Path],
    setup: EvaluationSetup,
    done: dict[Path, pd.DataFrame] | None = None,
) -> pd.DataFrame:
    """Each model, unmitigated, on the same prompts and seeds: one row per (model, group).

    `done` keeps each evaluated folder's table, so a run linked under two names (the full
    capacity run is the plain fine-tune) is generated once.
    """
    done = {} if done is None else done
    rows = []
    for name, path in models.items():
        key = Path(path).resolve()
        if key not in done:
            done[key] = evaluate_methods(config.load(path), setup, {"none": Mitigation()}).table
        rows.append(done[key].drop(columns="method").assign(model=name))
    return pd.concat(rows, ignore_index=True)


@dataclass
class Context:
    """What both parts share: data, copy threshold, quality features, generation settings."""

    out: Path
    train_images: list[Any]
    held_out: Any
    bank: TrainingBank
    embedder: NCCEmbedder
    copy_calibration: Calibration
    metrics: ClassifierMetrics
    labels: Any
    magnitude: MagnitudeConfig
    captions: tuple[str, ...]  # the training prompts, one per bank row
    held_out_similarity: float  # median nearest-training NCC of the held-out images

    @property
    def threshold(self) -> float:
        """The copy threshold every method is judged by."""
        return self.copy_calibration.value

    def setup(self, prompts: pd.DataFrame) -> EvaluationSetup:
        """The evaluation of these prompts with the shared threshold, seeds and features."""
        labels = self.labels[prompts["own_index"].to_numpy()]
        return EvaluationSetup(
            prompts, self.bank, self.embedder, self.threshold, self.magnitude,
            self.metrics.quality, labels, self.metrics.fidelity,
            features=self.metrics.features, fid_of=self.metrics.fid_of,
        )  # fmt: skip


def shared_classifier(config: Any, dataset: Any, out: Path) -> Any:
    """The findings classifier (quality features), trained by whichever part comes first."""
    from filelock import FileLock

    from detect.classifier import FindingsClassifier

    folder, stamp = out / "classifier", out / ".classifier.done"
    trained_on = f"seed {config.seed}, data {data_fingerprint(out / 'data')}"
    with FileLock(str(out / ".classifier.lock")):
        cached = (folder / "config.json").is_file() and stamp.is_file()
        if cached and stamp.read_text() == trained_on:
            return FindingsClassifier.load(folder)
        # 64 features: fewer than the ~80 generations of the ordinary prompts, so FID's
        # covariances are full rank at the demo's sizes
        classifier = train_classifier(
            dataset, ClassifierConfig(seed=config.seed, feature_dim=64, progress=False)
        )
        classifier.save(folder, overwrite=True)
        stamp.write_text(trained_on)
    return classifier


def data_fingerprint(data: Path) -> str:
    """The saved dataset's split fingerprints (they change whenever the data does)."""
    states = sorted(data.glob("*/state.json"))
    return ",".join(json.loads(p.read_text()).get("_fingerprint", "") for p in states)


def prepare(config: Any, data: Path) -> Context:
    """Load the data; calibrate the copy threshold; get the quality features."""
    out = Path(config.output_dir)
    dataset = load_dataset_dir(data)
    train = dataset["train"]
    train_images = list(train["image"])
    embedder = NCCEmbedder()
    bank = TrainingBank.from_images(train_images, embedder, patient_ids=train["patient_id"])
    held_out = concatenate_datasets([dataset["validation"], dataset["test"]])
    threshold = copy_threshold(list(held_out["image"]), bank, embedder, 95.0, fix=MORE_HELD_OUT)
    held_out_nearest = nearest(embedder.embed(held_out["image"]), bank.features).similarity
    distinct = sorted({p: i for i, p in reversed(list(enumerate(train["prompt"])))}.values())
    classifier = shared_classifier(config, dataset, out)  # reused by both parts
    metrics = ClassifierMetrics(classifier, [train_images[i] for i in distinct])
    magnitude = MagnitudeConfig(
        num_inference_steps=config.inference_steps,
        num_generations=config.generations_per_prompt,
        seed=config.seed,
        batch_size=16,
        progress=False,
    )
    return Context(out, train_images, held_out, bank, embedder, threshold, metrics,
                   label_matrix(train), magnitude, tuple(train["prompt"]),
                   float(np.median(held_out_nearest)))  # fmt: skip


def inference_methods(
    config: Any,
    ctx: Context,
    neurons: NeuronDeactivation,
    targets: tuple[float, float],
    prompts: pd.DataFrame,
) -> dict[str, Mitigation]:
    """None, and each method the study names in the registry's order, in the setting its
    class chose for studies (`study_variants`: the benchmarks' settings) with the study's
    `method_settings` on top; `prompts` are the flagged (group memorized) and ordinary
    prompts the methods are scored on."""
    flag, embedding_target = targets
    flagged = tuple(prompts.loc[prompts["group"] == "memorized", "prompt"])
    setup = StudySetup(config.inference_steps, config.seed, flag, embedding_target, neurons,
                       tuple(config.random_tokens), ctx.bank, ctx.captions,
                       ctx.held_out_similarity, flagged, tuple(prompts["prompt"]))  # fmt: skip
    methods: dict[str, Mitigation] = {"none": Mitigation()}
    chosen = config.settings_of_methods()
    for name in study_methods():
        if name in config.methods:
            variants = mitigation_class(name).study_variants(setup).items()
            methods.update({label: with_settings(method, name, chosen.get(name, {}))
                            for label, method in variants})  # fmt: skip
    return methods


def run_methods(config: Any, ctx: Context, model: Path, frame: pd.DataFrame) -> dict[str, Any]:
    """Every inference-time mitigation against none; `frame` is the CFG model's detection."""
    out = ctx.out
    held_out_scores = frame.loc[frame["group"] == "held_out", "score_step1"].to_numpy()
    flag = calibrate_target(held_out_scores, 0.95, "detection flag", MORE_HELD_OUT)
    # the embedding is pushed down to the 10th percentile: stopping at the flag itself left
    # the copies in place on the tiny model (docs/benchmarks.md)
    embedding = calibrate_target(held_out_scores, TARGET_QUANTILE, fix=MORE_HELD_OUT)
    target, embedding_target = flag.value, embedding.value
    prompts, chosen = scored_prompts(frame, config.mitigation_prompts, target)
    memorized = list(prompts.loc[prompts["group"] == "memorized", "prompt"])
    pipe = config.load(model)
    print(f"{len(memorized)} {chosen}; copy threshold NCC {ctx.threshold:.3f}")
    nemo, tau_calibration = localize(
        pipe, memorized, list(ctx.held_out["prompt"]), config.inference_steps, config.seed
    )
    tau_mem = tau_calibration.value
    neurons = NeuronDeactivation.from_report(nemo)
    neurons.to_json(out / "mitigation_neurons.json")
    print(f"NEMO: tau_mem {tau_mem:.3f}, {neurons.describe()['num_neurons']} neurons blocked")
    methods = inference_methods(config, ctx, neurons, (target, embedding_target), prompts)
    report = evaluate_methods(pipe, ctx.setup(prompts), methods)
    # does a small perturbation of e_p bring copying back once the neurons are blocked?
    flagged = prompts[prompts["group"] == "memorized"]
    robustness = pd.DataFrame()
    if len(flagged) and neurons.union():
        robustness = perturbation_robustness(
            pipe, list(flagged["prompt"]), neurons.union(), tuple(config.robustness_sigmas),
            ctx.magnitude, config.seed, ctx.bank, ctx.embedder, list(flagged["own_index"]),
        )  # fmt: skip
    if len(robustness):
        # nearest_similarity is the prompt's best generation: does any of them copy?
        robustness["any_copy"] = robustness["nearest_similarity"] > ctx.threshold
        robustness.to_csv(out / "mitigation_robustness.csv", index=False)
    per_prompt = [
        run.per_prompt[["group", "copy_rate"]].rename_axis("prompt_index").reset_index()
        .assign(method=name) for name, run in report.runs.items()
    ]  # fmt: skip
    pd.concat(per_prompt).to_csv(out / "mitigation_prompts.csv", index=False)  # for --seeds
    own = prompts["own_index"].astype(int).tolist()  # flagged prompts are training prompts
    comparison_grid(report, own, ctx.train_images, out / "mitigation_grid.png", 4)
    summary = {
        "copy_threshold": ctx.threshold,
        "copy_embedder": ctx.embedder.name,
        "detection_flag": target,
        "embedding_target": embedding_target,
        "calibrations": {
            "copy_threshold": ctx.copy_calibration.record(),
            "detection_flag": flag.record(),
            "embedding_target": embedding.record(),
            "tau_mem": tau_calibration.record(),
        },
        "features": ctx.metrics.extractor.name,
        "memorized_prompts": len(memorized),
        "memorized_from": config.mitigation_prompts,  # flagged by the detector, or duplicated
        "ordinary_prompts": int((prompts["group"] == "ordinary").sum()),
        "nemo": {
            "tau_mem": tau_mem,
            "terminated": nemo_termination(nemo.summary, tau_mem),
            "neurons_blocked": neurons.describe(),
            "per_prompt": nemo.summary.to_dict(orient="records"),
        },
        "methods": {name: run.description for name, run in report.runs.items()},
        "robustness": (
            robustness.groupby(["sigma", "pruned"])[["score", "nearest_similarity", "any_copy"]]
            .mean()
            .reset_index()
            .to_dict(orient="records")
            if len(robustness)
            else []
        ),
        "inference": report.table.to_dict(orient="records"),
        "magnitude_config": asdict(ctx.magnitude),
    }
    report.table.to_csv(out / "mitigation_inference.csv", index=False)
    write_json(summary, out / "mitigation.json")
    print_table(report.table, ["method", "group", "copy_rate", "copy_rate_change",
                               "own_similarity", "fid", "fid_change", "fidelity", "score",
                               "seconds_per_prompt"])  # fmt: skip
    return summary


def run_models(
    config: Any, ctx: Context, models: dict[str, Path], frame: pd.DataFrame
) -> dict[str, Any]:
    """The filtered and the capacity-controlled fine-tunes against their references."""
    truth = ctx.setup(ground_truth_prompts(frame))
    done: dict[Path, pd.DataFrame] = {}
    training_runs = {"plain": models["finetune-cfg"], "filter": models["finetune-cfg-filter"]}
    training = compare_models(config, training_runs, truth, done)
    capacity_runs = {"full": "capacity-full", "lora_r4": "capacity-lora",
                     "subset": "capacity-subset"}  # fmt: skip
    capacity = compare_models(config, {k: models[v] for k, v in capacity_runs.items()}, truth, done)
    capacity["trainable_share"] = capacity["model"].map(
        {k: _share(models[v]) for k, v in capacity_runs.items()}
    )
    training.to_csv(ctx.out / "mitigation_training.csv", index=False)
    capacity.to_csv(ctx.out / "mitigation_capacity.csv", index=False)
    summary = {
        "copy_threshold": ctx.threshold,
        "calibrations": {"copy_threshold": ctx.copy_calibration.record()},
        "features": ctx.metrics.extractor.name,
        "training": training.to_dict(orient="records"),
        "capacity": capacity.to_dict(orient="records"),
        "magnitude_config": asdict(ctx.magnitude),
    }
    write_json(summary, ctx.out / "mitigation_models.json")
    columns = ["model", "group", "copy_rate", "own_similarity", "fid", "fidelity"]
    print_table(training, columns)
    print_table(capacity, [*columns, "trainable_share"])
    return summary


def _share(run: Path) -> float:
    """The trainable share of a fine-tune, from its run file."""
    return float(json.loads((run / "chexmem_train.json").read_text())["trainable_share"])


def print_table(table: pd.DataFrame, columns: list[str]) -> None:
    """A headline table."""
    print(table[[c for c in columns if c in table]].round(4).to_string(index=False))


def main(argv: list[str] | None = None) -> int:
    """`python -m scripts.study.mitigation --study OUT/study_config.json --part PART`."""
    from hf_datasets.cliutils import setup_logging
    from scripts.study.config import StudyConfig

    p = argparse.ArgumentParser(prog="python -m scripts.study.mitigation", description=__doc__)
    p.add_argument("--study", required=True, help="the study's study_config.json")
    p.add_argument("--part", choices=("methods", "models"), required=True)
    args = p.parse_args(argv)
    setup_logging()
    config = StudyConfig(**json.loads(Path(args.study).read_text()))
    out = Path(config.output_dir)
    frame = pd.read_csv(out / "detect_cfg_prompts.csv")
    ctx = prepare(config, out / "data")
    names = ["finetune-cfg", "finetune-cfg-filter", "capacity-full", "capacity-lora",
             "capacity-subset"]  # fmt: skip
    models = {n: out / n for n in names}
    if args.part == "methods":
        run_methods(config, ctx, models["finetune-cfg"], frame)
    else:
        run_models(config, ctx, models, frame)
    return 0


if __name__ == "__main__":
    sys.exit(main())
