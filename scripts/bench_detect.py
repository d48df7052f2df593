"""Detection speed: batched noise magnitudes against per-prompt pipeline calls, in one run.

    OMP_NUM_THREADS=1 python -m scripts.bench_detect --model DIR [--prompts 64] [--n 4]

Both sides compute the same thing, the text-conditional noise magnitude of every step of
n guided DDIM generations per prompt: `noise_magnitudes` batches prompts x generations into
UNet calls of `--batch_size` generations; the baseline calls `StableDiffusionPipeline` once
per prompt (``num_images_per_prompt=n``) and reads the two CFG branches with a UNet forward
hook. Measured twice: whole trajectories, and step-1 detection (the baseline stops after
its first step through ``callback_on_step_end``). Prints a markdown table and where the
batched run's time goes (torch profiler, top operators).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from detect.magnitude import MagnitudeConfig, noise_magnitudes, seed_of

PROMPT = "Frontal {view} chest radiograph of a {age}-year-old {sex}. {finding}."
FINDINGS = ["Cardiomegaly", "Pleural effusion", "No acute cardiopulmonary abnormality", "Edema"]


def bench_prompts(count: int) -> list[str]:
    """Distinct report-style prompts."""
    return [
        PROMPT.format(
            view="AP" if i % 2 else "PA",
            age=20 + i % 70,
            sex="woman" if i % 3 else "man",
            finding=FINDINGS[i % len(FINDINGS)],
        )
        for i in range(count)
    ]


def per_prompt_pipeline(pipe: Any, prompts: list[str], n: int, steps: int, stop: int) -> float:
    """Seconds for one pipeline call per prompt, magnitudes read by a UNet hook."""
    magnitudes: list[torch.Tensor] = []

    def record(module: Any, inputs: Any, output: Any) -> None:
        eps_u, eps_c = output[0].chunk(2)
        magnitudes.append((eps_c - eps_u).flatten(1).norm(dim=1))

    def stop_early(pipeline: Any, step: int, timestep: Any, kwargs: dict) -> dict:
        if step + 1 >= stop:
            pipeline._interrupt = True
        return kwargs

    handle = pipe.unet.register_forward_hook(record)
    start = time.perf_counter()
    try:
        for i, prompt in enumerate(prompts):
            generators = [torch.Generator().manual_seed(seed_of(i, j)) for j in range(n)]
            pipe(
                prompt,
                num_images_per_prompt=n,
                num_inference_steps=steps,
                guidance_scale=7.5,
                generator=generators,
                output_type="latent",
                callback_on_step_end=stop_early,
            )
    finally:
        handle.remove()
    return time.perf_counter() - start


def batched(pipe: Any, prompts: list[str], n: int, steps: int, stop: int, batch: int) -> float:
    """Seconds for `noise_magnitudes` over all prompts at once."""
    config = MagnitudeConfig(
        num_inference_steps=steps,
        num_generations=n,
        max_steps=stop,
        batch_size=batch,
        progress=False,
    )
    start = time.perf_counter()
    noise_magnitudes(pipe, prompts, config)
    return time.perf_counter() - start


def profile(pipe: Any, prompts: list[str], n: int, steps: int, batch: int) -> str:
    """The batched step-1 run's top operators by self CPU time."""
    from torch.profiler import profile as torch_profile

    with torch_profile() as prof:
        batched(pipe, prompts, n, steps, 1, batch)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8)


def main() -> None:
    """Run both comparisons and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch_size", type=int, default=32)
    args = parser.parse_args()
    from detect.models import load_pipeline

    pipe = load_pipeline(args.model)
    prompts = bench_prompts(args.prompts)
    batched(pipe, prompts[:2], args.n, 2, None, args.batch_size)  # warm-up
    print(f"{args.prompts} prompts x {args.n} generations, DDIM {args.steps}, guidance 7.5")
    print("| work | batched s | per-prompt pipeline s | ratio | batched s per prompt |")
    print("|---|---|---|---|---|")
    for name, stop in (("whole trajectories", args.steps), ("step-1 detection", 1)):
        ours = batched(pipe, prompts, args.n, args.steps, stop, args.batch_size)
        theirs = per_prompt_pipeline(pipe, prompts, args.n, args.steps, stop)
        print(
            f"| {name} | {ours:.2f} | {theirs:.2f} | {theirs / ours:.1f}x | "
            f"{ours / len(prompts):.4f} |"
        )
    print(profile(pipe, prompts, args.n, args.steps, args.batch_size))


if __name__ == "__main__":
    main()
