"""Cross-attention scaling on the real tiny model: active in the first steps only, never leaks."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from detect.magnitude import MagnitudeConfig
from hf_datasets.errors import ChexmemError
from mitigate.attention import (
    AttentionScaling,
    ScaledCrossAttnProcessor,
    cross_attention_names,
    scaled_cross_attention,
)
from mitigate.base import generate

PROMPTS = ["Frontal PA chest radiograph. Cardiomegaly.", "Frontal AP chest radiograph. Edema."]
CONFIG = MagnitudeConfig(num_inference_steps=6, num_generations=2, progress=False)


@pytest.fixture(scope="module")
def pipe(tiny_model: Path) -> StableDiffusionPipeline:
    """The tiny model as plain diffusers loads it."""
    return StableDiffusionPipeline.from_pretrained(tiny_model, local_files_only=True)


def magnitudes(result) -> np.ndarray:
    """(generation, step) magnitudes of a mitigated run."""
    table = result.result.table
    return table["magnitude"].to_numpy().reshape(-1, CONFIG.num_inference_steps)


def test_c_one_equals_no_mitigation(pipe) -> None:
    plain = generate(pipe, PROMPTS, CONFIG)
    same = generate(pipe, PROMPTS, CONFIG, AttentionScaling(c=1.0, first_steps=6))
    np.testing.assert_allclose(magnitudes(same), magnitudes(plain), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        same.result.final_latents, plain.result.final_latents, rtol=1e-5, atol=1e-5
    )


def test_scaling_acts_in_the_first_steps_only_and_is_removed_after(pipe) -> None:
    before = dict(pipe.unet.attn_processors)
    plain = magnitudes(generate(pipe, PROMPTS, CONFIG))
    two = magnitudes(generate(pipe, PROMPTS, CONFIG, AttentionScaling(c=1.25, first_steps=2)))
    four = magnitudes(generate(pipe, PROMPTS, CONFIG, AttentionScaling(c=1.25, first_steps=4)))
    assert not np.allclose(two[:, 0], plain[:, 0], rtol=1e-3)  # scaled from step 0
    # both runs scale steps 0 and 1, so they share x_0 .. x_2 and those steps' magnitudes ...
    np.testing.assert_allclose(two[:, :2], four[:, :2], rtol=1e-5)
    # ... and at step 2, on the same x_2, only the run with first_steps=4 still scales
    assert not np.allclose(two[:, 2], four[:, 2], rtol=1e-3)
    after = pipe.unet.attn_processors
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before)  # the very same processor objects


def test_only_cross_attention_is_replaced_and_restored_on_error(pipe) -> None:
    before = dict(pipe.unet.attn_processors)
    names = cross_attention_names(pipe.unet)
    assert names and all(".attn2." in n for n in names)
    with pytest.raises(RuntimeError, match="boom"), AttentionScaling().step(pipe, 0, None):
        inside = pipe.unet.attn_processors
        assert {type(inside[n]) for n in names} == {ScaledCrossAttnProcessor}
        assert all(inside[k] is p for k, p in before.items() if k not in names)
        raise RuntimeError("boom")
    assert all(pipe.unet.attn_processors[k] is p for k, p in before.items())
    assert AttentionScaling(first_steps=3).step(pipe, 3, None).__class__.__name__ == "nullcontext"


class FailsInStepOne(AttentionScaling):
    """Attention scaling on a UNet that raises in step 1, while the scaled processors are in."""

    @contextlib.contextmanager
    def active(self, pipe):
        """A forward pre-hook that records the processor in use, then fails on its 2nd call."""
        self.seen: list[type] = []
        name = cross_attention_names(pipe.unet)[0]

        def hook(module, args):
            self.seen.append(type(module.attn_processors[name]))
            if len(self.seen) == 2:
                raise RuntimeError("UNet failed")

        handle = pipe.unet.register_forward_pre_hook(hook)
        try:
            yield
        finally:
            handle.remove()


def test_a_failing_generation_leaves_no_processor_behind(pipe) -> None:
    before = dict(pipe.unet.attn_processors)
    mitigation = FailsInStepOne(first_steps=3)
    with pytest.raises(RuntimeError, match="UNet failed"):
        generate(pipe, PROMPTS, CONFIG, mitigation)
    assert mitigation.seen == [ScaledCrossAttnProcessor] * 2  # it failed while scaling
    assert all(pipe.unet.attn_processors[k] is p for k, p in before.items())


def test_an_sd1_layout_unet_with_the_stock_processor() -> None:
    """16 cross-attention layers in SD 1.x's block layout (toy widths)."""
    unet = UNet2DConditionModel(
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        sample_size=8,
        cross_attention_dim=32,
        norm_num_groups=8,
        attention_head_dim=8,
    ).eval()
    assert len(cross_attention_names(unet)) == 16
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        stock = unet(x, 500, text).sample
        with scaled_cross_attention(unet, 1.0):
            one = unet(x, 500, text).sample
        with scaled_cross_attention(unet, 1.25):
            scaled = unet(x, 500, text).sample
        # BOS is never scaled: only BOS's logit changed means nothing else did
        with scaled_cross_attention(unet, 1.25):
            bos_only = unet(x, 500, text[:, :1]).sample
        single = unet(x, 500, text[:, :1]).sample
    torch.testing.assert_close(one, stock, rtol=1e-5, atol=1e-5)
    assert (scaled - stock).abs().max() > 1e-4
    torch.testing.assert_close(bos_only, single, rtol=1e-5, atol=1e-5)


def test_bad_settings_and_unets_without_cross_attention() -> None:
    with pytest.raises(ChexmemError):
        AttentionScaling(c=0.0)
    with pytest.raises(ChexmemError):
        AttentionScaling(first_steps=-1)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 8),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_type=None,
        layers_per_block=1,
        sample_size=8,
        cross_attention_dim=8,
        norm_num_groups=4,
    )
    with pytest.raises(ChexmemError, match="cross-attention"), scaled_cross_attention(unet, 1.25):
        pass
