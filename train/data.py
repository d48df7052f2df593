"""Training data: a chexmem / Hub / image-folder dataset as normalised tensors and token ids.

The trainer reads rows through `TrainRows`: images are decoded (or their cached latents
read) and captions tokenized on every access, so caption augmentation is fresh each epoch.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
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
from mitigate.training import CaptionAugment, vocabulary_words
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
    """Turns training rows into pixel values, token ids and bookkeeping fields.

    A class, not a closure: DataLoader workers pickle it. With ``pixels=False`` images are not
    decoded (their latents come from the cache). With ``--caption_augmentation`` each caption
    is randomised by `mitigate.training.CaptionAugment` from (seed, epoch, row index): the
    rows' indices must be given (`TrainRows` does) and the trainer sets the epoch.
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
        self.augment = caption_augment(config, tokenizer)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch caption augmentation draws for (each epoch sees fresh captions)."""
        self.epoch = epoch

    def __call__(
        self, batch: dict[str, list[Any]], rows: Sequence[int] | None = None
    ) -> dict[str, Any]:
        """Pixel values, token ids, the captions used, `copies`, and an index-independent id.

        The id (`sample_id`) is the row's `source_path`, else its original caption, so that
        the copies of a duplicated image share it.
        """
        captions = [
            c if isinstance(c, str) else random.choice(c) for c in batch[self.caption_column]
        ]
        sample_ids = batch.get("source_path") or captions
        used = captions
        if self.augment is not None:
            if rows is None:
                raise ChexmemError("caption augmentation needs the rows' indices (use TrainRows)")
            used = [
                self.augment(c, int(r), self.epoch) for c, r in zip(captions, rows, strict=True)
            ]
        copies = batch.get("copies") or [1] * len(captions)
        out: dict[str, Any] = {
            "input_ids": list(tokenize(self.tokenizer, used)),
            "sample_id": list(sample_ids),
            "caption": used,
            "copies": [int(c) for c in copies],
        }
        if self.pixels:
            out["pixel_values"] = [
                image_to_tensor(img, self.resolution, self.center_crop, self.random_flip)
                for img in batch[self.image_column]
            ]
        return out


def caption_augment(config: TrainConfig, tokenizer: CLIPTokenizer) -> CaptionAugment | None:
    """The caption randomisation `--caption_augmentation` asks for (None: captions as given)."""
    if not config.caption_augmentation:
        return None
    return CaptionAugment(
        config.caption_augmentation,
        vocabulary_words(tokenizer),
        prob=config.caption_augmentation_prob,
        num_words=config.caption_augmentation_words,
        seed=config.seed,
    )


class TrainRows(torch.utils.data.Dataset):
    """Training rows by index, through a `TrainTransform` that learns each row's index.

    `set_epoch` passes the epoch on to the transform (the trainer calls it before each epoch).
    With `moments` (``--cache_latents``) each row carries the VAE posterior's parameters (mean
    and log-variance, as `DiagonalGaussianDistribution` takes them) instead of pixels; the
    training step draws a fresh latent from them, exactly as encoding the image again would.
    Every item has `row_index`, the row's position in the training set.
    """

    def __init__(
        self, rows: Dataset, transform: TrainTransform, moments: torch.Tensor | None = None
    ) -> None:
        self.rows = rows
        self.transform = transform
        self.moments = moments

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        """Tell the transform which epoch is running."""
        self.transform.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict[str, Any]:
        out = self.transform(self.rows[index : index + 1], rows=[index])
        item = {key: values[0] for key, values in out.items()}
        item["row_index"] = int(index)
        if self.moments is not None:
            item["latent_moments"] = self.moments[index]
        return item


def train_rows(
    dataset: Dataset, tokenizer: CLIPTokenizer, config: TrainConfig, resolution: int
) -> TrainRows:
    """The training rows, decoded and transformed on access (images are read every step)."""
    return TrainRows(dataset, TrainTransform(tokenizer, config, resolution))


@torch.no_grad()
def cache_latents(
    dataset: Dataset,
    tokenizer: CLIPTokenizer,
    config: TrainConfig,
    resolution: int,
    vae: torch.nn.Module,
    batch_size: int = 32,
    progress: bool = True,
) -> TrainRows:
    """Encode every training image once (centre crop, no flip) into `TrainRows` with moments.

    The cached rows keep only the caption, `source_path` and `copies` columns, so images are
    not decoded again during training; captions are still tokenized (and augmented) per step.
    """
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
    kept = [
        c
        for c in dict.fromkeys([config.caption_column, "source_path", "copies"])
        if c in dataset.column_names
    ]
    transform = TrainTransform(tokenizer, config, resolution, pixels=False)
    return TrainRows(dataset.select_columns(kept), transform, torch.cat(moments))


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
    """Stack one batch (pixels, or cached latent moments) and its bookkeeping fields."""
    images = "latent_moments" if "latent_moments" in examples[0] else "pixel_values"
    batch = {
        images: torch.stack([e[images] for e in examples]).contiguous(),
        "input_ids": torch.stack([e["input_ids"] for e in examples]),
        "sample_id": [e["sample_id"] for e in examples],
    }
    for key in ("row_index", "copies"):
        if key in examples[0]:
            batch[key] = torch.tensor([e[key] for e in examples], dtype=torch.long)
    if "caption" in examples[0]:
        batch["caption"] = [e["caption"] for e in examples]
    return batch


def check_batch_size(batch_size: int, rows: int) -> None:
    """A batch (per process) cannot hold more images than the training split has."""
    if batch_size > rows:
        raise ChexmemError(
            f"--train_batch_size {batch_size} is larger than the {rows} training rows; "
            f"give --train_batch_size {rows} or less (with --gradient_accumulation_steps for "
            "a larger effective batch)"
        )


def check_resolution(resolution: int, multiple: int) -> None:
    """The resolution must divide into the VAE's and the UNet's downsampling steps."""
    if resolution <= 0 or resolution % multiple:
        raise ChexmemError(
            f"--resolution {resolution} must be a positive multiple of {multiple} for this model "
            "(VAE factor x UNet downsampling)"
        )
