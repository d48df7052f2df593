"""Metrics as JSON lines (always) and TensorBoard (when installed), through accelerate trackers."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from typing import Any

from accelerate.tracking import GeneralTracker

METRICS_FILE = "metrics.jsonl"


class JsonlTracker(GeneralTracker):
    """Appends `{"step": n, "time": t, ...metrics}` lines to logs/metrics.jsonl."""

    name = "jsonl"
    requires_logging_directory = True

    def __init__(self, run_name: str, logging_dir: str | Path) -> None:
        super().__init__()
        self.run_name = run_name
        self.path = Path(logging_dir) / METRICS_FILE

    @property
    def tracker(self) -> Path:
        """The file written to."""
        return self.path

    def store_init_configuration(self, values: dict[str, Any]) -> None:
        """Write the run configuration next to the metrics."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        (self.path.parent / "config.json").write_text(json.dumps(values, indent=1, default=str))

    def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        """Append one line."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"step": step, "time": round(time.time(), 3), **values}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record, default=float) + "\n")


def trackers(report_to: str, logging_dir: Path) -> list[Any]:
    """The trackers for `--report_to` (auto: jsonl + tensorboard if installed)."""
    chosen: list[Any] = [JsonlTracker("chexmem", logging_dir)]
    wants_tb = report_to in ("tensorboard", "all") or (
        report_to == "auto" and importlib.util.find_spec("tensorboard") is not None
    )
    if wants_tb:
        chosen.append("tensorboard")
    if report_to in ("wandb", "all"):
        chosen.append("wandb")
    return chosen


def read_metrics(logging_dir: str | Path) -> list[dict[str, Any]]:
    """All lines logged so far."""
    path = Path(logging_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
