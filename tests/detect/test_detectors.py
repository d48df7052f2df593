"""Sharpness, anisotropy and seed consistency against step-by-step recomputations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from detect.anisotropy import Anisotropy, low_timestep
from detect.base import SamplingPass
from detect.magnitude import MagnitudeConfig, encode_prompts, initial_latents, noise_magnitudes
from detect.registry import DETECTORS, make_detectors
from detect.seed_consistency import SeedConsistency
from detect.sharpness import Sharpness
from hf_datasets.errors import ChexmemError
from scripts.cli import main

PROMPTS = [
    "Frontal PA chest radiograph of a 52-year-old woman. No acute cardiopulmonary abnormality.",
    "Frontal AP chest radiograph of a 42-year-old man. Cardiomegaly. Support devices present.",
]
CONFIG = MagnitudeConfig(num_inference_steps=4, num_generations=3, max_steps=1, batch_size=4,
                         seed=5, progress=False)  # fmt: skip
IDS = [3, 8]


@pytest.fixture(scope="module")
def pipe(tiny_model: Path) -> StableDiffusionPipeline:
    """The tiny model as plain diffusers loads it."""
    return StableDiffusionPipeline.from_pretrained(tiny_model, local_files_only=True)


@pytest.fixture(scope="module")
def run(pipe) -> SamplingPass:
    """One shared pass over the prompts, first step kept (batches cross prompt boundaries)."""
    result = noise_magnitudes(pipe, PROMPTS, CONFIG, IDS, keep_first_step=True)
    return SamplingPass(pipe, PROMPTS, IDS, CONFIG, result.table, 1, result.first_step)


def branches(pipe, x: torch.Tensor, t: int, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """eps_u and eps_c of one sample, one UNet call per branch."""
    with torch.no_grad():
        u = pipe.unet(x, t, encode_prompts(pipe, [""]), return_dict=False)[0]
        c = pipe.unet(x, t, encode_prompts(pipe, [prompt]), return_dict=False)[0]
    return u, c


def samples(run: SamplingPass):
    """(prompt position, prompt, x_T) of every generation, x_T from its own seed."""
    scheduler = DDIMScheduler.from_config(run.pipe.scheduler.config)
    scheduler.set_timesteps(CONFIG.num_inference_steps)
    latents, _ = initial_latents(run.pipe, IDS, CONFIG, scheduler)
    n = CONFIG.num_generations
    return [(k // n, PROMPTS[k // n], latents[k : k + 1]) for k in range(len(latents))]


def test_the_first_step_is_kept_as_the_trajectory_computed_it(run) -> None:
    first = run.first()
    assert first.latents.shape[0] == len(PROMPTS) * CONFIG.num_generations
    for k, (_, prompt, x) in enumerate(samples(run)):
        torch.testing.assert_close(first.latents[k : k + 1], x)
        u, c = branches(run.pipe, x, first.timestep, prompt)
        torch.testing.assert_close(first.eps_uncond[k : k + 1], u, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(first.eps_cond[k : k + 1], c, rtol=1e-4, atol=1e-5)
    step1 = run.table[run.table["step"] == 0]["magnitude"].to_numpy()
    np.testing.assert_allclose(step1, (first.eps_cond - first.eps_uncond).flatten(1).norm(dim=1))


def test_sharpness_equals_a_finite_difference_of_the_guidance_vector(run) -> None:
    got = Sharpness().score(run)["score_sharpness"]
    t = run.first().timestep
    sigma2 = 1.0 - float(DDIMScheduler.from_config(run.pipe.scheduler.config).alphas_cumprod[t])
    expected = np.zeros((len(PROMPTS), CONFIG.num_generations))
    h = 1e-3
    for k, (i, prompt, x) in enumerate(samples(run)):

        def d(z: torch.Tensor, prompt: str = prompt) -> torch.Tensor:
            u, c = branches(run.pipe, z, t, prompt)
            return c - u

        v = d(x)
        jv = (d(x + h * v) - d(x - h * v)) / (2 * h)  # central difference along d itself
        expected[i, k % CONFIG.num_generations] = float(jv.norm()) / sigma2
    np.testing.assert_allclose(got.loc[IDS].to_numpy(), expected.mean(axis=1), rtol=5e-3)
    assert (got > 0).all()


def test_anisotropy_recomputed_position_by_position(run) -> None:
    got = Anisotropy().score(run)
    t_low = low_timestep(run.pipe.scheduler.config)
    n = CONFIG.num_generations
    norms, cosines = np.zeros((len(PROMPTS), n)), np.zeros((len(PROMPTS), n))
    for k, (i, prompt, x) in enumerate(samples(run)):
        u, c = branches(run.pipe, x, run.first().timestep, prompt)
        norms[i, k % n] = float((c - u).norm())
        u, c = (a[0].double().numpy() for a in branches(run.pipe, x, t_low, prompt))
        d = c - u  # (channels, h, w)
        per_position = (u * d).sum(0) / (np.linalg.norm(u, axis=0) * np.linalg.norm(d, axis=0))
        cosines[i, k % n] = per_position.mean()
    np.testing.assert_allclose(got["score_anisotropy_norm"], norms.mean(1), rtol=1e-4)
    np.testing.assert_allclose(got["score_anisotropy_cosine"], cosines.mean(1), atol=1e-4)
    combined = norms.mean(1) + 2.0 * cosines.mean(1)  # SD 1.x weights
    np.testing.assert_allclose(got["score_anisotropy"], combined, rtol=1e-4, atol=1e-4)
    heavier = Anisotropy(gamma_norm=0.0, gamma_cosine=1.0).score(run)["score_anisotropy"]
    np.testing.assert_allclose(heavier, cosines.mean(1), atol=1e-4)


def test_the_low_timestep_of_sd_schedulers_is_41() -> None:
    sd15 = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "num_train_timesteps": 1000, "steps_offset": 1, "timestep_spacing": "leading",
            "set_alpha_to_one": False, "clip_sample": False}  # fmt: skip
    assert low_timestep(DDIMScheduler(**sd15).config) == 41


def test_seed_consistency_is_the_mean_pairwise_correlation_of_predicted_x0(run) -> None:
    got = SeedConsistency().score(run)["score_seed_consistency"]
    first = run.first()
    alpha = float(DDIMScheduler.from_config(run.pipe.scheduler.config).alphas_cumprod[
        first.timestep])  # fmt: skip
    n = CONFIG.num_generations
    for i, prompt_id in enumerate(IDS):
        x0 = []
        for k in range(i * n, (i + 1) * n):
            u, c = first.eps_uncond[k].double(), first.eps_cond[k].double()
            eps = u + CONFIG.guidance_scale * (c - u)
            x0.append((first.latents[k].double() - np.sqrt(1 - alpha) * eps) / np.sqrt(alpha))
        corr = np.corrcoef(np.stack([a.flatten().numpy() for a in x0]))
        expected = corr[np.triu_indices(n, 1)].mean()
        assert got[prompt_id] == pytest.approx(expected, abs=1e-6)
        assert -1 <= got[prompt_id] <= 1


def test_detectors_need_what_they_read(pipe, run) -> None:
    bare = SamplingPass(pipe, PROMPTS, IDS, CONFIG, run.table)
    with pytest.raises(ChexmemError, match="keep_first_step"):
        Sharpness().score(bare)
    one = MagnitudeConfig(num_inference_steps=4, num_generations=1, max_steps=1, progress=False)
    result = noise_magnitudes(pipe, PROMPTS[:1], one, keep_first_step=True)
    single = SamplingPass(pipe, PROMPTS[:1], [0], one, result.table, 1, result.first_step)
    with pytest.raises(ChexmemError, match="num_generations >= 2"):
        SeedConsistency().score(single)
    assert [d.name for d in make_detectors(list(DETECTORS))] == list(DETECTORS)


def test_detect_command_writes_every_detector_in_one_pass(
    tiny_model: Path, phantom_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "det"
    argv = ["detect", "--model", str(tiny_model), "--dataset", str(phantom_data),
            "--num_prompts", "4", "--num_inference_steps", "4", "--num_generations", "2",
            "--max_steps", "1", "--output_dir", str(out),
            "--detector", "magnitude", "sharpness", "anisotropy", "seed_consistency"]  # fmt: skip
    assert main(argv) == 0
    scores = pd.read_csv(out / "scores.csv")
    columns = ["score_first_1", "score_sharpness", "score_anisotropy", "score_seed_consistency"]
    assert len(scores) == 4 and scores[columns].notna().all().all()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["detectors"]["anisotropy"] == [
        "score_anisotropy", "score_anisotropy_norm", "score_anisotropy_cosine"]  # fmt: skip
    seconds = summary["detector_seconds_per_prompt"]
    assert set(seconds) == {"magnitude", "sharpness", "anisotropy", "seed_consistency"}
    assert seconds["sharpness"] > seconds["magnitude"] > 0
    # the same pass's magnitude as a magnitude-only run
    alone = tmp_path / "alone"
    assert main([*argv[: argv.index("--detector")], "--output_dir", str(alone)]) == 0
    np.testing.assert_allclose(
        pd.read_csv(alone / "scores.csv")["score_first_1"], scores["score_first_1"], rtol=1e-6
    )
