"""Embedding adjustment on the real tiny model: lowers m_T to the target, touches only e_p."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from detect.magnitude import MagnitudeConfig, encode_prompts, initial_latents, noise_magnitudes
from hf_datasets.errors import ChexmemError
from mitigate.base import generate
from mitigate.embedding import (
    EmbeddingAdjustment,
    adjust_embedding,
    calibrate_target,
    ddim_scheduler,
)

PROMPTS = [
    "Frontal AP chest radiograph of a 42-year-old man. Cardiomegaly. Support devices.",
    "Frontal PA chest radiograph of a 70-year-old woman. No acute abnormality.",
]
IDS = [3, 8]
CONFIG = MagnitudeConfig(num_inference_steps=10, num_generations=2, progress=False)


@pytest.fixture(scope="module")
def pipe(tiny_model: Path) -> StableDiffusionPipeline:
    """The tiny model as plain diffusers loads it."""
    return StableDiffusionPipeline.from_pretrained(tiny_model, local_files_only=True)


@pytest.fixture(scope="module")
def start(pipe) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """The prompts' e_p, the x_T generate() uses for them, and their first-step scores."""
    latents, _ = initial_latents(pipe, IDS, CONFIG, ddim_scheduler(pipe, CONFIG))
    first = dataclasses.replace(CONFIG, max_steps=1)
    scores = noise_magnitudes(pipe, PROMPTS, first, IDS).scores(1).to_numpy()
    return encode_prompts(pipe, PROMPTS), latents, scores


def test_adjustment_lowers_the_first_step_magnitude_until_the_target(pipe, start) -> None:
    embeds, latents, scores = start
    target = 0.8 * float(scores.min())
    out = adjust_embedding(pipe, embeds, latents, CONFIG, target)
    for i, trace in enumerate(out.losses):
        assert trace[0] == pytest.approx(scores[i], rel=1e-4)  # the loss is the detection score
        assert trace[-1] <= target < min(trace[:-1])  # stopped as soon as it got there
        assert out.iterations[i] == len(trace) - 1 <= 10
    assert torch.equal(out.embeds[:, 0], embeds[:, 0])  # BOS is not a variable
    assert not torch.allclose(out.embeds[:, 1:], embeds[:, 1:])
    assert out.final_losses == [trace[-1] for trace in out.losses]


def test_a_target_above_the_start_changes_nothing(pipe, start) -> None:
    embeds, latents, scores = start
    out = adjust_embedding(pipe, embeds, latents, CONFIG, target=float(scores.max()) + 1.0)
    assert out.iterations == [0, 0]
    assert torch.equal(out.embeds, embeds)


def test_only_flagged_prompts_are_adjusted(pipe, start) -> None:
    embeds, latents, scores = start
    high = int(np.argmax(scores))
    flag = float(scores.max()) - 1e-6  # only the higher-scoring prompt is flagged
    out = adjust_embedding(
        pipe, embeds, latents, CONFIG, 0.8 * float(scores.min()), flag_threshold=flag
    )
    assert out.iterations[1 - high] == 0 and out.iterations[high] > 0
    assert torch.equal(out.embeds[1 - high], embeds[1 - high])
    assert not torch.equal(out.embeds[high], embeds[high])


def test_prompts_adjusted_together_equal_prompts_adjusted_alone(pipe, start) -> None:
    embeds, latents, scores = start
    target = 0.8 * float(scores.min())
    together = adjust_embedding(pipe, embeds, latents, CONFIG, target)
    assert together.iterations[0] != together.iterations[1]  # one stops while one goes on
    n = CONFIG.num_generations
    for i in range(len(PROMPTS)):
        rows = slice(i * n, (i + 1) * n)
        alone = adjust_embedding(pipe, embeds[i : i + 1], latents[rows], CONFIG, target)
        assert alone.iterations[0] == together.iterations[i]
        np.testing.assert_allclose(alone.losses[0], together.losses[i], rtol=1e-5)
        # Adam divides by sqrt(v): rounding-level differences in near-zero gradients grow
        # in those few elements, so bound the typical and the largest difference
        difference = (alone.embeds[0] - together.embeds[i]).abs()
        assert float(difference.mean()) < 1e-6 and float(difference.max()) < 1e-3


