"""Text-conditional noise magnitude (Wen et al., ICLR 2024): the memorization detector.

For one generation, step t's score is ``m_t = || eps(x_t, t, e_p) - eps(x_t, t, e_0) ||``:
the L2 norm, over the whole latent, of the difference between the conditional and the
unconditional noise predictions, neither scaled by the guidance weight nor normalised. The
latents ``x_t`` follow the ordinary classifier-free-guided DDIM trajectory (eta 0), whose
two UNet branches are computed anyway, so the score costs no extra UNet call. A prompt's
score is the mean over the first ``k`` steps and over its ``n`` generations; memorized
prompts score high.

`noise_magnitudes` runs many prompts x generations as one batched trajectory and returns a
tidy table (one row per prompt, generation and step). Generation j of prompt i always
starts from the seed ``seed + 1000 * i + j`` (``i`` is the prompt's index in the whole
prompt list), so results do not depend on batching or on how prompts are sharded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from detect.base import Detector, FirstStep, SamplingPass
from hf_datasets.errors import ChexmemError

SEED_STRIDE = 1000  # seed of generation j of prompt i: seed + SEED_STRIDE * i + j
TABLE_COLUMNS = ["prompt_id", "generation", "seed", "step", "timestep", "magnitude"]
StepContext = Callable[[int, torch.Tensor], AbstractContextManager]  # (step index, t) -> hooks


@dataclass
class GuidanceState:
    """What a guidance rule sees at one step of one batch: the UNet's two predictions."""

    step: int
    timestep: torch.Tensor
    latents: torch.Tensor  # x_t of the batch
    eps_u: torch.Tensor
    eps_c: torch.Tensor
    guidance_scale: float
    alpha_bar: float  # the scheduler's alpha-bar at `timestep`
    rows: slice  # the batch's generations among all (prompt i's are i*n .. i*n + n - 1)
    num_generations: int

    def classifier_free(self) -> torch.Tensor:
        """The ordinary guided prediction eps_u + s (eps_c - eps_u)."""
        return self.eps_u + self.guidance_scale * (self.eps_c - self.eps_u)


Guidance = Callable[[GuidanceState], torch.Tensor]  # the state -> the guided prediction


@dataclass
class MagnitudeConfig:
    """How the sampling trajectory is run and scored (defaults: Wen et al.'s reference)."""

    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    num_generations: int = 4  # n
    max_steps: int | None = None  # stop the trajectory after this many steps (None: all)
    seed: int = 0
    batch_size: int = 32  # generations per UNet call (each call holds twice as many latents)
    height: int | None = None
    width: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.num_inference_steps < 1 or self.num_generations < 1 or self.batch_size < 1:
            raise ChexmemError(
                "num_inference_steps, num_generations and batch_size must be at least 1"
            )
        if self.max_steps is not None and not 1 <= self.max_steps <= self.num_inference_steps:
            raise ChexmemError(
                f"max_steps must be between 1 and num_inference_steps ({self.num_inference_steps})"
            )

    @property
    def steps_run(self) -> int:
        """How many sampling steps are actually computed."""
        return self.max_steps or self.num_inference_steps


@dataclass
class MagnitudeResult:
    """Per-step magnitudes of every generation, plus what was asked to be kept."""

    table: pd.DataFrame  # TABLE_COLUMNS, one row per prompt x generation x step
    prompts: list[str]
    prompt_ids: list[int]
    config: MagnitudeConfig
    latents: list[torch.Tensor] = field(default_factory=list)  # x_t per step, (P*n, c, h, w)
    final_latents: torch.Tensor | None = None  # after the last step run, (P*n, c, h, w)
    first_step: FirstStep | None = None  # with keep_first_step

    def scores(self, first_k: int | None = 1, num_generations: int | None = None) -> pd.Series:
        """Prompt scores (see `prompt_scores`), indexed by prompt id."""
        return prompt_scores(self.table, first_k, num_generations)


