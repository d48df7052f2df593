"""LoRA on the UNet (and optionally the text encoder) through peft, saved in diffusers format."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from transformers import CLIPTextModel

from detect.models import LORA_FILE
from hf_datasets.errors import ChexmemError
from train.config import TrainConfig
from train.subset import lora_block_targets

LORA_WEIGHTS = LORA_FILE  # one name for the file, shared with the loader in detect.models


def add_lora(unet: torch.nn.Module, text_encoder: CLIPTextModel, config: TrainConfig) -> None:
    """Freeze everything and attach trainable LoRA adapters (named 'default')."""
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)

    def lora_config(targets: list[str]) -> LoraConfig:
        return LoraConfig(
            r=config.rank,
            lora_alpha=config.lora_alpha or config.rank,
            lora_dropout=config.lora_dropout,
            init_lora_weights="gaussian",
            target_modules=targets,
        )

    targets = config.lora_target_modules
    if config.trainable_mask:  # a block mask of family "lora": adapters in those blocks only
        targets = lora_block_targets(unet, json.loads(Path(config.trainable_mask).read_text()))
        if not targets:
            raise ChexmemError(f"--trainable_mask {config.trainable_mask} selects no block")
    try:
        unet.add_adapter(lora_config(targets))
        if config.train_text_encoder:
            # peft directly, not transformers' `add_adapter`: transformers >= 5.24 refuses
            # that with the newest peft on PyPI (0.21.2; it asks for >= 0.22)
            inject_adapter_in_model(
                lora_config(config.text_encoder_lora_target_modules), text_encoder, "default"
            )
    except ValueError as error:
        raise ChexmemError(
            f"LoRA target modules do not match the model: {error}".splitlines()[0]
        ) from None


def save_lora(unet: torch.nn.Module, text_encoder: CLIPTextModel | None, out: Path) -> Path:
    """Write `pytorch_lora_weights.safetensors` (diffusers format, for load_lora_weights)."""
    unet_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    text_layers = None
    if text_encoder is not None:
        text_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder))
    StableDiffusionPipeline.save_lora_weights(
        out,
        unet_lora_layers=unet_layers,
        text_encoder_lora_layers=text_layers,
        safe_serialization=True,
    )
    return out / LORA_WEIGHTS
