"""Prompt-embedding adjustment (Wen et al., ICLR 2024): inference-time mitigation.

Before sampling, the text-encoder output ``e_p`` of each prompt is moved, by gradient descent
on ``e_p`` alone, until its first-step noise magnitude is low:

* variable: every row of ``e_p`` except BOS (position 0 stays as the encoder gave it); the
  empty-prompt embedding ``e_0``, the UNet and the text encoder are fixed;
* loss of a prompt: ``m_T = || eps(x_T, T, e_p) - eps(x_T, T, e_0) ||`` at the first DDIM
  timestep, averaged over the ``n`` starting latents ``x_T`` that will then be sampled;
* AdamW (lr 0.05), at most 10 iterations; a prompt stops as soon as its loss <= `target`.

The official target (3.0) is specific to SD v1.4 at 512 px. Ours is calibrated per model
(`calibrate_target`): a high quantile of the detection scores (first step, n generations) of
held-out, non-memorized prompts, which are the same quantity as the loss at the start.
Sampling then runs normally with the adjusted embeddings (`mitigate.base.generate`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler

from detect.calibration import Calibration, check_calibration
from detect.magnitude import MagnitudeConfig, encode_prompts, initial_latents, noise_magnitudes
from detect.tokens import frozen
from hf_datasets.errors import ChexmemError
from mitigate.base import Mitigation, StudySetup


@dataclass
class AdjustedEmbedding:
    """Adjusted e_p of each prompt, its loss before and after every step, and its step count."""

    embeds: torch.Tensor  # (P, tokens, dim), dtype and device of the input
    losses: list[list[float]]  # per prompt: the loss at the start, then after each iteration
    iterations: list[int]  # per prompt: optimizer steps taken

    @property
    def final_losses(self) -> list[float]:
        """Each prompt's loss with its returned embedding."""
        return [trace[-1] for trace in self.losses]


# the embedding's stopping target: the 10th percentile of held-out step-1 scores. Stopping at
# the detection flag (q0.95) left the copies in place on the tiny model; q0.1 with 30
# iterations removed 89% of them (docs/benchmarks.md). The CLI, the study and `calibrate` share it
TARGET_QUANTILE = 0.1


def calibrate_target(
    scores: Sequence[float] | np.ndarray,
    quantile: float = 0.95,
    what: str = "embedding target",
    fix: str | None = None,
) -> Calibration:
    """The stopping target: a quantile of held-out, non-memorized prompts' scores.

    Fewer than 20 scores, scores all alike, or a target at 0 (which no loss can reach) is
    kept but warned about and marked in the status (`detect.calibration`).
    """
    values = np.asarray(scores, dtype=np.float64).ravel()
    if values.size == 0:
        raise ChexmemError("calibrate_target needs the scores of at least one held-out prompt")
    if not 0.0 < quantile <= 1.0:
        raise ChexmemError(f"quantile must be in (0, 1], got {quantile}")
    return check_calibration(
        f"{what} (q{quantile:g} of held-out step-1 scores)",
        float(np.quantile(values, quantile)),
        values,
        fix=fix
        or "calibrate on at least 20 held-out, non-memorized prompts (--num_calibration, "
        "--calibration_prompts), or set it yourself (embedding:target=VALUE)",
        floor=0.0,
        floor_means="the noise magnitude is a norm, so no prompt can reach it and every one "
        "runs all iterations",
    )


def ddim_scheduler(pipe: Any, config: MagnitudeConfig) -> DDIMScheduler:
    """The DDIM scheduler `noise_magnitudes` samples with, timesteps set."""
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(config.num_inference_steps, device=pipe.unet.device)
    return scheduler


