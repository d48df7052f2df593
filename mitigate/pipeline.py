"""`CxrMemPipeline`: Stable Diffusion that measures memorization while it generates.

A `StableDiffusionPipeline` subclass: it loads any SD 1.x / 2.x folder or Hub id
(``CxrMemPipeline.from_pretrained(folder)``) or reuses a loaded pipeline's parts
(``CxrMemPipeline.from_pipe(pipe)``), and no remote code is involved. Calling it generates
``num_images_per_prompt`` images per prompt along the ordinary guided DDIM trajectory and
returns, with the images, the text-conditional noise magnitude of every step
(`detect.magnitude`) and each prompt's score; `token_significance` explains a prompt.

    pipe = CxrMemPipeline.from_pretrained("runs/full-cfg")
    out = pipe("Frontal PA chest radiograph of a 52-year-old woman.", num_images_per_prompt=4)
    out.images, out.scores, out.magnitudes  # PIL images, {prompt: score}, tidy table
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
from diffusers import StableDiffusionPipeline
from diffusers.utils import BaseOutput

from detect.magnitude import MagnitudeConfig, MagnitudeResult, decode_latents, noise_magnitudes
from detect.tokens import TokenConfig, TokenSignificance, token_significance


@dataclass
class CxrMemPipelineOutput(BaseOutput):
    """Images (grouped by prompt), the per-step magnitude table and the prompt scores."""

    images: list[Any]
    magnitudes: pd.DataFrame
    scores: dict[str, float]


class CxrMemPipeline(StableDiffusionPipeline):
    """StableDiffusionPipeline that also returns per-step noise magnitudes."""

    def __call__(  # type: ignore[override]
        self,
        prompt: str | list[str],
        num_images_per_prompt: int = 4,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        seed: int = 0,
        score_steps: int = 1,
        output_type: str = "pil",
        batch_size: int = 32,
    ) -> CxrMemPipelineOutput:
        """Generate, measuring m_t at every step; a prompt's score averages `score_steps`."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        result = self.detect(
            prompts,
            MagnitudeConfig(
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                num_generations=num_images_per_prompt,
                seed=seed,
                batch_size=batch_size,
                height=height,
                width=width,
                progress=False,
            ),
            keep_final=True,
        )
        latents = result.final_latents
        images: list[Any] = (
            list(latents) if output_type == "latent" else decode_latents(self, latents, batch_size)
        )
        scores = result.scores(first_k=score_steps)
        return CxrMemPipelineOutput(
            images=images,
            magnitudes=result.table,
            scores={p: float(scores[i]) for i, p in zip(result.prompt_ids, prompts, strict=True)},
        )

    def detect(
        self,
        prompts: list[str],
        config: MagnitudeConfig | None = None,
        prompt_ids: list[int] | None = None,
        keep_latents: bool = False,
        keep_final: bool = False,
    ) -> MagnitudeResult:
        """Noise magnitudes of many prompts, batched (see `detect.magnitude.noise_magnitudes`)."""
        return noise_magnitudes(self, prompts, config, prompt_ids, keep_latents, keep_final)

    def token_significance(
        self, prompt: str, config: TokenConfig | None = None
    ) -> TokenSignificance:
        """Which tokens of `prompt` drive its magnitude (see `detect.tokens`)."""
        return token_significance(self, prompt, config)
