"""The prepared GPU check in its CPU form, and SD v1.5's configs at their published sizes."""

from __future__ import annotations

import json

import pytest
import torch

from scripts import gpu_check
from train.random_model import PARTS, config_dir, read_config

# parameters of runwayml/stable-diffusion-v1-5's UNet, VAE and CLIP ViT-L/14 text tower
PUBLISHED = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}


def test_sd15_configs_build_the_published_sizes() -> None:
    """The configs in train/configs/sd15 give SD v1.5's parameter counts (on the meta device)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = config_dir("sd15")
    with torch.device("meta"):
        parts = {
            "unet": UNet2DConditionModel(**read_config(folder, PARTS[0])),
            "vae": AutoencoderKL(**read_config(folder, PARTS[1])),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**read_config(folder, PARTS[2]))),
        }
    counts = {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items()}
    assert counts == PUBLISHED


def test_unknown_config_folder_names_the_known_ones(tmp_path) -> None:
    from hf_datasets.errors import ChexmemError

    with pytest.raises(ChexmemError, match="sd15"):
        config_dir(tmp_path)


@pytest.mark.slow
def test_cpu_form_writes_every_figure(tiny_model, phantom_data, tmp_path) -> None:
    """Training per option set with FLOPs, detection against its floor, skips with reasons."""
    out = tmp_path / "check.json"
    argv = ["--model", str(tiny_model), "--data", str(phantom_data), "--device", "cpu",
            "--resolution", "64", "--train_batch", "2", "--train_steps", "2",
            "--train_warmup", "1", "--train_options", "base", "cache_latents", "xformers",
            "--prompts", "3", "--n", "2", "--detect_batch", "4", "--out", str(out)]  # fmt: skip
    assert gpu_check.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["environment"]["device"] == "cpu"
    train = report["train"]
    assert train["unet_train_flops_per_sample"] > 0
    for name in ("base", "cache_latents"):
        run = train["runs"][name]
        assert run["samples_per_s"] > 0 and run["peak_memory_gib"] > 0
        assert run["mfu"] is None  # a CPU has no known peak
    if not report["environment"]["installed"]["xformers"]:
        assert train["runs"]["xformers"] == {"skipped": "xformers is not installed"}
    detect = report["detect"]["sdpa"]
    assert detect["seconds"] > 0 and detect["floor_seconds"] > 0
    assert detect["ratio"] == pytest.approx(detect["seconds"] / detect["floor_seconds"])
    assert not list(tmp_path.glob(".*partial"))


def test_flops_count_matches_forward_and_backward(tiny_model) -> None:
    """The meta-device count equals a count on the real tiny UNet at batch 1.

    With math attention: CPU's fused attention kernel has no FLOP formula, and would leave the
    attention matmuls out of the count.
    """
    from diffusers import UNet2DConditionModel
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counted = gpu_check.unet_train_flops(str(tiny_model), 64)
    unet = UNet2DConditionModel.from_pretrained(tiny_model / "unet")
    size = unet.config.sample_size
    x = torch.randn(1, unet.config.in_channels, size, size)
    states = torch.randn(1, 77, unet.config.cross_attention_dim)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        unet(x, torch.tensor([500]), states).sample.sum().backward()
    assert counted == counter.get_total_flops() > 0


def test_random_pipeline_builds_a_loadable_folder_from_a_config_folder(tmp_path) -> None:
    """The builder reads any config folder; the result loads as an ordinary SD pipeline."""
    from diffusers import StableDiffusionPipeline

    from train.random_model import INFO_FILE, build_random_pipeline

    source = config_dir("sd15")
    small = tmp_path / "small"
    shrink = {
        PARTS[0]: {"block_out_channels": [32, 64], "attention_head_dim": 2,
                   "cross_attention_dim": 32, "layers_per_block": 1, "norm_num_groups": 8,
                   "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                   "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]},
        PARTS[1]: {"block_out_channels": [32, 32], "layers_per_block": 1, "norm_num_groups": 8,
                   "down_block_types": ["DownEncoderBlock2D"] * 2,
                   "up_block_types": ["UpDecoderBlock2D"] * 2},
        PARTS[2]: {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                   "num_attention_heads": 2, "projection_dim": 32},
        PARTS[3]: {},
    }  # fmt: skip
    for part, changes in shrink.items():
        (small / part).parent.mkdir(parents=True)
        config = json.loads((source / part).read_text())
        (small / part).write_text(json.dumps({**config, **changes}))
    out = build_random_pipeline(tmp_path / "model", small, seed=1, resolution=32)
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert pipe.vae.config.sample_size == 32 and pipe.unet.config.sample_size == 16
    assert pipe.text_encoder.config.vocab_size == 49408  # the published table, whatever the corpus
    info = json.loads((out / INFO_FILE).read_text())
    assert info["parameters"]["unet"] == sum(p.numel() for p in pipe.unet.parameters())
    from hf_datasets.errors import ChexmemError

    with pytest.raises(ChexmemError, match="already exists"):
        build_random_pipeline(out, small)
