"""The study's report: every number read back from the stages' own outputs, every figure
named with the model, data, seeds, steps and features behind it; and the Hub upload."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from detect.calibration import warnings_of
from detect.plots import bar_chart
from detect.registry import detector_class
from hf_datasets.errors import ChexmemError
from scripts.report import Figure, ReportPaths, Section, Table, write_report
from scripts.study.config import StudyConfig

TRAIN_RUNS = (
    "finetune-cfg",
    "finetune-nocfg",
    "finetune-cfg-filter",
    "pretrained",
    "capacity-full",
    "capacity-lora",
    "capacity-subset",
)
DETECTED = {"cfg": ("finetune-cfg", 7.5), "nocfg": ("finetune-nocfg", 1.0)}


def read_json(path: Path) -> dict[str, Any]:
    """A stage's JSON output, or {} when the stage did not run (skipped by the config)."""
    return json.loads(path.read_text()) if path.is_file() else {}


def data_name(config: StudyConfig) -> str:
    """The data behind every figure, in words."""
    source = config.data_source if config.data_source == "phantom" else config.data_root
    return (
        f"{source} ({config.num_patients} patients)"
        if config.data_source == "phantom"
        else f"{source}"
    ) + f", {config.duplicates} injected, seed {config.seed}"


def fine_tunes(config: StudyConfig) -> pd.DataFrame:
    """One row per fine-tune, from its chexmem_train.json."""
    rows = []
    for name in TRAIN_RUNS:
        run = read_json(config.out / name / "chexmem_train.json")
        if not run:
            continue
        c = run["config"]
        weighting = run.get("sample_weighting") or {}
        rows.append(
            {
                "model": name,
                "mode": c.get("trainable_preset") or c["mode"],
                "steps": run["global_step"],
                "conditioning_dropout": c["conditioning_dropout_prob"],
                "filter_drop_rate": weighting.get("drop_rate"),
                "trainable_share": run["trainable_params"] / max(1, run["total_params"]),
                "final_loss": run["final_loss"],
                "seconds": run["seconds"],
            }
        )
    return pd.DataFrame(rows)


def provenance(config: StudyConfig, model: str, features: str, steps: str | None = None) -> dict:
    """The five things every figure names."""
    return {
        "model": model,
        "data": data_name(config),
        "seeds": f"seed {config.seed}; generation g of prompt p: seed_of(p, g, {config.seed})",
        "steps": steps
        or f"DDIM {config.inference_steps} steps, {config.generations_per_prompt} generations",
        "features": features,
    }


