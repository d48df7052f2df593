"""Trigger tokens (Wen et al.): which words of a prompt drive the noise magnitude.

The significance of token i is the L2 norm of the gradient of ``m_t`` (the unsquared
magnitude of `detect.magnitude`) with respect to row i of the text-encoder output ``e_p``,
averaged over the first steps of the ordinary guided trajectory and over the generations.
Only ``e_p`` receives gradient: the empty-prompt embedding ``e_0`` and the trajectory's
latents are constants. (The public code feeds the two branches in swapped order; a naive fix
of it lets the gradient reach ``e_0``, after which the scores stop depending on the prompt.)

Trigger tokens are the most significant content tokens; `removal_check` deletes the words
they belong to and measures the prompt's score again, which should drop.
"""

from __future__ import annotations

import contextlib
import html
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from diffusers import DDIMScheduler

from detect.magnitude import MagnitudeConfig, encode_prompts, initial_latents, noise_magnitudes

WORD_END = "</w>"


@dataclass
class TokenConfig:
    """Where on the trajectory significance is measured (first `steps` steps, n generations)."""

    steps: int = 1
    num_generations: int = 4
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    seed: int = 0
    top_k: int = 3

    def magnitude_config(self) -> MagnitudeConfig:
        """The same trajectory and score as a MagnitudeConfig."""
        return MagnitudeConfig(
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            num_generations=self.num_generations,
            max_steps=self.steps,
            seed=self.seed,
            progress=False,
        )


@dataclass
class TokenSignificance:
    """Significance of each content token of one prompt, and of the special positions."""

    prompt: str
    token_ids: list[int]  # content tokens' ids (no BOS, EOS or padding)
    tokens: list[str]  # content tokens as the tokenizer spells them (word ends marked </w>)
    scores: np.ndarray  # one per content token
    words: list[str]  # the prompt's words (BPE pieces joined)
    word_of_token: list[int]  # index into `words` of each content token
    special: dict[str, float] = field(default_factory=dict)  # bos, eos, padding (mean)

    def word_scores(self) -> np.ndarray:
        """Significance of each word: the largest of its tokens'."""
        out = np.zeros(len(self.words))
        for token, word in enumerate(self.word_of_token):
            out[word] = max(out[word], self.scores[token])
        return out

    def top_tokens(self, k: int = 3) -> list[tuple[str, float]]:
        """The k most significant content tokens, highest first."""
        order = np.argsort(-self.scores)[:k]
        return [(self.tokens[i].replace(WORD_END, ""), float(self.scores[i])) for i in order]

    def top_word_indices(self, k: int = 3) -> list[int]:
        """Indices of the words holding the k most significant tokens (each word once)."""
        seen: list[int] = []
        for i in np.argsort(-self.scores):
            word = self.word_of_token[i]
            if word not in seen:
                seen.append(word)
            if len(seen) == k:
                break
        return seen

    def without_words(self, tokenizer: Any, words: Sequence[int]) -> str:
        """The prompt re-spelled from its tokens, leaving out the given words' tokens."""
        kept = [
            i for i, w in zip(self.token_ids, self.word_of_token, strict=True) if w not in words
        ]
        return tokenizer.decode(kept, skip_special_tokens=True).strip()

    def to_frame(self) -> pd.DataFrame:
        """One row per content token."""
        return pd.DataFrame(
            {
                "position": np.arange(1, len(self.tokens) + 1),
                "token": [t.replace(WORD_END, "") for t in self.tokens],
                "word": [self.words[w] for w in self.word_of_token],
                "significance": self.scores,
            }
        )


@contextlib.contextmanager
def frozen(*modules: torch.nn.Module) -> Iterator[None]:
    """Parameters need no gradient inside (restored afterwards): only inputs get gradient."""
    flags = [[p.requires_grad for p in m.parameters()] for m in modules]
    for m in modules:
        m.requires_grad_(False)
    try:
        yield
    finally:
        for m, saved in zip(modules, flags, strict=True):
            for p, flag in zip(m.parameters(), saved, strict=True):
                p.requires_grad_(flag)


def split_tokens(pipe: Any, prompt: str) -> tuple[list[int], list[str], list[int], list[str]]:
    """Token ids (77, BOS first), content tokens, their word indices, and the words."""
    tokenizer = pipe.tokenizer
    ids = tokenizer(
        prompt,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
    ).input_ids
    eos = tokenizer.eos_token_id
    end = ids.index(eos, 1) if eos in ids[1:] else len(ids)
    tokens = tokenizer.convert_ids_to_tokens(ids[1:end])
    words, word_of_token, current = [], [], ""
    for token in tokens:
        word_of_token.append(len(words))
        current += token.replace(WORD_END, "")
        if token.endswith(WORD_END):
            words.append(current)
            current = ""
    if current:
        words.append(current)
    return ids, tokens, word_of_token, words


