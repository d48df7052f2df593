"""FID and KID: exact cases, against torchmetrics on the same features, and on real X-rays."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from detect.classifier import ClassifierConfig, FindingsClassifier, train_classifier
from detect.quality import (
    ClassifierFeatures,
    InceptionFeatures,
    QualityResult,
    TorchFeatures,
    fid,
    kid,
    polynomial_mmd,
    quality,
)
from detect.similarity import TorchEmbedder, pixels
from hf_datasets.errors import ChexmemError
from hf_datasets.storage import load_dataset_dir
from tests.conftest import OPEN_CXR, needs

pytestmark = [
    pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance`"),
    pytest.mark.filterwarnings("ignore:FID from"),  # asserted with pytest.warns where it matters
]


class Rows(torch.nn.Module):
    """Identity 'extractor': torchmetrics gets our feature rows as its images."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_features = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@pytest.fixture(scope="module")
def phantom_images(phantom_data: Path) -> list[Image.Image]:
    """All 40 phantom images (64 px) of every split."""
    dataset = load_dataset_dir(phantom_data)
    return [image for split in ("train", "validation", "test") for image in dataset[split]["image"]]


@pytest.fixture(scope="module")
def classifier(phantom_data: Path) -> FindingsClassifier:
    """A quickly trained findings CNN: a fixed network is all FID / KID need."""
    return train_classifier(phantom_data, ClassifierConfig(epochs=3, progress=False))


@pytest.fixture(scope="module")
def features(classifier: FindingsClassifier, phantom_images: list[Image.Image]) -> np.ndarray:
    return ClassifierFeatures(classifier).features(phantom_images)


def torchmetrics_fid(real: np.ndarray, fake: np.ndarray) -> float:
    metric = FrechetInceptionDistance(feature=Rows(real.shape[1]))
    metric.update(torch.from_numpy(real.astype(np.float64)), real=True)
    metric.update(torch.from_numpy(fake.astype(np.float64)), real=False)
    return float(metric.compute())


def gaussian(n: int, dim: int, seed: int, shift: float = 0.0) -> np.ndarray:
    """n draws of one fixed correlated Gaussian in dim dimensions, moved by `shift`."""
    mixing = np.random.default_rng(1234).normal(size=(dim, dim)) / np.sqrt(dim)
    return np.random.default_rng(seed).normal(size=(n, dim)) @ mixing + shift


def test_fid_of_a_set_with_itself_is_zero_and_a_shift_adds_its_square(features) -> None:
    assert fid(features, features) == pytest.approx(0.0, abs=1e-6)
    shift = np.full(features.shape[1], 0.05)
    # same covariance: FID is exactly the squared mean shift
    assert fid(features, features + shift) == pytest.approx(float(shift @ shift), rel=1e-6)
    real, fake = gaussian(400, 8, 0), gaussian(400, 8, 1)
    values = [fid(real, fake + s) for s in (0.0, 0.5, 1.0, 2.0)]
    assert values == sorted(values) and values[0] < 0.5 < values[-1]


def test_fid_equals_torchmetrics(features, classifier, phantom_images) -> None:
    real, fake = features[:20], features[20:]
    with pytest.warns(UserWarning, match="fewer images than dimensions"):
        ours = fid(real, fake)
    assert ours == pytest.approx(torchmetrics_fid(real, fake), rel=1e-3)
    for seed, shift in ((0, 0.0), (1, 0.3)):
        a, b = gaussian(300, 16, seed), gaussian(200, 16, seed + 10, shift)
        assert fid(a, b) == pytest.approx(torchmetrics_fid(a, b), rel=1e-3)
    # degenerate features (dead units, fewer images than dimensions) still agree
    a, b = gaussian(30, 64, 2), gaussian(30, 64, 3, 0.2)
    a[:, :10], b[:, :10] = 0, 0
    with pytest.warns(UserWarning):
        assert fid(a, b) == pytest.approx(torchmetrics_fid(a, b), rel=1e-3)
    # end to end: torchmetrics runs our network itself on uint8 image tensors
    metric = FrechetInceptionDistance(feature=classifier.feature_module())
    tensors = torch.from_numpy(np.stack([np.asarray(im) for im in phantom_images]))[:, None]
    metric.update(tensors[:20], real=True)
    metric.update(tensors[20:], real=False)
    assert float(metric.compute()) == pytest.approx(ours, rel=1e-3)