def detection_section(config: StudyConfig, detection: dict) -> Section:
    """ROC curves, score vs copy similarity, token heat maps and copy grids per model."""
    section = Section("Detection and its validation against copy similarity")
    section.text.append(
        "Scores, each the mean over a prompt's "
        f"{config.generations_per_prompt} generations: "
        + "; ".join(f"{name}: {detector_class(name).title}" for name in config.detectors)
        + ". Copy similarity: pixel NCC of each generation to its nearest training image "
        f"(mean over the prompt's generations). Prompts: {detection.get('prompts')}."
    )
    rows = []
    for name, result in detection.get("models", {}).items():
        model, _ = DETECTED[name]
        owner = {c: d for d, cs in result.get("detector_columns", {}).items() for c in cs}
        for against, scores in result["detection"].items():
            for score, values in scores.items():
                rows.append(
                    {
                        "model": model,
                        "against": against.removeprefix("duplicated_vs_"),
                        "detector": owner.get(score, "magnitude"),
                        "score": score,
                        "auc": values["auc"],
                        "tpr_at_1%_fpr": values["tpr_at_1pct_fpr"],
                    }
                )
        rho = result["score_vs_copy_similarity"]["spearman"]
        tau = result["score_vs_copy_similarity"]["kendall"]
        ncc = "pixel NCC at 64 px (nearest training image)"
        guided = f"guidance {result['guidance_scale']}"
        section.figures += [
            Figure(
                config.out / f"detect_{name}_roc.png",
                f"{model}: ROC, duplicated vs all others",
                "Each score of the duplicated prompts against every other prompt.",
                provenance(config, f"{model} ({guided})", "noise magnitude (no image features)"),
            ),
            Figure(
                config.out / f"detect_{name}_scatter.png",
                f"{model}: detection score vs copy similarity",
                f"Spearman {rho['value']:.3f} [{rho['low']:.3f}, {rho['high']:.3f}], Kendall "
                f"{tau['value']:.3f} [{tau['low']:.3f}, {tau['high']:.3f}] (95% bootstrap).",
                provenance(config, f"{model} ({guided})", ncc),
            ),
            Figure(
                config.out / f"detect_{name}_grid.png",
                f"{model}: generation | nearest training image, top and bottom prompts",
                "The 4 highest-scoring prompts, then the 4 lowest.",
                provenance(config, f"{model} ({guided})", ncc),
            ),
        ]
        heatmap = config.out / f"detect_{name}_tokens.png"
        if heatmap.is_file():
            section.figures.append(
                Figure(
                    heatmap,
                    f"{model}: trigger tokens of the top prompts",
                    "Token significance: the gradient of the step-1 magnitude with respect "
                    "to each token's embedding, scaled per prompt.",
                    provenance(
                        config,
                        f"{model} ({guided})",
                        "token embeddings (CLIP text)",
                        f"DDIM {config.inference_steps}, step 1, 2 generations",
                    ),
                )
            )
        for group in ("duplicated", "held_out"):
            section.figures.append(
                Figure(
                    config.out / f"copies_{name}_{group}.png",
                    f"{model}: {group} prompts, generation | nearest training image",
                    "",
                    provenance(config, f"{model} ({guided})", ncc),
                )
            )
    if rows:
        section.tables.insert(0, Table("Detection: AUC and TPR at 1% FPR", pd.DataFrame(rows)))
    comparison = detector_table(detection)
    if comparison is not None:
        section.tables.insert(0, comparison)
    copies = [
        {"model": DETECTED[n][0], "group": g, **v}
        for n, r in detection.get("models", {}).items()
        for g, v in r["copy_similarity_by_group"].items()
    ]
    if copies:
        section.tables.append(Table("Copy similarity by prompt group", pd.DataFrame(copies)))
    rates = copy_rate_table(detection)
    if rates is not None:
        section.tables.insert(0, rates)
        section.text += not_copied(detection)
    return section


def dose_name(copies: str) -> str:
    """A copy count as the report names it."""
    return {"0": "held-out (0)", "1": "ordinary (1)"}.get(copies, f"duplicated x{copies}")


def copy_rate_table(detection: dict) -> Table | None:
    """Copy rate per dose and model: were the duplicates copied at all?"""
    rows = [
        {
            "model": DETECTED[name][0],
            "copies of the training image": dose_name(k),
            "copy rate [95% CI]": f"{v['rate']:.3f} [{v['low']:.3f}, {v['high']:.3f}]",
            "mean nearest NCC": round(v["mean_nearest_similarity"], 4),
            "mean NCC to its own image": round(v["mean_own_similarity"], 4)
            if "mean_own_similarity" in v
            else "",
            "prompts": v["prompts"],
            "generations": v["generations"],
        }
        for name, result in detection.get("models", {}).items()
        for k, v in result.get("copy_rate_by_copies", {}).items()
    ]
    if not rows:
        return None
    threshold = detection.get("copy_threshold")
    return Table(
        "Copy rate per dose: the ground truth every detector is judged against",
        pd.DataFrame(rows),
        f"A copy: a generation whose nearest training image has pixel NCC >= {threshold:.4f} "
        "(the 95th percentile of held-out images' nearest-training NCC). Interval: 95% "
        "bootstrap over prompts.",
    )


def not_copied(detection: dict) -> list[str]:
    """A warning for each model whose duplicated rows are copied no more than held-out
    prompts: its detection figures then measure nothing (no memorization to detect)."""
    lines = []
    for name, result in detection.get("models", {}).items():
        rates = result.get("copy_rate_by_copies", {})
        held_out = rates.get("0")
        doses = {k: v for k, v in rates.items() if int(k) > 1}
        if held_out is None or not doses:
            continue
        copied = [k for k, v in doses.items() if v["low"] > held_out["high"]]
        if not copied:
            lines.append(
                f"**{DETECTED[name][0]} did not copy its duplicates**: at no dose is the copy "
                f"rate's interval above the held-out prompts' ({held_out['rate']:.3f}). Its "
                "AUCs cannot validate any detector: there is no memorization to detect. Train "
                "longer or with more copies (docs/benchmarks.md)."
            )
        else:
            lines.append(
                f"{DETECTED[name][0]} copies its duplicates at "
                + ", ".join(f"{k} copies ({doses[k]['rate']:.3f})" for k in copied)
                + f", above the held-out rate {held_out['rate']:.3f}."
            )
    return lines


