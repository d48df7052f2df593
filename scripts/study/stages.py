"""The study's stage bodies: data, base model, fine-tune flags, detection and its validation.

`scripts.study.plan` arranges them into the study's jobs; `chexmem demo` runs them on the
embedded default:
1. data: phantom chest radiographs (or CheXpert, or an image folder) with injected
   duplicates, saved with `save_to_disk`, and contact sheets of duplicated and ordinary rows;
2. model: the tiny Stable Diffusion base model, built offline (or a pretrained pipeline);
3. fine-tunes: `python -m train` flags of each run (CFG dropout 0.1 and 0.0, the
   training-time filter, full / LoRA / subset from a pretrained base);
4. detection: each model's noise magnitudes (Wen et al.) for duplicated, ordinary training
   and held-out prompts (`python -m detect` runs that also save the generations); each
   generation matched to its nearest training image (pixel NCC); AUC and TPR@1%FPR of
   duplicated prompts against the other groups, the rank correlation of score and copy
   similarity, scatter plots, ROC curves, grids of top / bottom prompts and trigger-token
   heat maps.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from detect.cli import write_json
from detect.evaluate import copy_rate, correlation, detection, roc_auc, roc_curve
from detect.plots import roc_plot, scatter_plot
from detect.registry import detector_class
from detect.similarity import NCCEmbedder, calibrate_threshold, ncc_features, nearest
from hf_datasets.duplicates import duplicated_rows, inject_duplicates
from hf_datasets.phantom import PhantomConfig, generate_phantom
from hf_datasets.show import contact_sheet, show
from hf_datasets.storage import load_dataset_dir, save_dataset
from hf_datasets.summary import summarize
from scripts.study.config import MORE_HELD_OUT, StudyConfig


def run_data_stage(config: StudyConfig) -> Path:
    """Phantom data with duplicates, saved, plus contact sheets; returns the dataset folder."""
    out = Path(config.output_dir)
    dataset = inject_duplicates(
        load_source(config), num_rows=config.duplicated_rows, copies=config.copies, seed=config.seed
    )
    path = save_dataset(dataset, out / "data", overwrite=True)
    print(summarize(dataset))
    train = dataset["train"]
    duplicated = train.select(duplicated_rows(train))
    show(duplicated, out / "duplicated_rows.png", num=len(duplicated), columns=4)
    show(train, out / "train_rows.png", num=16, columns=4)
    print(
        f"dataset: {path}\ncontact sheets: {out / 'duplicated_rows.png'}, {out / 'train_rows.png'}"
    )
    return path


def load_source(config: StudyConfig) -> Any:
    """The study's data before duplicates are injected: phantom, CheXpert or an image folder."""
    if config.data_source == "phantom":
        return generate_phantom(
            PhantomConfig(
                num_patients=config.num_patients,
                max_studies_per_patient=config.max_studies_per_patient,
                resolution=config.resolution,
                seed=config.seed,
            )
        )
    options = {"resolution": config.resolution, "max_rows": config.max_rows, "seed": config.seed}
    if config.data_source == "chexpert":
        from hf_datasets.chexpert import CheXpertConfig, load_chexpert

        return load_chexpert(
            CheXpertConfig(root=config.data_root, frontal_only=config.frontal_only, **options)
        )
    from hf_datasets.folder import FolderConfig, load_image_folder

    return load_image_folder(FolderConfig(root=config.data_root, **options))


@dataclass
class FineTune:
    """One demo fine-tune: where it starts, what it learns, and how it differs."""

    base: Path
    data: Path
    dropout: float = 0.1  # conditioning dropout (0: no classifier-free guidance)
    extra: list[str] = field(default_factory=list)  # further `chexmem train` flags
    steps: int | None = None  # None: the demo's max_train_steps
    text_encoder: bool = True  # train it (the tiny model's starts untrained)


