"""Stable Diffusion at a published size with seeded random weights, built offline.

`build_random_pipeline` reads a folder of diffusers / transformers configs (by default
``train/configs/sd15``: SD v1.5's UNet, VAE, CLIP text encoder and scheduler) and writes an
ordinary pipeline folder that ``StableDiffusionPipeline.from_pretrained`` and every chexmem
command load. Nothing is downloaded: the tokenizer is trained offline on report-style prompts
(`train.tokenizer`) and the text encoder keeps the published vocabulary size, so every layer
has SD's shape. The weights are random: the folder measures speed and memory, not images.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from hf_datasets.errors import ChexmemError
from train.tiny_model import save_pipeline
from train.tokenizer import build_tokenizer, prompt_corpus

CONFIGS = Path(__file__).resolve().parent / "configs"
INFO_FILE = "chexmem_random.json"
PARTS = ("unet/config.json", "vae/config.json", "text_encoder/config.json",
         "scheduler/scheduler_config.json")  # fmt: skip


def config_dir(name: str | Path) -> Path:
    """A config folder: a name under train/configs (``sd15``) or a path."""
    path = Path(name)
    folder = path if path.is_dir() else CONFIGS / str(name)
    missing = [part for part in PARTS if not (folder / part).is_file()]
    if missing:
        known = sorted(p.name for p in CONFIGS.iterdir() if p.is_dir())
        raise ChexmemError(
            f"{name} is not a config folder (missing {', '.join(missing)}); give a folder with "
            f"{', '.join(PARTS)} or one of {', '.join(known)}"
        )
    return folder


def read_config(folder: Path, part: str) -> dict[str, Any]:
    """One part's config without the keys that only name its class or version."""
    config = json.loads((folder / part).read_text())
    return {k: v for k, v in config.items() if not k.startswith("_") and k != "architectures"}


def make_random_pipeline(
    configs: str | Path = "sd15", seed: int = 0, resolution: int | None = None
) -> StableDiffusionPipeline:
    """The pipeline in memory, weights drawn from `seed`; `resolution` sets the sample sizes."""
    folder = config_dir(configs)
    unet_config, vae_config = read_config(folder, PARTS[0]), read_config(folder, PARTS[1])
    text_config = read_config(folder, PARTS[2])
    if resolution is not None:
        factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
        multiple = factor * 2 ** (len(unet_config["block_out_channels"]) - 1)
        if resolution % multiple:
            raise ChexmemError(f"resolution must be a multiple of {multiple}, not {resolution}")
        vae_config["sample_size"], unet_config["sample_size"] = resolution, resolution // factor
    tokenizer = build_tokenizer(prompt_corpus(seed=seed), min(1000, text_config["vocab_size"]))
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config)
        text_encoder = CLIPTextModel(CLIPTextConfig(**{**text_config, **special}))
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler.from_config(read_config(folder, PARTS[3])),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def parameter_counts(pipe: StableDiffusionPipeline) -> dict[str, int]:
    """Parameters of the UNet, VAE and text encoder."""
    parts = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder}
    return {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items()}


def build_random_pipeline(
    out: str | Path,
    configs: str | Path = "sd15",
    seed: int = 0,
    resolution: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Build the random-weight pipeline and save it as a diffusers folder at `out`."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ChexmemError(f"{out} already exists; pass --overwrite to replace it")
    pipe = make_random_pipeline(configs, seed, resolution)
    info = {
        "what": f"random weights in the architecture of {config_dir(configs)}",
        "seed": seed,
        "resolution": pipe.vae.config.sample_size,
        "parameters": parameter_counts(pipe),
    }
    return save_pipeline(pipe, out, INFO_FILE, info)
