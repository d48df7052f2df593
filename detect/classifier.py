"""A small CNN findings classifier for chest X-rays, and the conditioning fidelity it measures.

`FindingsClassifier` is a plain `torch.nn.Module`: four conv blocks (3x3 conv, batch norm,
ReLU; 2x2 max pooling after the first three) on a grayscale image, global average pooling
to a `feature_dim` (128) penultimate embedding (`features(x)`), and a linear head with one
logit per CheXpert observation. It takes (B, 1, H, W) tensors in [0, 1] (uint8 is divided
by 255, RGB averaged to gray, other sizes resized), so it also serves as a fixed feature
extractor for FID / KID (`detect.quality.ClassifierFeatures`, or `feature_module()` for
torchmetrics' ``feature=``).

`train_classifier` fits it multi-label on one split (binary cross-entropy, masked where a
label is unknown), seeded and deterministic on CPU for a fixed thread count. Labels follow
the dataset rows: 1 positive, 0 negative, -1 uncertain, None not mentioned. Uncertain labels
follow `ClassifierConfig.uncertain` (U-Ignore by default; U-Ones, U-Zeros); not-mentioned
labels count as negative by default (as CheXpert's own baselines do; the phantom draws
nothing for them), or are ignored with ``missing="ignore"``. A finding without both
positive and negative training labels is not trained: `predict` returns NaN for it and
`evaluate` reports why.

`conditioning_fidelity` asks whether generations show what their prompts ask for: for each
finding, the share of generated images predicted positive among those whose prompt states
the finding and among those whose prompt states its absence, and the AUC of the predicted
probability against the prompt's label. The default decision threshold is 0.5;
`calibrate_thresholds` sets one per finding on real held-out images instead, such that the
share predicted positive there equals the finding's prevalence (which corrects a classifier
whose probabilities are shifted by class imbalance). The AUC does not depend on thresholds.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from datasets import Dataset, DatasetDict, concatenate_datasets
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from detect.evaluate import roc_auc
from detect.similarity import pixels
from hf_datasets.errors import ChexmemError
from hf_datasets.labels import NEGATIVE, OBSERVATIONS, POSITIVE, UNCERTAIN, UncertaintyPolicy
from hf_datasets.storage import load_dataset_dir, replace_dir

FORMAT = "chexmem-findings-cnn"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
Missing = Literal["negative", "ignore"]
DatasetLike = Dataset | DatasetDict | str | Path


@dataclass
class ClassifierConfig:
    """How the findings classifier is built and trained."""

    resolution: int = 64  # images are resized to resolution x resolution
    epochs: int = 15
    batch_size: int = 32
    lr: float = 3e-3  # AdamW, cosine decay to 0 over all steps
    weight_decay: float = 1e-4
    seed: int = 0
    uncertain: UncertaintyPolicy | str = UncertaintyPolicy.IGNORE  # -1 labels: ignore/ones/zeros
    missing: Missing = "negative"  # not-mentioned labels: negative, or ignored
    width: int = 16  # channels of the first conv block, doubled per block
    feature_dim: int = 128  # channels of the last block = size of the penultimate embedding
    augment: bool = True  # random shifts of up to resolution / 16 px
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        self.uncertain = _policy(self.uncertain)
        if self.missing not in ("negative", "ignore"):
            raise ChexmemError(f"missing must be 'negative' or 'ignore', not {self.missing!r}")
        if not 16 <= self.resolution <= 1024:
            raise ChexmemError(f"resolution must be between 16 and 1024, not {self.resolution}")
        if min(self.epochs, self.batch_size, self.width, self.feature_dim) < 1:
            raise ChexmemError("epochs, batch_size, width and feature_dim must be at least 1")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ChexmemError("lr must be positive and weight_decay not negative")

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping for JSON."""
        out = asdict(self)
        out["uncertain"] = _policy(self.uncertain).value
        return out


