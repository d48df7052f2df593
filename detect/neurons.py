"""Memorization neurons (NEMO, Hintersdorf et al., NeurIPS 2024): which value-projection
channels of the cross-attention layers carry a memorized prompt.

The search space is the output channels ("neurons") of every cross-attention value projection
``attn2.to_v`` of the UNet, found by name, in down, mid (and optionally up) block order; SD v1.4
has 7 such layers in its down and mid blocks (320, 320, 640, 640, 1280, 1280, 1280 neurons).

* Activation of neuron i for prompt p: the mean over the 77 token positions of
  ``|to_v(e_p)|_i``. It depends on neither the timestep nor the latent, so it is computed by
  applying each ``to_v`` to the text-encoder output ``e_p`` directly. Per-neuron mean and std
  over non-memorized reference prompts give z-scores; a neuron is out of distribution (OOD)
  for a prompt when ``|z| > theta_act``.
* Noise difference of seed s: ``delta_s = eps(x_T^s, t_1, e_p) - x_T^s``, conditional branch
  only (no guidance), min-max normalised per sample and channel. ``t_1`` is timestep
  `noise_step_index` of a `num_inference_steps`-step DDIM schedule: the paper uses the first
  (t = T, our default), the public code the second (``noise_step_index=1``).
* Memorization of a prompt: seeds whose deltas are alike. A seed is kept when its largest SSIM
  to another seed's delta reaches ``tau_mem``; a prompt without kept seeds is not memorized.
  ``tau_mem`` is mean + 1 std, over non-memorized prompts, of each prompt's largest pairwise
  SSIM (`calibrate_threshold`; 0.428 on SD v1.4 with 10 seeds).
* Score of a blocked neuron set S: the largest, over kept seeds, SSIM between the delta
  unblocked and the delta with S's channels zeroed. A score at most ``tau_mem`` means blocking
  S changed the prediction: the memorization is removed.
* Initial selection: ``theta_act = 5``, ``k = 0``; S is the OOD neurons plus the k most active
  neurons of every layer; until the score reaches ``tau_mem``, lower ``theta_act`` by 0.25
  (not below 1) and raise k by one. Refinement then re-enables whole layers, last to first,
  then single neurons (least OOD first), wherever the score stays at most ``tau_mem`` (or at
  the level the initial selection reached, when it never got there).
* Reach: each memorized prompt also records its score with every searched neuron blocked
  (`score_all_blocked`). Where even that stays above ``tau_mem`` the rule cannot end the
  search in practice: the prediction's structure does not pass through these channels.

Blocking is a forward hook on each chosen ``to_v`` that multiplies its output channels by 0
(`blocked`, removed on exit) or, permanently, zeroed rows of ``W_v`` (`zero_neurons`).
Seed j of prompt i is ``seed + 1000 * i + j`` as in `detect.magnitude`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from detect.calibration import Calibration, check_calibration
from detect.magnitude import MagnitudeConfig, encode_prompts, initial_latents
from hf_datasets.errors import ChexmemError

VALUE_SUFFIX = "attn2.to_v"
BLOCK_ORDER = ("down_blocks", "mid_block", "up_blocks")
CACHE_STEM = "nemo_reference"
NeuronSet = dict[str, list[int]]  # layer name -> sorted channel indices


@dataclass
class NemoConfig:
    """Where the noise difference is measured and how neurons are searched (paper defaults)."""

    num_seeds: int = 10
    num_inference_steps: int = 50
    noise_step_index: int = 0  # t_1 = DDIM timestep at this index (0: t = T as in the paper)
    seed: int = 0
    height: int | None = None
    width: int | None = None
    include_up_blocks: bool = False  # the paper searches down and mid blocks only
    theta_start: float = 5.0
    theta_step: float = 0.25
    theta_min: float = 1.0
    max_iterations: int = 50  # initial-selection rounds before giving up
    ssim_window: int = 7  # gaussian window side, clipped to the latent size
    ssim_sigma: float = 1.5
    batch_size: int = 64  # prompts per text-encoder call for the reference statistics
    progress: bool = True

    def __post_init__(self) -> None:
        if self.num_seeds < 2:
            raise ChexmemError("num_seeds must be at least 2 (seeds are compared in pairs)")
        if not 0 <= self.noise_step_index < self.num_inference_steps:
            raise ChexmemError(
                f"noise_step_index must be between 0 and num_inference_steps - 1 "
                f"({self.num_inference_steps - 1})"
            )
        if self.ssim_window < 3 or self.ssim_window % 2 == 0:
            raise ChexmemError("ssim_window must be an odd number of at least 3")
        if self.max_iterations < 1 or self.batch_size < 1:
            raise ChexmemError("max_iterations and batch_size must be at least 1")
        if self.theta_step < 0 or self.theta_min > self.theta_start:
            raise ChexmemError("need theta_step >= 0 and theta_min <= theta_start")

    def magnitude_config(self) -> MagnitudeConfig:
        """The seeds and latent size, as `detect.magnitude.initial_latents` reads them."""
        return MagnitudeConfig(
            num_inference_steps=self.num_inference_steps,
            num_generations=self.num_seeds,
            seed=self.seed,
            height=self.height,
            width=self.width,
            progress=False,
        )


# --- the search space ------------------------------------------------------------------------


def value_layers(unet: torch.nn.Module, include_up_blocks: bool = False) -> list[str]:
    """Names of the cross-attention value projections, down then mid (then up) blocks."""
    found: dict[str, list[str]] = {block: [] for block in BLOCK_ORDER}
    for name, module in unet.named_modules():
        if not name.endswith(VALUE_SUFFIX) or name.split(".")[0] not in found:
            continue
        if not isinstance(module, torch.nn.Linear):
            raise ChexmemError(
                f"{name} is a {type(module).__name__}, not a Linear layer; merge adapters "
                "(e.g. LoRA) into the UNet before searching for neurons"
            )
        found[name.split(".")[0]].append(name)
    blocks = BLOCK_ORDER if include_up_blocks else BLOCK_ORDER[:2]
    return [name for block in blocks for name in found[block]]


def layer_sizes(unet: torch.nn.Module, layers: Sequence[str]) -> dict[str, int]:
    """Number of neurons (output channels) of each layer."""
    sizes = {}
    for name in layers:
        try:
            sizes[name] = unet.get_submodule(name).out_features
        except AttributeError:
            raise ChexmemError(f"this UNet has no layer {name}") from None
    return sizes


def _channels(unet: torch.nn.Module, neurons: Mapping[str, Sequence[int]]) -> dict[str, Any]:
    """Check a neuron set against the UNet: {layer: (Linear, sorted unique index tensor)}."""
    checked = {}
    for name, channels in neurons.items():
        try:
            module = unet.get_submodule(name)
        except AttributeError:
            module = None
        if not name.endswith(VALUE_SUFFIX) or not isinstance(module, torch.nn.Linear):
            raise ChexmemError(f"{name} is not a cross-attention value projection of this UNet")
        index = sorted({int(c) for c in channels})
        if index and not 0 <= index[0] <= index[-1] < module.out_features:
            raise ChexmemError(f"neurons of {name} must lie in 0..{module.out_features - 1}")
        if index:
            checked[name] = (module, torch.tensor(index, device=module.weight.device))
    return checked


@contextlib.contextmanager
def blocked(
    unet: torch.nn.Module, neurons: Mapping[str, Sequence[int]], scale: float = 0.0
) -> Iterator[None]:
    """Inside, the given to_v output channels are multiplied by `scale` (0: blocked)."""
    handles = []
    try:
        for module, index in _channels(unet, neurons).values():
            mask = torch.ones(module.out_features, dtype=module.weight.dtype, device=index.device)
            mask[index] = scale

            def hook(_module: Any, _inputs: Any, output: torch.Tensor, mask=mask) -> torch.Tensor:
                return output * mask.to(output.dtype)  # autocast may change the output dtype

            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def zero_neurons(
    unet: torch.nn.Module, neurons: Mapping[str, Sequence[int]], inplace: bool = False
) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """Block neurons for good: zero their W_v rows (and bias) in a copy, or in place.

    Returns the edited UNet and the original values of what was zeroed, keyed by parameter
    name ("<layer>.weight": the rows, "<layer>.bias": the entries), in channel order."""
    target = unet if inplace else copy.deepcopy(unet)
    original = {}
    for name, (module, index) in _channels(target, neurons).items():
        original[f"{name}.weight"] = module.weight[index].detach().cpu().clone()
        module.weight[index] = 0
        if module.bias is not None:
            original[f"{name}.bias"] = module.bias[index].detach().cpu().clone()
            module.bias[index] = 0
    return target, original


# --- activations and reference statistics ----------------------------------------------------


@torch.no_grad()
def neuron_activations(
    pipe: Any, embeddings: torch.Tensor, layers: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Mean |to_v(e_p)| over token positions, (P, neurons) float32 per layer."""
    unet = pipe.unet
    return {
        name: unet.get_submodule(name)(embeddings).float().abs().mean(dim=1).cpu()
        for name in layers
    }


