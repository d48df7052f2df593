"""Prompt edits on the real tiny model: trigger words gone, exactly k random tokens added."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from diffusers import StableDiffusionPipeline

from detect.magnitude import MagnitudeConfig
from detect.tokens import split_tokens, token_significance
from hf_datasets.errors import ChexmemError
from mitigate.base import generate
from mitigate.tokens import RandomTokenAddition, TriggerTokenEdit, single_tokens

PROMPTS = [
    "Frontal AP chest radiograph of a 42-year-old man. Cardiomegaly. Support devices.",
    "Frontal PA chest radiograph of a 70-year-old woman. No acute abnormality.",
]
FAST = {"steps": 1, "num_generations": 2, "num_inference_steps": 10}


@pytest.fixture(scope="module")
def pipe(tiny_model: Path) -> StableDiffusionPipeline:
    """The tiny model as plain diffusers loads it."""
    return StableDiffusionPipeline.from_pretrained(tiny_model, local_files_only=True)


def content_ids(pipe, prompt: str) -> list[int]:
    """The prompt's token ids without BOS, EOS and padding."""
    ids, tokens, _, _ = split_tokens(pipe, prompt)
    return ids[1 : 1 + len(tokens)]


def test_removal_drops_the_top_scored_word(pipe) -> None:
    edit = TriggerTokenEdit(top_k=1, **FAST)
    rewritten = edit.rewrite(pipe, PROMPTS, [0, 1])
    for prompt, prompt_id, edited in zip(PROMPTS, [0, 1], rewritten, strict=True):
        significance = token_significance(pipe, prompt, edit.token_config(), prompt_id)
        top = significance.top_word_indices(1)[0]
        words = significance.words
        assert split_tokens(pipe, edited)[3] == words[:top] + words[top + 1 :]
        assert edit.last_edits[prompt_id]["removed"] == [words[top]]
    assert [e["edited"] for e in edit.last_edits] == rewritten
    assert edit.describe()["method"] == "trigger_tokens"


def test_replacement_puts_a_word_where_the_trigger_word_was(pipe) -> None:
    fixed = TriggerTokenEdit(top_k=2, mode="replace", replacement="lateral", **FAST)
    (edited,) = fixed.rewrite(pipe, PROMPTS[:1], [0])
    significance = token_significance(pipe, PROMPTS[0], fixed.token_config(), 0)
    top = significance.top_word_indices(2)
    expected = ["lateral" if j in top else w for j, w in enumerate(significance.words)]
    assert split_tokens(pipe, edited)[3] == expected

    vocabulary = ["effusion", "edema", "opacity"]
    random = TriggerTokenEdit(top_k=2, mode="replace", vocabulary=vocabulary, seed=3, **FAST)
    first = random.rewrite(pipe, PROMPTS, [0, 1])
    assert random.rewrite(pipe, PROMPTS[1:], [1]) == first[1:]  # seeded per prompt id
    for edit in random.last_edits:
        assert all(w in vocabulary for w in edit["replaced_by"])


def test_random_addition_adds_exactly_k_tokens(pipe) -> None:
    pool = set(single_tokens(pipe.tokenizer))
    for k in (1, 4, 10):
        edited = RandomTokenAddition(num_tokens=k).rewrite(pipe, PROMPTS, [0, 1])
        for prompt, new in zip(PROMPTS, edited, strict=True):
            before, after = Counter(content_ids(pipe, prompt)), Counter(content_ids(pipe, new))
            added = after - before
            assert sum(added.values()) == k and not before - after
            assert {pipe.tokenizer.decode([i]).strip() for i in added} <= pool


def test_random_addition_is_reproducible_per_prompt_id(pipe) -> None:
    edit = RandomTokenAddition(num_tokens=4, seed=1)
    batch = edit.rewrite(pipe, PROMPTS, [5, 9])
    assert edit.rewrite(pipe, PROMPTS[1:], [9]) == batch[1:]  # independent of the batch
    assert edit.rewrite(pipe, PROMPTS[:1], [6]) != batch[:1]  # another id, another edit
    assert RandomTokenAddition(num_tokens=4, seed=2).rewrite(pipe, PROMPTS, [5, 9]) != batch
    special = {pipe.tokenizer.bos_token, pipe.tokenizer.eos_token}
    assert not special & set(single_tokens(pipe.tokenizer))


def test_generate_uses_the_rewritten_prompts(pipe) -> None:
    config = MagnitudeConfig(num_inference_steps=4, num_generations=1, max_steps=1, progress=False)
    edit = RandomTokenAddition(num_tokens=1)
    out = generate(pipe, PROMPTS, config, edit, prompt_ids=[0, 1])
    assert out.prompts == edit.rewrite(pipe, PROMPTS, [0, 1]) != PROMPTS
    assert out.mitigation == {"method": "random_tokens", "num_tokens": 1, "seed": 0}


def test_bad_settings_are_user_errors() -> None:
    with pytest.raises(ChexmemError, match="mode"):
        TriggerTokenEdit(mode="shuffle")
    with pytest.raises(ChexmemError):
        TriggerTokenEdit(top_k=0)
    with pytest.raises(ChexmemError):
        RandomTokenAddition(num_tokens=0)
