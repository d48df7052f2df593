"""Training throughput and peak memory: chexmem's trainer against a minimal hand-written loop.

    OMP_NUM_THREADS=1 python -m scripts.bench_train [--model DIR] [--batch 16] [--steps 30]

Each measurement runs in its own process (so peak RSS is its own); both loops use the same
model, data, transform, batch size, optimizer and modes (full, LoRA, subset). Throughput is
timed over the steps after a warm-up. Prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = {
    "full": {"mode": "full"},
    "lora": {"mode": "lora", "rank": 4},
    "subset": {"mode": "subset", "trainable_params": [r"attn2\.to_[kv]\."]},
}


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ours(model: str, data: str, mode: str, batch: int, warmup: int, steps: int) -> dict:
    """samples/s of `train()` from the end of warm-up to the last step (its metrics log)."""
    from train.config import TrainConfig
    from train.tracking import read_metrics
    from train.trainer import train

    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(
            pretrained_model_name_or_path=model,
            train_data_dir=data,
            output_dir=out,
            train_batch_size=batch,
            max_train_steps=warmup + steps,
            checkpointing_steps=0,
            logging_steps=1,
            report_to="jsonl",
            conditioning_dropout_prob=0.1,
            **MODES[mode],
        )
        train(config)
        times = {m["step"]: m["time"] for m in read_metrics(Path(out) / "logs")}
    return {
        "samples_per_s": steps * batch / (times[warmup + steps] - times[warmup]),
        "peak_rss_mb": peak_rss_mb(),
    }


def run_minimal(model: str, data: str, mode: str, batch: int, warmup: int, steps: int) -> dict:
    """The same work in a bare PyTorch loop: no accelerate, no logging, no checks."""
    import torch
    import torch.nn.functional as F

    from train.config import TrainConfig
    from train.data import TrainTransform, collate, load_train_dataset, tokenize
    from train.models import load_components
    from train.trainer import setup_trainable

    torch.manual_seed(0)
    config = TrainConfig(
        pretrained_model_name_or_path=model,
        train_data_dir=data,
        train_batch_size=batch,
        **MODES[mode],
    )
    parts = load_components(model)
    trainable = setup_trainable(parts, config)
    resolution = parts.default_resolution
    dataset = load_train_dataset(config).with_transform(
        TrainTransform(parts.tokenizer, config, resolution)
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch, shuffle=True, collate_fn=collate
    )
    optimizer = torch.optim.AdamW(trainable.groups, lr=config.learning_rate)
    empty = tokenize(parts.tokenizer, [""])
    scheduler = parts.noise_scheduler
    done, start = 0, 0.0
    while done < warmup + steps:
        for batch_data in loader:
            if done == warmup:
                start = time.perf_counter()
            with torch.no_grad():
                latents = (
                    parts.vae.encode(batch_data["pixel_values"]).latent_dist.sample()
                    * parts.vae.config.scaling_factor
                )
            noise = torch.randn_like(latents)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),))
            ids = batch_data["input_ids"]
            ids = torch.where((torch.rand(len(ids)) < 0.1)[:, None], empty, ids)
            with torch.no_grad():
                states = parts.text_encoder(ids)[0]
            pred = parts.unet(scheduler.add_noise(latents, noise, t), t, states).sample
            loss = F.mse_loss(pred, noise)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable.params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done += 1
            if done == warmup + steps:
                break
    return {
        "samples_per_s": steps * batch / (time.perf_counter() - start),
        "peak_rss_mb": peak_rss_mb(),
    }


def measure(kind: str, args: argparse.Namespace, mode: str) -> dict:
    """Run one measurement in a fresh process and read its JSON result."""
    command = [
        sys.executable,
        "-m",
        "scripts.bench_train",
        "--one",
        kind,
        "--mode",
        mode,
        "--model",
        args.model,
        "--data",
        args.data,
        "--batch",
        str(args.batch),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
    ]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def prepare(args: argparse.Namespace, workdir: Path, resolution: int = 64) -> None:
    """Build the tiny model and a phantom dataset (at `resolution`) when none were given."""
    if not args.model:
        from train.tiny_model import build_tiny_pipeline

        args.model = str(build_tiny_pipeline(workdir / "tiny", progress=False))
    if not args.data:
        from hf_datasets.phantom import PhantomConfig, generate_phantom
        from hf_datasets.storage import save_dataset

        dataset = generate_phantom(PhantomConfig(num_patients=40, resolution=resolution))
        args.data = str(save_dataset(dataset, workdir / "data"))


def main() -> None:
    """Print the comparison table (or, with --one, a single measurement as JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="")
    parser.add_argument("--data", default="")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--one", choices=("ours", "minimal"))
    parser.add_argument("--mode", default="full", choices=tuple(MODES))
    args = parser.parse_args()
    if args.one:
        run = run_ours if args.one == "ours" else run_minimal
        print(
            json.dumps(run(args.model, args.data, args.mode, args.batch, args.warmup, args.steps))
        )
        return
    with tempfile.TemporaryDirectory() as workdir:
        prepare(args, Path(workdir))
        print(
            f"batch {args.batch}, {args.steps} timed steps after {args.warmup} warm-up, one thread"
        )
        print(
            "| mode | chexmem samples/s | minimal loop samples/s | ratio "
            "| chexmem peak RSS MiB | minimal peak RSS MiB |"
        )
        print("|---|---|---|---|---|---|")
        for mode in MODES:
            ours, minimal = measure("ours", args, mode), measure("minimal", args, mode)
            ratio = ours["samples_per_s"] / minimal["samples_per_s"]
            print(
                f"| {mode} | {ours['samples_per_s']:.1f} | {minimal['samples_per_s']:.1f} "
                f"| {ratio:.2f} | {ours['peak_rss_mb']:.0f} | {minimal['peak_rss_mb']:.0f} |"
            )


if __name__ == "__main__":
    main()
