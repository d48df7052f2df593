"""The floor benchmarks: each detector's bare UNet work, and the training floors, measured."""

from __future__ import annotations

import pytest

from scripts.bench_floor import DETECTORS, chunks, detection_ratios


def test_chunks_cover_the_work_in_batches() -> None:
    assert chunks(10, 4) == [4, 4, 2] and chunks(4, 8) == [4] and chunks(0, 4) == []


@pytest.mark.slow
def test_every_detector_gets_its_seconds_floor_and_ratio(tiny_model) -> None:
    from detect.models import load_pipeline

    pipe = load_pipeline(tiny_model)
    table = detection_ratios(pipe, prompts=2, n=2, batch=4, repeats=1)
    assert set(table) == set(DETECTORS)
    for row in table.values():
        assert row["seconds"] > 0 and row["floor_seconds"] > 0
        assert row["ratio"] == pytest.approx(row["seconds"] / row["floor_seconds"])
    # anisotropy adds a second two-branch call per generation, sharpness a JVP
    assert table["anisotropy"]["floor_seconds"] > table["magnitude"]["floor_seconds"]
    assert table["sharpness"]["floor_seconds"] > table["magnitude"]["floor_seconds"]
