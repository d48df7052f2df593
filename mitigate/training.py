"""Training-time mitigation: drop high-magnitude samples (Wen et al.) and randomise captions.

`MagnitudeFilter` is a sample weighter for `train.trainer.train`: at every training step it
computes, for each sample, the text-conditional noise magnitude at that sample's own training
timestep and noisy latent,

    m_t = || eps(x_t, t, e_p) - eps(x_t, t, e_0) ||    (L2 over the sample's whole latent)

and gives weight 0 (drop from the loss) to samples with ``m_t >= threshold``, or to the
``floor(top_fraction * B)`` samples of highest ``m_t`` in a micro-batch of B samples
(MemControl's "auto" mode is ``top_fraction=0.1``). ``eps(x_t, t, e_p)`` is the prediction the
loss already uses; ``eps(x_t, t, e_0)`` is one extra no-grad UNet forward on the same noisy
latents and timesteps with the empty prompt's encoder states, so both branches share the
batch: no second noise or timestep is drawn and the random stream of the run is unchanged.
Samples whose prompt was replaced by the empty prompt (classifier-free-guidance dropout) have
``m_t = 0`` by definition and are never dropped. As in `detect.magnitude`, the difference is
of the raw UNet outputs (for a v-prediction model, of the v predictions).

`CaptionAugment` is Somepalli et al.'s (2023) caption randomisation during training:
"random_caption" replaces a caption, with probability p, by as many random words as it had;
"random_word_addition" inserts k random words at random positions, with probability p per
sample. Random words come from the tokenizer's vocabulary (`vocabulary_words`: whole-word,
non-special, ASCII-alphabetic tokens of two or more letters, as the text encoder knows them),
not from the dataset, so that they carry no in-domain meaning. The transform is pure: the same
(seed, epoch, row) always gives the same caption, and it never touches a global RNG.

This module must not import `train` (imports flow hf_datasets <- detect <- mitigate <- train):
the trainer's `StepInputs` is described here by the `TrainingStep` protocol.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from hf_datasets.errors import ChexmemError

logger = logging.getLogger(__name__)

CAPTION_AUGMENTATIONS: dict[str, str] = {
    "random_caption": "with probability p, replace the caption by as many random words",
    "random_word_addition": "with probability p, insert k random words at random positions",
}


class TrainingStep(Protocol):
    """What a sample weighter reads of one training step (the trainer's `StepInputs`)."""

    unet: Any
    noisy_latents: torch.Tensor
    timesteps: torch.Tensor
    encoder_hidden_states: torch.Tensor
    empty_hidden_states: torch.Tensor
    conditioning_dropped: torch.Tensor
    model_pred: torch.Tensor
    batch: dict[str, Any]
    global_step: int


@dataclass
class DropCounts:
    """How many samples were seen and dropped, overall, by `copies` and by image (sample id).

    `by_copies` and `by_sample` map a key to ``[seen, dropped]``; the sample id of a row is
    its `source_path` in chexmem datasets, so the copies of a duplicated image share one key.
    """

    seen: int = 0
    dropped: int = 0
    by_copies: dict[int, list[int]] = field(default_factory=dict)
    by_sample: dict[str, list[int]] = field(default_factory=dict)

    def update(
        self,
        dropped: Sequence[bool],
        sample_ids: Sequence[Any] | None = None,
        copies: Sequence[int] | None = None,
    ) -> None:
        """Count one micro-batch: `dropped[i]` says whether sample i got weight 0."""
        flags = [bool(d) for d in dropped]
        self.seen += len(flags)
        self.dropped += sum(flags)
        for i, flag in enumerate(flags):
            if copies is not None:
                entry = self.by_copies.setdefault(int(copies[i]), [0, 0])
                entry[0] += 1
                entry[1] += flag
            if sample_ids is not None:
                entry = self.by_sample.setdefault(str(sample_ids[i]), [0, 0])
                entry[0] += 1
                entry[1] += flag

    def merge(self, other: DropCounts) -> DropCounts:
        """The sum of two counts (e.g. of two processes, or before and after a resume)."""
        out = DropCounts(self.seen + other.seen, self.dropped + other.dropped)
        for mine, theirs, merged in (
            (self.by_copies, other.by_copies, out.by_copies),
            (self.by_sample, other.by_sample, out.by_sample),
        ):
            for key in [*mine, *(k for k in theirs if k not in mine)]:
                a, b = mine.get(key, [0, 0]), theirs.get(key, [0, 0])
                merged[key] = [a[0] + b[0], a[1] + b[1]]
        return out

    def to_state(self) -> dict[str, Any]:
        """A JSON-able form (read back by `from_state`)."""
        return {
            "seen": self.seen,
            "dropped": self.dropped,
            "by_copies": {str(k): v for k, v in self.by_copies.items()},
            "by_sample": dict(self.by_sample),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> DropCounts:
        """The counts `to_state` wrote."""
        return cls(
            int(state["seen"]),
            int(state["dropped"]),
            {int(k): list(v) for k, v in state.get("by_copies", {}).items()},
            {str(k): list(v) for k, v in state.get("by_sample", {}).items()},
        )

    def summary(self) -> dict[str, Any]:
        """Totals and drop rates by `copies` (no sample ids: this goes into public run files)."""
        return {
            "samples_seen": self.seen,
            "samples_dropped": self.dropped,
            "drop_rate": self.dropped / self.seen if self.seen else 0.0,
            "by_copies": {
                str(c): {"seen": s, "dropped": d, "drop_rate": d / s if s else 0.0}
                for c, (s, d) in sorted(self.by_copies.items())
            },
        }


@torch.no_grad()
def step_magnitudes(step: TrainingStep) -> torch.Tensor:
    """m_t of every sample of a training step (float32, 0 where conditioning was dropped)."""
    batch_size = step.noisy_latents.shape[0]
    empty = step.empty_hidden_states.expand(batch_size, *step.empty_hidden_states.shape[1:])
    unconditional = step.unet(step.noisy_latents, step.timesteps, empty, return_dict=False)[0]
    difference = step.model_pred.detach().float() - unconditional.float()
    magnitudes = difference.flatten(1).norm(dim=1)
    return torch.where(step.conditioning_dropped.to(magnitudes.device), 0.0, magnitudes)


@dataclass
class MagnitudeFilter:
    """Wen et al.'s training-time filter; call it with a training step to get sample weights.

    Give exactly one of `threshold` (tau: drop samples with ``m_t >= tau``; the official README
    uses 2.0 for SD v1.4, ours must be calibrated per model) or `top_fraction` (q: drop the
    ``floor(q * B)`` samples of highest ``m_t`` in each micro-batch of B samples, never more
    than it holds with their conditioning kept; with several processes, B is one process's
    micro-batch). Weights are 1 (keep) or 0 (drop).

    Running counts since construction: `counts` (seen / dropped, by `copies` and by sample id
    when the batch carries `copies` and `sample_id`), `steps` (calls), and the magnitudes and
    drop and conditioning flags of the latest call (`last_magnitudes`, `last_dropped`,
    `last_conditioned`).
    """

    threshold: float | None = None
    top_fraction: float | None = None
    # Our extension: rank m_t / (its running mean in the same timestep bin). Raw m_t varies
    # ~4x with t, so within a batch the raw ranking mostly picks timesteps, not samples; the
    # threshold then applies to that ratio (1.0 = typical for the timestep).
    per_timestep: bool = False
    timestep_bins: int = 10
    num_train_timesteps: int = 1000
    momentum: float = 0.99  # of the running means (an exponential moving average per bin)
    counts: DropCounts = field(default_factory=DropCounts, init=False, repr=False)
    steps: int = field(default=0, init=False, repr=False)
    last_magnitudes: list[float] = field(default_factory=list, init=False, repr=False)
    last_dropped: list[bool] = field(default_factory=list, init=False, repr=False)
    last_conditioned: list[bool] = field(default_factory=list, init=False, repr=False)
    _warned: bool = field(default=False, init=False, repr=False)
    running: list[float | None] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if (self.threshold is None) == (self.top_fraction is None):
            raise ChexmemError(
                "the memorization filter needs exactly one of a threshold (tau) and a top "
                f"fraction (q); got threshold={self.threshold}, top_fraction={self.top_fraction}"
            )
        if self.threshold is not None and not self.threshold >= 0:
            raise ChexmemError(f"the filter threshold must be >= 0, got {self.threshold}")
        if self.top_fraction is not None and not 0 < self.top_fraction < 1:
            raise ChexmemError(
                f"the filter's top fraction must be in (0, 1), got {self.top_fraction}"
            )
        if self.timestep_bins < 1 or not 0 <= self.momentum < 1:
            raise ChexmemError("timestep_bins must be >= 1 and momentum in [0, 1)")
        self.running = [None] * self.timestep_bins

    @property
    def seen(self) -> int:
        """Samples weighed so far."""
        return self.counts.seen

    @property
    def dropped(self) -> int:
        """Samples dropped so far."""
        return self.counts.dropped

    def describe(self) -> dict[str, Any]:
        """The method's name and settings, for run files and reports."""
        return {
            "method": "magnitude_filter",
            "threshold": self.threshold,
            "top_fraction": self.top_fraction,
            "per_timestep": self.per_timestep,
            **({"timestep_bins": self.timestep_bins, "momentum": self.momentum}
               if self.per_timestep else {}),
        }  # fmt: skip

    def relative(self, magnitudes: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """m_t over the running mean of its timestep bin (before this batch), then update."""
        bins = (timesteps.long() * self.timestep_bins // self.num_train_timesteps).clamp(
            0, self.timestep_bins - 1
        )
        values = magnitudes.tolist()
        ratios = []
        for value, b in zip(values, bins.tolist(), strict=True):
            mean = self.running[b]
            ratios.append(value / mean if mean else 1.0)
        for value, b in zip(values, bins.tolist(), strict=True):
            mean = self.running[b]
            self.running[b] = (
                value if mean is None else self.momentum * mean + (1 - self.momentum) * value
            )
        return torch.tensor(ratios, dtype=magnitudes.dtype, device=magnitudes.device)

    def drop_mask(self, magnitudes: torch.Tensor, conditioned: torch.Tensor) -> torch.Tensor:
        """Which samples to drop, given their m_t and whether their conditioning was kept."""
        if self.threshold is not None:
            return conditioned & (magnitudes >= self.threshold)
        assert self.top_fraction is not None
        size = len(magnitudes)
        k = min(math.floor(self.top_fraction * size + 1e-9), int(conditioned.sum()))
        if k == 0 and not self._warned and math.floor(self.top_fraction * size + 1e-9) == 0:
            logger.warning(
                "memorization filter: top fraction %s of a micro-batch of %d drops nothing; "
                "use a larger --train_batch_size or a threshold",
                self.top_fraction,
                size,
            )
            self._warned = True
        ranked = torch.where(conditioned, magnitudes, -math.inf)
        order = torch.argsort(ranked, descending=True, stable=True)
        drop = torch.zeros(size, dtype=torch.bool, device=magnitudes.device)
        drop[order[:k]] = True
        return drop

    def __call__(self, step: TrainingStep) -> torch.Tensor:
        """Weights (B,) for the step's samples: 0 for those dropped, 1 for the rest."""
        magnitudes = step_magnitudes(step)
        conditioned = ~step.conditioning_dropped.to(magnitudes.device).bool()
        scores = magnitudes
        if self.per_timestep:  # conditioning-dropped samples (m_t = 0) stay out of the means
            kept = conditioned.nonzero().flatten()
            scores = torch.zeros_like(magnitudes)
            scores[kept] = self.relative(magnitudes[kept], step.timesteps[kept])
        drop = self.drop_mask(scores, conditioned)
        copies = step.batch.get("copies")
        self.counts.update(
            drop.tolist(),
            step.batch.get("sample_id"),
            copies.tolist() if isinstance(copies, torch.Tensor) else copies,
        )
        self.steps += 1
        self.last_magnitudes = magnitudes.tolist()
        self.last_dropped = drop.tolist()
        self.last_conditioned = conditioned.tolist()
        return (~drop).float()


def vocabulary_words(tokenizer: Any) -> list[str]:
    """The random words to draw from: whole-word tokens of a CLIP tokenizer, in id order.

    A token counts if it ends a word (CLIP's ``</w>`` suffix), is not special, and is two or
    more ASCII letters (byte-level symbols of other bytes are left out).
    """
    special = set(getattr(tokenizer, "all_special_tokens", []))
    words = []
    for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
        if token in special or not token.endswith("</w>"):
            continue
        word = token[: -len("</w>")]
        if len(word) >= 2 and word.isascii() and word.isalpha():
            words.append(word)
    if not words:
        raise ChexmemError(
            "the tokenizer has no whole-word tokens (CLIP's '</w>'); caption augmentation "
            "needs a CLIP tokenizer"
        )
    return words


@dataclass
class CaptionAugment:
    """Somepalli et al.'s caption randomisation, deterministic in (seed, epoch, row).

    `mode`: "random_caption" (with probability `prob`, the caption becomes as many random
    words as it had, at least one) or "random_word_addition" (with probability `prob`,
    `num_words` random words are inserted at random word positions). `vocabulary` is the word
    list to draw from (`vocabulary_words(tokenizer)`).
    """

    mode: str
    vocabulary: Sequence[str]
    prob: float = 0.1
    num_words: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in CAPTION_AUGMENTATIONS:
            raise ChexmemError(
                f"caption augmentation must be one of {', '.join(CAPTION_AUGMENTATIONS)}, "
                f"not {self.mode!r}"
            )
        if not 0.0 <= self.prob <= 1.0:
            raise ChexmemError(
                f"the caption augmentation probability must be in [0, 1], got {self.prob}"
            )
        if self.num_words < 1:
            raise ChexmemError(f"the number of random words must be >= 1, got {self.num_words}")
        if not self.vocabulary:
            raise ChexmemError("caption augmentation needs a non-empty vocabulary")

    def __call__(self, caption: str, row: int, epoch: int = 0) -> str:
        """The caption row `row` gets in epoch `epoch` (the caption itself if not augmented)."""
        rng = np.random.default_rng([self.seed, epoch, row])
        if rng.random() >= self.prob:
            return caption
        words = caption.split()
        if self.mode == "random_caption":
            chosen = rng.integers(len(self.vocabulary), size=max(1, len(words)))
            return " ".join(self.vocabulary[i] for i in chosen)
        for index in rng.integers(len(self.vocabulary), size=self.num_words):
            words.insert(int(rng.integers(len(words) + 1)), self.vocabulary[index])
        return " ".join(words)