@dataclass
class ReferenceStats:
    """Per-neuron activation mean and std over non-memorized prompts."""

    layers: list[str]
    mean: dict[str, torch.Tensor]
    std: dict[str, torch.Tensor]
    num_prompts: int
    model_id: str
    from_cache: bool = False

    def z_scores(self, activations: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Standardised activations of one prompt ({layer: (neurons,)}, any of the layers)."""
        return {
            name: (values.reshape(-1) - self.mean[name]) / self.std[name].clamp_min(1e-12)
            for name, values in activations.items()
        }


def _digest(tensor: torch.Tensor) -> bytes:
    """The raw bytes of a tensor, whatever its dtype."""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def model_fingerprint(pipe: Any, layers: Sequence[str]) -> str:
    """A hash of what activations depend on: the layers' to_v weights and the text encoder."""
    sha = hashlib.sha256()
    for name in layers:
        sha.update(name.encode())
        for parameter in pipe.unet.get_submodule(name).parameters():
            sha.update(_digest(parameter))
    for name, parameter in sorted(pipe.text_encoder.named_parameters()):
        sha.update(name.encode())
        sha.update(_digest(parameter))
    sha.update(f"{len(pipe.tokenizer)}:{pipe.tokenizer.model_max_length}".encode())
    return sha.hexdigest()


def _prompts_hash(prompts: Sequence[str]) -> str:
    return hashlib.sha256("\x00".join(prompts).encode()).hexdigest()


def reference_statistics(
    pipe: Any,
    prompts: Sequence[str],
    config: NemoConfig | None = None,
    cache_dir: str | Path | None = None,
) -> ReferenceStats:
    """Activation statistics of non-memorized `prompts`, loaded from `cache_dir` if it holds
    them for the same model, layers and prompts (else computed and written there, replacing
    what the folder held: one set of statistics per folder)."""
    config = config or NemoConfig()
    prompts = list(prompts)
    if len(prompts) < 2:
        raise ChexmemError("reference statistics need at least 2 non-memorized prompts")
    layers = value_layers(pipe.unet, config.include_up_blocks)
    if not layers:
        raise ChexmemError("this UNet has no cross-attention value projections (attn2.to_v)")
    model_id = model_fingerprint(pipe, layers)
    identity = {
        "num_prompts": len(prompts),
        "prompts_sha256": _prompts_hash(prompts),
        "model_sha256": model_id,
        "layers": layers,
    }
    tensors_path = json_path = None
    if cache_dir is not None:
        tensors_path = Path(cache_dir) / f"{CACHE_STEM}.safetensors"
        json_path = Path(cache_dir) / f"{CACHE_STEM}.json"
        cached = tensors_path.exists() and json_path.exists()
        if cached and json.loads(json_path.read_text()) == identity:
            tensors = load_file(tensors_path)
            return ReferenceStats(
                layers,
                {name: tensors[f"{name}.mean"] for name in layers},
                {name: tensors[f"{name}.std"] for name in layers},
                len(prompts),
                model_id,
                from_cache=True,
            )
    chunks: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    starts = range(0, len(prompts), config.batch_size)
    for start in tqdm(starts, desc="reference activations", disable=not config.progress):
        embeddings = encode_prompts(pipe, prompts[start : start + config.batch_size])
        for name, values in neuron_activations(pipe, embeddings, layers).items():
            chunks[name].append(values)
    activations = {name: torch.cat(values) for name, values in chunks.items()}
    mean = {name: values.mean(dim=0) for name, values in activations.items()}
    std = {name: values.std(dim=0) for name, values in activations.items()}
    if tensors_path is not None and json_path is not None:
        tensors_path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"{n}.mean": mean[n].contiguous() for n in layers}
        tensors.update({f"{n}.std": std[n].contiguous() for n in layers})
        save_file(tensors, tensors_path)
        json_path.write_text(json.dumps(identity, indent=1) + "\n")
    return ReferenceStats(layers, mean, std, len(prompts), model_id)


