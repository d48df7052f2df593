"""Image quality of generations: FID and KID against real images, with named features.

Both compare two sets of feature rows; which network made the features changes the numbers
far more than the model does (RoentGen: FID 3.6 with CXR DenseNet features, 54.9 with
Inception for the same model), so every result carries the extractor's name.

* FID (Heusel et al. 2017): the Fréchet distance between Gaussians fitted to the two sets,
  ``||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 sqrtm(S_r S_f))`` with unbiased covariances, computed
  in float64 as pytorch-fid does: `scipy.linalg.sqrtm`, retried with ``eps * I`` added to
  both covariances when the product is singular, tiny imaginary parts dropped.
* KID (Binkowski et al. 2018): the unbiased MMD^2 with the cubic polynomial kernel
  ``k(x, y) = (x.y / d + 1)^3``, averaged over `subsets` random subsets of `subset_size` rows
  of each set (clipped to the smaller set), with the population standard deviation over
  subsets, as torchmetrics reports it. Seeded. When `subset_size` covers both whole sets
  every subset is the same and the standard deviation is 0: pass a smaller `subset_size`
  (such as half the smaller set) for a spread.

Small samples: the FID estimate is biased upward, the more so the fewer images (with fewer
images than feature dimensions the covariances are rank-deficient; `fid` warns). Compare
FIDs only between sets of the same size with the same extractor. KID is unbiased and the
better choice at the demo's 30-120 images per set.

Feature extractors (`FeatureExtractor`: a `name` and `features(images)`):

* `ClassifierFeatures`: the penultimate 128-d features of chexmem's own findings CNN
  (`detect.classifier`), the offline default for chest X-rays.
* `TorchFeatures`: any torch module, images prepared like `detect.similarity.TorchEmbedder`
  (grayscale in [0, 1], repeated over channels, mean/std normalised), raw (not L2-normalised)
  outputs by default.
* `InceptionFeatures`: the standard FID Inception-v3 (pool3, 2048-d) through torchmetrics and
  torch-fidelity, only where both the package and its weights file are installed; nothing is
  downloaded.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import scipy.linalg
import torch
from PIL import Image

from detect.classifier import FindingsClassifier
from detect.similarity import TorchEmbedder
from hf_datasets.errors import ChexmemError
from hf_datasets.images import to_grayscale

INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's file name
INCEPTION_SIZE = 299


class FeatureExtractor(Protocol):
    """Images to (N, D) feature rows, under a name that is reported with every result."""

    name: str

    def features(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(N, D) float rows."""
        ...


