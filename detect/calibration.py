"""How far a value calibrated on held-out data can be trusted, and what happens when it cannot.

Three values in chexmem are calibrated on held-out (non-memorized) data:

* the copy threshold (`detect.similarity.calibrate_threshold`): a percentile of held-out real
  images' nearest-training similarity;
* NEMO's tau_mem (`detect.neurons.calibrate_threshold`): mean + 1 std of held-out prompts'
  largest pairwise SSIM;
* the embedding adjustment's target (`mitigate.embedding.calibrate_target`): a quantile of
  held-out prompts' first-step scores.

Each returns a `Calibration`, the value with a status:

* ``ok``: at least `MIN_VALUES` held-out values, with spread, and a value that decides
  something;
* ``few_values``: fewer than `MIN_VALUES` values (a 95th percentile of 10 values is their
  maximum; a std of 5 is noise);
* ``degenerate``: the values have no spread, or the value sits at the bound of its measure
  where it decides nothing (a copy threshold of 1.0 flags no generation, since a copy must
  lie above it; a tau_mem of 1.0 marks no prompt memorized; an embedding target at or below
  0 can never be reached);
* ``given``: set by the user, not calibrated.

The fallback, whatever the status: the computed value is kept (so a run stays reproducible
and comparable with its siblings), a warning names the cause and the flag or data that fix
it, and the status is written into every JSON summary that uses the value and shown in the
study's report. Nothing is silently replaced.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

MIN_VALUES = 20  # fewer held-out values than this and the calibration is flagged
EDGE_TOLERANCE = 1e-3  # a value this close to its measure's bound counts as at the bound
STATUSES = ("ok", "few_values", "degenerate", "given")


@dataclass(frozen=True)
class Calibration:
    """A calibrated value, how many held-out values it rests on, and whether to trust it."""

    what: str  # e.g. "copy threshold"
    value: float
    num_values: int | None  # None when given
    status: str  # one of STATUSES
    warning: str | None = None  # the cause and the fix, when status is not ok / given

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")

    def __float__(self) -> float:
        return self.value

    @property
    def trusted(self) -> bool:
        """Calibrated on enough values and not degenerate (or set by the user)."""
        return self.status in ("ok", "given")

    def record(self) -> dict[str, Any]:
        """The JSON form written next to the value: status, values used, warning."""
        return {
            "value": self.value,
            "status": self.status,
            "num_values": self.num_values,
            "warning": self.warning,
        }


def given(what: str, value: float) -> Calibration:
    """A value the user set: nothing to check."""
    return Calibration(what, float(value), None, "given")


def check_calibration(
    what: str,
    value: float,
    values: Sequence[float] | np.ndarray,
    fix: str,
    ceiling: float | None = None,
    ceiling_means: str = "",
    floor: float | None = None,
    floor_means: str = "",
) -> Calibration:
    """The calibration of `value` from held-out `values`; warns (naming `fix`) unless ok.

    `ceiling` / `floor`: the bound of the measure where the value decides nothing, and what
    that means for the user (`ceiling_means` / `floor_means`).
    """
    array = np.asarray(values, dtype=np.float64).ravel()
    value = float(value)
    n = int(array.size)
    causes = []
    status = "ok"
    if ceiling is not None and value >= ceiling - EDGE_TOLERANCE:
        status = "degenerate"
        causes.append(f"it is at the measure's maximum {ceiling:g}: {ceiling_means}")
    elif floor is not None and value <= floor + EDGE_TOLERANCE:
        status = "degenerate"
        causes.append(f"it is at or below {floor:g}: {floor_means}")
    elif n > 1 and float(np.ptp(array)) <= EDGE_TOLERANCE * max(1.0, abs(value)):
        status = "degenerate"
        causes.append(f"all {n} held-out values are the same ({value:.4f})")
    if n < MIN_VALUES:
        status = "degenerate" if status == "degenerate" else "few_values"
        causes.append(f"it rests on {n} held-out value(s), fewer than {MIN_VALUES}")
    if status == "ok":
        return Calibration(what, value, n, status)
    warning = f"{what} {value:.4f} cannot be trusted: {'; '.join(causes)}. Fix: {fix}"
    logger.warning(warning)
    return Calibration(what, value, n, status, warning)


def warnings_of(*calibrations: Calibration | dict[str, Any] | None) -> list[str]:
    """The warnings of these calibrations (objects or their `record()`), in order."""
    found = []
    for item in calibrations:
        text = item.get("warning") if isinstance(item, dict) else getattr(item, "warning", None)
        if text:
            found.append(text)
    return found