# --- noise differences and SSIM ---------------------------------------------------------------


def ssim(
    a: torch.Tensor,
    b: torch.Tensor,
    window: int = 7,
    sigma: float = 1.5,
    data_range: float = 1.0,
) -> torch.Tensor:
    """Per-sample SSIM (B,) of two (B, C, H, W) batches, averaged over channels and positions.

    Gaussian window (side clipped to the image), borders reflect-padded: the same values as
    torchmetrics' SSIM, whose window side is fixed by sigma (11 for 1.5)."""
    channels, height, width = a.shape[1:]
    size = min(window, height, width)
    size -= 1 - size % 2  # keep the window odd
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    gauss = torch.exp(-0.5 * (offsets / sigma) ** 2)
    gauss = gauss / gauss.sum()
    kernel = (gauss[:, None] * gauss[None, :]).to(a.device, torch.float32)
    kernel = kernel.expand(channels, 1, size, size)
    pad = (size - 1) // 2
    a = F.pad(a.float(), (pad, pad, pad, pad), mode="reflect")
    b = F.pad(b.float(), (pad, pad, pad, pad), mode="reflect")

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, kernel, groups=channels)

    mu_a, mu_b = blur(a), blur(b)
    var_a = (blur(a * a) - mu_a**2).clamp_min(0)  # rounding can make them slightly negative
    var_b = (blur(b * b) - mu_b**2).clamp_min(0)
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    value = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    return value.flatten(1).mean(dim=1)


