"""Neuron deactivation (NEMO, Hintersdorf et al., NeurIPS 2024): block the memorization neurons
that `detect.neurons` localized, at inference time or for good, and test how robust that is.

* `NeuronDeactivation` is the inference-time mitigation: the chosen output channels of the
  cross-attention value projections ``attn2.to_v`` are multiplied by 0 at every step
  (`detect.neurons.blocked`, a hook removed on exit). It holds one `NeuronSet` blocked for every
  prompt and, optionally, a set per prompt text. Mode ``"union"`` (the default, what a deployed
  model does: it cannot know which prompt is memorized) blocks all of them for every prompt;
  ``"per_prompt"`` (the paper's evaluation) blocks for each generation only its own prompt's set
  (plus the common one). A generation's prompt is recognised by its text-encoder output, so
  ``"per_prompt"`` does not combine with a changed embedding; its unconditional branch gets the
  set of the conditional sample it is paired with (the halves of a guided batch, as diffusers
  and `detect.magnitude` lay them out).
* `prune_model` makes the edit permanent: the W_v rows (and bias entries) of the channels are
  zeroed (`detect.neurons.zero_neurons`) and a complete pipeline folder is saved. Because the
  bias is zeroed too, the pruned model generates what the hook generates with or without a
  bias in ``to_v`` (SD's has none).
* `perturbation_robustness` checks the 2025 finding that small perturbations of the prompt
  embedding can re-trigger copying after pruning: Gaussian noise of ``sigma`` times each token's
  RMS is added to e_p (all rows but BOS) and the step-1 score (and, given a training bank, the
  nearest-training similarity of the generations) is compared with and without the neurons
  blocked.

Neuron sets are read from and written to plain JSON ``{layer: [channels]}``; the
``neurons.json`` of ``chexmem neurons`` ({"neurons": {prompt id: {layer: [channels]}}}) and the
``chexmem_pruned.json`` of a pruned model are read too (as the union of their sets).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from detect.magnitude import MagnitudeConfig, decode_latents, encode_prompts
from detect.models import load_pipeline
from detect.neurons import NemoReport, NeuronSet, blocked, zero_neurons
from detect.similarity import Embedder, NCCEmbedder, TrainingBank, match_generations
from hf_datasets.errors import ChexmemError
from mitigate.base import Mitigation, StudySetup, generate

MODES = ("union", "per_prompt")
PRUNED_FILE = "chexmem_pruned.json"
CLI_FILE = "neurons.json"  # what `chexmem neurons` writes into its output folder
MATCH_TOLERANCE = 1e-2  # relative distance under which a conditioning row is a known prompt's


# --- neuron sets -----------------------------------------------------------------------------


def as_neuron_set(value: Any, what: str = "neurons") -> NeuronSet:
    """{layer: sorted unique channels} from any mapping of names to integer lists, or one error."""
    if not isinstance(value, Mapping):
        raise ChexmemError(f"{what} must map layer names to lists of channels")
    out: NeuronSet = {}
    for layer, channels in value.items():
        if not isinstance(layer, str) or isinstance(channels, (str, bytes, Mapping)):
            raise ChexmemError(f"{what}: {layer!r} must be a layer name with a list of channels")
        try:
            items = list(channels)
        except TypeError:
            raise ChexmemError(f"{what}: the channels of {layer} must be a list") from None
        if any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) for c in items):
            raise ChexmemError(f"{what}: the channels of {layer} must be integers")
        if items:
            out[layer] = sorted({int(c) for c in items})
    return out


def union(*sets: Mapping[str, Sequence[int]]) -> NeuronSet:
    """All channels of all sets, layers in order of first appearance."""
    out: dict[str, set[int]] = {}
    for neurons in sets:
        for layer, channels in neurons.items():
            out.setdefault(layer, set()).update(int(c) for c in channels)
    return {layer: sorted(channels) for layer, channels in out.items() if channels}


def count(neurons: Mapping[str, Sequence[int]]) -> int:
    """Number of neurons in a set."""
    return sum(len(channels) for channels in neurons.values())


def read_neuron_json(path: str | Path, min_frequency: int = 1) -> NeuronSet:
    """The neurons in a JSON file: {layer: [channels]}, `chexmem neurons` or a pruned model.

    A `chexmem neurons` file holds one set per prompt: their union, without the neurons found
    in fewer than `min_frequency` prompts."""
    if min_frequency < 1:
        raise ChexmemError(f"min_frequency must be at least 1, got {min_frequency}")
    path = Path(path).expanduser()
    if path.is_dir():
        found = [path / name for name in (CLI_FILE, PRUNED_FILE) if (path / name).is_file()]
        if not found:
            raise ChexmemError(f"{path} holds neither {CLI_FILE} nor {PRUNED_FILE}")
        path = found[0]
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ChexmemError(f"no neuron file at {path}") from None
    except (OSError, ValueError) as error:
        raise ChexmemError(f"cannot read neurons from {path}: {error}") from None
    if isinstance(data, dict) and isinstance(data.get("neurons"), dict):
        data = data["neurons"]
        if data and all(isinstance(v, Mapping) for v in data.values()):  # one set per prompt id
            sets = [as_neuron_set(v, f"{path}, prompt {k}") for k, v in data.items()]
            counts: dict[tuple[str, int], int] = {}
            for one in sets:
                for layer, channels in one.items():
                    for channel in channels:
                        counts[(layer, channel)] = counts.get((layer, channel), 0) + 1
            kept = [(layer, c) for (layer, c), n in counts.items() if n >= min_frequency]
            return union(*({layer: [c]} for layer, c in kept)) if kept else {}
    if min_frequency > 1:
        raise ChexmemError(
            f"{path} holds one set, not one per prompt: min_frequency needs the latter"
        )
    return as_neuron_set(data, str(path))


def write_neuron_json(neurons: Mapping[str, Sequence[int]], path: str | Path) -> Path:
    """Write {layer: [channels]} as JSON, under a temporary name, then renamed."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(as_neuron_set(neurons), indent=1) + "\n")
    partial.replace(path)
    return path


