"""Cross-attention scaling (Ren et al., ECCV 2024): inference-time mitigation.

During the first `first_steps` sampling steps, the cross-attention (``attn2``) logits of every
text position except BOS are multiplied by ``c`` (1.25 in re-implementations) before the
softmax; BOS logits are unchanged. CLIP pads prompts as ``[BOS, tokens..., EOS, padding]``,
so position 0 is BOS. Raising the other logits moves attention mass away from BOS onto the
prompt's tokens (and EOS / padding), which flattens the sharp attention on trigger tokens that
memorized prompts show in the first steps.

It is an attention processor, `ScaledCrossAttnProcessor`, put on the UNet's ``attn2`` layers
(found in ``unet.attn_processors`` by name, so any SD 1.x / 2.x UNet works) only inside
`AttentionScaling.step` for the first steps; the previous processors, the very same objects,
are put back on exit, also when the step raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from hf_datasets.errors import ChexmemError
from mitigate.base import Mitigation

CROSS_ATTENTION = "attn2.processor"  # suffix of the cross-attention layers' processor names


class ScaledCrossAttnProcessor:
    """Cross-attention with the logits of all text positions but BOS multiplied by `c`."""

    def __init__(self, c: float) -> None:
        self.c = float(c)

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Attention as the stock SDPA processor computes it, keys of tokens 1.. scaled by c."""
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_shape = hidden_states.shape if hidden_states.ndim == 4 else None
        if image_shape is not None:
            batch, channels, height, width = image_shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, length = context.shape[:2]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (
            x.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value)
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            # q . (c k_j) = c (q . k_j): scaling key j scales logit j, before any additive mask
            weights = key.new_full((key.shape[2], 1), self.c)
            weights[0] = 1.0
            key = key * weights
        # the stock processor leaves attn.scale to SDPA's default 1/sqrt(head_dim); so do we
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if image_shape is not None:
            out = out.transpose(-1, -2).reshape(image_shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def cross_attention_names(unet: Any) -> list[str]:
    """Processor names of the UNet's cross-attention (attn2) layers."""
    return [name for name in unet.attn_processors if name.endswith(CROSS_ATTENTION)]


@contextlib.contextmanager
def scaled_cross_attention(unet: Any, c: float) -> Iterator[None]:
    """Every attn2 layer scales non-BOS logits by c inside; the old processors are restored."""
    saved = dict(unet.attn_processors)
    names = set(cross_attention_names(unet))
    if not names:
        raise ChexmemError("the UNet has no cross-attention (attn2) layers to scale")
    scaled = ScaledCrossAttnProcessor(c)
    # set_attn_processor pops from the dict it is given: always pass a fresh one
    unet.set_attn_processor({k: scaled if k in names else p for k, p in saved.items()})
    try:
        yield
    finally:
        unet.set_attn_processor(dict(saved))


@dataclass
class AttentionScaling(Mitigation):
    """Ren et al.: scale non-BOS cross-attention logits by `c` in the first sampling steps."""

    name = "attention_scaling"

    c: float = 1.25
    first_steps: int = 5  # sampling steps (from the first) during which logits are scaled

    def __post_init__(self) -> None:
        if self.c <= 0:
            raise ChexmemError(f"c must be > 0, got {self.c}")
        if self.first_steps < 0:
            raise ChexmemError("first_steps must be >= 0")

    def step(self, pipe: Any, step: int, timestep: torch.Tensor) -> AbstractContextManager:
        """Scaled cross-attention during the first `first_steps` steps, stock afterwards."""
        if step >= self.first_steps:
            return nullcontext()
        return scaled_cross_attention(pipe.unet, self.c)