class ClassifierFeatures:
    """Penultimate features of a trained `FindingsClassifier` (offline default for CXR)."""

    def __init__(self, classifier: FindingsClassifier, batch_size: int = 64) -> None:
        self.classifier = classifier.eval()
        self.batch_size = batch_size
        self.name = classifier.name

    def features(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(N, feature_dim) float32 rows."""
        return self.classifier.embed(images, self.batch_size)


class TorchFeatures:
    """Any torch module as a feature extractor: images -> module(tensor), flattened.

    Images are prepared as `TorchEmbedder` prepares them (grayscale, resized to
    `resolution`, in [0, 1], repeated over `channels`, then ``(x - mean) / std``); `output`
    picks the feature tensor from the module's output (default: the output or its first
    element). Rows are L2-normalised only with ``l2_normalize=True``.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        name: str,
        resolution: int = 224,
        channels: int = 1,
        mean: float | Sequence[float] = 0.0,
        std: float | Sequence[float] = 1.0,
        batch_size: int = 32,
        device: str | torch.device = "cpu",
        output: Callable[[Any], torch.Tensor] | None = None,
        l2_normalize: bool = False,
    ) -> None:
        if not name:
            raise ChexmemError("name the feature extractor: results report it")
        self.embedder = TorchEmbedder(
            module,
            size=resolution,
            batch_size=batch_size,
            device=device,
            channels=channels,
            mean=mean,
            std=std,
            features=output,
            name=name,
            normalize=l2_normalize,
        )
        self.name = name
        self.l2_normalize = l2_normalize

    @torch.no_grad()
    def features(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(N, D) float32 rows."""
        return self.embedder.embed(images)


def inception_weights_path(weights_path: str | Path | None = None) -> Path:
    """Where the FID Inception weights are expected: the given path or torch hub's cache."""
    if weights_path is not None:
        return Path(weights_path).expanduser()
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS


class InceptionFeatures:
    """The standard FID Inception-v3 pool3 features (2048-d), via torchmetrics/torch-fidelity.

    Needs ``pip install torch-fidelity`` and the weights file `INCEPTION_WEIGHTS`
    (https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/ + that name) at
    `weights_path` or in ``$TORCH_HOME/hub/checkpoints/``; it never downloads. Images are
    converted to 8-bit RGB and resized to 299 px (PIL bicubic) before the network.
    """

    name = "inception-v3-fid-pool3 (torch-fidelity)"

    def __init__(
        self,
        weights_path: str | Path | None = None,
        batch_size: int = 32,
        device: str | torch.device = "cpu",
    ) -> None:
        path = inception_weights_path(weights_path)
        try:
            import torch_fidelity  # noqa: F401
        except ImportError:
            raise ChexmemError(
                "Inception features need torch-fidelity: pip install torch-fidelity, and put "
                f"{INCEPTION_WEIGHTS} at {path} (or pass weights_path); offline, use "
                "ClassifierFeatures instead"
            ) from None
        if not path.is_file():
            raise ChexmemError(
                f"the FID Inception weights are not at {path}: download {INCEPTION_WEIGHTS} from "
                "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/ and put it "
                "there (or pass weights_path)"
            )
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.module = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=["2048"],
            feature_extractor_weights_path=str(path),
        ).to(device)
        self.batch_size, self.device = batch_size, torch.device(device)

    @torch.no_grad()
    def features(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(N, 2048) float32 rows."""
        images, rows = list(images), []
        for start in range(0, len(images), self.batch_size):
            batch = [
                np.asarray(
                    to_grayscale(image)
                    .convert("RGB")
                    .resize((INCEPTION_SIZE, INCEPTION_SIZE), Image.Resampling.BICUBIC)
                )
                for image in images[start : start + self.batch_size]
            ]
            x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).to(self.device)
            rows.append(self.module(x).float().cpu().numpy())
        return np.concatenate(rows) if rows else np.zeros((0, 2048), dtype=np.float32)


def _rows(features: Any, what: str) -> np.ndarray:
    """Finite float64 feature rows, or one clear error."""
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2:
        raise ChexmemError(f"{what} must be a 2-D array of feature rows, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ChexmemError(f"{what} contain NaN or infinite values")
    return array


def _pair(real: Any, fake: Any, need: int) -> tuple[np.ndarray, np.ndarray]:
    """Both feature sets, same width, at least `need` rows each."""
    real, fake = _rows(real, "real features"), _rows(fake, "fake features")
    if real.shape[1] != fake.shape[1]:
        raise ChexmemError(
            f"real features have {real.shape[1]} dimensions, fake ones {fake.shape[1]}: "
            "use the same extractor for both"
        )
    if len(real) < need or len(fake) < need:
        raise ChexmemError(
            f"need at least {need} real and {need} fake images, got {len(real)} and {len(fake)}"
        )
    return real, fake


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (pytorch-fid's recipe)."""
    diff = mu1 - mu2
    with warnings.catch_warnings():
        # singular products are expected with few images (fid warns about that itself)
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(len(sigma1)) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imaginary = float(np.abs(np.diagonal(covmean).imag).max())
        scale = max(1.0, float(np.abs(np.diagonal(covmean).real).max()))
        if imaginary > 1e-3 * scale:
            raise ChexmemError(
                f"FID: the covariance square root has an imaginary part of {imaginary:.3g}; "
                "the features are degenerate (too few images, or constant features)"
            )
        covmean = covmean.real
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))
    return max(value, 0.0)


