"""`chexmem train` and `python -m train` share flags; model card and the exact Hub upload folder."""

from __future__ import annotations

import argparse
import os
import uuid
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from scripts.cli import build_parser
from train.cli import main as train_main
from train.config import TrainConfig, add_train_flags, config_from_args
from train.hub import push_output, upload_files
from train.model_card import write_model_card
from train.trainer import train


def test_flags_cover_every_config_field_and_yaml(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_train_flags(parser)
    args = parser.parse_args(
        [
            "--mode",
            "lora",
            "--rank",
            "8",
            "--validation_prompts",
            "a",
            "b c",
            "--use_ema",
            "--snr_gamma",
            "5",
        ]
    )
    config = config_from_args(args)
    assert (
        config.mode,
        config.rank,
        config.validation_prompts,
        config.use_ema,
        config.snr_gamma,
    ) == ("lora", 8, ["a", "b c"], True, 5.0)
    assert config_from_args(parser.parse_args([])) == TrainConfig()
    top = build_parser().parse_args(["train", "--mode", "lora", "--rank", "8"])
    assert config_from_args(top).rank == 8


def test_mitigation_and_preset_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_train_flags(parser)
    flags = [
        "--memorization_filter_top_fraction",
        "0.1",
        "--caption_augmentation",
        "random_word_addition",
        "--caption_augmentation_prob",
        "0.5",
        "--caption_augmentation_words",
        "4",
        "--trainable_preset",
        "cross_attention",
    ]
    config = config_from_args(parser.parse_args(flags))
    assert (
        config.memorization_filter_top_fraction,
        config.caption_augmentation,
        config.caption_augmentation_prob,
        config.caption_augmentation_words,
        config.trainable_preset,
        config.mode,
    ) == (0.1, "random_word_addition", 0.5, 4, "cross_attention", "subset")
    inf = config_from_args(parser.parse_args(["--memorization_filter_threshold", "inf"]))
    assert inf.memorization_filter_threshold == float("inf") and inf.memorization_filter
    yaml_file = tmp_path / "train.yaml"
    yaml_file.write_text(
        "memorization_filter_threshold: 2.0\nmemorization_filter_top_fraction: 0.1\n"
    )
    assert train_main(["--config", str(yaml_file)]) == 2
    assert "not both" in capsys.readouterr().err
    yaml_file.write_text("caption_augmentation: shuffle\n")
    assert train_main(["--config", str(yaml_file)]) == 2
    assert "--caption_augmentation must be one of random_caption" in capsys.readouterr().err


def test_model_card_lists_training_time_mitigation(base_args: dict) -> None:
    result = train(
        TrainConfig(
            **{**base_args, "max_train_steps": 2, "checkpointing_steps": 0},
            memorization_filter_top_fraction=0.5,
            conditioning_dropout_prob=0.0,
            caption_augmentation="random_word_addition",
            trainable_preset="cross_attention",
        )
    )
    text = ModelCard.load(write_model_card(result.output_dir)).text
    assert "noise-magnitude filter (drop top 50% of each batch): 4 of 8 samples dropped" in text
    assert "caption augmentation random_word_addition (p 0.1, 1 word(s))" in text
    assert "preset `cross_attention`" in text


def test_module_entry_point_reads_yaml_and_reports_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "train.yaml"
    config.write_text("mode: subset\n")
    assert train_main(["--config", str(config)]) == 2
    assert "--mode subset needs --trainable_params" in capsys.readouterr().err


def test_model_card_and_upload_folder(base_args: dict) -> None:
    result = train(TrainConfig(**{**base_args, "mode": "lora"}))
    card_path = write_model_card(result.output_dir)
    card = ModelCard.load(card_path)
    assert card.data.library_name == "diffusers" and "lora" in card.data.tags
    assert "trainable parameters" in card.text and "conditioning dropout 0.1" in card.text
    assert "| training-time mitigation | none |" in card.text
    files = upload_files(result.output_dir)
    assert "pytorch_lora_weights.safetensors" in files and "README.md" in files
    assert not any(f.startswith("checkpoint-") for f in files)
    assert "logs/metrics.jsonl" in files


def test_push_needs_a_token(
    base_args: dict, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from hf_datasets.errors import ChexmemError

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(ChexmemError, match="needs a token"):
        push_output(tmp_path, "someone/model")


@pytest.mark.skipif(
    not os.environ.get("HF_TOKEN"), reason="the real Hub upload runs only with HF_TOKEN"
)
def test_real_push(base_args: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import HfApi

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    result = train(TrainConfig(**{**base_args, "mode": "lora"}))
    write_model_card(result.output_dir)
    api = HfApi()
    repo = f"{api.whoami()['name']}/chexmem-test-{uuid.uuid4().hex[:8]}"
    try:
        push_output(result.output_dir, repo)
        assert set(upload_files(result.output_dir)) <= set(api.list_repo_files(repo))
    finally:
        api.delete_repo(repo, missing_ok=True)
