"""The `chexmem` command as a user runs it: data commands, config files, errors, the demo."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hf_datasets.storage import load_dataset_dir
from scripts.cli import main
from tests.conftest import OPEN_CXR, needs


def test_phantom_duplicate_show_pipeline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, dup = tmp_path / "phantom", tmp_path / "dup"
    assert (
        main(["data", "phantom", "--out", str(data), "--num_patients", "12", "--resolution", "64"])
        == 0
    )
    out = capsys.readouterr().out
    assert "train:" in out and f"saved to {data}" in out
    assert (
        main(
            [
                "data",
                "duplicate",
                "--dataset",
                str(data),
                "--out",
                str(dup),
                "--num_rows",
                "2",
                "--copies",
                "3",
                "2",
            ]
        )
        == 0
    )
    train = load_dataset_dir(dup)["train"]
    assert sorted(c for c in train["copies"] if c > 1) == [2] * 4 + [3] * 6  # 2 rows per dose
    grid = tmp_path / "grid.png"
    assert (
        main(["data", "show", "--dataset", str(dup), "--duplicated_only", "--out", str(grid)]) == 0
    )
    assert "wrote" in capsys.readouterr().out
    from PIL import Image

    with Image.open(grid) as image:
        assert image.width == 4 * (192 + 4) and image.height > 192


def test_config_file_supplies_defaults_and_flags_win(tmp_path: Path) -> None:
    config = tmp_path / "phantom.yaml"
    config.write_text("num_patients: 5\nresolution: 48\nseed: 2\n")
    out = tmp_path / "p"
    assert main(["data", "phantom", "--config", str(config), "--out", str(out), "--seed", "3"]) == 0
    dataset = load_dataset_dir(out)
    assert sum(len(set(p["patient_id"])) for p in dataset.values()) == 5
    assert dataset["train"][0]["image"].size == (48, 48)
    assert "seed 3" in dataset["train"].info.description
    config.write_text("num_patiens: 5\n")
    assert main(["data", "phantom", "--config", str(config), "--out", str(tmp_path / "q")]) == 2


def test_user_errors_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(["data", "chexpert", "--root", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("chexmem: error: CheXpert root") and "\n" not in err
    existing = tmp_path / "exists"
    existing.mkdir()
    assert (
        main(
            ["data", "phantom", "--num_patients", "3", "--resolution", "32", "--out", str(existing)]
        )
        == 2
    )
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(["data", "show", "--dataset", str(tmp_path / "nope")]) == 2


@needs(OPEN_CXR)
def test_folder_command_with_parquet(tmp_path: Path) -> None:
    args = [
        "data",
        "folder",
        "--root",
        str(OPEN_CXR),
        "--out",
        str(tmp_path / "o"),
        "--resolution",
        "32",
    ]
    assert main([*args, "--max_rows", "20", "--parquet", str(tmp_path / "pq")]) == 0
    assert sorted(p.name for p in (tmp_path / "pq").iterdir()) == [
        "test.parquet",
        "train.parquet",
        "validation.parquet",
    ]


DEMO_FLAGS = [
    "--num_patients", "12", "--duplicated_rows", "2", "--copies", "4", "--max_train_steps", "4",
    "--train_batch_size", "4", "--vae_train_steps", "5", "--ordinary_prompts", "3",
    "--held_out_prompts", "2", "--generations_per_prompt", "2", "--inference_steps", "2",
    "--pretrain_patients", "8", "--pretrain_steps", "2", "--capacity_steps", "4",
    "--heatmap_prompts", "2", "--method_settings", "amg:c3=300",
]  # fmt: skip


def _demo(out: Path, *extra: str) -> subprocess.CompletedProcess:
    """`chexmem demo` at test size, as a user runs it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "scripts.cli", "demo", "--output_dir", str(out),
               *DEMO_FLAGS, *extra]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)


