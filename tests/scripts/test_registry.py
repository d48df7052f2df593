"""A new detector is one file plus one registry line, and then the CLI, the study and the
report all have it: proven on a copy of the project with a toy detector added."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO
from tests.scripts.test_cli import DEMO_FLAGS

TOY = '''"""A toy detector: the prompt's length in characters (it knows nothing of memorization)."""

import pandas as pd

from detect.base import Detector, SamplingPass


class PromptLength(Detector):
    name = "toy"
    title = "prompt length (a toy)"
    summary = "characters in the prompt"

    def score(self, run: SamplingPass) -> pd.DataFrame:
        index = pd.Index(run.prompt_ids, name="prompt_id")
        return pd.DataFrame({"score_toy": [float(len(p)) for p in run.prompts]}, index=index)
'''
REGISTERED = '    "magnitude": "detect.magnitude:NoiseMagnitude",\n'


def project_with_toy_detector(root: Path) -> Path:
    """A copy of the project's packages with detect/toy.py and its one registry line."""
    for package in ("hf_datasets", "detect", "mitigate", "train", "scripts"):
        shutil.copytree(REPO / package, root / package,
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    (root / "detect" / "toy.py").write_text(TOY)
    registry = root / "detect" / "registry.py"
    text = registry.read_text()
    assert text.count(REGISTERED) == 1
    line = '    "toy": "detect.toy:PromptLength",\n'
    registry.write_text(text.replace(REGISTERED, REGISTERED + line))
    return root


def chexmem(root: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m scripts.cli ARGS` importing the project copy at `root`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, "-m", "scripts.cli", *args], capture_output=True,
                          text=True, env=env, cwd=root, timeout=900)  # fmt: skip


def test_a_toy_detector_is_one_file_and_one_line(tmp_path: Path) -> None:
    root = project_with_toy_detector(tmp_path / "project")
    where = subprocess.run([sys.executable, "-c", "import detect.toy; print(detect.toy.__file__)"],
                           capture_output=True, text=True, cwd=root,
                           env={**os.environ, "PYTHONPATH": str(root)})  # fmt: skip
    assert where.stdout.strip() == str(root / "detect" / "toy.py")

    detect_help = chexmem(root, "detect", "--help")
    assert detect_help.returncode == 0
    assert "magnitude, toy" in " ".join(detect_help.stdout.split())
    demo_help = chexmem(root, "demo", "--help")
    assert "magnitude, toy" in " ".join(demo_help.stdout.split())

    out = tmp_path / "study"
    study = chexmem(root, "demo", "--output_dir", str(out), *DEMO_FLAGS, "--skip_mitigation",
                    "--detectors", "magnitude", "toy")  # fmt: skip
    assert study.returncode == 0, study.stdout[-2000:] + study.stderr[-3000:]
    scores = (out / "detect-cfg" / "scores.csv").read_text().splitlines()[0].split(",")
    assert {"score_first_1", "score_all_steps", "score_toy"} <= set(scores)
    detection = json.loads((out / "detection.json").read_text())
    for model in detection["models"].values():
        assert model["detector_columns"]["toy"] == ["score_toy"]
        figures = model["detectors"]["toy"]
        assert figures["score"] == "score_toy" and figures["auc_low"] <= figures["auc"]
        auc = model["detection"]["duplicated_vs_held_out"]["score_toy"]["auc"]
        assert 0 <= auc <= 1
    report = (out / "report.md").read_text()
    assert "toy: prompt length (a toy)" in report
    assert "| toy | score_toy |" in report
