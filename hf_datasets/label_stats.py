"""Label statistics of CheXpert's training file, and sampling labels that follow them.

The phantom generator draws each synthetic study's labels from these statistics, so that
findings co-occur as they do in CheXpert. What is stored is aggregate counts only:

- the joint distribution of which observations are positive (each pattern seen in at
  least `min_count` frontal rows);
- for an observation that is not positive, how often it is uncertain, negative or blank,
  separately for rows with and without "No Finding";
- sex, age (5-year bins), AP/PA, and studies per patient.

Regenerate the shipped file with ``python -m hf_datasets.label_stats chexpert_train.csv.gz``.
"""

from __future__ import annotations

import argparse
import json
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hf_datasets.labels import NEGATIVE, OBSERVATIONS, POSITIVE, UNCERTAIN

STATS_FILE = "chexpert_label_stats.json"
OTHER_STATES: tuple[float | None, ...] = (UNCERTAIN, NEGATIVE, None)


def derive_label_stats(csv_path: str | Path, min_count: int = 5) -> dict[str, Any]:
    """Aggregate statistics of the frontal rows of a CheXpert label CSV."""
    frame = pd.read_csv(csv_path)
    frame = frame[frame["Frontal/Lateral"] == "Frontal"]
    labels = frame[list(OBSERVATIONS)]
    positive = (labels == POSITIVE).to_numpy()
    patterns = pd.Series(["".join("1" if p else "0" for p in row) for row in positive])
    counts = patterns.value_counts()
    kept = counts[counts >= min_count]
    no_finding = positive[:, 0]
    other = {}
    for group, rows in (("no_finding", no_finding), ("finding", ~no_finding)):
        other[group] = {}
        for j, name in enumerate(OBSERVATIONS):
            values = labels[name].to_numpy()[rows & ~positive[:, j]]
            shares = [
                float(np.mean(values == UNCERTAIN)) if len(values) else 0.0,
                float(np.mean(values == NEGATIVE)) if len(values) else 0.0,
            ]
            other[group][name] = [round(s, 5) for s in shares]
    patients = frame["Path"].str.extract(r"(patient\d+)/(study\d+)")
    studies = patients.drop_duplicates().groupby(0).size().value_counts().sort_index()
    ages = frame["Age"][frame["Age"] > 0]
    return {
        "source": "CheXpert-v1.0 train.csv, frontal rows",
        "rows": len(frame),
        "patients": int(patients[0].nunique()),
        "observations": list(OBSERVATIONS),
        "min_count": min_count,
        "covered_rows": int(kept.sum()),
        "positive_patterns": {k: int(v) for k, v in kept.items()},
        "other_states": other,
        "sex": {k: int(v) for k, v in frame["Sex"].value_counts().items()},
        "age_5y": {int(k): int(v) for k, v in (ages // 5 * 5).value_counts().sort_index().items()},
        "view": {k: int(v) for k, v in frame["AP/PA"].value_counts().items()},
        "studies_per_patient": {int(k): int(v) for k, v in studies.items()},
    }


@cache
def shipped_stats() -> dict[str, Any]:
    """The statistics shipped with chexmem (derived from the real CheXpert training file)."""
    text = resources.files("hf_datasets").joinpath("data", STATS_FILE).read_text()
    return json.loads(text)


class LabelSampler:
    """Draws labels, sex, age, view and study counts that follow the stored statistics."""

    def __init__(self, stats: dict[str, Any] | None = None) -> None:
        stats = stats or shipped_stats()
        self.patterns = np.array(
            [[c == "1" for c in p] for p in stats["positive_patterns"]], dtype=bool
        )
        self.pattern_p = _normalised(stats["positive_patterns"].values())
        self.other = {
            g: np.array([stats["other_states"][g][o] for o in OBSERVATIONS])
            for g in stats["other_states"]
        }
        self.sexes, self.sex_p = list(stats["sex"]), _normalised(stats["sex"].values())
        self.age_bins, self.age_p = (
            [int(a) for a in stats["age_5y"]],
            _normalised(stats["age_5y"].values()),
        )
        self.views = [v for v in stats["view"] if v in ("AP", "PA")]
        self.view_p = _normalised(stats["view"][v] for v in self.views)
        self.studies = [int(k) for k in stats["studies_per_patient"]]
        self.studies_p = _normalised(stats["studies_per_patient"].values())

    def labels(self, rng: np.random.Generator) -> dict[str, float | None]:
        """One study's 14 labels: 1.0, -1.0, 0.0 or None."""
        positive = self.patterns[rng.choice(len(self.patterns), p=self.pattern_p)]
        shares = self.other["no_finding" if positive[0] else "finding"]
        draws = rng.random(len(OBSERVATIONS))
        result: dict[str, float | None] = {}
        for j, name in enumerate(OBSERVATIONS):
            if positive[j]:
                result[name] = POSITIVE
            elif draws[j] < shares[j, 0]:
                result[name] = UNCERTAIN
            elif draws[j] < shares[j, 0] + shares[j, 1]:
                result[name] = NEGATIVE
            else:
                result[name] = None
        return result

    def sex(self, rng: np.random.Generator) -> str | None:
        """'F' or 'M' (None for the rare 'Unknown')."""
        return {"Female": "F", "Male": "M"}.get(
            self.sexes[rng.choice(len(self.sexes), p=self.sex_p)]
        )

    def age(self, rng: np.random.Generator) -> int:
        """Age in years, uniform within its 5-year bin."""
        low = self.age_bins[rng.choice(len(self.age_bins), p=self.age_p)]
        return int(min(90, max(18, low + rng.integers(0, 5))))

    def view(self, rng: np.random.Generator) -> str:
        """'AP' or 'PA'."""
        return self.views[rng.choice(len(self.views), p=self.view_p)]

    def num_studies(self, rng: np.random.Generator, maximum: int) -> int:
        """Studies for one patient, capped at `maximum`."""
        return min(maximum, self.studies[rng.choice(len(self.studies), p=self.studies_p)])


def _normalised(values: Any) -> np.ndarray:
    """Counts as probabilities."""
    array = np.asarray(list(values), dtype=float)
    return array / array.sum()


def main() -> None:
    """Write the statistics of a CheXpert label CSV as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", help="CheXpert train.csv (or .csv.gz)")
    parser.add_argument("--min_count", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "data" / STATS_FILE))
    args = parser.parse_args()
    stats = derive_label_stats(args.csv, args.min_count)
    Path(args.out).write_text(json.dumps(stats, indent=1) + "\n")
    share = stats["covered_rows"] / stats["rows"]
    print(
        f"wrote {args.out}: {len(stats['positive_patterns'])} patterns covering {share:.1%} of rows"
    )


if __name__ == "__main__":
    main()
