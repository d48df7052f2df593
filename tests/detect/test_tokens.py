"""Trigger tokens on the real tiny model: gradients only into e_p, prompt-dependent scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from detect.magnitude import encode_prompts
from detect.tokens import (
    TokenConfig,
    removal_check,
    render_html,
    render_terminal,
    split_tokens,
    token_significance,
)

PROMPT_A = "Frontal AP chest radiograph of a 42-year-old man. Cardiomegaly. Support devices."
PROMPT_B = "Frontal PA chest radiograph of a 70-year-old woman. No acute abnormality."
FAST = TokenConfig(steps=2, num_generations=2, num_inference_steps=10)


@pytest.fixture(scope="module")
def pipe(tiny_model: Path) -> StableDiffusionPipeline:
    """The tiny model as plain diffusers loads it."""
    return StableDiffusionPipeline.from_pretrained(tiny_model, local_files_only=True)


def test_significance_is_the_gradient_norm_of_the_magnitude_per_token(pipe) -> None:
    """One step, one generation: equal to autograd on a hand-written m_1 of e_p."""
    config = TokenConfig(steps=1, num_generations=1, num_inference_steps=10)
    result = token_significance(pipe, PROMPT_A, config)
    ids, tokens, _, _ = split_tokens(pipe, PROMPT_A)
    e_p = pipe.text_encoder(torch.tensor([ids]))[0].detach().requires_grad_(True)
    e_0 = encode_prompts(pipe, [""])
    generator = torch.Generator().manual_seed(0)  # seed of prompt 0, generation 0
    x = torch.randn((1, 4, 16, 16), generator=generator) * pipe.scheduler.init_noise_sigma
    pipe.scheduler.set_timesteps(10)
    t = pipe.scheduler.timesteps[0]
    m = (pipe.unet(x, t, e_p).sample - pipe.unet(x, t, e_0).sample).norm()
    (grad,) = torch.autograd.grad(m, e_p)
    expected = grad[0].norm(dim=1).numpy()
    np.testing.assert_allclose(result.scores, expected[1 : 1 + len(tokens)], rtol=1e-4)
    assert result.special["bos"] == pytest.approx(float(expected[0]), rel=1e-4)
    assert all(p.grad is None for p in pipe.unet.parameters())  # nothing else was touched
    assert all(p.requires_grad for p in pipe.unet.parameters())  # and flags are restored


def test_scores_depend_on_the_prompt_and_never_reach_the_empty_prompt(pipe) -> None:
    a = token_significance(pipe, PROMPT_A, FAST)
    b = token_significance(pipe, PROMPT_B, FAST)
    assert len(a.scores) == len(a.tokens) > 10 and (a.scores > 0).all()
    shared = min(len(a.scores), len(b.scores))
    assert not np.allclose(a.scores[:shared], b.scores[:shared], rtol=0.05)
    assert a.words[:4] == ["frontal", "ap", "chest", "radiograph"]
    # e_0 is computed without a graph, so no gradient can flow into it
    empty = encode_prompts(pipe, [""])
    assert not empty.requires_grad


def test_removing_trigger_words_is_measured_with_the_same_seeds(pipe) -> None:
    significance = token_significance(pipe, PROMPT_A, FAST)
    check = removal_check(pipe, significance, FAST)
    assert len(check["removed"]) == FAST.top_k
    for word in check["removed"]:
        assert word not in check["edited_prompt"].split()
    assert check["score_before"] > 0 and check["score_after"] > 0
    assert check["lowered"] == (check["score_after"] < check["score_before"])


def test_renderings_show_every_word(pipe) -> None:
    significance = token_significance(pipe, PROMPT_B, FAST)
    text = render_terminal(significance)
    assert "\x1b[48;5;" in text and "top tokens:" in text
    page = render_html(significance)
    assert page.count("<span") == len(significance.words)
    frame = significance.to_frame()
    assert list(frame.columns) == ["position", "token", "word", "significance"]
