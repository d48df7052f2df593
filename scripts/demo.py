"""`chexmem demo`: the whole study on the embedded default (phantom data, tiny model, CPU).

Stages so far:
1. data: phantom chest radiographs with injected duplicates, saved with `save_to_disk`,
   and contact sheets of duplicated and ordinary training rows;
2. model: the tiny Stable Diffusion base model, built offline;
3. fine-tune: the tiny model on the phantom data, with classifier-free guidance
   (conditioning dropout 0.1) and without (0.0), everything else equal, as two parallel
   `python -m train` processes (logs in each run's train.log);
4. detect: both models' noise magnitudes (Wen et al.) for duplicated, ordinary training
   and held-out prompts, as two parallel `python -m detect` runs that also save the
   generations; each generation matched to its nearest training image (pixel NCC); AUC and
   TPR@1%FPR of duplicated prompts against the other groups, the rank correlation of score
   and copy similarity, a scatter plot, ROC curves and a grid of top / bottom prompts;
5. mitigate (`scripts.mitigation_stage`): every inference-time mitigation against none on
   the CFG model's flagged prompts, and three more CFG fine-tunes made alongside the first
   two (the training-time filter, LoRA r=4, an attention-only subset) against the plain one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from detect.evaluate import correlation, detection, roc_curve
from detect.magnitude import prompt_scores
from detect.plots import roc_plot, scatter_plot
from detect.similarity import ncc_features, nearest
from hf_datasets.cliutils import add_config_flag
from hf_datasets.duplicates import duplicated_rows, inject_duplicates
from hf_datasets.errors import ChexmemError
from hf_datasets.phantom import PhantomConfig, generate_phantom
from hf_datasets.show import contact_sheet, show
from hf_datasets.storage import load_dataset_dir, save_dataset
from hf_datasets.summary import summarize


@dataclass
class DemoConfig:
    """What the demo runs; each field is a `chexmem demo` flag."""

    output_dir: str = "chexmem-demo"
    # 150 patients (~220 distinct training images) with 10 images x 15 copies: duplicates fill
    # 41% of training rows. With 60 patients (72%) the unconditional branch learned the
    # duplicates too and the magnitude could no longer tell them apart (docs/benchmarks.md)
    num_patients: int = 150
    max_studies_per_patient: int = 3
    resolution: int = 64
    duplicated_rows: int = 10
    copies: int = 15
    max_train_steps: int = 1600
    train_batch_size: int = 8
    learning_rate: float = 2e-3
    lr_scheduler: str = "cosine"  # annealed to 0: sharper copies than a constant rate
    ordinary_prompts: int = 30  # non-duplicated training prompts scored by the detector
    held_out_prompts: int = 30  # validation and test prompts scored (at most)
    generations_per_prompt: int = 4
    inference_steps: int = 25
    vae_train_steps: int = 300
    # training-time filter (Wen et al.): drop the top fraction of each batch by m_t relative
    # to its timestep's running mean (raw m_t mostly ranks timesteps: docs/benchmarks.md)
    filter_top_fraction: float = 0.25
    # capacity control needs a trained base (LoRA on a random UNet learns nothing): the tiny
    # model is first trained on other phantom patients (no duplicates), standing in for SD's
    # pretraining; full / LoRA / subset fine-tunes then start from it, text encoder frozen
    pretrain_patients: int = 300
    pretrain_steps: int = 1000
    capacity_steps: int = 800
    lora_preset: str = "lora_r4"
    subset_preset: str = "attention"
    seed: int = 0
    overwrite: bool = False
    skip_training: bool = False
    skip_mitigation: bool = False


def run_data_stage(config: DemoConfig) -> Path:
    """Phantom data with duplicates, saved, plus contact sheets; returns the dataset folder."""
    out = Path(config.output_dir)
    phantom = generate_phantom(
        PhantomConfig(
            num_patients=config.num_patients,
            max_studies_per_patient=config.max_studies_per_patient,
            resolution=config.resolution,
            seed=config.seed,
        )
    )
    dataset = inject_duplicates(
        phantom, num_rows=config.duplicated_rows, copies=config.copies, seed=config.seed
    )
    path = save_dataset(dataset, out / "data", overwrite=config.overwrite)
    print(summarize(dataset))
    train = dataset["train"]
    duplicated = train.select(duplicated_rows(train))
    show(duplicated, out / "duplicated_rows.png", num=len(duplicated), columns=4)
    show(train, out / "train_rows.png", num=16, columns=4)
    print(
        f"dataset: {path}\ncontact sheets: {out / 'duplicated_rows.png'}, {out / 'train_rows.png'}"
    )
    return path


def run_model_stage(config: DemoConfig) -> Path:
    """The tiny base model (reused when already built)."""
    from train.tiny_model import TinyModelConfig, build_tiny_pipeline

    path = Path(config.output_dir) / "tiny-sd"
    if (path / "model_index.json").exists() and not config.overwrite:
        print(f"base model: {path} (already built)")
        return path
    build_tiny_pipeline(
        path,
        TinyModelConfig(resolution=config.resolution, seed=config.seed),
        overwrite=config.overwrite,
    )
    info = json.loads((path / "chexmem_tiny.json").read_text())
    print(f"base model: {path} ({', '.join(f'{k} {v}' for k, v in info.items() if 'psnr' in k)})")
    return path


@dataclass
class FineTune:
    """One demo fine-tune: where it starts, what it learns, and how it differs."""

    base: Path
    data: Path
    dropout: float = 0.1  # conditioning dropout (0: no classifier-free guidance)
    extra: list[str] = field(default_factory=list)  # further `chexmem train` flags
    steps: int | None = None  # None: the demo's max_train_steps
    text_encoder: bool = True  # train it (the tiny model's starts untrained)


def train_flags(config: DemoConfig, run: FineTune, out: Path) -> list[str]:
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
        *(["--train_text_encoder"] if run.text_encoder else []),
        "--max_train_steps", str(steps),
        "--train_batch_size", str(config.train_batch_size),
        "--learning_rate", str(config.learning_rate),
        "--lr_scheduler", config.lr_scheduler,
        "--lr_warmup_steps", "50",
        "--checkpointing_steps", str(max(500, steps // 2)),
        "--checkpoints_total_limit", "1",
        "--logging_steps", "25",
        "--seed", str(config.seed),
        "--report_to", "jsonl",
        "--cache_latents",
        *run.extra,
    ]  # fmt: skip


def run_train_stage(config: DemoConfig, variants: dict[str, FineTune]) -> dict[str, Path]:
    """The fine-tunes as parallel processes (one `python -m train` each, one thread each)."""
    out = Path(config.output_dir)
    commands = {
        name: ["train", *train_flags(config, run, out / name)] for name, run in variants.items()
    }
    run_parallel(commands, {name: out / name / "train.log" for name in variants})
    for name in variants:
        run = json.loads((out / name / "chexmem_train.json").read_text())
        loss = run["final_loss"]
        print(
            f"{name}: {run['global_step']} steps in {run['seconds']:.0f} s, final loss {loss:.4f}"
        )
    return {name: out / name for name in variants}


def first_round(config: DemoConfig, base: Path, data: Path) -> dict[str, FineTune]:
    """Fine-tunes of the random-start tiny model: CFG, no CFG, CFG with the filter; and the
    base for capacity control, trained on other phantom patients."""
    runs = {"finetune-cfg": FineTune(base, data), "finetune-nocfg": FineTune(base, data, 0.0)}
    if not config.skip_mitigation:
        flags = ["--memorization_filter_top_fraction", str(config.filter_top_fraction)]
        flags.append("--memorization_filter_per_timestep")
        runs["finetune-cfg-filter"] = FineTune(base, data, extra=flags)
        other = run_pretrain_data(config)
        runs["pretrained"] = FineTune(base, other, steps=config.pretrain_steps)
    return runs


def capacity_round(config: DemoConfig, pretrained: Path, data: Path) -> dict[str, FineTune]:
    """Full, LoRA and subset fine-tunes of the pretrained base (text encoder frozen)."""

    def run(extra: list[str]) -> FineTune:
        return FineTune(
            pretrained, data, extra=extra, steps=config.capacity_steps, text_encoder=False
        )

    return {
        "capacity-full": run([]),
        "capacity-lora": run(["--trainable_preset", config.lora_preset]),
        "capacity-subset": run(["--trainable_preset", config.subset_preset]),
    }


def run_pretrain_data(config: DemoConfig) -> Path:
    """Phantom patients disjoint from the demo's (another seed), without duplicates."""
    out = Path(config.output_dir) / "pretrain-data"
    if (out / "dataset_dict.json").exists() and not config.overwrite:
        return out
    phantom = generate_phantom(
        PhantomConfig(
            num_patients=config.pretrain_patients,
            max_studies_per_patient=config.max_studies_per_patient,
            resolution=config.resolution,
            seed=config.seed + 1,
        )
    )
    return save_dataset(phantom, out, overwrite=True)


