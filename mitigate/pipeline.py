"""`CxrMemPipeline`: Stable Diffusion that measures memorization while it generates.

A `StableDiffusionPipeline` subclass: it loads any SD 1.x / 2.x folder or Hub id
(``CxrMemPipeline.from_pretrained(folder)``) or reuses a loaded pipeline's parts
(``CxrMemPipeline.from_pipe(pipe)``), and no remote code is involved. Calling it generates
``num_images_per_prompt`` images per prompt along the ordinary guided DDIM trajectory and
returns, with the images, the text-conditional noise magnitude of every step
(`detect.magnitude`) and each prompt's score; `token_significance` explains a prompt.
`mitigation=` applies any inference-time mitigation (`mitigate.registry`), by name or as
an object, on the same seeds.

    pipe = CxrMemPipeline.from_pretrained("runs/full-cfg")
    out = pipe("Frontal PA chest radiograph of a 52-year-old woman.", num_images_per_prompt=4)
    out.images, out.scores, out.magnitudes  # PIL images, {prompt: score}, tidy table
    pipe(prompt, detectors=["magnitude", "sharpness"]).detector_scores  # one column each
    pipe(prompt, mitigation="attention_scaling")  # or EmbeddingAdjustment(target=...), ...

diffusers' own loader finds this file too (it then asks for ``trust_remote_code=True``,
even for a local file, because it imports the file as a module):

    DiffusionPipeline.from_pretrained("runs/full-cfg", custom_pipeline=CUSTOM_PIPELINE,
                                      trust_remote_code=True)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from diffusers import StableDiffusionPipeline
from diffusers.utils import BaseOutput

from detect.base import SamplingPass
from detect.magnitude import MagnitudeConfig, MagnitudeResult, decode_latents, noise_magnitudes
from detect.registry import make_detectors
from detect.tokens import TokenConfig, TokenSignificance, token_significance
from hf_datasets.errors import ChexmemError
from mitigate.base import Mitigation, generate
from mitigate.registry import make_mitigation

CUSTOM_PIPELINE = str(Path(__file__).resolve())  # for DiffusionPipeline(custom_pipeline=...)


@dataclass
class CxrMemPipelineOutput(BaseOutput):
    """Images (grouped by prompt), the per-step magnitude table and the prompt scores."""

    images: list[Any]
    magnitudes: pd.DataFrame
    scores: dict[str, float]
    prompts: list[str] | None = None  # as fed to the text encoder (after a mitigation's rewrite)
    mitigation: dict[str, Any] | None = None
    detector_scores: pd.DataFrame | None = None  # one row per prompt, each detector's columns


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
        mitigation: Mitigation | str | None = None,
        detectors: Sequence[str] = ("magnitude",),
    ) -> CxrMemPipelineOutput:
        """Generate, measuring m_t at every step; a prompt's score averages `score_steps`.

        `detectors` (names of `detect.registry`) fill `detector_scores` from the same pass;
        any but the magnitude needs an unmitigated run (they score the prompts as written).
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if isinstance(mitigation, str):
            mitigation = make_mitigation(mitigation)
        chosen = make_detectors(list(detectors))
        if mitigation is not None and any(d.name != "magnitude" for d in chosen):
            raise ChexmemError(
                "detectors other than magnitude score the prompts as written: ask for them "
                "without a mitigation"
            )
        mitigated = generate(
            self,
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
            mitigation,
            keep_first_step=any(d.needs_first_step for d in chosen),
        )
        result = mitigated.result
        run = SamplingPass(self, prompts, result.prompt_ids, result.config, result.table,
                           score_steps, result.first_step)  # fmt: skip
        table = pd.concat([d.score(run) for d in chosen], axis=1)
        table.insert(0, "prompt", prompts)
        latents = result.final_latents
        images: list[Any] = (
            list(latents) if output_type == "latent" else decode_latents(self, latents, batch_size)
        )
        scores = result.scores(first_k=score_steps)
        return CxrMemPipelineOutput(
            images=images,
            magnitudes=result.table,
            scores={p: float(scores[i]) for i, p in zip(result.prompt_ids, prompts, strict=True)},
            prompts=mitigated.prompts,
            mitigation=mitigated.mitigation,
            detector_scores=table.reset_index(),
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
