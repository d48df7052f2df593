"""When a held-out calibration cannot be trusted: the status, the warning and the fallback."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from detect.calibration import MIN_VALUES, Calibration, check_calibration, given, warnings_of
from detect.similarity import calibrate_threshold
from mitigate.embedding import calibrate_target

FIX = "use more held-out images (--heldout_split)"


def spread(n: int) -> np.ndarray:
    """n distinct values in (0.2, 0.8)."""
    return np.linspace(0.2, 0.8, n)


def test_enough_values_with_spread_are_ok_and_silent(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="detect"):
        got = check_calibration("copy threshold", 0.7, spread(MIN_VALUES), FIX, ceiling=1.0)
    assert got == Calibration("copy threshold", 0.7, MIN_VALUES, "ok") and got.trusted
    assert caplog.text == "" and got.record()["warning"] is None


def test_too_few_values_warn_with_the_cause_and_the_fix(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="detect"):
        got = check_calibration("copy threshold", 0.7, spread(7), FIX, ceiling=1.0)
    assert got.status == "few_values" and not got.trusted and got.value == 0.7  # value kept
    assert "rests on 7 held-out value(s), fewer than 20" in got.warning
    assert FIX in got.warning and got.warning in caplog.text


@pytest.mark.parametrize(
    ("value", "values", "bounds", "cause"),
    [
        (1.0, spread(30), {"ceiling": 1.0, "ceiling_means": "nothing is a copy"}, "maximum 1"),
        (0.0, spread(30), {"floor": 0.0, "floor_means": "never reached"}, "at or below 0"),
        (0.5, np.full(30, 0.5), {}, "all 30 held-out values are the same"),
    ],
)
def test_degenerate_calibrations_are_named(value, values, bounds, cause) -> None:
    got = check_calibration("x", value, values, FIX, **bounds)
    assert got.status == "degenerate" and cause in got.warning and FIX in got.warning
    assert got.record() == {
        "value": value, "status": "degenerate", "num_values": 30, "warning": got.warning
    }  # fmt: skip


def test_degenerate_and_few_values_says_both() -> None:
    got = check_calibration("x", 1.0, [1.0, 1.0], FIX, ceiling=1.0, ceiling_means="useless")
    assert got.status == "degenerate" and "maximum" in got.warning and "2 held-out" in got.warning


def test_a_given_value_is_trusted_and_listed_without_warnings() -> None:
    value = given("tau_mem", 0.4)
    assert value.trusted and value.status == "given" and value.num_values is None
    bad = check_calibration("x", 0.5, [0.5], FIX)
    assert warnings_of(value, None, bad.record(), bad) == [bad.warning, bad.warning]
    assert float(value) == 0.4


def test_copy_threshold_on_held_out_images_that_are_training_images() -> None:
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(30, 8)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    got = calibrate_threshold(rows, rows)  # held-out == training: every similarity is 1
    assert got.value == pytest.approx(1.0, abs=1e-5) and got.status == "degenerate"
    assert "nothing is ever a copy" in got.warning and "--copy_threshold" in got.warning
    assert calibrate_threshold(rows[:25], rows[25:]).status == "ok"
    assert calibrate_threshold(rows[:5], rows[25:]).status == "few_values"


def test_embedding_target_of_zero_scores_cannot_be_reached() -> None:
    got = calibrate_target(np.zeros(25), 0.1)
    assert got.status == "degenerate" and "no prompt can reach it" in got.warning
    assert calibrate_target(np.linspace(0.3, 0.9, 25), 0.1).status == "ok"
    study = calibrate_target(np.linspace(0.3, 0.9, 5), 0.95, "detection flag", fix="more data")
    assert study.warning.startswith("detection flag (q0.95") and study.warning.endswith("more data")