def fid(real_features: Any, fake_features: Any, eps: float = 1e-6) -> float:
    """FID between two sets of feature rows (warns when a set has fewer rows than dimensions)."""
    real, fake = _pair(real_features, fake_features, 2)
    dim = real.shape[1]
    if min(len(real), len(fake)) < dim:
        warnings.warn(
            f"FID from {len(real)} real and {len(fake)} fake images of {dim}-d features: fewer "
            "images than dimensions, the covariances are rank-deficient and FID is biased "
            "upward; compare only at equal numbers of images (or use KID)",
            UserWarning,
            stacklevel=2,
        )
    mu1, mu2 = real.mean(axis=0), fake.mean(axis=0)
    sigma1, sigma2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    return frechet_distance(mu1, np.atleast_2d(sigma1), mu2, np.atleast_2d(sigma2), eps)


def polynomial_mmd(x: np.ndarray, y: np.ndarray, degree: int = 3, coef: float = 1.0) -> float:
    """Unbiased MMD^2 of two equal-sized sets under k(a, b) = (a.b / d + coef)^degree."""
    m, dim = x.shape
    if len(y) != m or m < 2:
        raise ChexmemError("polynomial_mmd needs two sets of the same size, at least 2 rows")
    k_xx = (x @ x.T / dim + coef) ** degree
    k_yy = (y @ y.T / dim + coef) ** degree
    k_xy = (x @ y.T / dim + coef) ** degree
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.sum() / (m * m))


def kid(
    real_features: Any,
    fake_features: Any,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
    degree: int = 3,
    coef: float = 1.0,
) -> tuple[float, float]:
    """KID (mean, population std over subsets); `subset_size` is clipped to the smaller set.

    With `subset_size` >= both set sizes every subset is a whole set and the std is 0.
    """
    if subsets < 1 or subset_size < 2:
        raise ChexmemError("KID needs subsets >= 1 and subset_size >= 2")
    real, fake = _pair(real_features, fake_features, 2)
    size = min(subset_size, len(real), len(fake))
    rng = np.random.default_rng(seed)
    scores = np.array(
        [
            polynomial_mmd(
                real[rng.permutation(len(real))[:size]],
                fake[rng.permutation(len(fake))[:size]],
                degree,
                coef,
            )
            for _ in range(subsets)
        ]
    )
    return float(scores.mean()), float(scores.std())


@dataclass
class QualityResult:
    """FID and KID of fake images against real ones, and what they were computed with."""

    fid: float
    kid_mean: float
    kid_std: float
    n_real: int
    n_fake: int
    extractor: str
    feature_dim: int
    kid_subset_size: int

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping for JSON."""
        return asdict(self)

    def __str__(self) -> str:
        return (
            f"FID {self.fid:.3f}, KID {self.kid_mean:.4f} +- {self.kid_std:.4f} "
            f"({self.n_real} real vs {self.n_fake} fake, {self.extractor})"
        )


def quality(
    real_images: Sequence[Image.Image] | np.ndarray,
    fake_images: Sequence[Image.Image] | np.ndarray,
    extractor: FeatureExtractor,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
) -> QualityResult:
    """FID and KID of fake against real images (or precomputed rows of this extractor)."""
    real = real_images if isinstance(real_images, np.ndarray) else extractor.features(real_images)
    fake = fake_images if isinstance(fake_images, np.ndarray) else extractor.features(fake_images)
    real, fake = _pair(real, fake, 2)
    fid_value = fid(real, fake)
    kid_mean, kid_std = kid(real, fake, kid_subsets, kid_subset_size, seed)
    return QualityResult(
        fid=fid_value,
        kid_mean=kid_mean,
        kid_std=kid_std,
        n_real=len(real),
        n_fake=len(fake),
        extractor=extractor.name,
        feature_dim=real.shape[1],
        kid_subset_size=min(kid_subset_size, len(real), len(fake)),
    )
