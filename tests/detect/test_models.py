"""load_pipeline reads every kind of `chexmem train` output, found by its files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from detect.models import load_pipeline
from hf_datasets.errors import ChexmemError
from tests.helpers import assert_one_line_error, run_chexmem
from train.config import TrainConfig
from train.trainer import train


def _fine_tune(tiny_model: Path, data: Path, out: Path, **mode: object) -> Path:
    """A 3-step fine-tune of the tiny model."""
    config = TrainConfig(
        pretrained_model_name_or_path=str(tiny_model),
        train_data_dir=str(data),
        output_dir=str(out),
        train_batch_size=4,
        max_train_steps=3,
        checkpointing_steps=0,
        learning_rate=1e-2,
        report_to="jsonl",
        **mode,
    )
    return train(config).output_dir


def _latents(pipe: StableDiffusionPipeline) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return pipe("Frontal PA chest radiograph.", num_inference_steps=2, generator=generator,
                output_type="latent").images  # fmt: skip


@pytest.mark.parametrize(
    "mode",
    [{"mode": "lora", "rank": 4}, {"mode": "subset", "trainable_params": [r"attn2\.to_v\."]}],
    ids=["lora", "subset"],
)
def test_lora_and_subset_folders_load_onto_their_base_model(
    tiny_model: Path, phantom_data: Path, tmp_path: Path, mode: dict
) -> None:
    out = _fine_tune(tiny_model, phantom_data, tmp_path / "run", **mode)
    tuned = load_pipeline(out)
    base = load_pipeline(tiny_model)
    assert not torch.allclose(_latents(tuned), _latents(base))
    if mode["mode"] == "subset":
        changed = {
            name
            for name, p in tuned.unet.named_parameters()
            if not torch.equal(p, dict(base.unet.named_parameters())[name])
        }
        assert changed and all(".attn2.to_v." in name for name in changed)


def test_a_folder_that_is_no_model_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ChexmemError, match="is not a model"):
        load_pipeline(tmp_path)
    with pytest.raises(ChexmemError, match="missing-folder does not exist"):
        load_pipeline(tmp_path / "missing-folder")


def test_a_missing_local_model_path_is_named_as_such(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("Frontal PA chest radiograph.\n")
    result = run_chexmem("detect", "--model", "./does-not-exist", "--prompts", "p.txt",
                         "--output_dir", "det", cwd=tmp_path)  # fmt: skip
    assert_one_line_error(
        result,
        "model path ./does-not-exist does not exist (give a local folder or a Hub repo id "
        "like org/name)",
    )
    assert not (tmp_path / "det").exists()


def test_a_lora_of_a_relative_base_loads_from_anywhere_until_the_base_is_gone(
    tiny_model: Path, phantom_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copytree(tiny_model, tmp_path / "tiny-sd")
    monkeypatch.chdir(tmp_path)
    out = _fine_tune(Path("tiny-sd"), phantom_data, Path("run"), mode="lora", rank=4)
    run = json.loads((tmp_path / "run" / "chexmem_train.json").read_text())
    assert run["config"]["pretrained_model_name_or_path"] == str((tmp_path / "tiny-sd").resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load_pipeline(tmp_path / out).unet is not None
    shutil.rmtree(tmp_path / "tiny-sd")
    (elsewhere / "p.txt").write_text("Frontal PA chest radiograph.\n")
    result = run_chexmem("detect", "--model", str(tmp_path / "run"), "--prompts", "p.txt",
                         "--output_dir", "det", cwd=elsewhere)  # fmt: skip
    line = assert_one_line_error(
        result, f"base model {tmp_path / 'tiny-sd'} of fine-tune {tmp_path / 'run'} not found"
    )
    assert "stacktrace" not in line
    assert not (elsewhere / "det").exists()
