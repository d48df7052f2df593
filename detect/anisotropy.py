"""Score anisotropy (Asthana & Belagiannis, ICLR 2026): memorization without any denoising.

On the pure-noise latent ``x_T`` two things mark a memorized prompt: the guidance vector
``d = eps(x, t, e_p) - eps(x, t, e_0)`` is long at the high-noise step (the isotropic part,
Wen et al.'s step-1 magnitude) and, at a low-noise timestep, it points along the
unconditional prediction (the anisotropic part). The score of one generation is

    gamma_norm * ||d(x_T, T)||  +  gamma_cosine * mean_hw cos_c(eps(x_T, t_low, e_0), d(x_T, t_low))

where ``cos_c`` is the cosine over the latent channels at each spatial position, averaged
over positions; a prompt's score is the mean over its n generations (higher: memorized).
As in the reference code (github.com/rohanasthana/memorization-anisotropy,
``local_model/pipe.py``, mode ``"x,c|x"``; ``detect_eval.py``): ``T`` is the first DDIM
timestep, ``t_low`` the third-last timestep of a 50-step DDIM schedule (41 for SD's
scheduler), both evaluated at the same ``x_T``; SD 1.x weights gamma_norm 1, gamma_cosine 2.
Both parts are reported too (``score_anisotropy_norm``, ``score_anisotropy_cosine``): the
weights were set for SD's latent size, and the norm's scale changes with the model.

Cost: the shared pass's first step gives ``d(x_T, T)``; the detector adds one conditional and
one unconditional UNet call per generation, at ``(x_T, t_low)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler

from detect.base import Detector, SamplingPass
from detect.magnitude import batch_contexts, both_branches, magnitude_of, prompt_contexts

REFERENCE_STEPS = 50  # the schedule t_low is read from, as in the reference code
LOW_INDEX = -3  # t_low = timesteps[LOW_INDEX] of that schedule


def low_timestep(scheduler_config: dict) -> int:
    """t_low: the third-last timestep of a 50-step DDIM schedule."""
    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(REFERENCE_STEPS)
    return int(scheduler.timesteps[LOW_INDEX])


def alignment(eps_u: torch.Tensor, eps_c: torch.Tensor) -> torch.Tensor:
    """Per-sample mean over positions of cos_channels(eps_u, eps_c - eps_u)."""
    return F.cosine_similarity(eps_u.float(), (eps_c - eps_u).float(), dim=1).flatten(1).mean(1)


@dataclass
class Anisotropy(Detector):
    """Asthana & Belagiannis's norm + alignment score on pure noise, mean of n generations."""

    name = "anisotropy"
    title = "score anisotropy on pure noise (Asthana & Belagiannis, ICLR 2026)"
    summary = "gamma_n ||d(x_T, T)|| + gamma_c cos(eps_u, d) at (x_T, t_low); no denoising"
    needs_first_step = True

    gamma_norm: float = 1.0  # SD 1.x (detect_eval.py)
    gamma_cosine: float = 2.0

    def score(self, run: SamplingPass) -> pd.DataFrame:
        """`score_anisotropy` and its two parts, per prompt."""
        first = run.first()
        unet = run.pipe.unet
        t_low = low_timestep(run.pipe.scheduler.config)
        contexts = prompt_contexts(run.pipe, run.prompts, run.config.num_generations)
        cosines = np.zeros(len(first.latents))
        with torch.no_grad():
            for start in range(0, len(cosines), run.config.batch_size):
                stop = min(start + run.config.batch_size, len(cosines))
                x = first.latents[start:stop].to(unet.device, unet.dtype)
                eps_u, eps_c = both_branches(unet, x, t_low, batch_contexts(contexts, start, stop))
                cosines[start:stop] = alignment(eps_u, eps_c).cpu().numpy()
        norms = magnitude_of(first.eps_uncond, first.eps_cond).numpy()
        norm, cosine = run.by_prompt(norms), run.by_prompt(cosines)
        return pd.DataFrame(
            {
                "score_anisotropy": self.gamma_norm * norm + self.gamma_cosine * cosine,
                "score_anisotropy_norm": norm,
                "score_anisotropy_cosine": cosine,
            }
        )
