"""Seed consistency: do different starting noises predict the same image at the first step?

A memorized prompt pulls every seed toward its one training image, so the clean image that
the first guided DDIM step predicts,

    x0_j = (x_T,j - sqrt(1 - alpha_bar_T) * eps~_j) / sqrt(alpha_bar_T),
    eps~ = eps(x_T, T, e_0) + w * (eps(x_T, T, e_p) - eps(x_T, T, e_0)),

agrees across the n generations j. The score of a prompt is the mean, over its pairs of
generations, of the Pearson correlation of their predicted latents x0 (flattened over
channels and positions); higher: memorized. This is the first-step, x0 form of the seed
agreement NEMO measures with SSIM on noise differences (Hintersdorf et al., NeurIPS 2024)
and of the "same image from every seed" signature of Carlini et al. (2023), without
running the trajectory or decoding.

Cost: none beyond the shared pass (its first step). Needs n >= 2 generations.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from diffusers import DDIMScheduler

from detect.base import Detector, SamplingPass
from hf_datasets.errors import ChexmemError


def predicted_x0(latents: torch.Tensor, eps: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """DDIM's clean-latent estimate from x_t and the (guided) noise prediction."""
    return (latents - (1.0 - alpha_bar) ** 0.5 * eps) / alpha_bar**0.5


def mean_pairwise_correlation(rows: torch.Tensor) -> float:
    """Mean Pearson correlation over the distinct pairs of rows (n, D), n >= 2."""
    centred = rows.double() - rows.double().mean(dim=1, keepdim=True)
    unit = centred / centred.norm(dim=1, keepdim=True).clamp_min(1e-12)
    gram = unit @ unit.T
    n = len(rows)
    return float((gram.sum() - gram.diagonal().sum()) / (n * (n - 1)))


class SeedConsistency(Detector):
    """Agreement of the first step's predicted x0 across the n seeds of a prompt."""

    name = "seed_consistency"
    title = "seed consistency of the first-step x0 prediction"
    summary = "mean pairwise correlation of the n seeds' predicted x0 at step 1; no extra call"
    needs_first_step = True

    def score(self, run: SamplingPass) -> pd.DataFrame:
        """`score_seed_consistency` per prompt."""
        n = run.config.num_generations
        if n < 2:
            raise ChexmemError("the seed_consistency detector needs --num_generations >= 2")
        first = run.first()
        scheduler = DDIMScheduler.from_config(run.pipe.scheduler.config)
        alpha_bar = float(scheduler.alphas_cumprod[first.timestep])
        guided = first.eps_uncond + run.config.guidance_scale * (first.eps_cond - first.eps_uncond)
        x0 = predicted_x0(first.latents, guided, alpha_bar).flatten(1)
        values = [mean_pairwise_correlation(rows) for rows in x0.split(n)]
        index = pd.Index(run.prompt_ids, name="prompt_id")
        return pd.DataFrame({"score_seed_consistency": np.asarray(values)}, index=index)
