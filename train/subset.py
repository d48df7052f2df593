"""Training a chosen subset of UNet parameters (MemControl-style capacity control).

A subset is given by name patterns (regular expressions matched against parameter names),
or by a mask file:

- `*.json`: a block mask, ``{"family": "attention", "block_mask": [1, 0, ...]}`` with one
  entry per transformer block of the UNet (`transformer_blocks` lists them in order), and a
  family naming which parameters inside a chosen block are trained;
- `*.safetensors`: element masks, ``{parameter name: 0/1 tensor of its shape}``; only the
  elements set to 1 change (their gradient is masked, and they get no weight decay).

Named presets (`PRESETS`, chosen with ``--trainable_preset NAME``) let a study compare full
fine-tuning, LoRA and subsets by name: "attention", "cross_attention", "bias_norm", the
transformer blocks of one UNet path ("down", "mid", "up"), and "lora_r4", which is not a
subset but LoRA of rank 4 (``--mode lora --rank 4``).

Saved output: `subset_delta.safetensors` (only the trained tensors, with the base model and
the mask in its metadata) and, for element masks, `subset_mask.safetensors`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from detect.models import SUBSET_FILE, load_subset_delta
from hf_datasets.errors import ChexmemError

DELTA_FILE = SUBSET_FILE  # one name for the file, shared with the loader in detect.models
MASK_FILE = "subset_mask.safetensors"
FAMILIES: dict[str, str] = {
    "all": r".*",
    "attention": r"\.attn[12]\.",
    "cross_attention": r"\.attn2\.",
    "attention_kv": r"\.attn2\.to_[kv]\.",
    "bias_norm": r"(\.bias$|norm)",
    # DiffFit (Xie et al., 2023): biases and norms, plus a learned per-channel scale
    # (initialised to 1) on the output of each attention and feed-forward layer
    "difffit": r"(\.bias$|norm)",
    # LoRA per block: adapters on the attention projections of the chosen blocks (--mode lora)
    "lora": r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$",
}
LORA_FAMILY = "lora"
# the modules whose output DiffFit scales (a scale after a Linear folds into its weight)
SCALED_MODULES = {"difffit": r"\.(attn[12]\.to_out\.0|ff\.net\.2)$"}
SCALE_NAME = "difffit_scale"


BLOCK_PATHS = ("down", "mid", "up")


@dataclass(frozen=True)
class Preset:
    """A named capacity setting: a family of parameters (optionally inside the transformer
    blocks of one UNet path), or LoRA of a rank."""

    description: str
    family: str | None = None
    blocks: str | None = None  # "down", "mid" or "up": only that path's transformer blocks
    lora_rank: int | None = None


PRESETS: dict[str, Preset] = {
    "attention": Preset("all attention weights of the UNet (attn1 and attn2)", family="attention"),
    "cross_attention": Preset("cross-attention (attn2) weights only", family="cross_attention"),
    "bias_norm": Preset("biases and normalisation layers of the UNet", family="bias_norm"),
    "lora_r4": Preset("LoRA of rank 4 (--mode lora --rank 4)", lora_rank=4),
    "down": Preset("every parameter of the down path's transformer blocks", "all", "down"),
    "mid": Preset("every parameter of the mid block's transformer blocks", "all", "mid"),
    "up": Preset("every parameter of the up path's transformer blocks", "all", "up"),
}


def preset(name: str) -> Preset:
    """The preset of that name; an unknown name lists the valid ones."""
    if name not in PRESETS:
        valid = "; ".join(f"{k} ({v.description})" for k, v in PRESETS.items())
        raise ChexmemError(f"unknown --trainable_preset {name!r}; choose from: {valid}")
    return PRESETS[name]


@dataclass
class Subset:
    """Which UNet parameters train, and element masks for those only partly trained."""

    names: list[str]
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    description: str = ""
    scaled: list[str] = field(default_factory=list)  # modules given a DiffFit output scale


def transformer_blocks(unet: torch.nn.Module) -> list[str]:
    """Names of the UNet's attention (transformer) blocks in down, mid, up order."""
    names = [n for n, m in unet.named_modules() if type(m).__name__ == "Transformer2DModel"]

    def order(name: str) -> tuple[int, int, int]:
        part = name.split(".")
        rank = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}[part[0]]
        numbers = [int(p) for p in part if p.isdigit()]
        return (rank, *[*numbers, 0, 0][:2])

    return sorted(names, key=order)