def prompt_scores(
    table: pd.DataFrame, first_k: int | None = 1, num_generations: int | None = None
) -> pd.Series:
    """Mean magnitude per prompt over the first k steps (None: all steps in the table) and the
    first `num_generations` generations (None: all), indexed by prompt id."""
    if first_k is not None:
        table = table[table["step"] < first_k]
    if num_generations is not None:
        table = table[table["generation"] < num_generations]
    return table.groupby("prompt_id")["magnitude"].mean().rename("score")


def seed_of(prompt_id: int, generation: int, seed: int = 0) -> int:
    """The fixed seed of one generation."""
    return seed + SEED_STRIDE * prompt_id + generation


def tokenize_prompts(pipe: Any, prompts: Sequence[str]) -> Any:
    """The tokenizer's batch of prompts (input_ids, attention_mask), padded as SD pads them."""
    return pipe.tokenizer(
        list(prompts),
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )


@torch.no_grad()
def encode_prompts(pipe: Any, prompts: Sequence[str]) -> torch.Tensor:
    """Text-encoder outputs e_p (P, tokens, dim) of prompts, padded as SD pads them."""
    tokens = tokenize_prompts(pipe, prompts).input_ids.to(pipe.unet.device)
    return pipe.text_encoder(tokens, return_dict=False)[0].to(pipe.unet.dtype)


def initial_latents(
    pipe: Any, prompt_ids: Sequence[int], config: MagnitudeConfig, scheduler: DDIMScheduler
) -> tuple[torch.Tensor, list[int]]:
    """x_T of every (prompt, generation), each from its own seed, and those seeds."""
    height = config.height or pipe.unet.config.sample_size * pipe.vae_scale_factor
    width = config.width or pipe.unet.config.sample_size * pipe.vae_scale_factor
    shape = (
        1,
        pipe.unet.config.in_channels,
        height // pipe.vae_scale_factor,
        width // pipe.vae_scale_factor,
    )
    seeds = [seed_of(i, j, config.seed) for i in prompt_ids for j in range(config.num_generations)]
    latents = [
        randn_tensor(shape, generator=torch.Generator("cpu").manual_seed(s), dtype=pipe.unet.dtype)
        for s in seeds
    ]
    return torch.cat(latents).to(pipe.unet.device) * scheduler.init_noise_sigma, seeds


