"""The embedded default's base model: a tiny Stable Diffusion built offline, deterministically.

`build_tiny_pipeline` writes an ordinary diffusers folder (``model_index.json``, ``unet/``,
``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``) that
``StableDiffusionPipeline.from_pretrained(folder)`` loads without chexmem. The parts follow
Stable Diffusion 1.x at toy width: a CLIP text encoder, a UNet with self- and cross-attention
transformer blocks, a KL autoencoder that downsamples by 4 and the SD 1.x DDIM schedule.

The text encoder and UNet keep their seeded random initialisation (fine-tuning trains them).
The autoencoder is trained here, on augmented phantom radiographs only, because the diffusion
model can only learn images its autoencoder can reconstruct. It starts as a working codec
(see `init_vae_as_resampler`) rather than from noise, which is what lets a few hundred CPU
steps reach 30 dB on real radiographs. Its ``scaling_factor`` is 1 / std of its latents on
phantoms, as SD's 0.18215 was measured on its data. Nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from hf_datasets.errors import ChexmemError
from hf_datasets.label_stats import LabelSampler
from hf_datasets.phantom_render import render, sample_anatomy, vary_study
from hf_datasets.storage import replace_dir
from train.tokenizer import build_tokenizer, prompt_corpus

INFO_FILE = "chexmem_tiny.json"
HELD_OUT_IMAGES = 64
GROUPS = 8  # GroupNorm groups in the UNet and the autoencoder
TEXT_HEADS = 4
# Channels per UNet attention head. CPU attention time grows with the number of heads, so
# few wide heads (16 channels) train and sample about 1.8x faster than 8 heads of 4 channels.
UNET_HEAD_DIM = 16


@dataclass
class TinyModelConfig:
    """Sizes of the tiny model and how its autoencoder is trained."""

    resolution: int = 64  # image size the model is made for
    latent_channels: int = 4
    vae_channels: tuple[int, ...] = (32, 64, 64)  # 3 blocks -> downsampling factor 4
    unet_channels: tuple[int, ...] = (32, 64, 64)
    text_hidden_size: int = 64
    text_layers: int = 2
    vocab_size: int = 1000  # at most; a small prompt corpus may fill fewer
    vae_train_steps: int = 300
    vae_batch_size: int = 8
    vae_crop_size: int = 32  # the autoencoder is convolutional: crops train it faster
    vae_learning_rate: float = 3e-4  # higher rates undo the resampler start in the warm-up
    vae_kl_weight: float = 1e-6
    vae_num_phantoms: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        self.vae_channels = tuple(self.vae_channels)
        self.unet_channels = tuple(self.unet_channels)
        for name in ("vae_channels", "unet_channels"):
            channels = getattr(self, name)
            if len(channels) < 2 or any(c % GROUPS for c in channels):
                raise ChexmemError(f"{name} needs >= 2 levels, each a multiple of {GROUPS}")
        if self.vae_train_steps < 0:
            raise ChexmemError(
                f"vae_train_steps must be >= 0 (0 keeps the untrained resampler start), "
                f"not {self.vae_train_steps}"
            )
        if min(self.vae_channels) < 3 * GROUPS:
            # init_vae_as_resampler keeps three channels in one normalisation group
            raise ChexmemError(f"vae_channels must each be at least {3 * GROUPS}")
        multiple = self.downsampling_factor * 2 ** (len(self.unet_channels) - 1)
        if self.resolution % multiple or self.resolution < 16:
            raise ChexmemError(
                f"resolution must be a multiple of {multiple} and >= 16, not {self.resolution}"
            )
        factor = self.downsampling_factor
        if not factor <= self.vae_crop_size <= self.resolution or self.vae_crop_size % factor:
            raise ChexmemError(
                f"vae_crop_size must be a multiple of {factor} between {factor} and "
                f"resolution ({self.resolution}), not {self.vae_crop_size}"
            )
        if self.text_hidden_size % TEXT_HEADS:
            raise ChexmemError(f"text_hidden_size must be a multiple of {TEXT_HEADS}")

    @property
    def downsampling_factor(self) -> int:
        """How many pixels one latent covers along each side."""
        return 2 ** (len(self.vae_channels) - 1)


def build_tiny_pipeline(
    out: str | Path,
    config: TinyModelConfig | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Build the tiny model and save it as a diffusers pipeline folder at `out`."""
    config = config or TinyModelConfig()
    out = Path(out)
    if out.exists() and not overwrite:
        raise ChexmemError(f"{out} already exists; pass overwrite=True to replace it")
    pipeline, info = make_tiny_pipeline(config, progress)
    return save_pipeline(pipeline, out, INFO_FILE, info)


