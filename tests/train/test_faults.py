"""Faults in real `python -m train` / `chexmem train` processes on the tiny model: kill -9 during
and right after a checkpoint save, then a bit-identical resume; a diverging run stops at its last
good checkpoint, which generates."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from detect.models import load_pipeline
from hf_datasets.errors import ChexmemError
from tests.helpers import assert_one_line_error, run_chexmem
from train.checkpoint import (
    FAULT_PAUSE_ENV,
    STATE_FILE,
    list_checkpoints,
    prune_checkpoints,
    remove_stale,
    resolve_resume,
)
from train.trainer import EMA_FILE, RUN_FILE, TRAINABLE_FILE

REPO = Path(__file__).resolve().parents[2]
# CPU only (bit-identity is promised there), one thread, offline
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true",
       "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}  # fmt: skip
MODEL_PARTS = ("unet", "text_encoder", "vae")


def _flags(options: dict) -> list[str]:
    """TrainConfig options as command-line flags (True: a bare switch)."""
    flags: list[str] = []
    for key, value in options.items():
        flags += [f"--{key}"] if value is True else [f"--{key}", str(value)]
    return flags


def _options(base_args: dict, out: Path) -> dict:
    """6 steps, a checkpoint every 2, with EMA (its state must survive the kills too)."""
    return {**base_args, "output_dir": str(out), "max_train_steps": 6, "checkpointing_steps": 2,
            "use_ema": True, "ema_decay": 0.9}  # fmt: skip


def _train(options: dict, *extra: str) -> subprocess.CompletedProcess:
    """`python -m train` to its end."""
    return subprocess.run([sys.executable, "-m", "train", *_flags(options), *extra], env=ENV,
                          cwd=REPO, capture_output=True, text=True, timeout=600)  # fmt: skip


def _kill_at(options: dict, fault: str, *extra: str) -> str:
    """Start `python -m train`, wait until its save pauses at `fault` ("<step>:<phase>", see
    train/checkpoint.py), kill -9 it there; returns what it printed."""
    out = Path(options["output_dir"])
    paused = out / "fault-paused"
    paused.unlink(missing_ok=True)
    log_path = out.parent / f"{out.name}-{fault.replace(':', '-')}.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "train", *_flags(options), *extra],
            env={**ENV, FAULT_PAUSE_ENV: fault}, cwd=REPO, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 300
        while not (paused.is_file() and paused.read_text() == fault):
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                process.wait()
                pytest.fail(f"never paused at {fault}:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
    paused.unlink()
    return log_path.read_text()


def _model_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved pipeline's weights, keyed by file and name."""
    tensors = {}
    for part in MODEL_PARTS:
        for file in sorted((folder / part).glob("*.safetensors")):
            tensors.update({f"{part}/{file.name}:{k}": v for k, v in load_file(file).items()})
    return tensors


def _max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a and a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _generates_finite(tiny_model: Path, checkpoint: Path) -> bool:
    """Whether the base model with a (full fine-tune) checkpoint's weights generates a finite
    image."""
    pipe = load_pipeline(tiny_model)
    state = load_file(checkpoint / f"0_{TRAINABLE_FILE}")
    assert set(state) == {n for n, _ in pipe.unet.named_parameters()}
    pipe.unet.load_state_dict(state)
    return _finite_image(pipe)


def _finite_image(pipe) -> bool:
    generator = torch.Generator().manual_seed(0)
    image = pipe("Frontal PA chest radiograph", num_inference_steps=2, generator=generator,
                 height=64, width=64, output_type="pt").images  # fmt: skip
    return image.shape == (1, 3, 64, 64) and bool(torch.isfinite(image).all())


