"""Load what `chexmem train` wrote (pipeline folder, LoRA weights or subset delta) for detection.

Every fine-tune output becomes one ordinary `StableDiffusionPipeline` (or a subclass):
- a pipeline folder (``model_index.json``) or a Hub id loads as it is;
- a LoRA folder (``pytorch_lora_weights.safetensors``) loads its base model, then the LoRA;
- a subset folder (``subset_delta.safetensors``) loads its base model, then the tensors.
The base model comes from the run's ``chexmem_train.json`` (or the delta's metadata).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file

from hf_datasets.errors import ChexmemError

LORA_FILE = "pytorch_lora_weights.safetensors"
SUBSET_FILE = "subset_delta.safetensors"
# a subset run with --train_text_encoder: the text encoder trains whole and is saved whole
SUBSET_TEXT_ENCODER_FILE = "text_encoder.safetensors"
RUN_FILE = "chexmem_train.json"


def looks_like_hub_id(name: str) -> bool:
    """Whether `name` has the form of a Hub repo id, org/name (not ./x, /x, ~/x or a/b/c)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.startswith((".", "/", "~")) or "/" not in name:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def model_source(name_or_path: str | Path) -> tuple[str, bool]:
    """(what to load, whether it is local): an existing path, absolute, or a Hub repo id.

    Anything else is a local path that does not exist, and that is the error."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return str(path.resolve()), True
    if not looks_like_hub_id(str(name_or_path)):
        raise ChexmemError(
            f"model path {name_or_path} does not exist (give a local folder or a Hub repo id "
            "like org/name)"
        )
    return str(name_or_path), False


def base_model_of(folder: Path) -> str:
    """The base model a LoRA / subset run was trained from."""
    run = folder / RUN_FILE
    if run.is_file():
        base = json.loads(run.read_text()).get("config", {}).get("pretrained_model_name_or_path")
        if base:
            return str(base)
    delta = folder / SUBSET_FILE
    if delta.is_file():
        with safe_open(str(delta), "pt") as handle:
            base = (handle.metadata() or {}).get("base_model")
        if base:
            return base
    raise ChexmemError(f"{folder} holds fine-tuned weights but does not name its base model")


def base_of_fine_tune(folder: Path) -> str:
    """The base model of a LoRA / subset folder, which must still be where the run found it."""
    base = base_model_of(folder)
    if Path(base).expanduser().exists() or looks_like_hub_id(base):
        return base
    raise ChexmemError(
        f"base model {base} of fine-tune {folder} not found; put the base model back there, "
        f"or set config.pretrained_model_name_or_path in {folder / RUN_FILE} to where it is now"
    )


def library_reason(error: BaseException) -> str:
    """A library error as one line, without its pointers to a stack trace the user never sees."""
    text = " ".join(str(error).split()) or type(error).__name__
    pointer = re.compile(r"\s*[^.]*\bstack ?trace\b[^.]*\.?", re.IGNORECASE)
    if pointer.search(text):
        text = pointer.sub("", text).rstrip()
        cause = error.__cause__ or error.__context__
        if cause is not None:  # the root cause the pointer meant, in the message instead
            text += f" (cause: {' '.join(str(cause).split()) or type(cause).__name__})"
    return text


def load_subset_delta(unet: torch.nn.Module, path: str | Path) -> dict[str, str]:
    """Load a saved subset delta into a UNet of the same architecture; returns its metadata."""
    path = Path(path)
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata() or {}
    result = unet.load_state_dict(load_file(str(path)), strict=False)
    if result.unexpected_keys:
        raise ChexmemError(
            f"{path} does not fit this UNet: unexpected {result.unexpected_keys[:3]}"
        )
    return metadata


def load_pipeline(
    name_or_path: str | Path,
    pipeline_class: type[StableDiffusionPipeline] = StableDiffusionPipeline,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Any:
    """A ready pipeline from a fine-tune output folder, a pipeline folder or a Hub id."""
    path = Path(name_or_path).expanduser()
    if path.is_dir() and not (path / "model_index.json").is_file():
        if (path / LORA_FILE).is_file():
            pipe = load_pipeline(base_of_fine_tune(path), pipeline_class, device, dtype)
            pipe.load_lora_weights(str(path), weight_name=LORA_FILE)
            return pipe
        if (path / SUBSET_FILE).is_file():
            pipe = load_pipeline(base_of_fine_tune(path), pipeline_class, device, dtype)
            load_subset_delta(pipe.unet, path / SUBSET_FILE)
            if (path / SUBSET_TEXT_ENCODER_FILE).is_file():
                pipe.text_encoder.load_state_dict(load_file(str(path / SUBSET_TEXT_ENCODER_FILE)))
            return pipe
        raise ChexmemError(
            f"{path} is not a model: expected model_index.json, {LORA_FILE} or {SUBSET_FILE}"
        )
    source, local = model_source(name_or_path)
    # float32 is what from_pretrained loads anyway; only other dtypes are passed, under the
    # name every diffusers >= 0.35 takes (0.42 prefers `dtype` and warns about `torch_dtype`)
    precision = {} if dtype == torch.float32 else {"torch_dtype": dtype}
    try:
        pipe = pipeline_class.from_pretrained(
            source,
            **precision,
            safety_checker=None,
            requires_safety_checker=False,
            local_files_only=local,
        )
    except (OSError, ValueError) as error:
        where = "folder" if local else "Hub id (is it spelled right, and are you online?)"
        raise ChexmemError(
            f"cannot load a Stable Diffusion model from {name_or_path!s} ({where}): "
            f"{library_reason(error)}"
        ) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
