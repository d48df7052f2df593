"""Patient-level splits: every image of a patient lands in the same split."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hf_datasets.errors import ChexmemError
from hf_datasets.features import SPLITS


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """Validate (train, validation, test) fractions: three non-negative numbers summing to 1."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ChexmemError(
            f"split fractions must be three non-negative numbers (train validation test) "
            f"summing to 1, got {list(fractions)}"
        )
    return (float(fractions[0]), float(fractions[1]), float(fractions[2]))


def split_patients(
    patient_ids: Sequence[str], fractions: Sequence[float], seed: int
) -> dict[str, str]:
    """Assign each distinct patient to 'train', 'validation' or 'test' by seed.

    Patients are sorted before shuffling, so the result depends only on the set of ids and
    the seed, not on row order. Counts are rounded so that the three add up exactly; every
    non-zero fraction gets at least one patient when there are enough patients.
    """
    fractions = check_fractions(fractions)
    patients = sorted(set(patient_ids))
    order = np.random.default_rng(seed).permutation(len(patients))
    n = len(patients)
    n_val = round(fractions[1] * n)
    n_test = round(fractions[2] * n)
    if n >= 3:
        n_val = max(n_val, 1 if fractions[1] > 0 else 0)
        n_test = max(n_test, 1 if fractions[2] > 0 else 0)
    n_train = n - n_val - n_test
    if fractions[0] > 0 and n_train < 1:
        raise ChexmemError(f"{n} patient(s) are too few for split fractions {list(fractions)}")
    bounds = (n_train, n_train + n_val)
    assignment = {}
    for rank, index in enumerate(order):
        split = SPLITS[0] if rank < bounds[0] else SPLITS[1] if rank < bounds[1] else SPLITS[2]
        assignment[patients[index]] = split
    return assignment
