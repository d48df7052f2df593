"""Tests for the synthetic frontal chest radiograph renderer."""

from __future__ import annotations

import math
import time
from dataclasses import replace

import numpy as np
import pytest

from hf_datasets.phantom_render import (
    OBSERVATIONS,
    Anatomy,
    cardiothoracic_ratio,
    render,
    sample_anatomy,
    vary_study,
)

SIZE = 128


def _anatomy(seed: int) -> Anatomy:
    """A random patient with a random study variation."""
    rng = np.random.default_rng(seed)
    return vary_study(sample_anatomy(rng), rng)


def _render(
    anatomy: Anatomy, findings: dict, seed: int, view: str = "PA", size: int = SIZE
) -> np.ndarray:
    """Render with a fresh generator so that calls with the same seed are paired."""
    return render(anatomy, findings, view, size, np.random.default_rng(seed))


def _pair(finding: str, seed: int, view: str = "PA") -> tuple[np.ndarray, np.ndarray]:
    """Same patient, study and noise rendered without and with a positive finding."""
    anatomy = _anatomy(seed)
    return _render(anatomy, {}, seed + 1, view), _render(anatomy, {finding: 1.0}, seed + 1, view)


def _region(img: np.ndarray, y0: float, y1: float, u0: float, u1: float) -> np.ndarray:
    """Pixels of both hemithoraces between normalised heights y0..y1 and lateral offsets u0..u1."""
    n = img.shape[0]

    def idx(t: float) -> int:
        return round((t + 1.0) / 2.0 * n)

    rows = slice(idx(y0), idx(y1))
    return np.concatenate(
        [img[rows, idx(-u1) : idx(-u0)].ravel(), img[rows, idx(u0) : idx(u1)].ravel()]
    )


def _high_pass(img: np.ndarray) -> np.ndarray:
    """Image minus its 3x3 box mean (edges trimmed)."""
    f = img.astype(np.float64)
    box = (
        sum(
            f[1 + dy : f.shape[0] - 1 + dy, 1 + dx : f.shape[1] - 1 + dx]
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
        )
        / 9.0
    )
    out = np.zeros_like(f)
    out[1:-1, 1:-1] = f[1:-1, 1:-1] - box
    return out


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def test_observations_are_the_chexpert_labels_in_order() -> None:
    assert len(OBSERVATIONS) == 14
    assert OBSERVATIONS[0] == "No Finding"
    assert OBSERVATIONS[2] == "Cardiomegaly"
    assert OBSERVATIONS[-1] == "Support Devices"
    assert len(set(OBSERVATIONS)) == 14


