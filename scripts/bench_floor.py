"""Performance against the floor: chexmem's detection and training over the bare work they need.

    OMP_NUM_THREADS=1 python -m scripts.bench_floor detect [--model DIR] [--prompts 16 64 256]
    OMP_NUM_THREADS=1 python -m scripts.bench_floor train [--model DIR] [--resolution 64 128]

Detection (step 1, n generations per prompt, the same batch on both sides): the seconds of
chexmem's shared sampling pass plus each detector's own work, over the seconds of the bare
UNet calls that detector cannot avoid: one two-branch forward (uncond + cond, one call) per
generation at x_T for the pass; another at t_low for anisotropy; one forward-mode JVP
through the two-branch UNet for sharpness; nothing more for magnitude and seed consistency.
The floor calls the UNet on random latents and precomputed encoder states, so it leaves out
text encoding, seeding and the scheduler step, which detection also pays.

Training: chexmem `train()` samples/s over a bare PyTorch loop's (`scripts.bench_train`,
same model, data, optimizer and mode) and over the UNet forward + backward alone on
precomputed latents and encoder states (no VAE, text encoder, optimizer or data loading).

Every figure is the median of `--repeats` paired runs (ours, then the floor, in one process,
after a warm-up), at each size given, so the scaling is visible. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from scripts.bench_detect import bench_prompts

DETECTORS = ("magnitude", "seed_consistency", "anisotropy", "sharpness")
# bare two-branch calls per generation beyond the shared pass's one: ("forward" | "jvp", count)
OWN_FLOOR = {"magnitude": None, "seed_consistency": None, "anisotropy": "forward",
             "sharpness": "jvp"}  # fmt: skip


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds one call of fn takes, GPU work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def chunks(total: int, batch: int) -> list[int]:
    """The batch sizes that cover `total` items."""
    return [min(batch, total - start) for start in range(0, total, batch)]


def floor_inputs(pipe: Any, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random x_T and two-branch encoder states of one full batch, on the UNet's device."""
    unet = pipe.unet
    size = unet.config.sample_size
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, unet.config.in_channels, size, size, generator=generator)
    tokens = pipe.tokenizer.model_max_length
    states = torch.randn(2 * batch, tokens, unet.config.cross_attention_dim, generator=generator)
    return latents.to(unet.device, unet.dtype), states.to(unet.device, unet.dtype)


@torch.no_grad()
def forward_floor(pipe: Any, generations: int, batch: int, t: int) -> None:
    """The bare two-branch UNet calls over `generations` at timestep t."""
    latents, states = floor_inputs(pipe, batch)
    for size in chunks(generations, batch):
        x = latents[:size]
        pipe.unet(torch.cat([x, x]), t, torch.cat([states[:size], states[batch : batch + size]]))


def jvp_floor(pipe: Any, generations: int, batch: int, t: int) -> None:
    """The bare forward-mode JVPs of eps_c - eps_u through the UNet, in float32."""
    unet = pipe.unet
    original = unet.dtype
    if original != torch.float32:
        unet.to(torch.float32)
    latents, states = (v.float() for v in floor_inputs(pipe, batch))
    try:
        for size in chunks(generations, batch):
            x, context = latents[:size], torch.cat([states[:size], states[batch : batch + size]])

            def difference(z: torch.Tensor, context: torch.Tensor = context) -> torch.Tensor:
                eps_u, eps_c = unet(torch.cat([z, z]), t, context).sample.chunk(2)
                return eps_c - eps_u

            with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
                torch.func.jvp(difference, (x,), (torch.ones_like(x),))
    finally:
        if original != torch.float32:
            unet.to(original)


