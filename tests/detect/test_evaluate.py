"""Detection metrics against values worked out by hand and against known properties."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from detect.evaluate import (
    auc_interval,
    copy_rate,
    correlation,
    detection,
    relative_change_interval,
    roc_auc,
    roc_curve,
    tpr_at_fpr,
)
from hf_datasets.errors import ChexmemError


def test_auc_by_hand_with_ties() -> None:
    labels = [1, 1, 0, 0, 1, 0]
    scores = [0.9, 0.4, 0.4, 0.1, 0.8, 0.3]
    # positive-negative pairs won: 0.9 beats 3, 0.8 beats 3, 0.4 beats 2 and ties 1 -> 8.5 / 9
    assert roc_auc(labels, scores) == pytest.approx(8.5 / 9)
    assert roc_auc([0, 1], [1.0, 0.0]) == 0.0
    assert roc_auc([0, 1, 0, 1], [0.5] * 4) == 0.5


def test_roc_points_and_tpr_at_low_fpr() -> None:
    labels = [1, 1, 0, 1, 0, 0]
    scores = [6, 5, 4, 3, 2, 1]
    curve = roc_curve(labels, scores)
    np.testing.assert_allclose(curve.tpr, [0, 1 / 3, 2 / 3, 2 / 3, 1, 1, 1])
    np.testing.assert_allclose(curve.fpr, [0, 0, 0, 1 / 3, 1 / 3, 2 / 3, 1])
    assert curve.thresholds[0] == np.inf
    assert tpr_at_fpr(labels, scores, 0.01) == pytest.approx(2 / 3)
    assert tpr_at_fpr(labels, scores, 0.5) == pytest.approx(1.0)


def test_detection_summary_on_a_large_sample() -> None:
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(500), np.zeros(500)]
    scores = np.r_[rng.normal(3, 1, 500), rng.normal(0, 1, 500)]
    result = detection(labels, scores)
    # binormal AUC with separation 3 and unit variances: Phi(3 / sqrt(2)) = 0.983
    assert result.auc == pytest.approx(stats.norm.cdf(3 / np.sqrt(2)), abs=0.01)
    assert 0.5 < result.tpr_at_1pct_fpr < 0.9  # Phi(3 - 2.326) = 0.75
    assert (result.positives, result.negatives) == (500, 500)


def test_correlations_with_bootstrap_intervals() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=200)
    y = x + rng.normal(scale=0.5, size=200)
    spearman = correlation(x, y, "spearman", n_boot=500)
    assert spearman.value == pytest.approx(stats.spearmanr(x, y)[0])
    assert spearman.low < spearman.value < spearman.high
    assert spearman.high - spearman.low < 0.15
    kendall = correlation(x, y, "kendall", n_boot=500)
    assert 0 < kendall.value < spearman.value
    assert correlation(x, y, n_boot=200, seed=3) == correlation(x, y, n_boot=200, seed=3)


@pytest.mark.parametrize(
    ("labels", "scores", "message"),
    [
        ([1, 1], [0.1, 0.2], "both memorized"),
        ([1, 0], [0.1], "2 labels but 1 scores"),
        ([2, 0], [0.1, 0.2], "must be 0"),
        ([1, 0], [np.nan, 0.2], "finite"),
    ],
)
def test_bad_input_is_one_clear_error(labels, scores, message) -> None:
    with pytest.raises(ChexmemError, match=message):
        detection(labels, scores)


def test_auc_interval_is_the_stratified_bootstrap_recomputed_draw_by_draw() -> None:
    rng = np.random.default_rng(1)
    labels = np.r_[np.ones(12, int), np.zeros(30, int)]
    scores = np.r_[rng.normal(1.0, 1.0, 12), rng.normal(0.0, 1.0, 30)]
    low, high = auc_interval(labels, scores, n_boot=300, seed=4)
    draws = np.random.default_rng(4)
    positives, negatives = scores[:12], scores[12:]
    pos = draws.integers(0, 12, size=(300, 12))
    neg = draws.integers(0, 30, size=(300, 30))
    boot = [
        roc_auc(labels, np.r_[positives[p], negatives[n]]) for p, n in zip(pos, neg, strict=True)
    ]
    assert (low, high) == pytest.approx(tuple(np.quantile(boot, [0.025, 0.975])))
    assert low < roc_auc(labels, scores) < high
    result = detection(labels, scores)
    assert result.auc_low < result.auc < result.auc_high <= 1.0
    # more positives and negatives of the same separation: a narrower interval
    many = np.r_[np.ones(120, int), np.zeros(300, int)]
    wide = np.r_[rng.normal(1.0, 1.0, 120), rng.normal(0.0, 1.0, 300)]
    narrow_low, narrow_high = auc_interval(many, wide)
    assert narrow_high - narrow_low < high - low


def test_copy_rate_resamples_whole_prompts() -> None:
    # 3 prompts x 4 generations: prompt 0 always copies, prompt 1 half the time, prompt 2 never
    similarity = [0.9, 0.95, 0.91, 0.99, 0.9, 0.5, 0.92, 0.4, 0.1, 0.2, 0.3, 0.2]
    prompt_ids = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    found = copy_rate(similarity, prompt_ids, threshold=0.9, n_boot=500, seed=3)
    assert found.rate == 6 / 12 and found.prompts == 3 and found.generations == 12
    # the interval recomputed draw by draw: resample prompts, pool their generations
    rng = np.random.default_rng(3)
    draws = rng.integers(0, 3, size=(500, 3))
    per_prompt = np.array([4.0, 2.0, 0.0])
    boot = per_prompt[draws].sum(axis=1) / 12.0
    assert (found.low, found.high) == tuple(np.quantile(boot, [0.025, 0.975]))
    # a prompt's generations move together: the interval spans all-or-nothing prompts
    assert found.low <= 2 / 12 and found.high >= 10 / 12


def test_copy_rate_needs_matching_inputs() -> None:
    with pytest.raises(ChexmemError, match="one prompt id per similarity"):
        copy_rate([0.5, 0.6], [0], 0.5)


def test_relative_change_interval_resamples_the_same_prompts_under_both_methods() -> None:
    baseline = np.array([1.0, 0.5, 0.75, 0.0, 1.0])
    treated = np.array([0.25, 0.0, 0.25, 0.0, 0.5])
    low, high = relative_change_interval(treated, baseline, n_boot=400, seed=1)
    rng = np.random.default_rng(1)
    draws = rng.integers(0, 5, size=(400, 5))
    base = baseline[draws].mean(axis=1)
    boot = treated[draws].mean(axis=1)[base > 0] / base[base > 0] - 1.0
    assert (low, high) == pytest.approx(tuple(np.quantile(boot, [0.025, 0.975])), abs=1e-12)
    assert low <= treated.mean() / baseline.mean() - 1.0 <= high < 0
    # no copies at all under the baseline: no relative change to give
    assert all(np.isnan(relative_change_interval([0.0, 0.0], [0.0, 0.0])))
