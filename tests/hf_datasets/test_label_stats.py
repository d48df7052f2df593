"""The shipped CheXpert label statistics, and sampling labels that follow them."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from hf_datasets.label_stats import LabelSampler, derive_label_stats, shipped_stats
from hf_datasets.labels import OBSERVATIONS
from tests.conftest import CHEXPERT_CSV, needs


@needs(CHEXPERT_CSV)
def test_shipped_statistics_are_derived_from_the_real_file() -> None:
    assert json.loads(json.dumps(derive_label_stats(CHEXPERT_CSV))) == shipped_stats()
    assert shipped_stats()["covered_rows"] / shipped_stats()["rows"] > 0.99


def _real_frontal_positive() -> pd.DataFrame:
    frame = pd.read_csv(CHEXPERT_CSV)
    return frame[frame["Frontal/Lateral"] == "Frontal"][list(OBSERVATIONS)] == 1.0


@needs(CHEXPERT_CSV)
def test_sampled_labels_follow_real_prevalence_and_co_occurrence() -> None:
    sampler, rng = LabelSampler(), np.random.default_rng(0)
    draws = pd.DataFrame([sampler.labels(rng) for _ in range(20_000)])
    positive = draws == 1.0
    real = _real_frontal_positive()
    for name in OBSERVATIONS:
        assert abs(positive[name].mean() - real[name].mean()) < 0.015, name
    for a, b in [
        ("Cardiomegaly", "Pleural Effusion"),
        ("Edema", "Pleural Effusion"),
        ("Lung Opacity", "Support Devices"),
    ]:
        conditional = positive[b][positive[a]].mean()
        assert abs(conditional - real[b][real[a]].mean()) < 0.04, (a, b)
        assert conditional != positive[b].mean()  # co-occurrence, not independence
    uncertain = (draws == -1.0).mean()
    assert 0.01 < uncertain["Atelectasis"] < 0.3
    no_finding = draws["No Finding"] == 1.0
    pathologies = [o for o in OBSERVATIONS if o not in ("No Finding", "Support Devices")]
    assert not (draws.loc[no_finding, pathologies] == 1.0).any().any()


def test_sampler_demographics() -> None:
    sampler, rng = LabelSampler(), np.random.default_rng(1)
    sexes = [sampler.sex(rng) for _ in range(2000)]
    ages = [sampler.age(rng) for _ in range(2000)]
    views = [sampler.view(rng) for _ in range(2000)]
    assert 0.3 < sexes.count("F") / 2000 < 0.5
    assert 50 < np.mean(ages) < 70 and min(ages) >= 18 and max(ages) <= 90
    assert 0.75 < views.count("AP") / 2000 < 0.92
    assert max(sampler.num_studies(rng, 3) for _ in range(500)) == 3
