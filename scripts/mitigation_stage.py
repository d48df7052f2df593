"""The demo's mitigation stage: every method against none, on the same prompts and seeds.

1. Inference-time methods on the CFG model, on the prompts detection flags as memorized
   (training prompts whose step-1 score reaches the 95th percentile of held-out prompts')
   and on ordinary training prompts it does not flag.
2. The training-time filter: the CFG fine-tune made with it (same data, steps and seed)
   against the plain one, on the duplicated rows and the ordinary prompts;
3. Capacity control: full, LoRA and parameter-subset fine-tunes of one pretrained base.

Fixed across all of them: the copy threshold (95th percentile of held-out real images'
nearest-training NCC), the generations' seeds, and the quality features (a findings
classifier trained here on the training split; FID / KID against the distinct training
images, conditioning fidelity from the prompts' labels).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd
from datasets import concatenate_datasets

from detect.classifier import ClassifierConfig, label_matrix, train_classifier
from detect.magnitude import MagnitudeConfig
from detect.models import load_pipeline
from detect.neurons import NemoConfig, calibrate_threshold, localize_prompts, reference_statistics
from detect.similarity import NCCEmbedder, TrainingBank
from detect.similarity import calibrate_threshold as copy_threshold
from hf_datasets.show import contact_sheet
from hf_datasets.storage import load_dataset_dir
from mitigate.attention import AttentionScaling
from mitigate.base import Mitigation
from mitigate.embedding import EmbeddingAdjustment, calibrate_target
from mitigate.evaluate import (
    ClassifierMetrics,
    EvaluationSetup,
    MitigationReport,
    evaluate_methods,
)
from mitigate.neurons import NeuronDeactivation, perturbation_robustness
from mitigate.tokens import RandomTokenAddition, TriggerTokenEdit


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


def localize(pipe: Any, memorized: list[str], reference: list[str], steps: int, seed: int) -> Any:
    """NEMO's neurons of the memorized prompts (reference: held-out prompts), and tau_mem."""
    nemo = NemoConfig(num_seeds=6, num_inference_steps=steps, seed=seed, progress=False)
    stats = reference_statistics(pipe, reference, nemo)
    tau = calibrate_threshold(pipe, reference, nemo)
    return localize_prompts(pipe, memorized, stats, tau, nemo), tau


def comparison_grid(report: MitigationReport, train_images: list[Any], path: Path, n: int) -> None:
    """First generation of n memorized prompts under every method, then the own image."""
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
        own = int(per.loc[i, "own_index"]) if "own_index" in per else -1
        tiles.append(train_images[own] if own >= 0 else tiles[-1])
        captions.append("own training image")
    contact_sheet(tiles, captions, tile=96, columns=len(methods) + 1, caption_lines=2).save(path)


def compare_models(models: dict[str, Path], setup: EvaluationSetup) -> pd.DataFrame:
    """Each model, unmitigated, on the same prompts and seeds: one row per (model, group)."""
    rows = []
    for name, path in models.items():
        table = evaluate_methods(load_pipeline(path), setup, {"none": Mitigation()}).table
        rows.append(table.drop(columns="method").assign(model=name))
    return pd.concat(rows, ignore_index=True)


