"""Phantom generator throughput on one core: rendering alone and the whole dataset build.

    OMP_NUM_THREADS=1 python -m scripts.bench_phantom [--sizes 64 128 256] [--images 300]

Prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np
import torch

from hf_datasets.label_stats import LabelSampler
from hf_datasets.phantom import PhantomConfig, generate_phantom
from hf_datasets.phantom_render import render, sample_anatomy, vary_study


def render_rate(size: int, images: int, seed: int = 0) -> float:
    """Images per second for anatomy sampling + study variation + rendering."""
    sampler, rng = LabelSampler(), np.random.default_rng(seed)
    start = time.perf_counter()
    for _ in range(images):
        anatomy = vary_study(sample_anatomy(rng), rng)
        render(anatomy, sampler.labels(rng), sampler.view(rng), size, rng)
    return images / (time.perf_counter() - start)


def dataset_rate(size: int, patients: int, seed: int = 0) -> tuple[float, int]:
    """Rows per second for `generate_phantom` (labels, prompts, PNG encoding, Arrow writing)."""
    import datasets

    with tempfile.TemporaryDirectory() as cache:
        datasets.config.HF_DATASETS_CACHE = cache
        start = time.perf_counter()
        dataset = generate_phantom(PhantomConfig(num_patients=patients, resolution=size, seed=seed))
        rows = sum(len(part) for part in dataset.values())
        return rows / (time.perf_counter() - start), rows


def main() -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--images", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    machine = platform.processor() or platform.machine()
    print(f"machine: {machine}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    print("| size | render only (img/s) | dataset build (rows/s) | rows |")
    print("|---|---|---|---|")
    for size in args.sizes:
        render_rate(size, 5)  # warm the cached grids
        rate = render_rate(size, args.images)
        build, rows = dataset_rate(size, max(10, args.images // 2))
        print(f"| {size} px | {rate:.0f} | {build:.0f} | {rows} |")


if __name__ == "__main__":
    main()
