"""Unified concept editing (UCE; Gandikota, Orgad, Belinkov, Materzynska & Bau, WACV 2024)
of memorized prompts: a closed-form, permanent edit of every cross-attention key and value
projection, so that a flagged prompt's text embedding is projected like a target prompt's
while other prompts are projected as before.

For each projection W (``attn2.to_k`` and ``attn2.to_v`` of every transformer block), the
paper's Eq. 7 with the authors' identity regulariser (github.com/rohitgandikota/
unified-concept-editing, ``train-scripts/train_erase.py``, technique "replace"):

    W' = (lambda W + e sum_{c in E} v*_c c^T + p sum_{c in P} (W c) c^T)
         (lambda I + e sum_{c in E} c c^T + p sum_{c in P} c c^T)^-1

- E: the token embeddings of each erased prompt from its last word token to the end of the
  padded sequence (CLIP is causal, so these are the tokens that have seen the whole prompt),
  aligned with the target prompt's tokens from its own last word token; v*_c = W c_target.
- P: every token of each preserved prompt, and of the empty prompt (the unconditional branch
  of classifier-free guidance), kept where they were.
- lambda 0.1, e 1.0 and p 0.1 are the authors' defaults.
- ``erase_tokens="all"`` (not the paper's) edits every token after BOS instead, position by
  position against the target's: a memorized prompt is a whole caption, not one word.

Applied to memorization, E is the flagged training prompts and the target is the empty
prompt: the edited model generates for a flagged prompt what it generates unconditionally.
`ConceptEdit.active` swaps the edited weights in for a generation and restores the originals;
`ConceptEdit.apply` keeps them, for a model saved without the copies.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from detect.magnitude import encode_prompts, tokenize_prompts
from hf_datasets.errors import ChexmemError
from mitigate.base import Mitigation, StudySetup

PROJECTIONS = ("attn2.to_k", "attn2.to_v")


def cross_attention_projections(unet: Any, keys: bool = True) -> dict[str, torch.nn.Linear]:
    """The UNet's cross-attention value (and key) projections, by module name."""
    suffixes = PROJECTIONS if keys else PROJECTIONS[1:]
    found = {n: m for n, m in unet.named_modules() if n.endswith(suffixes)}
    if not found:
        raise ChexmemError("this UNet has no cross-attention projections (attn2.to_k / to_v)")
    return found


@torch.no_grad()
def final_token_embeddings(pipe: Any, prompts: Sequence[str]) -> list[torch.Tensor]:
    """Each prompt's text-encoder output from its last word token to the end, (T_i, dim)."""
    mask = tokenize_prompts(pipe, prompts).attention_mask
    embeddings = encode_prompts(pipe, prompts).float()
    # attention_mask counts BOS and EOS: the last word token is two before the mask's end
    return [e[max(int(m.sum()) - 2, 0) :] for e, m in zip(embeddings, mask, strict=True)]


