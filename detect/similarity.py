"""Copy detection: is a generated image a copy of a training image?

Every measure is an `Embedder`: it maps images to float32 rows and scores query rows against
bank rows, higher meaning more similar.

* Pixel normalised cross-correlation (`NCCEmbedder`, the measure Akbar et al. use for chest
  X-rays): grayscale, resized, centred and scaled to unit norm, so the dot product of two rows
  is their Pearson correlation over pixels (1 = identical up to brightness and contrast).
* SSIM and MS-SSIM (`SSIMEmbedder`, `MSSSIMEmbedder`): pairwise measures, not embeddings. The
  rows are the resized grayscale pixels in [0, 1]; each query is compared with whole chunks of
  the bank at once in torch. They follow torchmetrics' conventions (11-tap Gaussian window,
  sigma 1.5, reflection padding, data range 1, negative terms clipped to 0 in MS-SSIM). MS-SSIM
  halves the image per scale, and each scale must stay wider than the window (> 10 px): 5
  scales need 176 px, so smaller images use the first scales of Wang et al.'s weights,
  renormalised to sum to 1.
* Tiled L2 (`TiledL2Embedder`, Carlini et al. 2023): each image is cut into 4 x 4 = 16 tiles and
  the distance is the largest root-mean-square pixel difference (pixels in [0, 1]) between
  corresponding tiles, so a copy must match everywhere, not only on average; similarity is
  minus that distance (0 for identical images).
* Any torch encoder (`TorchEmbedder`), such as a patient re-identification network or a
  foundation encoder: L2-normalised outputs, compared by cosine similarity.

`search` finds the top-k bank rows of each query in bounded memory: queries and bank are both
cut into chunks sized from `SearchConfig.max_memory_mb`, so a bank of 200k images x 1024
float32 features (0.8 GB) is scanned with a working memory of a few hundred MB.

`match_generations` scans once per generation for its nearest training image, its best patient
(a patient's similarity is the best over that patient's images, making the best patient the
nearest image's, or the mean over them, which rewards resembling all of a patient's studies)
and, when the training row that the prompt came from is known, the similarity to that own
image. Chest X-ray sets hold several studies per patient, so matching the prompt's patient is
not the same as matching its image. `calibrate_threshold` sets the copy threshold at a
percentile of the nearest-neighbour similarity of held-out real images to the training set
(Dar et al. 2025): a generation above it is closer to a training image than real unseen
images usually are. The held-out images must come from patients absent from training; another
study of a training patient looks like a copy and inflates the threshold. `detect_copies`
adds copy rates and each prompt's diversity (mean pairwise similarity among its generations).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from detect.calibration import Calibration, check_calibration
from hf_datasets.errors import ChexmemError
from hf_datasets.images import to_grayscale

# Wang et al.'s MS-SSIM scale weights, finest scale first
MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
Reduce = Literal["max", "mean"]


def ncc_features(images: Iterable[Image.Image], size: int = 64) -> np.ndarray:
    """(N, size*size) float32 rows: each image resized, centred and scaled to unit norm."""
    rows = []
    for image in images:
        small = to_grayscale(image).resize((size, size), Image.Resampling.BILINEAR)
        vector = np.asarray(small, dtype=np.float32).ravel()
        vector = vector - vector.mean()
        rows.append(vector / max(float(np.linalg.norm(vector)), 1e-6))
    return np.stack(rows) if rows else np.zeros((0, size * size), dtype=np.float32)


def pixels(images: Iterable[Image.Image], size: int) -> np.ndarray:
    """(N, size, size) float32 grayscale pixels in [0, 1], each image resized to size x size."""
    rows = [
        np.asarray(
            to_grayscale(image).resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32
        )
        / 255.0
        for image in images
    ]
    return np.stack(rows) if rows else np.zeros((0, size, size), dtype=np.float32)


class Embedder(Protocol):
    """Images to float32 rows, and a similarity between rows (higher = more similar).

    An embedder whose similarity of identical images is not 1 says so in `max_similarity`.
    """

    name: str

    def embed(self, images: Iterable[Image.Image]) -> np.ndarray:
        """(N, D) float32 rows."""
        ...

    def similarity(self, queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
        """(Q, B) similarities of query rows to bank rows."""
        ...

    def pair_bytes(self, dim: int) -> int:
        """Working memory of one (query, bank) pair in `similarity`, for chunk sizing."""
        ...


class DotEmbedder:
    """Base of embedders compared by dot product (cosine similarity for unit rows)."""

    name = "dot"

    def embed(self, images: Iterable[Image.Image]) -> np.ndarray:
        """(N, D) float32 rows."""
        raise NotImplementedError

    def similarity(self, queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
        """(Q, B) dot products."""
        return queries @ bank.T

    def pair_bytes(self, dim: int) -> int:
        """One float32 score per pair."""
        return 4


@dataclass
class NCCEmbedder(DotEmbedder):
    """Pixel NCC: the dot product of two rows is their Pearson correlation over pixels."""

    size: int = 64

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"ncc-{self.size}"

    def embed(self, images: Iterable[Image.Image]) -> np.ndarray:
        """(N, size*size) unit-norm centred pixels."""
        return ncc_features(images, self.size)


@dataclass
class SSIMEmbedder:
    """Pairwise SSIM between grayscale images resized to size x size (1 = identical)."""

    size: int = 64
    sigma: float = 1.5

    def __post_init__(self) -> None:
        if self.sigma <= 0:
            raise ChexmemError(f"sigma must be positive, got {self.sigma}")
        if self.size <= 2 * self.pad:
            raise ChexmemError(f"SSIM with sigma {self.sigma} needs size > {2 * self.pad} px")
        self._kernel: torch.Tensor | None = None

    @property
    def name(self) -> str:
        return f"ssim-{self.size}"

    @property
    def pad(self) -> int:
        """Half-width of the Gaussian window (torchmetrics' size rule: 11 taps for sigma 1.5)."""
        return int(3.5 * self.sigma + 0.5)

    @property
    def scales(self) -> tuple[float, ...]:
        """Exponents of the scales (one scale: plain SSIM)."""
        return (1.0,)

    def embed(self, images: Iterable[Image.Image]) -> np.ndarray:
        """(N, size*size) pixels in [0, 1]."""
        return pixels(images, self.size).reshape(-1, self.size * self.size)

    def pair_bytes(self, dim: int) -> int:
        """About seven float32 padded maps per pair at the finest scale."""
        return 28 * (self.size + 2 * self.pad) ** 2

    def similarity(self, queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
        """(Q, B) SSIM (MS-SSIM over several scales) of every query with every bank image."""
        if queries.shape[1] != self.size * self.size:
            raise ChexmemError(
                f"{self.name} compares rows of {self.size * self.size} pixels, "
                f"got {queries.shape[1]}: embed the images with this embedder"
            )
        x = queries.float().view(-1, 1, self.size, self.size)
        y = bank.float().view(-1, 1, self.size, self.size)
        last = len(self.scales) - 1
        score = torch.ones(len(x), len(y), dtype=torch.float32, device=x.device)
        for scale, beta in enumerate(self.scales):
            if scale:
                x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
            ssim, contrast = self._pairwise(x, y)
            term = ssim if scale == last else contrast
            if len(self.scales) > 1:
                term = term.clamp(min=0) ** beta
            score = score * term
        return score

    def _window(self, x: torch.Tensor) -> torch.Tensor:
        """Gaussian-weighted local means of padded maps (M, 1, H+2p, W+2p) -> (M, 1, H, W)."""
        if self._kernel is None or self._kernel.device != x.device:
            taps = torch.arange(2 * self.pad + 1, dtype=torch.float32) - self.pad
            kernel = torch.exp(-((taps / self.sigma) ** 2) / 2)
            self._kernel = (kernel / kernel.sum()).to(x.device)
        kernel = self._kernel
        x = F.conv2d(x, kernel.view(1, 1, 1, -1))
        return F.conv2d(x, kernel.view(1, 1, -1, 1))

    def _pairwise(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q, B) mean SSIM over the whole map and mean contrast-structure term inside it."""
        p = self.pad
        c1, c2 = 0.01**2, 0.03**2
        xp = F.pad(x, (p, p, p, p), mode="reflect")
        yp = F.pad(y, (p, p, p, p), mode="reflect")
        # each image's local mean and variance once; only E[xy] is computed per pair
        mu_x, mu_y = self._window(xp), self._window(yp)
        var_x = (self._window(xp * xp) - mu_x**2).clamp(min=0)
        var_y = (self._window(yp * yp) - mu_y**2).clamp(min=0)
        q, b = len(x), len(y)
        height, width = x.shape[-2:]
        products = (xp[:, None] * yp[None]).view(q * b, 1, *xp.shape[-2:])
        e_xy = self._window(products).view(q, b, height, width)
        mu_x, var_x = mu_x.view(q, 1, height, width), var_x.view(q, 1, height, width)
        mu_y, var_y = mu_y.view(1, b, height, width), var_y.view(1, b, height, width)
        mu_xy = mu_x * mu_y
        contrast = (2 * (e_xy - mu_xy) + c2) / (var_x + var_y + c2)
        luminance = (2 * mu_xy + c1) / (mu_x**2 + mu_y**2 + c1)
        ssim = (luminance * contrast).mean(dim=(2, 3))
        return ssim, contrast[..., p:-p, p:-p].mean(dim=(2, 3))


@dataclass
class MSSSIMEmbedder(SSIMEmbedder):
    """Pairwise multi-scale SSIM; `betas` None takes as many of Wang et al.'s as the size allows."""

    betas: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        smallest = 2 * self.pad + 1
        if self.betas is None:
            fits = max(1, min(len(MS_SSIM_BETAS), int(math.log2(self.size / smallest)) + 1))
            chosen = MS_SSIM_BETAS[:fits]
            self.betas = tuple(beta / sum(chosen) for beta in chosen)
        if not self.betas or any(beta < 0 for beta in self.betas):
            raise ChexmemError("MS-SSIM betas must be one or more non-negative weights")
        need = smallest * 2 ** (len(self.betas) - 1)
        if self.size < need:
            raise ChexmemError(
                f"MS-SSIM with {len(self.betas)} scales needs size >= {need} px "
                f"(got {self.size}): use a larger size or fewer betas"
            )

    @property
    def name(self) -> str:
        return f"ms-ssim-{self.size}x{len(self.scales)}"

    @property
    def scales(self) -> tuple[float, ...]:
        """Exponents of the scales, finest first."""
        return tuple(self.betas or ())


@dataclass
class TiledL2Embedder:
    """Carlini et al.'s tiled L2: minus the largest RMS pixel distance over 4 x 4 tiles."""

    size: int = 64
    tiles: int = 4  # per side
    max_similarity: ClassVar[float] = 0.0  # identical images

    def __post_init__(self) -> None:
        if self.tiles < 1 or self.size % self.tiles:
            raise ChexmemError(
                f"tiled L2 needs size ({self.size}) divisible by tiles per side ({self.tiles})"
            )

    @property
    def name(self) -> str:
        return f"tiled-l2-{self.size}x{self.tiles}"

    def embed(self, images: Iterable[Image.Image]) -> np.ndarray:
        """(N, size*size) pixels in [-0.5, 0.5], grouped tile by tile."""
        t, side = self.tiles, self.size // self.tiles
        # centred pixels: the distance is unchanged and the norm expansion loses less precision
        array = pixels(images, self.size) - 0.5
        tiled = array.reshape(-1, t, side, t, side).transpose(0, 1, 3, 2, 4)
        return np.ascontiguousarray(tiled.reshape(len(array), -1))

    def pair_bytes(self, dim: int) -> int:
        """A float64 product, distance and running maximum per pair."""
        return 32

    def similarity(self, queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
        """(Q, B) minus the largest tile RMS distance."""
        count = self.tiles * self.tiles
        if queries.shape[1] % count:
            raise ChexmemError(f"{self.name} needs rows of {self.size * self.size} pixels")
        # float64: in float32 the norm expansion leaves identical images ~1e-4 apart, not 0
        x = queries.double().view(len(queries), count, -1)
        y = bank.double().view(len(bank), count, -1)
        x_norm, y_norm = (x * x).sum(dim=2), (y * y).sum(dim=2)
        worst = torch.zeros(len(x), len(y), dtype=torch.float64, device=x.device)
        for tile in range(count):
            squared = x_norm[:, tile, None] + y_norm[None, :, tile] - 2 * x[:, tile] @ y[:, tile].T
            worst = torch.maximum(worst, squared)
        return -(worst.clamp(min=0) / x.shape[2]).sqrt().float()


class TorchEmbedder(DotEmbedder):
    """Any torch encoder: images -> module(tensor) features, L2-normalised, cosine similarity.

    Images become grayscale tensors in [0, 1] of shape (B, channels, size, size), repeated over
    `channels` and normalised with `mean` and `std` as the encoder expects. `features` picks the
    feature tensor from the module's output (default: the output, or its first element). The
    module is put in eval mode.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        size: int = 224,
        batch_size: int = 32,
        device: str | torch.device = "cpu",
        channels: int = 1,
        mean: float | Sequence[float] = 0.0,
        std: float | Sequence[float] = 1.0,
        features: Callable[[Any], torch.Tensor] | None = None,
        name: str | None = None,
        normalize: bool = True,
    ) -> None:
        if size < 1 or batch_size < 1 or channels < 1:
            raise ChexmemError("size, batch_size and channels must be at least 1")
        self.module = module.eval().to(device)
        self.size, self.batch_size, self.channels = size, batch_size, channels
        self.device = torch.device(device)
        self.mean = torch.tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
        self.features = features
        self.normalize = normalize  # False: raw features (FID needs them unscaled)
        self.name = name or f"torch-{type(module).__name__}-{size}"

    @torch.no_grad()
    def embed(self, images: Iterable[Image.Image]) -> np.ndarray:
        """(N, D) encoder features (unit-norm unless `normalize` is False)."""
        parameter = next(self.module.parameters(), None)
        dtype = parameter.dtype if parameter is not None else torch.float32
        rows: list[np.ndarray] = []
        batch: list[Image.Image] = []
        for image in images:
            batch.append(image)
            if len(batch) == self.batch_size:
                rows.append(self._encode(batch, dtype))
                batch = []
        if batch:
            rows.append(self._encode(batch, dtype))
        if not rows:
            return np.zeros((0, 0), dtype=np.float32)
        return np.concatenate(rows)

    def _encode(self, images: list[Image.Image], dtype: torch.dtype) -> np.ndarray:
        """Features of one batch."""
        x = torch.from_numpy(pixels(images, self.size))[:, None].repeat(1, self.channels, 1, 1)
        x = ((x - self.mean) / self.std).to(self.device, dtype)
        out = self.module(x)
        if self.features is not None:
            out = self.features(out)
        elif isinstance(out, (tuple, list)):
            out = out[0]
        out = out.float().flatten(1)
        if self.normalize:
            out = F.normalize(out, dim=1)
        return out.cpu().numpy().astype(np.float32)


@dataclass
class SearchConfig:
    """How a nearest-neighbour scan is chunked and where it runs."""

    max_memory_mb: float = 512.0  # working memory of one step: scores, feature chunks, tallies
    query_chunk: int | None = None  # fixed chunk sizes override the memory budget
    bank_chunk: int | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.max_memory_mb <= 0:
            raise ChexmemError(f"max_memory_mb must be positive, got {self.max_memory_mb}")
        for chunk in (self.query_chunk, self.bank_chunk):
            if chunk is not None and chunk < 1:
                raise ChexmemError(f"chunk sizes must be at least 1, got {chunk}")

    def chunks(
        self, n_queries: int, n_bank: int, dim: int, pair_bytes: int, query_bytes: int = 0
    ) -> tuple[int, int]:
        """(query rows, bank rows) per step keeping a step under the budget.

        `pair_bytes` is the memory of one (query, bank) score, `query_bytes` any extra per
        query row (such as per-patient tallies).
        """
        budget = int(self.max_memory_mb * 2**20)
        per_query = 4 * dim + query_bytes
        queries = self.query_chunk or min(
            max(1, math.isqrt(budget // pair_bytes)), max(1, budget // (2 * per_query))
        )
        queries = max(1, min(queries, n_queries))
        bank = self.bank_chunk or (budget - queries * per_query) // (queries * pair_bytes + 4 * dim)
        return queries, max(1, min(bank, n_bank))


@dataclass
class Neighbours:
    """For each query: the index of its nearest bank row and the similarity to it."""

    index: np.ndarray  # (Q,)
    similarity: np.ndarray  # (Q,)
    top_index: np.ndarray | None = None  # (Q, k), best first
    top_similarity: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.top_index is None:
            self.top_index = self.index[:, None]
        if self.top_similarity is None:
            self.top_similarity = self.similarity[:, None]


@dataclass
class _Scan:
    """Everything one pass over the bank collects for each query."""

    top_index: np.ndarray
    top_similarity: np.ndarray
    patient_code: np.ndarray | None = None
    patient_similarity: np.ndarray | None = None
    own_similarity: np.ndarray | None = None
    own_patient_similarity: np.ndarray | None = None


def _matrix(rows: Any, what: str) -> np.ndarray:
    """A 2-D array, or one clear error."""
    array = rows if isinstance(rows, np.ndarray) else np.asarray(rows, dtype=np.float32)
    if array.ndim != 2:
        raise ChexmemError(f"{what} must be a 2-D array of feature rows, got shape {array.shape}")
    return array


def _features(
    rows: np.ndarray | Sequence[Image.Image], embedder: Embedder | None, what: str
) -> np.ndarray:
    """Feature rows as given, or the embedder's rows of images."""
    if isinstance(rows, np.ndarray):
        return _matrix(rows, what)
    if embedder is None:
        raise ChexmemError(f"{what} are images: pass an embedder to turn them into features")
    return _matrix(embedder.embed(rows), what)


def _rows(array: np.ndarray, start: int, stop: int, device: torch.device) -> torch.Tensor:
    """Rows start:stop as a float32 tensor on the device (a memory-mapped array reads just them)."""
    return torch.from_numpy(np.ascontiguousarray(array[start:stop], np.float32)).to(device)


def _top(
    best: tuple[torch.Tensor, torch.Tensor], scores: torch.Tensor, offset: int, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a chunk of scores into the running top-k (ties keep the lower index)."""
    values, index = best
    if k == 1:
        local = scores.argmax(dim=1, keepdim=True)
        chunk_values = scores.gather(1, local)
        better = chunk_values > values
        return torch.where(better, chunk_values, values), torch.where(better, local + offset, index)
    columns = torch.arange(offset, offset + scores.shape[1], device=scores.device)
    values = torch.cat([values, scores], dim=1)
    index = torch.cat([index, columns.expand(len(scores), -1)], dim=1)
    values, order = torch.sort(values, dim=1, descending=True, stable=True)
    return values[:, :k], index.gather(1, order[:, :k])


def _scan(
    queries: np.ndarray,
    bank: np.ndarray,
    embedder: Embedder | None,
    k: int,
    config: SearchConfig | None,
    patient_codes: np.ndarray | None = None,
    reduce: Reduce = "max",
    own: np.ndarray | None = None,
) -> _Scan:
    """One chunked pass: top-k bank rows, best patients and own-image similarity per query."""
    queries, bank = _matrix(queries, "queries"), _matrix(bank, "bank")
    if len(bank) == 0:
        raise ChexmemError("the training bank is empty")
    if queries.shape[1] != bank.shape[1]:
        raise ChexmemError(
            f"queries have {queries.shape[1]} features but the bank has {bank.shape[1]}: "
            "embed both with the same embedder"
        )
    if k < 1:
        raise ChexmemError(f"k must be at least 1, got {k}")
    if reduce not in ("max", "mean"):
        raise ChexmemError(f"patient reduce must be 'max' or 'mean', got {reduce!r}")
    embedder = embedder or DotEmbedder()
    config = config or SearchConfig()
    device = torch.device(config.device)
    n_queries, dim = queries.shape
    k = min(k, len(bank))
    n_patients = 0 if patient_codes is None else int(patient_codes.max()) + 1
    k_patients = min(k, n_patients)
    pair_bytes = embedder.pair_bytes(dim) + (24 if k > 1 else 8)
    query_bytes = 12 * k + 28 * n_patients
    q_chunk, b_chunk = config.chunks(n_queries, len(bank), dim, pair_bytes, query_bytes)
    result = _Scan(
        np.zeros((n_queries, k), dtype=np.int64), np.zeros((n_queries, k), dtype=np.float32)
    )
    if patient_codes is not None:
        codes_all = torch.from_numpy(patient_codes).to(device)
        counts = torch.bincount(codes_all, minlength=n_patients).float()
        result.patient_code = np.zeros((n_queries, k_patients), dtype=np.int64)
        result.patient_similarity = np.zeros((n_queries, k_patients), dtype=np.float32)
        result.own_patient_similarity = np.full(n_queries, np.nan, dtype=np.float32)
    if own is not None:
        result.own_similarity = np.full(n_queries, np.nan, dtype=np.float32)
    for q_start in range(0, n_queries, q_chunk):
        q_stop = min(q_start + q_chunk, n_queries)
        rows = q_stop - q_start
        q = _rows(queries, q_start, q_stop, device)
        best = (
            torch.full((rows, 1 if k == 1 else 0), -torch.inf, device=device),
            torch.zeros((rows, 1 if k == 1 else 0), dtype=torch.int64, device=device),
        )
        tally = None
        if patient_codes is not None:
            fill = -torch.inf if reduce == "max" else 0.0
            tally = torch.full((rows, n_patients), fill, device=device)
        own_rows = None if own is None else torch.from_numpy(own[q_start:q_stop]).to(device)
        own_values = torch.full((rows,), torch.nan, device=device)
        for b_start in range(0, len(bank), b_chunk):
            b_stop = min(b_start + b_chunk, len(bank))
            scores = embedder.similarity(q, _rows(bank, b_start, b_stop, device)).float()
            best = _top(best, scores, b_start, k)
            if tally is not None:
                codes = codes_all[b_start:b_stop]
                if reduce == "max":
                    tally.scatter_reduce_(1, codes.expand(rows, -1), scores, reduce="amax")
                else:
                    tally.index_add_(1, codes, scores)
            if own_rows is not None:
                inside = (own_rows >= b_start) & (own_rows < b_stop)
                hits = inside.nonzero().squeeze(1)
                own_values[hits] = scores[hits, own_rows[hits] - b_start]
        result.top_similarity[q_start:q_stop] = best[0].cpu().numpy()
        result.top_index[q_start:q_stop] = best[1].cpu().numpy()
        if own is not None:
            result.own_similarity[q_start:q_stop] = own_values.cpu().numpy()
        if tally is not None:
            if reduce == "mean":
                tally = tally / counts
            values, order = torch.sort(tally, dim=1, descending=True, stable=True)
            result.patient_code[q_start:q_stop] = order[:, :k_patients].cpu().numpy()
            result.patient_similarity[q_start:q_stop] = values[:, :k_patients].cpu().numpy()
            if own_rows is not None:
                known = (own_rows >= 0).nonzero().squeeze(1)
                own_patient = tally[known, codes_all[own_rows[known]]].cpu().numpy()
                result.own_patient_similarity[q_start + known.cpu().numpy()] = own_patient
    return result


def search(
    queries: np.ndarray,
    bank: np.ndarray,
    embedder: Embedder | None = None,
    k: int = 1,
    config: SearchConfig | None = None,
) -> Neighbours:
    """Top-k bank rows of each query by the embedder's similarity (None: dot product)."""
    scan = _scan(queries, bank, embedder, k, config)
    return Neighbours(
        index=scan.top_index[:, 0].copy(),
        similarity=scan.top_similarity[:, 0].copy(),
        top_index=scan.top_index,
        top_similarity=scan.top_similarity,
    )


def nearest(queries: np.ndarray, bank: np.ndarray, chunk: int = 8192) -> Neighbours:
    """Nearest bank row of each query by dot product (NCC for `ncc_features`), in chunks."""
    return search(queries, bank, config=SearchConfig(bank_chunk=chunk))


def similarity_matrix(
    queries: np.ndarray,
    bank: np.ndarray,
    embedder: Embedder | None = None,
    config: SearchConfig | None = None,
) -> np.ndarray:
    """The full (Q, B) similarity matrix, computed in chunks (for small sets only)."""
    queries, bank = _matrix(queries, "queries"), _matrix(bank, "bank")
    if queries.shape[1] != bank.shape[1]:
        raise ChexmemError(
            f"queries have {queries.shape[1]} features but the bank has {bank.shape[1]}"
        )
    embedder = embedder or DotEmbedder()
    config = config or SearchConfig()
    device = torch.device(config.device)
    pair_bytes = embedder.pair_bytes(queries.shape[1]) + 4
    q_chunk, b_chunk = config.chunks(len(queries), max(1, len(bank)), queries.shape[1], pair_bytes)
    out = np.zeros((len(queries), len(bank)), dtype=np.float32)
    for q_start in range(0, len(queries), q_chunk):
        q = _rows(queries, q_start, q_start + q_chunk, device)
        for b_start in range(0, len(bank), b_chunk):
            b = _rows(bank, b_start, b_start + b_chunk, device)
            scores = embedder.similarity(q, b).float().cpu().numpy()
            out[q_start : q_start + len(q), b_start : b_start + len(b)] = scores
    return out


def similarity_to(queries: np.ndarray, references: np.ndarray) -> np.ndarray:
    """Row-wise similarity of query i to reference i."""
    return np.einsum("ij,ij->i", queries, references)


def mean_pairwise(features: Sequence[np.ndarray]) -> float:
    """Mean similarity between distinct rows: a prompt's diversity (lower = more diverse)."""
    stacked = np.stack(features)
    scores = stacked @ stacked.T
    n = len(stacked)
    return float((scores.sum() - np.trace(scores)) / max(1, n * (n - 1)))


@dataclass
class TrainingBank:
    """Feature rows of the training images with who and what each row is."""

    features: np.ndarray  # (N, D)
    patient_ids: Sequence[Any] | None = None
    image_ids: Sequence[Any] | None = None
    study_ids: Sequence[Any] | None = None
    embedder: str | None = None  # name of the embedder that made the rows, checked when known

    def __post_init__(self) -> None:
        self.features = _matrix(self.features, "bank features")
        if len(self.features) == 0:
            raise ChexmemError("the training bank is empty")
        for what in ("patient_ids", "image_ids", "study_ids"):
            values = getattr(self, what)
            if values is not None and len(values) != len(self.features):
                raise ChexmemError(
                    f"{what} has {len(values)} entries for {len(self.features)} bank rows"
                )
        if self.patient_ids is not None and pd.isna(pd.Series(list(self.patient_ids))).any():
            raise ChexmemError("patient_ids must not have missing values")

    @classmethod
    def from_images(
        cls,
        images: Iterable[Image.Image],
        embedder: Embedder,
        patient_ids: Sequence[Any] | None = None,
        image_ids: Sequence[Any] | None = None,
        study_ids: Sequence[Any] | None = None,
    ) -> TrainingBank:
        """Embed the training images once."""
        return cls(embedder.embed(images), patient_ids, image_ids, study_ids, embedder.name)

    def patient_codes(self) -> tuple[np.ndarray, np.ndarray]:
        """(code of each row, patient of each code), codes in order of first appearance."""
        codes, patients = pd.factorize(pd.Series(list(self.patient_ids)), sort=False)
        return codes.astype(np.int64), np.asarray(patients, dtype=object)


def _check_bank(bank: TrainingBank, embedder: Embedder | None) -> None:
    """The bank's rows were made by this embedder, when both are named."""
    if embedder is not None and bank.embedder is not None and bank.embedder != embedder.name:
        raise ChexmemError(f"the bank was embedded with {bank.embedder}, not {embedder.name}")


def calibrate_threshold(
    heldout: np.ndarray | Sequence[Image.Image],
    bank: np.ndarray | TrainingBank,
    embedder: Embedder | None = None,
    percentile: float = 95.0,
    config: SearchConfig | None = None,
    fix: str | None = None,
) -> Calibration:
    """The copy threshold: this percentile of held-out real images' nearest-training similarity.

    The held-out images must be of patients absent from the bank (a patient-disjoint split).
    Fewer than 20 of them, or a threshold at the similarity's maximum (held-out images that
    are training images), is kept but warned about and marked in the status
    (`detect.calibration`).
    """
    if not 0 <= percentile <= 100:
        raise ChexmemError(f"percentile must be between 0 and 100, got {percentile}")
    if isinstance(bank, TrainingBank):
        _check_bank(bank, embedder)
    features = bank.features if isinstance(bank, TrainingBank) else _matrix(bank, "bank")
    queries = _features(heldout, embedder, "held-out images")
    if len(queries) == 0:
        raise ChexmemError("no held-out images to calibrate the threshold on")
    similarity = search(queries, features, embedder, config=config).similarity.astype(np.float64)
    return check_calibration(
        "copy threshold",
        float(np.percentile(similarity, percentile)),
        similarity,
        fix=fix
        or "calibrate on at least 20 held-out images of patients absent from the training set "
        "(a patient-disjoint split), or set the threshold yourself (--copy_threshold)",
        ceiling=getattr(embedder, "max_similarity", 1.0),
        ceiling_means="no generation can lie above it, so nothing is ever a copy (are the "
        "held-out images training images?)",
    )


def _own_rows(own_index: Sequence[int | None] | None, n: int, n_bank: int) -> np.ndarray | None:
    """Own bank row of each generation, -1 where unknown."""
    if own_index is None:
        return None
    if len(own_index) != n:
        raise ChexmemError(f"own_index has {len(own_index)} entries for {n} generations")
    own = np.array([-1 if i is None or pd.isna(i) else int(i) for i in own_index], dtype=np.int64)
    if ((own < -1) | (own >= n_bank)).any():
        raise ChexmemError(f"own_index must be bank rows 0..{n_bank - 1} (or None when unknown)")
    return own


def match_generations(
    generated: np.ndarray | Sequence[Image.Image],
    bank: TrainingBank,
    prompt_ids: Sequence[int],
    *,
    embedder: Embedder | None = None,
    threshold: float | None = None,
    own_index: Sequence[int | None] | None = None,
    generation: Sequence[int] | None = None,
    patient_reduce: Reduce = "max",
    config: SearchConfig | None = None,
) -> pd.DataFrame:
    """One row per generation: nearest training image, best patient, own image, copy flag.

    `generated` are images or feature rows made by `embedder` (None: dot product of rows).
    `own_index` is the bank row each generation's prompt came from (None where unknown);
    `generation` numbers each prompt's generations (default: in order). A patient's similarity
    is the best over their images, or the mean with ``patient_reduce="mean"``. A generation is
    a copy when its nearest similarity is above `threshold`.
    """
    _check_bank(bank, embedder)
    features = _features(generated, embedder, "generated images")
    n = len(features)
    if len(prompt_ids) != n:
        raise ChexmemError(f"prompt_ids has {len(prompt_ids)} entries for {n} generations")
    if generation is not None and len(generation) != n:
        raise ChexmemError(f"generation has {len(generation)} entries for {n} generations")
    own = _own_rows(own_index, n, len(bank.features))
    codes, patients = (None, None) if bank.patient_ids is None else bank.patient_codes()
    scan = _scan(features, bank.features, embedder, 1, config, codes, patient_reduce, own)
    nearest_index = scan.top_index[:, 0]
    table = pd.DataFrame({"prompt_id": np.asarray(prompt_ids)})
    table["generation"] = (
        table.groupby("prompt_id").cumcount().to_numpy()
        if generation is None
        else np.asarray(generation)
    )
    table["nearest_index"] = nearest_index
    for column, ids in (("nearest_image_id", bank.image_ids), ("nearest_study_id", bank.study_ids)):
        if ids is not None:
            table[column] = np.asarray(list(ids), dtype=object)[nearest_index]
    table["nearest_similarity"] = scan.top_similarity[:, 0].astype(np.float64)
    unknown = np.full(n, np.nan)
    if patients is not None:
        table["nearest_patient"] = patients[scan.patient_code[:, 0]]
        table["patient_similarity"] = scan.patient_similarity[:, 0].astype(np.float64)
    else:
        table["nearest_patient"] = None
        table["patient_similarity"] = unknown
    known = own >= 0 if own is not None else np.zeros(n, dtype=bool)
    rows = own if own is not None else np.full(n, -1)
    table["own_index"] = pd.array([int(i) if i >= 0 else pd.NA for i in rows], dtype="Int64")
    table["own_similarity"] = unknown if own is None else scan.own_similarity.astype(np.float64)
    table["own_patient_similarity"] = (
        unknown
        if own is None or scan.own_patient_similarity is None
        else scan.own_patient_similarity.astype(np.float64)
    )
    same_image = pd.array(nearest_index == rows, dtype="boolean")
    same_image[~known] = pd.NA
    table["same_image"] = same_image
    if patients is not None and own is not None:
        own_patient = np.where(known, codes[np.maximum(rows, 0)], -1)
        same_patient = pd.array(scan.patient_code[:, 0] == own_patient, dtype="boolean")
        same_patient[~known] = pd.NA
    else:
        same_patient = pd.array([pd.NA] * n, dtype="boolean")
    table["same_patient"] = same_patient
    if threshold is None:
        table["is_copy"] = pd.array([pd.NA] * n, dtype="boolean")
    else:  # a float or a Calibration
        above = table["nearest_similarity"] > float(threshold)
        table["is_copy"] = pd.array(above, dtype="boolean")
    return table


def prompt_diversity(
    features: np.ndarray | Sequence[Image.Image],
    prompt_ids: Sequence[int],
    embedder: Embedder | None = None,
    config: SearchConfig | None = None,
) -> pd.Series:
    """Each prompt's mean similarity between distinct generations (lower = more diverse)."""
    features = _features(features, embedder, "generated images")
    ids = np.asarray(prompt_ids)
    if len(ids) != len(features):
        raise ChexmemError(f"prompt_ids has {len(ids)} entries for {len(features)} generations")
    values = {}
    for prompt in pd.unique(ids):
        rows = features[ids == prompt]
        n = len(rows)
        if n < 2:
            values[prompt] = np.nan
            continue
        scores = similarity_matrix(rows, rows, embedder, config).astype(np.float64)
        values[prompt] = float((scores.sum() - np.trace(scores)) / (n * (n - 1)))
    return pd.Series(values, name="diversity", dtype=np.float64).rename_axis("prompt_id")


def copy_rate(table: pd.DataFrame) -> float:
    """Share of generations flagged as copies."""
    if table["is_copy"].isna().any():
        raise ChexmemError("the table has no copy flags: match with a threshold")
    return float(table["is_copy"].astype(bool).mean()) if len(table) else float("nan")


def summarise_prompts(table: pd.DataFrame, diversity: pd.Series | None = None) -> pd.DataFrame:
    """Per prompt: generations, max and mean nearest similarity, copy rate and diversity."""
    groups = table.groupby("prompt_id", sort=True)
    summary = pd.DataFrame(
        {
            "generations": groups.size(),
            "max_similarity": groups["nearest_similarity"].max(),
            "mean_similarity": groups["nearest_similarity"].mean(),
            "max_own_similarity": groups["own_similarity"].max(),
            "copy_rate": groups["is_copy"].apply(
                lambda flags: np.nan if flags.isna().any() else float(flags.astype(bool).mean())
            ),
        }
    )
    summary["diversity"] = np.nan if diversity is None else diversity.reindex(summary.index)
    return summary


@dataclass
class CopyReport:
    """Per-generation matches and per-prompt summary of one copy-detection run."""

    table: pd.DataFrame  # match_generations' columns
    summary: pd.DataFrame  # summarise_prompts' columns, indexed by prompt_id
    threshold: float | None
    embedder: str

    @property
    def copy_rate(self) -> float:
        """Share of all generations above the threshold."""
        return copy_rate(self.table)


def detect_copies(
    generated: np.ndarray | Sequence[Image.Image],
    bank: TrainingBank,
    prompt_ids: Sequence[int],
    embedder: Embedder | None = None,
    threshold: float | None = None,
    own_index: Sequence[int | None] | None = None,
    patient_reduce: Reduce = "max",
    config: SearchConfig | None = None,
) -> CopyReport:
    """Match every generation to the training set and summarise copies and diversity per prompt."""
    features = _features(generated, embedder, "generated images")
    table = match_generations(
        features,
        bank,
        prompt_ids,
        embedder=embedder,
        threshold=threshold,
        own_index=own_index,
        patient_reduce=patient_reduce,
        config=config,
    )
    diversity = prompt_diversity(features, prompt_ids, embedder, config)
    name = embedder.name if embedder is not None else "dot"
    return CopyReport(table, summarise_prompts(table, diversity), threshold, name)
