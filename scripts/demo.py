"""`chexmem demo`: the whole study on the embedded default (phantom data, tiny model, CPU).

Stages so far:
1. data: phantom chest radiographs with injected duplicates, saved with `save_to_disk`,
   and contact sheets of duplicated and ordinary training rows;
2. model: the tiny Stable Diffusion base model, built offline;
3. fine-tune: the tiny model on the phantom data, with classifier-free guidance
   (conditioning dropout 0.1) and without (0.0), everything else equal, as two parallel
   `python -m train` processes (logs in each run's train.log);
4. copies: generations for duplicated training prompts and for held-out prompts, each
   matched to its nearest training image (pixel NCC), with a summary and image grids.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

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
    num_patients: int = 60
    max_studies_per_patient: int = 3
    resolution: int = 64
    duplicated_rows: int = 10
    copies: int = 20
    max_train_steps: int = 1600
    train_batch_size: int = 8
    learning_rate: float = 2e-3
    lr_scheduler: str = "cosine"  # annealed to 0: sharper copies than a constant rate
    held_out_prompts: int = 10
    generations_per_prompt: int = 2
    inference_steps: int = 25
    vae_train_steps: int = 300
    seed: int = 0
    overwrite: bool = False
    skip_training: bool = False


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


def train_flags(config: DemoConfig, base: Path, data: Path, dropout: float, out: Path) -> list[str]:
    """`chexmem train` flags of one demo fine-tune (full, UNet + the untrained text encoder).

    Latents are cached: the phantoms are already at the model's size, so nothing is lost.
    """
    return [
        "--pretrained_model_name_or_path", str(base),
        "--train_data_dir", str(data),
        "--output_dir", str(out),
        "--overwrite_output_dir",
        "--conditioning_dropout_prob", str(dropout),
        "--train_text_encoder",  # the tiny model's text encoder starts untrained
        "--max_train_steps", str(config.max_train_steps),
        "--train_batch_size", str(config.train_batch_size),
        "--learning_rate", str(config.learning_rate),
        "--lr_scheduler", config.lr_scheduler,
        "--lr_warmup_steps", "50",
        "--checkpointing_steps", str(max(500, config.max_train_steps // 2)),
        "--checkpoints_total_limit", "1",
        "--logging_steps", "25",
        "--seed", str(config.seed),
        "--report_to", "jsonl",
        "--cache_latents",
    ]  # fmt: skip


def run_train_stage(
    config: DemoConfig, base: Path, data: Path, variants: dict[str, float]
) -> dict[str, Path]:
    """The fine-tunes (name -> conditioning dropout) as parallel `python -m train` processes.

    One process per variant, one thread each: on a 2-core machine both run at once.
    """
    out = Path(config.output_dir)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    running = {}
    for name, dropout in variants.items():
        (out / name).mkdir(parents=True, exist_ok=True)
        log = (out / name / "train.log").open("w")
        command = [
            sys.executable,
            "-m",
            "train",
            *train_flags(config, base, data, dropout, out / name),
        ]
        running[name] = (
            subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env),
            log,
        )
    for name, (process, log) in running.items():
        code = process.wait()
        log.close()
        if code != 0:
            tail = (out / name / "train.log").read_text()[-2000:]
            raise ChexmemError(
                f"fine-tune {name} failed (exit {code}); see {out / name / 'train.log'}:\n{tail}"
            )
        run = json.loads((out / name / "chexmem_train.json").read_text())
        loss = run["final_loss"]
        print(
            f"{name}: {run['global_step']} steps in {run['seconds']:.0f} s, final loss {loss:.4f}"
        )
    return {name: out / name for name in variants}


def generate(
    model: Path, prompts: list[str], n: int, steps: int, guidance: float, seed: int
) -> list[list[Image.Image]]:
    """n images per prompt with fixed seeds (generation j of prompt i uses seed + 1000 i + j)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    images = []
    for i, prompt in enumerate(prompts):
        generators = [torch.Generator().manual_seed(seed + 1000 * i + j) for j in range(n)]
        images.append(
            pipe(
                [prompt] * n,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=generators,
            ).images
        )
    return images


def run_copy_stage(config: DemoConfig, data: Path, models: dict[str, tuple[Path, float]]) -> dict:
    """Nearest-training-image similarity of generations for duplicated vs held-out prompts."""
    dataset = load_dataset_dir(data)
    train = dataset["train"]
    train_images = list(train["image"])
    bank = ncc_features(train_images)
    prompts = train["prompt"]
    duplicated = [prompts[i] for i in duplicated_rows(train)]
    held_out = list(dataset["test"]["prompt"])[: config.held_out_prompts]
    groups = {"duplicated": duplicated, "held_out": held_out}
    summary: dict = {"similarity": "pixel NCC at 64 px to the nearest training image", "models": {}}
    out = Path(config.output_dir)
    for name, (model, guidance) in models.items():
        summary["models"][name] = {"guidance_scale": guidance}
        for group, prompts in groups.items():
            images = generate(
                model,
                prompts,
                config.generations_per_prompt,
                config.inference_steps,
                guidance,
                config.seed,
            )
            flat = [img for per_prompt in images for img in per_prompt]
            match = nearest(ncc_features(flat), bank)
            sims = match.similarity.reshape(len(prompts), -1)
            summary["models"][name][group] = {
                "prompts": len(prompts),
                "generations_per_prompt": config.generations_per_prompt,
                "mean_nearest_similarity": round(float(sims.mean()), 4),
                "median_prompt_max": round(float(np.median(sims.max(axis=1))), 4),
                "share_above_0.9": round(float((sims.max(axis=1) > 0.9).mean()), 4),
            }
            pairs, captions = [], []
            for k, img in enumerate(flat[:: config.generations_per_prompt][:8]):
                idx = int(match.index[k * config.generations_per_prompt])
                score = match.similarity[k * config.generations_per_prompt]
                pairs += [img, train_images[idx]]
                captions += [
                    f"{name} generation",
                    f"nearest training image, NCC {score:.2f}",
                ]
            contact_sheet(pairs, captions, tile=128, columns=4, caption_lines=2).save(
                out / f"copies_{name}_{group}.png"
            )
    (out / "copies.json").write_text(json.dumps(summary, indent=1))
    for name, result in summary["models"].items():
        for group in groups:
            r = result[group]
            print(
                f"{name:>8} {group:>10}: mean nearest NCC {r['mean_nearest_similarity']:.3f}, "
                f"median per-prompt max {r['median_prompt_max']:.3f}, "
                f"share > 0.9 {r['share_above_0.9']:.0%}"
            )
    return summary


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
        models = run_train_stage(config, base, data, {"finetune-cfg": 0.1, "finetune-nocfg": 0.0})
        print("== copies: generations vs nearest training image")
        guided = {"cfg": (models["finetune-cfg"], 7.5), "nocfg": (models["finetune-nocfg"], 1.0)}
        run_copy_stage(config, data, guided)
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