def train_flags(config: StudyConfig, run: FineTune, out: Path) -> list[str]:
    """`chexmem train` flags of one demo fine-tune.

    Latents are cached: the phantoms are already at the model's size, so nothing is lost.
    """
    steps = run.steps or config.max_train_steps
    return [
        "--pretrained_model_name_or_path", str(run.base),
        "--train_data_dir", str(run.data),
        "--output_dir", str(out),
        "--overwrite_output_dir",
        "--conditioning_dropout_prob", str(run.dropout),
        *(["--train_text_encoder"] if run.text_encoder and config.train_text_encoder else []),
        "--max_train_steps", str(steps),
        "--train_batch_size", str(config.train_batch_size),
        "--learning_rate", str(config.learning_rate),
        "--lr_scheduler", config.lr_scheduler,
        "--lr_warmup_steps", str(config.lr_warmup_steps),
        "--mixed_precision", config.mixed_precision,
        "--checkpointing_steps", str(max(500, steps // 2)),
        "--checkpoints_total_limit", "1",
        "--logging_steps", "25",
        "--seed", str(config.seed),
        "--report_to", "jsonl",
        "--cache_latents",
        *config.train_flags,
        *run.extra,
    ]  # fmt: skip


def first_round(
    config: StudyConfig, base: Path, data: Path, pretrain_data: Path | None
) -> dict[str, FineTune]:
    """Fine-tunes of the base model (or, with finetune_from pretrained, of the pretrained
    base): CFG, no CFG, CFG with the filter; and (with pretrain data) the pretrained base,
    the base trained on other phantom patients."""
    start = base
    if config.finetune_from == "pretrained" and pretrain_data is not None:
        start = Path(config.output_dir) / "pretrained"  # as SD is pretrained, then fine-tuned
    runs = {"finetune-cfg": FineTune(start, data), "finetune-nocfg": FineTune(start, data, 0.0)}
    if not config.skip_mitigation:
        flags = ["--memorization_filter_top_fraction", str(config.filter_top_fraction)]
        flags.append("--memorization_filter_per_timestep")
        runs["finetune-cfg-filter"] = FineTune(start, data, extra=flags)
    if pretrain_data is not None:
        runs["pretrained"] = FineTune(base, pretrain_data, steps=config.pretrain_steps)
    return runs


def capacity_round(config: StudyConfig, pretrained: Path, data: Path) -> dict[str, FineTune]:
    """Full, LoRA and subset fine-tunes of the pretrained base, `capacity_steps` each.

    The full run is the plain recipe (UNet and, with train_text_encoder, the text encoder);
    the LoRA and subset runs train only their share of the UNet (MemControl's setting).
    """

    def run(extra: list[str], text_encoder: bool = False) -> FineTune:
        return FineTune(
            pretrained, data, extra=extra, steps=config.capacity_steps, text_encoder=text_encoder
        )

    return {
        "capacity-full": run([], text_encoder=True),
        "capacity-lora": run(["--trainable_preset", config.lora_preset]),
        "capacity-subset": run(["--trainable_preset", config.subset_preset]),
    }


def same_run(config: StudyConfig, one: FineTune, other: FineTune) -> bool:
    """Whether two fine-tunes train the same model (same flags but the output folder)."""
    return train_flags(config, one, Path("-")) == train_flags(config, other, Path("-"))


def link_run(source: Path, link: Path) -> Path:
    """`link` names the finished fine-tune `source` (a relative symlink, replaced atomically)."""
    staged = link.with_name(f".{link.name}.link")
    staged.unlink(missing_ok=True)
    staged.symlink_to(source.name if source.parent == link.parent else source.resolve())
    if link.is_dir() and not link.is_symlink():  # a fine-tune trained here before
        shutil.rmtree(link)
    staged.replace(link)
    return link


def detection_prompts(data: Path, config: StudyConfig) -> pd.DataFrame:
    """Prompts to validate the detector on, each with its group and its training row.

    Groups: every duplicated training prompt (label 1), a seeded sample of ordinary
    (non-duplicated) training prompts, and held-out (validation, then test) prompts;
    `copies`: how often the prompt's image is in the training set (0 for held-out).
    """
    dataset = load_dataset_dir(data)
    train = dataset["train"]
    prompts, copies = train["prompt"], train["copies"]
    duplicated = duplicated_rows(train)
    first: dict[str, int] = {}
    for index, prompt in enumerate(prompts):
        first.setdefault(prompt, index)
    ordinary = [i for i in first.values() if copies[i] == 1]
    rng = np.random.default_rng(config.seed)
    ordinary = sorted(rng.choice(ordinary, min(config.ordinary_prompts, len(ordinary)), False))
    rows = [(prompts[i], "duplicated", 1, i, copies[i]) for i in duplicated]
    rows += [(prompts[i], "ordinary", 0, int(i), 1) for i in ordinary]
    held_out = [*dataset["validation"]["prompt"], *dataset["test"]["prompt"]]
    rows += [(p, "held_out", 0, -1, 0) for p in held_out[: config.held_out_prompts]]
    return pd.DataFrame(rows, columns=["prompt", "group", "label", "train_index", "copies"])


def detect_flags(config: StudyConfig, model: Path, prompts: Path, guidance: float, out: Path):
    """`python -m detect` flags of one model's detection run (images saved for copy checks)."""
    return [
        "--model", str(model),
        "--prompts", str(prompts),
        "--num_inference_steps", str(config.inference_steps),
        "--guidance_scale", str(guidance),
        "--num_generations", str(config.generations_per_prompt),
        "--seed", str(config.seed),
        "--batch_size", str(config.detect_batch_size),
        "--dtype", config.inference_dtype,
        "--detector", *config.detectors,
        "--save_images",
        "--output_dir", str(out),
    ]  # fmt: skip


def copy_similarity(
    run: Path, train_bank: np.ndarray, prompts: pd.DataFrame
) -> tuple[pd.DataFrame, np.ndarray]:
    """Per-generation nearest training image (pixel NCC) of a detection run's saved images."""
    images = pd.read_csv(run / "images.csv")
    pictures = [Image.open(run / name) for name in images["file_name"]]
    features = ncc_features(pictures)
    match = nearest(features, train_bank)
    images["nearest_index"] = match.index
    images["nearest_similarity"] = match.similarity
    own = prompts["train_index"].to_numpy()[images["prompt_id"].to_numpy()]
    images["own_similarity"] = np.where(
        own >= 0, np.einsum("ij,ij->i", features, train_bank[np.maximum(own, 0)]), np.nan
    )
    return images, features


def run_scores(run: Path, prompts: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """Prompt scores of a detection run, each detector's as it chooses to be validated (the
    magnitude: step 1 with n = 1 and all n, and over all steps), and each one's columns."""
    summary = json.loads((run / "summary.json").read_text())
    written = summary.get("detectors", {"magnitude": []})  # runs before the registry: Wen's
    frame, columns = prompts.copy(), {}
    for name, names in written.items():
        scores = detector_class(name)().study_scores(run, names)
        columns[name] = list(scores.columns)
        for column in scores.columns:
            frame[column] = scores[column]
    return frame, columns


def evaluate_detection(frame: pd.DataFrame, scores: list[str]) -> dict:
    """AUC / TPR@1%FPR of the duplicated prompts against each other group, for every score."""
    out: dict = {}
    duplicated = frame[frame["group"] == "duplicated"]
    for against in ("held_out", "ordinary", "all_others"):
        others = (
            frame[frame["group"] != "duplicated"]
            if against == "all_others"
            else frame[frame["group"] == against]
        )
        labels = np.r_[np.ones(len(duplicated)), np.zeros(len(others))]
        out[f"duplicated_vs_{against}"] = {
            score: detection(labels, np.r_[duplicated[score], others[score]]).to_dict()
            for score in scores
        }
    return out


def detector_figures(
    frame: pd.DataFrame, columns: dict[str, list[str]], seconds: dict[str, float]
) -> dict[str, dict]:
    """Each detector's headline score validated: AUC (duplicated vs held-out) with its
    interval, TPR@1%FPR, AUC per copy count, Spearman with copies and copy similarity."""
    duplicated = frame[frame["group"] == "duplicated"]
    held_out = frame[frame["group"] == "held_out"]
    out = {}
    for name, names in columns.items():
        column = detector_class(name).headline(names)
        labels = np.r_[np.ones(len(duplicated)), np.zeros(len(held_out))]
        found = detection(labels, np.r_[duplicated[column], held_out[column]])
        by_copies = {
            str(k): roc_auc(
                np.r_[np.ones(len(g)), np.zeros(len(held_out))], np.r_[g[column], held_out[column]]
            )
            for k, g in duplicated.groupby("copies")
        }
        rho_copies = correlation(frame[column], frame["copies"])
        rho_similarity = correlation(frame[column], frame["copy_similarity"])
        out[name] = {
            "score": column,
            "auc": found.auc,
            "auc_low": found.auc_low,
            "auc_high": found.auc_high,
            "tpr_at_1pct_fpr": found.tpr_at_1pct_fpr,
            "positives": found.positives,
            "negatives": found.negatives,
            "spearman_copies": rho_copies.value,
            "spearman_copies_low": rho_copies.low,
            "spearman_copies_high": rho_copies.high,
            "spearman_similarity": rho_similarity.value,
            "spearman_similarity_low": rho_similarity.low,
            "spearman_similarity_high": rho_similarity.high,
            "seconds_per_prompt": seconds.get(name),
            "by_copies": by_copies,
        }
    return out


def copy_rates(images: pd.DataFrame, prompts: pd.DataFrame, threshold: float) -> dict:
    """Copy rate (generations at or above the copy threshold) per copy count of the prompt's
    training image: 0 held-out, 1 ordinary, then each dose of the duplicated rows."""
    copies = prompts["copies"].to_numpy()[images["prompt_id"].to_numpy()]
    out = {}
    for k in np.unique(copies):
        chosen = images[copies == k]
        rate = copy_rate(chosen["nearest_similarity"], chosen["prompt_id"], threshold).to_dict()
        rate["mean_nearest_similarity"] = float(chosen["nearest_similarity"].mean())
        if k > 0:  # a training prompt: how close to its own training image
            rate["mean_own_similarity"] = float(chosen["own_similarity"].mean())
        out[str(int(k))] = rate
    return out


def copy_grid(
    frame: pd.DataFrame,
    images: pd.DataFrame,
    run: Path,
    train_images: list,
    chosen: list[int],
    path: Path,
) -> None:
    """Generation | nearest training image (first generation) for the chosen prompt ids."""
    tiles, captions = [], []
    for prompt_id in chosen:
        row = images[(images["prompt_id"] == prompt_id) & (images["generation"] == 0)].iloc[0]
        tiles += [Image.open(run / row["file_name"]), train_images[int(row["nearest_index"])]]
        score = frame.loc[prompt_id, "score_step1"]
        captions += [
            f"{frame.loc[prompt_id, 'group']}, score {score:.2f}",
            f"nearest training image, NCC {row['nearest_similarity']:.2f}",
        ]
    contact_sheet(tiles, captions, tile=128, columns=4, caption_lines=2).save(path)


def evaluate_detect_runs(
    config: StudyConfig, data: Path, models: dict[str, tuple[Path, float]], path: Path
) -> dict:
    """Noise-magnitude detection validated against copy similarity, for every model whose
    `python -m detect` run is in OUT/detect-NAME; the summary goes to `path`."""
    out = Path(config.output_dir)
    prompts = pd.read_csv(out / "detect_prompts.csv")
    dataset = load_dataset_dir(data)
    train_images = list(dataset["train"]["image"])
    bank = ncc_features(train_images)
    held_out = [*dataset["validation"]["image"], *dataset["test"]["image"]]
    threshold = calibrate_threshold(held_out, bank, NCCEmbedder(), 95.0, fix=MORE_HELD_OUT)
    summary: dict = {
        "prompts": prompts["group"].value_counts().to_dict(),
        "generations_per_prompt": config.generations_per_prompt,
        "inference_steps": config.inference_steps,
        "similarity": "pixel NCC at 64 px to the nearest training image",
        "copy_threshold": threshold.value,
        "copy_threshold_calibration": threshold.record(),
        "models": {},
    }
    for name, (_, guidance) in models.items():
        run = out / f"detect-{name}"
        images, _ = copy_similarity(run, bank, prompts)
        frame, columns = run_scores(run, prompts)
        scores = [column for names in columns.values() for column in names]
        per_prompt = images.groupby("prompt_id")
        frame["copy_similarity"] = per_prompt["nearest_similarity"].mean()
        frame["max_copy_similarity"] = per_prompt["nearest_similarity"].max()
        frame.to_csv(out / f"detect_{name}_prompts.csv", index=False)
        run_summary = json.loads((run / "summary.json").read_text())
        seconds = run_summary.get("detector_seconds_per_prompt", {})
        result = {
            "guidance_scale": guidance,
            "seconds": run_summary["seconds"],
            "detector_columns": columns,
            "detectors": detector_figures(frame, columns, seconds),
            "detection": evaluate_detection(frame, scores),
            "copy_rate_by_copies": copy_rates(images, prompts, threshold.value),
            "copy_similarity_by_group": {
                group: {
                    "mean_nearest_similarity": round(float(g["copy_similarity"].mean()), 4),
                    "share_above_0.9": round(float((g["max_copy_similarity"] > 0.9).mean()), 4),
                }
                for group, g in frame.groupby("group")
            },
            "score_vs_copy_similarity": {
                method: correlation(
                    frame["score_step1"], frame["copy_similarity"], method
                ).to_dict()
                for method in ("spearman", "kendall")
            },
        }
        summary["models"][name] = result
        scatter_plot(
            frame["score_step1"],
            frame["copy_similarity"],
            frame["group"],
            out / f"detect_{name}_scatter.png",
            f"{name}: detection score vs copy similarity",
            "noise magnitude, step 1, n = 4",
            "mean nearest-training NCC",
        )
        others = frame["group"] != "duplicated"
        curves = {}
        for score in scores:
            curve = roc_curve(1 - others.astype(int), frame[score])
            curves[score] = (curve.fpr, curve.tpr)
        roc_plot(curves, out / f"detect_{name}_roc.png", f"{name}: duplicated vs all other prompts")
        order = list(frame.sort_values("score_step1", ascending=False).index)
        copy_grid(
            frame,
            images,
            run,
            train_images,
            order[:4] + order[-4:],
            out / f"detect_{name}_grid.png",
        )
        for group in ("duplicated", "held_out"):
            chosen = list(frame.index[frame["group"] == group][:8])
            copy_grid(frame, images, run, train_images, chosen, out / f"copies_{name}_{group}.png")
        result["trigger_tokens"] = trigger_token_figure(config, models[name][0], frame, name)
        _print_detection(name, result)
    write_json(summary, path)
    return summary


def merge_detection(config: StudyConfig, names: list[str]) -> dict:
    """detection.json: the per-model summaries (detection_NAME.json) in one file."""
    parts = [json.loads((config.out / f"detection_{n}.json").read_text()) for n in names]
    merged = {**parts[0], "models": {k: v for p in parts for k, v in p["models"].items()}}
    write_json(merged, config.out / "detection.json")
    return merged


def trigger_token_figure(config: StudyConfig, model: Path, frame: pd.DataFrame, name: str) -> list:
    """Token significance (Wen et al.) of the top-scoring prompts, drawn as a heat map."""
    from detect.plots import token_heatmap
    from detect.tokens import TokenConfig, token_significance

    pipe = config.load(model)
    top = frame.sort_values("score_step1", ascending=False).head(config.heatmap_prompts)
    settings = TokenConfig(num_generations=2, num_inference_steps=config.inference_steps,
                           seed=config.seed)  # fmt: skip
    rows, records = [], []
    for prompt_id, row in top.iterrows():
        significance = token_significance(pipe, row["prompt"], settings, int(prompt_id))
        tokens = [t.replace("</w>", "") for t in significance.tokens]
        rows.append((f"#{prompt_id} {row['group']}", tokens, significance.scores))
        records.append({"prompt_id": int(prompt_id), "group": row["group"],
                        "top_tokens": significance.top_tokens(3)})  # fmt: skip
    title = f"{name}: token significance of the {len(rows)} top-scoring prompts"
    token_heatmap(rows, Path(config.output_dir) / f"detect_{name}_tokens.png", title)
    return records


def _print_detection(name: str, result: dict) -> None:
    """The headline figures of one model."""
    for group, r in result["copy_similarity_by_group"].items():
        print(
            f"{name:>6} {group:>10}: mean nearest NCC {r['mean_nearest_similarity']:.3f}, "
            f"share > 0.9 {r['share_above_0.9']:.0%}"
        )
    for against, scores in result["detection"].items():
        parts = [f"{k.removeprefix('score_')} AUC {v['auc']:.3f}" for k, v in scores.items()]
        print(f"{name:>6} {against}: {', '.join(parts)}")
    rho = result["score_vs_copy_similarity"]["spearman"]
    print(
        f"{name:>6} Spearman(score, copy similarity) {rho['value']:.3f} "
        f"[{rho['low']:.3f}, {rho['high']:.3f}]"
    )