def detector_table(detection: dict) -> Table | None:
    """Every detector of every model side by side: which one to trust on this model."""
    rows = []
    for name, result in detection.get("models", {}).items():
        for detector, r in result.get("detectors", {}).items():
            by_copies = ", ".join(f"{k}: {v:.2f}" for k, v in r["by_copies"].items())
            seconds = r["seconds_per_prompt"]
            rows.append(
                {
                    "model": DETECTED[name][0],
                    "detector": detector,
                    "auc [95% CI]": f"{r['auc']:.3f} [{r['auc_low']:.3f}, {r['auc_high']:.3f}]",
                    "tpr_at_1%_fpr": r["tpr_at_1pct_fpr"],
                    "auc by copies": by_copies,
                    "spearman(score, copies)": f"{r['spearman_copies']:.2f} "
                    f"[{r['spearman_copies_low']:.2f}, {r['spearman_copies_high']:.2f}]",
                    "spearman(score, copy similarity)": f"{r['spearman_similarity']:.2f} "
                    f"[{r['spearman_similarity_low']:.2f}, {r['spearman_similarity_high']:.2f}]",
                    "seconds_per_prompt": None if seconds is None else round(seconds, 4),
                }
            )
    if not rows:
        return None
    return Table(
        "Which detector to trust: each detector's score, side by side",
        pd.DataFrame(rows),
        "AUC and TPR@1%FPR: duplicated vs held-out prompts (95% stratified bootstrap); AUC by "
        "copies: duplicated rows of each copy count vs held-out (does the score rise with the "
        "dose?); Spearman over every prompt (held-out 0 copies, ordinary 1); seconds per prompt: "
        "the shared sampling pass plus the detector's own UNet calls.",
    )


def neuron_figure(config: StudyConfig) -> Figure | None:
    """Memorization neurons per layer (NEMO), as a bar chart."""
    path = config.out / "mitigation_neurons.json"
    neurons = read_json(path)
    if not neurons:
        return None
    layers = sorted(neurons)
    chart = bar_chart(
        layers,
        [len(neurons[k]) for k in layers],
        config.out / "neurons_per_layer.png",
        "NEMO: memorization neurons per layer (union over flagged prompts)",
        "neurons",
        "layer",
    )
    return Figure(
        chart,
        "Memorization neurons per layer",
        f"From {path.name}.",
        provenance(config, "finetune-cfg", "value-layer activations (NEMO)"),
    )


