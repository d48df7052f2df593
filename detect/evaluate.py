"""How good is a detector: ROC AUC with its interval, TPR at 1% FPR, ROC points, rank
correlations with CIs.

Labels are 1 for memorized (positive) and 0 for not; higher scores mean "more likely
memorized". TPR@FPR follows the convention of Wen et al.'s evaluation: on the ROC curve
(thresholds from high to low), the TPR at the last point whose FPR is still below the
target, i.e. the best TPR any threshold reaches while keeping FPR < target.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

from hf_datasets.errors import ChexmemError


@dataclass
class RocCurve:
    """ROC points from the highest threshold down (the first point is (0, 0))."""

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray


@dataclass
class Detection:
    """Detection quality of one score against binary labels."""

    auc: float
    tpr_at_1pct_fpr: float
    positives: int
    negatives: int
    auc_low: float = float("nan")  # 95% stratified percentile-bootstrap interval of the AUC
    auc_high: float = float("nan")

    def to_dict(self) -> dict[str, float | int]:
        """Plain mapping for JSON."""
        return asdict(self)


@dataclass
class Correlation:
    """A rank correlation with its percentile-bootstrap confidence interval."""

    method: str
    value: float
    low: float
    high: float
    pvalue: float
    n: int
    confidence: float

    def to_dict(self) -> dict[str, float | int | str]:
        """Plain mapping for JSON."""
        return asdict(self)


def _check(labels: Sequence[int], scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Labels as 0/1 and scores as floats, both classes present."""
    y = np.asarray(labels).astype(int).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ChexmemError(f"{len(y)} labels but {len(s)} scores")
    if not set(np.unique(y)) <= {0, 1}:
        raise ChexmemError("labels must be 0 (not memorized) or 1 (memorized)")
    if y.min(initial=1) == y.max(initial=0):
        raise ChexmemError("detection needs both memorized (1) and non-memorized (0) examples")
    if not np.isfinite(s).all():
        raise ChexmemError("scores must be finite")
    return y, s


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Area under the ROC curve (the Mann-Whitney statistic; ties count one half)."""
    y, s = _check(labels, scores)
    ranks = stats.rankdata(s)
    positives = int(y.sum())
    negatives = len(y) - positives
    return float((ranks[y == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def roc_curve(labels: Sequence[int], scores: Sequence[float]) -> RocCurve:
    """FPR and TPR at every distinct threshold, from the highest down."""
    y, s = _check(labels, scores)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_each = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp = np.cumsum(y)[last_of_each]
    fp = (last_of_each + 1) - tp
    return RocCurve(
        fpr=np.r_[0.0, fp / (len(y) - y.sum())],
        tpr=np.r_[0.0, tp / y.sum()],
        thresholds=np.r_[np.inf, s[last_of_each]],
    )


def percentile_interval(boot: np.ndarray, confidence: float) -> tuple[float, float]:
    """The central `confidence` interval of bootstrap draws."""
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(boot, [tail, 1.0 - tail])
    return float(low), float(high)


@dataclass
class CopyRate:
    """Share of generations above the copy threshold, with a bootstrap interval over prompts."""

    rate: float
    low: float
    high: float
    prompts: int
    generations: int

    def to_dict(self) -> dict[str, float | int]:
        """Plain mapping for JSON."""
        return asdict(self)


def copy_rate(
    similarity: Sequence[float],
    prompt_ids: Sequence[int],
    threshold: float,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> CopyRate:
    """Copy rate of generations (similarity >= threshold) with a percentile-bootstrap
    interval that resamples whole prompts (a prompt's generations are not independent)."""
    s = np.asarray(similarity, dtype=np.float64).ravel()
    ids = np.asarray(prompt_ids).ravel()
    if s.shape != ids.shape or len(s) == 0:
        raise ChexmemError("copy_rate needs one prompt id per similarity, at least one")
    _, cluster = np.unique(ids, return_inverse=True)
    copies = np.bincount(cluster, weights=(s >= threshold).astype(np.float64))
    counts = np.bincount(cluster).astype(np.float64)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(counts), size=(n_boot, len(counts)))
    boot = copies[draws].sum(axis=1) / counts[draws].sum(axis=1)
    low, high = percentile_interval(boot, confidence)
    return CopyRate(
        rate=float(copies.sum() / counts.sum()),
        low=low,
        high=high,
        prompts=len(counts),
        generations=len(s),
    )