def detection_prompts(data: Path, config: DemoConfig) -> pd.DataFrame:
    """Prompts to validate the detector on, each with its group and its training row.

    Groups: every duplicated training prompt (label 1), a seeded sample of ordinary
    (non-duplicated) training prompts, and held-out (validation, then test) prompts.
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
    rows = [(prompts[i], "duplicated", 1, i) for i in duplicated]
    rows += [(prompts[i], "ordinary", 0, int(i)) for i in ordinary]
    held_out = [*dataset["validation"]["prompt"], *dataset["test"]["prompt"]]
    rows += [(p, "held_out", 0, -1) for p in held_out[: config.held_out_prompts]]
    return pd.DataFrame(rows, columns=["prompt", "group", "label", "train_index"])


def detect_flags(config: DemoConfig, model: Path, prompts: Path, guidance: float, out: Path):
    """`python -m detect` flags of one model's detection run (images saved for copy checks)."""
    return [
        "--model", str(model),
        "--prompts", str(prompts),
        "--num_inference_steps", str(config.inference_steps),
        "--guidance_scale", str(guidance),
        "--num_generations", str(config.generations_per_prompt),
        "--seed", str(config.seed),
        "--batch_size", "16",
        "--save_images",
        "--output_dir", str(out),
    ]  # fmt: skip