def test_same_seed_gives_identical_images_and_different_seeds_differ() -> None:
    def make(seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        anatomy = vary_study(sample_anatomy(rng, sex="F", age=50), rng)
        return render(anatomy, {"Edema": 1.0, "Support Devices": 1.0}, "AP", SIZE, rng)

    a, b, c = make(7), make(7), make(8)
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 2.0


def test_render_is_a_pure_function_of_inputs_and_generator_state() -> None:
    anatomy = _anatomy(3)
    rng = np.random.default_rng(11)
    state = rng.bit_generator.state
    first = render(anatomy, {"Pneumothorax": 1.0}, "PA", SIZE, rng)
    rng.bit_generator.state = state
    second = render(anatomy, {"Pneumothorax": 1.0}, "PA", SIZE, rng)
    assert np.array_equal(first, second)


@pytest.mark.parametrize("size", [64, 128, 256])
@pytest.mark.parametrize("view", ["PA", "AP"])
def test_shape_dtype_and_grey_levels(size: int, view: str) -> None:
    img = _render(_anatomy(size), {}, 1, view, size)
    assert img.shape == (size, size)
    assert img.dtype == np.uint8
    assert 90 < img.mean() < 200
    assert img.std() > 25
    assert img.min() < 60  # air outside the body or in the lungs
    assert img.max() <= 236  # anatomy stays below the level reserved for devices


def test_large_size_renders() -> None:
    img = _render(_anatomy(5), {"Pleural Effusion": 1.0}, 2, "PA", 512)
    assert img.shape == (512, 512) and img.dtype == np.uint8


def test_zero_none_and_nan_are_absent() -> None:
    anatomy = _anatomy(4)
    empty = _render(anatomy, {}, 9)
    for value in (0.0, None, float("nan")):
        assert np.array_equal(_render(anatomy, {"Lung Lesion": value, "Edema": value}, 9), empty)
    assert np.array_equal(_render(anatomy, {"No Finding": 1.0}, 9), empty)


def test_uncertain_findings_are_milder_than_positive() -> None:
    names = [n for n in OBSERVATIONS if n not in ("No Finding", "Support Devices")]
    milder = 0
    for k, name in enumerate(names):
        anatomy = _anatomy(100 + k)
        base = _render(anatomy, {}, k).astype(int)
        pos = np.abs(_render(anatomy, {name: 1.0}, k).astype(int) - base).sum()
        unc = np.abs(_render(anatomy, {name: -1.0}, k).astype(int) - base).sum()
        assert pos > 0, name
        assert unc > 0, name
        milder += unc < pos
    assert milder >= len(names) - 1


def test_invalid_arguments_raise() -> None:
    anatomy = _anatomy(0)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        render(anatomy, {"Cardiomegally": 1.0}, "PA", SIZE, rng)
    with pytest.raises(ValueError):
        render(anatomy, {}, "LATERAL", SIZE, rng)
    with pytest.raises(ValueError):
        sample_anatomy(rng, sex="X")


def test_sex_and_study_variation() -> None:
    rng = np.random.default_rng(0)
    women = [sample_anatomy(rng, sex="F", age=40) for _ in range(20)]
    men = [sample_anatomy(rng, sex="M", age=40) for _ in range(20)]
    assert all(a.breast > 0 for a in women) and all(a.breast == 0 for a in men)
    assert np.mean([a.body_width for a in men]) > np.mean([a.body_width for a in women])
    young = [sample_anatomy(rng, age=20).bone_density for _ in range(20)]
    old = [sample_anatomy(rng, age=90).bone_density for _ in range(20)]
    assert np.mean(old) < np.mean(young)

    patient = women[0]
    study = vary_study(patient, rng)
    assert study.texture_seed == patient.texture_seed
    assert study.heart_width == patient.heart_width
    assert study.lung_width_r == patient.lung_width_r
    assert (study.shift_x, study.rotation) != (patient.shift_x, patient.rotation)
    same = replace(study, shift_x=patient.shift_x, shift_y=patient.shift_y)
    assert same.texture_seed == patient.texture_seed


def test_cardiothoracic_ratio_separates_cardiomegaly() -> None:
    normal, enlarged = [], []
    for seed in range(200):
        anatomy = _anatomy(1000 + seed)
        normal.append(cardiothoracic_ratio(_render(anatomy, {"No Finding": 1.0}, seed)))
        enlarged.append(cardiothoracic_ratio(_render(anatomy, {"Cardiomegaly": 1.0}, seed)))
    normal_a, enlarged_a = np.array(normal), np.array(enlarged)
    assert not np.isnan(normal_a).any() and not np.isnan(enlarged_a).any()
    print(f"CTR no finding {normal_a.mean():.3f}, cardiomegaly {enlarged_a.mean():.3f}")
    assert 0.38 < normal_a.mean() < 0.50
    assert enlarged_a.mean() > 0.55
    assert enlarged_a.mean() - normal_a.mean() > 0.07
    assert _auc(enlarged_a, normal_a) > 0.9


def test_ap_view_magnifies_the_heart() -> None:
    pa, ap = [], []
    for seed in range(30):
        anatomy = _anatomy(2000 + seed)
        pa.append(cardiothoracic_ratio(_render(anatomy, {}, seed, "PA")))
        ap.append(cardiothoracic_ratio(_render(anatomy, {}, seed, "AP")))
    assert np.mean(ap) > np.mean(pa) + 0.02


def test_pleural_effusion_whitens_the_costophrenic_region() -> None:
    diffs = []
    for seed in range(30):
        without, with_ = _pair("Pleural Effusion", 3000 + seed)
        region = (0.3, 0.55, 0.55, 0.8)
        diffs.append(_region(with_, *region).mean() - _region(without, *region).mean())
    diffs_a = np.array(diffs)
    assert diffs_a.mean() > 10.0
    assert (diffs_a > 2.0).mean() > 0.9


def test_pneumothorax_removes_lung_markings_at_the_apex() -> None:
    diffs = []
    for seed in range(30):
        without, with_ = _pair("Pneumothorax", 4000 + seed)
        region = (-0.45, -0.2, 0.52, 0.66)
        diffs.append(
            _region(_high_pass(with_), *region).std() - _region(_high_pass(without), *region).std()
        )
    diffs_a = np.array(diffs)
    assert diffs_a.mean() < 0.0
    assert (diffs_a < 0).mean() > 0.75


def test_support_devices_add_near_maximal_pixels() -> None:
    for seed in range(15):
        without, with_ = _pair("Support Devices", 5000 + seed, view="AP" if seed % 2 else "PA")
        assert (without >= 240).sum() == 0
        assert (with_ >= 240).sum() > 20


def test_throughput_single_thread() -> None:
    rng = np.random.default_rng(0)
    names = list(OBSERVATIONS)
    render(sample_anatomy(rng), {}, "PA", SIZE, rng)  # warm the per-size caches
    n = 200
    start = time.perf_counter()
    for i in range(n):
        anatomy = vary_study(sample_anatomy(rng), rng)
        render(anatomy, {names[i % len(names)]: 1.0}, "PA" if i % 2 else "AP", SIZE, rng)
    rate = n / (time.perf_counter() - start)
    print(f"phantom throughput at {SIZE} px: {rate:.0f} images/s")
    assert math.isfinite(rate) and rate >= 50.0