def run_mitigation_stage(
    config: Any, data: Path, models: dict[str, Path], frame: pd.DataFrame
) -> dict[str, Any]:
    """Every mitigation against none; `frame` is the CFG model's detection table."""
    model = models["finetune-cfg"]
    out = Path(config.output_dir)
    dataset = load_dataset_dir(data)
    train = dataset["train"]
    train_images = list(train["image"])
    embedder = NCCEmbedder()
    bank = TrainingBank.from_images(train_images, embedder, patient_ids=train["patient_id"])
    held_out = concatenate_datasets([dataset["validation"], dataset["test"]])
    threshold = copy_threshold(list(held_out["image"]), bank, embedder, 95.0)
    distinct = sorted({p: i for i, p in reversed(list(enumerate(train["prompt"])))}.values())
    # 64 features: fewer than the 120 generations of the ordinary prompts, so FID's
    # covariances are full rank at the demo's sizes
    classifier = train_classifier(
        dataset, ClassifierConfig(seed=config.seed, feature_dim=64, progress=False)
    )
    classifier.save(out / "classifier", overwrite=True)
    metrics = ClassifierMetrics(classifier, [train_images[i] for i in distinct])
    labels_of = label_matrix(train)
    magnitude = MagnitudeConfig(
        num_inference_steps=config.inference_steps,
        num_generations=config.generations_per_prompt,
        seed=config.seed,
        batch_size=16,
        progress=False,
    )

    def setup(prompts: pd.DataFrame) -> EvaluationSetup:
        labels = labels_of[prompts["own_index"].to_numpy()]
        return EvaluationSetup(
            prompts, bank, embedder, threshold, magnitude, metrics.quality, labels,
            metrics.fidelity,
        )  # fmt: skip

    held_out_scores = frame.loc[frame["group"] == "held_out", "score_step1"].to_numpy()
    target = calibrate_target(held_out_scores, 0.95)  # detection's flag
    # the embedding is pushed down to the 10th percentile: stopping at the flag itself left
    # the copies in place on the tiny model (docs/benchmarks.md)
    embedding_target = calibrate_target(held_out_scores, 0.1)
    prompts = flagged_prompts(frame, target)
    memorized = list(prompts.loc[prompts["group"] == "memorized", "prompt"])
    pipe = load_pipeline(model)
    print(f"{len(memorized)} training prompts flagged (step-1 score >= {target:.3f}, the 95th "
          f"percentile of held-out prompts); copy threshold NCC {threshold:.3f}")  # fmt: skip
    nemo, tau_mem = localize(
        pipe, memorized, list(held_out["prompt"]), config.inference_steps, config.seed
    )
    neurons = NeuronDeactivation.from_report(nemo)
    neurons.to_json(out / "mitigation_neurons.json")
    print(f"NEMO: tau_mem {tau_mem:.3f}, {neurons.describe()['num_neurons']} neurons blocked")
    methods: dict[str, Mitigation] = {
        "none": Mitigation(),
        "embedding": EmbeddingAdjustment(
            target=embedding_target, max_iterations=30, flag_threshold=target
        ),
        "neurons": neurons,
        "trigger_tokens": TriggerTokenEdit(
            top_k=2, num_inference_steps=config.inference_steps, seed=config.seed
        ),
        "random_tokens_1": RandomTokenAddition(num_tokens=1, seed=config.seed),
        "random_tokens_4": RandomTokenAddition(num_tokens=4, seed=config.seed),
        "random_tokens_10": RandomTokenAddition(num_tokens=10, seed=config.seed),
        "attention_scaling": AttentionScaling(),
    }
    report = evaluate_methods(pipe, setup(prompts), methods)
    # does a small perturbation of e_p bring copying back once the neurons are blocked?
    flagged = prompts[prompts["group"] == "memorized"]
    robustness = pd.DataFrame()
    if len(flagged) and neurons.union():
        robustness = perturbation_robustness(
            pipe, list(flagged["prompt"]), neurons.union(), (0.0, 0.05, 0.1, 0.2), magnitude,
            config.seed, bank, embedder, list(flagged["own_index"]),
        )  # fmt: skip
    if len(robustness):
        # nearest_similarity is the prompt's best generation: does any of them copy?
        robustness["any_copy"] = robustness["nearest_similarity"] > threshold
        robustness.to_csv(out / "mitigation_robustness.csv", index=False)
    comparison_grid(report, train_images, out / "mitigation_grid.png", 4)

    truth = setup(ground_truth_prompts(frame))
    training_table = compare_models(
        {"plain": model, "filter": models["finetune-cfg-filter"]}, truth
    )
    capacity_table = compare_models(
        {
            "full": models["capacity-full"],
            "lora_r4": models["capacity-lora"],
            "subset": models["capacity-subset"],
        },
        truth,
    )
    capacity_table["trainable_share"] = capacity_table["model"].map(
        {
            "full": _share(models["capacity-full"]),
            "lora_r4": _share(models["capacity-lora"]),
            "subset": _share(models["capacity-subset"]),
        }
    )

    summary = {
        "copy_threshold": threshold,
        "copy_embedder": embedder.name,
        "detection_flag": target,
        "embedding_target": embedding_target,
        "features": metrics.extractor.name,
        "memorized_prompts": len(memorized),
        "ordinary_prompts": int((prompts["group"] == "ordinary").sum()),
        "nemo": {
            "tau_mem": tau_mem,
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
        "training": training_table.to_dict(orient="records"),
        "capacity": capacity_table.to_dict(orient="records"),
        "magnitude_config": asdict(magnitude),
    }
    report.table.to_csv(out / "mitigation_inference.csv", index=False)
    training_table.to_csv(out / "mitigation_training.csv", index=False)
    capacity_table.to_csv(out / "mitigation_capacity.csv", index=False)
    (out / "mitigation.json").write_text(json.dumps(summary, indent=1, default=str))
    print_tables(report.table, training_table, capacity_table)
    return summary


def _share(run: Path) -> float:
    """The trainable share of a fine-tune, from its run file."""
    return float(json.loads((run / "chexmem_train.json").read_text())["trainable_share"])


def print_tables(inference: pd.DataFrame, training: pd.DataFrame, capacity: pd.DataFrame) -> None:
    """The headline tables."""
    columns = ["method", "group", "copy_rate", "copy_rate_change", "own_similarity", "fid"]
    columns += ["fid_change", "fidelity", "score", "seconds_per_prompt"]
    print(inference[[c for c in columns if c in inference]].round(3).to_string(index=False))
    columns = ["model", "group", "copy_rate", "own_similarity", "fid", "fidelity"]
    print(training[[c for c in columns if c in training]].round(3).to_string(index=False))
    columns.append("trainable_share")
    print(capacity[[c for c in columns if c in capacity]].round(4).to_string(index=False))