def _policy(value: UncertaintyPolicy | str) -> UncertaintyPolicy:
    """An uncertainty policy that makes binary labels (keep is not one)."""
    try:
        policy = UncertaintyPolicy(value)
    except ValueError:
        policy = None
    if policy is None or policy is UncertaintyPolicy.KEEP:
        raise ChexmemError(
            f"uncertain label policy must be 'ignore', 'ones' or 'zeros', not {value!r}"
        )
    return policy


def _block(channels_in: int, channels_out: int, pool: bool) -> nn.Sequential:
    """3x3 conv, batch norm, ReLU, then 2x2 max pooling when asked."""
    layers: list[nn.Module] = [
        nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels_out),
        nn.ReLU(inplace=True),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class FindingsClassifier(nn.Module):
    """Grayscale chest X-ray -> 14 finding logits, with a penultimate `features(x)` embedding."""

    def __init__(
        self,
        resolution: int = 64,
        width: int = 16,
        feature_dim: int = 128,
        findings: Sequence[str] = OBSERVATIONS,
        info: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.resolution, self.width, self.feature_dim = resolution, width, feature_dim
        self.findings = tuple(findings)
        self.num_features = feature_dim  # read by torchmetrics' FID / KID
        widths = [width, 2 * width, 4 * width, feature_dim]
        self.encoder = nn.Sequential(
            *(
                _block(1 if i == 0 else widths[i - 1], w, pool=i < len(widths) - 1)
                for i, w in enumerate(widths)
            )
        )
        self.head = nn.Linear(feature_dim, len(self.findings))
        # which findings had both classes in training; the others predict NaN
        self.register_buffer("trained", torch.ones(len(self.findings), dtype=torch.bool))
        self.info: dict[str, Any] = dict(info or {})

    @property
    def name(self) -> str:
        """What the features are, for every result that uses them."""
        return f"{FORMAT} (trained on {self.info.get('trained_on', 'unknown data')})"

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) uint8 or [0, 1] floats -> normalised (B, 1, resolution, resolution)."""
        if x.ndim == 3:
            x = x[:, None]
        if x.ndim != 4:
            raise ChexmemError(f"expected images of shape (B, C, H, W), got {tuple(x.shape)}")
        parameter = next(self.parameters())
        x = x.to(parameter.device)
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if x.shape[1] != 1:
            x = x.mean(dim=1, keepdim=True)
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(
                x, size=(self.resolution, self.resolution), mode="bilinear", antialias=True
            )
        return ((x - 0.5) / 0.25).to(parameter.dtype)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, feature_dim) penultimate embedding (globally average-pooled last conv block)."""
        return self.encoder(self.prepare(x)).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, findings) logits."""
        return self.head(self.features(x))

    def feature_module(self) -> nn.Module:
        """A module whose forward is `features`, with `num_features` (for torchmetrics)."""
        return _Penultimate(self)

    def _batches(self, images: Iterable[Image.Image], batch_size: int) -> Iterable[torch.Tensor]:
        """Images as (B, 1, resolution, resolution) tensors in [0, 1]."""
        batch: list[Image.Image] = []
        for image in images:
            batch.append(image)
            if len(batch) == batch_size:
                yield torch.from_numpy(pixels(batch, self.resolution))[:, None]
                batch = []
        if batch:
            yield torch.from_numpy(pixels(batch, self.resolution))[:, None]

    @torch.no_grad()
    def embed(self, images: Iterable[Image.Image], batch_size: int = 64) -> np.ndarray:
        """(N, feature_dim) float32 penultimate features of PIL images."""
        was_training = self.training
        self.eval()
        rows = [self.features(x).float().cpu().numpy() for x in self._batches(images, batch_size)]
        self.train(was_training)
        return np.concatenate(rows) if rows else np.zeros((0, self.feature_dim), np.float32)

    @torch.no_grad()
    def predict(self, images: Iterable[Image.Image], batch_size: int = 64) -> np.ndarray:
        """(N, findings) probabilities; NaN for findings the training data could not teach."""
        was_training = self.training
        self.eval()
        rows = [
            torch.sigmoid(self(x)).double().cpu().numpy() for x in self._batches(images, batch_size)
        ]
        self.train(was_training)
        probs = np.concatenate(rows) if rows else np.zeros((0, len(self.findings)))
        probs[:, ~self.trained.cpu().numpy()] = np.nan
        return probs

    def save(self, out: str | Path, *, overwrite: bool = False) -> Path:
        """Weights (safetensors) and config.json into `out`, staged in a temporary sibling."""
        out = Path(out).expanduser()
        if out.exists() and not overwrite:
            raise ChexmemError(f"{out} already exists; pass overwrite=True to replace it")
        out.parent.mkdir(parents=True, exist_ok=True)
        staged = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
        staged.mkdir()
        try:
            state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
            save_file(state, str(staged / WEIGHTS_NAME), metadata={"format": FORMAT})
            config = {
                "format": FORMAT,
                "version": 1,
                "resolution": self.resolution,
                "width": self.width,
                "feature_dim": self.feature_dim,
                "findings": list(self.findings),
                "info": self.info,
            }
            (staged / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        replace_dir(staged, out, overwrite)
        return out

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> FindingsClassifier:
        """A classifier saved by `save`, in eval mode."""
        path = Path(path).expanduser()
        config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
        if not config_path.is_file() or not weights_path.is_file():
            raise ChexmemError(
                f"{path} is not a saved findings classifier (needs {CONFIG_NAME} and "
                f"{WEIGHTS_NAME})"
            )
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as error:
            raise ChexmemError(f"{config_path} is not valid JSON: {error}") from None
        if config.get("format") != FORMAT:
            raise ChexmemError(f"{path} holds {config.get('format')!r}, not a {FORMAT}")
        model = cls(
            resolution=int(config["resolution"]),
            width=int(config["width"]),
            feature_dim=int(config["feature_dim"]),
            findings=config["findings"],
            info=config.get("info"),
        )
        try:
            model.load_state_dict(load_file(str(weights_path)))
        except (RuntimeError, OSError) as error:
            raise ChexmemError(f"{weights_path} does not match {CONFIG_NAME}: {error}") from None
        return model.to(device).eval()


class _Penultimate(nn.Module):
    """The classifier's `features` as a module's forward."""

    def __init__(self, classifier: FindingsClassifier) -> None:
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = classifier.feature_dim

    def train(self, mode: bool = True) -> _Penultimate:
        """Always in eval mode (fixed batch-norm statistics)."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, feature_dim) features."""
        return self.classifier.features(x)


