"""What every memorization detector is: per-prompt scores from one shared sampling pass.

`chexmem detect` runs the guided DDIM trajectory of `detect.magnitude` once over each shard of
prompts (its two UNet branches give Wen et al.'s magnitude for free) and hands that pass to
every detector asked for (`--detector NAME ...`). A detector reads what it needs from the pass
and may make UNet calls of its own; it returns score columns named ``score_*``, one row per
prompt id, higher meaning "more likely memorized". `detect.registry` names them, so the CLI,
the study and the report list the same detectors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd

from hf_datasets.errors import ChexmemError

if TYPE_CHECKING:  # the CLI lists detectors without loading torch
    import torch


@dataclass
class FirstStep:
    """The pass's first guided DDIM step: x_T and both noise predictions there."""

    latents: torch.Tensor  # x_T, (P * n, c, h, w), float32 on the CPU, generations by prompt
    eps_uncond: torch.Tensor  # eps(x_T, T, e_0), same shape
    eps_cond: torch.Tensor  # eps(x_T, T, e_p)
    timestep: int  # T


@dataclass
class SamplingPass:
    """One guided DDIM pass over a shard of prompts, shared by every detector."""

    pipe: Any  # a Stable Diffusion pipeline
    prompts: list[str]
    prompt_ids: list[int]
    config: Any  # the pass's detect.magnitude.MagnitudeConfig
    table: pd.DataFrame  # m_t per prompt, generation and step (detect.magnitude.TABLE_COLUMNS)
    first_k: int = 1  # `--first_k`: the steps a step-averaged score reads
    first_step: FirstStep | None = None  # kept when a detector `needs_first_step`

    def first(self) -> FirstStep:
        """The first step, which the pass must have kept."""
        if self.first_step is None:
            raise ChexmemError("this detector needs the pass's first step: keep_first_step=True")
        return self.first_step

    def by_prompt(self, values: torch.Tensor | np.ndarray) -> pd.Series:
        """Per-generation values (P * n, generations grouped by prompt) averaged per prompt."""
        array = np.asarray(values, dtype=np.float64).reshape(len(self.prompt_ids), -1)
        return pd.Series(array.mean(axis=1), index=pd.Index(self.prompt_ids, name="prompt_id"))


class Detector:
    """A memorization detector; subclasses set the class attributes and `score`."""

    name: ClassVar[str]  # the registry's and the CLI's name
    title: ClassVar[str]  # what the report calls it, with its source
    summary: ClassVar[str]  # one line for `--help` and the report
    needs_first_step: ClassVar[bool] = False  # reads SamplingPass.first_step
    primary: ClassVar[str | None] = None  # the column a study validates (None: the first)

    @classmethod
    def headline(cls, columns: list[str]) -> str:
        """Which of its study columns stands for the detector in tables and comparisons."""
        return cls.primary if cls.primary in columns else columns[0]

    def score(self, run: SamplingPass) -> pd.DataFrame:
        """Score columns (``score_*``) indexed by prompt id, for the pass's prompts."""
        raise NotImplementedError

    def study_scores(self, run_dir: Path, columns: list[str]) -> pd.DataFrame:
        """The scores a study validates, indexed by prompt id, from a `chexmem detect`
        output folder; `columns` are those this detector wrote to its scores.csv."""
        scores = pd.read_csv(run_dir / "scores.csv").set_index("prompt_id")
        return scores[columns]
