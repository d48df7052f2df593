"""The noise-magnitude detector on the real tiny model: exact values, trajectory, seeds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from detect.magnitude import MagnitudeConfig, encode_prompts, noise_magnitudes, seed_of
from hf_datasets.errors import ChexmemError

PROMPTS = [
    "Frontal PA chest radiograph of a 52-year-old woman. No acute cardiopulmonary abnormality.",
    "Frontal AP chest radiograph of a 42-year-old man. Cardiomegaly. Support devices present.",
    "Frontal AP chest radiograph of an 87-year-old man. Lung opacity and pleural effusion.",
]


@pytest.fixture(scope="module")
def pipe(tiny_model: Path) -> StableDiffusionPipeline:
    """The tiny model as plain diffusers loads it."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_magnitude_equals_a_plain_recomputation_at_the_trajectory_latents(pipe) -> None:
    """m_t recomputed by calling the UNet ourselves, one sample and one branch at a time."""
    config = MagnitudeConfig(
        num_inference_steps=6, num_generations=2, batch_size=4, progress=False
    )  # batches of 4 cross prompt boundaries (2 generations each)
    result = noise_magnitudes(pipe, PROMPTS, config, keep_latents=True)
    assert len(result.table) == len(PROMPTS) * 2 * 6
    cond = encode_prompts(pipe, PROMPTS)
    empty = encode_prompts(pipe, [""])
    pipe.scheduler.set_timesteps(6)
    rows = result.table.set_index(["prompt_id", "generation", "step"])["magnitude"]
    with torch.no_grad():
        for step, t in enumerate(pipe.scheduler.timesteps):
            for sample, x in enumerate(result.latents[step]):
                prompt, generation = divmod(sample, 2)
                x = x[None]
                eps_c = pipe.unet(x, t, cond[prompt : prompt + 1]).sample
                eps_u = pipe.unet(x, t, empty).sample
                expected = float((eps_c - eps_u).double().norm())
                got = rows[(prompt, generation, step)]
                assert got == pytest.approx(expected, rel=1e-5)


def test_trajectory_is_the_ordinary_guided_pipeline_trajectory(pipe) -> None:
    """The final latents equal StableDiffusionPipeline's with the same seeds and guidance."""
    config = MagnitudeConfig(num_inference_steps=5, num_generations=2, progress=False)
    result = noise_magnitudes(pipe, PROMPTS[:2], config, keep_latents=True)
    for i, prompt in enumerate(PROMPTS[:2]):
        generators = [torch.Generator().manual_seed(seed_of(i, j)) for j in range(2)]
        reference = pipe(
            [prompt] * 2,
            num_inference_steps=5,
            guidance_scale=7.5,
            generator=generators,
            output_type="latent",
        ).images
        ours = result.final_latents[2 * i : 2 * i + 2]
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)


def test_scores_do_not_depend_on_batching_or_sharding(pipe) -> None:
    config = dict(num_inference_steps=4, num_generations=3, max_steps=2, progress=False)
    whole = noise_magnitudes(pipe, PROMPTS, MagnitudeConfig(batch_size=9, **config))
    one_by_one = noise_magnitudes(pipe, PROMPTS, MagnitudeConfig(batch_size=1, **config))
    shard = noise_magnitudes(
        pipe, PROMPTS[1:], MagnitudeConfig(batch_size=2, **config), prompt_ids=[1, 2]
    )
    assert set(whole.table["step"]) == {0, 1}  # max_steps stops the trajectory early
    torch.testing.assert_close(
        torch.tensor(whole.table["magnitude"].values),
        torch.tensor(one_by_one.table["magnitude"].values),
        rtol=1e-5,
        atol=0,
    )
    merged = whole.table[whole.table["prompt_id"] > 0].reset_index(drop=True)
    assert merged[["prompt_id", "generation", "seed", "step"]].equals(
        shard.table[["prompt_id", "generation", "seed", "step"]]
    )
    torch.testing.assert_close(
        torch.tensor(merged["magnitude"].values),
        torch.tensor(shard.table["magnitude"].values),
        rtol=1e-5,
        atol=0,
    )


def test_prompt_scores_average_the_first_k_steps_and_n_generations(pipe) -> None:
    config = MagnitudeConfig(num_inference_steps=4, num_generations=2, progress=False)
    result = noise_magnitudes(pipe, PROMPTS[:2], config)
    table = result.table
    first = table[(table.step == 0) & (table.generation == 0)].set_index("prompt_id")
    assert result.scores(first_k=1, num_generations=1).to_dict() == pytest.approx(
        first["magnitude"].to_dict()
    )
    everything = table.groupby("prompt_id")["magnitude"].mean()
    assert result.scores(first_k=None).to_dict() == pytest.approx(everything.to_dict())
    assert (table["magnitude"] > 0).all()
    assert list(table["seed"].unique()) == [seed_of(i, j) for i in range(2) for j in range(2)]


def test_bad_settings_are_one_clear_error() -> None:
    with pytest.raises(ChexmemError, match="max_steps must be between 1 and"):
        MagnitudeConfig(num_inference_steps=5, max_steps=6)
    with pytest.raises(ChexmemError, match="at least 1"):
        MagnitudeConfig(num_generations=0)
