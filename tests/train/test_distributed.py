"""Two-process data-parallel training on CPU (gloo), launched the way users launch: torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def test_two_ranks_see_different_data_and_end_identical(base_args: dict, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    flags = {
        **base_args,
        "output_dir": str(out),
        "max_train_steps": 4,
        "log_sample_ids": True,
        # the memorization filter's counts are gathered over ranks (checkpoint-3 and the end)
        "memorization_filter_top_fraction": 0.5,
    }
    argv = []
    for key, value in flags.items():
        argv += [f"--{key}"] if value is True else [f"--{key}", str(value)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",  # a free port: never another run's
        "-m",
        "train",
        *argv,
    ]
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads((out / "chexmem_train.json").read_text())
    assert run["num_processes"] == 2
    fingerprints = run["rank_weight_fingerprints"]
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]
    seen = []
    for rank in (0, 1):
        lines = (out / "logs" / f"samples_rank{rank}.jsonl").read_text().splitlines()
        assert len(lines) == 4
        seen.append([i for line in lines for i in json.loads(line)["ids"]])
    assert seen[0] != seen[1]
    step_batches = [
        set(json.loads(a)["ids"]) & set(json.loads(b)["ids"])
        for a, b in zip(
            (out / "logs" / "samples_rank0.jsonl").read_text().splitlines(),
            (out / "logs" / "samples_rank1.jsonl").read_text().splitlines(),
            strict=True,
        )
    ]
    # rows at one step differ between ranks (a duplicated image may legitimately appear on both)
    assert sum(len(s) for s in step_batches) < 4
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    weighting = run["sample_weighting"]
    assert weighting["samples_seen"] == 2 * 4 * 4 and 0 < weighting["samples_dropped"] <= 16
    state = json.loads((out / "checkpoint-3" / "chexmem_state.json").read_text())
    assert state["drop_counts"]["seen"] == 2 * 3 * 4