def save_pipeline(pipeline: Any, out: Path, info_file: str, info: dict[str, Any]) -> Path:
    """Save a pipeline and its info JSON to a hidden sibling, then rename it to `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.building-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        pipeline.save_pretrained(staging, safe_serialization=True)
        (staging / info_file).write_text(json.dumps(info, indent=1) + "\n")
        replace_dir(staging, out, overwrite=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def make_tiny_pipeline(
    config: TinyModelConfig, progress: bool = False
) -> tuple[StableDiffusionPipeline, dict[str, Any]]:
    """The tiny pipeline in memory and what was measured while building it."""
    tokenizer = build_tokenizer(prompt_corpus(seed=config.seed), config.vocab_size)
    # a private RNG stream: building must not depend on, or change, the caller's global seed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        text_encoder = make_text_encoder(config, tokenizer)
        unet = make_unet(config)
        vae = make_vae(config)
    init_vae_as_resampler(vae)
    generator = torch.Generator().manual_seed(config.seed)
    if config.vae_train_steps:  # 0: the resampler start as it is
        images = phantom_images(config.vae_num_phantoms, config, stream=0)
        train_vae(vae, images, config, generator, progress)
    held_out = phantom_images(HELD_OUT_IMAGES, config, stream=1)
    std = latent_std(vae, held_out, generator)
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    psnr = vae_psnr(vae, [Image.fromarray(a) for a in held_out], config.resolution)
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=make_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    info = {
        "what": "chexmem embedded-default base model (tiny Stable Diffusion 1.x-like)",
        "config": asdict(config),
        "vae_psnr_phantom_held_out_db": round(psnr, 3),
        "held_out_phantoms": HELD_OUT_IMAGES,
        "latent_std": round(std, 5),
        "scaling_factor": vae.config.scaling_factor,
        "vocab_size": len(tokenizer),
        "parameters": {
            "unet": _count(unet),
            "vae": _count(vae),
            "text_encoder": _count(text_encoder),
        },
    }
    return pipeline, info


def make_text_encoder(config: TinyModelConfig, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """A randomly initialised CLIP text encoder sized for the tokenizer."""
    return CLIPTextModel(
        CLIPTextConfig(
            hidden_size=config.text_hidden_size,
            intermediate_size=2 * config.text_hidden_size,
            num_hidden_layers=config.text_layers,
            num_attention_heads=TEXT_HEADS,
            max_position_embeddings=tokenizer.model_max_length,
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def make_unet(config: TinyModelConfig) -> UNet2DConditionModel:
    """A randomly initialised SD 1.x-style UNet (cross-attention in all but the lowest level)."""
    levels = len(config.unet_channels)
    return UNet2DConditionModel(
        sample_size=config.resolution // config.downsampling_factor,
        in_channels=config.latent_channels,
        out_channels=config.latent_channels,
        block_out_channels=config.unet_channels,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        cross_attention_dim=config.text_hidden_size,
        # diffusers' name for the number of heads per level (SD 1.x: 8 everywhere)
        attention_head_dim=tuple(attention_heads(c) for c in config.unet_channels),
        norm_num_groups=GROUPS,
    )


def attention_heads(channels: int) -> int:
    """The most heads of at least UNET_HEAD_DIM channels each that divide `channels`."""
    heads = max(1, channels // UNET_HEAD_DIM)
    while channels % heads:
        heads -= 1
    return heads


def make_vae(config: TinyModelConfig) -> AutoencoderKL:
    """A randomly initialised KL autoencoder for 3-channel images (grayscale replicated)."""
    blocks = len(config.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=config.vae_channels,
        layers_per_block=1,
        latent_channels=config.latent_channels,
        norm_num_groups=GROUPS,
        sample_size=config.resolution,
        # no mid-block attention: the autoencoder stays convolutional, so training on crops
        # carries over to whole images
        mid_block_add_attention=False,
    )


# A codec the autoencoder starts as. Channel 0 carries the grey image, channel 1 its negative
# and channel 2 a constant; the channels after them up to the end of the first normalisation
# group stay zero. With the constant dominating that group, the GroupNorm before each output
# convolution divides by a fixed amount instead of the image's own contrast (the negative
# copy cancels the image from the group mean), so grey values pass through unchanged; the
# difference of SiLU(c + g) and SiLU(c - g) undoes the SiLU to first order.
_CONSTANT = 20.0
_SILU_OFFSET = 6.0
_INITIAL_LOGVAR = -6.0  # posterior std 0.05 at the start
_CENTRE = torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
# Downsample2D pads right and bottom by one, so taps [0:2, 0:2] average one 2 x 2 cell
_BOX = torch.tensor([[0.25, 0.25, 0.0], [0.25, 0.25, 0.0], [0.0, 0.0, 0.0]])
_ONE = torch.ones(1, 1)


@torch.no_grad()
def init_vae_as_resampler(vae: AutoencoderKL) -> None:
    """Set the autoencoder to box-average 4 x 4 cells into latent 0 and upsample them back."""
    encoder, decoder = vae.encoder, vae.decoder
    enc_quiet = _quiet_channels(encoder.conv_norm_out)
    dec_quiet = _quiet_channels(decoder.conv_norm_out)
    _route_input(encoder.conv_in, torch.full((3,), 1.0 / 3.0), enc_quiet)
    for block in encoder.down_blocks:
        _zero_residual_branches(block, enc_quiet)
        for down in block.downsamplers or []:
            _route(down.conv, _BOX, enc_quiet)
    _zero_residual_branches(encoder.mid_block, enc_quiet)
    _pass_grey_through_norm(encoder.conv_norm_out, enc_quiet)
    latent_channels = vae.config.latent_channels
    weight, bias = encoder.conv_out.weight, encoder.conv_out.bias
    weight[:, :3] = 0.0
    weight[0], bias[0] = 0.0, 0.0
    weight[0, :2] = _unsilu_taps()
    weight[latent_channels:], bias[latent_channels:] = 0.0, _INITIAL_LOGVAR
    for conv in (vae.quant_conv, vae.post_quant_conv):
        conv.weight.copy_(torch.eye(conv.weight.shape[0])[:, :, None, None])
        conv.bias.zero_()
    _route_input(decoder.conv_in, torch.eye(latent_channels)[0], dec_quiet)
    _zero_residual_branches(decoder.mid_block, dec_quiet)
    for block in decoder.up_blocks:
        _zero_residual_branches(block, dec_quiet)
        for up in block.upsamplers or []:
            _route(up.conv, _CENTRE, dec_quiet)  # after nearest-neighbour upsampling
    _pass_grey_through_norm(decoder.conv_norm_out, dec_quiet)
    decoder.conv_out.weight.zero_()
    decoder.conv_out.bias.zero_()
    decoder.conv_out.weight[:, :2] = _unsilu_taps()


def _quiet_channels(norm: torch.nn.GroupNorm) -> list[int]:
    """Channels 3.. of the first group: zero at the start, so they do not move its statistics."""
    return list(range(3, norm.num_channels // norm.num_groups))


def _route_input(conv: torch.nn.Conv2d, grey: torch.Tensor, quiet: list[int]) -> None:
    """First convolution: +grey, -grey and the constant out of the input channels."""
    weight, bias = conv.weight, conv.bias
    weight[[0, 1, 2, *quiet]], bias[[0, 1, 2, *quiet]] = 0.0, 0.0
    weight[0] = grey[:, None, None] * _CENTRE
    weight[1] = -weight[0]
    bias[2] = _CONSTANT


def _route(conv: torch.nn.Conv2d, taps: torch.Tensor, quiet: list[int]) -> None:
    """Channels 0-2 map onto themselves through `taps`; the quiet ones start at zero."""
    weight, bias = conv.weight, conv.bias
    weight[[0, 1, 2, *quiet]], bias[[0, 1, 2, *quiet]] = 0.0, 0.0
    weight[:, 2] = 0.0  # no feature channel starts out reading the large constant
    for channel in range(3):
        weight[channel, channel] = taps


def _zero_residual_branches(block: torch.nn.Module, quiet: list[int]) -> None:
    """Every resnet starts as its shortcut (identity, or channels 0-2 kept by a 1 x 1)."""
    for resnet in block.resnets:
        resnet.conv2.weight.zero_()
        resnet.conv2.bias.zero_()
        if resnet.conv_shortcut is not None:
            _route(resnet.conv_shortcut, _ONE, quiet)


def _pass_grey_through_norm(norm: torch.nn.GroupNorm, quiet: list[int]) -> None:
    """Affine of the last GroupNorm that gives c + grey and c - grey on channels 0 and 1."""
    size = norm.num_channels // norm.num_groups
    mean = _CONSTANT / size
    std = math.sqrt(_CONSTANT**2 / size - mean**2)
    norm.weight[[0, 1, 2, *quiet]], norm.bias[[0, 1, 2, *quiet]] = 0.0, 0.0
    norm.weight[:2], norm.bias[:2] = std, _SILU_OFFSET + mean


def _unsilu_taps() -> torch.Tensor:
    """3 x 3 taps on channels 0 and 1 giving (SiLU(c + g) - SiLU(c - g)) / (2 SiLU'(c)) = g."""
    c = _SILU_OFFSET
    sigmoid = 1.0 / (1.0 + math.exp(-c))
    slope = sigmoid + c * sigmoid * (1.0 - sigmoid)
    return torch.stack([_CENTRE, -_CENTRE]) / (2.0 * slope)


def make_scheduler() -> DDIMScheduler:
    """The noise schedule of Stable Diffusion 1.x."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def phantom_images(n: int, config: TinyModelConfig, stream: int) -> np.ndarray:
    """n phantom radiographs, uint8 (n, resolution, resolution); streams give disjoint sets."""
    sampler = LabelSampler()
    rng = np.random.default_rng([config.seed, stream])
    images = []
    for _ in range(n):
        anatomy = sample_anatomy(rng, sex=sampler.sex(rng), age=sampler.age(rng))
        labels, view = sampler.labels(rng), sampler.view(rng)
        images.append(render(vary_study(anatomy, rng), labels, view, config.resolution, rng))
    return np.stack(images)


def train_vae(
    vae: AutoencoderKL,
    images: np.ndarray,
    config: TinyModelConfig,
    generator: torch.Generator,
    progress: bool = False,
) -> None:
    """Train the autoencoder to reconstruct augmented crops of the images (MSE + small KL)."""
    pool = torch.from_numpy(images).float().div(127.5).sub(1.0).unsqueeze(1)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=config.vae_learning_rate,
        total_steps=config.vae_train_steps,
        pct_start=0.15,
    )
    vae.to(memory_format=torch.channels_last)  # faster CPU convolutions
    vae.train()
    bar = tqdm(range(config.vae_train_steps), desc="tiny VAE", disable=not progress)
    for _ in bar:
        index = torch.randint(len(pool), (config.vae_batch_size,), generator=generator)
        x = augment(pool[index], generator, config.vae_crop_size).expand(-1, 3, -1, -1)
        x = x.contiguous(memory_format=torch.channels_last)
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        loss = F.mse_loss(reconstruction, x) + config.vae_kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    vae.to(memory_format=torch.contiguous_format)
    vae.eval()


def augment(x: torch.Tensor, generator: torch.Generator, crop: int) -> torch.Tensor:
    """Random pose, grey levels and crops of a batch (b, 1, h, w) in [-1, 1]."""
    return _random_crops(_random_levels(_random_pose(x, generator), generator), generator, crop)


def _uniform(generator: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    """n draws from U(low, high)."""
    return low + (high - low) * torch.rand(n, generator=generator)


def _random_pose(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Small rotation, zoom and shift, with black outside the film when zoomed out."""
    b = x.shape[0]
    angle = _uniform(generator, b, -0.1, 0.1)
    scale = _uniform(generator, b, 0.65, 1.15)
    shift = _uniform(generator, 2 * b, -0.1, 0.1).view(b, 2)
    cos, sin = scale * torch.cos(angle), scale * torch.sin(angle)
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    moved = F.grid_sample(x + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return moved - 1.0


def _random_levels(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random window and gamma, so that the whole grey range occurs (phantoms span 14..252)."""
    b = x.shape[0]
    low = _uniform(generator, b, -1.0, -0.6).view(-1, 1, 1, 1)
    high = _uniform(generator, b, 0.6, 1.0).view(-1, 1, 1, 1)
    gamma = torch.exp(0.25 * torch.randn(b, generator=generator)).view(-1, 1, 1, 1)
    unit = ((x - low) / (high - low)).clamp(0.0, 1.0) ** gamma
    return unit * 2.0 - 1.0


def _random_crops(x: torch.Tensor, generator: torch.Generator, crop: int) -> torch.Tensor:
    """A random crop x crop window of each image."""
    size = x.shape[-1]
    if crop >= size:
        return x
    corners = torch.randint(0, size - crop + 1, (x.shape[0], 2), generator=generator).tolist()
    return torch.stack(
        [im[:, t : t + crop, s : s + crop] for im, (t, s) in zip(x, corners, strict=True)]
    )


@torch.no_grad()
def latent_std(vae: AutoencoderKL, images: np.ndarray, generator: torch.Generator) -> float:
    """Standard deviation of sampled latents of the images (uint8 (n, h, w))."""
    latents = [
        vae.encode(_to_tensor(chunk)).latent_dist.sample(generator=generator)
        for chunk in np.array_split(images, math.ceil(len(images) / 32))
    ]
    return float(torch.cat(latents).std())


@torch.no_grad()
def vae_psnr(vae: AutoencoderKL, images: Sequence[Image.Image], resolution: int) -> float:
    """Mean PSNR (dB, on 0..255) of 8-bit grayscale images after encode (mode) and decode."""
    arrays = np.stack(
        [
            np.asarray(im.convert("L").resize((resolution, resolution), Image.Resampling.LANCZOS))
            for im in images
        ]
    )
    was_training = vae.training
    vae.eval()
    scores = []
    for chunk in np.array_split(arrays, math.ceil(len(arrays) / 32)):
        decoded = vae.decode(vae.encode(_to_tensor(chunk)).latent_dist.mode()).sample
        # quantised like a pipeline's output image, grayscale as the mean of the channels
        pixels = ((decoded.mean(1) + 1.0) * 127.5).clamp(0, 255).round().double()
        error = (pixels - torch.from_numpy(chunk).double()).pow(2).mean((1, 2))
        scores.append(10.0 * torch.log10(255.0**2 / error.clamp_min(1e-10)))
    vae.train(was_training)
    return float(torch.cat(scores).mean())


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (n, h, w) as float (n, 3, h, w) in [-1, 1]."""
    return torch.from_numpy(images).float().div(127.5).sub(1.0)[:, None].expand(-1, 3, -1, -1)


def _count(module: torch.nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in module.parameters())
