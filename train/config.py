"""Training options: one dataclass whose field names are the command-line flags.

Names follow diffusers' `train_text_to_image*.py` scripts wherever one exists, so that
`--pretrained_model_name_or_path`, `--resolution`, `--train_batch_size`, ... mean what SD users
expect. A YAML file given with `--config` maps the same names to values.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from hf_datasets.errors import ChexmemError

MODES = ("full", "lora", "subset")
# the names mitigate.training.CAPTION_AUGMENTATIONS defines (kept here so that parsing flags
# does not import torch)
CAPTION_AUGMENTATIONS = ("random_caption", "random_word_addition")
LR_SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
)


@dataclass
class TrainConfig:
    """Every option of `chexmem train` / `accelerate launch -m train`."""

    # model
    pretrained_model_name_or_path: str | None = None
    revision: str | None = None
    variant: str | None = None
    # data
    train_data_dir: str | None = None
    dataset_name: str | None = None
    dataset_split: str = "train"
    image_column: str = "image"
    caption_column: str = "prompt"
    max_train_samples: int | None = None
    resolution: int | None = None
    center_crop: bool = False
    random_flip: bool = False
    cache_latents: bool = False  # encode each image once before training (centre crop, no flip)
    # what is trained
    mode: str = "full"
    train_text_encoder: bool = False
    rank: int = 4
    lora_alpha: int | None = None
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"]
    )
    text_encoder_lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"]
    )
    trainable_params: list[str] = field(default_factory=list)
    trainable_mask: str | None = None
    # a named capacity preset (train.subset.PRESETS): a parameter subset, or LoRA of a rank
    trainable_preset: str | None = None
    # a configuration saved by `chexmem search` (front/trial_N.json): its family, block mask,
    # learning rate, rank and base model; pair it with another --train_data_dir to transfer it
    from_search: str | None = None
    # classifier-free guidance: share of training prompts replaced by the empty prompt
    conditioning_dropout_prob: float = 0.1
    # training-time mitigation (mitigate.training): drop samples whose text-conditional noise
    # magnitude is >= a threshold, or the top fraction of each micro-batch (Wen et al.)
    memorization_filter_threshold: float | None = None
    memorization_filter_top_fraction: float | None = None
    # rank m_t against its running mean at the same timestep (m_t varies ~4x with t)
    memorization_filter_per_timestep: bool = False
    # caption randomisation (Somepalli et al.): random_caption or random_word_addition
    caption_augmentation: str | None = None
    caption_augmentation_prob: float = 0.1
    caption_augmentation_words: int = 1
    # optimisation
    train_batch_size: int = 16
    num_train_epochs: int = 100
    max_train_steps: int | None = None
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    learning_rate: float = 1e-4
    scale_lr: bool = False
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    use_8bit_adam: bool = False
    allow_tf32: bool = False
    mixed_precision: str | None = None
    enable_xformers_memory_efficient_attention: bool = False
    dataloader_num_workers: int = 0
    seed: int = 0
    # loss and noise
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    input_perturbation: float = 0.0
    prediction_type: str | None = None
    use_ema: bool = False
    ema_decay: float = 0.9999
    # validation
    validation_prompts: list[str] = field(default_factory=list)
    validation_steps: int | None = None
    num_validation_images: int = 2
    validation_inference_steps: int = 20
    validation_guidance_scale: float | None = None
    # output, checkpoints, tracking, Hub
    output_dir: str = "chexmem-model"
    overwrite_output_dir: bool = False
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    logging_steps: int = 10
    report_to: str = "auto"
    log_sample_ids: bool = False
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_private: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Reject impossible combinations with one clear message."""
        if self.mode not in MODES:
            raise ChexmemError(f"--mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.from_search:
            self.resolve_search()
        if self.trainable_preset:
            self.resolve_preset()
        if self.trainable_mask:
            self.resolve_mask()
        if self.mode == "subset" and not (
            self.trainable_params or self.trainable_mask or self.trainable_preset
        ):
            raise ChexmemError(
                "--mode subset needs --trainable_params PATTERN..., --trainable_mask FILE "
                "or --trainable_preset NAME"
            )
        if self.mode != "subset" and self.trainable_params:
            raise ChexmemError("--trainable_params needs --mode subset")
        self.validate_mitigation()
        if not 0.0 <= self.conditioning_dropout_prob < 1.0:
            raise ChexmemError("--conditioning_dropout_prob must be in [0, 1)")
        if self.cache_latents and self.random_flip:
            raise ChexmemError(
                "--cache_latents encodes each image once, so it cannot be combined with "
                "--random_flip; drop one of them"
            )
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ChexmemError(f"--lr_scheduler must be one of {', '.join(LR_SCHEDULERS)}")
        if self.mixed_precision not in (None, "no", "fp16", "bf16"):
            raise ChexmemError("--mixed_precision must be no, fp16 or bf16")
        if self.prediction_type not in (None, "epsilon", "v_prediction"):
            raise ChexmemError("--prediction_type must be epsilon or v_prediction")
        if self.train_batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ChexmemError("--train_batch_size and --gradient_accumulation_steps must be >= 1")
        if self.push_to_hub and not self.hub_model_id:
            raise ChexmemError("--push_to_hub needs --hub_model_id (e.g. you/chexpert-sd15-lora)")

    def resolve_preset(self) -> None:
        """Set the mode (and LoRA rank) a --trainable_preset implies; refuse contradictions.

        A preset replaces the default --mode full: a subset preset means --mode subset, a LoRA
        preset means --mode lora with its rank.
        """
        from train.subset import preset

        chosen = preset(self.trainable_preset)
        wanted = "lora" if chosen.lora_rank is not None else "subset"
        if self.mode not in ("full", wanted):
            raise ChexmemError(
                f"--trainable_preset {self.trainable_preset} means --mode {wanted}, "
                f"not --mode {self.mode}"
            )
        if chosen.lora_rank is not None:
            if self.rank not in (chosen.lora_rank, TrainConfig.rank):
                raise ChexmemError(
                    f"--trainable_preset {self.trainable_preset} means --rank "
                    f"{chosen.lora_rank}; drop --rank {self.rank} or the preset"
                )
            self.rank = chosen.lora_rank
        self.mode = wanted

    def read_mask_spec(self, path: str, flag: str) -> dict:
        """A block-mask JSON file (from `chexmem search` or written by hand)."""
        file = Path(path).expanduser()
        if not file.is_file():
            raise ChexmemError(f"{flag} {file} does not exist")
        try:
            spec = json.loads(file.read_text())
        except json.JSONDecodeError as error:
            raise ChexmemError(f"{flag} {file} is not valid JSON: {error}") from None
        if not isinstance(spec, dict) or "block_mask" not in spec:
            raise ChexmemError(f"{flag} {file} has no 'block_mask'")
        return spec

    def resolve_mask(self) -> None:
        """Set the mode (and LoRA rank) a --trainable_mask implies; refuse contradictions.

        A JSON block mask of family "lora" means --mode lora (adapters in the chosen blocks
        only), any other mask --mode subset; the default --mode full gives way to either.
        """
        spec = {}
        if Path(self.trainable_mask).suffix == ".json":
            spec = self.read_mask_spec(self.trainable_mask, "--trainable_mask")
        wanted = "lora" if spec.get("family") == "lora" else "subset"
        if self.mode not in ("full", wanted):
            raise ChexmemError(f"--trainable_mask {self.trainable_mask} means --mode {wanted}")
        self.mode = wanted
        rank = spec.get("rank")
        if wanted == "lora" and rank is not None:
            if self.rank not in (rank, TrainConfig.rank):
                raise ChexmemError(
                    f"--trainable_mask {self.trainable_mask} sets --rank {rank}; drop --rank "
                    f"{self.rank}"
                )
            self.rank = int(rank)

    def resolve_search(self) -> None:
        """Take the mask, learning rate, rank and base model of a `chexmem search` result."""
        spec = self.read_mask_spec(self.from_search, "--from_search")
        if self.trainable_mask or self.trainable_params or self.trainable_preset:
            raise ChexmemError(
                "--from_search sets what is trained; drop --trainable_mask / "
                "--trainable_params / --trainable_preset"
            )
        self.trainable_mask = self.from_search
        if self.pretrained_model_name_or_path is None:
            self.pretrained_model_name_or_path = spec.get("base_model")
        if self.learning_rate == TrainConfig.learning_rate and "learning_rate" in spec:
            self.learning_rate = float(spec["learning_rate"])

    def validate_mitigation(self) -> None:
        """The memorization filter and caption augmentation options."""
        threshold = self.memorization_filter_threshold
        fraction = self.memorization_filter_top_fraction
        if threshold is not None and fraction is not None:
            raise ChexmemError(
                "give --memorization_filter_threshold or --memorization_filter_top_fraction, "
                "not both"
            )
        if threshold is not None and not threshold >= 0:
            raise ChexmemError("--memorization_filter_threshold must be >= 0")
        if fraction is not None and not 0 < fraction < 1:
            raise ChexmemError("--memorization_filter_top_fraction must be in (0, 1)")
        if self.memorization_filter_per_timestep and not self.memorization_filter:
            raise ChexmemError(
                "--memorization_filter_per_timestep needs --memorization_filter_threshold or "
                "--memorization_filter_top_fraction"
            )
        if self.caption_augmentation not in (None, *CAPTION_AUGMENTATIONS):
            raise ChexmemError(
                "--caption_augmentation must be one of "
                f"{', '.join(CAPTION_AUGMENTATIONS)}, not {self.caption_augmentation!r}"
            )
        if not 0.0 <= self.caption_augmentation_prob <= 1.0:
            raise ChexmemError("--caption_augmentation_prob must be in [0, 1]")
        if self.caption_augmentation_words < 1:
            raise ChexmemError("--caption_augmentation_words must be >= 1")

    @property
    def memorization_filter(self) -> bool:
        """Whether the run drops high-magnitude samples."""
        return (
            self.memorization_filter_threshold is not None
            or self.memorization_filter_top_fraction is not None
        )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a mapping (a YAML file); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ChexmemError(f"unknown training option(s): {', '.join(unknown)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping (for trackers, model cards and the saved run config)."""
        return dataclasses.asdict(self)


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    """One `--name` flag per TrainConfig field, typed from the annotation."""
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        base = (
            args[0]
            if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
            else hint
        )
        if base is bool:
            parser.add_argument(
                f"--{f.name}", action=argparse.BooleanOptionalAction, default=default
            )
        elif typing.get_origin(base) is list:
            parser.add_argument(
                f"--{f.name}", nargs="*", type=typing.get_args(base)[0], default=default
            )
        else:
            parser.add_argument(f"--{f.name}", type=base, default=default)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig the parsed flags describe."""
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