def detection_seconds(
    pipe: Any, prompts: list[str], n: int, batch: int, names: Sequence[str]
) -> dict[str, float]:
    """Seconds of chexmem's step-1 detection: the shared pass, then each detector's own."""
    from detect.base import SamplingPass
    from detect.magnitude import MagnitudeConfig, noise_magnitudes
    from detect.registry import make_detectors

    device = pipe.unet.device
    detectors = make_detectors(list(names))
    config = MagnitudeConfig(
        num_inference_steps=50, num_generations=n, max_steps=1, batch_size=batch, progress=False
    )
    keep = any(d.needs_first_step for d in detectors)
    result: dict[str, Any] = {}

    def run_pass() -> None:
        result["pass"] = noise_magnitudes(pipe, prompts, config, keep_first_step=keep)

    seconds = {"pass": timed(run_pass, device)}
    shared = SamplingPass(
        pipe, prompts, list(range(len(prompts))), config, result["pass"].table, 1,
        result["pass"].first_step,
    )  # fmt: skip
    for detector in detectors:
        seconds[detector.name] = timed(lambda d=detector: d.score(shared), device)
    return seconds


def floor_seconds(
    pipe: Any, generations: int, batch: int, names: Sequence[str]
) -> dict[str, float]:
    """Seconds of the bare UNet work of the shared pass and of each detector's own part."""
    from detect.anisotropy import low_timestep
    from detect.magnitude import MagnitudeConfig
    from mitigate.embedding import ddim_scheduler

    device = pipe.unet.device
    config = MagnitudeConfig(num_inference_steps=50)
    first = int(ddim_scheduler(pipe, config).timesteps[0])
    seconds = {"pass": timed(lambda: forward_floor(pipe, generations, batch, first), device)}
    for name in names:
        kind = OWN_FLOOR[name]
        if kind == "forward":
            low = low_timestep(pipe.scheduler.config)
            seconds[name] = timed(lambda t=low: forward_floor(pipe, generations, batch, t), device)
        elif kind == "jvp":
            seconds[name] = timed(lambda: jvp_floor(pipe, generations, batch, first), device)
        else:
            seconds[name] = 0.0
    return seconds


def detection_ratios(
    pipe: Any, prompts: int, n: int, batch: int, repeats: int, names: Sequence[str] = DETECTORS
) -> dict[str, dict[str, float]]:
    """Per detector: median seconds of ours and of the floor over paired runs, and the ratio."""
    texts = bench_prompts(prompts)
    detection_seconds(pipe, texts[:2], n, min(batch, 2 * n), names)  # warm-up
    floor_seconds(pipe, 2 * n, min(batch, 2 * n), names)
    ours, floors = [], []
    for _ in range(repeats):
        ours.append(detection_seconds(pipe, texts, n, batch, names))
        floors.append(floor_seconds(pipe, prompts * n, batch, names))
    table = {}
    for name in names:
        mine = [run["pass"] + run[name] for run in ours]
        bare = [run["pass"] + run[name] for run in floors]
        table[name] = {
            "seconds": statistics.median(mine),
            "floor_seconds": statistics.median(bare),
            "ratio": statistics.median(m / b for m, b in zip(mine, bare, strict=True)),
        }
    return table


def unet_step_floor(parts: Any, trainable: Any, batch: int, steps: int) -> float:
    """samples/s of the UNet forward + backward alone, on precomputed inputs."""
    unet = parts.unet
    size = unet.config.sample_size
    device = unet.device
    generator = torch.Generator().manual_seed(0)
    noisy = torch.randn(batch, unet.config.in_channels, size, size, generator=generator)
    target = torch.randn(noisy.shape, generator=generator)
    states = torch.randn(batch, parts.tokenizer.model_max_length, unet.config.cross_attention_dim,
                         generator=generator)  # fmt: skip
    noisy, target, states = (v.to(device, unet.dtype) for v in (noisy, target, states))
    t = torch.randint(0, 1000, (batch,), generator=generator).to(device)

    def step() -> None:
        loss = F.mse_loss(unet(noisy, t, states).sample.float(), target.float())
        loss.backward()
        for p in trainable.params:
            p.grad = None

    step()  # warm-up
    seconds = timed(lambda: [step() for _ in range(steps)], device)
    return steps * batch / seconds


def bare_unet_samples_per_s(model: str, data: str, mode: str, batch: int, steps: int) -> float:
    """The UNet forward + backward floor of one training mode (`scripts.bench_train.MODES`)."""
    from scripts.bench_train import MODES
    from train.config import TrainConfig
    from train.models import load_components
    from train.trainer import setup_trainable

    torch.manual_seed(0)
    config = TrainConfig(pretrained_model_name_or_path=model, train_data_dir=data,
                         train_batch_size=batch, **MODES[mode])  # fmt: skip
    parts = load_components(model)
    trainable = setup_trainable(parts, config)
    return unet_step_floor(parts, trainable, batch, steps)


