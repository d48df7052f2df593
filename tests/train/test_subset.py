"""Capacity presets (--trainable_preset): what each selects on the tiny UNet, and a short run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from hf_datasets.errors import ChexmemError
from train.config import TrainConfig
from train.lora import LORA_WEIGHTS
from train.subset import DELTA_FILE, PRESETS, from_preset, transformer_blocks
from train.trainer import train


@pytest.fixture(scope="module")
def unet(tiny_model: Path):
    return StableDiffusionPipeline.from_pretrained(tiny_model).unet


def _in_blocks(name: str, blocks: list[str]) -> bool:
    return any(name.startswith(b + ".") for b in blocks)


def test_each_subset_preset_selects_the_expected_parameters(unet) -> None:
    names = [n for n, _ in unet.named_parameters()]
    blocks = transformer_blocks(unet)
    expected = {
        "attention": [n for n in names if ".attn1." in n or ".attn2." in n],
        "cross_attention": [n for n in names if ".attn2." in n],
        "bias_norm": [n for n in names if n.endswith(".bias") or "norm" in n],
        "down": [n for n in names if _in_blocks(n, [b for b in blocks if b.startswith("down_")])],
        "mid": [n for n in names if _in_blocks(n, [b for b in blocks if b.startswith("mid_")])],
        "up": [n for n in names if _in_blocks(n, [b for b in blocks if b.startswith("up_")])],
    }
    for name, wanted in expected.items():
        chosen = from_preset(unet, name).names
        assert wanted and sorted(chosen) == sorted(wanted), name
    assert not any(".attn1." in n for n in from_preset(unet, "cross_attention").names)
    assert any(re.search(r"\.ff\.", n) for n in from_preset(unet, "mid").names)
    assert set(expected) | {"lora_r4"} == set(PRESETS)


def test_presets_set_the_mode_and_unknown_names_list_the_valid_ones() -> None:
    assert TrainConfig(trainable_preset="attention").mode == "subset"
    lora = TrainConfig(trainable_preset="lora_r4")
    assert (lora.mode, lora.rank) == ("lora", 4)
    assert TrainConfig(**lora.to_dict()) == lora  # a saved config reloads unchanged
    with pytest.raises(ChexmemError, match=r"unknown --trainable_preset 'ffn'.*attention.*lora_r4"):
        TrainConfig(trainable_preset="ffn")
    with pytest.raises(ChexmemError, match="means --mode subset, not --mode lora"):
        TrainConfig(trainable_preset="bias_norm", mode="lora")
    with pytest.raises(ChexmemError, match="means --rank 4"):
        TrainConfig(trainable_preset="lora_r4", rank=8)


@pytest.mark.parametrize("name", list(PRESETS))
def test_a_short_fine_tune_runs_with_each_preset(base_args: dict, name: str) -> None:
    result = train(
        TrainConfig(
            **{**base_args, "max_train_steps": 2, "checkpointing_steps": 0},
            trainable_preset=name,
        )
    )
    run = json.loads((result.output_dir / "chexmem_train.json").read_text())
    assert 0 < result.trainable_share < 1
    assert run["trainable_share"] == pytest.approx(result.trainable_share)
    assert run["config"]["trainable_preset"] == name
    if name == "lora_r4":
        assert LORA_WEIGHTS in result.files and run["config"]["rank"] == 4
        return
    delta = load_file(str(result.output_dir / DELTA_FILE))
    assert sum(v.numel() for v in delta.values()) == result.trainable_params
