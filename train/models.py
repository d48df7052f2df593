"""Loading Stable Diffusion 1.x / 2.x components (local folder or Hub id) with clear errors."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from detect.models import library_reason, model_source
from hf_datasets.errors import ChexmemError

SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "CxrMemPipeline")


@dataclass
class Components:
    """The parts of an SD pipeline that training touches."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler
    source: str

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along one side (8 for SD, 4 for the tiny model)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_resolution(self) -> int:
        """The image size the UNet was made for."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor


def check_pipeline_folder(path: Path) -> None:
    """A local folder must be an SD-style diffusers pipeline with the parts we need."""
    index = path / "model_index.json"
    if not index.is_file():
        raise ChexmemError(
            f"{path} is not a diffusers pipeline folder (no model_index.json); "
            "give a folder written by save_pretrained or a Hub id like "
            "stable-diffusion-v1-5/stable-diffusion-v1-5"
        )
    spec = json.loads(index.read_text())
    name = spec.get("_class_name")
    name = name[-1] if isinstance(name, list) else name
    missing = [
        p for p in ("tokenizer", "text_encoder", "vae", "unet", "scheduler") if p not in spec
    ]
    if missing or name not in SUPPORTED_PIPELINES:
        raise ChexmemError(
            f"{path} holds a {name} without {', '.join(missing) or 'the expected layout'}; "
            "chexmem trains Stable Diffusion 1.x / 2.x pipelines (StableDiffusionPipeline)"
        )


def load_components(
    name_or_path: str | None, revision: str | None = None, variant: str | None = None
) -> Components:
    """Tokenizer, text encoder, VAE, UNet (float32, as stored) and a DDPM training scheduler."""
    if not name_or_path:
        raise ChexmemError(
            "--pretrained_model_name_or_path is required: a pipeline folder (e.g. one made by "
            "`chexmem model tiny --out tiny-sd`) or a Hub id"
        )
    # a local folder as its absolute path, so the run file names the base from anywhere
    source, local = model_source(name_or_path)
    if local:
        check_pipeline_folder(Path(source))
    kwargs = {"revision": revision, "local_files_only": local}
    try:
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kwargs)
        text_encoder = CLIPTextModel.from_pretrained(
            source, subfolder="text_encoder", variant=variant, **kwargs
        )
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", variant=variant, **kwargs)
        unet = UNet2DConditionModel.from_pretrained(
            source, subfolder="unet", variant=variant, **kwargs
        )
        scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **kwargs)
    except (OSError, ValueError) as error:
        where = "folder" if local else "Hub id (is it spelled right, and are you online?)"
        raise ChexmemError(
            f"cannot load a Stable Diffusion model from {source!r} ({where}): "
            f"{library_reason(error)}"
        ) from None
    return Components(tokenizer, text_encoder, vae, unet, scheduler, source)