def token_significance(
    pipe: Any, prompt: str, config: TokenConfig | None = None, prompt_id: int = 0
) -> TokenSignificance:
    """Gradient significance of every token of `prompt` (see the module docstring)."""
    config = config or TokenConfig()
    ids, tokens, word_of_token, words = split_tokens(pipe, prompt)
    device = pipe.unet.device
    n = config.num_generations
    with torch.no_grad():
        text = pipe.text_encoder(torch.tensor([ids], device=device), return_dict=False)[0]
        empty = encode_prompts(pipe, [""]).expand(n, -1, -1)
    rows = text.to(pipe.unet.dtype).repeat(n, 1, 1).requires_grad_(True)
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(config.num_inference_steps, device=device)
    magnitude_config = config.magnitude_config()
    latents, _ = initial_latents(pipe, [prompt_id], magnitude_config, scheduler)
    grad_norms = torch.zeros(n, len(ids), device=device)
    with frozen(pipe.unet, pipe.text_encoder):
        for t in scheduler.timesteps[: config.steps]:
            model_input = scheduler.scale_model_input(latents, t)
            with torch.no_grad():
                eps_u = pipe.unet(model_input, t, empty, return_dict=False)[0]
            eps_c = pipe.unet(model_input, t, rows, return_dict=False)[0]
            magnitude = (eps_c - eps_u).float().flatten(1).norm(dim=1)
            # rows[j] only reaches magnitude[j]: one backward gives every generation's gradient
            (grad,) = torch.autograd.grad(magnitude.sum(), rows)
            grad_norms += grad.float().norm(dim=2)
            with torch.no_grad():
                guided = eps_u + config.guidance_scale * (eps_c - eps_u)
                latents = scheduler.step(guided, t, latents, eta=0.0, return_dict=False)[0]
    per_position = (grad_norms / config.steps).mean(dim=0).cpu().numpy()
    end = 1 + len(tokens)
    special = {"bos": float(per_position[0])}
    if end < len(ids):
        special["eos"] = float(per_position[end])
    if end + 1 < len(ids):
        special["padding"] = float(per_position[end + 1 :].mean())
    return TokenSignificance(
        prompt,
        ids[1:end],
        tokens,
        per_position[1:end].astype(np.float64),
        words,
        word_of_token,
        special,
    )


def removal_check(
    pipe: Any,
    significance: TokenSignificance,
    config: TokenConfig | None = None,
    prompt_id: int = 0,
) -> dict[str, Any]:
    """The prompt's score before and after removing the words of its top trigger tokens."""
    config = config or TokenConfig()
    top = significance.top_word_indices(config.top_k)
    words = [significance.words[w] for w in top]
    edited = significance.without_words(pipe.tokenizer, top)
    result = noise_magnitudes(
        pipe,
        [significance.prompt, edited],
        config.magnitude_config(),
        prompt_ids=[prompt_id, prompt_id],  # same seeds for both
    )
    table = result.table
    before = float(table.iloc[: len(table) // 2]["magnitude"].mean())
    after = float(table.iloc[len(table) // 2 :]["magnitude"].mean())
    return {
        "prompt": significance.prompt,
        "removed": words,
        "edited_prompt": edited,
        "score_before": before,
        "score_after": after,
        "lowered": after < before,
    }


def _shades(significance: TokenSignificance) -> list[float]:
    """Each word's significance scaled to 0..1 by the prompt's largest."""
    scores = significance.word_scores()
    top = float(scores.max()) if len(scores) else 0.0
    return [float(s / top) if top > 0 else 0.0 for s in scores]


def use_color(stream: Any) -> bool:
    """Colour only for a terminal, and never with NO_COLOR set (no-color.org)."""
    return bool(getattr(stream, "isatty", lambda: False)()) and not os.environ.get("NO_COLOR")


def render_terminal(significance: TokenSignificance, color: bool = True) -> str:
    """The prompt with each word on a background from grey (low) to red (high); without
    colour, the plain prompt (the top tokens line carries the values)."""
    ramp = [236, 52, 88, 124, 160, 196]
    parts = []
    for word, shade in zip(significance.words, _shades(significance), strict=True):
        background = ramp[min(len(ramp) - 1, int(shade * len(ramp)))]
        parts.append(f"\x1b[48;5;{background}m{word}\x1b[0m" if color else word)
    top = ", ".join(f"{t} {s:.3g}" for t, s in significance.top_tokens(3))
    return " ".join(parts) + f"\n  top tokens: {top}"


def render_html(significance: TokenSignificance) -> str:
    """The prompt as HTML spans shaded by significance (hover shows the value)."""
    spans = []
    for word, shade, score in zip(
        significance.words, _shades(significance), significance.word_scores(), strict=True
    ):
        spans.append(
            f'<span title="{score:.4g}" style="background: rgba(220, 30, 30, {shade:.2f}); '
            f'padding: 1px 2px; border-radius: 3px">{html.escape(word)}</span>'
        )
    return '<p class="chexmem-tokens">' + " ".join(spans) + "</p>"