def run_parallel(commands: dict[str, list[str]], logs: dict[str, Path]) -> None:
    """Run `python -m ...` commands side by side (one thread each); fail with the log's tail."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    running = {}
    for name, command in commands.items():
        logs[name].parent.mkdir(parents=True, exist_ok=True)
        log = logs[name].open("w")
        process = subprocess.Popen(
            [sys.executable, "-m", *command], stdout=log, stderr=subprocess.STDOUT, env=env
        )
        running[name] = (process, log)
    for name, (process, log) in running.items():
        code = process.wait()
        log.close()
        if code != 0:
            tail = logs[name].read_text()[-2000:]
            raise ChexmemError(f"{name} failed (exit {code}); see {logs[name]}:\n{tail}")


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


def run_scores(run: Path, prompts: pd.DataFrame) -> pd.DataFrame:
    """Prompt scores of a detection run: step 1 with n = 1 and all n, and over all steps."""
    table = pd.read_parquet(run / "magnitudes.parquet")
    frame = prompts.copy()
    frame["score_step1_n1"] = prompt_scores(table, 1, 1)
    frame["score_step1"] = prompt_scores(table, 1)
    frame["score_all_steps"] = prompt_scores(table, None)
    return frame


def evaluate_detection(frame: pd.DataFrame) -> dict:
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
            for score in ("score_step1_n1", "score_step1", "score_all_steps")
        }
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


def run_detect_stage(config: DemoConfig, data: Path, models: dict[str, tuple[Path, float]]) -> dict:
    """Noise-magnitude detection validated against copy similarity, for every model."""
    out = Path(config.output_dir)
    prompts = detection_prompts(data, config)
    prompts.to_csv(out / "detect_prompts.csv", index=False)
    commands = {
        name: [
            "detect",
            *detect_flags(config, model, out / "detect_prompts.csv", g, out / f"detect-{name}"),
        ]
        for name, (model, g) in models.items()
    }
    run_parallel(commands, {name: out / f"detect-{name}.log" for name in models})
    train = load_dataset_dir(data)["train"]
    train_images = list(train["image"])
    bank = ncc_features(train_images)
    summary: dict = {
        "prompts": prompts["group"].value_counts().to_dict(),
        "generations_per_prompt": config.generations_per_prompt,
        "inference_steps": config.inference_steps,
        "similarity": "pixel NCC at 64 px to the nearest training image",
        "models": {},
    }
    for name, (_, guidance) in models.items():
        run = out / f"detect-{name}"
        images, _ = copy_similarity(run, bank, prompts)
        frame = run_scores(run, prompts)
        per_prompt = images.groupby("prompt_id")
        frame["copy_similarity"] = per_prompt["nearest_similarity"].mean()
        frame["max_copy_similarity"] = per_prompt["nearest_similarity"].max()
        frame.to_csv(out / f"detect_{name}_prompts.csv", index=False)
        result = {
            "guidance_scale": guidance,
            "seconds": json.loads((run / "summary.json").read_text())["seconds"],
            "detection": evaluate_detection(frame),
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
        for score in ("score_step1_n1", "score_step1", "score_all_steps"):
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
        _print_detection(name, result)
    (out / "detection.json").write_text(json.dumps(summary, indent=1))
    return summary


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


def run_demo(config: DemoConfig) -> None:
    """Every stage of the demo, in order."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # tiny models on a small CPU: more threads are much slower
    start = time.perf_counter()
    dup = f"{config.duplicated_rows} rows x {config.copies} copies"
    print(f"== data: {config.num_patients} phantom patients, duplicates {dup}")
    data = run_data_stage(config)
    if not config.skip_training:
        print("== model: tiny Stable Diffusion, built offline")
        base = run_model_stage(config)
        print(
            f"== fine-tune: {config.max_train_steps} steps with CFG (dropout 0.1) and without (0.0)"
        )
        first = first_round(config, base, data)
        if len(first) > 2:
            print(f"   and, for the mitigation stage, {', '.join(list(first)[2:])}")
        models = run_train_stage(config, first)
        print("== detect: noise magnitude vs copy similarity (both models in parallel)")
        guided = {"cfg": (models["finetune-cfg"], 7.5), "nocfg": (models["finetune-nocfg"], 1.0)}
        run_detect_stage(config, data, guided)
        if not config.skip_mitigation:
            from scripts.mitigation_stage import run_mitigation_stage

            capacity = capacity_round(config, models["pretrained"], data)
            print(f"== capacity control: {', '.join(capacity)}, {config.capacity_steps} steps")
            models |= run_train_stage(config, capacity)
            print("== mitigate: every method against none, same prompts, seeds and threshold")
            frame = pd.read_csv(Path(config.output_dir) / "detect_cfg_prompts.csv")
            run_mitigation_stage(config, data, models, frame)
    (Path(config.output_dir) / "demo_config.json").write_text(json.dumps(asdict(config), indent=1))
    print(
        f"== demo finished in {time.perf_counter() - start:.1f} s; outputs in {config.output_dir}/"
    )


def add_demo_command(subparsers: argparse._SubParsersAction) -> None:
    """Register `chexmem demo`."""
    p = subparsers.add_parser("demo", help="run the study on the embedded default (CPU, offline)")
    defaults = DemoConfig()
    for name, value in vars(defaults).items():
        if isinstance(value, bool):
            p.add_argument(f"--{name}", action="store_true", help=f"(default: {value})")
        else:
            p.add_argument(f"--{name}", type=type(value), default=value, help=f"(default: {value})")
    add_config_flag(p)
    p.set_defaults(
        func=lambda args: run_demo(DemoConfig(**{k: getattr(args, k) for k in vars(defaults)})),
        _parser=p,
    )