def from_patterns(unet: torch.nn.Module, patterns: Sequence[str]) -> Subset:
    """Parameters whose names match any pattern (re.search)."""
    try:
        compiled = [re.compile(p) for p in patterns]
    except re.error as error:
        raise ChexmemError(f"bad --trainable_params pattern: {error}") from None
    names = [n for n, _ in unet.named_parameters() if any(c.search(n) for c in compiled)]
    return Subset(names, description=f"patterns {list(patterns)}")


def read_block_mask(unet: torch.nn.Module, spec: dict) -> tuple[str, list[str]]:
    """The family and the transformer blocks a block-mask spec selects (checked)."""
    blocks = transformer_blocks(unet)
    mask = spec.get("block_mask")
    family = spec.get("family", "attention")
    if family not in FAMILIES:
        raise ChexmemError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    if not isinstance(mask, list) or len(mask) != len(blocks):
        raise ChexmemError(
            f"block_mask must list {len(blocks)} entries (one per transformer block), got {mask!r}"
        )
    return family, [b for b, keep in zip(blocks, mask, strict=True) if keep]


def _inside(name: str, blocks: Sequence[str]) -> bool:
    """Whether a parameter or module name lies inside one of the blocks."""
    return any(name.startswith(b + ".") for b in blocks)


def from_block_mask(unet: torch.nn.Module, spec: dict) -> Subset:
    """Parameters of the family inside the transformer blocks the mask selects."""
    family, chosen = read_block_mask(unet, spec)
    if family == LORA_FAMILY:
        raise ChexmemError("a block mask of family 'lora' trains LoRA adapters: use --mode lora")
    pattern = re.compile(FAMILIES[family])
    names = [n for n, _ in unet.named_parameters() if _inside(n, chosen) and pattern.search(n)]
    scaled = []
    if family in SCALED_MODULES:
        target = re.compile(SCALED_MODULES[family])
        scaled = [n for n, _ in unet.named_modules() if _inside(n, chosen) and target.search(n)]
        names += [f"{n}.{SCALE_NAME}" for n in scaled]
    return Subset(names, description=f"block mask {spec['block_mask']} family {family}",
                  scaled=scaled)  # fmt: skip


def lora_block_targets(unet: torch.nn.Module, spec: dict) -> list[str]:
    """Full names of the attention projections inside the blocks a 'lora' block mask selects."""
    family, chosen = read_block_mask(unet, spec)
    if family != LORA_FAMILY:
        raise ChexmemError(f"--mode lora needs a block mask of family 'lora', not {family!r}")
    pattern = re.compile(FAMILIES[LORA_FAMILY])
    return [n for n, _ in unet.named_modules() if _inside(n, chosen) and pattern.search(n)]


def from_preset(unet: torch.nn.Module, name: str) -> Subset:
    """Parameters of a subset preset (a LoRA preset is not a subset: see `Preset.lora_rank`)."""
    chosen = preset(name)
    if chosen.family is None:
        raise ChexmemError(f"--trainable_preset {name} is LoRA, not a parameter subset")
    pattern = re.compile(FAMILIES[chosen.family])
    names = [n for n, _ in unet.named_parameters() if pattern.search(n)]
    if chosen.blocks is not None:
        path = {"down": "down_blocks.", "mid": "mid_block.", "up": "up_blocks."}[chosen.blocks]
        blocks = [b + "." for b in transformer_blocks(unet) if b.startswith(path)]
        names = [n for n in names if n.startswith(tuple(blocks))] if blocks else []
    return Subset(names, description=f"preset {name}")


def from_element_masks(unet: torch.nn.Module, path: Path) -> Subset:
    """Parameters with element masks read from a safetensors file."""
    masks = {k: v.bool() for k, v in load_file(str(path)).items()}
    params = dict(unet.named_parameters())
    unknown = sorted(set(masks) - set(params))
    if unknown:
        raise ChexmemError(f"{path} masks unknown parameter(s): {', '.join(unknown[:5])}")
    for name, mask in masks.items():
        if mask.shape != params[name].shape:
            raise ChexmemError(
                f"{path}: mask of {name} has shape {tuple(mask.shape)}, "
                f"parameter {tuple(params[name].shape)}"
            )
    partial = {k: v for k, v in masks.items() if not bool(v.all())}
    names = [k for k, v in masks.items() if bool(v.any())]
    return Subset(names, masks=partial, description=f"element masks from {path.name}")