def adjust_embedding(
    pipe: Any,
    prompt_embeds: torch.Tensor,
    latents: torch.Tensor,
    config: MagnitudeConfig,
    target: float,
    lr: float = 0.05,
    max_iterations: int = 10,
    flag_threshold: float | None = None,
) -> AdjustedEmbedding:
    """Adjust each prompt's e_p (all rows but BOS) until its first-step magnitude <= target.

    With `flag_threshold`, only prompts whose starting magnitude reaches it (those detection
    flags) are adjusted; the others keep their embedding, so a strict target does not touch
    ordinary prompts.

    `prompt_embeds` is (P, tokens, dim); `latents` holds the x_T of every prompt's
    generations, grouped by prompt (P * n rows, as `initial_latents` makes them). Prompts
    are optimised together but independently: each has its own AdamW state and stops alone.
    """
    if prompt_embeds.ndim != 3 or prompt_embeds.shape[0] < 1:
        raise ChexmemError("prompt_embeds must be (prompts, tokens, dim)")
    num_prompts = prompt_embeds.shape[0]
    if len(latents) == 0 or len(latents) % num_prompts:
        raise ChexmemError(
            f"latents must hold n starting latents per prompt ({len(latents)} rows "
            f"for {num_prompts} prompts)"
        )
    if lr <= 0 or max_iterations < 0 or not np.isfinite(target):
        raise ChexmemError("lr must be > 0, max_iterations >= 0 and target a finite number")
    n = len(latents) // num_prompts
    device, dtype = pipe.unet.device, pipe.unet.dtype
    scheduler = ddim_scheduler(pipe, config)
    t = scheduler.timesteps[0]
    model_input = scheduler.scale_model_input(latents.to(device, dtype), t)
    start = prompt_embeds.detach().to(device, torch.float32)  # optimise in fp32 even for fp16
    bos = start[:, :1]
    # One parameter per prompt: AdamW skips parameters without a gradient, so a prompt that
    # has stopped keeps its rows, moments and step count exactly (no weight-decay drift).
    rows = [torch.nn.Parameter(start[i, 1:].clone()) for i in range(num_prompts)]
    optimizer = torch.optim.AdamW(rows, lr=lr)
    losses: list[list[float]] = [[] for _ in range(num_prompts)]
    prompts_per_call = max(1, config.batch_size // n)
    with frozen(pipe.unet, pipe.text_encoder), torch.enable_grad():
        eps_u = _unconditional(pipe, model_input, t, config.batch_size)
        active = list(range(num_prompts))
        for iteration in range(max_iterations + 1):
            optimizer.zero_grad(set_to_none=True)
            still_above = []
            for begin in range(0, len(active), prompts_per_call):
                chunk = active[begin : begin + prompts_per_call]
                embeds = torch.stack([torch.cat([bos[i], rows[i]]) for i in chunk]).to(dtype)
                samples = torch.cat([torch.arange(i * n, (i + 1) * n) for i in chunk]).to(device)
                loss = _first_step_magnitude(pipe, model_input[samples], t, embeds, eps_u[samples])
                above = loss.detach() > target
                if iteration == 0 and flag_threshold is not None:
                    above &= loss.detach() >= flag_threshold
                for i, value in zip(chunk, loss.tolist(), strict=True):
                    losses[i].append(value)
                if iteration < max_iterations and bool(above.any()):
                    loss[above].sum().backward()  # prompts are independent: one backward
                for i, a in zip(chunk, above.tolist(), strict=True):
                    if a:
                        still_above.append(i)
                    else:
                        # the backward gave a stopped prompt zeros, which AdamW's moments
                        # would still turn into a step; no gradient means no step at all
                        rows[i].grad = None
            active = still_above
            if not active or iteration == max_iterations:
                break
            optimizer.step()
    adjusted = torch.stack([torch.cat([bos[i], rows[i].detach()]) for i in range(num_prompts)])
    return AdjustedEmbedding(
        adjusted.to(prompt_embeds.device, prompt_embeds.dtype),
        losses,
        [len(trace) - 1 for trace in losses],
    )


@torch.no_grad()
def _unconditional(
    pipe: Any, model_input: torch.Tensor, t: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """eps(x_T, T, e_0) of every starting latent (fixed during the adjustment)."""
    empty = encode_prompts(pipe, [""])
    out = []
    for begin in range(0, len(model_input), batch_size):
        chunk = model_input[begin : begin + batch_size]
        out.append(pipe.unet(chunk, t, empty.expand(len(chunk), -1, -1), return_dict=False)[0])
    return torch.cat(out)


def _first_step_magnitude(
    pipe: Any,
    model_input: torch.Tensor,
    t: torch.Tensor,
    embeds: torch.Tensor,
    eps_u: torch.Tensor,
) -> torch.Tensor:
    """Per prompt: mean over its generations of ||eps(x_T, T, e_p) - eps(x_T, T, e_0)||."""
    n = len(model_input) // len(embeds)
    context = embeds.repeat_interleave(n, dim=0)
    eps_c = pipe.unet(model_input, t, context, return_dict=False)[0]
    magnitude = (eps_c - eps_u).float().flatten(1).norm(dim=1)
    return magnitude.view(len(embeds), n).mean(dim=1)


@dataclass
class EmbeddingAdjustment(Mitigation):
    """Wen et al.'s embedding adjustment; `target` must be calibrated for the model."""

    name = "embedding"

    target: float | None = None  # stop once the first-step magnitude <= target
    lr: float = 0.05
    max_iterations: int = 10
    flag_threshold: float | None = None  # adjust only prompts starting at or above this

    @classmethod
    def study_variants(cls, setup: StudySetup) -> dict[str, Mitigation]:
        """Flagged prompts pushed down to the study's target, at most 30 iterations."""
        return {cls.name: cls(target=setup.embedding_target, max_iterations=30,
                              flag_threshold=setup.detection_flag)}  # fmt: skip

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.max_iterations < 0:
            raise ChexmemError("lr must be > 0 and max_iterations >= 0")
        self.last_losses: list[list[float]] = []  # per prompt, of the last `embeddings` call
        self.last_iterations: list[int] = []
        self.calibration: Calibration | None = None  # of `target`, when `calibrate` set it

    def calibrate(
        self,
        pipe: Any,
        held_out_prompts: Sequence[str],
        config: MagnitudeConfig,
        quantile: float = TARGET_QUANTILE,
        prompt_ids: Sequence[int] | None = None,
    ) -> Calibration:
        """Set `target` from the first-step scores of held-out, non-memorized prompts."""
        first_step = dataclasses.replace(config, max_steps=1, progress=False)
        scores = noise_magnitudes(pipe, held_out_prompts, first_step, prompt_ids).scores(1)
        self.calibration = calibrate_target(scores.to_numpy(), quantile)
        self.target = self.calibration.value
        return self.calibration

    def prompt_facts(self) -> dict[str, list[float]]:
        """`target_reached` (1 / 0; NaN for a prompt left alone, below `flag_threshold`) and
        the optimizer `iterations` of each prompt of the last `embeddings` call."""
        reached, adjusted = [], []
        for trace in self.last_losses:
            left_alone = self.flag_threshold is not None and trace[0] < self.flag_threshold
            adjusted.append(not left_alone)
            reached.append(float("nan") if left_alone else float(trace[-1] <= self.target))
        iterations = [float(i) if a else float("nan")
                      for i, a in zip(self.last_iterations, adjusted, strict=True)]  # fmt: skip
        return {"target_reached": reached, "iterations": iterations}

    def describe(self) -> dict[str, Any]:
        """Name and settings, with the target's calibration when `calibrate` set it."""
        found = super().describe()
        if self.calibration is not None:
            found["target_calibration"] = self.calibration.record()
        return found

    def embeddings(
        self, pipe: Any, prompts: list[str], prompt_ids: list[int], config: MagnitudeConfig
    ) -> torch.Tensor | None:
        """Adjusted e_p (P, tokens, dim), optimised on the starting latents generate() uses."""
        if self.target is None:
            raise ChexmemError(
                "EmbeddingAdjustment needs a target: calibrate it with calibrate_target() on "
                "held-out prompts' scores (or EmbeddingAdjustment.calibrate)"
            )
        if not prompts:
            return None
        scheduler = ddim_scheduler(pipe, config)
        latents, _ = initial_latents(pipe, prompt_ids, config, scheduler)
        adjusted = adjust_embedding(
            pipe,
            encode_prompts(pipe, prompts),
            latents,
            config,
            self.target,
            self.lr,
            self.max_iterations,
            self.flag_threshold,
        )
        self.last_losses, self.last_iterations = adjusted.losses, adjusted.iterations
        return adjusted.embeds
