"""CxrMemPipeline: loads any SD folder, generates, and returns the magnitudes of its steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from detect.magnitude import MagnitudeConfig, noise_magnitudes, seed_of
from mitigate.pipeline import CxrMemPipeline

PROMPTS = ["Frontal PA chest radiograph. Cardiomegaly.", "Frontal AP chest radiograph. Edema."]


@pytest.fixture(scope="module")
def pipe(tiny_model: Path) -> CxrMemPipeline:
    """The custom pipeline loaded from a plain StableDiffusionPipeline folder."""
    return CxrMemPipeline.from_pretrained(tiny_model, local_files_only=True)


def test_generation_returns_images_and_per_step_magnitudes(pipe: CxrMemPipeline) -> None:
    out = pipe(PROMPTS, num_images_per_prompt=2, num_inference_steps=3, score_steps=2)
    assert len(out.images) == 4 and out.images[0].size == (64, 64)
    assert len(out.magnitudes) == 2 * 2 * 3
    reference = noise_magnitudes(
        pipe, PROMPTS, MagnitudeConfig(num_inference_steps=3, num_generations=2, progress=False)
    )
    assert out.scores[PROMPTS[1]] == pytest.approx(float(reference.scores(first_k=2)[1]))


def test_images_equal_the_stock_pipeline_with_the_same_seeds(
    pipe: CxrMemPipeline, tiny_model: Path
) -> None:
    stock = StableDiffusionPipeline.from_pretrained(tiny_model, local_files_only=True)
    stock.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(seed_of(0, j)) for j in range(2)]
    expected = stock(
        PROMPTS[0], num_images_per_prompt=2, num_inference_steps=4, generator=generators,
        output_type="latent",
    ).images  # fmt: skip
    ours = pipe(PROMPTS[0], num_images_per_prompt=2, num_inference_steps=4, output_type="latent")
    torch.testing.assert_close(torch.stack(ours.images), expected, rtol=1e-4, atol=1e-5)


def test_from_pipe_shares_components_and_explains_tokens(tiny_model: Path) -> None:
    stock = StableDiffusionPipeline.from_pretrained(tiny_model, local_files_only=True)
    pipe = CxrMemPipeline.from_pipe(stock)
    assert pipe.unet is stock.unet
    from detect.tokens import TokenConfig

    significance = pipe.token_significance(
        PROMPTS[0], TokenConfig(steps=1, num_generations=1, num_inference_steps=4)
    )
    assert significance.words[:2] == ["frontal", "pa"] and (significance.scores > 0).all()


def test_diffusers_custom_pipeline_loads_the_same_class(tiny_model: Path) -> None:
    from diffusers import DiffusionPipeline

    from mitigate.pipeline import CUSTOM_PIPELINE

    pipe = DiffusionPipeline.from_pretrained(
        tiny_model, custom_pipeline=CUSTOM_PIPELINE, trust_remote_code=True, local_files_only=True
    )
    assert type(pipe).__name__ == "CxrMemPipeline"
    ours = CxrMemPipeline.from_pretrained(tiny_model, local_files_only=True)
    a = pipe(PROMPTS[0], num_images_per_prompt=1, num_inference_steps=2, output_type="latent")
    b = ours(PROMPTS[0], num_images_per_prompt=1, num_inference_steps=2, output_type="latent")
    torch.testing.assert_close(a.images[0], b.images[0])
    assert a.scores == b.scores


def test_mitigation_by_name_and_unknown_name(pipe: CxrMemPipeline) -> None:
    from hf_datasets.errors import ChexmemError

    plain = pipe(PROMPTS[0], num_images_per_prompt=1, num_inference_steps=2, output_type="latent")
    none = pipe(
        PROMPTS[0], num_images_per_prompt=1, num_inference_steps=2, output_type="latent",
        mitigation="none",
    )  # fmt: skip
    assert none.mitigation == {"method": "none"} and none.scores == plain.scores
    with pytest.raises(ChexmemError, match="unknown mitigation"):
        pipe(PROMPTS[0], num_inference_steps=2, mitigation="nope")


def test_every_detector_asked_for_is_scored_from_the_same_pass(pipe: CxrMemPipeline) -> None:
    from detect.base import SamplingPass
    from detect.sharpness import Sharpness
    from hf_datasets.errors import ChexmemError

    names = ["magnitude", "sharpness", "anisotropy", "seed_consistency"]
    out = pipe(PROMPTS, num_images_per_prompt=2, num_inference_steps=3, detectors=names)
    table = out.detector_scores
    assert list(table["prompt"]) == PROMPTS
    assert {
        "score_first_1",
        "score_sharpness",
        "score_anisotropy",
        "score_seed_consistency",
    } <= set(table.columns)
    assert table["score_first_1"].tolist() == pytest.approx([out.scores[p] for p in PROMPTS])
    config = MagnitudeConfig(num_inference_steps=3, num_generations=2, progress=False)
    alone = noise_magnitudes(pipe, PROMPTS, config, keep_first_step=True)
    run = SamplingPass(pipe, PROMPTS, [0, 1], config, alone.table, 1, alone.first_step)
    expected = Sharpness().score(run)["score_sharpness"]
    assert table["score_sharpness"].tolist() == pytest.approx(expected.tolist(), rel=1e-5)
    with pytest.raises(ChexmemError, match="without a mitigation"):
        pipe(PROMPTS, num_images_per_prompt=2, num_inference_steps=3,
             mitigation="random_tokens", detectors=names)  # fmt: skip
