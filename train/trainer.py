"""The fine-tuning loop: plain PyTorch under one `Accelerator`, readable top to bottom.

`train(config)` runs: accelerator -> model parts -> what is trained -> data -> optimizer and
schedule -> (resume) -> loop (loss, backward, clip, step; log, checkpoint, validate) -> save.
A `sample_weighter` can weight or drop samples per step (training-time mitigation plugs in
here) without touching the loop; `--memorization_filter_*` builds `mitigate.training`'s
`MagnitudeFilter` as one. A step whose samples were all dropped changes no weight: its loss is
0 and the optimizer step is skipped (so neither weight decay nor Adam momentum moves them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, gather_object, set_seed
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, cast_training_params, compute_snr
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from detect.models import SUBSET_TEXT_ENCODER_FILE
from hf_datasets.errors import ChexmemError
from hf_datasets.show import contact_sheet
from mitigate.training import DropCounts, MagnitudeFilter
from train.checkpoint import (
    list_checkpoints,
    prune_checkpoints,
    read_state,
    remove_stale,
    resolve_resume,
    save_checkpoint,
    set_aside,
)
from train.config import TrainConfig
from train.data import (
    cache_latents,
    check_batch_size,
    check_resolution,
    collate,
    load_train_dataset,
    tokenize,
    train_rows,
)
from train.lora import add_lora, save_lora
from train.models import Components, load_components
from train.subset import Subset, apply_subset, param_groups, save_subset, select_subset
from train.tracking import trackers

logger = logging.getLogger(__name__)
TRAINABLE_FILE = "trainable.safetensors"
EMA_FILE = "ema.safetensors"
RUN_FILE = "chexmem_train.json"
SAMPLE_DROPS_FILE = "samples_dropped.json"  # under logs/: per image, [seen, dropped]


@dataclass
class StepInputs:
    """What a sample weighter sees at one training step (tensors are per sample, batch first)."""

    unet: torch.nn.Module
    noisy_latents: torch.Tensor
    timesteps: torch.Tensor
    noise: torch.Tensor
    encoder_hidden_states: torch.Tensor
    empty_hidden_states: torch.Tensor  # (1, tokens, dim): the empty prompt's encoder states
    conditioning_dropped: torch.Tensor  # (B,) bool: prompt replaced by the empty one (CFG)
    model_pred: torch.Tensor
    target: torch.Tensor
    per_sample_loss: torch.Tensor
    batch: dict[str, Any]
    global_step: int


SampleWeighter = Callable[[StepInputs], torch.Tensor]


@dataclass
class Trainable:
    """The modules being trained, their parameter groups, and what the subset mode chose."""

    modules: list[torch.nn.Module]
    groups: list[dict[str, Any]]
    subset: Subset | None = None

    @property
    def params(self) -> list[torch.nn.Parameter]:
        """Every trained parameter (a list, so it can be iterated twice)."""
        return [p for g in self.groups for p in g["params"]]


@dataclass
class TrainResult:
    """What a finished run produced."""

    output_dir: Path
    global_step: int
    final_loss: float
    trainable_params: int
    total_params: int
    seconds: float
    files: list[str] = field(default_factory=list)
    samples_seen: int = 0  # by the sample weighter (0 without one), all processes
    samples_dropped: int = 0  # given weight 0 by the sample weighter, all processes

    @property
    def trainable_share(self) -> float:
        """Trained parameters as a share of UNet + text encoder parameters."""
        return self.trainable_params / max(1, self.total_params)


def make_accelerator(config: TrainConfig) -> Accelerator:
    """The one Accelerator; mixed precision comes from here and nowhere else."""
    output_dir = Path(config.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / "logs")
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
    )
    accelerator.log_with = trackers(config.report_to, output_dir / "logs")
    return accelerator


def prepare_output_dir(config: TrainConfig, accelerator: Accelerator) -> Path:
    """Refuse to silently mix runs: an existing result needs --overwrite_output_dir or a resume."""
    out = Path(config.output_dir)
    finished = (out / RUN_FILE).exists()
    checkpoints = list_checkpoints(out)
    if (
        not config.resume_from_checkpoint
        and (finished or checkpoints)
        and not config.overwrite_output_dir
    ):
        raise ChexmemError(
            f"{out} already holds a training run; pass --resume_from_checkpoint latest to continue "
            "it or --overwrite_output_dir to start again"
        )
    if accelerator.is_main_process:
        if config.overwrite_output_dir and out.is_symlink():
            out.unlink()  # a link to another run (a study's reused fine-tune): never touch that
        if config.overwrite_output_dir and not config.resume_from_checkpoint and out.exists():
            for old in [*out.glob("checkpoint-*"), out / "logs", out / "validation"]:
                shutil.rmtree(old, ignore_errors=True)
            (out / RUN_FILE).unlink(missing_ok=True)
        remove_stale(out)  # a killed run's half-written checkpoint
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    return out


def setup_trainable(parts: Components, config: TrainConfig) -> Trainable:
    """Freeze what is not trained; attach LoRA or choose the subset; build optimizer groups."""
    parts.vae.requires_grad_(False)
    decay = config.adam_weight_decay
    if config.mode == "lora":
        add_lora(parts.unet, parts.text_encoder, config)
        modules = [parts.unet] + ([parts.text_encoder] if config.train_text_encoder else [])
        params = [p for m in modules for p in m.parameters() if p.requires_grad]
        return Trainable(modules, [{"params": params, "weight_decay": decay}])
    if config.mode == "subset":
        # the subset selects UNet parameters; with --train_text_encoder the encoder trains whole
        parts.text_encoder.requires_grad_(config.train_text_encoder)
        subset = select_subset(
            parts.unet, config.trainable_params, config.trainable_mask, config.trainable_preset
        )
        apply_subset(parts.unet, subset)
        groups = param_groups(parts.unet, subset, decay)
        modules = [parts.unet]
        if config.train_text_encoder:
            modules.append(parts.text_encoder)
            groups.append({"params": list(parts.text_encoder.parameters()), "weight_decay": decay})
        return Trainable(modules, groups, subset)
    parts.unet.requires_grad_(True)
    parts.text_encoder.requires_grad_(config.train_text_encoder)
    modules = [parts.unet] + ([parts.text_encoder] if config.train_text_encoder else [])
    params = [p for m in modules for p in m.parameters()]
    return Trainable(modules, [{"params": params, "weight_decay": decay}])


def make_optimizer(
    groups: list[dict[str, Any]], config: TrainConfig, lr: float
) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW with --use_8bit_adam."""
    kwargs = {"lr": lr, "betas": (config.adam_beta1, config.adam_beta2), "eps": config.adam_epsilon}
    if config.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ChexmemError(
                "--use_8bit_adam needs bitsandbytes: pip install 'chexmem[gpu]'"
            ) from None
        return bnb.optim.AdamW8bit(groups, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def weight_dtype_of(accelerator: Accelerator) -> torch.dtype:
    """The dtype frozen weights are kept in under the accelerator's mixed precision."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32
    )


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters of a module that require grad, by name (what checkpoints store)."""
    return {n: p.detach().contiguous() for n, p in module.named_parameters() if p.requires_grad}


def register_checkpoint_hooks(accelerator: Accelerator, ema: EMAModel | None) -> None:
    """Checkpoints hold only trained parameters (+EMA), as safetensors, instead of whole models."""

    def save_hook(models: list[torch.nn.Module], weights: list[Any], output_dir: str) -> None:
        if accelerator.is_main_process:
            for index, model in enumerate(models):
                save_file(
                    trainable_state(accelerator.unwrap_model(model)),
                    f"{output_dir}/{index}_{TRAINABLE_FILE}",
                )
            if ema is not None:
                save_file(
                    {str(i): p.contiguous() for i, p in enumerate(ema.shadow_params)},
                    f"{output_dir}/{EMA_FILE}",
                )
                (Path(output_dir) / "ema.json").write_text(
                    json.dumps({"optimization_step": ema.optimization_step})
                )
        while weights:
            weights.pop()

    def load_hook(models: list[torch.nn.Module], input_dir: str) -> None:
        for index in range(len(models)):
            model = accelerator.unwrap_model(models.pop(0))
            state = load_file(f"{input_dir}/{index}_{TRAINABLE_FILE}")
            missing = set(trainable_state(model)) - set(state)
            if missing:
                raise ChexmemError(
                    f"{input_dir} does not match this run (missing {sorted(missing)[:3]})"
                )
            model.load_state_dict(state, strict=False)
        if ema is not None:
            shadow = load_file(f"{input_dir}/{EMA_FILE}")
            for i, p in enumerate(ema.shadow_params):
                p.copy_(shadow[str(i)])
            ema.optimization_step = json.loads((Path(input_dir) / "ema.json").read_text())[
                "optimization_step"
            ]

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def training_step(
    parts: Components,
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module,
    batch: dict[str, Any],
    empty_ids: torch.Tensor,
    config: TrainConfig,
    weight_dtype: torch.dtype,
    sample_weighter: SampleWeighter | None,
    global_step: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The diffusion loss of one micro-batch, and the sample weights used (None: unweighted).

    With weights w the loss is sum(w * loss_i) / sum(w): 0 (and a zero gradient) when every
    weight is 0.
    """
    with torch.no_grad():
        if "latent_moments" in batch:  # --cache_latents: the posterior was computed once
            posterior = DiagonalGaussianDistribution(batch["latent_moments"].to(weight_dtype))
        else:
            posterior = parts.vae.encode(batch["pixel_values"].to(dtype=weight_dtype)).latent_dist
        latents = posterior.sample() * parts.vae.config.scaling_factor
    noise = torch.randn_like(latents)
    if config.noise_offset:
        noise += config.noise_offset * torch.randn(
            latents.shape[0], latents.shape[1], 1, 1, device=latents.device
        )
    bsz = latents.shape[0]
    scheduler = parts.noise_scheduler
    timesteps = torch.randint(
        0, scheduler.config.num_train_timesteps, (bsz,), device=latents.device
    ).long()
    applied = (
        noise + config.input_perturbation * torch.randn_like(noise)
        if config.input_perturbation
        else noise
    )
    noisy_latents = scheduler.add_noise(latents, applied, timesteps)

    input_ids = batch["input_ids"]
    drop = torch.zeros(bsz, dtype=torch.bool, device=input_ids.device)
    if config.conditioning_dropout_prob > 0:
        drop = torch.rand(bsz, device=input_ids.device) < config.conditioning_dropout_prob
        input_ids = torch.where(drop[:, None], empty_ids.to(input_ids.device), input_ids)
    with torch.set_grad_enabled(config.train_text_encoder):
        encoder_hidden_states = text_encoder(input_ids, return_dict=False)[0]

    if scheduler.config.prediction_type == "epsilon":
        target = noise
    elif scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ChexmemError(f"unsupported prediction type {scheduler.config.prediction_type}")
    model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
    per_sample = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(
        dim=(1, 2, 3)
    )
    if config.snr_gamma is not None:
        snr = compute_snr(scheduler, timesteps)
        weights = torch.clamp(snr, max=config.snr_gamma)
        per_sample = per_sample * (
            weights / snr if scheduler.config.prediction_type == "epsilon" else weights / (snr + 1)
        )

    if sample_weighter is None:
        return per_sample.mean(), None
    with torch.no_grad():
        empty_states = text_encoder(empty_ids.to(input_ids.device), return_dict=False)[0]
    sample_weights = sample_weighter(
        StepInputs(
            unet=unet,
            noisy_latents=noisy_latents,
            timesteps=timesteps,
            noise=noise,
            encoder_hidden_states=encoder_hidden_states,
            empty_hidden_states=empty_states,
            conditioning_dropped=drop,
            model_pred=model_pred,
            target=target,
            per_sample_loss=per_sample.detach(),
            batch=batch,
            global_step=global_step,
        )
    ).to(per_sample)
    loss = (per_sample * sample_weights).sum() / sample_weights.sum().clamp_min(1e-8)
    return loss, sample_weights.detach()


def validation_images(
    parts: Components,
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module,
    config: TrainConfig,
    resolution: int,
) -> list[Any]:
    """Images for the validation prompts (fixed seeds) from the current weights."""
    pipeline = StableDiffusionPipeline(
        vae=parts.vae,
        text_encoder=text_encoder,
        tokenizer=parts.tokenizer,
        unet=unet,
        scheduler=DDIMScheduler.from_config(parts.noise_scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    guidance = config.validation_guidance_scale
    if guidance is None:
        guidance = 7.5 if config.conditioning_dropout_prob > 0 else 1.0
    images = []
    for i, prompt in enumerate(config.validation_prompts):
        generator = torch.Generator(device="cpu").manual_seed(config.seed + i)
        images += pipeline(
            prompt,
            num_images_per_prompt=config.num_validation_images,
            num_inference_steps=config.validation_inference_steps,
            guidance_scale=guidance,
            height=resolution,
            width=resolution,
            generator=generator,
        ).images
    return images


def run_validation(
    accelerator: Accelerator,
    parts: Components,
    trainable: Trainable,
    ema: EMAModel | None,
    config: TrainConfig,
    resolution: int,
    step: int,
) -> None:
    """Write validation images for this step to output_dir/validation (main process)."""
    if not config.validation_prompts:
        return
    if accelerator.is_main_process:
        unet = accelerator.unwrap_model(parts.unet)
        text_encoder = accelerator.unwrap_model(parts.text_encoder)
        if ema is not None:
            ema.store(trainable.params)
            ema.copy_to(trainable.params)
        images = validation_images(parts, unet, text_encoder, config, resolution)
        if ema is not None:
            ema.restore(trainable.params)
        captions = [
            p for p in config.validation_prompts for _ in range(config.num_validation_images)
        ]
        folder = Path(config.output_dir) / "validation"
        folder.mkdir(exist_ok=True)
        sheet = contact_sheet(
            images, captions, tile=max(128, resolution), columns=config.num_validation_images
        )
        sheet.save(folder / f"step-{step}.png")
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_images(
                    "validation",
                    np.stack([np.asarray(i) for i in images]),
                    step,
                    dataformats="NHWC",
                )
    accelerator.wait_for_everyone()


def weights_fingerprint(params: list[torch.nn.Parameter]) -> str:
    """SHA-256 of the trained weights (to check that every process ends with the same model)."""
    digest = hashlib.sha256()
    for p in params:
        digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def run_sample_weighter(
    config: TrainConfig, sample_weighter: SampleWeighter | None
) -> SampleWeighter | None:
    """The caller's sample weighter, or the MagnitudeFilter --memorization_filter_* asks for."""
    if not config.memorization_filter:
        return sample_weighter
    if sample_weighter is not None:
        raise ChexmemError(
            "--memorization_filter_threshold / --memorization_filter_top_fraction build their "
            "own sample weighter: give those options or a sample_weighter to train(), not both"
        )
    return MagnitudeFilter(
        threshold=config.memorization_filter_threshold,
        top_fraction=config.memorization_filter_top_fraction,
        per_timestep=config.memorization_filter_per_timestep,
    )


def describe_weighter(sample_weighter: SampleWeighter) -> dict[str, Any]:
    """A weighter's name and settings for the run file."""
    describe = getattr(sample_weighter, "describe", None)
    if callable(describe):
        return describe()
    return {"method": getattr(sample_weighter, "__name__", type(sample_weighter).__name__)}


def micro_batch_stats(weights: torch.Tensor, sample_weighter: SampleWeighter) -> torch.Tensor:
    """[dropped, kept, sum of m_t, number of m_t, max m_t] of one micro-batch.

    The magnitudes are the MagnitudeFilter's, over samples whose conditioning was kept
    (zeros for any other weighter).
    """
    zero = weights == 0
    stats = [float(zero.sum()), float((~zero).sum()), 0.0, 0.0, 0.0]
    if isinstance(sample_weighter, MagnitudeFilter):
        kept = [
            m
            for m, c in zip(
                sample_weighter.last_magnitudes, sample_weighter.last_conditioned, strict=True
            )
            if c
        ]
        stats[2:] = [sum(kept), float(len(kept)), max(kept, default=0.0)]
    return torch.tensor([stats], device=weights.device)


def run_drop_counts(resumed: DropCounts, local: DropCounts) -> DropCounts:
    """The whole run's drop counts: those before a resume plus every process's (collective)."""
    merged = resumed
    for state in gather_object([local.to_state()]):
        merged = merged.merge(DropCounts.from_state(state))
    return merged


def apply_learning_rate(optimizer: Any, lr_scheduler: Any, lr: float) -> float | None:
    """After `load_state`: train on at `lr` (--learning_rate now), not the checkpoint's rate.

    The checkpoint's optimizer and schedule state carry its base rate; at the same step the
    schedule's factor stays. Returns the replaced rate, or None when it was the same."""
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # a LambdaLR (diffusers)
    old = scheduler.base_lrs[0]
    if all(base == lr for base in scheduler.base_lrs):
        return None
    scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["initial_lr"], group["lr"] = lr, lr * factor(scheduler.last_epoch)
    return old


def diverged(
    accelerator: Accelerator,
    what: str,
    output_dir: Path,
    last_good: Path | None,
    unconfirmed: Path | None,
) -> ChexmemError:
    """The one-line error a non-finite loss or weights end the run with.

    `unconfirmed` (the checkpoint whose weights gave it, when this run's output_dir holds
    it) is set aside, so that `latest` and the message name the last good one instead."""
    aside = ""
    if unconfirmed is not None and unconfirmed.resolve().parent == output_dir.resolve():
        if accelerator.is_main_process and unconfirmed.exists():
            aside = f" (with the weights of {unconfirmed.name}, now {set_aside(unconfirmed).name})"
        accelerator.wait_for_everyone()
    where = (
        f"the last good checkpoint is {last_good}; resume from it with "
        f"--resume_from_checkpoint {last_good} and a lower --learning_rate"
        if last_good is not None
        else "no good checkpoint was written; lower --learning_rate"
    )
    return ChexmemError(
        f"{what}{aside}; {where}, use --mixed_precision bf16 instead of fp16, or check the data"
    )


def train(config: TrainConfig, sample_weighter: SampleWeighter | None = None) -> TrainResult:
    """Fine-tune a Stable Diffusion model as `config` says; returns where the result went.

    Under torchrun / accelerate launch the process group stays up for the caller (the CLI
    ends it with `hf_datasets.cliutils.leave_process_group`)."""
    start = time.perf_counter()
    sample_weighter = run_sample_weighter(config, sample_weighter)
    accelerator = make_accelerator(config)
    logging.getLogger("chexmem").info(accelerator.state)
    set_seed(config.seed, device_specific=True)

    # model and data are checked before output_dir is touched: a bad flag writes nothing
    parts = load_components(config.pretrained_model_name_or_path, config.revision, config.variant)
    if config.prediction_type:
        parts.noise_scheduler.register_to_config(prediction_type=config.prediction_type)
    resolution = config.resolution or parts.default_resolution
    check_resolution(
        resolution, parts.vae_scale_factor * 2 ** (len(parts.unet.config.block_out_channels) - 1)
    )
    dataset = load_train_dataset(config)
    check_batch_size(config.train_batch_size, len(dataset))
    output_dir = prepare_output_dir(config, accelerator)
    weight_dtype = weight_dtype_of(accelerator)
    trainable = setup_trainable(parts, config)
    frozen_dtype = {} if weight_dtype == torch.float32 else {"dtype": weight_dtype}
    parts.vae.to(accelerator.device, **frozen_dtype)
    parts.text_encoder.to(accelerator.device, **({} if config.train_text_encoder else frozen_dtype))
    parts.unet.to(accelerator.device, **({} if config.mode == "full" else frozen_dtype))
    for module in trainable.modules:
        cast_training_params(module, dtype=torch.float32)
    if config.gradient_checkpointing:
        parts.unet.enable_gradient_checkpointing()
        if config.train_text_encoder:
            parts.text_encoder.gradient_checkpointing_enable()
    if config.enable_xformers_memory_efficient_attention:
        try:
            parts.unet.enable_xformers_memory_efficient_attention()
        except (ModuleNotFoundError, ValueError) as error:
            raise ChexmemError(f"xformers is not usable here: {error}".splitlines()[0]) from None
    if config.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    ema = EMAModel(trainable.params, decay=config.ema_decay) if config.use_ema else None
    total_params = sum(p.numel() for p in parts.unet.parameters()) + sum(
        p.numel() for p in parts.text_encoder.parameters()
    )
    trained_params = sum(p.numel() for p in trainable.params)

    if config.cache_latents:
        dataset = cache_latents(
            dataset,
            parts.tokenizer,
            config,
            resolution,
            parts.vae,
            progress=accelerator.is_local_main_process,
        )
    else:
        dataset = train_rows(dataset, parts.tokenizer, config, resolution)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=config.train_batch_size,
        shuffle=True,
        collate_fn=collate,
        num_workers=config.dataloader_num_workers,
        drop_last=False,
        # its own generator: creating an iterator must not draw from the global RNG, or a
        # resumed run's random stream would differ from an uninterrupted one
        generator=torch.Generator().manual_seed(config.seed),
    )
    lr = config.learning_rate
    if config.scale_lr:
        lr *= (
            config.gradient_accumulation_steps * config.train_batch_size * accelerator.num_processes
        )
    optimizer = make_optimizer(trainable.groups, config, lr)

    batches_per_epoch = math.ceil(len(loader) / accelerator.num_processes)
    steps_per_epoch = math.ceil(batches_per_epoch / config.gradient_accumulation_steps)
    max_steps = config.max_train_steps or config.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(max_steps / steps_per_epoch)
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_steps * accelerator.num_processes,
    )
    prepared = accelerator.prepare(*trainable.modules, optimizer, loader, lr_scheduler)
    n = len(trainable.modules)
    trained_modules = list(prepared[:n])
    optimizer, loader, lr_scheduler = prepared[n:]
    parts.unet = trained_modules[0]
    if config.train_text_encoder:
        parts.text_encoder = trained_modules[1]
    if ema is not None:
        ema.to(accelerator.device)
    register_checkpoint_hooks(accelerator, ema)
    if accelerator.is_main_process:
        accelerator.init_trackers(
            "chexmem", config={k: str(v) for k, v in config.to_dict().items()}
        )

    global_step, first_epoch, skip_batches = 0, 0, 0
    # sample weighting: this process's counts since it started, the run's before a resume
    # (kept by the main process), and running totals over all processes
    drops, resumed_drops = DropCounts(), DropCounts()
    dropped_total, steps_all_dropped = 0, 0
    checkpoint = resolve_resume(output_dir, config.resume_from_checkpoint)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        state = read_state(checkpoint)
        global_step, first_epoch, skip_batches = (
            state["global_step"],
            state["epoch"],
            state["batches_in_epoch"],
        )
        if sample_weighter is not None and "drop_counts" in state:
            before = DropCounts.from_state(state["drop_counts"])
            dropped_total, steps_all_dropped = before.dropped, state["steps_all_dropped"]
            if accelerator.is_main_process:
                resumed_drops = before
        if skip_batches >= batches_per_epoch:
            first_epoch, skip_batches = first_epoch + 1, 0
        if global_step >= max_steps:  # the run's last checkpoint: only the final save is left
            num_epochs = first_epoch
        accelerator.print(f"resumed from {checkpoint} at step {global_step}")
        replaced = apply_learning_rate(optimizer, lr_scheduler, lr)
        if replaced is not None:
            accelerator.print(f"learning rate {replaced:g} (the checkpoint's) replaced by {lr:g}")
    elif config.resume_from_checkpoint:
        accelerator.print("no checkpoint to resume from; starting a new run")
    # a checkpoint is good once a loss computed with its weights was finite
    last_good: Path | None = None
    unconfirmed: Path | None = checkpoint

    empty_ids = tokenize(parts.tokenizer, [""])
    progress = tqdm(
        range(max_steps),
        initial=global_step,
        desc="steps",
        disable=not accelerator.is_local_main_process,
    )
    samples_log = output_dir / "logs" / f"samples_rank{accelerator.process_index}.jsonl"
    running_loss, last_loss = 0.0, float("nan")
    step_stats = torch.zeros(5)  # micro_batch_stats summed (max: maxed) over one step
    for epoch in range(first_epoch, num_epochs):
        for module in trained_modules:
            module.train()
        loader.set_epoch(epoch)
        dataset.set_epoch(epoch)  # caption augmentation draws per epoch
        epoch_loader = (
            accelerator.skip_first_batches(loader, skip_batches) if skip_batches else loader
        )
        batches_in_epoch = skip_batches
        skip_batches = 0
        for batch in epoch_loader:
            if config.log_sample_ids:
                samples_log.parent.mkdir(parents=True, exist_ok=True)
                with samples_log.open("a") as handle:
                    handle.write(
                        json.dumps({"step": global_step, "epoch": epoch, "ids": batch["sample_id"]})
                        + "\n"
                    )
            with accelerator.accumulate(*trained_modules):
                loss, weights = training_step(
                    parts,
                    parts.unet,
                    parts.text_encoder,
                    batch,
                    empty_ids,
                    config,
                    weight_dtype,
                    sample_weighter,
                    global_step,
                )
                gathered = accelerator.gather(loss.detach().reshape(1)).mean().item()
                if not math.isfinite(gathered):
                    progress.close()  # now, so that the error stays the last line
                    raise diverged(
                        accelerator,
                        f"the loss became {gathered} at step {global_step + 1}",
                        output_dir,
                        last_good,
                        unconfirmed,
                    )
                if unconfirmed is not None:
                    last_good, unconfirmed = unconfirmed, None
                running_loss += gathered / config.gradient_accumulation_steps
                if weights is not None:
                    copies = batch.get("copies")
                    drops.update(
                        (weights == 0).tolist(),
                        batch.get("sample_id"),
                        None if copies is None else copies.tolist(),
                    )
                    stats = accelerator.gather(micro_batch_stats(weights, sample_weighter)).cpu()
                    step_stats[:4] += stats[:, :4].sum(dim=0)
                    step_stats[4] = max(float(step_stats[4]), float(stats[:, 4].max()))
                accelerator.backward(loss)
                grad_norm = None
                # every sample of the step dropped: no update at all (no decay, no momentum)
                all_dropped = (
                    weights is not None and accelerator.sync_gradients and float(step_stats[1]) == 0
                )
                if not all_dropped:
                    if accelerator.sync_gradients and config.max_grad_norm:
                        grad_norm = accelerator.clip_grad_norm_(
                            trainable.params, config.max_grad_norm
                        )
                    optimizer.step()
                with warnings.catch_warnings():
                    # the schedule follows global steps, skipped ones included
                    warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")
                    lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            batches_in_epoch += 1
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            progress.update(1)
            if ema is not None:
                ema.step(trainable.params)
            last_loss = running_loss
            if sample_weighter is not None:
                dropped_total += int(step_stats[0])
                steps_all_dropped += int(all_dropped)
            if global_step % config.logging_steps == 0 or global_step == max_steps:
                logs = {
                    "loss": running_loss,
                    "lr": lr_scheduler.get_last_lr()[0],
                    "epoch": epoch,
                }
                if sample_weighter is not None:
                    logs["samples_dropped"] = int(step_stats[0])
                    logs["samples_dropped_total"] = dropped_total
                    if step_stats[3]:
                        logs["memorization_magnitude_mean"] = float(step_stats[2] / step_stats[3])
                        logs["memorization_magnitude_max"] = float(step_stats[4])
                if grad_norm is not None:
                    logs["grad_norm"] = float(grad_norm)
                accelerator.log(logs, step=global_step)
                progress.set_postfix(loss=f"{running_loss:.4f}")
            running_loss = 0.0
            step_stats.zero_()
            if config.checkpointing_steps and global_step % config.checkpointing_steps == 0:
                state = {
                    "global_step": global_step,
                    "epoch": epoch,
                    "batches_in_epoch": batches_in_epoch,
                }
                if sample_weighter is not None:
                    state["drop_counts"] = run_drop_counts(resumed_drops, drops).to_state()
                    state["steps_all_dropped"] = steps_all_dropped
                unconfirmed = save_checkpoint(
                    accelerator,
                    output_dir,
                    global_step,
                    state,
                    config.checkpoints_total_limit,
                    keep=last_good,
                )
            if config.validation_steps and global_step % config.validation_steps == 0:
                run_validation(accelerator, parts, trainable, ema, config, resolution, global_step)
            if global_step >= max_steps:
                break
        if global_step >= max_steps:
            break
    progress.close()

    accelerator.wait_for_everyone()
    finite = all(bool(torch.isfinite(p).all()) for p in trainable.params)
    if not bool(accelerator.gather(torch.tensor([finite], device=accelerator.device)).all()):
        # the last update made them NaN/inf: no loss after it showed it; never save them
        raise diverged(
            accelerator,
            f"the weights became non-finite at step {global_step}",
            output_dir,
            last_good,
            unconfirmed,
        )
    fingerprints = gather_object([weights_fingerprint(trainable.params)])
    if len(set(fingerprints)) > 1:
        logger.warning("processes ended with different weights: %s", fingerprints)
    files: list[str] = []
    run_drops = run_drop_counts(resumed_drops, drops) if sample_weighter is not None else None
    if accelerator.is_main_process:
        if ema is not None:
            ema.copy_to(trainable.params)
        files = save_final(accelerator, parts, trainable, config, output_dir)
        prune_checkpoints(output_dir, config.checkpoints_total_limit)  # the kept last good one
        result_info = {
            "global_step": global_step,
            "final_loss": last_loss,
            "trainable_params": trained_params,
            "total_params": total_params,
            "trainable_share": trained_params / max(1, total_params),
            "seconds": round(time.perf_counter() - start, 2),
            "num_processes": accelerator.num_processes,
            "rank_weight_fingerprints": fingerprints,
            "mixed_precision": accelerator.mixed_precision,
            "resolution": resolution,
            # the base as loaded: a local folder's absolute path, so it loads from any cwd
            "config": {**config.to_dict(), "pretrained_model_name_or_path": parts.source},
        }
        if run_drops is not None:
            assert sample_weighter is not None
            result_info["sample_weighting"] = {
                "weighter": describe_weighter(sample_weighter),
                **run_drops.summary(),
                "steps_all_dropped": steps_all_dropped,
                "per_sample_file": f"logs/{SAMPLE_DROPS_FILE}",
            }
            # per image (sample id: source path): [times seen, times dropped]
            (output_dir / "logs").mkdir(exist_ok=True)
            (output_dir / "logs" / SAMPLE_DROPS_FILE).write_text(
                json.dumps(run_drops.by_sample, indent=0)
            )
        (output_dir / RUN_FILE).write_text(json.dumps(result_info, indent=1, default=str))
    if config.validation_prompts and not (
        config.validation_steps and global_step % config.validation_steps == 0
    ):
        run_validation(accelerator, parts, trainable, None, config, resolution, global_step)
    # not accelerator.end_training(): it destroys the process group, which leaves DDP's
    # Reducer holding the last reference; freeing it when this function returns joins gloo's
    # threads with the GIL held while one may still need the GIL to free the last gather's
    # tensors (a rank hung that way). Every rank waits here, the CLI tears the group down.
    accelerator.wait_for_everyone()
    for tracker in accelerator.trackers:
        tracker.finish()
    return TrainResult(
        output_dir,
        global_step,
        last_loss,
        trained_params,
        total_params,
        time.perf_counter() - start,
        files,
        samples_seen=0 if run_drops is None else run_drops.seen,
        samples_dropped=0 if run_drops is None else run_drops.dropped,
    )