def load_split(dataset: DatasetLike, split: str | Sequence[str] | None, default: str) -> Dataset:
    """One split (or several, concatenated) of a dataset, a DatasetDict or a saved folder."""
    if isinstance(dataset, (str, Path)):
        dataset = load_dataset_dir(dataset)
    if isinstance(dataset, Dataset):
        if split is not None:
            raise ChexmemError("split is for a DatasetDict or a dataset folder, not one Dataset")
        return dataset
    names = [split or default] if isinstance(split, str) or split is None else list(split)
    missing = [name for name in names if name not in dataset]
    if missing:
        raise ChexmemError(
            f"the dataset has no split {', '.join(missing)} (splits: {', '.join(dataset)})"
        )
    parts = [dataset[name] for name in names]
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def label_matrix(
    dataset: Dataset,
    uncertain: UncertaintyPolicy | str = UncertaintyPolicy.IGNORE,
    missing: Missing = "negative",
    findings: Sequence[str] = OBSERVATIONS,
) -> np.ndarray:
    """(N, findings) float64 labels 1 / 0 / NaN (unknown) from the dataset's label columns."""
    policy = _policy(uncertain)
    absent = [name for name in findings if name not in dataset.column_names]
    if absent:
        raise ChexmemError(f"the dataset lacks label column(s): {', '.join(absent)}")
    columns = []
    for name in findings:
        values = np.array([np.nan if v is None else v for v in dataset[name]], dtype=np.float64)
        bad = ~np.isin(values, (POSITIVE, NEGATIVE, UNCERTAIN)) & ~np.isnan(values)
        if bad.any():
            raise ChexmemError(f"column {name!r} has values other than 1, 0, -1 or missing")
        values[np.isnan(values)] = NEGATIVE if missing == "negative" else np.nan
        replacement = {
            UncertaintyPolicy.IGNORE: np.nan,
            UncertaintyPolicy.ONES: POSITIVE,
            UncertaintyPolicy.ZEROS: NEGATIVE,
        }[policy]
        values[values == UNCERTAIN] = replacement
        columns.append(values)
    return np.stack(columns, axis=1) if columns else np.zeros((len(dataset), 0))