def select_subset(
    unet: torch.nn.Module,
    patterns: Sequence[str],
    mask_file: str | None,
    preset_name: str | None = None,
) -> Subset:
    """The subset named by --trainable_params, --trainable_mask and --trainable_preset (union)."""
    parts = []
    if preset_name:
        parts.append(from_preset(unet, preset_name))
    if patterns:
        parts.append(from_patterns(unet, patterns))
    if mask_file:
        path = Path(mask_file).expanduser()
        if not path.is_file():
            raise ChexmemError(f"--trainable_mask {path} does not exist")
        if path.suffix == ".json":
            parts.append(from_block_mask(unet, json.loads(path.read_text())))
        else:
            parts.append(from_element_masks(unet, path))
    names = sorted({n for p in parts for n in p.names})
    if not names:
        raise ChexmemError(
            "the subset selects no parameters; check --trainable_params / --trainable_mask / "
            "--trainable_preset"
        )
    masks = {k: v for p in parts for k, v in p.masks.items() if k in names}
    scaled = sorted({n for p in parts for n in p.scaled})
    description = "; ".join(p.description for p in parts)
    return Subset(names, masks=masks, description=description, scaled=scaled)


def _scale_output(module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
    """Multiply a layer's output by its DiffFit scale, per channel."""
    return output * getattr(module, SCALE_NAME).to(output.dtype)


def add_scales(unet: torch.nn.Module, modules: Sequence[str]) -> list[Any]:
    """Give each named Linear a trainable per-channel output scale, initialised to 1."""
    handles = []
    for name in modules:
        layer = unet.get_submodule(name)
        if not hasattr(layer, SCALE_NAME):
            weight = layer.weight
            scale = torch.nn.Parameter(torch.ones(weight.shape[0], device=weight.device))
            layer.register_parameter(SCALE_NAME, scale)
        handles.append(layer.register_forward_hook(_scale_output))
    return handles


def apply_subset(unet: torch.nn.Module, subset: Subset) -> list[torch.utils.hooks.RemovableHandle]:
    """Freeze all but the subset; add DiffFit scales; mask the gradient of partly trained
    parameters."""
    handles = add_scales(unet, subset.scaled)
    unet.requires_grad_(False)
    params = dict(unet.named_parameters())
    for name in subset.names:
        params[name].requires_grad_(True)
        if name in subset.masks:
            mask = subset.masks[name].to(params[name].dtype)
            handles.append(
                params[name].register_hook(lambda grad, m=mask: grad * m.to(grad.device))
            )
    return handles


def param_groups(unet: torch.nn.Module, subset: Subset, weight_decay: float) -> list[dict]:
    """Optimizer groups: masked parameters get no weight decay, so frozen elements never move."""
    params = dict(unet.named_parameters())
    full = [params[n] for n in subset.names if n not in subset.masks]
    partial = [params[n] for n in subset.names if n in subset.masks]
    groups = [{"params": full, "weight_decay": weight_decay}]
    if partial:
        groups.append({"params": partial, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def save_subset(unet: torch.nn.Module, subset: Subset, out: Path, base_model: str) -> Path:
    """Write the trained tensors (and element masks) with the base model in the metadata."""
    params = dict(unet.named_parameters())
    tensors = {
        n: params[n].detach().float().contiguous().cpu()
        for n in subset.names
        if not n.endswith("." + SCALE_NAME)
    }
    tensors.update(folded_scales(unet, subset.scaled))
    metadata = {
        "base_model": base_model,
        "subset": subset.description,
        "format": "chexmem-subset-v1",
    }
    save_file(tensors, str(out / DELTA_FILE), metadata=metadata)
    if subset.masks:
        save_file(
            {k: v.to(torch.uint8).contiguous() for k, v in subset.masks.items()},
            str(out / MASK_FILE),
        )
    return out / DELTA_FILE


def folded_scales(unet: torch.nn.Module, modules: Sequence[str]) -> dict[str, torch.Tensor]:
    """Weight and bias of each scaled Linear with its scale folded in: s * (W x + b) is
    (s W) x + s b, so a plain UNet loads the result with no extra layer."""
    tensors = {}
    for name in modules:
        layer = unet.get_submodule(name)
        scale = getattr(layer, SCALE_NAME).detach().float().cpu()
        tensors[f"{name}.weight"] = (
            layer.weight.detach().float().cpu() * scale[:, None]
        ).contiguous()
        if layer.bias is not None:
            tensors[f"{name}.bias"] = (layer.bias.detach().float().cpu() * scale).contiguous()
    return tensors


def load_subset(unet: torch.nn.Module, folder: str | Path) -> dict[str, str]:
    """Load a saved subset into a UNet of the same architecture; returns the file's metadata."""
    path = Path(folder) / DELTA_FILE
    if not path.is_file():
        raise ChexmemError(f"no {DELTA_FILE} in {folder}")
    return load_subset_delta(unet, path)