def _kill_during(out: Path, job: str, log: str) -> None:
    """Start the demo and kill the study process outright while `job` runs (its log has
    begun, its marker is not written)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "scripts.cli", "demo", "--output_dir", str(out), *DEMO_FLAGS]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    started, waited = out / log, 0.0
    while not (started.is_file() and started.stat().st_size) and process.poll() is None:
        assert waited < 600, f"{job} never started"
        time.sleep(0.1)
        waited += 0.1
    process.kill()  # SIGKILL: no clean-up; its job processes end with it (PR_SET_PDEATHSIG)
    process.wait()
    assert not (out / ".study" / f"{job}.json").exists(), f"{job} finished before the kill"


def _comparable(value: object, out: Path) -> object:
    """A metrics.json without what differs between two runs of the same study: timings and
    the study's own folder."""
    if isinstance(value, dict):
        return {k: _comparable(v, out) for k, v in value.items() if "seconds" not in k}
    if isinstance(value, list):
        return [_comparable(v, out) for v in value]
    return value.replace(str(out), "OUT") if isinstance(value, str) else value


def test_console_script_runs_the_demo_and_resumes_after_a_kill(tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    _kill_during(demo, "finetune-nocfg", "finetune-nocfg/train.log")
    result = _demo(demo)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "-- data: cached" in out and "-- finetune-nocfg: cached" not in out
    assert "== finetune-nocfg" in out  # the killed job ran again, from the start
    assert "== detect-eval" in out and "study finished" in out and "Spearman" in out
    assert (demo / "duplicated_rows.png").is_file()
    train = load_dataset_dir(demo / "data")["train"]
    assert sum(1 for c in train["copies"] if c > 1) == 8
    for name in ("finetune-cfg", "finetune-nocfg"):
        assert (demo / name / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    import json

    summary = json.loads((demo / "detection.json").read_text())
    assert set(summary["models"]) == {"cfg", "nocfg"}
    assert summary["prompts"] == {"duplicated": 2, "ordinary": 3, "held_out": 2}
    for name, model in summary["models"].items():
        detection = model["detection"]["duplicated_vs_held_out"]
        assert {"score_step1_n1", "score_step1", "score_all_steps"} <= set(detection)
        assert 0 <= detection["score_step1"]["auc"] <= 1
        # every detector, validated side by side (the demo scores all of them)
        figures = model["detectors"]
        assert set(figures) == {"magnitude", "sharpness", "anisotropy", "seed_consistency"}
        for found in figures.values():
            assert found["auc_low"] <= found["auc"] <= found["auc_high"]
            assert set(found["by_copies"]) == {"4"} and found["seconds_per_prompt"] > 0
        assert figures["magnitude"]["auc"] == detection["score_step1"]["auc"]
        assert set(model["copy_similarity_by_group"]) == {"duplicated", "ordinary", "held_out"}
        # the ground truth per dose: held-out (0), ordinary (1), the duplicated rows (4 copies)
        rates = model["copy_rate_by_copies"]
        assert set(rates) == {"0", "1", "4"}
        assert rates["4"]["prompts"] == 2 and rates["4"]["generations"] == 2 * 2
        for rate in rates.values():
            assert 0 <= rate["low"] <= rate["rate"] <= rate["high"] <= 1
        for figure in ("scatter", "roc", "grid", "tokens"):
            assert (demo / f"detect_{name}_{figure}.png").is_file()
        for group in ("duplicated", "held_out"):
            assert (demo / f"copies_{name}_{group}.png").is_file()
        assert len(model["trigger_tokens"]) == 2
        prompts = json.loads((demo / f"detect-{name}" / "summary.json").read_text())["prompts"]
        assert prompts == sum(summary["prompts"].values())
    mitigation = json.loads((demo / "mitigation.json").read_text())
    methods = {row["method"] for row in mitigation["inference"]}
    assert {"none", "embedding", "neurons", "trigger_tokens"} <= methods
    assert "random_tokens_4" in methods
    assert mitigation["methods"]["amg"]["c3"] == 300  # --method_settings reached the method
    reach = mitigation["nemo"]["terminated"]
    assert 0 <= reach["within_reach"] <= reach["memorized"]
    for row in mitigation["inference"]:
        assert 0 <= row["copy_rate"] <= 1 and row["fid"] >= 0
        assert row["copy_rate_low"] <= row["copy_rate"] <= row["copy_rate_high"]
        assert "copy_rate_change_low" in row
    per_prompt = pd.read_csv(demo / "mitigation_prompts.csv")  # what --seeds pools
    assert set(per_prompt["method"]) == methods
    memorized = per_prompt[(per_prompt["method"] == "none") & (per_prompt["group"] == "memorized")]
    none = next(r for r in mitigation["inference"] if r["method"] == "none" and
                r["group"] == "memorized")  # fmt: skip
    assert len(memorized) == none["prompts"]
    assert memorized["copy_rate"].mean() == pytest.approx(none["copy_rate"])
    models = json.loads((demo / "mitigation_models.json").read_text())
    assert {row["model"] for row in models["training"]} == {"plain", "filter"}
    capacity = {row["model"]: row for row in models["capacity"]}
    assert set(capacity) == {"full", "lora_r4", "subset"}
    assert capacity["lora_r4"]["trainable_share"] < capacity["full"]["trainable_share"]
    # the full capacity run is the plain fine-tune, linked: generated once, reported twice
    assert (demo / "capacity-full").is_symlink()
    rows = {k: pd.DataFrame([r for r in models[k] if r["model"] in ("full", "plain")])
            for k in ("training", "capacity")}  # fmt: skip
    pd.testing.assert_frame_equal(
        rows["capacity"].drop(columns=["model", "trainable_share"]),
        rows["training"].drop(columns="model"),
    )
    run = json.loads((demo / "finetune-cfg-filter" / "chexmem_train.json").read_text())
    assert run["sample_weighting"]["samples_seen"] > 0
    assert run["sample_weighting"]["weighter"]["per_timestep"] is True
    assert "chexmem-findings-cnn" in mitigation["features"]
    # 2 held-out prompts calibrate tau_mem and the targets: kept, flagged, and in the report
    calibrations = mitigation["calibrations"]
    assert set(calibrations) == {"copy_threshold", "detection_flag", "embedding_target", "tau_mem"}
    assert calibrations["tau_mem"]["status"] == "few_values"
    assert calibrations["tau_mem"]["value"] == mitigation["nemo"]["tau_mem"]
    assert "--held_out_prompts" in calibrations["embedding_target"]["warning"]

    # the report's numbers are the stages' own
    metrics = json.loads((demo / "metrics.json").read_text())
    assert metrics["detection"] == summary and metrics["mitigation"] == mitigation
    assert metrics["mitigation_models"] == models
    metrics_runs = {"finetune-cfg", "finetune-nocfg", "finetune-cfg-filter", "pretrained",
                    "capacity-full", "capacity-lora", "capacity-subset"}  # fmt: skip
    assert {r["model"] for r in metrics["fine_tunes"]} == metrics_runs
    markdown = (demo / "report.md").read_text()
    auc = summary["models"]["cfg"]["detection"]["duplicated_vs_held_out"]["score_step1"]["auc"]
    assert f"finetune-cfg: detection AUC {auc:.3f}" in markdown
    assert "Calibrations on held-out data" in markdown and "Warning: tau_mem" in markdown
    assert "Which detector to trust" in markdown
    assert "Copy rate per dose" in markdown and "copy_threshold" in summary
    assert "calibration not to be trusted: " in markdown
    for figure in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown):
        assert (demo / figure).is_file()
    from tests.helpers import open_in_chromium

    figures = len(re.findall(r"!\[", markdown))
    state, requests = open_in_chromium(demo / "report.html", tmp_path / "report.png")
    assert state["images"] == [True] * figures and figures >= 14
    assert all(url.startswith("data:") for url in requests[1:])

    # publishing: every folder and card is built offline; only the upload needs a token
    from scripts.study.config import StudyConfig
    from scripts.study.report import hub_repos

    settings = json.loads((demo / "study_config.json").read_text())
    repos = hub_repos(StudyConfig(**{**settings, "hub_model_id": "me/study"}))
    published = metrics_runs - {"capacity-full"}  # linked to finetune-cfg: published once
    assert set(repos) == {f"me/study-{n}" for n in published} | {"me/study-study"}
    card = (repos["me/study-finetune-cfg"] / "README.md").read_text()
    assert "Memorization measured by the chexmem study" in card
    assert f"| detection AUC (duplicated vs held-out, step 1) | {auc:.4g} |" in card
    study = repos["me/study-study"]
    assert {"report.html", "report.md", "metrics.json", "DATASET_CARD.md"} <= {
        p.name for p in study.iterdir()}  # fmt: skip
    assert "no patient data" in (study / "DATASET_CARD.md").read_text()

    # the resumed study reports exactly what a study never interrupted reports
    clean = _demo(tmp_path / "clean")
    assert clean.returncode == 0, clean.stderr[-3000:]
    clean_metrics = json.loads((tmp_path / "clean" / "metrics.json").read_text())
    assert _comparable(metrics, demo) == _comparable(clean_metrics, tmp_path / "clean")

    again = _demo(demo)  # everything cached now
    assert again.returncode == 0, again.stderr[-3000:]
    assert not re.search(r"^== (?!study finished)", again.stdout, re.MULTILINE)
    assert again.stdout.count(": cached (") == 19


def test_seeds_rerun_the_study_per_seed_and_report_the_spread(tmp_path: Path) -> None:
    import json

    out = tmp_path / "seeds"
    result = _demo(out, "--skip_mitigation", "--seeds", "0", "1", "--copies", "2", "4",
                   "--detectors", "magnitude", "seed_consistency")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    runs = {s: json.loads((out / f"seed-{s}" / "detection.json").read_text()) for s in (0, 1)}
    for seed, detection in runs.items():
        config = json.loads((out / f"seed-{seed}" / "study_config.json").read_text())
        assert config["seed"] == seed and config["copies"] == [2, 4]
        figures = detection["models"]["cfg"]["detectors"]["magnitude"]
        assert set(figures["by_copies"]) == {"2", "4"}  # 2 rows at each dose
        assert figures["auc_low"] <= figures["auc"] <= figures["auc_high"]
    data = [load_dataset_dir(out / f"seed-{s}" / "data")["train"]["source_path"] for s in (0, 1)]
    assert data[0] != data[1]  # each seed draws its own data
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["seeds"] == [0, 1]
    rows = {(r["model"], r["detector"], r["figure"]): r for r in metrics["detection_over_seeds"]}
    auc = rows[("cfg", "magnitude", "auc")]
    values = [runs[s]["models"]["cfg"]["detectors"]["magnitude"]["auc"] for s in (0, 1)]
    assert auc["mean"] == pytest.approx(np.mean(values))
    assert auc["sd"] == pytest.approx(np.std(values, ddof=1))
    assert ("nocfg", "seed_consistency", "auc_copies_4") in rows
    # the ground truth's spread too: the copy rate of each dose over the seeds
    rate = rows[("cfg", "(copy rate)", "copy_rate_copies_4")]
    values = [runs[s]["models"]["cfg"]["copy_rate_by_copies"]["4"]["rate"] for s in (0, 1)]
    assert rate["mean"] == pytest.approx(np.mean(values))
    report = (out / "report.md").read_text()
    assert "Detection over seeds" in report and "+-" in report
    assert "copy_rate_copies_4" in report  # shown, not only in metrics.json