def relative_change_interval(
    treated: Sequence[float],
    baseline: Sequence[float],
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile-bootstrap interval of mean(treated) / mean(baseline) - 1 over paired units
    (the same prompts under two methods), resampled together; draws with a zero baseline
    are left out (NaN, NaN when every draw has one)."""
    t = np.asarray(treated, dtype=np.float64).ravel()
    b = np.asarray(baseline, dtype=np.float64).ravel()
    if t.shape != b.shape or len(t) == 0:
        raise ChexmemError("a paired change needs two sequences of the same length, at least 1")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(t), size=(n_boot, len(t)))
    base = b[draws].mean(axis=1)
    keep = base > 0
    if not keep.any():
        return float("nan"), float("nan")
    boot = t[draws].mean(axis=1)[keep] / base[keep] - 1.0
    return percentile_interval(boot, confidence)


def tpr_at_fpr(labels: Sequence[int], scores: Sequence[float], target: float = 0.01) -> float:
    """The best TPR of any threshold whose FPR stays below `target`."""
    curve = roc_curve(labels, scores)
    return float(curve.tpr[curve.fpr < target].max())


def auc_interval(
    labels: Sequence[int],
    scores: Sequence[float],
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the AUC, positives and negatives resampled apart."""
    y, s = _check(labels, scores)
    rng = np.random.default_rng(seed)
    positives, negatives = s[y == 1], s[y == 0]
    pos = positives[rng.integers(0, len(positives), size=(n_boot, len(positives)))]
    neg = negatives[rng.integers(0, len(negatives), size=(n_boot, len(negatives)))]
    ranks = stats.rankdata(np.concatenate([pos, neg], axis=1), axis=1)
    p, n = len(positives), len(negatives)
    boot = (ranks[:, :p].sum(axis=1) - p * (p + 1) / 2) / (p * n)
    return percentile_interval(boot, confidence)


def detection(
    labels: Sequence[int], scores: Sequence[float], n_boot: int = 2000, seed: int = 0
) -> Detection:
    """AUC with its 95% bootstrap interval, and TPR@1%FPR."""
    y, _ = _check(labels, scores)
    low, high = auc_interval(labels, scores, n_boot, seed=seed)
    return Detection(
        auc=roc_auc(labels, scores),
        tpr_at_1pct_fpr=tpr_at_fpr(labels, scores, 0.01),
        positives=int(y.sum()),
        negatives=int(len(y) - y.sum()),
        auc_low=low,
        auc_high=high,
    )


def correlation(
    x: Sequence[float],
    y: Sequence[float],
    method: str = "spearman",
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Correlation:
    """Spearman or Kendall correlation with a percentile bootstrap interval over pairs."""
    a = np.asarray(x, dtype=np.float64).ravel()
    b = np.asarray(y, dtype=np.float64).ravel()
    if a.shape != b.shape or len(a) < 3:
        raise ChexmemError("correlation needs two sequences of the same length, at least 3")
    functions = {"spearman": stats.spearmanr, "kendall": stats.kendalltau}
    if method not in functions:
        raise ChexmemError(f"method must be one of {', '.join(functions)}, not {method!r}")
    function = functions[method]
    result = function(a, b)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(a), size=(n_boot, len(a)))
    boot = np.array([function(a[d], b[d])[0] for d in draws])
    boot = boot[np.isfinite(boot)]  # a resample with one distinct value has no correlation
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(boot, [tail, 1.0 - tail]) if len(boot) else (np.nan, np.nan)
    return Correlation(
        method=method,
        value=float(result[0]),
        low=float(low),
        high=float(high),
        pvalue=float(result[1]),
        n=len(a),
        confidence=confidence,
    )
