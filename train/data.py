"""Training data: a chexmem / Hub / image-folder dataset as normalised tensors and token ids."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, load_dataset
from PIL import Image
from transformers import CLIPTokenizer

from hf_datasets.errors import ChexmemError
from hf_datasets.images import resize_shorter_side, to_grayscale
from hf_datasets.storage import load_dataset_dir
from train.config import TrainConfig


def load_train_dataset(config: TrainConfig) -> Dataset:
    """The training split named by --train_data_dir or --dataset_name, columns checked."""
    if config.train_data_dir:
        path = Path(config.train_data_dir).expanduser()
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            splits = load_dataset_dir(path)
        elif path.is_dir():
            splits = load_dataset("imagefolder", data_dir=str(path))
        else:
            raise ChexmemError(f"--train_data_dir {path} does not exist")
    elif config.dataset_name:
        try:
            splits = load_dataset(config.dataset_name)
        except Exception as error:  # datasets raises many types for a bad name or no network
            raise ChexmemError(
                f"cannot load dataset {config.dataset_name!r}: {error}".splitlines()[0]
            ) from None
    else:
        raise ChexmemError("give the training data with --train_data_dir DIR or --dataset_name ID")
    if config.dataset_split not in splits:
        raise ChexmemError(
            f"no split {config.dataset_split!r}; the dataset has {', '.join(splits)}"
        )
    dataset = splits[config.dataset_split]
    missing = [
        c for c in (config.image_column, config.caption_column) if c not in dataset.column_names
    ]
    if missing:
        raise ChexmemError(
            f"the dataset lacks column(s) {', '.join(missing)} "
            "(--image_column / --caption_column); "
            f"it has: {', '.join(dataset.column_names)}"
        )
    if config.max_train_samples is not None:
        n = min(config.max_train_samples, len(dataset))
        dataset = dataset.shuffle(seed=config.seed).select(range(n))
    return dataset


def image_to_tensor(
    image: Image.Image, resolution: int, center_crop: bool, random_flip: bool
) -> torch.Tensor:
    """(3, R, R) float tensor in [-1, 1]: grayscale replicated, resized, cropped, maybe flipped."""
    image = resize_shorter_side(to_grayscale(image), resolution)
    width, height = image.size
    if center_crop:
        left, top = (width - resolution) // 2, (height - resolution) // 2
    else:
        left = random.randint(0, width - resolution)
        top = random.randint(0, height - resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    if random_flip and random.random() < 0.5:
        array = array[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(array)).unsqueeze(0).expand(3, -1, -1).contiguous()


class TrainTransform:
    """Batch transform for `Dataset.with_transform` (a class: DataLoader workers pickle it).

    With ``pixels=False`` images are not decoded (their latents come from a `LatentCache`).
    """

    def __init__(
        self, tokenizer: CLIPTokenizer, config: TrainConfig, resolution: int, pixels: bool = True
    ) -> None:
        self.tokenizer = tokenizer
        self.resolution = resolution
        self.center_crop = config.center_crop
        self.random_flip = config.random_flip
        self.image_column = config.image_column
        self.caption_column = config.caption_column
        self.pixels = pixels

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, Any]:
        """Pixel values, token ids, and the row's index-independent id for logging."""
        captions = [
            c if isinstance(c, str) else random.choice(c) for c in batch[self.caption_column]
        ]
        ids = tokenize(self.tokenizer, captions)
        sample_ids = batch.get("source_path") or captions
        out: dict[str, Any] = {"input_ids": list(ids), "sample_id": list(sample_ids)}
        if self.pixels:
            out["pixel_values"] = [
                image_to_tensor(img, self.resolution, self.center_crop, self.random_flip)
                for img in batch[self.image_column]
            ]
        return out


class LatentCache(torch.utils.data.Dataset):
    """Training rows whose images were encoded once (``--cache_latents``).

    Each row carries the VAE posterior's parameters (mean and log-variance, as
    `DiagonalGaussianDistribution` takes them) instead of pixels; the training step draws a
    fresh latent from them, exactly as encoding the image again would.
    """

    def __init__(self, rows: Dataset, moments: torch.Tensor) -> None:
        self.rows = rows
        self.moments = moments

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.rows[index], "latent_moments": self.moments[index]}


@torch.no_grad()
def cache_latents(
    dataset: Dataset,
    tokenizer: CLIPTokenizer,
    config: TrainConfig,
    resolution: int,
    vae: torch.nn.Module,
    batch_size: int = 32,
    progress: bool = True,
) -> LatentCache:
    """Encode every training image once (centre crop, no flip) into a `LatentCache` on CPU."""
    from tqdm.auto import tqdm

    encode = dataset.select_columns([config.image_column])
    device, dtype = vae.device, vae.dtype
    moments = []
    for start in tqdm(
        range(0, len(dataset), batch_size), desc="caching latents", disable=not progress
    ):
        images = encode[start : start + batch_size][config.image_column]
        pixels = torch.stack([image_to_tensor(im, resolution, True, False) for im in images])
        posterior = vae.encode(pixels.to(device, dtype)).latent_dist
        moments.append(posterior.parameters.float().cpu())
    rows = dataset.with_transform(TrainTransform(tokenizer, config, resolution, pixels=False))
    return LatentCache(rows, torch.cat(moments))


def tokenize(tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids padded / truncated to the tokenizer's length (77 for SD)."""
    return tokenizer(
        captions,
        max_length=tokenizer.model_max_length,
        padding="max_length",
        truncation=True,
        return_tensors="pt",
    ).input_ids


def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack one batch (pixels, or cached latent moments)."""
    images = "latent_moments" if "latent_moments" in examples[0] else "pixel_values"
    return {
        images: torch.stack([e[images] for e in examples]).contiguous(),
        "input_ids": torch.stack([e["input_ids"] for e in examples]),
        "sample_id": [e["sample_id"] for e in examples],
    }


def check_resolution(resolution: int, multiple: int) -> None:
    """The resolution must divide into the VAE's and the UNet's downsampling steps."""
    if resolution <= 0 or resolution % multiple:
        raise ChexmemError(
            f"--resolution {resolution} must be a positive multiple of {multiple} for this model "
            "(VAE factor x UNet downsampling)"
        )