def save_final(
    accelerator: Accelerator,
    parts: Components,
    trainable: Trainable,
    config: TrainConfig,
    output_dir: Path,
) -> list[str]:
    """Write the pipeline folder, LoRA weights or subset delta (temp name, then rename)."""
    unet = accelerator.unwrap_model(parts.unet)
    text_encoder = accelerator.unwrap_model(parts.text_encoder)
    staging = output_dir / ".final.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    if config.mode == "full":
        pipeline = StableDiffusionPipeline(
            vae=parts.vae.float(),
            text_encoder=text_encoder.float(),
            tokenizer=parts.tokenizer,
            unet=unet.float(),
            scheduler=DDIMScheduler.from_config(parts.noise_scheduler.config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipeline.save_pretrained(staging, safe_serialization=True)
    elif config.mode == "lora":
        save_lora(unet, text_encoder if config.train_text_encoder else None, staging)
    else:
        assert trainable.subset is not None
        save_subset(unet, trainable.subset, staging, parts.source)
        if config.train_text_encoder:
            save_file(
                {k: v.contiguous() for k, v in text_encoder.state_dict().items()},
                str(staging / SUBSET_TEXT_ENCODER_FILE),
            )
    names = sorted(p.name for p in staging.iterdir())
    for path in staging.iterdir():
        target = output_dir / path.name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        path.rename(target)
    staging.rmdir()
    return names
