"""load_pipeline reads every kind of `chexmem train` output, found by its files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from detect.models import load_pipeline
from hf_datasets.errors import ChexmemError
from train.config import TrainConfig
from train.trainer import train


def _fine_tune(tiny_model: Path, data: Path, out: Path, **mode: object) -> Path:
    """A 3-step fine-tune of the tiny model."""
    config = TrainConfig(
        pretrained_model_name_or_path=str(tiny_model),
        train_data_dir=str(data),
        output_dir=str(out),
        train_batch_size=4,
        max_train_steps=3,
        checkpointing_steps=0,
        learning_rate=1e-2,
        report_to="jsonl",
        **mode,
    )
    return train(config).output_dir


def _latents(pipe: StableDiffusionPipeline) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return pipe("Frontal PA chest radiograph.", num_inference_steps=2, generator=generator,
                output_type="latent").images  # fmt: skip


@pytest.mark.parametrize(
    "mode",
    [{"mode": "lora", "rank": 4}, {"mode": "subset", "trainable_params": [r"attn2\.to_v\."]}],
    ids=["lora", "subset"],
)
def test_lora_and_subset_folders_load_onto_their_base_model(
    tiny_model: Path, phantom_data: Path, tmp_path: Path, mode: dict
) -> None:
    out = _fine_tune(tiny_model, phantom_data, tmp_path / "run", **mode)
    tuned = load_pipeline(out)
    base = load_pipeline(tiny_model)
    assert not torch.allclose(_latents(tuned), _latents(base))
    if mode["mode"] == "subset":
        changed = {
            name
            for name, p in tuned.unet.named_parameters()
            if not torch.equal(p, dict(base.unet.named_parameters())[name])
        }
        assert changed and all(".attn2.to_v." in name for name in changed)


def test_a_folder_that_is_no_model_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ChexmemError, match="is not a model"):
        load_pipeline(tmp_path)
    with pytest.raises(ChexmemError, match="cannot load a Stable Diffusion model"):
        load_pipeline(tmp_path / "missing-folder")
