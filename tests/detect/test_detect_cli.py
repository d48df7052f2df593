"""`chexmem detect` / `chexmem tokens` as users run them, and the 2-process sharded run."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from scripts.cli import main
from tests.helpers import assert_one_line_error, run_chexmem

FAST = ["--num_inference_steps", "4", "--num_generations", "2", "--seed", "3"]


def test_detect_on_a_dataset_writes_tables_and_detection_summary(
    tiny_model: Path, phantom_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "det"
    argv = ["detect", "--model", str(tiny_model), "--dataset", str(phantom_data), *FAST]
    assert main([*argv, "--first_k", "2", "--output_dir", str(out)]) == 0
    scores = pd.read_csv(out / "scores.csv")
    assert scores["prompt"].is_unique and scores["label"].sum() == 2  # 2 duplicated rows
    assert {"score_first_1", "score_first_2", "score_all_steps"} <= set(scores.columns)
    table = pd.read_parquet(out / "magnitudes.parquet")
    assert len(table) == len(scores) * 2 * 4
    assert list(table.columns) == [
        "prompt_id", "generation", "seed", "step", "timestep", "magnitude"
    ]  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["prompts"] == len(scores) and summary["processes"] == 1
    assert 0.0 <= summary["detection"]["score_first_1"]["auc"] <= 1.0
    assert "AUC" in capsys.readouterr().out


def test_detect_prompt_file_and_errors(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Frontal PA chest radiograph.\n\nCardiomegaly.\n")
    out = tmp_path / "det"
    argv = ["detect", "--model", str(tiny_model), "--prompts", str(prompts), *FAST]
    assert main([*argv, "--max_steps", "1", "--output_dir", str(out)]) == 0
    scores = pd.read_csv(out / "scores.csv")
    assert scores["prompt"].tolist() == ["Frontal PA chest radiograph.", "Cardiomegaly."]
    assert "detection" not in json.loads((out / "summary.json").read_text())
    assert main([*argv, "--save_images", "--output_dir", str(out / "with-images")]) == 0
    images = pd.read_csv(out / "with-images" / "images.csv")
    assert len(images) == 4 and images["seed"].is_unique
    with Image.open(out / "with-images" / images["file_name"].iloc[0]) as image:
        assert image.size == (64, 64)
    capsys.readouterr()
    assert main([*argv, "--save_images", "--max_steps", "1", "--output_dir", str(out)]) == 2
    assert "--save_images needs whole trajectories" in capsys.readouterr().err
    assert main(["detect", "--model", str(tiny_model), "--output_dir", str(out)]) == 2
    assert "--prompts FILE or --dataset DIR" in capsys.readouterr().err
    assert main(["detect", "--model", str(tmp_path), "--prompts", str(prompts)]) == 2
    assert "is not a model" in capsys.readouterr().err


def test_tokens_command_renders_and_checks_removal(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "tok"
    prompt = "Frontal AP chest radiograph of a 42-year-old man. Cardiomegaly."
    argv = ["tokens", "--model", str(tiny_model), "--prompt", prompt, *FAST]
    assert main([*argv, "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "top tokens:" in printed and "score" in printed
    assert "\x1b[" not in printed and prompt.split()[0].lower() in printed  # not a terminal
    tokens = pd.read_csv(out / "tokens.csv")
    assert tokens["word"].iloc[0] == "frontal" and (tokens["significance"] > 0).all()
    removal = json.loads((out / "tokens.json").read_text())["removal"][0]
    assert len(removal["removed"]) == 3
    assert (out / "tokens.html").read_text().count("<span") > 5


def test_two_processes_give_the_single_process_result(
    tiny_model: Path, phantom_data: Path, tmp_path: Path
) -> None:
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    flags = ["--model", str(tiny_model), "--dataset", str(phantom_data), *FAST, "--batch_size", "3"]
    assert main(["detect", *flags, "--output_dir", str(single)]) == 0
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--standalone", "-m", "detect", *flags, "--output_dir", str(sharded),
    ]  # fmt: skip
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((sharded / "summary.json").read_text())["processes"] == 2
    a = pd.read_parquet(single / "magnitudes.parquet")
    b = pd.read_parquet(sharded / "magnitudes.parquet")
    pd.testing.assert_frame_equal(a.drop(columns="magnitude"), b.drop(columns="magnitude"))
    pd.testing.assert_series_equal(a["magnitude"], b["magnitude"], rtol=1e-5)


def test_similarity_command_matches_generations_to_the_training_set(
    tiny_model: Path,
    phantom_data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    generations = tmp_path / "gen"
    argv = ["detect", "--model", str(tiny_model), "--dataset", str(phantom_data), *FAST]
    flags = ["--num_prompts", "3", "--save_images", "--output_dir", str(generations)]
    assert main([*argv, *flags]) == 0
    out = tmp_path / "sim"
    argv = ["similarity", "--generations", str(generations), "--dataset", str(phantom_data)]
    assert main([*argv, "--output_dir", str(out)]) == 0
    matches = pd.read_csv(out / "matches.csv")
    assert len(matches) == 3 * 2 and matches["nearest_similarity"].between(-1, 1).all()
    assert {"nearest_patient", "is_copy", "file_name"} <= set(matches.columns)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["embedder"] == "ncc-64" and 0 <= summary["copy_rate"] <= 1
    assert "test images" in summary["threshold_from"]
    assert "copy threshold" in capsys.readouterr().out
    assert summary["threshold_calibration"]["num_values"] == 5  # the 5 test images
    assert summary["threshold_calibration"]["status"] == "few_values"
    # held-out images that are training images: threshold 1.0, said so, not silently
    with caplog.at_level(logging.WARNING, logger="detect"):
        assert main([*argv, "--heldout_split", "train", "--output_dir", str(out / "same")]) == 0
    calibration = json.loads((out / "same" / "summary.json").read_text())["threshold_calibration"]
    assert calibration["status"] == "degenerate" and calibration["value"] == pytest.approx(1.0)
    assert "nothing is ever a copy" in caplog.text and "--copy_threshold" in caplog.text
    assert main([*argv, "--copy_threshold", "0.9", "--output_dir", str(out / "given")]) == 0
    summary = json.loads((out / "given" / "summary.json").read_text())
    assert summary["threshold"] == 0.9 and summary["threshold_calibration"]["status"] == "given"
    # a training image given as a "generation" is a copy of itself
    from hf_datasets.storage import load_dataset_dir

    own = tmp_path / "own"
    own.mkdir()
    load_dataset_dir(phantom_data)["train"][0]["image"].save(own / "x.png")
    assert main([*argv[:2], str(own), *argv[3:], "--output_dir", str(out / "own")]) == 0
    row = pd.read_csv(out / "own" / "matches.csv").iloc[0]
    assert row["nearest_similarity"] == pytest.approx(1.0, abs=1e-4) and row["is_copy"]


def test_neurons_command_localizes_and_caches_the_reference(
    tiny_model: Path, phantom_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "nemo"
    argv = [
        "neurons", "--model", str(tiny_model), "--dataset", str(phantom_data), "--memorized_only",
        "--reference_dataset", str(phantom_data), "--reference_split", "test",
        "--num_seeds", "3", "--num_inference_steps", "4", "--output_dir", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    assert "tau_mem" in capsys.readouterr().out
    per_prompt = pd.read_csv(out / "neurons_per_prompt.csv")
    assert len(per_prompt) == 2 and (per_prompt["label"] == 1).all()
    saved = json.loads((out / "neurons.json").read_text())
    assert saved["reference_from_cache"] is False and 0 < saved["tau_mem"] <= 1
    calibration = saved["tau_mem_calibration"]  # on the test split's few prompts: said so
    assert calibration["status"] == "few_values" and "--num_reference" in calibration["warning"]
    assert main(argv) == 0
    assert json.loads((out / "neurons.json").read_text())["reference_from_cache"] is True


def test_blank_lines_of_a_prompt_file_are_skipped_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from detect.prompt_sets import read_prompt_file

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\ufeffFrontal PA chest radiograph.\n\n   \nCardiomegaly.\n\n")
    with caplog.at_level(logging.INFO, logger="detect"):
        frame = read_prompt_file(prompts)
    assert frame["prompt"].tolist() == ["Frontal PA chest radiograph.", "Cardiomegaly."]
    assert "skipped 3 blank line(s)" in caplog.text


def test_a_prompt_file_that_is_not_utf8_is_one_line(tiny_model: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(
        "Frontal PA chest radiograph.\nEnlarged c\u00e6rdiac silhouette.\n".encode("latin-1")
    )
    out = tmp_path / "det"
    result = run_chexmem("detect", "--model", str(tiny_model), "--prompts", str(prompts),
                         "--output_dir", str(out))  # fmt: skip
    assert_one_line_error(result, str(prompts), "line 2", "byte 0xe6", "save it as UTF-8")
    assert not out.exists()


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.csv", b"", "cannot read prompt file"),
        ("latin.csv", "prompt\nc\u00e6rdiac\n".encode("latin-1"), "line 2"),
        ("broken.jsonl", b'{"prompt": "a"\n', "cannot read prompt file"),
        ("broken.parquet", b"not parquet", "cannot read prompt file"),
        (
            "captions.csv",
            b"id,caption\n1,Frontal PA.\n",
            "no 'prompt' column (it has: id, caption)",
        ),
    ],
)
def test_unreadable_prompt_tables_are_one_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, content: bytes, message: str
) -> None:
    prompts = tmp_path / name
    prompts.write_bytes(content)
    out = tmp_path / "det"
    argv = ["detect", "--model", str(tmp_path), "--prompts", str(prompts), "--output_dir", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("chexmem: error:") and len(err.splitlines()) == 1
    assert message in err and str(prompts) in err and not out.exists()
