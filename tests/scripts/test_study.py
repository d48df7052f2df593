"""`chexmem study`: configs, the cached job graph, the dry run of the GPU configs, the Hub
folders. (The whole embedded-default study runs in tests/scripts/test_cli.py.)"""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

import pandas as pd
import pytest

from hf_datasets.cliutils import read_yaml
from hf_datasets.errors import ChexmemError
from scripts.cli import main
from scripts.study.config import StudyConfig
from scripts.study.runner import Job, assign_keys, run_jobs
from tests.conftest import REPO

CONFIGS = REPO / "configs"


def test_demo_yaml_is_the_embedded_default() -> None:
    assert StudyConfig(**read_yaml(CONFIGS / "demo.yaml")) == StudyConfig()


@pytest.mark.parametrize("name", ["chexpert-sd15", "chexpert-sd15-8gpu"])
def test_gpu_configs_pass_the_dry_run_on_cpu(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = CONFIGS / f"{name}.yaml"
    code = main(["study", "--config", str(config), "--dry_run", "--output_dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0 and "16 jobs; all options check out" in out
    settings = read_yaml(config)
    launches = [line for line in out.splitlines() if "accelerate.commands.launch" in line]
    assert len(launches) == 8  # 6 fine-tunes and 2 detection runs
    assert all(f"--config_file {settings['accelerate_config']}" in line for line in launches)
    assert all("--mixed_precision bf16" in line for line in launches if " -m train " in line)
    assert (REPO / settings["accelerate_config"]).is_file()
    assert not list(tmp_path.iterdir())  # a dry run writes nothing


def test_the_dry_run_catches_a_bad_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("train_flags: [--memorization_filter_top_fraction, '2']\n")
    code = main(["study", "--config", str(config), "--dry_run", "--output_dir", str(tmp_path)])
    assert code == 2
    assert "memorization_filter_top_fraction must be in (0, 1)" in capsys.readouterr().err
    assert main(["study", "--output_dir", str(tmp_path)]) == 2  # study needs --config


def test_fine_tunes_can_start_from_the_pretrained_base(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["demo", "--dry_run", "--output_dir", str(tmp_path), "--skip_mitigation"]
    assert main([*argv, "--finetune_from", "pretrained"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("[to run] finetune-cfg "))
    assert "needs model, data, pretrained" in lines[first]
    command = next(line for line in lines[first:] if " -m train " in line)
    assert f"--pretrained_model_name_or_path {tmp_path / 'pretrained'} " in command
    assert out.index("[to run] pretrained ") < out.index("[to run] finetune-cfg ")
    assert main([*argv, "--finetune_from", "elsewhere"]) == 2
    assert "finetune_from must be base or pretrained" in capsys.readouterr().err


def test_the_full_capacity_run_is_the_plain_fine_tune_when_their_recipes_agree(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Same base, steps and text encoder: linked, not trained twice; other steps: trained."""
    from scripts.study.plan import plan

    jobs = {j.name: j for j in plan(StudyConfig(output_dir=str(tmp_path)))}
    full = jobs["capacity-full"]
    assert full.command is None and full.needs == ["finetune-cfg"]
    (tmp_path / "finetune-cfg").mkdir()
    (tmp_path / "finetune-cfg" / "chexmem_train.json").write_text("{}")
    (tmp_path / "capacity-full").mkdir()  # a run an earlier config trained: replaced
    full.run()
    assert (tmp_path / "capacity-full").is_symlink()
    assert (tmp_path / "capacity-full" / "chexmem_train.json").is_file()

    jobs = {j.name: j for j in plan(StudyConfig(output_dir=str(tmp_path), capacity_steps=800))}
    command = jobs["capacity-full"].command
    assert command is not None and "--train_text_encoder" in command
    assert "--train_text_encoder" not in jobs["capacity-lora"].command


def test_overwriting_a_linked_run_replaces_the_link_not_what_it_names(tmp_path: Path) -> None:
    from accelerate import Accelerator

    from train.config import TrainConfig
    from train.trainer import prepare_output_dir

    plain = tmp_path / "finetune-cfg"
    (plain / "logs").mkdir(parents=True)
    (tmp_path / "capacity-full").symlink_to("finetune-cfg")
    config = TrainConfig(output_dir=str(tmp_path / "capacity-full"), overwrite_output_dir=True,
                         pretrained_model_name_or_path="x", train_data_dir="y")  # fmt: skip
    out = prepare_output_dir(config, Accelerator(cpu=True))
    assert out.is_dir() and not out.is_symlink() and (plain / "logs").is_dir()


def _append(path: Path, text: str) -> None:
    """An in-process job: append a line to a file (so reruns are visible)."""
    with path.open("a") as f:
        f.write(text + "\n")


def _graph(tmp_path: Path, first_input: int) -> list[Job]:
    """a -> b -> c, with b a real `python -m` process and a and c in-process."""
    runs = tmp_path / "runs.txt"
    jobs = [
        Job("a", [], {"value": first_input}, run=partial(_append, runs, "a")),
        Job("b", ["a"], {}, ["json.tool", str(tmp_path / "in.json")], log=tmp_path / "b.log"),
        Job("c", ["b"], {}, run=partial(_append, runs, "c")),
    ]
    assign_keys(jobs)
    return jobs


def test_jobs_are_cached_by_content_and_forced_with_what_follows(tmp_path: Path) -> None:
    (tmp_path / "in.json").write_text('{"x": 1}')
    config = StudyConfig(output_dir=str(tmp_path / "study"), max_parallel=2)
    runs = tmp_path / "runs.txt"
    assert set(run_jobs(config, _graph(tmp_path, 1), set())) == {"a", "b", "c"}
    assert json.loads((tmp_path / "b.log").read_text()) == {"x": 1}  # the process ran
    seconds = run_jobs(config, _graph(tmp_path, 1), set())
    assert seconds == {"a": 0.0, "b": 0.0, "c": 0.0} and runs.read_text() == "a\nc\n"
    run_jobs(config, _graph(tmp_path, 1), {"b"})  # b and what needs it; not a
    assert runs.read_text() == "a\nc\nc\n"
    run_jobs(config, _graph(tmp_path, 2), set())  # a's input changed: every key changes
    assert runs.read_text() == "a\nc\nc\na\nc\n"
    with pytest.raises(ChexmemError, match="--force z: no such job; jobs: a, b, c"):
        run_jobs(config, _graph(tmp_path, 2), {"z"})


def test_a_failed_job_names_its_log_and_is_not_marked_done(tmp_path: Path) -> None:
    config = StudyConfig(output_dir=str(tmp_path / "study"))
    jobs = [Job("broken", [], {}, ["json.tool", str(tmp_path / "missing.json")],
                log=tmp_path / "broken.log")]  # fmt: skip
    assign_keys(jobs)
    with pytest.raises(
        ChexmemError, match=r"(?s)job broken failed \(exit 2\); see .*broken.log:.*missing.json"
    ):
        run_jobs(config, jobs, set())
    assert not (tmp_path / "study" / ".study" / "broken.json").exists()


def test_accelerate_launcher_command_line() -> None:
    config = StudyConfig(launcher="accelerate", accelerate_config="configs/x.yaml")
    job = Job("t", [], {}, ["train", "--seed", "1"], accelerate=True)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/x.yaml"]
    assert job.argv(config) == [*launch, "-m", "train", "--seed", "1"]
    assert Job("m", [], {}, ["scripts.study.mitigation"]).argv(config)[1:3] == [
        "-m",
        "scripts.study.mitigation",
    ]


def test_the_report_says_when_a_model_did_not_copy_its_duplicates() -> None:
    from scripts.study.report import copy_rate_table, not_copied

    def rate(value: float, low: float, high: float) -> dict:
        return {"rate": value, "low": low, "high": high, "prompts": 10, "generations": 40,
                "mean_nearest_similarity": 0.8, "mean_own_similarity": 0.7}  # fmt: skip

    held_out = rate(0.05, 0.02, 0.10)
    flat = {"0": held_out, "1": rate(0.05, 0.0, 0.1), "2": rate(0.0, 0, 0), "20": rate(0.1, 0, 0.2)}
    copied = {**flat, "20": rate(0.6, 0.4, 0.8)}
    detection = {
        "copy_threshold": 0.86,
        "models": {"cfg": {"copy_rate_by_copies": flat}, "nocfg": {"copy_rate_by_copies": copied}},
    }
    lines = not_copied(detection)
    assert "**finetune-cfg did not copy its duplicates**" in lines[0]
    assert "did not copy" not in lines[1] and "20 copies (0.600)" in lines[1]
    table = copy_rate_table(detection)
    assert table is not None and "0.8600" in table.caption
    assert list(table.frame["copies of the training image"][:4]) == [
        "held-out (0)",
        "ordinary (1)",
        "duplicated x2",
        "duplicated x20",
    ]


def test_nemo_termination_counts_the_prompts_its_search_ended_on_by_its_rule() -> None:
    from scripts.study.mitigation import nemo_termination
    from scripts.study.report import nemo_sentence

    summary = pd.DataFrame(
        {
            "memorized": [True, True, True, False],
            "removed": [True, False, True, False],
            "num_neurons": [3, 40, 5, 0],
            "score_all_blocked": [0.2, 0.9, 0.3, float("nan")],
        }
    )
    found = nemo_termination(summary, tau_mem=0.4)
    assert found == {"prompts": 4, "memorized": 3, "removed": 2, "removed_share": 0.5,
                     "median_neurons": 4.0, "within_reach": 2,
                     "median_score_all_blocked": 0.3}  # fmt: skip
    line = nemo_sentence({"tau_mem": 0.4, "terminated": found})
    assert "3 of 4 flagged prompts memorized" in line and "on 2 (50% of the flagged)" in line
    assert "score is 0.300 (median), at most tau_mem on 2 of 3" in line
    assert "does not meet the rule" not in line
    out_of_reach = nemo_termination(summary.assign(score_all_blocked=0.9), tau_mem=0.4)
    assert out_of_reach["within_reach"] == 0
    assert "blocking them all does not meet the rule" in nemo_sentence(
        {"tau_mem": 0.4, "terminated": out_of_reach}
    )
    assert nemo_termination(summary.iloc[:0], tau_mem=0.4)["removed"] == 0
    old_study = {k: v for k, v in found.items() if k not in ("within_reach",)}
    assert nemo_sentence({"tau_mem": 0.4, "terminated": old_study}).endswith("neurons.")


def test_methods_are_scored_on_the_flagged_or_on_the_duplicated_prompts() -> None:
    from scripts.study.mitigation import scored_prompts
    from scripts.study.plan import plan

    frame = pd.DataFrame(
        {
            "prompt": ["d1", "d2", "o1", "o2", "h1"],
            "group": ["duplicated", "duplicated", "ordinary", "ordinary", "held_out"],
            "score_step1": [2.0, 0.5, 1.5, 0.1, 3.0],
            "train_index": [0, 1, 2, 3, -1],
        }
    )
    flagged, text = scored_prompts(frame, "flagged", 1.0)
    # flagged: training prompts over the flag, whatever their group (o1 too); never held-out
    assert dict(zip(flagged["prompt"], flagged["group"], strict=True)) == {
        "d1": "memorized", "o1": "memorized", "o2": "ordinary"}  # fmt: skip
    assert "flagged (step-1 score >= 1.000" in text
    truth, text = scored_prompts(frame, "duplicated", 1.0)
    assert dict(zip(truth["prompt"], truth["group"], strict=True)) == {
        "d1": "memorized", "d2": "memorized", "o1": "ordinary", "o2": "ordinary"}  # fmt: skip
    assert list(truth["own_index"]) == [0, 1, 2, 3] and "ground truth" in text
    with pytest.raises(ChexmemError, match="flagged or duplicated"):
        scored_prompts(frame, "all", 1.0)
    jobs = {j.name: j for j in plan(StudyConfig(mitigation_prompts="duplicated"))}
    assert jobs["mitigate-methods"].inputs["mitigation_prompts"] == "duplicated"


def test_method_settings_reach_the_study_plan_and_are_checked() -> None:
    from scripts.study.plan import plan

    config = StudyConfig(method_settings=["amg:c3=300", "amg:c1=10", "embedding:lr=0.1"])
    assert config.settings_of_methods() == {"amg": {"c3": 300, "c1": 10}, "embedding": {"lr": 0.1}}
    jobs = {j.name: j for j in plan(config)}
    assert jobs["mitigate-methods"].inputs["method_settings"] == config.method_settings
    with pytest.raises(ChexmemError, match="method_settings names 'uce', which methods leaves out"):
        StudyConfig(method_settings=["uce:lam=0.5"])
    with pytest.raises(ChexmemError, match=r"'amg' has no setting gain; it has .*c3"):
        StudyConfig(method_settings=["amg:gain=300"])