def mitigation_section(config: StudyConfig, mitigation: dict, models: dict) -> Section:
    """Every method's copy rate, quality, alignment and runtime, and the before | after grid."""
    section = Section("Mitigation, then validation again")
    if mitigation:
        chosen = (
            "duplicated training prompts (the injected ground truth, not the detector's flags)"
            if mitigation.get("memorized_from") == "duplicated"
            else f"training prompts flagged by detection (step-1 score >= "
            f"{mitigation['detection_flag']:.3f}, the 95th percentile of held-out prompts)"
        )
        section.text.append(
            f"{mitigation['memorized_prompts']} {chosen} "
            f"and {mitigation['ordinary_prompts']} ordinary prompts; a generation is a "
            f"copy above NCC {mitigation['copy_threshold']:.3f} (95th percentile of held-out "
            f"real images' nearest-training similarity). Quality: FID / KID with "
            f"{mitigation['features']}; alignment: conditioning fidelity."
        )
        columns = [
            "method",
            "group",
            "prompts",
            "copy_rate",
            "copy_rate_change",
            "own_similarity",
            "fid",
            "fid_change",
            "fidelity",
            "score",
            "target_reached",
            "iterations",
            "guided_share",
            "seconds_per_prompt",
        ]
        table = with_intervals(pd.DataFrame(mitigation["inference"]))
        section.tables.append(
            Table(
                "Inference-time methods (model finetune-cfg)",
                table[[c for c in columns if c in table]],
                "copy_rate_change and fid_change are relative to 'none' on the same prompts "
                "and seeds; intervals: 95% bootstrap over prompts (for a change: the same "
                "prompts resampled under both methods). target_reached: the share of the "
                "prompts a method adjusted that reached its target; iterations: their mean "
                "optimizer steps; guided_share: the share of sampling steps amg's gate opened.",
                provenance(config, "finetune-cfg", mitigation["features"]),
            )
        )
        section.figures.append(
            Figure(
                config.out / "mitigation_grid.png",
                "Before | after each mitigation",
                "First generation of flagged prompts under every method, then the prompt's "
                "own training image.",
                provenance(config, "finetune-cfg (guidance 7.5)", "pixel NCC at 64 px"),
            )
        )
        nemo = mitigation.get("nemo", {})
        if "terminated" in nemo:
            section.text.append(nemo_sentence(nemo))
        figure = neuron_figure(config)
        if figure:
            section.figures.append(figure)
        if mitigation.get("robustness"):
            section.tables.append(
                Table(
                    "Neuron deactivation under prompt-embedding noise",
                    pd.DataFrame(mitigation["robustness"]),
                )
            )
    calibrations = {**models.get("calibrations", {}), **mitigation.get("calibrations", {})}
    if calibrations:
        section.tables.append(calibration_table(calibrations))
        section.text += [f"Warning: {text}" for text in warnings_of(*calibrations.values())]
    for key, title in (("training", "Training-time filter"), ("capacity", "Capacity control")):
        if models.get(key):
            section.tables.append(
                Table(
                    f"{title}: duplicated rows and ordinary prompts",
                    with_intervals(pd.DataFrame(models[key])),
                    provenance=provenance(config, key, models["features"]),
                )
            )
    return section


def nemo_sentence(nemo: dict) -> str:
    """How NEMO's search ended on the flagged prompts."""
    found = nemo["terminated"]
    return (
        f"NEMO (tau_mem {nemo['tau_mem']:.3f}): {found['memorized']} of {found['prompts']} "
        f"flagged prompts memorized by its own test; its search ended by its rule (score <= "
        f"tau_mem) on {found['removed']} ({found['removed_share']:.0%} of the flagged), with a "
        f"median of {found['median_neurons']:g} neurons."
    ) + reach_sentence(found)


def reach_sentence(found: dict) -> str:
    """Whether blocking every searched neuron could meet NEMO's rule (older studies: no key)."""
    if "within_reach" not in found or not found["memorized"]:
        return ""
    return (
        f" With every searched neuron blocked the score is {found['median_score_all_blocked']:.3f}"
        f" (median), at most tau_mem on {found['within_reach']} of {found['memorized']}"
        " memorized prompts"
        + (
            ""
            if found["within_reach"]
            else ": blocking them all does not meet the rule on this model"
        )
        + "."
    )


def with_intervals(table: pd.DataFrame) -> pd.DataFrame:
    """copy_rate and copy_rate_change shown with their intervals (the bounds' own columns
    dropped), where the stage wrote them."""
    out = table.copy()
    for column in ("copy_rate", "copy_rate_change", "fid", "fid_change"):
        low, high = f"{column}_low", f"{column}_high"
        if column in out and low in out:
            out[column] = [
                "" if pd.isna(v) else f"{v:.3f}" + ("" if pd.isna(a) else f" [{a:.3f}, {b:.3f}]")
                for v, a, b in zip(out[column], out[low], out[high], strict=True)
            ]
            out = out.drop(columns=[low, high])
    return out


def calibration_table(calibrations: dict[str, dict]) -> Table:
    """Each value calibrated on held-out data, and whether it can be trusted."""
    rows = [
        {"calibration": name, **{k: v for k, v in record.items() if k != "warning"}}
        for name, record in calibrations.items()
    ]
    return Table(
        "Calibrations on held-out data",
        pd.DataFrame(rows),
        "status: ok; few_values (fewer than 20 held-out values); degenerate (no spread, or a "
        "value that decides nothing); given (set by hand). A value that is not ok is kept, "
        "and its warning below names the cause and the fix.",
    )