def _dataset_name(dataset: DatasetLike, split: str | Sequence[str] | None, default: str) -> str:
    """A short description of the training data: folder name and split(s)."""
    names = [split or default] if isinstance(split, str) or split is None else list(split)
    if isinstance(dataset, (str, Path)):
        return f"{Path(dataset).expanduser().name}/{'+'.join(names)}"
    if isinstance(dataset, DatasetDict):
        files = dataset[names[0]].cache_files
    else:
        files, names = dataset.cache_files, [str(dataset.split or "data")]
    # a saved dataset's arrow files lie in <folder>/<split>/ beside a state.json
    split_dir = Path(files[0]["filename"]).parent if files else None
    if split_dir is None or not (split_dir / "state.json").is_file():
        return f"in-memory dataset/{'+'.join(names)}"
    return f"{split_dir.parent.name}/{'+'.join(names)}"


def _images_uint8(dataset: Dataset, resolution: int, progress: bool) -> torch.Tensor:
    """(N, 1, resolution, resolution) uint8 images of the whole split (N * resolution^2 bytes)."""
    if "image" not in dataset.column_names:
        raise ChexmemError("the dataset has no image column")
    out = torch.zeros(len(dataset), 1, resolution, resolution, dtype=torch.uint8)
    images = dataset.select_columns(["image"])
    step = 256
    for start in tqdm(
        range(0, len(dataset), step), desc="classifier images", disable=not progress, leave=False
    ):
        batch = images[start : start + step]["image"]
        array = np.round(pixels(batch, resolution) * 255.0).astype(np.uint8)
        out[start : start + len(batch), 0] = torch.from_numpy(array)
    return out


