"""train.search (MemControl): real short fine-tunes scored by both objectives, resumable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from detect.models import load_pipeline
from hf_datasets.errors import ChexmemError
from scripts.cli import main
from tests.conftest import OPEN_CXR, needs
from train.search import SearchConfig, TrialContext, hypervolume, make_study, run_search


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
    assert "--from_search" in saved["command"] and (tmp_path / "s" / "pareto.png").is_file()
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["complete"] == 2 and summary["failed"] == 1 and summary["hypervolume"] > 0
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
                 "--train_data_dir", str(phantom_data),
               "--output_dir", str(out),
                 "--sampler", "random", "--n_trials", "1", "--max_train_steps", "2",
                 "--train_batch_size", "4", "--quality_generations", "4",
                 "--num_inference_steps", "2", "--memorization_batches", "1"])  # fmt: skip
    assert code == 0
    assert len(pd.read_csv(out / "trials.csv")) == 1


def negative_share(context: TrialContext) -> float:
    """A user objective, loaded by name: maximise the trainable share."""
    return -context.result.trainable_share


def test_families_objectives_by_name_and_stage_two_transfer(
    tiny_model: Path, phantom_data: Path, tmp_path: Path
) -> None:
    objectives = ["kid", "copy_rate", "tests.train.test_search:negative_share"]
    first = config(tiny_model, phantom_data, tmp_path / "s", n_trials=3, objectives=objectives)
    study = make_study(first)
    off = {f"block_{i}": 0 for i in range(7)}
    lora = {"family": "lora", "lora_rank": 2, **off, "block_3": 1, "learning_rate": 1e-4}
    study.enqueue_trial(lora)
    study.enqueue_trial({"family": "difffit", **off, "block_0": 1, "block_6": 1})
    study.enqueue_trial(lora)  # proposed again: scored from the first, not trained again
    table = run_search(first)
    assert study.trials[2].user_attrs["duplicate_of"] == 0
    assert study.trials[2].values == study.trials[0].values
    table = table.iloc[:2]
    assert list(table["state"]) == ["COMPLETE", "COMPLETE"]
    assert list(table["family"]) == ["lora", "difffit"] and table["lora_rank"].iloc[0] == 2
    assert table["copy_rate"].between(0, 1).all() and (table["kid"] > -1).all()
    assert (table[objectives[2]] == -table["trainable_share"]).all()
    with pytest.raises(ChexmemError, match=r"optimises .*kid"):
        make_study(config(tiny_model, phantom_data, tmp_path / "s"))
    with pytest.raises(ChexmemError, match="unknown objective 'ssim'"):
        config(tiny_model, phantom_data, tmp_path / "x", objectives=["ssim"])

    # stage 2: one flag takes a front configuration to other data (another phantom cohort)
    from hf_datasets.phantom import PhantomConfig, generate_phantom
    from hf_datasets.storage import save_dataset

    other = save_dataset(generate_phantom(PhantomConfig(num_patients=8, resolution=64, seed=7)),
                         tmp_path / "other")  # fmt: skip
    for saved in sorted((tmp_path / "s" / "front").glob("trial_*.json")):
        spec = json.loads(saved.read_text())
        out = tmp_path / f"stage2-{saved.stem}"
        code = main(["train", "--from_search", str(saved), "--train_data_dir", str(other),
                     "--output_dir", str(out), "--max_train_steps", "2",
                     "--train_batch_size", "4", "--report_to", "jsonl"])  # fmt: skip
        assert code == 0
        run = json.loads((out / "chexmem_train.json").read_text())
        assert run["config"]["learning_rate"] == pytest.approx(spec["learning_rate"])
        assert run["trainable_share"] == pytest.approx(spec["trainable_share"], rel=1e-6)
        assert run["config"]["train_data_dir"] == str(other)
        assert load_pipeline(out).unet is not None


@needs(OPEN_CXR)
def test_a_found_mask_transfers_to_real_chest_x_rays(
    tiny_model: Path, phantom_data: Path, tmp_path: Path
) -> None:
    """Phantom -> open-cxr (real, openly licensed radiographs): one flag."""
    from hf_datasets.folder import FolderConfig, load_image_folder
    from hf_datasets.storage import save_dataset

    first = config(tiny_model, phantom_data, tmp_path / "s", n_trials=1, families=["attention"])
    run_search(first)
    saved = next((tmp_path / "s" / "front").glob("trial_*.json"))
    real = load_image_folder(FolderConfig(root=str(OPEN_CXR), resolution=64, max_rows=40))
    data = save_dataset(real, tmp_path / "open-cxr")
    out = tmp_path / "stage2"
    code = main(["train", "--from_search", str(saved), "--train_data_dir", str(data),
                 "--output_dir", str(out), "--max_train_steps", "2", "--train_batch_size", "4",
                 "--report_to", "jsonl"])  # fmt: skip
    assert code == 0
    run = json.loads((out / "chexmem_train.json").read_text())
    assert run["trainable_share"] == pytest.approx(json.loads(saved.read_text())["trainable_share"])


def test_hypervolume_of_a_two_point_front() -> None:
    points = np.array([[1.0, 3.0], [2.0, 1.0], [3.0, 3.5]])  # the last is dominated
    assert hypervolume(points, np.array([4.0, 4.0])) == pytest.approx(3 * 1 + 2 * 2)
    assert hypervolume(points, np.array([0.5, 0.5])) == 0.0


def test_two_workers_share_one_study(tiny_model: Path, phantom_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "w"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--standalone", "-m", "train.search",
               "--pretrained_model_name_or_path", str(tiny_model),
               "--train_data_dir", str(phantom_data), "--output_dir", str(out),
               "--n_trials", "4", "--max_train_steps", "2", "--train_batch_size", "4",
               "--quality_generations", "4", "--num_inference_steps", "2",
               "--memorization_batches", "1"]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    import optuna

    study = optuna.load_study(study_name="memcontrol", storage=f"sqlite:///{out / 'study.db'}")
    assert 4 <= len(study.trials) <= 5  # each worker stops once the study holds n_trials
    assert len({t.user_attrs["worker"] for t in study.trials}) == 2
    assert len(pd.read_csv(out / "trials.csv")) == len(study.trials)


def _open_study(args: tuple) -> str:
    """One worker's start: wait for the others, then create or load the study."""
    search, barrier = args
    barrier.wait()
    try:
        make_study(search)
    except Exception as error:  # reported back to the test, which names it
        return f"{type(error).__name__}: {error}"[:200]
    return "ok"


@pytest.mark.parametrize("folders", ["one", "each its own"])
def test_workers_starting_together_create_one_study(
    tiny_model: Path, phantom_data: Path, tmp_path: Path, folders: str
) -> None:
    # unguarded, 4 processes creating a fresh SQLite study at once failed in 6 of 10 rounds
    # (UNIQUE constraint on alembic_version, or "table studies already exists"). Workers
    # with one output folder take turns; with their own (machines sharing an RDB) they retry
    import multiprocessing

    import optuna

    context = multiprocessing.get_context("fork")
    for round_ in range(3):
        storage = f"sqlite:///{tmp_path / f'study{round_}.db'}"
        searches = [
            config(tiny_model, phantom_data, tmp_path / f"r{round_}" / f"w{w}", storage=storage)
            if folders == "each its own"
            else config(tiny_model, phantom_data, tmp_path / f"r{round_}", storage=storage)
            for w in range(4)
        ]
        with context.Manager() as manager, context.Pool(4) as pool:
            barrier = manager.Barrier(4)
            outcomes = pool.map(_open_study, [(search, barrier) for search in searches])
        assert outcomes == ["ok"] * 4
        assert optuna.get_all_study_names(storage=storage) == ["memcontrol"]