def _check_no_adapters(unet: torch.nn.Module, neurons: Mapping[str, Sequence[int]]) -> None:
    """A layer wrapped by a LoRA adapter gets one clear error (fuse the adapter first)."""
    for layer in neurons:
        try:
            module = unet.get_submodule(layer)
        except AttributeError:
            continue  # `blocked` names the missing layer
        if hasattr(module, "base_layer"):
            raise ChexmemError(
                f"{layer} carries a LoRA adapter; fuse it first (pipe.fuse_lora(); "
                "pipe.unload_lora_weights()) or use prune_model, which fuses it"
            )


# --- blocking per prompt ---------------------------------------------------------------------


def _conditioning(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The encoder_hidden_states of a UNet call, positional or by name."""
    if "encoder_hidden_states" in kwargs:
        return kwargs["encoder_hidden_states"]
    return args[2] if len(args) > 2 else None


def _owners(context: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Index of the known prompt each sample is conditioned on (len(keys) where none).

    Rows are compared without BOS (the same for every prompt); an unknown row in the first
    half of the batch takes the owner of its partner in the second half (the unconditional
    and conditional halves of a guided batch)."""
    rows = context[:, 1:].flatten(1).float()
    if rows.shape[1] != keys.shape[1]:  # another text encoder or length: no prompt is known
        return torch.full((len(rows),), len(keys), dtype=torch.long, device=rows.device)
    distance = torch.cdist(rows, keys)  # (N, K)
    nearest = distance.min(dim=1)
    known = nearest.values <= MATCH_TOLERANCE * keys.norm(dim=1)[nearest.indices]
    owner = torch.where(known, nearest.indices, torch.full_like(nearest.indices, len(keys)))
    half = len(owner) // 2
    if len(owner) % 2 == 0 and half:
        first, second = owner[:half], owner[half:]
        owner[:half] = torch.where(first == len(keys), second, first)
    return owner


@contextlib.contextmanager
def blocked_per_prompt(
    pipe: Any, sets: Mapping[str, Mapping[str, Sequence[int]]]
) -> Iterator[None]:
    """Inside, each generation of a prompt in `sets` has that prompt's channels blocked."""
    unet = pipe.unet
    everything = union(*sets.values())
    with blocked(unet, everything, scale=1.0):  # checks every layer and channel, changes nothing
        pass
    prompts = [prompt for prompt, neurons in sets.items() if count(neurons)]
    if not prompts:
        yield
        return
    keys = encode_prompts(pipe, prompts)[:, 1:].flatten(1).float()
    masks = {}
    for layer in everything:
        size = unet.get_submodule(layer).out_features
        mask = torch.ones(len(prompts) + 1, size, device=keys.device)  # last row: unknown prompt
        for k, prompt in enumerate(prompts):
            mask[k, list(sets[prompt].get(layer, []))] = 0.0
        masks[layer] = mask
    state: dict[str, torch.Tensor] = {}

    def find_owners(_module: Any, args: tuple, kwargs: dict) -> None:
        context = _conditioning(args, kwargs)
        if context is not None:
            state["owner"] = _owners(context, keys.to(context.device))

    def block(layer: str) -> Any:
        def hook(_module: Any, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
            owner = state.get("owner")
            if owner is None or len(owner) != len(output):
                return output
            mask = masks[layer].to(output.device, output.dtype)[owner]
            return output * mask[:, None, :]

        return hook

    handles = [unet.register_forward_pre_hook(find_owners, with_kwargs=True)]
    try:
        for layer in everything:
            handles.append(unet.get_submodule(layer).register_forward_hook(block(layer)))
        yield
    finally:
        for handle in handles:
            handle.remove()


# --- the mitigation --------------------------------------------------------------------------


@dataclass
class NeuronDeactivation(Mitigation):
    """Block cross-attention value neurons at every sampling step (NEMO's deactivation)."""

    neurons: NeuronSet = field(default_factory=dict)  # blocked for every prompt
    per_prompt: dict[str, NeuronSet] = field(default_factory=dict)  # prompt text -> its set
    mode: str = "union"  # "union": every set for every prompt; "per_prompt": a prompt's own set

    name = "neurons"

    @classmethod
    def study_variants(cls, setup: StudySetup) -> dict[str, Mitigation]:
        """The neurons the study localized with NEMO."""
        if not isinstance(setup.neurons, cls):
            raise ChexmemError("the neurons mitigation needs the study's NEMO neurons")
        return {cls.name: setup.neurons}

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ChexmemError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        self.neurons = as_neuron_set(self.neurons)
        if not isinstance(self.per_prompt, Mapping):
            raise ChexmemError("per_prompt must map prompt texts to neuron sets")
        self.per_prompt = {
            str(p): as_neuron_set(s, f"neurons of prompt {p!r}") for p, s in self.per_prompt.items()
        }

    def union(self) -> NeuronSet:
        """Every neuron this mitigation may block."""
        return union(self.neurons, *self.per_prompt.values())

    def for_prompt(self, prompt: str) -> NeuronSet:
        """The neurons blocked when generating `prompt`."""
        if self.mode == "union":
            return self.union()
        return union(self.neurons, self.per_prompt.get(prompt, {}))

    def active(self, pipe: Any) -> contextlib.AbstractContextManager:
        """The blocking hooks, held for the whole generation."""
        _check_no_adapters(pipe.unet, self.union())
        if self.mode == "union":
            return blocked(pipe.unet, self.union())
        return self._blocked_per_prompt(pipe)

    @contextlib.contextmanager
    def _blocked_per_prompt(self, pipe: Any) -> Iterator[None]:
        """The common set for every prompt, each prompt's own set for its generations."""
        with blocked(pipe.unet, self.neurons), blocked_per_prompt(pipe, self.per_prompt):
            yield

    def describe(self) -> dict[str, Any]:
        """Name, mode and how many neurons, layers and prompts."""
        neurons = self.union()
        return {
            "method": self.name,
            "mode": self.mode,
            "num_neurons": count(neurons),
            "num_layers": len(neurons),
            "num_prompts": len(self.per_prompt),
        }

    @classmethod
    def from_report(
        cls, report: NemoReport, min_frequency: int = 1, mode: str = "union"
    ) -> NeuronDeactivation:
        """The memorized prompts' sets, without neurons found in fewer than `min_frequency`."""
        if min_frequency < 1:
            raise ChexmemError(f"min_frequency must be at least 1, got {min_frequency}")
        memorized = [r for r in report.results if r.memorized]
        counts: dict[tuple[str, int], int] = {}
        for result in memorized:
            for layer, channels in result.neurons.items():
                for channel in channels:
                    counts[(layer, channel)] = counts.get((layer, channel), 0) + 1
        sets: dict[str, NeuronSet] = {}
        for result in memorized:
            kept = {
                layer: [c for c in channels if counts[(layer, c)] >= min_frequency]
                for layer, channels in result.neurons.items()
            }
            kept = union(sets.get(result.prompt, {}), kept)  # a prompt listed twice: both sets
            if kept:
                sets[result.prompt] = kept
        return cls(per_prompt=sets, mode=mode)

    @classmethod
    def from_json(cls, path: str | Path, min_frequency: int = 1) -> NeuronDeactivation:
        """Block the neurons of a JSON file (see `read_neuron_json`) for every prompt."""
        return cls(neurons=read_neuron_json(path, min_frequency))

    def to_json(self, path: str | Path) -> Path:
        """Write the union of the sets as {layer: [channels]}."""
        return write_neuron_json(self.union(), path)


# --- permanent pruning -----------------------------------------------------------------------


def _check_out(source: str | Path, out: Path, overwrite: bool) -> None:
    """Refuse to write over a file, the source, or (unless asked) a non-empty folder."""
    if out.exists() and not out.is_dir():
        raise ChexmemError(f"{out} is a file, not a folder to write the pruned model into")
    if Path(source).expanduser().exists() and out.resolve() == Path(source).expanduser().resolve():
        raise ChexmemError(f"the pruned model must go to a new folder, not over {out}")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ChexmemError(f"{out} already exists and is not empty; pass overwrite=True")


def _fuse_adapters(pipe: Any) -> bool:
    """Merge loaded LoRA weights into the base layers (so to_v is a plain Linear again)."""
    adapters = pipe.get_list_adapters() if hasattr(pipe, "get_list_adapters") else {}
    if not adapters:
        return False
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # after fusing: drops the adapter layers, keeps merged weights
    return True


def _sibling(out: Path, what: str) -> Path:
    """A fresh hidden name next to `out` (same file system, so renaming is atomic)."""
    return out.parent / f".{out.name}.{what}-{uuid.uuid4().hex[:8]}"


def _replace_folder(partial: Path, out: Path) -> None:
    """Move a finished folder to `out`, replacing what is there only once it is complete."""
    old = _sibling(out, "old") if out.exists() else None
    if old is not None:
        out.replace(old)
    try:
        partial.replace(out)
    except OSError:
        if old is not None:
            old.replace(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def prune_model(
    source: str | Path,
    neurons: Mapping[str, Sequence[int]] | NeuronDeactivation,
    out: str | Path,
    overwrite: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Save a copy of a model whose chosen to_v rows are zero: the neurons blocked for good.

    `source` is anything `detect.models.load_pipeline` loads (a LoRA is fused first). The new
    pipeline folder is written next to `out` under a temporary name and renamed when complete;
    it holds ``chexmem_pruned.json`` (source, neurons, count)."""
    chosen = neurons.union() if isinstance(neurons, NeuronDeactivation) else as_neuron_set(neurons)
    if not chosen:
        raise ChexmemError("no neurons to prune: the neuron set is empty")
    out = Path(out).expanduser()
    _check_out(source, out, overwrite)
    pipe = load_pipeline(source, dtype=dtype)
    fused = _fuse_adapters(pipe)
    _, original = zero_neurons(pipe.unet, chosen, inplace=True)  # checks layers and channels
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = _sibling(out, "partial")
    try:
        pipe.save_pretrained(partial, safe_serialization=True)
        record = {
            "source": str(source),
            "neurons": chosen,
            "count": count(chosen),
            "lora_fused": fused,
            "bias_zeroed": any(name.endswith(".bias") for name in original),
        }
        (partial / PRUNED_FILE).write_text(json.dumps(record, indent=1) + "\n")
        _replace_folder(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # gone already when the rename succeeded
    return out


# --- robustness to embedding perturbations ---------------------------------------------------


def perturb_embeddings(
    embeddings: torch.Tensor, sigma: float, prompt_ids: Sequence[int], seed: int = 0
) -> torch.Tensor:
    """e_p plus Gaussian noise of sigma x each token row's RMS on every row but BOS.

    Prompt i's noise comes from numpy's generator seeded with (seed, i), so it is the same
    direction at every sigma and does not depend on the other prompts."""
    if sigma < 0 or seed < 0:
        raise ChexmemError(f"sigma and seed must be at least 0, got {sigma} and {seed}")
    if len(prompt_ids) != len(embeddings):
        raise ChexmemError("prompt_ids must give one id per embedding")
    values = embeddings.float()
    rms = values.pow(2).mean(dim=-1, keepdim=True).sqrt()
    noise = torch.stack(
        [
            torch.from_numpy(
                np.random.default_rng([seed, int(i)]).standard_normal(values.shape[1:])
            ).float()
            for i in prompt_ids
        ]
    ).to(values.device)
    noise[:, 0] = 0.0
    return (values + sigma * rms * noise).to(embeddings.dtype)


@dataclass
class PerturbedEmbedding(Mitigation):
    """Condition on a noisy e_p (see `perturb_embeddings`), holding another mitigation's hooks."""

    sigma: float = 0.0
    seed: int = 0
    hooks: Mitigation | None = None  # e.g. a NeuronDeactivation; its hooks are held as its own

    name = "perturbed_embedding"

    def embeddings(
        self, pipe: Any, prompts: list[str], prompt_ids: list[int], config: MagnitudeConfig
    ) -> torch.Tensor:
        """The prompts' encoder outputs with noise added."""
        return perturb_embeddings(encode_prompts(pipe, prompts), self.sigma, prompt_ids, self.seed)

    def active(self, pipe: Any) -> contextlib.AbstractContextManager:
        """The inner mitigation's generation-long hooks."""
        return self.hooks.active(pipe) if self.hooks else contextlib.nullcontext()

    def step(
        self, pipe: Any, step: int, timestep: torch.Tensor
    ) -> contextlib.AbstractContextManager:
        """The inner mitigation's per-step hooks."""
        return self.hooks.step(pipe, step, timestep) if self.hooks else contextlib.nullcontext()

    def describe(self) -> dict[str, Any]:
        """Sigma, seed and the inner mitigation."""
        inner = self.hooks.describe() if self.hooks else None
        return {"method": self.name, "sigma": self.sigma, "seed": self.seed, "hooks": inner}


def _similarities(
    pipe: Any,
    latents: torch.Tensor,
    ids: list[int],
    num_generations: int,
    bank: TrainingBank,
    embedder: Embedder,
    own_index: Sequence[int | None] | None,
) -> pd.DataFrame:
    """Per prompt: the largest nearest-training and own-image similarity of its generations."""
    own = None if own_index is None else [i for i in own_index for _ in range(num_generations)]
    table = match_generations(
        decode_latents(pipe, latents),
        bank,
        np.repeat(ids, num_generations),
        embedder=embedder,
        own_index=own,
    )
    return table.groupby("prompt_id")[["nearest_similarity", "own_similarity"]].max()


def perturbation_robustness(
    pipe: Any,
    prompts: Sequence[str],
    neurons: Mapping[str, Sequence[int]],
    sigmas: Sequence[float] = (0.0, 0.05, 0.1, 0.2),
    config: MagnitudeConfig | None = None,
    seed: int = 0,
    bank: TrainingBank | None = None,
    embedder: Embedder | None = None,
    own_index: Sequence[int | None] | None = None,
    prompt_ids: Sequence[int] | None = None,
) -> pd.DataFrame:
    """One row per (prompt, sigma, pruned): step-1 score and, given a bank, the largest
    nearest-training similarity of the generations, with e_p perturbed and the neurons blocked
    (pruned) or not.

    Without a bank only the first sampling step is run (the score needs no more). `own_index`
    is the bank row of each prompt's training image; `embedder` defaults to pixel NCC."""
    config = config or MagnitudeConfig()
    prompts = list(prompts)
    ids = list(range(len(prompts))) if prompt_ids is None else [int(i) for i in prompt_ids]
    if not prompts or len(ids) != len(prompts):
        raise ChexmemError("give at least one prompt, and one prompt id per prompt")
    if own_index is not None and len(own_index) != len(prompts):
        raise ChexmemError(f"own_index has {len(own_index)} entries for {len(prompts)} prompts")
    if any(s < 0 for s in sigmas):
        raise ChexmemError(f"sigmas must be at least 0, got {list(sigmas)}")
    blocking = NeuronDeactivation(neurons=dict(neurons))
    run = config if bank is not None else replace(config, max_steps=1)
    embedder = embedder or NCCEmbedder()
    rows = []
    for sigma in sigmas:
        for pruned in (False, True):
            started = time.perf_counter()
            mitigation = PerturbedEmbedding(float(sigma), seed, blocking if pruned else None)
            result = generate(pipe, prompts, run, mitigation, ids, keep_final=bank is not None)
            scores = result.result.scores(first_k=1)
            similar = None
            if bank is not None:
                latents = result.result.final_latents
                n = config.num_generations
                similar = _similarities(pipe, latents, ids, n, bank, embedder, own_index)
            seconds = (time.perf_counter() - started) / len(prompts)
            for prompt, prompt_id in zip(prompts, ids, strict=True):
                rows.append(
                    {
                        "prompt_id": prompt_id,
                        "prompt": prompt,
                        "sigma": float(sigma),
                        "pruned": pruned,
                        "score": float(scores[prompt_id]),
                        "nearest_similarity": np.nan
                        if similar is None
                        else float(similar.loc[prompt_id, "nearest_similarity"]),
                        "own_similarity": np.nan
                        if similar is None
                        else float(similar.loc[prompt_id, "own_similarity"]),
                        "seconds_per_prompt": seconds,
                    }
                )
    table = pd.DataFrame(rows)
    return table.sort_values(["prompt_id", "sigma", "pruned"], kind="stable").reset_index(drop=True)
