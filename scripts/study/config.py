"""What a study runs: `StudyConfig`, each field a flag of `chexmem study` / `chexmem demo` and
a key of its YAML config; the defaults are the embedded default (phantom data, tiny model, CPU).

Each field's help (HfArgumentParser's `metadata={"help": ...}` convention) is the flag's help
line; comments keep the reasons behind a default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from detect.registry import DETECTORS
from hf_datasets.errors import ChexmemError
from mitigate.registry import MITIGATIONS, check_settings, parse_method

DATA_SOURCES = ("phantom", "chexpert", "folder")
LAUNCHERS = ("python", "accelerate")
DTYPES = ("float32", "float16", "bfloat16")

# the remedy a calibration warning names in the study: it calibrates on the data's held-out part
MORE_HELD_OUT = (
    "give the study more held-out data: at least 20 held-out prompts (--held_out_prompts) and "
    "enough patients for the validation and test splits (--num_patients, or a larger dataset)"
)


def study_methods() -> tuple[str, ...]:
    """The mitigations a study can compare with none: every registered one."""
    return tuple(name for name in MITIGATIONS if name != "none")


def setting(default: Any, help: str, **extra: Any) -> Any:
    """A StudyConfig field with its flag's help line (a list default is copied per config)."""
    metadata = {"help": help, **extra}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class StudyConfig:
    """The settings of one study (see the module docstring)."""

    name: str = setting("demo", "a name for the study, shown in the report")
    output_dir: str = setting("chexmem-demo", "folder of every job's output and the report")
    seed: int = setting(0, "seed of the data, every fine-tune and every generation")
    # data: the phantom generator, a CheXpert folder, or an image folder with metadata.csv;
    # duplicates are injected in every case (the detector's ground truth)
    data_source: str = setting("phantom", "where the images come from", choices=DATA_SOURCES)
    data_root: str | None = setting(
        None, "CheXpert folder (or its parent) / image folder; needed unless phantom"
    )
    max_rows: int | None = setting(
        None, "CheXpert / folder: use only this many rows (default: all)", type=int
    )
    frontal_only: bool = setting(True, "CheXpert: frontal views only")
    # 150 patients (~220 distinct training images) with 10 images x 15 copies: duplicates fill
    # 41% of training rows. With 60 patients (72%) the unconditional branch learned the
    # duplicates too and the magnitude could no longer tell them apart (docs/benchmarks.md)
    num_patients: int = setting(150, "phantom: number of synthetic patients")
    max_studies_per_patient: int = setting(3, "phantom: at most this many studies per patient")
    resolution: int = setting(64, "image side in pixels (data, tiny model and generations)")
    duplicated_rows: int = setting(10, "training rows whose image is duplicated (ground truth)")
    copies: list[int] = setting(
        [15],
        "copies of each duplicated row in the training split; several counts (e.g. 2 5 10 20) "
        "put duplicated_rows rows at each (a dose-response ground truth)",
    )
    # base model: "tiny" (built offline) or a diffusers pipeline (Hub id or folder)
    base_model: str = setting(
        "tiny", "'tiny' (built offline) or a diffusers pipeline: Hub id or local folder"
    )
    vae_train_steps: int = setting(300, "tiny model: steps that train its VAE")
    # fine-tuning
    max_train_steps: int = setting(1600, "optimizer steps of each first-round fine-tune")
    train_batch_size: int = setting(8, "images per optimizer step and process")
    learning_rate: float = setting(2e-3, "peak learning rate of every fine-tune")
    lr_scheduler: str = setting(
        "cosine", "learning-rate schedule (a diffusers schedule name)"
    )  # annealed to 0: sharper copies than a constant rate
    lr_warmup_steps: int = setting(50, "linear warm-up steps of the learning rate")
    train_text_encoder: bool = setting(
        True, "first-round fine-tunes also train the text encoder"
    )  # the tiny model's starts untrained
    mixed_precision: str = setting(
        "no", "training precision: no, fp16 or bf16", choices=("no", "fp16", "bf16")
    )
    train_flags: list[str] = setting(
        [], "more `chexmem train` flags for every fine-tune, e.g. --gradient_checkpointing"
    )
    # training-time filter (Wen et al.): drop the top fraction of each batch by m_t relative
    # to its timestep's running mean (raw m_t mostly ranks timesteps: docs/benchmarks.md)
    filter_top_fraction: float = setting(
        0.25, "training-time filter: fraction of each batch dropped (0-1, highest magnitude)"
    )
    # capacity control needs a trained base (LoRA on a random UNet learns nothing): the tiny
    # model is first trained on other phantom patients (no duplicates), standing in for SD's
    # pretraining; full / LoRA / subset fine-tunes then start from it (full: the plain recipe,
    # text encoder too; LoRA and subset: their share of the UNet only).
    # pretrain_steps 0: they start from base_model itself (SD is pretrained already)
    pretrain_patients: int = setting(300, "phantom patients (no duplicates) of the pretraining")
    pretrain_steps: int = setting(
        400, "steps pretraining the base of the capacity runs (0: start from base_model)"
    )
    capacity_steps: int = setting(1600, "steps of each capacity-control fine-tune")
    lora_preset: str = setting("lora_r4", "`chexmem train --trainable_preset` of the LoRA run")
    subset_preset: str = setting(
        "attention", "`chexmem train --trainable_preset` of the parameter-subset run"
    )
    finetune_from: str = setting(
        "pretrained",
        "where the detection fine-tunes start: base (base_model itself) or pretrained (the base "
        "first trained pretrain_steps on pretrain_patients other patients, as SD is pretrained)",
    )
    # detection
    detectors: list[str] = setting(
        list(DETECTORS),
        f"memorization detectors scored side by side ({', '.join(DETECTORS)}; default: all; "
        "magnitude always)",
    )
    # 20 + 20 (not 30 + 30) keeps the demo within 20 minutes on 2 cores; 80 generations of
    # ordinary prompts still give FID full-rank covariances of the 64-d features
    ordinary_prompts: int = setting(20, "non-duplicated training prompts the detector scores")
    held_out_prompts: int = setting(20, "held-out (validation, then test) prompts scored, at most")
    generations_per_prompt: int = setting(4, "generations (seeds) per prompt")
    inference_steps: int = setting(20, "DDIM sampling steps of every generation")
    detect_batch_size: int = setting(16, "generations per UNet call in detection")
    inference_dtype: str = setting(
        "float32", "inference precision (float16 / bfloat16 on GPUs)", choices=DTYPES
    )
    heatmap_prompts: int = setting(5, "top-scoring prompts whose trigger tokens the report shows")
    # mitigation: the inference-time methods compared with none (attention_scaling changed
    # nothing on the tiny model at any c tried, so the demo leaves it out: docs/benchmarks.md)
    methods: list[str] = setting(
        ["embedding", "neurons", "trigger_tokens", "random_tokens", "amg"],
        f"inference-time mitigations compared with none ({', '.join(study_methods())})",
    )
    mitigation_prompts: str = setting(
        "flagged",
        "prompts the inference-time methods are scored on: flagged (the training prompts the "
        "detector flags, as a deployed model would) or duplicated (the injected duplicates, "
        "the ground truth: more prompts, as Wen et al. score on known memorized prompts)",
        choices=("flagged", "duplicated"),
    )
    random_tokens: list[int] = setting([4], "random_tokens: tokens added, one variant per count")
    method_settings: list[str] = setting(
        [],
        "settings of the methods above, as method:key=value,... (values read as JSON), e.g. "
        "amg:c3=300 for deep memorization (docs/benchmarks.md)",
    )
    robustness_sigmas: list[float] = setting(
        [0.0, 0.1], "noise scales added to the prompt embedding in the NEMO robustness check"
    )
    # how jobs run
    launcher: str = setting(
        "python", "job processes: python -m ..., or accelerate launch -m ...", choices=LAUNCHERS
    )
    accelerate_config: str | None = setting(None, "accelerate config file for the launcher")
    max_parallel: int = setting(0, "job processes at once (0: one per CPU core)")
    # publishing
    push_to_hub: bool = setting(False, "push the models, dataset and report to the Hub")
    hub_model_id: str | None = setting(
        None, "Hub repo prefix: models go to PREFIX-finetune-cfg, ..."
    )
    hub_private: bool = setting(True, "create the Hub repos private")
    # what to run
    overwrite: bool = setting(False, "rerun every job (as --force all)")
    skip_training: bool = setting(False, "only build the data; train and detect nothing")
    skip_mitigation: bool = setting(False, "stop after detection: no mitigation stage")

    def __post_init__(self) -> None:
        if self.data_source not in DATA_SOURCES:
            raise ChexmemError(f"data_source must be one of {', '.join(DATA_SOURCES)}")
        if self.data_source != "phantom" and not self.data_root:
            raise ChexmemError(f"data_source {self.data_source} needs data_root")
        if self.launcher not in LAUNCHERS:
            raise ChexmemError(f"launcher must be one of {', '.join(LAUNCHERS)}")
        if self.push_to_hub and not self.hub_model_id:
            raise ChexmemError("push_to_hub needs hub_model_id (a prefix, e.g. you/chexmem-study)")
        if self.inference_dtype not in DTYPES:
            raise ChexmemError(f"inference_dtype must be one of {', '.join(DTYPES)}")
        unknown = sorted(set(self.methods) - set(study_methods()))
        if unknown:
            raise ChexmemError(
                f"unknown methods {unknown}; choose from {', '.join(study_methods())}"
            )
        for name, settings in self.settings_of_methods().items():
            if name not in self.methods:
                raise ChexmemError(f"method_settings names {name!r}, which methods leaves out")
            check_settings(name, settings)
        unknown = sorted(set(self.detectors) - set(DETECTORS))
        if unknown:
            raise ChexmemError(f"unknown detectors {unknown}; choose from {', '.join(DETECTORS)}")
        if "magnitude" not in self.detectors:  # its step-1 score flags prompts for mitigation
            raise ChexmemError("detectors must include magnitude (the study flags prompts by it)")
        if self.finetune_from not in ("base", "pretrained"):
            raise ChexmemError(
                f"finetune_from must be base or pretrained, not {self.finetune_from!r}"
            )
        if self.finetune_from == "pretrained" and self.pretrain_steps < 1:
            raise ChexmemError("finetune_from pretrained needs pretrain_steps >= 1")
        if isinstance(self.copies, int):  # `copies: 15` in a YAML file
            self.copies = [self.copies]
        if self.max_parallel < 0:
            raise ChexmemError("max_parallel must be >= 0 (0: one process per CPU core)")

    @property
    def duplicates(self) -> str:
        """The injected duplicates in words."""
        if len(self.copies) == 1:
            return f"{self.duplicated_rows} rows x {self.copies[0]} copies"
        counts = ", ".join(str(c) for c in self.copies)
        return f"{self.duplicated_rows} rows at each of {counts} copies"

    def settings_of_methods(self) -> dict[str, dict[str, Any]]:
        """method_settings by method name (a name given twice: its settings merged)."""
        found: dict[str, dict[str, Any]] = {}
        for spec in self.method_settings:
            _, name, settings = parse_method(spec)
            found.setdefault(name, {}).update(settings)
        return found

    @property
    def out(self) -> Path:
        """The study's folder."""
        return Path(self.output_dir)

    def load(self, model: str | Path) -> Any:
        """A model of the study, ready for inference (on the GPU when there is one)."""
        import torch

        from detect.cli import DTYPES as TORCH_DTYPES
        from detect.models import load_pipeline

        device = "cuda" if torch.cuda.is_available() else "cpu"
        return load_pipeline(model, device=device, dtype=TORCH_DTYPES[self.inference_dtype])

    @property
    def parallel(self) -> int:
        """How many job processes run at once."""
        return self.max_parallel or max(1, os.cpu_count() or 1)
