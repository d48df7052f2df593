"""mitigate.evaluate and `chexmem mitigate`: same prompts, seeds and threshold for every method."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from detect.evaluate import copy_rate
from detect.magnitude import MagnitudeConfig
from detect.models import load_pipeline
from detect.similarity import NCCEmbedder, TrainingBank
from hf_datasets.storage import load_dataset_dir
from mitigate.base import Mitigation, generate
from mitigate.evaluate import EvaluationSetup, evaluate_methods
from scripts.cli import main

CONFIG = MagnitudeConfig(num_inference_steps=3, num_generations=2, progress=False)


@pytest.fixture(scope="module")
def setup(phantom_data: Path) -> EvaluationSetup:
    """Four training prompts in two groups, matched against the whole training split."""
    train = load_dataset_dir(phantom_data)["train"]
    embedder = NCCEmbedder()
    bank = TrainingBank.from_images(train["image"], embedder, patient_ids=train["patient_id"])
    prompts = pd.DataFrame(
        {
            "prompt": train["prompt"][:4],
            "group": ["memorized", "memorized", "ordinary", "ordinary"],
            "own_index": [0, 1, 2, -1],
        }
    )
    return EvaluationSetup(prompts, bank, embedder, threshold=0.5, config=CONFIG)


class Shout(Mitigation):
    """A rewrite that changes every prompt: enough to see the table move."""

    name = "shout"

    def rewrite(self, pipe, prompts, prompt_ids):  # type: ignore[no-untyped-def]
        return [p.upper() + " LOUD LOUD" for p in prompts]


class Reported(Mitigation):
    """No change to generation, but facts per prompt, as the embedding adjustment has."""

    name = "reported"

    def prompt_facts(self):  # type: ignore[no-untyped-def]
        return {"target_reached": [1.0, float("nan"), 0.0, 1.0]}


def test_a_methods_facts_per_prompt_are_averaged_per_group_where_they_apply(
    tiny_model: Path, setup: EvaluationSetup
) -> None:
    pipe = load_pipeline(tiny_model)
    report = evaluate_methods(pipe, setup, {"none": Mitigation(), "reported": Reported()})
    table = report.table.set_index(["method", "group"])
    assert table.loc[("reported", "memorized"), "target_reached"] == 1.0  # the NaN left out
    assert table.loc[("reported", "ordinary"), "target_reached"] == 0.5
    assert np.isnan(table.loc[("none", "memorized"), "target_reached"])
    per_prompt = report.runs["reported"].per_prompt
    np.testing.assert_array_equal(per_prompt["target_reached"], [1.0, np.nan, 0.0, 1.0])


def test_every_method_gets_a_row_per_group_and_changes_against_none(
    tiny_model: Path, setup: EvaluationSetup
) -> None:
    pipe = load_pipeline(tiny_model)
    report = evaluate_methods(pipe, setup, {"none": Mitigation(), "shout": Shout()})
    table = report.table.set_index(["method", "group"])
    assert set(table.index) == {
        (m, g) for m in ("none", "shout") for g in ("memorized", "ordinary")
    }
    assert table.loc[("none", "memorized"), "prompts"] == 2
    assert (table["copy_rate"].between(0, 1)).all()
    # every copy rate with its interval over prompts, recomputed from the matches
    for (method, group), row in table.iterrows():
        matches = report.runs[method].matches
        chosen = matches[matches["group"] == group]
        expected = copy_rate(chosen["is_copy"].astype(float), chosen["prompt_id"], 1.0)
        found = (row["copy_rate"], row["copy_rate_low"], row["copy_rate_high"])
        assert found == (expected.rate, expected.low, expected.high)
    assert {"copy_rate_change_low", "copy_rate_change_high"} <= set(table.columns)
    none = table.loc[("none", "memorized")]
    assert none["copy_rate_change"] == 0 or np.isnan(none["copy_rate_change"])
    runs = report.runs
    assert runs["shout"].per_prompt["used_prompt"].str.endswith("LOUD LOUD").all()
    # the own image is known for three prompts only
    assert runs["none"].per_prompt["own_similarity"].isna().sum() == 1
    # the same seeds as a plain generation: the unmitigated scores are reproduced
    plain = generate(pipe, list(setup.prompts["prompt"]), CONFIG)
    np.testing.assert_allclose(
        runs["none"].per_prompt["score"].to_numpy(), plain.result.scores().to_numpy()
    )


def test_cli_generate_and_evaluate(tiny_model: Path, phantom_data: Path, tmp_path: Path) -> None:
    train = load_dataset_dir(phantom_data)["train"]
    prompts = tmp_path / "prompts.csv"
    pd.DataFrame(
        {"prompt": train["prompt"][:2], "group": ["memorized", "ordinary"], "own_index": [0, 1]}
    ).to_csv(prompts, index=False)
    common = ["--model", str(tiny_model), "--num_inference_steps", "2", "--num_generations", "1"]
    out = tmp_path / "gen"
    code = main(["mitigate", "generate", *common, "--prompts", str(prompts),
                 "--method", "none", "--output_dir", str(out)])  # fmt: skip
    assert code == 0
    assert len(list((out / "images").glob("*.png"))) == 2
    assert json.loads((out / "summary.json").read_text())["mitigation"] == {"method": "none"}

    from detect.classifier import ClassifierConfig, train_classifier

    classifier = train_classifier(phantom_data, ClassifierConfig(epochs=1, progress=False))
    classifier.save(tmp_path / "classifier")
    out = tmp_path / "eval"
    code = main(["mitigate", "evaluate", *common, "--prompts", str(prompts), "--dataset",
                 str(phantom_data), "--methods", "none", "amg", "uce", "--output_dir", str(out),
                 "--erase_prompts", str(prompts),
                 "--classifier", str(tmp_path / "classifier"),
                 "--num_generations", "2"])  # fmt: skip
    assert code == 0
    table = pd.read_csv(out / "mitigation.csv")
    assert list(table["group"]) == ["memorized", "ordinary"] * 3
    # amg guides away from --dataset's training images; its facts: the steps it acted on
    assert table.loc[table["method"] == "amg", "guided_share"].between(0, 1).all()
    # FID with its interval over prompts, and its change against none's on the same draws
    assert (table["fid_low"] <= table["fid"] + 1e-9).all()
    assert (table["fid"] <= table["fid_high"] + 1e-9).all()
    none = table[table["method"] == "none"]
    assert (none["fid_change_low"] == 0).all() and (none["fid_change_high"] == 0).all()
    assert (table["fid"] >= 0).all() and "fidelity" in table
    saved = json.loads((out / "mitigation.json").read_text())
    assert saved["threshold"] == saved["threshold_calibration"]["value"] > 0
    # uce erased the prompt file's 2 prompts and preserved the rest of --dataset's train split
    kept = len(set(train["prompt"]) - set(train["prompt"][:2]))
    assert saved["methods"]["uce"] == {
        "method": "uce", "prompts": 2, "target_prompt": "", "preserve_prompts": kept,
        "lamb": 0.1, "erase_scale": 1.0, "preserve_scale": 0.1, "edit_keys": True,
        "erase_tokens": "final",
    }  # fmt: skip
    assert saved["threshold_calibration"]["status"] == "few_values"  # 5 held-out images


def test_cli_names_what_is_missing(tiny_model: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    prompts = tmp_path / "p.txt"
    prompts.write_text("Frontal PA chest radiograph.\n")
    code = main(["mitigate", "generate", "--model", str(tiny_model), "--prompts", str(prompts),
                 "--method", "embedding", "--num_inference_steps", "2"])  # fmt: skip
    assert code == 2
    assert "held-out prompts" in capsys.readouterr().err
    code = main(["mitigate", "generate", "--model", str(tiny_model), "--prompts", str(prompts),
                 "--method", "amg", "--num_inference_steps", "2"])  # fmt: skip
    assert code == 2
    assert "--training_dataset" in capsys.readouterr().err
    code = main(["mitigate", "generate", "--model", str(tiny_model), "--prompts", str(prompts),
                 "--method", "uce", "--num_inference_steps", "2"])  # fmt: skip
    assert code == 2
    assert "--erase_prompts" in capsys.readouterr().err


def test_evaluate_prompts_without_a_prompt_column_is_one_line(
    tiny_model: Path, phantom_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = tmp_path / "p.csv"
    prompts.write_text("caption,group\nFrontal PA chest radiograph.,memorized\n")
    out = tmp_path / "eval"
    code = main(["mitigate", "evaluate", "--model", str(tiny_model), "--prompts", str(prompts),
                 "--dataset", str(phantom_data), "--output_dir", str(out)])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no 'prompt' column (it has: caption, group)" in err
    assert not out.exists()


def test_fid_intervals_resample_prompts_with_all_their_generations() -> None:
    from detect.evaluate import percentile_interval
    from mitigate.evaluate import MethodRun, fid_intervals

    n, groups = 2, ["memorized", "memorized", "memorized", "ordinary", "ordinary"]
    per_prompt = pd.DataFrame({"group": groups})
    rng = np.random.default_rng(1)
    rows = {m: rng.normal(size=(len(groups) * n, 3)) for m in ("none", "x")}
    runs = {
        m: MethodRun(m, [], pd.DataFrame(), per_prompt, 0.0, {}, [], r) for m, r in rows.items()
    }
    table = pd.DataFrame(
        {"method": ["none", "none", "x", "x"], "group": ["memorized", "ordinary"] * 2}
    )

    def statistic(found: np.ndarray) -> float:  # any set statistic stands in for FID here
        return float(found[:, 0].mean() ** 2 + 1.0)

    out = fid_intervals(table, runs, statistic, n, n_boot=50, seed=3).set_index(["method", "group"])
    # the same draws by hand: group by group, prompts with replacement, then their generations
    draw = np.random.default_rng(3)
    picks = draw.choice([0, 1, 2], size=(50, 3))
    chosen = (picks[:, :, None] * n + np.arange(n)).reshape(50, -1)
    value = np.array([statistic(rows["x"][c]) for c in chosen])
    base = np.array([statistic(rows["none"][c]) for c in chosen])
    row = out.loc[("x", "memorized")]
    assert (row["fid_low"], row["fid_high"]) == percentile_interval(value, 0.95)
    expected = percentile_interval(value / base - 1.0, 0.95)
    assert (row["fid_change_low"], row["fid_change_high"]) == expected
    assert out.loc[("none", "ordinary"), "fid_change_low"] == 0.0
