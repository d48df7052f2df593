"""Sharpness of the probability landscape (Jeon, Kim & No, ICML 2025): a memorization detector.

At the first DDIM step the conditional and unconditional scores ``s = -eps / sigma_T`` differ
by ``ds = -(eps_c - eps_u) / sigma_T``. Memorized prompts sit in sharp peaks of the
conditional density, so that difference changes fast along itself; the score is

    || (H_c - H_u) ds ||  =  || J(x_T) d(x_T) || / sigma_T^2,

with ``H = ds/dx`` the Hessian of log p_T, ``d(x) = eps(x, T, e_p) - eps(x, T, e_0)`` and
``J`` its Jacobian in x, at the starting latent ``x_T``; a prompt's score is the mean over
its n generations (higher: memorized). Guidance does not enter it. As in the reference code
(github.com/Dongjae0324/sharpness_memorization_diffusion, ``local_model/pipe.py``,
``hvp_metric``), the Jacobian-vector product is exact: forward-mode AD (`torch.func.jvp`)
through the UNet, with math attention (the fused kernels have no forward AD), in float32.

Cost: the shared pass's first step gives ``x_T`` and ``d(x_T)``; the detector adds one JVP
through the UNet per generation (about two to three forward passes).
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import torch
from diffusers import DDIMScheduler
from torch.nn.attention import SDPBackend, sdpa_kernel

from detect.base import Detector, SamplingPass
from detect.magnitude import batch_contexts, both_branches, prompt_contexts


def sigma_squared(scheduler_config: dict, timestep: int) -> float:
    """sigma_t^2 = 1 - alpha_bar_t of the DDIM scheduler."""
    scheduler = DDIMScheduler.from_config(scheduler_config)
    return float(1.0 - scheduler.alphas_cumprod[int(timestep)])


def sharpness_of_batch(
    unet: torch.nn.Module, x: torch.Tensor, t: int, contexts: torch.Tensor, tangent: torch.Tensor
) -> torch.Tensor:
    """Per-sample ||J(x) tangent|| of d(x) = eps_c - eps_u (tangent: d(x) itself)."""

    def difference(z: torch.Tensor) -> torch.Tensor:
        eps_u, eps_c = both_branches(unet, z, t, contexts)
        return eps_c - eps_u

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), warnings.catch_warnings():
        # forward AD's first use loads torch's own jit-scripted decompositions
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", DeprecationWarning)
        _, product = torch.func.jvp(difference, (x,), (tangent,))
    return product.float().flatten(1).norm(dim=1)


class Sharpness(Detector):
    """Jeon et al.'s sharpness: ||(H_c - H_u) ds|| at x_T, mean of the n generations."""

    name = "sharpness"
    title = "sharpness of the probability landscape (Jeon, Kim & No, ICML 2025)"
    summary = "||J d(x_T) d(x_T)|| / sigma_T^2 at the first step, one JVP per generation"
    needs_first_step = True

    def score(self, run: SamplingPass) -> pd.DataFrame:
        """`score_sharpness` per prompt."""
        first = run.first()
        unet = run.pipe.unet
        device, dtype = unet.device, torch.float32
        contexts = prompt_contexts(run.pipe, run.prompts, run.config.num_generations)
        contexts = contexts.to(device, dtype)
        values = np.zeros(len(first.latents))
        original = unet.dtype
        if original != dtype:
            unet.to(dtype)  # the reference code runs its JVP in float32 too
        try:
            for start in range(0, len(values), run.config.batch_size):
                stop = min(start + run.config.batch_size, len(values))
                x = first.latents[start:stop].to(device, dtype)
                tangent = (first.eps_cond[start:stop] - first.eps_uncond[start:stop]).to(device)
                context = batch_contexts(contexts, start, stop)
                norms = sharpness_of_batch(unet, x, first.timestep, context, tangent.to(dtype))
                values[start:stop] = norms.cpu().numpy()
        finally:
            if original != dtype:
                unet.to(original)
        sigma2 = sigma_squared(run.pipe.scheduler.config, first.timestep)
        return pd.DataFrame({"score_sharpness": run.by_prompt(values / sigma2)})
