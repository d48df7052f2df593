"""What every inference-time mitigation is, and generation with one applied.

A `Mitigation` may change five things, each defaulting to "nothing":

- `rewrite`: the prompt text (trigger-token editing, random token addition);
- `embeddings`: the text-encoder output e_p that conditions the UNet (embedding adjustment);
- `active`: hooks held for the whole generation (neuron deactivation);
- `step`: hooks held around one sampling step (attention scaling in the first steps);
- `guide`: the noise prediction a step takes instead of classifier-free guidance
  (anti-memorization guidance).

`generate` applies one along the ordinary guided DDIM trajectory of `detect.magnitude`, with
the same seeds as an unmitigated run, so every method is compared on identical starting
latents; the magnitudes it returns are those of the mitigated trajectory.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any

import torch

from detect.magnitude import GuidanceState, MagnitudeConfig, MagnitudeResult, noise_magnitudes


@dataclass
class StudySetup:
    """What a study knows when it sets up the mitigations it compares with none."""

    inference_steps: int
    seed: int
    detection_flag: float  # step-1 score at or above which a prompt counts as flagged
    embedding_target: float  # the score the embedding adjustment pushes flagged prompts to
    neurons: Any = None  # the NeuronDeactivation of the neurons NEMO localized
    random_tokens: tuple[int, ...] = (4,)  # tokens added, one variant each
    bank: Any = None  # detect.similarity.TrainingBank of the training images (pixel NCC)
    captions: tuple[str, ...] = ()  # the training prompts, one per bank row
    held_out_similarity: float | None = None  # median nearest-training NCC of held-out images
    flagged_prompts: tuple[str, ...] = ()  # the training prompts the detector flagged
    evaluated_prompts: tuple[str, ...] = ()  # every prompt the study scores the methods on


class Mitigation:
    """An inference-time intervention; subclasses override what they change."""

    name = "none"

    @classmethod
    def study_variants(cls, setup: StudySetup) -> dict[str, Mitigation]:
        """The variants a study compares with none, by row name (default: one, as built)."""
        return {cls.name: cls()}

    def rewrite(self, pipe: Any, prompts: list[str], prompt_ids: list[int]) -> list[str]:
        """The prompts actually fed to the text encoder."""
        return prompts

    def embeddings(
        self, pipe: Any, prompts: list[str], prompt_ids: list[int], config: MagnitudeConfig
    ) -> torch.Tensor | None:
        """Replacement e_p (P, tokens, dim) for the (rewritten) prompts, or None to keep them."""
        return None

    def active(self, pipe: Any) -> AbstractContextManager:
        """Hooks held for the whole generation."""
        return nullcontext()

    def step(self, pipe: Any, step: int, timestep: torch.Tensor) -> AbstractContextManager:
        """Hooks held around sampling step `step`."""
        return nullcontext()

    def guide(self, pipe: Any, state: GuidanceState) -> torch.Tensor | None:
        """The noise prediction a step takes instead of classifier-free guidance, or None."""
        return None

    def prompt_facts(self) -> dict[str, list[float]]:
        """Per-prompt facts of the last generation, by column (one value per prompt, NaN where
        one does not apply), e.g. whether a prompt reached its target; none by default."""
        return {}

    def describe(self) -> dict[str, Any]:
        """The method's name and settings, for tables and reports."""
        settings = asdict(self) if is_dataclass(self) else {}
        return {"method": self.name, **{k: v for k, v in settings.items() if _plain(v)}}


def _plain(value: Any) -> bool:
    """Whether a setting can go into a JSON report as it is."""
    return isinstance(value, (str, int, float, bool, type(None), list, tuple))


@dataclass
class MitigatedResult:
    """A mitigated generation: magnitudes (and final latents), the prompts used, timings."""

    result: MagnitudeResult
    prompts: list[str]  # after `rewrite`
    mitigation: dict[str, Any]
    seconds_mitigation: float  # rewriting + embedding adjustment
    seconds_total: float

    @property
    def seconds_per_prompt(self) -> float:
        """Wall time per prompt, mitigation and generation together."""
        return self.seconds_total / max(len(self.prompts), 1)


def generate(
    pipe: Any,
    prompts: Sequence[str],
    config: MagnitudeConfig | None = None,
    mitigation: Mitigation | None = None,
    prompt_ids: Sequence[int] | None = None,
    keep_final: bool = True,
    keep_first_step: bool = False,
) -> MitigatedResult:
    """Generate every prompt x generation with `mitigation` applied (None: unmitigated)."""
    config = config or MagnitudeConfig()
    mitigation = mitigation or Mitigation()
    ids = list(range(len(prompts))) if prompt_ids is None else [int(i) for i in prompt_ids]
    start = time.perf_counter()
    used = mitigation.rewrite(pipe, list(prompts), ids)
    embeds = mitigation.embeddings(pipe, used, ids, config)
    prepared = time.perf_counter()
    with mitigation.active(pipe):
        result = noise_magnitudes(
            pipe,
            used,
            config,
            ids,
            keep_final=keep_final,
            keep_first_step=keep_first_step,
            prompt_embeds=embeds,
            step_context=lambda step, t: mitigation.step(pipe, step, t),
            guidance=_guidance_of(pipe, mitigation),
        )
    return MitigatedResult(
        result,
        used,
        mitigation.describe(),
        prepared - start,
        time.perf_counter() - start,
    )


def _guidance_of(pipe: Any, mitigation: Mitigation) -> Any:
    """The mitigation's `guide` for `noise_magnitudes`, where it overrides classifier-free
    guidance (a step whose `guide` returns None takes classifier-free guidance)."""
    if type(mitigation).guide is Mitigation.guide:
        return None

    def guidance(state: GuidanceState) -> torch.Tensor:
        guided = mitigation.guide(pipe, state)
        return state.classifier_free() if guided is None else guided

    return guidance