def _shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Each image translated by a random whole number of pixels (edges replicated)."""
    if max_shift < 1:
        return x
    size = x.shape[-1]
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * max_shift + 1, (len(x), 2), generator=generator)
    return torch.stack(
        [
            padded[i, :, dy : dy + size, dx : dx + size]
            for i, (dy, dx) in enumerate(offsets.tolist())
        ]
    )


def train_classifier(
    dataset: DatasetLike,
    config: ClassifierConfig | None = None,
    split: str | Sequence[str] | None = None,
    name: str | None = None,
) -> FindingsClassifier:
    """Fit a `FindingsClassifier` on one split (default "train"); `name` describes the data."""
    config = config or ClassifierConfig()
    part = load_split(dataset, split, "train")
    if len(part) < 2:
        raise ChexmemError(f"the training split has {len(part)} rows; need at least 2")
    labels = label_matrix(part, config.uncertain, config.missing)
    positives = (labels == POSITIVE).sum(axis=0)
    negatives = (labels == NEGATIVE).sum(axis=0)
    trainable = (positives > 0) & (negatives > 0)
    images = _images_uint8(part, config.resolution, config.progress)
    target = torch.from_numpy(np.nan_to_num(labels, nan=0.0)).float()
    mask = torch.from_numpy(~np.isnan(labels) & trainable[None]).float()

    device = torch.device(config.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = FindingsClassifier(config.resolution, config.width, config.feature_dim)
    model.trained.copy_(torch.from_numpy(trainable))
    model.to(device).train()
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    steps_per_epoch = math.ceil(len(part) / config.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=config.epochs * steps_per_epoch
    )
    max_shift = config.resolution // 16 if config.augment else 0
    losses: list[float] = []
    started = time.perf_counter()
    bar = tqdm(range(config.epochs), desc="findings classifier", disable=not config.progress)
    for _ in bar:
        order = torch.randperm(len(part), generator=generator)
        total, seen = 0.0, 0.0
        for start in range(0, len(part), config.batch_size):
            rows = order[start : start + config.batch_size]
            x = _shift(images[rows].float() / 255.0, max_shift, generator).to(device)
            weight = mask[rows].to(device)
            logits = model(x)
            loss_map = F.binary_cross_entropy_with_logits(
                logits, target[rows].to(device), reduction="none"
            )
            loss = (loss_map * weight).sum() / weight.sum().clamp(min=1.0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * float(weight.sum())
            seen += float(weight.sum())
        losses.append(total / max(seen, 1.0))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    model.eval()
    model.info = {
        "trained_on": name or _dataset_name(dataset, split, "train"),
        "train_rows": len(part),
        "train_positives": dict(zip(OBSERVATIONS, positives.astype(int).tolist(), strict=True)),
        "train_negatives": dict(zip(OBSERVATIONS, negatives.astype(int).tolist(), strict=True)),
        "config": {k: v for k, v in config.to_dict().items() if k not in ("device", "progress")},
        "epoch_losses": losses,
        "train_seconds": round(time.perf_counter() - started, 3),
    }
    return model


def _status(train_pos: int, train_neg: int, pos: int, neg: int) -> str:
    """Why a finding has (or has no) AUC."""
    if train_pos == 0:
        return "not trained: no positives in training data"
    if train_neg == 0:
        return "not trained: no negatives in training data"
    if pos == 0:
        return "no positives in evaluation data"
    if neg == 0:
        return "no negatives in evaluation data"
    return "ok"


def evaluate(
    classifier: FindingsClassifier,
    dataset: DatasetLike,
    split: str | Sequence[str] | None = None,
    uncertain: UncertaintyPolicy | str | None = None,
    missing: Missing | None = None,
    batch_size: int = 64,
) -> pd.DataFrame:
    """Per-finding AUC on a held-out split (default "test"), indexed by finding.

    Columns: auc (NaN unless status is "ok"), positives, negatives (evaluation labels),
    train_positives, train_negatives, status. Labels follow the training policies unless
    given.
    """
    part = load_split(dataset, split, "test")
    trained_with = classifier.info.get("config", {})
    labels = label_matrix(
        part,
        uncertain or trained_with.get("uncertain", "ignore"),
        missing or trained_with.get("missing", "negative"),
        classifier.findings,
    )
    probs = classifier.predict(part.select_columns(["image"])["image"], batch_size)
    train_pos = classifier.info.get("train_positives", {})
    train_neg = classifier.info.get("train_negatives", {})
    rows = []
    for j, finding in enumerate(classifier.findings):
        known = ~np.isnan(labels[:, j])
        y = labels[known, j]
        pos, neg = int((y == POSITIVE).sum()), int((y == NEGATIVE).sum())
        status = _status(int(train_pos.get(finding, 1)), int(train_neg.get(finding, 1)), pos, neg)
        if status == "ok" and not bool(classifier.trained[j]):
            status = "not trained"
        auc = roc_auc(y, probs[known, j]) if status == "ok" else np.nan
        rows.append(
            {
                "finding": finding,
                "auc": auc,
                "positives": pos,
                "negatives": neg,
                "train_positives": int(train_pos.get(finding, -1)),
                "train_negatives": int(train_neg.get(finding, -1)),
                "status": status,
            }
        )
    return pd.DataFrame(rows).set_index("finding")


def _prompt_labels(
    labels: np.ndarray | pd.DataFrame, n: int, findings: Sequence[str]
) -> np.ndarray:
    """(N, findings) 1 / 0 / NaN; -1 (the prompt says "possible") counts as not stated."""
    if isinstance(labels, pd.DataFrame):
        absent = [name for name in findings if name not in labels.columns]
        if absent:
            raise ChexmemError(f"the labels lack column(s): {', '.join(absent)}")
        labels = labels[list(findings)].to_numpy(dtype=np.float64)
    array = np.array(labels, dtype=np.float64)
    if array.shape != (n, len(findings)):
        raise ChexmemError(
            f"labels must have shape ({n}, {len(findings)}) for {n} images, got {array.shape}"
        )
    array[array == UNCERTAIN] = np.nan
    if not np.isin(array[~np.isnan(array)], (POSITIVE, NEGATIVE)).all():
        raise ChexmemError("labels must be 1 (stated), 0 (stated absent), -1 or NaN (not stated)")
    return array


def calibrate_thresholds(
    classifier: FindingsClassifier,
    images: Sequence[Image.Image],
    labels: np.ndarray | pd.DataFrame,
    batch_size: int = 64,
) -> np.ndarray:
    """Per-finding thresholds that make the share predicted positive on these real (held-out)
    images equal each finding's prevalence among their known labels; 0.5 where that is
    undefined (no labels, no positives, or the finding was not trained)."""
    y = _prompt_labels(labels, len(images), classifier.findings)
    probs = classifier.predict(images, batch_size)
    thresholds = np.full(len(classifier.findings), 0.5)
    for j in range(len(classifier.findings)):
        known = ~np.isnan(y[:, j]) & ~np.isnan(probs[:, j])
        if not known.any() or not (y[known, j] == POSITIVE).any():
            continue
        prevalence = float((y[known, j] == POSITIVE).mean())
        # the (1 - prevalence) quantile: that share of images lies at or above it
        thresholds[j] = float(np.quantile(probs[known, j], 1.0 - prevalence, method="higher"))
    return thresholds


@dataclass
class ConditioningResult:
    """Per-finding conditioning fidelity of a set of generations, and its summary."""

    table: pd.DataFrame  # indexed by finding
    mean_auc: float  # over findings whose prompts state both presence and absence
    findings_scored: list[str] = field(default_factory=list)
    classifier: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping for JSON (NaN as None)."""
        table = self.table.astype(object).where(self.table.notna(), None)
        return {
            "mean_auc": None if math.isnan(self.mean_auc) else self.mean_auc,
            "findings_scored": self.findings_scored,
            "classifier": self.classifier,
            "per_finding": table.reset_index().to_dict(orient="records"),
        }


