"""Anti-memorization guidance (AMG; Chen, Liu & Xu, CVPR 2024): at each sampling step, guide
the generation away from the training image it is heading for, only while it heads for one.

At DDIM step t, with the classifier-free prediction eps = eps_u + s0 (eps_c - eps_u)
(the paper's Eqs. 10-17; authors' code github.com/chenchen-usyd/AMG-sd):

- x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t) is decoded; its nearest training image n0 and
  the similarity sigma_t between the two are found with the copy detector's own measure;
- gate: guidance acts only while sigma_t > lambda_t, a threshold that rises towards t = 0,
  where x0 is sharp: lambda_t = lambda_T + (lambda_0 - lambda_T) exp(-rate t) (the authors'
  code: 0.3 -> 0.4, rate 0.005; the paper calls its schedule parabolic and gives no formula);
- despecification: s1 = clip(c1 sigma_t, 0, s0 - 1), G_spe = -s1 (eps_c - eps_u): less
  guidance towards a prompt that pins one image down;
- caption deduplication, when n0's caption occurs at least `min_caption_copies` times in
  the training set: s2 = clip(c2 sigma_t, 0, s0 - s1 - 1), G_dup = -s2 (eps(x_t, y_N) -
  eps_u), y_N that caption as a negative prompt (one more UNet call for those samples);
- dissimilarity: G_sim = c3 sqrt(1 - a_t) grad_{x_t} sigma_t, classifier guidance with the
  similarity as the log-likelihood and its sign flipped; eps is held fixed (as the authors'
  code does), so the gradient runs through the VAE decoder, not through the UNet;
- eps <- eps + 1{sigma_t > lambda_t} (G_spe + G_dup + G_sim) (Eq. 10).

The similarity. The paper's SSCD is about 0 between unrelated images and its constants (c1
13: s1 saturates at sigma 0.5, SSCD's copy threshold) assume that. Pixel NCC between any
two chest radiographs is 0.6-0.75, so sigma_t here is the NCC rescaled to that footing:
sigma_t = (NCC - m) / (1 - m), m the median nearest-training NCC of held-out real images
(0: as unlike the training set as a new patient; 1: an exact copy). On the demo (seed 0)
m is 0.758 and the copy threshold (the 95th percentile of the same held-out values, NCC
0.834) maps to 0.32: just where the authors' gate opens (0.3-0.4).

Departures from the paper, each a setting: the gate of Eq. 10 applies to all three terms
(the authors' code applies G_spe at every step); c2 is a constant (the code's varies with
s1); c3 is a constant (the code's grows as (sigma - 0.3) exp((1000 - t) / 170)).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from detect.magnitude import GuidanceState, encode_prompts
from detect.similarity import NCCEmbedder, TrainingBank, nearest
from hf_datasets.errors import ChexmemError
from mitigate.base import Mitigation, StudySetup

LUMA = (0.299, 0.587, 0.114)  # PIL's "L" conversion, which the NCC features use


@dataclass
class AntiMemorizationGuidance(Mitigation):
    """AMG against a training bank of pixel-NCC features (`detect.similarity.NCCEmbedder`)."""

    name = "amg"

    bank: Any = None  # (N, size * size) NCC features of the training images
    captions: Sequence[str] = ()  # the training prompts, one per bank row
    reference: float = 0.0  # m: the NCC that counts as "unlike": sigma = (NCC - m) / (1 - m)
    size: int = 64  # side of the NCC features
    c1: float = 13.0  # despecification gain
    c2: float = 13.0  # caption-deduplication gain
    c3: float = 200.0  # dissimilarity gain: the sweep in docs/benchmarks.md chose it
    lambda_start: float = 0.3  # the gate's threshold at t = T
    lambda_end: float = 0.4  # ... and at t = 0
    rate: float = 0.005  # how fast it moves from one to the other, per timestep
    min_caption_copies: int = 2  # a caption this frequent in training is a duplicate
    _counts: dict[int, list[int]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.bank is None or len(self.bank) == 0:
            raise ChexmemError(
                "amg needs the training images' NCC features (bank=...): build it with "
                "AntiMemorizationGuidance.from_images(train_images, train_prompts, held_out)"
            )
        self.bank = torch.as_tensor(np.asarray(self.bank, dtype=np.float32))
        if self.bank.shape[1] != self.size * self.size:
            raise ChexmemError(
                f"bank rows have {self.bank.shape[1]} values; NCC features of size {self.size} "
                f"have {self.size * self.size}"
            )
        if self.captions and len(self.captions) != len(self.bank):
            raise ChexmemError(
                f"captions has {len(self.captions)} entries for {len(self.bank)} bank rows"
            )
        if not self.reference < 1 or min(self.c1, self.c2, self.c3) < 0:
            raise ChexmemError("reference must be below 1 and c1, c2, c3 at least 0")
        frequency = Counter(self.captions)
        self._duplicated = [frequency[c] >= self.min_caption_copies for c in self.captions]
        self._caption_embeds: dict[int, torch.Tensor] = {}

    @classmethod
    def from_images(
        cls,
        train_images: Sequence[Any],
        captions: Sequence[str],
        held_out_images: Sequence[Any],
        size: int = 64,
        **settings: Any,
    ) -> AntiMemorizationGuidance:
        """AMG against these training images, `reference` the median nearest-training NCC of
        the held-out images."""
        embedder = NCCEmbedder(size=size)
        bank = TrainingBank.from_images(train_images, embedder)
        found = nearest(embedder.embed(held_out_images), bank.features).similarity
        return cls(bank=bank.features, captions=list(captions), size=size,
                   reference=float(np.median(found)), **settings)  # fmt: skip

    @classmethod
    def study_variants(cls, setup: StudySetup) -> dict[str, Mitigation]:
        """AMG against the study's training images (nothing when the study gave none)."""
        if setup.bank is None or setup.held_out_similarity is None:
            return {}
        size = round(math.sqrt(setup.bank.features.shape[1]))
        return {cls.name: cls(bank=setup.bank.features, captions=list(setup.captions),
                              reference=setup.held_out_similarity, size=size)}  # fmt: skip

    def describe(self) -> dict[str, Any]:
        """The settings, without the bank."""
        found = super().describe()
        found.pop("captions", None)
        return {**found, "bank_rows": len(self.bank)}

    def active(self, pipe: Any) -> AbstractContextManager:
        """A new generation: its gate counts start from zero."""
        self._counts = {}
        return nullcontext()

    def threshold(self, t: float) -> float:
        """lambda_t, from lambda_start at t = T towards lambda_end at t = 0."""
        return self.lambda_start + (self.lambda_end - self.lambda_start) * math.exp(-self.rate * t)

    def features(self, pipe: Any, x0: torch.Tensor) -> torch.Tensor:
        """Differentiable NCC features of decoded latents: grey, resized, centred, unit norm
        (`detect.similarity.ncc_features` of the decoded images, where they are in range)."""
        vae = pipe.vae
        decoded = vae.decode(x0.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        # not clamped to [0, 1] as the saved images are: a saturated pixel keeps its gradient
        pixels = decoded.float() / 2 + 0.5
        if pixels.shape[1] == 3:
            pixels = sum(w * pixels[:, i] for i, w in enumerate(LUMA)).unsqueeze(1)
        if pixels.shape[-1] != self.size or pixels.shape[-2] != self.size:
            pixels = F.interpolate(pixels, (self.size, self.size), mode="bilinear",
                                   antialias=True, align_corners=False)  # fmt: skip
        rows = pixels.flatten(1) * 255.0
        rows = rows - rows.mean(dim=1, keepdim=True)
        return rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-6)

    def guide(self, pipe: Any, state: GuidanceState) -> torch.Tensor:
        """The classifier-free prediction plus the three guidance terms where the gate is open."""
        eps = state.classifier_free()
        a = state.alpha_bar
        if self.bank.device != eps.device:  # moved once, not at every step
            self.bank = self.bank.to(eps.device)
        bank = self.bank
        with torch.no_grad():
            x0 = (state.latents.float() - math.sqrt(1 - a) * eps.float()) / math.sqrt(a)
            rows = self.features(pipe, x0)
        nearest = (rows @ bank.T).argmax(dim=1)
        sigma = self._scaled((rows * bank[nearest]).sum(dim=1))
        gate = sigma > self.threshold(float(state.timestep))
        self._count(state, gate)
        if not bool(gate.any()):
            return eps
        open_ = torch.nonzero(gate).flatten()
        with torch.enable_grad():  # the gradient only for the samples the gate lets through
            x_t = state.latents[open_].detach().float().requires_grad_(True)
            x0 = (x_t - math.sqrt(1 - a) * eps[open_].float()) / math.sqrt(a)
            found = self._scaled((self.features(pipe, x0) * bank[nearest[open_]]).sum(dim=1))
            grad = torch.autograd.grad(found.sum(), x_t)[0]
        s0, value = state.guidance_scale, sigma[open_]
        s1 = (self.c1 * value).clamp(0, max(s0 - 1, 0)).view(-1, 1, 1, 1)
        s2 = (self.c2 * value).clamp(min=0).view(-1, 1, 1, 1)
        s2 = torch.minimum(s2, (s0 - s1 - 1).clamp(min=0))
        eps_u, eps_c = state.eps_u[open_], state.eps_c[open_]
        terms = -s1 * (eps_c - eps_u) + self.c3 * math.sqrt(1 - a) * grad
        duplicated = [bool(self.captions) and self._duplicated[int(i)] for i in nearest[open_]]
        dup = torch.tensor(duplicated, dtype=torch.bool, device=eps.device)
        if bool(dup.any()):
            eps_dup = self._caption_prediction(pipe, state, open_[dup], nearest[open_][dup])
            terms[dup] -= s2[dup] * (eps_dup - eps_u[dup])
        out = eps.clone()
        out[open_] += terms.to(eps.dtype)
        return out

    def _scaled(self, ncc: torch.Tensor) -> torch.Tensor:
        """sigma = (NCC - m) / (1 - m): 0 as unlike the training set as a held-out image."""
        return (ncc - self.reference) / (1 - self.reference)

    @torch.no_grad()
    def _caption_prediction(
        self, pipe: Any, state: GuidanceState, chosen: torch.Tensor, nearest: torch.Tensor
    ) -> torch.Tensor:
        """eps(x_t, t, y_N) of the chosen samples, y_N their nearest training image's caption."""
        for i in {int(r) for r in nearest} - set(self._caption_embeds):
            self._caption_embeds[i] = encode_prompts(pipe, [self.captions[i]])[0]
        context = torch.stack([self._caption_embeds[int(r)] for r in nearest])
        return pipe.unet(state.latents[chosen], state.timestep, context, return_dict=False)[0]

    def _count(self, state: GuidanceState, gate: torch.Tensor) -> None:
        """Tally, per generation, the steps run and the steps the gate was open."""
        self._n = state.num_generations
        rows = range(state.rows.start, state.rows.stop)
        for row, open_ in zip(rows, gate.tolist(), strict=True):
            counts = self._counts.setdefault(row, [0, 0])
            counts[0] += 1
            counts[1] += int(open_)

    def prompt_facts(self) -> dict[str, list[float]]:
        """`guided_share`: the share of its generations' steps on which guidance acted."""
        if not self._counts:
            return {}
        n = self._n
        prompts = (max(self._counts) + 1) // n
        shares = []
        for i in range(prompts):
            runs = [self._counts.get(i * n + j, [0, 0]) for j in range(n)]
            steps = sum(r[0] for r in runs)
            shares.append(sum(r[1] for r in runs) / steps if steps else float("nan"))
        return {"guided_share": shares}
