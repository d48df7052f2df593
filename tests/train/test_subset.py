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


def _block_mask(unet, family: str, on: int = 0, **extra: object) -> dict:
    """A block mask selecting one transformer block."""
    mask = [0] * len(transformer_blocks(unet))
    mask[on] = 1
    return {"family": family, "block_mask": mask, **extra}


def test_difffit_scales_fold_into_a_plain_unet(unet, tiny_model: Path, tmp_path: Path) -> None:
    import copy

    import torch

    from train.subset import SCALE_NAME, apply_subset, load_subset, save_subset, select_subset

    tuned = copy.deepcopy(unet)
    (tmp_path / "m.json").write_text(json.dumps(_block_mask(unet, "difffit", on=1)))
    subset = select_subset(tuned, [], str(tmp_path / "m.json"))
    block = transformer_blocks(unet)[1]
    assert sorted(subset.scaled) == sorted(
        f"{block}.transformer_blocks.0.{m}"
        for m in ("attn1.to_out.0", "attn2.to_out.0", "ff.net.2")
    )
    apply_subset(tuned, subset)
    trained = {n for n, p in tuned.named_parameters() if p.requires_grad}
    assert trained == set(subset.names)
    assert all(n.startswith(block + ".") for n in trained)
    assert all(n.endswith((".bias", SCALE_NAME)) or "norm" in n for n in trained)
    torch.manual_seed(0)
    with torch.no_grad():  # move every trained tensor away from its initial value
        for name, param in tuned.named_parameters():
            if name in trained:
                param.add_(torch.randn_like(param) * 0.3)
    save_subset(tuned, subset, tmp_path, str(tiny_model))
    plain = copy.deepcopy(unet)
    load_subset(plain, tmp_path)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    states = torch.randn(2, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        want = tuned(x, t, states).sample
        got = plain(x, t, states).sample
        before = unet(x, t, states).sample
    assert not torch.allclose(want, before, atol=1e-3)  # the scales changed the output
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_difffit_block_mask_trains_and_resumes(base_args: dict, unet, tmp_path: Path) -> None:
    (tmp_path / "m.json").write_text(json.dumps(_block_mask(unet, "difffit")))
    args = {**base_args, "max_train_steps": 2, "checkpointing_steps": 1}
    first = train(TrainConfig(**args, trainable_mask=str(tmp_path / "m.json")))
    assert first.trainable_params < 2000 and 0 < first.trainable_share < 0.01
    again = train(
        TrainConfig(
            **{**args, "max_train_steps": 3},
            trainable_mask=str(tmp_path / "m.json"),
            resume_from_checkpoint="latest",
        )
    )
    assert again.global_step == 3
    from detect.models import load_pipeline

    assert load_pipeline(again.output_dir).unet is not None


def test_lora_per_block_puts_adapters_in_the_chosen_block_only(
    base_args: dict, unet, tmp_path: Path
) -> None:
    (tmp_path / "m.json").write_text(json.dumps(_block_mask(unet, "lora", on=2, rank=2)))
    config = TrainConfig(**base_args, trainable_mask=str(tmp_path / "m.json"))
    assert (config.mode, config.rank) == ("lora", 2)
    result = train(TrainConfig(**{**base_args, "max_train_steps": 2, "checkpointing_steps": 0},
                               trainable_mask=str(tmp_path / "m.json")))  # fmt: skip
    weights = load_file(str(result.output_dir / LORA_WEIGHTS))
    block = transformer_blocks(unet)[2]
    assert weights and all(k.removeprefix("unet.").startswith(block + ".") for k in weights)
    assert {w.shape[0] for k, w in weights.items() if "lora_A" in k or "down" in k} == {2}
    with pytest.raises(ChexmemError, match="sets --rank 2"):
        TrainConfig(**base_args, trainable_mask=str(tmp_path / "m.json"), rank=8)
    with pytest.raises(ChexmemError, match="means --mode lora"):
        TrainConfig(**base_args, trainable_mask=str(tmp_path / "m.json"), mode="subset")


def test_from_search_takes_mask_rate_rank_and_base(tmp_path: Path, unet) -> None:
    saved = {**_block_mask(unet, "lora", rank=8), "learning_rate": 3e-4, "base_model": "base/x"}
    (tmp_path / "trial_0001.json").write_text(json.dumps(saved))
    config = TrainConfig(from_search=str(tmp_path / "trial_0001.json"), train_data_dir="other")
    assert (config.mode, config.rank, config.learning_rate) == ("lora", 8, 3e-4)
    assert config.pretrained_model_name_or_path == "base/x"
    assert config.trainable_mask == str(tmp_path / "trial_0001.json")
    mine = TrainConfig(from_search=str(tmp_path / "trial_0001.json"), learning_rate=1e-5,
                       pretrained_model_name_or_path="mine")  # fmt: skip
    assert (mine.learning_rate, mine.pretrained_model_name_or_path) == (1e-5, "mine")
    with pytest.raises(ChexmemError, match="drop --trainable_mask"):
        TrainConfig(from_search=str(tmp_path / "trial_0001.json"), trainable_preset="attention")
    with pytest.raises(ChexmemError, match="does not exist"):
        TrainConfig(from_search=str(tmp_path / "missing.json"))
