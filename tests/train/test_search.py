"""train.search (MemControl): real short fine-tunes scored by both objectives, resumable."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from scripts.cli import main
from train.search import SearchConfig, make_study, run_search


def config(tiny_model: Path, phantom_data: Path, out: Path, **overrides: object) -> SearchConfig:
    """A study of 2-step trials, small enough for CI."""
    settings = {
        "pretrained_model_name_or_path": str(tiny_model),
        "train_data_dir": str(phantom_data),
        "output_dir": str(out),
        "n_trials": 3,
        "max_train_steps": 2,
        "train_batch_size": 4,
        "memorization_batches": 2,
        "quality_generations": 6,
        "num_inference_steps": 2,
        **overrides,
    }
    return SearchConfig(**settings)  # type: ignore[arg-type]


def test_search_writes_trials_front_and_resumes(
    tiny_model: Path, phantom_data: Path, tmp_path: Path
) -> None:
    first = config(tiny_model, phantom_data, tmp_path / "s")
    study = make_study(first)
    blocks = 7  # the tiny UNet's transformer blocks
    study.enqueue_trial({"family": "attention", **{f"block_{i}": 0 for i in range(blocks)}})
    table = run_search(first)
    assert list(table["state"]) == ["FAIL", "COMPLETE", "COMPLETE"]  # empty mask: recorded
    done = table[table["state"] == "COMPLETE"]
    assert (done["memorization"] > 0).all() and (done["fid"] >= 0).all()
    assert done["trainable_share"].between(0, 1, inclusive="neither").all()
    front = sorted((tmp_path / "s" / "front").glob("trial_*[0-9].json"))
    assert len(front) == int(table["pareto"].sum()) >= 1
    saved = json.loads(front[0].read_text())
    assert {"family", "block_mask", "learning_rate", "base_model", "trainable_share"} <= set(saved)
    assert "--trainable_mask" in saved["command"] and (tmp_path / "s" / "pareto.png").is_file()
    # resume: the same study, one more trial; the first three are kept as they were
    again = run_search(config(tiny_model, phantom_data, tmp_path / "s", n_trials=4))
    assert len(again) == 4
    pd.testing.assert_frame_equal(
        again.iloc[:3][["trial", "state", "fid"]], table[["trial", "state", "fid"]]
    )


def test_random_baseline_from_the_command_line(
    tiny_model: Path, phantom_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "r"
    code = main(["search", "--pretrained_model_name_or_path", str(tiny_model),
                 "--train_data_dir", str(phantom_data), "--output_dir", str(out),
                 "--sampler", "random", "--n_trials", "1", "--max_train_steps", "2",
                 "--train_batch_size", "4", "--quality_generations", "4",
                 "--num_inference_steps", "2", "--memorization_batches", "1"])  # fmt: skip
    assert code == 0
    assert len(pd.read_csv(out / "trials.csv")) == 1
