"""The over-seeds summary of the mitigation stage: every row's mean and spread."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts.study.config import StudyConfig
from scripts.study.seeds import mitigation_seed_table, pooled_copy_rates, write_seed_summary


def _seed_folder(root: Path, seed: int, cut: float, full_copy: float) -> Path:
    """A seed's folder with the two mitigation files as the mitigation stage writes them."""
    folder = root / f"seed-{seed}"
    folder.mkdir(parents=True)
    (folder / "detection.json").write_text(json.dumps({"models": {}}))
    inference = [
        {"method": "none", "group": "memorized", "copy_rate": 0.8, "copy_rate_change": 0.0},
        {"method": "embedding", "group": "memorized", "copy_rate": 0.8 * (1 - cut),
         "copy_rate_change": -cut, "target_reached": 1.0, "fid": None},
    ]  # fmt: skip
    (folder / "mitigation.json").write_text(
        json.dumps({"memorized_prompts": 40 + seed, "inference": inference})
    )
    capacity = [{"model": "full", "group": "duplicated", "copy_rate": full_copy,
                 "trainable_share": 0.93}]  # fmt: skip
    (folder / "mitigation_models.json").write_text(
        json.dumps({"training": [], "capacity": capacity})
    )
    return folder


def test_each_mitigation_row_gets_its_mean_sd_and_seeds(tmp_path: Path) -> None:
    folders = {s: _seed_folder(tmp_path, s, cut, c) for s, cut, c in ((0, 0.6, 0.5), (1, 0.8, 0.7))}
    table = mitigation_seed_table(folders).set_index(["part", "name", "group", "figure"])
    change = table.loc[("inference", "embedding", "memorized", "copy_rate_change")]
    assert change["mean"] == pytest.approx(-0.7)
    assert change["sd"] == pytest.approx(0.1414, abs=1e-4)
    assert (change["seed_0"], change["seed_1"], change["seeds"]) == (-0.6, -0.8, 2)
    assert table.loc[("inference", "(flagged)", "memorized", "prompts"), "mean"] == 40.5
    assert table.loc[("capacity", "full", "duplicated", "copy_rate"), "mean"] == pytest.approx(0.6)
    assert ("inference", "embedding", "memorized", "fid") not in table.index  # null: left out


def test_the_summary_reports_mitigation_when_the_seeds_ran_it(tmp_path: Path) -> None:
    folders = {s: _seed_folder(tmp_path, s, 0.5, 0.5) for s in (0, 1)}
    write_seed_summary(StudyConfig(output_dir=str(tmp_path)), folders)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    names = {(r["part"], r["name"]) for r in metrics["mitigation_over_seeds"]}
    assert ("capacity", "full") in names and ("inference", "embedding") in names
    report = (tmp_path / "report.md").read_text()
    assert "Mitigation over seeds: capacity" in report


def test_pooled_copy_rates_resample_prompts_within_each_seed(tmp_path: Path) -> None:
    """Pooled over seeds: the point is the mean of all prompts; none's change is 0."""
    import pandas as pd

    folders = {}
    for seed, rates in ((0, [1.0, 1.0, 0.5]), (1, [1.0, 0.0])):
        folder = tmp_path / f"seed-{seed}"
        folder.mkdir()
        rows = [{"prompt_index": i, "group": "memorized", "copy_rate": r, "method": m}
                for m, scale in (("none", 1.0), ("amg", 0.5)) for i, r in enumerate(rates)
                for r in [r * scale]]  # fmt: skip
        rows.append({"prompt_index": 9, "group": "ordinary", "copy_rate": 0.0, "method": "none"})
        pd.DataFrame(rows).to_csv(folder / "mitigation_prompts.csv", index=False)
        folders[seed] = folder
    folders[2] = tmp_path / "seed-2"  # no per-prompt file: left out
    table = pooled_copy_rates(folders, draws=500).set_index(["method", "group"])
    none, amg = table.loc[("none", "memorized")], table.loc[("amg", "memorized")]
    assert (none["prompts"], none["seeds"]) == (5, 2)
    assert none["copy_rate"] == pytest.approx(3.5 / 5) and none["copy_rate_change"] == 0
    assert amg["copy_rate_change"] == pytest.approx(-0.5)
    assert amg["copy_rate_change_low"] == pytest.approx(-0.5) == amg["copy_rate_change_high"]
    assert none["copy_rate_low"] < none["copy_rate"] < none["copy_rate_high"]
    assert ("none", "ordinary") in table.index  # a group with none alone still gets its rate