def test_kill_9_during_and_right_after_a_save_then_resume_is_bit_identical(
    base_args: dict, tmp_path: Path
) -> None:
    straight = _options(base_args, tmp_path / "straight")
    done = _train(straight)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "killed"
    killed = _options(base_args, out)

    # during the save of checkpoint-4: its files staged, its completion marker not yet written
    _kill_at(killed, "4:partial")
    staged = out / ".checkpoint-4.tmp"
    assert (staged / f"0_{TRAINABLE_FILE}").is_file() and not (staged / STATE_FILE).exists()
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]

    # resume skips the partial checkpoint (and deletes it); killed right after checkpoint-6, the
    # last step's, is in place and before the final model is written
    log = _kill_at(killed, "6:saved", "--resume_from_checkpoint", "latest")
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in log
    assert [p.name for p in list_checkpoints(out)] == [f"checkpoint-{s}" for s in (2, 4, 6)]
    assert not list(out.glob(".checkpoint-*")) and not (out / "model_index.json").exists()

    # resume once more: no step is left to train, only the final save
    resumed = _train(killed, "--resume_from_checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out / 'checkpoint-6'} at step 6" in resumed.stdout
    assert json.loads((out / RUN_FILE).read_text())["global_step"] == 6
    final = _model_tensors(out)
    assert len(final) > 100
    assert _max_abs_diff(_model_tensors(tmp_path / "straight"), final) == 0.0
    for step in (2, 4, 6):  # checkpoints written before and after the kills: the same bits
        for name in (f"0_{TRAINABLE_FILE}", EMA_FILE):
            a = load_file(tmp_path / "straight" / f"checkpoint-{step}" / name)
            assert _max_abs_diff(a, load_file(out / f"checkpoint-{step}" / name)) == 0.0


def test_a_diverging_run_stops_at_its_last_good_checkpoint_which_generates(
    base_args: dict, tiny_model: Path, tmp_path: Path
) -> None:
    # learning rate 1: step 2's loss (weights of checkpoint-1) is large but finite, step 3's
    # (weights of checkpoint-2) is NaN
    out = tmp_path / "nan"
    options = {**base_args, "output_dir": str(out), "max_train_steps": 6,
               "checkpointing_steps": 1, "learning_rate": 1.0}  # fmt: skip
    result = run_chexmem("train", *_flags(options))
    assert_one_line_error(
        result,
        "the loss became nan at step 3 (with the weights of checkpoint-2, now "
        "checkpoint-2.nonfinite)",
        f"the last good checkpoint is {out / 'checkpoint-1'};",
        f"--resume_from_checkpoint {out / 'checkpoint-1'} and a lower --learning_rate",
    )
    # nothing that looks like a finished fine-tune
    for name in (*MODEL_PARTS, "model_index.json", RUN_FILE, "README.md"):
        assert not (out / name).exists(), name
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1"]  # what `latest` picks
    assert _generates_finite(tiny_model, out / "checkpoint-1")
    assert not _generates_finite(tiny_model, out / "checkpoint-2.nonfinite")  # rightly set aside

    # the message's advice works: the lower rate replaces the checkpoint's, the run finishes
    lower = run_chexmem("train", *_flags({**options, "learning_rate": 1e-4}),
                        "--resume_from_checkpoint", str(out / "checkpoint-1"))  # fmt: skip
    assert lower.returncode == 0, lower.stderr[-3000:]
    assert "learning rate 1 (the checkpoint's) replaced by 0.0001" in lower.stdout
    assert all(bool(torch.isfinite(t).all()) for t in _model_tensors(out).values())
    assert _finite_image(load_pipeline(out))


def test_only_complete_checkpoints_count_and_stale_ones_go(tmp_path: Path) -> None:
    folders = {"checkpoint-2": True, "checkpoint-4": False, ".checkpoint-6.tmp": True,
               ".checkpoint-2.old": True, "checkpoint-8.nonfinite": True}  # fmt: skip
    for name, complete in folders.items():
        (tmp_path / name).mkdir()
        if complete:
            (tmp_path / name / STATE_FILE).write_text("{}")
    assert list_checkpoints(tmp_path) == [tmp_path / "checkpoint-2"]
    assert resolve_resume(tmp_path, "latest") == tmp_path / "checkpoint-2"
    with pytest.raises(ChexmemError, match="is not a chexmem checkpoint"):
        resolve_resume(tmp_path, str(tmp_path / "checkpoint-4"))
    remove_stale(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-8.nonfinite",
    ]
    for step in (10, 12, 14):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / STATE_FILE).write_text("{}")
    prune_checkpoints(tmp_path, 1, keep=tmp_path / "checkpoint-10")  # the last good one stays
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-10", "checkpoint-14"]
    assert not list(tmp_path.glob(".checkpoint-*"))