def headline(detection: dict, mitigation: dict, models: dict) -> list[str]:
    """The summary bullets."""
    lines = []
    for name, result in detection.get("models", {}).items():
        auc = result["detection"]["duplicated_vs_held_out"]["score_step1"]["auc"]
        rho = result["score_vs_copy_similarity"]["spearman"]["value"]
        line = (
            f"{DETECTED[name][0]}: detection AUC {auc:.3f} (duplicated vs held-out, "
            f"step 1), Spearman with copy similarity {rho:.2f}"
        )
        detectors = result.get("detectors", {})
        if len(detectors) > 1:
            best, r = max(detectors.items(), key=lambda item: item[1]["auc"])
            line += f"; best detector {best}: AUC {r['auc']:.3f} [{r['auc_low']:.3f}, "
            line += f"{r['auc_high']:.3f}]"
        rates = result.get("copy_rate_by_copies", {})
        if rates:
            line += "; copy rate by copies " + ", ".join(
                f"{k}: {v['rate']:.2f}" for k, v in rates.items()
            )
        lines.append(line)
    rows = [r for r in mitigation.get("inference", []) if r["group"] == "memorized"]
    if rows:
        none = next(r for r in rows if r["method"] == "none")
        best = min((r for r in rows if r["method"] != "none"), key=lambda r: r["copy_rate"])
        lines.append(
            f"copy rate of flagged prompts {none['copy_rate']:.2f} unmitigated; lowest "
            f"{best['copy_rate']:.2f} with {best['method']}"
        )
        for r in rows:
            if pd.notna(r.get("target_reached", float("nan"))):
                lines.append(
                    f"{r['method']} reached its target on {r['target_reached']:.0%} of the "
                    f"flagged prompts it adjusted ({r['iterations']:.1f} iterations on average)"
                )
    for key in ("training", "capacity"):
        dup = [r for r in models.get(key, []) if r["group"] == "duplicated"]
        if dup:
            parts = ", ".join(f"{r['model']} {r['copy_rate']:.2f}" for r in dup)
            lines.append(f"{key}: copy rate of duplicated rows {parts}")
    calibrations = {**models.get("calibrations", {}), **mitigation.get("calibrations", {})}
    untrusted = [k for k, r in calibrations.items() if r["status"] in ("few_values", "degenerate")]
    if untrusted:
        lines.append(
            f"calibration not to be trusted: {', '.join(untrusted)} (see the warnings under "
            "Mitigation)"
        )
    return lines


def write_study_report(config: StudyConfig) -> ReportPaths:
    """metrics.json, report.md and report.html from the stages' outputs."""
    out = config.out
    detection = read_json(out / "detection.json")
    mitigation = read_json(out / "mitigation.json")
    models = read_json(out / "mitigation_models.json")
    runs = fine_tunes(config)
    timing = read_json(out / ".study" / "timing.json")
    data = Section("Data", [f"{data_name(config)}."])
    data.figures.append(
        Figure(
            out / "duplicated_rows.png",
            "The duplicated training rows",
            f"{config.duplicates} in the training split.",
            provenance(config, "n/a", "n/a", "n/a"),
        )
    )
    training = Section("Fine-tunes")
    if len(runs):
        training.tables.append(Table("Every fine-tune of the study", runs))
    sections = [data, training]
    if detection:
        sections.append(detection_section(config, detection))
    if mitigation or models:
        sections.append(mitigation_section(config, mitigation, models))
    jobs = {k: round(v, 1) for k, v in timing.get("jobs", {}).items()}
    reproduce = Section(
        "Reproduce",
        [
            f"`chexmem study --config <this study's YAML>` (settings in `study_config.json`); "
            "stages are cached by content, `--force JOB` reruns one. "
            f"Job times (s, last run): {jobs}.",
        ],
    )
    sections.append(reproduce)
    metrics = {
        "study": json.loads((out / "study_config.json").read_text())
        if (out / "study_config.json").is_file()
        else {},
        "fine_tunes": runs.to_dict(orient="records"),
        "detection": detection,
        "mitigation": mitigation,
        "mitigation_models": models,
    }
    title = f"chexmem study: {config.name}"
    return write_report(out, title, sections, metrics, headline(detection, mitigation, models))


