"""The prepared GPU check: training speed and MFU, detection against its floor, peak memory.

    python -m scripts.gpu_check --out gpu_check.json              # SD v1.5 sized, on the GPU
    OMP_NUM_THREADS=1 python -m scripts.gpu_check --model tiny --resolution 64 \\
        --train_steps 3 --prompts 4 --out cpu_check.json          # its CPU form (the tests')

One process, one JSON. It builds Stable Diffusion v1.5's architecture with random weights
(`chexmem model random`; nothing is downloaded) or takes `--model tiny` / a pipeline folder,
then measures

- training: chexmem `train()` samples/s at `--resolution` for each option set of
  `--train_options` (mixed precision, gradient checkpointing, xformers, 8-bit Adam, cached
  latents), its peak memory, and model FLOPs utilisation: UNet forward + backward FLOPs per
  sample (counted by torch's FlopCounterMode on a meta-device copy, so recomputation under
  checkpointing is not counted) times samples/s over the GPU's dense peak;
- detection: step-1 noise magnitudes of `--prompts` prompts x `--n` generations in
  `--detect_dtype`, its seconds and ratio to the bare UNet calls it needs
  (`scripts.bench_floor`), and peak memory;
- which optional speed-ups are installed, and which each run used.

An option set whose package is missing is skipped with the reason, never silently run
without it. The figures are speeds and memory of random weights, never image quality.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from scripts.bench_train import peak_rss_mb

# dense (no sparsity) peak FLOP/s by device name fragment and precision
PEAK_FLOPS = {
    ("H200", "bf16"): 989e12,
    ("H100 PCIe", "bf16"): 756e12,
    ("H100", "bf16"): 989e12,
    ("A100", "bf16"): 312e12,
    ("L40S", "bf16"): 362e12,
    ("A10G", "bf16"): 70e12,
}
PEAK_FLOPS |= {(name, "fp16"): value for (name, _), value in list(PEAK_FLOPS.items())}
# option sets: name -> TrainConfig fields (their flags), and the package each needs
TRAIN_OPTIONS: dict[str, dict[str, Any]] = {
    "base": {},
    "checkpointing": {"gradient_checkpointing": True},
    "xformers": {"enable_xformers_memory_efficient_attention": True},
    "8bit_adam": {"use_8bit_adam": True},
    "cache_latents": {"cache_latents": True, "random_flip": False},
}
NEEDS = {"xformers": "xformers", "8bit_adam": "bitsandbytes"}


def installed(package: str) -> bool:
    """Whether `package` can be imported here (without importing it)."""
    return importlib.util.find_spec(package) is not None


def environment(device: torch.device) -> dict[str, Any]:
    """What the check ran on and which optional speed-ups are installed."""
    info: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "installed": {name: installed(name) for name in ("xformers", "bitsandbytes")},
    }
    if device.type == "cuda":
        info["flash_sdp_enabled"] = torch.backends.cuda.flash_sdp_enabled()
        info["memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return info


def peak_flops(device_name: str, dtype: str, override: float | None) -> float | None:
    """The device's dense peak FLOP/s for dtype (None when unknown, e.g. on a CPU)."""
    if override:
        return override * 1e12
    for (fragment, precision), value in PEAK_FLOPS.items():
        if fragment in device_name and precision == dtype:
            return value
    return None


def reset_peak(device: torch.device) -> None:
    """Start a new peak-memory window (after freeing what the last run left)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated since `reset_peak` (on a CPU: the process's peak RSS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return peak_rss_mb() / 1024


def unet_train_flops(model: str, resolution: int) -> float:
    """FLOPs of one UNet forward + backward for one sample, counted on the meta device."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    config = UNet2DConditionModel.load_config(Path(model) / "unet")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
        size = resolution // _vae_factor(model)
        x = torch.randn(1, unet.config.in_channels, size, size)
        states = torch.randn(1, 77, unet.config.cross_attention_dim)
        t = torch.tensor([500])
    with FlopCounterMode(display=False) as counter:
        unet(x, t, states).sample.sum().backward()
    return float(counter.get_total_flops())


