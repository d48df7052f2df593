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
    pretrained_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "base model: a diffusers pipeline folder (e.g. from `chexmem model tiny`) "
            "or a Hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5 (required)"
        },
    )
    revision: str | None = field(
        default=None,
        metadata={"help": "Hub revision (branch, tag or commit) of the base model (default: main)"},
    )
    variant: str | None = field(
        default=None,
        metadata={"help": "weight file variant of the base model, e.g. fp16 (default: none)"},
    )
    # data
    train_data_dir: str | None = field(
        default=None,
        metadata={"help": "a dataset folder saved by `chexmem data ...` (or --dataset_name)"},
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "a Hub dataset id, loaded with datasets.load_dataset (or --train_data_dir)"
        },
    )
    dataset_split: str = field(default="train", metadata={"help": "split to train on"})
    image_column: str = field(default="image", metadata={"help": "column holding the images"})
    caption_column: str = field(
        default="prompt", metadata={"help": "column holding the prompts (str or list of str)"}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "train on the first N rows only (default: all)"}
    )
    resolution: int | None = field(
        default=None,
        metadata={
            "help": "training image side in pixels; images are resized (shorter side) and cropped "
            "to a square (default: the base model's native size)"
        },
    )
    center_crop: bool = field(
        default=False, metadata={"help": "crop the centre of each image (no: a random crop)"}
    )
    random_flip: bool = field(
        default=False,
        metadata={
            "help": "flip images left-right with probability 0.5 (puts the heart on the right)"
        },
    )
    cache_latents: bool = field(
        default=False,
        metadata={
            "help": "encode each image with the VAE once before training (centre crop, no flip)"
        },
    )
    # what is trained
    mode: str = field(
        default="full",
        metadata={
            "help": "full: every UNet weight; lora: LoRA adapters (--rank); subset: the UNet "
            "parameters --trainable_params / --trainable_mask / --trainable_preset select"
        },
    )
    train_text_encoder: bool = field(
        default=False,
        metadata={"help": "also train the CLIP text encoder (in --mode lora: adapters on it)"},
    )
    rank: int = field(default=4, metadata={"help": "LoRA rank r of --mode lora"})
    lora_alpha: int | None = field(
        default=None, metadata={"help": "LoRA scaling alpha (default: --rank, i.e. scale 1)"}
    )
    lora_dropout: float = field(
        default=0.0, metadata={"help": "dropout probability inside the LoRA adapters"}
    )
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"],
        metadata={"help": "UNet module names that get LoRA adapters"},
    )
    text_encoder_lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"],
        metadata={"help": "text encoder module names that get LoRA adapters"},
    )
    trainable_params: list[str] = field(
        default_factory=list,
        metadata={
            "help": "--mode subset: regular expressions; UNet parameters whose names match "
            "any (re.search) are trained"
        },
    )
    trainable_mask: str | None = field(
        default=None,
        metadata={
            "help": "a block-mask .json (from `chexmem search`; family lora means --mode lora) "
            "or an element-mask .safetensors of 0/1 tensors (--mode subset)"
        },
    )
    # the names of train.subset.PRESETS, written out so that parsing flags does not import
    # torch (tests/scripts/test_help.py checks that the help lists every preset)
    trainable_preset: str | None = field(
        default=None,
        metadata={
            "help": "a named capacity preset (sets --mode): attention (attn1 and attn2 "
            "weights), cross_attention (attn2 only), bias_norm (biases and norm layers), "
            "lora_r4 (LoRA of rank 4), down / mid / up (every parameter of that UNet path's "
            "transformer blocks)"
        },
    )
    from_search: str | None = field(
        default=None,
        metadata={
            "help": "a `chexmem search` result (front/trial_N.json): trains its family, block "
            "mask, learning rate, rank and base model; another --train_data_dir transfers it"
        },
    )
    conditioning_dropout_prob: float = field(
        default=0.1,
        metadata={
            "help": "share of training prompts replaced by the empty prompt, so the model "
            "learns classifier-free guidance; 0: no CFG, in [0, 1)"
        },
    )
    # training-time mitigation (mitigate.training)
    memorization_filter_threshold: float | None = field(
        default=None,
        metadata={
            "help": "mitigation (Wen et al.): drop samples whose text-conditional noise "
            "magnitude ||eps(x_t, p) - eps(x_t, empty)|| is >= this (calibrate it per model) "
            "(default: no filter)"
        },
    )
    memorization_filter_top_fraction: float | None = field(
        default=None,
        metadata={
            "help": "mitigation: drop this fraction of each micro-batch with the highest noise "
            "magnitude, in (0, 1) (default: no filter)"
        },
    )
    memorization_filter_per_timestep: bool = field(
        default=False,
        metadata={
            "help": "rank the magnitude m_t against its running mean at the same timestep "
            "(m_t varies ~4x with t); the threshold then applies to that ratio"
        },
    )
    caption_augmentation: str | None = field(
        default=None,
        metadata={
            "help": "mitigation (Somepalli et al.): random_caption (replace the caption by as "
            "many random words) or random_word_addition (insert random words) (default: none)"
        },
    )
    caption_augmentation_prob: float = field(
        default=0.1, metadata={"help": "probability that a caption is augmented, in [0, 1]"}
    )
    caption_augmentation_words: int = field(
        default=1, metadata={"help": "words inserted per augmented caption (random_word_addition)"}
    )
    # optimisation
    train_batch_size: int = field(default=16, metadata={"help": "images per batch per process"})
    num_train_epochs: int = field(
        default=100, metadata={"help": "passes over the training data (unless --max_train_steps)"}
    )
    max_train_steps: int | None = field(
        default=None,
        metadata={"help": "optimizer steps in total; overrides --num_train_epochs (default: none)"},
    )
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "batches accumulated into each optimizer step"}
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "recompute UNet activations in backward: less memory"}
    )
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate"})
    scale_lr: bool = field(
        default=False,
        metadata={
            "help": "multiply --learning_rate by batch size x accumulation steps x processes"
        },
    )
    lr_scheduler: str = field(
        default="constant",
        metadata={"help": f"learning-rate schedule (diffusers): {', '.join(LR_SCHEDULERS)}"},
    )
    lr_warmup_steps: int = field(
        default=0, metadata={"help": "optimizer steps of linear learning-rate warm-up"}
    )
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2"})
    adam_weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay"})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon"})
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "clip the gradient L2 norm to this; 0: no clipping"}
    )
    use_8bit_adam: bool = field(
        default=False, metadata={"help": "bitsandbytes' 8-bit AdamW (pip install 'chexmem[gpu]')"}
    )
    allow_tf32: bool = field(
        default=False, metadata={"help": "TF32 matrix multiplies on Ampere+ GPUs (faster)"}
    )
    mixed_precision: str | None = field(
        default=None,
        metadata={"help": "no, fp16 or bf16 (default: accelerate's configuration, else no)"},
    )
    enable_xformers_memory_efficient_attention: bool = field(
        default=False, metadata={"help": "xformers attention (GPU; pip install 'chexmem[gpu]')"}
    )
    dataloader_num_workers: int = field(
        default=0, metadata={"help": "data-loading worker processes; 0: the main process"}
    )
    seed: int = field(
        default=0, metadata={"help": "seed of initialisation, noise, timesteps and data order"}
    )
    # loss and noise
    snr_gamma: float | None = field(
        default=None,
        metadata={"help": "Min-SNR loss weighting gamma, e.g. 5 (default: unweighted MSE)"},
    )
    noise_offset: float = field(
        default=0.0, metadata={"help": "offset-noise scale (a per-channel constant); 0: off"}
    )
    input_perturbation: float = field(
        default=0.0, metadata={"help": "input-perturbation noise scale, e.g. 0.1; 0: off"}
    )
    prediction_type: str | None = field(
        default=None,
        metadata={"help": "epsilon or v_prediction (default: the base model scheduler's)"},
    )
    use_ema: bool = field(
        default=False, metadata={"help": "keep an exponential moving average of the weights"}
    )
    ema_decay: float = field(default=0.9999, metadata={"help": "decay of --use_ema per step"})
    # validation
    validation_prompts: list[str] = field(
        default_factory=list,
        metadata={"help": "prompts sampled during and after training (default: none)"},
    )
    validation_steps: int | None = field(
        default=None,
        metadata={"help": "sample them every N optimizer steps (default: at the end only)"},
    )
    num_validation_images: int = field(default=2, metadata={"help": "images per validation prompt"})
    validation_inference_steps: int = field(
        default=20, metadata={"help": "denoising steps of each validation image"}
    )
    validation_guidance_scale: float | None = field(
        default=None,
        metadata={
            "help": "CFG scale of validation images (default: 7.5 when "
            "--conditioning_dropout_prob > 0, else 1.0)"
        },
    )
    # output, checkpoints, tracking, Hub
    output_dir: str = field(
        default="chexmem-model", metadata={"help": "output folder of the fine-tuned model"}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "start again in an --output_dir that holds a run"}
    )
    checkpointing_steps: int = field(
        default=500,
        metadata={"help": "save a resumable checkpoint every N optimizer steps; 0: never"},
    )
    checkpoints_total_limit: int | None = field(
        default=None, metadata={"help": "keep only the newest N checkpoints (default: all)"}
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={"help": "latest, or a checkpoint folder, to continue a run (default: none)"},
    )
    logging_steps: int = field(
        default=10, metadata={"help": "log loss and learning rate every N optimizer steps"}
    )
    report_to: str = field(
        default="auto",
        metadata={
            "help": "trackers besides logs/metrics.jsonl: auto (TensorBoard if installed), "
            "tensorboard, wandb, all"
        },
    )
    log_sample_ids: bool = field(
        default=False,
        metadata={"help": "log every batch's sample ids to logs/samples_rankN.jsonl"},
    )
    push_to_hub: bool = field(
        default=False, metadata={"help": "upload the result to --hub_model_id (needs HF_TOKEN)"}
    )
    hub_model_id: str | None = field(
        default=None, metadata={"help": "Hub repo id, e.g. you/chexpert-sd15-lora"}
    )
    hub_private: bool = field(
        default=True, metadata={"help": "make the Hub repo private (--no-hub_private: public)"}
    )

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
        if self.max_train_steps is not None and self.max_train_steps < 1:
            raise ChexmemError(
                f"--max_train_steps must be >= 1 (or left out to train --num_train_epochs), "
                f"not {self.max_train_steps}"
            )
        if self.num_train_epochs < 1:
            raise ChexmemError(f"--num_train_epochs must be >= 1, not {self.num_train_epochs}")
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


def field_help(f: dataclasses.Field, default: Any) -> str | None:
    """A field's `metadata["help"]` with its default appended, unless the help states it.

    The help is an argparse help string: a literal percent sign is written `%%`.
    """
    text = f.metadata.get("help")
    if text is None or "(default" in text or default in (None, dataclasses.MISSING):
        return text
    if isinstance(default, list):
        return f"{text} (default: {' '.join(map(str, default)) or 'none'})"
    return f"{text} (default: %(default)s)"


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    """One `--name` flag per TrainConfig field, typed from the annotation, its help from the
    field's `metadata["help"]` (HfArgumentParser's convention)."""
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        help = field_help(f, default)
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        base = (
            args[0]
            if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
            else hint
        )
        if base is bool:
            parser.add_argument(
                f"--{f.name}", action=argparse.BooleanOptionalAction, default=default, help=help
            )
        elif typing.get_origin(base) is list:
            parser.add_argument(
                f"--{f.name}", nargs="*", type=typing.get_args(base)[0], default=default, help=help
            )
        else:
            parser.add_argument(f"--{f.name}", type=base, default=default, help=help)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig the parsed flags describe."""
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