def hub_repos(config: StudyConfig) -> dict[str, Path]:
    """Every folder the study publishes, by repo id, with cards written (offline)."""
    from train.model_card import write_model_card

    if not config.hub_model_id:
        raise ChexmemError("hub_model_id is not set")
    metrics = read_json(config.out / "metrics.json")
    if not metrics:
        raise ChexmemError(f"no {config.out / 'metrics.json'}: run the report stage first")
    repos: dict[str, Path] = {}
    for name in TRAIN_RUNS:
        folder = config.out / name
        if folder.is_symlink():  # the same run as another (capacity-full): published once
            continue
        if (folder / "chexmem_train.json").is_file():
            write_model_card(folder, study_metrics=model_metrics(metrics, name))
            repos[f"{config.hub_model_id}-{name}"] = folder
    study = config.out / "hub-study"
    if study.exists():
        shutil.rmtree(study)
    (study / "figures").mkdir(parents=True)
    for file in ("report.html", "report.md", "metrics.json", "study_config.json"):
        shutil.copy2(config.out / file, study / file)
    for figure in (config.out / "figures").glob("*.png"):
        shutil.copy2(figure, study / "figures" / figure.name)
    (study / "DATASET_CARD.md").write_text(dataset_card(config, metrics))
    (study / "README.md").write_text((config.out / "report.md").read_text())
    repos[f"{config.hub_model_id}-study"] = study
    return repos


def model_metrics(metrics: dict, name: str) -> dict[str, float]:
    """The study's figures about one model, for its card."""
    found: dict[str, float] = {}
    for key, (model, _) in DETECTED.items():
        if model == name and key in metrics["detection"].get("models", {}):
            result = metrics["detection"]["models"][key]
            found["detection AUC (duplicated vs held-out, step 1)"] = result["detection"][
                "duplicated_vs_held_out"
            ]["score_step1"]["auc"]
            found["Spearman(score, copy similarity)"] = result["score_vs_copy_similarity"][
                "spearman"
            ]["value"]
            dup = result["copy_similarity_by_group"].get("duplicated", {})
            if dup:
                found["share of duplicated prompts' generations above NCC 0.9"] = dup[
                    "share_above_0.9"
                ]
    labels = {
        "finetune-cfg": "plain",
        "finetune-cfg-filter": "filter",
        "capacity-full": "full",
        "capacity-lora": "lora_r4",
        "capacity-subset": "subset",
    }
    for key in ("training", "capacity"):
        for row in metrics["mitigation_models"].get(key, []):
            if row["model"] == labels.get(name):
                found[f"copy rate, {row['group']} prompts"] = row["copy_rate"]
                found[f"FID, {row['group']} prompts"] = row["fid"]
    return found


def dataset_card(config: StudyConfig, metrics: dict) -> str:
    """The study data's card: source, splits, injected duplicates, and the licence caution."""
    study = metrics.get("study", {})
    source = config.data_source
    note = (
        "Phantom radiographs generated by chexmem (no patient data)."
        if source == "phantom"
        else f"Built from {config.data_root}: its licence applies. CheXpert's research use "
        "agreement does not allow redistribution; this card describes the data, the images "
        "are not uploaded."
    )
    settings = json.dumps({k: study.get(k) for k in ("data_source", "num_patients", "seed")})
    return (
        f"---\ntags: [chest-x-ray, chexmem, memorization]\n---\n\n# Data of the chexmem study "
        f"{config.name}\n\n{note}\n\nDuplicates injected on purpose (the detector's ground "
        f"truth): {config.duplicates} in the training split. Splits "
        f"are by patient. Settings: `{settings}`.\n"
    )


def push_study(config: StudyConfig) -> list[str]:
    """Upload every model (with its card), and the report with the dataset card."""
    from train.hub import push_output

    urls = [
        push_output(folder, repo, private=config.hub_private)
        for repo, folder in hub_repos(config).items()
    ]
    for url in urls:
        print(f"pushed {url}")
    return urls
