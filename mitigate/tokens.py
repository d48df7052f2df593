"""The simplest mitigations: edit the prompt text before it reaches the text encoder.

* `TriggerTokenEdit` (after Wen et al.): find the prompt's trigger tokens with
  `detect.tokens.token_significance` and remove the words holding the top k of them, or
  replace each such word by a given word or by a random one (seeded).
* `RandomTokenAddition` (Somepalli et al., 2023): insert k random vocabulary tokens (they use
  1, 4 and 10) at random word boundaries of the prompt.

Random choices are seeded by ``(seed, prompt id)``: the same prompt id always gets the same
edit, whatever batch it is in. Random tokens are drawn from the tokenizer's vocabulary less
its special tokens, and only from tokens that come back as themselves when their decoded text
is tokenised alone, so an inserted token adds exactly one token to the prompt (unless the
prompt is then longer than the text encoder's 77 positions and gets truncated).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from detect.tokens import TokenConfig, TokenSignificance, token_significance
from hf_datasets.errors import ChexmemError
from mitigate.base import Mitigation, StudySetup

MODES = ("remove", "replace")
_SINGLE_TOKENS: weakref.WeakKeyDictionary[Any, list[str]] = weakref.WeakKeyDictionary()


def single_tokens(tokenizer: Any) -> list[str]:
    """Texts of the non-special tokens that tokenise back to exactly themselves (cached)."""
    if tokenizer in _SINGLE_TOKENS:
        return _SINGLE_TOKENS[tokenizer]
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(len(tokenizer)) if i not in special]
    texts = [tokenizer.decode([i]).strip() for i in ids]
    encoded = tokenizer(texts, add_special_tokens=False).input_ids
    tokens = [
        text for i, text, back in zip(ids, texts, encoded, strict=True) if text and back == [i]
    ]
    if not tokens:
        raise ChexmemError("the tokenizer has no token that can be inserted as text on its own")
    _SINGLE_TOKENS[tokenizer] = tokens
    return tokens


def prompt_rng(seed: int, prompt_id: int) -> np.random.Generator:
    """The random generator of one prompt's edit (independent of batching)."""
    return np.random.default_rng([seed, prompt_id])


def replace_words(
    significance: TokenSignificance, tokenizer: Any, replacements: Mapping[int, str]
) -> str:
    """The prompt re-spelled from its tokens, with word i (all its tokens) replaced."""
    ids: list[int] = []
    for position, (token, word) in enumerate(
        zip(significance.token_ids, significance.word_of_token, strict=True)
    ):
        if word not in replacements:
            ids.append(token)
        elif position == 0 or significance.word_of_token[position - 1] != word:
            ids += tokenizer(replacements[word], add_special_tokens=False).input_ids
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


@dataclass
class TriggerTokenEdit(Mitigation):
    """Remove or replace the words of each prompt's top-k trigger tokens."""

    name = "trigger_tokens"

    top_k: int = 1
    mode: str = "remove"  # "remove" or "replace"
    replacement: str | None = None  # replace mode: this word; None: random words
    vocabulary: list[str] | None = None  # random replacements from these (None: tokenizer's)
    seed: int = 0  # the significance trajectory's seeds and the random replacements
    # where significance is measured (see detect.tokens.TokenConfig)
    steps: int = 1
    num_generations: int = 4
    num_inference_steps: int = 50
    guidance_scale: float = 7.5

    @classmethod
    def study_variants(cls, setup: StudySetup) -> dict[str, Mitigation]:
        """The top 2 trigger tokens removed, significance on the study's trajectory."""
        return {cls.name: cls(top_k=2, num_inference_steps=setup.inference_steps,
                              seed=setup.seed)}  # fmt: skip

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ChexmemError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.top_k < 1:
            raise ChexmemError("top_k must be at least 1")
        if self.vocabulary is not None and not self.vocabulary:
            raise ChexmemError("vocabulary must hold at least one word")
        self.last_edits: list[dict[str, Any]] = []  # per prompt of the last `rewrite` call

    def token_config(self) -> TokenConfig:
        """The trajectory token significance is measured on."""
        return TokenConfig(
            steps=self.steps,
            num_generations=self.num_generations,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            seed=self.seed,
            top_k=self.top_k,
        )

    def rewrite(self, pipe: Any, prompts: list[str], prompt_ids: list[int]) -> list[str]:
        """Each prompt with its trigger words removed or replaced."""
        config = self.token_config()
        self.last_edits = []
        out = []
        for prompt, prompt_id in zip(prompts, prompt_ids, strict=True):
            significance = token_significance(pipe, prompt, config, prompt_id)
            top = significance.top_word_indices(self.top_k)
            removed = [significance.words[w] for w in top]
            if self.mode == "remove":
                edited, new = significance.without_words(pipe.tokenizer, top), []
            else:
                new = self._replacements(pipe.tokenizer, removed, prompt_id)
                replacements = dict(zip(top, new, strict=True))
                edited = replace_words(significance, pipe.tokenizer, replacements)
            self.last_edits.append(
                {"prompt": prompt, "removed": removed, "replaced_by": new, "edited": edited}
            )
            out.append(edited)
        return out

    def _replacements(self, tokenizer: Any, removed: list[str], prompt_id: int) -> list[str]:
        """One replacement per removed word: the fixed word, or random other words."""
        if self.replacement is not None:
            return [self.replacement] * len(removed)
        pool = self.vocabulary if self.vocabulary is not None else single_tokens(tokenizer)
        rng = prompt_rng(self.seed, prompt_id)
        out = []
        for word in removed:
            choices = [w for w in pool if w != word] or list(pool)
            out.append(choices[int(rng.integers(len(choices)))])
        return out


@dataclass
class RandomTokenAddition(Mitigation):
    """Somepalli et al.: insert `num_tokens` random vocabulary tokens at random positions."""

    name = "random_tokens"

    num_tokens: int = 1  # k; the paper uses 1, 4 and 10
    seed: int = 0

    @classmethod
    def study_variants(cls, setup: StudySetup) -> dict[str, Mitigation]:
        """One variant per count of random tokens the study names."""
        return {f"{cls.name}_{k}": cls(num_tokens=k, seed=setup.seed) for k in setup.random_tokens}

    def __post_init__(self) -> None:
        if self.num_tokens < 1:
            raise ChexmemError("num_tokens must be at least 1")

    def rewrite(self, pipe: Any, prompts: list[str], prompt_ids: list[int]) -> list[str]:
        """Each prompt with k random tokens inserted between its words."""
        pool = single_tokens(pipe.tokenizer)
        return [
            self.add_tokens(prompt, pool, prompt_id)
            for prompt, prompt_id in zip(prompts, prompt_ids, strict=True)
        ]

    def add_tokens(self, prompt: str, pool: list[str], prompt_id: int) -> str:
        """One prompt with k tokens from `pool` inserted at random word boundaries."""
        rng = prompt_rng(self.seed, prompt_id)
        words = prompt.split()
        for _ in range(self.num_tokens):
            token = pool[int(rng.integers(len(pool)))]
            words.insert(int(rng.integers(len(words) + 1)), token)
        return " ".join(words)