def aligned(erased: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The erased prompt's final tokens and the target's, cut to the same length (the
    authors' alignment: both start at their last word token)."""
    length = min(len(erased), len(target))
    return erased[:length], target[:length]


@torch.no_grad()
def edited_weight(
    weight: torch.Tensor,
    erase: Sequence[tuple[torch.Tensor, torch.Tensor]],
    preserve: Sequence[torch.Tensor],
    lamb: float,
    erase_scale: float,
    preserve_scale: float,
) -> torch.Tensor:
    """UCE's closed form for one projection W (out, dim): `erase` (c, c_target) token pairs,
    `preserve` token embeddings (n, dim)."""
    w = weight.float()
    eye = torch.eye(w.shape[1], dtype=w.dtype, device=w.device)
    numerator, denominator = lamb * w, lamb * eye
    for context, target in erase:
        numerator += erase_scale * (target @ w.T).T @ context
        denominator += erase_scale * context.T @ context
    for context in preserve:
        numerator += preserve_scale * (context @ w.T).T @ context
        denominator += preserve_scale * context.T @ context
    return torch.linalg.solve(denominator, numerator, left=False).to(weight.dtype)


@dataclass
class ConceptEdit(Mitigation):
    """UCE's closed-form edit that maps `prompts` onto `target_prompt`, preserving
    `preserve_prompts` and the empty prompt."""

    name = "uce"

    prompts: tuple[str, ...] = ()
    target_prompt: str = ""
    preserve_prompts: tuple[str, ...] = ()
    lamb: float = 0.1
    erase_scale: float = 1.0
    preserve_scale: float = 0.1
    edit_keys: bool = True
    erase_tokens: str = "final"  # "final": from the last word token on (the paper's); "all"

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ChexmemError("uce needs the prompts to erase (prompts=...): none given")
        if self.erase_tokens not in ("final", "all"):
            raise ChexmemError(
                f"uce's erase_tokens must be final or all, not {self.erase_tokens!r}"
            )
        if min(self.lamb, self.erase_scale, self.preserve_scale) < 0:
            raise ChexmemError("uce's lamb, erase_scale and preserve_scale must be >= 0")
        self.prompts, self.preserve_prompts = tuple(self.prompts), tuple(self.preserve_prompts)

    @classmethod
    def study_variants(cls, setup: StudySetup) -> dict[str, Mitigation]:
        """The flagged prompts edited towards the empty prompt, preserving the other training
        prompts that the study does not evaluate (nothing when nothing was flagged)."""
        if not setup.flagged_prompts:
            return {}
        held_back = {*setup.flagged_prompts, *setup.evaluated_prompts}
        preserve = tuple(dict.fromkeys(c for c in setup.captions if c not in held_back))
        return {cls.name: cls(prompts=tuple(setup.flagged_prompts), preserve_prompts=preserve)}

    def describe(self) -> dict[str, Any]:
        """The settings, with the prompt lists as counts."""
        found = super().describe()
        found["prompts"], found["preserve_prompts"] = len(self.prompts), len(self.preserve_prompts)
        return found

    def edited_weights(self, pipe: Any) -> dict[str, torch.Tensor]:
        """The edited weight of every projection, computed from `pipe`'s current weights."""
        if self.erase_tokens == "all":  # every token after BOS, position by position
            (target,) = encode_prompts(pipe, [self.target_prompt]).float()[:, 1:]
            erase = [(e, target) for e in encode_prompts(pipe, self.prompts).float()[:, 1:]]
        else:
            (target,) = final_token_embeddings(pipe, [self.target_prompt])
            erase = [aligned(e, target) for e in final_token_embeddings(pipe, self.prompts)]
        preserve = list(encode_prompts(pipe, ["", *self.preserve_prompts]).float())
        layers = cross_attention_projections(pipe.unet, keys=self.edit_keys)
        return {
            name: edited_weight(
                layer.weight, erase, preserve, self.lamb, self.erase_scale, self.preserve_scale
            )
            for name, layer in layers.items()
        }

    def apply(self, pipe: Any) -> Any:
        """Edit `pipe`'s UNet in place, for good; returns it."""
        edited = self.edited_weights(pipe)
        layers = cross_attention_projections(pipe.unet, keys=self.edit_keys)
        with torch.no_grad():
            for name, weight in edited.items():
                layers[name].weight.copy_(weight)
        return pipe

    @contextlib.contextmanager
    def active(self, pipe: Any) -> Iterator[None]:
        """The edited weights for this generation; the originals back afterwards."""
        edited = self.edited_weights(pipe)
        layers = cross_attention_projections(pipe.unet, keys=self.edit_keys)
        originals = {name: layer.weight.detach().clone() for name, layer in layers.items()}
        try:
            with torch.no_grad():
                for name, layer in layers.items():
                    layer.weight.copy_(edited[name])
            yield
        finally:
            with torch.no_grad():
                for name, layer in layers.items():
                    layer.weight.copy_(originals[name])