def _vae_factor(model: str) -> int:
    """How many pixels one latent covers along each side."""
    config = json.loads((Path(model) / "vae" / "config.json").read_text())
    return 2 ** (len(config["block_out_channels"]) - 1)


def train_run(
    model: str, data: str, options: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    """samples/s over the steps after warm-up, and peak memory, of one `train()` run."""
    from train.config import TrainConfig
    from train.tracking import read_metrics
    from train.trainer import train

    device = torch.device(args.device)
    reset_peak(device)
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(
            pretrained_model_name_or_path=model,
            train_data_dir=data,
            output_dir=out,
            resolution=args.resolution,
            train_batch_size=args.train_batch,
            max_train_steps=args.train_warmup + args.train_steps,
            mixed_precision=train_precision(args),
            checkpointing_steps=0,
            logging_steps=1,
            report_to="jsonl",
            **options,
        )
        train(config)
        times = {m["step"]: m["time"] for m in read_metrics(Path(out) / "logs")}
    first, last = args.train_warmup, args.train_warmup + args.train_steps
    return {
        "samples_per_s": args.train_steps * args.train_batch / (times[last] - times[first]),
        "peak_memory_gib": peak_memory_gib(device),
    }


def train_precision(args: argparse.Namespace) -> str:
    """The mixed precision the training runs use: the asked one on CUDA, "no" elsewhere."""
    return args.train_dtype if torch.device(args.device).type == "cuda" else "no"


def train_figures(model: str, data: str, args: argparse.Namespace, env: dict) -> dict[str, Any]:
    """Each option set's samples/s, MFU and peak memory (or why it was skipped)."""
    flops = unet_train_flops(model, args.resolution)
    peak = peak_flops(env["device"], args.train_dtype, args.peak_tflops)
    runs: dict[str, Any] = {}
    for name in args.train_options:
        package = NEEDS.get(name)
        if package and not env["installed"][package]:
            runs[name] = {"skipped": f"{package} is not installed"}
            continue
        try:
            run = train_run(model, data, TRAIN_OPTIONS[name], args)
        except Exception as error:  # an option that fails here must not hide the others
            runs[name] = {"failed": f"{type(error).__name__}: {error}".splitlines()[0]}
            continue
        run["mfu"] = flops * run["samples_per_s"] / peak if peak else None
        runs[name] = run
        print(f"train {name}: {run['samples_per_s']:.2f} samples/s, "
              f"peak {run['peak_memory_gib']:.2f} GiB, MFU {run['mfu']}", flush=True)  # fmt: skip
    return {
        "resolution": args.resolution,
        "batch": args.train_batch,
        "dtype": train_precision(args),  # what ran: a CPU trains in float32
        "timed_steps": args.train_steps,
        "unet_train_flops_per_sample": flops,
        "peak_flops": peak,
        "runs": runs,
    }


def detect_figures(model: str, args: argparse.Namespace, env: dict) -> dict[str, Any]:
    """Step-1 detection seconds, its floor and peak memory, with and without xformers."""
    from detect.cli import DTYPES
    from detect.models import load_pipeline
    from scripts.bench_floor import detection_ratios

    device = torch.device(args.device)
    dtype = DTYPES[args.detect_dtype] if device.type == "cuda" else torch.float32
    pipe = load_pipeline(model, device=device, dtype=dtype)
    attention = ["sdpa"] + (["xformers"] if env["installed"]["xformers"] else [])
    figures: dict[str, Any] = {"prompts": args.prompts, "n": args.n, "batch": args.detect_batch,
                               "dtype": str(dtype).removeprefix("torch.")}  # fmt: skip
    for backend in attention:
        if backend == "xformers":
            pipe.enable_xformers_memory_efficient_attention()
        reset_peak(device)
        row = detection_ratios(pipe, args.prompts, args.n, args.detect_batch, args.repeats,
                               ("magnitude",))["magnitude"]  # fmt: skip
        row["peak_memory_gib"] = peak_memory_gib(device)
        figures[backend] = row
        print(f"detect ({backend}): {row['seconds']:.2f} s, floor {row['floor_seconds']:.2f} s, "
              f"ratio {row['ratio']:.2f}", flush=True)  # fmt: skip
    return figures


def prepare_model(args: argparse.Namespace, workdir: Path) -> str:
    """The pipeline folder the check measures."""
    if args.model == "random":
        from train.random_model import build_random_pipeline

        return str(build_random_pipeline(workdir / "sd15-random", "sd15", 0, args.resolution))
    if args.model == "tiny":
        from train.tiny_model import TinyModelConfig, build_tiny_pipeline

        config = TinyModelConfig(resolution=args.resolution, vae_train_steps=0)
        return str(build_tiny_pipeline(workdir / "tiny", config, progress=False))
    return args.model


def prepare_data(args: argparse.Namespace, workdir: Path) -> str:
    """A phantom dataset at the check's resolution."""
    from hf_datasets.phantom import PhantomConfig, generate_phantom
    from hf_datasets.storage import save_dataset

    rows = max(16, args.train_batch * 2)
    dataset = generate_phantom(PhantomConfig(num_patients=rows, resolution=args.resolution))
    return str(save_dataset(dataset, workdir / "data"))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu_check.json", help="the JSON of figures to write")
    p.add_argument("--model", default="random",
                   help="random (SD v1.5 sized), tiny, or a pipeline folder")  # fmt: skip
    p.add_argument("--data", default="", help="a dataset folder (default: phantoms built here)")
    p.add_argument("--device", default="cuda" if gpu else "cpu")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--train_batch", type=int, default=8 if gpu else 2)
    p.add_argument("--train_steps", type=int, default=20, help="timed steps per option set")
    p.add_argument("--train_warmup", type=int, default=3)
    p.add_argument("--train_dtype", default="bf16", choices=("bf16", "fp16"))
    p.add_argument("--train_options", nargs="+", default=list(TRAIN_OPTIONS),
                   choices=tuple(TRAIN_OPTIONS))  # fmt: skip
    p.add_argument("--prompts", type=int, default=500)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--detect_batch", type=int, default=64 if gpu else 8)
    p.add_argument("--detect_dtype", default="fp16", choices=("fp16", "bf16", "fp32"))
    p.add_argument("--repeats", type=int, default=1, help="paired detection runs (median)")
    p.add_argument("--peak_tflops", type=float, help="the device's dense peak (default: by name)")
    p.add_argument("--skip", nargs="*", default=[], choices=("train", "detect"))
    args = p.parse_args(argv)
    if min(args.train_steps, args.prompts, args.n, args.train_batch, args.detect_batch) < 1:
        p.error("--train_steps, --prompts, --n and the batch sizes must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check and write its JSON."""
    args = parse_args(argv)
    device = torch.device(args.device)
    started = time.perf_counter()
    report: dict[str, Any] = {"environment": environment(device), "model": args.model}
    print(json.dumps(report["environment"]), flush=True)
    with tempfile.TemporaryDirectory(dir=os.environ.get("CHEXMEM_CHECK_DIR")) as tmp:
        workdir = Path(tmp)
        model = prepare_model(args, workdir)
        report["build_seconds"] = time.perf_counter() - started
        if "train" not in args.skip:
            data = args.data or prepare_data(args, workdir)
            report["train"] = train_figures(model, data, args,
                                            report["environment"])  # fmt: skip
        if "detect" not in args.skip:
            report["detect"] = detect_figures(model, args, report["environment"])
    report["seconds"] = time.perf_counter() - started
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    partial.write_text(json.dumps(report, indent=1) + "\n")
    partial.replace(out)
    print(f"wrote {out} in {report['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