def tiny_at(resolution: int, workdir: Path) -> str:
    """A tiny model at `resolution` (untrained VAE: timing only)."""
    from train.tiny_model import TinyModelConfig, build_tiny_pipeline

    config = TinyModelConfig(resolution=resolution, vae_train_steps=0)
    return str(build_tiny_pipeline(workdir / f"tiny-{resolution}", config, progress=False))


def cmd_detect(args: argparse.Namespace) -> None:
    """The detection table: each detector at each prompt count."""
    from detect.models import load_pipeline

    with tempfile.TemporaryDirectory() as workdir:
        pipe = load_pipeline(args.model or tiny_at(64, Path(workdir)))
    torch.manual_seed(0)
    print(f"step-1 detection, n = {args.n}, batch {args.batch_size} generations, "
          f"median of {args.repeats} paired runs, device {pipe.unet.device}")  # fmt: skip
    print("| detector | prompts | chexmem s | floor s | ratio | chexmem s per prompt |")
    print("|---|---|---|---|---|---|")
    for prompts in args.prompts:
        table = detection_ratios(pipe, prompts, args.n, args.batch_size, args.repeats,
                                 args.detector)  # fmt: skip
        for name, row in table.items():
            print(f"| {name} | {prompts} | {row['seconds']:.2f} | {row['floor_seconds']:.2f} | "
                  f"{row['ratio']:.2f} | {row['seconds'] / prompts:.4f} |")  # fmt: skip


def cmd_train(args: argparse.Namespace) -> None:
    """The training table: each mode at each resolution, against both floors."""
    from scripts.bench_train import MODES, measure, prepare

    print(f"batch {args.batch}, {args.steps} timed steps after {args.warmup} warm-up, "
          f"one thread, median of {args.repeats} paired runs")  # fmt: skip
    print("| mode | px | chexmem samples/s | bare loop samples/s | UNet fwd+bwd samples/s | "
          "chexmem / bare loop | chexmem / UNet |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for resolution in args.resolution:
        with tempfile.TemporaryDirectory() as workdir:
            run = argparse.Namespace(**vars(args))
            run.model = args.model or tiny_at(resolution, Path(workdir))
            prepare(run, Path(workdir), resolution)
            for mode in MODES:
                ours, loop, unet = [], [], []
                for _ in range(args.repeats):
                    ours.append(measure("ours", run, mode)["samples_per_s"])
                    loop.append(measure("minimal", run, mode)["samples_per_s"])
                    unet.append(bare_unet_samples_per_s(run.model, run.data, mode, args.batch,
                                                        args.steps))  # fmt: skip
                to_loop = statistics.median(o / m for o, m in zip(ours, loop, strict=True))
                to_unet = statistics.median(o / u for o, u in zip(ours, unet, strict=True))
                print(f"| {mode} | {resolution} | {statistics.median(ours):.1f} | "
                      f"{statistics.median(loop):.1f} | {statistics.median(unet):.1f} | "
                      f"{to_loop:.2f} | {to_unet:.2f} |")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line and print one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("detect", help="step-1 detection against its bare UNet calls")
    p.add_argument("--model", default="", help="a pipeline folder (default: a tiny one)")
    p.add_argument("--prompts", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--detector", nargs="+", default=list(DETECTORS), choices=DETECTORS)
    p.add_argument("--repeats", type=int, default=3)
    p.set_defaults(func=cmd_detect)
    p = sub.add_parser("train", help="train() against a bare loop and the UNet alone")
    p.add_argument("--model", default="", help="a pipeline folder (default: tiny ones)")
    p.add_argument("--data", default="", help="a dataset folder (default: phantoms)")
    p.add_argument("--resolution", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.set_defaults(func=cmd_train)
    args = parser.parse_args(argv)
    if getattr(args, "batch_size", 1) < 1 or min(getattr(args, "prompts", [1])) < 1:
        parser.error("--batch_size and --prompts must be >= 1")
    args.func(args)


if __name__ == "__main__":
    main()