def guided_step(
    pipe: Any,
    scheduler: DDIMScheduler,
    latents: torch.Tensor,
    t: torch.Tensor,
    context: torch.Tensor,
    guidance_scale: float,
    guide: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One guided DDIM step: (next latents, eps_u, eps_c).

    `context` holds the empty prompt's encoder states for every sample, then the prompts'.
    `guide(eps_u, eps_c)`, if given, replaces classifier-free guidance.
    """
    model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)
    eps = pipe.unet(model_input, t, context, return_dict=False)[0]
    eps_u, eps_c = eps.chunk(2)
    guided = eps_u + guidance_scale * (eps_c - eps_u) if guide is None else guide(eps_u, eps_c)
    return scheduler.step(guided, t, latents, eta=0.0, return_dict=False)[0], eps_u, eps_c


def bound_guidance(
    guidance: Guidance | None,
    step: int,
    t: torch.Tensor,
    latents: torch.Tensor,
    scheduler: DDIMScheduler,
    config: MagnitudeConfig,
    rows: slice,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """`guidance` as `guided_step`'s guide for one step of one batch (None: classifier-free)."""
    if guidance is None:
        return None
    alpha_bar = float(scheduler.alphas_cumprod[int(t)])

    def guide(eps_u: torch.Tensor, eps_c: torch.Tensor) -> torch.Tensor:
        state = GuidanceState(step, t, latents, eps_u, eps_c, config.guidance_scale, alpha_bar,
                              rows, config.num_generations)  # fmt: skip
        return guidance(state)

    return guide


def prompt_contexts(pipe: Any, prompts: Sequence[str], num_generations: int) -> torch.Tensor:
    """Encoder states of the empty prompt for every generation, then of its prompt: (2 P n, ...)."""
    cond = encode_prompts(pipe, prompts).repeat_interleave(num_generations, dim=0)
    return torch.cat([encode_prompts(pipe, [""]).expand(len(cond), -1, -1), cond])


def both_branches(
    unet: Any, latents: torch.Tensor, t: int | torch.Tensor, contexts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """eps(x, t, e_0) and eps(x, t, e_p) of a batch, in one UNet call (`prompt_contexts` rows)."""
    eps = unet(torch.cat([latents, latents]), t, contexts, return_dict=False)[0]
    return eps.chunk(2)


def batch_contexts(contexts: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """The `prompt_contexts` rows of generations start..stop-1."""
    half = len(contexts) // 2
    return torch.cat([contexts[start:stop], contexts[half + start : half + stop]])


def magnitude_of(eps_u: torch.Tensor, eps_c: torch.Tensor) -> torch.Tensor:
    """Per-sample m_t = ||eps_c - eps_u|| over the whole latent."""
    return (eps_c - eps_u).float().flatten(1).norm(dim=1)


@torch.no_grad()
def noise_magnitudes(
    pipe: Any,
    prompts: Sequence[str],
    config: MagnitudeConfig | None = None,
    prompt_ids: Sequence[int] | None = None,
    keep_latents: bool = False,
    keep_final: bool = False,
    keep_first_step: bool = False,
    prompt_embeds: torch.Tensor | None = None,
    step_context: StepContext | None = None,
    guidance: Guidance | None = None,
) -> MagnitudeResult:
    """Run every prompt x generation along the guided trajectory and record m_t per step.

    `pipe` is any Stable Diffusion pipeline (or an object with its ``unet``,
    ``text_encoder``, ``tokenizer``, ``scheduler`` and ``vae_scale_factor``). `prompt_ids`
    are the prompts' indices in the whole prompt list (they fix the seeds); by default
    0..P-1. With `keep_final` the latents after the last step are kept (to decode them),
    with `keep_latents` also the x_t of every step, with `keep_first_step` x_T and both noise
    predictions of the first step (`detect.base.FirstStep`, for the detectors that read it).
    `prompt_embeds` (P, tokens, dim), if given, replaces the encoded prompts (mitigations
    that adjust e_p); `step_context(step, t)` returns a context manager held around each
    step's UNet call (hooks for the first steps); `guidance(state)`, if given, turns each
    step's two predictions into the one the DDIM step takes (mitigations that guide away
    from the training set); m_t stays the unguided ||eps_c - eps_u||.
    """
    config = config or MagnitudeConfig()
    prompts = list(prompts)
    ids = list(range(len(prompts))) if prompt_ids is None else [int(i) for i in prompt_ids]
    if len(ids) != len(prompts):
        raise ChexmemError("prompt_ids must give one id per prompt")
    if not prompts:
        return MagnitudeResult(pd.DataFrame(columns=TABLE_COLUMNS), [], [], config)
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(config.num_inference_steps, device=pipe.unet.device)
    timesteps = scheduler.timesteps[: config.steps_run]
    if prompt_embeds is None:
        prompt_embeds = encode_prompts(pipe, prompts)
    elif prompt_embeds.shape[0] != len(prompts):
        raise ChexmemError("prompt_embeds must hold one embedding per prompt")
    cond = prompt_embeds.to(pipe.unet.device, pipe.unet.dtype)
    cond_all = cond.repeat_interleave(config.num_generations, dim=0)
    uncond_one = encode_prompts(pipe, [""])
    latents_all, seeds = initial_latents(pipe, ids, config, scheduler)
    total = len(seeds)
    magnitudes = np.zeros((total, len(timesteps)), dtype=np.float64)
    kept_steps: list[list[torch.Tensor]] = [[] for _ in timesteps]
    first: tuple[list[torch.Tensor], ...] = ([], [], [])  # x_T, eps_u, eps_c per batch
    finals = []
    batches = range(0, total, config.batch_size)
    bar = tqdm(
        total=len(batches) * len(timesteps), desc="noise magnitude", disable=not config.progress
    )
    for start in batches:
        stop = min(start + config.batch_size, total)
        latents = latents_all[start:stop]
        context = torch.cat([uncond_one.expand(stop - start, -1, -1), cond_all[start:stop]])
        for step, t in enumerate(timesteps):
            if keep_latents:
                kept_steps[step].append(latents.cpu())
            x_t = latents
            guide = bound_guidance(guidance, step, t, x_t, scheduler, config, slice(start, stop))
            with step_context(step, t) if step_context else nullcontext():
                latents, eps_u, eps_c = guided_step(
                    pipe, scheduler, latents, t, context, config.guidance_scale, guide
                )
            magnitudes[start:stop, step] = magnitude_of(eps_u, eps_c).cpu().numpy()
            if keep_first_step and step == 0:
                for kept, value in zip(first, (x_t, eps_u, eps_c), strict=True):
                    kept.append(value.float().cpu())
            bar.update(1)
        if keep_latents or keep_final:
            finals.append(latents.cpu())
    bar.close()
    table = magnitude_table(magnitudes, ids, config.num_generations, seeds, timesteps)
    result = MagnitudeResult(table, prompts, ids, config)
    if keep_latents:
        result.latents = [torch.cat(step) for step in kept_steps]
    if finals:
        result.final_latents = torch.cat(finals)
    if keep_first_step:
        x_T, eps_u, eps_c = (torch.cat(parts) for parts in first)
        result.first_step = FirstStep(x_T, eps_u, eps_c, int(timesteps[0]))
    return result


def magnitude_table(
    magnitudes: np.ndarray,
    prompt_ids: Sequence[int],
    num_generations: int,
    seeds: Sequence[int],
    timesteps: torch.Tensor,
) -> pd.DataFrame:
    """The tidy table of (generation, step) magnitudes, generations grouped by prompt."""
    total, steps = magnitudes.shape
    return pd.DataFrame(
        {
            "prompt_id": np.repeat(np.repeat(np.asarray(prompt_ids), num_generations), steps),
            "generation": np.repeat(np.tile(np.arange(num_generations), len(prompt_ids)), steps),
            "seed": np.repeat(np.asarray(seeds), steps),
            "step": np.tile(np.arange(steps), total),
            "timestep": np.tile(timesteps.cpu().numpy(), total),
            "magnitude": magnitudes.ravel(),
        }
    )


@torch.no_grad()
def decode_latents(pipe: Any, latents: torch.Tensor, batch_size: int = 32) -> list[Any]:
    """PIL images of final latents (as the pipeline's own output would be)."""
    images = []
    for start in range(0, len(latents), batch_size):
        chunk = latents[start : start + batch_size].to(pipe.vae.device, pipe.vae.dtype)
        decoded = pipe.vae.decode(chunk / pipe.vae.config.scaling_factor, return_dict=False)[0]
        images += pipe.image_processor.postprocess(decoded, output_type="pil")
    return images


class NoiseMagnitude(Detector):
    """Wen et al.'s detector: the mean m_t over the first k steps and the n generations."""

    name = "magnitude"
    title = "text-conditional noise magnitude (Wen et al., ICLR 2024)"
    summary = "||eps(x_t, e_p) - eps(x_t, e_0)|| along the guided trajectory, mean of n seeds"
    primary = "score_step1"  # Wen et al.'s step-1 score with every generation

    def score(self, run: SamplingPass) -> pd.DataFrame:
        """Step 1, the first k steps (when k > 1) and all steps run."""
        table = run.table.sort_values(["prompt_id", "generation", "step"])
        scores = pd.DataFrame(index=pd.Index(run.prompt_ids, name="prompt_id"))
        for k in sorted({1, run.first_k}):
            if k <= run.config.steps_run:
                scores[f"score_first_{k}"] = prompt_scores(table, k)
        scores["score_all_steps"] = prompt_scores(table, None)
        return scores

    def study_scores(self, run_dir: Path, columns: list[str]) -> pd.DataFrame:
        """Step 1 with n = 1 and with every generation, and all steps (from magnitudes)."""
        table = pd.read_parquet(run_dir / "magnitudes.parquet")
        return pd.DataFrame(
            {
                "score_step1_n1": prompt_scores(table, 1, 1),
                "score_step1": prompt_scores(table, 1),
                "score_all_steps": prompt_scores(table, None),
            }
        )