def pairwise_ssim(deltas: torch.Tensor, config: NemoConfig) -> torch.Tensor:
    """(n, n) SSIM between every two seeds' deltas; the diagonal is NaN."""
    n = len(deltas)
    rows, cols = torch.triu_indices(n, n, offset=1)
    values = ssim(deltas[rows], deltas[cols], config.ssim_window, config.ssim_sigma)
    matrix = torch.full((n, n), float("nan"))
    matrix[rows, cols] = values.cpu()
    matrix[cols, rows] = values.cpu()
    return matrix


def normalise(delta: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each sample and channel to [0, 1]."""
    low = delta.amin(dim=(2, 3), keepdim=True)
    high = delta.amax(dim=(2, 3), keepdim=True)
    return (delta - low) / (high - low).clamp_min(1e-12)


class _NoiseProbe:
    """The noise differences of one prompt's seeds, with any neuron set blocked."""

    def __init__(self, pipe: Any, embedding: torch.Tensor, prompt_id: int, config: NemoConfig):
        scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        scheduler.set_timesteps(config.num_inference_steps, device=pipe.unet.device)
        self.pipe = pipe
        self.timestep = scheduler.timesteps[config.noise_step_index]
        latents, self.seeds = initial_latents(
            pipe, [prompt_id], config.magnitude_config(), scheduler
        )
        self.latents = latents
        self.model_input = scheduler.scale_model_input(latents, self.timestep)
        self.embedding = embedding
        self.calls = 0

    @torch.no_grad()
    def deltas(
        self, neurons: Mapping[str, Sequence[int]] | None = None, seeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Normalised eps(x_T, t_1, e_p) - x_T of the chosen seeds (all by default), float32."""
        index = (
            torch.arange(len(self.latents), device=self.latents.device) if seeds is None else seeds
        )
        model_input = self.model_input[index]
        embedding = self.embedding.expand(len(index), -1, -1)
        with blocked(self.pipe.unet, neurons or {}):
            eps = self.pipe.unet(model_input, self.timestep, embedding, return_dict=False)[0]
        self.calls += 1
        return normalise((eps - self.latents[index]).float())


# --- threshold -------------------------------------------------------------------------------


def max_pairwise_similarities(
    pipe: Any,
    prompts: Sequence[str],
    config: NemoConfig | None = None,
    prompt_ids: Sequence[int] | None = None,
) -> np.ndarray:
    """Each prompt's largest SSIM between the unblocked deltas of two of its seeds."""
    config = config or NemoConfig()
    ids = list(range(len(prompts))) if prompt_ids is None else [int(i) for i in prompt_ids]
    if len(ids) != len(prompts):
        raise ChexmemError("prompt_ids must give one id per prompt")
    out = np.zeros(len(prompts))
    for k, (prompt, prompt_id) in enumerate(
        tqdm(
            list(zip(prompts, ids, strict=True)), desc="pairwise SSIM", disable=not config.progress
        )
    ):
        probe = _NoiseProbe(pipe, encode_prompts(pipe, [prompt]), prompt_id, config)
        out[k] = float(pairwise_ssim(probe.deltas(), config).nan_to_num(-np.inf).max())
    return out


def calibrate_threshold(
    pipe: Any,
    prompts: Sequence[str],
    config: NemoConfig | None = None,
    prompt_ids: Sequence[int] | None = None,
    fix: str | None = None,
) -> Calibration:
    """tau_mem: mean + 1 std (sample std) of the non-memorized prompts' max pairwise SSIMs.

    Fewer than 20 prompts, or a tau_mem at SSIM's maximum, is kept but warned about and
    marked in the status (`detect.calibration`).
    """
    if len(prompts) < 2:
        raise ChexmemError("calibrating tau_mem needs at least 2 non-memorized prompts")
    values = max_pairwise_similarities(pipe, prompts, config, prompt_ids)
    return check_calibration(
        "tau_mem",
        float(values.mean() + values.std(ddof=1)),
        values,
        fix=fix
        or "calibrate on at least 20 non-memorized reference prompts (--num_reference), with "
        "more seeds if their SSIMs are all alike (--num_seeds), or set it yourself (--tau_mem)",
        ceiling=1.0,
        ceiling_means="no seed's noise difference can reach it, so no prompt is memorized",
    )


# --- localization ----------------------------------------------------------------------------


@dataclass
class NeuronResult:
    """The neurons found for one prompt and the scores along the way."""

    prompt: str
    prompt_id: int
    neurons: NeuronSet  # final refined set (empty when not memorized)
    memorized: bool  # some seed's delta matched another's at tau_mem or above
    removed: bool  # blocking `neurons` scores at most tau_mem
    similarity: float  # largest pairwise SSIM of the unblocked deltas (detection score)
    score_initial: float  # score of the initial selection (1.0: nothing blocked)
    score_final: float  # score with `neurons` blocked
    similarity_after: float  # largest pairwise SSIM of kept seeds' deltas with `neurons` blocked
    initial_neurons: int  # size of the initial selection
    iterations: int  # initial-selection rounds
    theta: float  # theta_act of the last round
    top_k: int  # k of the last round
    kept_seeds: list[int] = field(default_factory=list)
    unet_calls: int = 0
    seconds: float = 0.0
    # the score with every searched neuron blocked; above tau_mem, the rule is out of reach
    score_all_blocked: float = float("nan")

    @property
    def num_neurons(self) -> int:
        """Size of the final set."""
        return sum(len(channels) for channels in self.neurons.values())


def _as_set(pairs: set[tuple[str, int]], layers: Sequence[str]) -> NeuronSet:
    """Pairs (layer, channel) as {layer: sorted channels}, layers in search order."""
    out = {name: sorted(c for n, c in pairs if n == name) for name in layers}
    return {name: channels for name, channels in out.items() if channels}


@torch.no_grad()
def localize_neurons(
    pipe: Any,
    prompt: str,
    reference: ReferenceStats,
    tau_mem: float,
    config: NemoConfig | None = None,
    prompt_id: int = 0,
) -> NeuronResult:
    """NEMO on one prompt: initial selection, then layer-wise and neuron-wise refinement."""
    config = config or NemoConfig()
    tau_mem = float(tau_mem)
    started = time.perf_counter()
    layers = reference.layers
    sizes = layer_sizes(pipe.unet, layers)
    for name in layers:
        if len(reference.mean[name]) != sizes[name]:
            raise ChexmemError(f"reference statistics do not fit this UNet's layer {name}")
    embedding = encode_prompts(pipe, [prompt])
    probe = _NoiseProbe(pipe, embedding, prompt_id, config)
    base = probe.deltas()
    pairs_ssim = pairwise_ssim(base, config).nan_to_num(-np.inf)
    best_match = pairs_ssim.max(dim=1).values
    kept = torch.nonzero(best_match >= tau_mem).flatten().to(base.device)
    similarity = float(best_match.max())
    if len(kept) == 0:
        return NeuronResult(
            prompt=prompt,
            prompt_id=prompt_id,
            neurons={},
            memorized=False,
            removed=False,
            similarity=similarity,
            score_initial=1.0,
            score_final=1.0,
            similarity_after=similarity,
            initial_neurons=0,
            iterations=0,
            theta=config.theta_start,
            top_k=0,
            unet_calls=probe.calls,
            seconds=time.perf_counter() - started,
        )
    base_kept = base[kept]
    activation = neuron_activations(pipe, embedding, layers)
    z = reference.z_scores(activation)
    activation = {name: values[0] for name, values in activation.items()}

    def score(pairs: set[tuple[str, int]]) -> float:
        if not pairs:
            return 1.0  # nothing blocked: the deltas are the unblocked ones
        deltas = probe.deltas(_as_set(pairs, layers), kept)
        return float(ssim(base_kept, deltas, config.ssim_window, config.ssim_sigma).max())

    score_all_blocked = score({(name, c) for name in layers for c in range(sizes[name])})

    selected: set[tuple[str, int]] = set()
    current, theta, k, iterations = 1.0, config.theta_start, 0, 0
    while iterations < config.max_iterations:
        theta = max(config.theta_start - iterations * config.theta_step, config.theta_min)
        k, iterations = iterations, iterations + 1
        selected = set()
        for name in layers:
            ood = torch.nonzero(z[name].abs() > theta).flatten().tolist()
            top = torch.topk(activation[name], min(k, sizes[name])).indices.tolist()
            selected |= {(name, int(c)) for c in ood + top}
        current = score(selected)
        if current <= tau_mem:
            break
    score_initial, initial_neurons = current, len(selected)
    target = max(tau_mem, current)
    for name in reversed(layers):  # re-enable whole layers, last to first
        without = {pair for pair in selected if pair[0] != name}
        if without != selected and (value := score(without)) <= target:
            selected, current = without, value
    # then single neurons, the least out-of-distribution first
    for pair in sorted(selected, key=lambda p: (float(z[p[0]][p[1]].abs()), p)):
        without = selected - {pair}
        if (value := score(without)) <= target:
            selected, current = without, value
    neurons = _as_set(selected, layers)
    # a kept seed's best match is kept too (SSIM is symmetric): at least two seeds to compare
    after = pairwise_ssim(probe.deltas(neurons, kept), config).nan_to_num(-np.inf)
    return NeuronResult(
        prompt=prompt,
        prompt_id=prompt_id,
        neurons=neurons,
        memorized=True,
        removed=bool(current <= tau_mem),
        similarity=similarity,
        score_initial=score_initial,
        score_final=current,
        similarity_after=float(after.max()),
        initial_neurons=initial_neurons,
        iterations=iterations,
        theta=theta,
        top_k=k,
        kept_seeds=[probe.seeds[int(i)] for i in kept],
        unet_calls=probe.calls,
        seconds=time.perf_counter() - started,
        score_all_blocked=score_all_blocked,
    )


@dataclass
class NemoReport:
    """Neuron sets of many prompts and how often each neuron occurs."""

    results: list[NeuronResult]
    summary: pd.DataFrame  # one row per prompt
    frequency: pd.DataFrame  # layer, neuron, count, fraction; most frequent first
    per_layer: pd.DataFrame  # layer, neurons (size), distinct, occurrences, mean_per_prompt


def neuron_frequencies(
    results: Sequence[NeuronResult], sizes: Mapping[str, int]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """How often each (layer, neuron) is in a prompt's set, and counts per layer."""
    layer_order = {name: i for i, name in enumerate(sizes)}
    counts: dict[tuple[str, int], int] = {}
    for result in results:
        for name, channels in result.neurons.items():
            for channel in channels:
                counts[(name, channel)] = counts.get((name, channel), 0) + 1
    frequency = pd.DataFrame(
        [(name, channel, count) for (name, channel), count in counts.items()],
        columns=["layer", "neuron", "count"],
    )
    frequency["fraction"] = frequency["count"] / max(1, len(results))
    frequency["_order"] = frequency["layer"].map(layer_order)
    frequency = frequency.sort_values(
        ["count", "_order", "neuron"], ascending=[False, True, True]
    ).drop(columns="_order")
    per_layer = pd.DataFrame(
        {
            "layer": list(sizes),
            "neurons": list(sizes.values()),
            "distinct": [int((frequency["layer"] == name).sum()) for name in sizes],
            "occurrences": [
                int(frequency.loc[frequency["layer"] == n, "count"].sum()) for n in sizes
            ],
        }
    )
    per_layer["mean_per_prompt"] = per_layer["occurrences"] / max(1, len(results))
    return frequency.reset_index(drop=True), per_layer


def localize_prompts(
    pipe: Any,
    prompts: Sequence[str],
    reference: ReferenceStats,
    tau_mem: float,
    config: NemoConfig | None = None,
    prompt_ids: Sequence[int] | None = None,
) -> NemoReport:
    """`localize_neurons` on every prompt, with the frequency tables over all of them."""
    config = config or NemoConfig()
    prompts = list(prompts)
    ids = list(range(len(prompts))) if prompt_ids is None else [int(i) for i in prompt_ids]
    if len(ids) != len(prompts):
        raise ChexmemError("prompt_ids must give one id per prompt")
    results = [
        localize_neurons(pipe, prompt, reference, tau_mem, config, prompt_id)
        for prompt, prompt_id in tqdm(
            list(zip(prompts, ids, strict=True)), desc="NEMO", disable=not config.progress
        )
    ]
    summary = pd.DataFrame(
        {
            "prompt_id": [r.prompt_id for r in results],
            "memorized": [r.memorized for r in results],
            "removed": [r.removed for r in results],
            "num_neurons": [r.num_neurons for r in results],
            "similarity": [r.similarity for r in results],
            "score_initial": [r.score_initial for r in results],
            "score_final": [r.score_final for r in results],
            "similarity_after": [r.similarity_after for r in results],
            "score_all_blocked": [r.score_all_blocked for r in results],
            "iterations": [r.iterations for r in results],
            "seconds": [r.seconds for r in results],
        }
    )
    frequency, per_layer = neuron_frequencies(results, layer_sizes(pipe.unet, reference.layers))
    return NemoReport(results, summary, frequency, per_layer)