def test_the_models_get_no_gradient_and_stay_unchanged(pipe, start) -> None:
    embeds, latents, scores = start
    before = {
        name: p.detach().clone()
        for model in (pipe.unet, pipe.text_encoder)
        for name, p in model.named_parameters(prefix=type(model).__name__)
    }
    flags = [p.requires_grad for p in pipe.unet.parameters()]
    out = adjust_embedding(pipe, embeds, latents, CONFIG, 0.5 * float(scores.min()), lr=0.1)
    assert max(out.iterations) > 0
    for model in (pipe.unet, pipe.text_encoder):
        for name, p in model.named_parameters(prefix=type(model).__name__):
            assert p.grad is None
            assert torch.equal(p, before[name])
    assert [p.requires_grad for p in pipe.unet.parameters()] == flags


def test_generation_with_the_adjustment_starts_with_a_lower_magnitude(pipe, start) -> None:
    _, _, scores = start
    mitigation = EmbeddingAdjustment(target=0.8 * float(scores.min()))
    config = dataclasses.replace(CONFIG, max_steps=3)
    plain = generate(pipe, PROMPTS, config, prompt_ids=IDS).result
    adjusted = generate(pipe, PROMPTS, config, mitigation, prompt_ids=IDS)
    before, after = plain.scores(1).to_numpy(), adjusted.result.scores(1).to_numpy()
    assert (after < before).all()
    # generate() samples from the very latents the embedding was optimised on
    np.testing.assert_allclose(after, [t[-1] for t in mitigation.last_losses], rtol=1e-4)
    assert (plain.table["seed"].to_numpy() == adjusted.result.table["seed"].to_numpy()).all()
    assert adjusted.prompts == PROMPTS and adjusted.mitigation["method"] == "embedding"
    assert adjusted.mitigation["target"] == mitigation.target
    facts = mitigation.prompt_facts()  # what the study reports: reached the target, in how many
    assert facts["target_reached"] == [1.0, 1.0]
    assert facts["iterations"] == [float(i) for i in mitigation.last_iterations]


def test_prompts_left_alone_have_no_target_facts(pipe, start) -> None:
    _, _, scores = start
    high = int(np.argmax(scores))
    mitigation = EmbeddingAdjustment(
        target=0.8 * float(scores.min()), flag_threshold=float(scores.max()) - 1e-6
    )
    generate(pipe, PROMPTS, dataclasses.replace(CONFIG, max_steps=1), mitigation, prompt_ids=IDS)
    facts = mitigation.prompt_facts()
    assert np.isnan(facts["target_reached"][1 - high]) and np.isnan(facts["iterations"][1 - high])
    assert facts["target_reached"][high] == 1.0 and facts["iterations"][high] >= 1


def test_the_target_must_be_calibrated(pipe) -> None:
    with pytest.raises(ChexmemError, match="calibrate_target"):
        generate(pipe, PROMPTS, CONFIG, EmbeddingAdjustment(), prompt_ids=IDS)
    assert calibrate_target([1.0, 2.0, 3.0, 4.0, 5.0], quantile=0.5).value == 3.0
    assert calibrate_target(np.arange(101.0)).value == pytest.approx(95.0)
    with pytest.raises(ChexmemError):
        calibrate_target([])
    with pytest.raises(ChexmemError):
        EmbeddingAdjustment(lr=0.0)


def test_calibrate_uses_held_out_first_step_scores(pipe) -> None:
    held_out = ["Lateral chest radiograph. Pleural effusion.", "Frontal PA chest radiograph."]
    mitigation = EmbeddingAdjustment()
    target = mitigation.calibrate(pipe, held_out, CONFIG, quantile=0.9, prompt_ids=[20, 21])
    first = dataclasses.replace(CONFIG, max_steps=1)
    scores = noise_magnitudes(pipe, held_out, first, [20, 21]).scores(1)
    assert mitigation.target == target.value == pytest.approx(calibrate_target(scores, 0.9).value)


def test_one_embedding_target_default_for_the_cli_the_study_and_the_api() -> None:
    import inspect

    from mitigate.embedding import TARGET_QUANTILE, EmbeddingAdjustment
    from scripts.cli import build_parser

    for command in (["generate", "--method", "embedding"], ["evaluate"]):
        args = build_parser().parse_args(
            ["mitigate", *command, "--model", "m", "--prompts", "p.csv", "--dataset", "d"]
        )
        assert args.target_quantile == TARGET_QUANTILE == 0.1
    signature = inspect.signature(EmbeddingAdjustment.calibrate)
    assert signature.parameters["quantile"].default == TARGET_QUANTILE
    assert "10th percentile" in (Path(__file__).parents[2] / "README.md").read_text()