def conditioning_fidelity(
    classifier: FindingsClassifier,
    images: Sequence[Image.Image],
    labels: np.ndarray | pd.DataFrame,
    thresholds: float | Sequence[float] | np.ndarray = 0.5,
    batch_size: int = 64,
) -> ConditioningResult:
    """Do generated images show what their prompts state? One row per finding.

    `labels` (N, 14) are the prompts' labels: 1 the prompt states the finding, 0 it states
    its absence, NaN (or -1, "possible") it says nothing. Columns: stated_present,
    stated_absent (counts), rate_when_present / rate_when_absent (share predicted positive,
    probability >= threshold), auc (probability against the stated label; NaN unless both are
    stated and the finding was trained), threshold, status.
    """
    y = _prompt_labels(labels, len(images), classifier.findings)
    cut = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (len(classifier.findings),))
    probs = classifier.predict(images, batch_size)
    rows = []
    for j, finding in enumerate(classifier.findings):
        present, absent = y[:, j] == POSITIVE, y[:, j] == NEGATIVE
        trained = bool(classifier.trained[j])
        positive = probs[:, j] >= cut[j]
        row = {
            "finding": finding,
            "stated_present": int(present.sum()),
            "stated_absent": int(absent.sum()),
            "rate_when_present": float(positive[present].mean()) if present.any() else np.nan,
            "rate_when_absent": float(positive[absent].mean()) if absent.any() else np.nan,
            "auc": np.nan,
            "threshold": float(cut[j]),
            "status": "ok",
        }
        if not trained:
            row.update(rate_when_present=np.nan, rate_when_absent=np.nan)
            row["status"] = "classifier not trained on this finding"
        elif not present.any() or not absent.any():
            row["status"] = "prompts do not state both presence and absence"
        else:
            known = present | absent
            row["auc"] = roc_auc(present[known].astype(int), probs[known, j])
        rows.append(row)
    table = pd.DataFrame(rows).set_index("finding")
    scored = table.index[table["status"] == "ok"].tolist()
    mean_auc = float(table.loc[scored, "auc"].mean()) if scored else float("nan")
    return ConditioningResult(table, mean_auc, scored, classifier.name)