def test_kid_equals_torchmetrics(features) -> None:
    real, fake = features[:20].astype(np.float64), features[20:].astype(np.float64)
    # subsets as large as the sets are the whole sets: every subset gives the same MMD
    metric = KernelInceptionDistance(feature=Rows(real.shape[1]), subsets=5, subset_size=20)
    metric.update(torch.from_numpy(real), real=True)
    metric.update(torch.from_numpy(fake), real=False)
    expected_mean, expected_std = (float(v) for v in metric.compute())
    mean, std = kid(real, fake, subsets=5, subset_size=1000)  # clipped to 20
    assert mean == pytest.approx(expected_mean, rel=1e-6, abs=1e-12)
    assert std == pytest.approx(expected_std, abs=1e-9)
    assert mean == pytest.approx(polynomial_mmd(real, fake), rel=1e-9)
    # random subsets: the same estimator, so both means land near the full-set value
    a, b = gaussian(300, 16, 0), gaussian(300, 16, 1, 0.3)
    torch.manual_seed(0)
    metric = KernelInceptionDistance(feature=Rows(16), subsets=200, subset_size=100)
    metric.update(torch.from_numpy(a), real=True)
    metric.update(torch.from_numpy(b), real=False)
    tm_mean, tm_std = (float(v) for v in metric.compute())
    mean, std = kid(a, b, subsets=200, subset_size=100, seed=0)
    full = polynomial_mmd(a, b)
    assert abs(mean - full) < 3 * std / np.sqrt(200) + 1e-9
    assert abs(tm_mean - full) < 3 * tm_std / np.sqrt(200) + 1e-9
    assert std == pytest.approx(tm_std, rel=0.3)


def test_kid_is_seeded_and_separates_shifted_sets() -> None:
    a, b = gaussian(120, 16, 0), gaussian(120, 16, 1)
    assert kid(a, b, subsets=20, subset_size=50, seed=3) == kid(
        a, b, subsets=20, subset_size=50, seed=3
    )
    assert kid(a, b, subsets=20, subset_size=50, seed=3) != kid(
        a, b, subsets=20, subset_size=50, seed=4
    )
    same, _ = kid(a, b, subsets=20, subset_size=50)
    shifted, _ = kid(a, b + 1.0, subsets=20, subset_size=50)
    assert abs(same) < 0.05 < shifted
    with pytest.raises(ChexmemError, match="same extractor"):
        kid(a, b[:, :8])
    with pytest.raises(ChexmemError, match="at least 2"):
        fid(a[:1], b)


def test_quality_names_its_features(classifier, phantom_images) -> None:
    extractor = ClassifierFeatures(classifier)
    assert extractor.name == "chexmem-findings-cnn (trained on phantom/train)"
    with pytest.warns(UserWarning, match="fewer images than dimensions"):
        result = quality(phantom_images[:20], phantom_images[20:], extractor, kid_subsets=10)
    assert isinstance(result, QualityResult)
    assert (result.n_real, result.n_fake, result.feature_dim) == (20, 20, 128)
    assert result.extractor == extractor.name and result.kid_subset_size == 20
    assert extractor.name in str(result)
    features = extractor.features(phantom_images)
    with pytest.warns(UserWarning):
        again = quality(features[:20], features[20:], extractor, kid_subsets=10)
    assert again.to_dict() == result.to_dict()


def test_torch_features_are_raw_module_outputs(phantom_images) -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(),
    )
    extractor = TorchFeatures(net, "random-conv", resolution=32, channels=3, mean=0.5, std=0.25)
    rows = extractor.features(phantom_images)
    x = torch.from_numpy(pixels(phantom_images, 32))[:, None].repeat(1, 3, 1, 1)
    with torch.no_grad():
        expected = net((x - 0.5) / 0.25).numpy()
    np.testing.assert_allclose(rows, expected, rtol=1e-5, atol=1e-6)
    assert rows.shape == (40, 32) and not np.allclose(np.linalg.norm(rows, axis=1), 1)
    unit = TorchFeatures(net, "random-conv", 32, 3, 0.5, 0.25, l2_normalize=True)
    reference = TorchEmbedder(net, size=32, channels=3, mean=0.5, std=0.25)
    np.testing.assert_allclose(
        unit.features(phantom_images), reference.embed(phantom_images), atol=1e-6
    )
    with pytest.warns(UserWarning):
        assert quality(phantom_images[:20], phantom_images[20:], extractor).extractor == (
            "random-conv"
        )


def test_inception_needs_local_torch_fidelity_and_weights(tmp_path) -> None:
    pattern = (
        "pip install torch-fidelity"
        if importlib.util.find_spec("torch_fidelity") is None
        else "weights are not at"
    )
    with pytest.raises(ChexmemError, match=pattern):
        InceptionFeatures(weights_path=tmp_path / "absent.pth")


@needs(OPEN_CXR)
def test_real_x_rays_are_closer_to_each_other_than_to_phantoms(classifier, phantom_images) -> None:
    meta = pd.read_csv(OPEN_CXR / "metadata.csv")
    patients = meta["patient_key"].unique()
    halves = []
    for keys in (patients[::2], patients[1::2]):  # patient-disjoint halves
        names = meta.loc[meta["patient_key"].isin(keys), "file_name"].head(40)
        images = []
        for name in names:
            with Image.open(OPEN_CXR / "images" / name) as image:
                images.append(image.copy())
        halves.append(images)
    extractor = ClassifierFeatures(classifier)
    first, second = (extractor.features(images) for images in halves)
    phantoms = extractor.features(phantom_images)
    with pytest.warns(UserWarning):
        real_real = quality(first, second, extractor, seed=0)
        real_phantom = quality(first, phantoms, extractor, seed=0)
    assert real_real.n_fake == real_phantom.n_fake == 40  # compare FIDs at equal n only
    assert real_real.fid < real_phantom.fid
    assert real_real.kid_mean < real_phantom.kid_mean
