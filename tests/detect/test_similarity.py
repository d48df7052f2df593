"""Copy detection on synthetic blobs and real chest X-rays, against brute force and by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torchmetrics.functional.image import (
    multiscale_structural_similarity_index_measure,
    structural_similarity_index_measure,
)

from detect.similarity import (
    MS_SSIM_BETAS,
    MSSSIMEmbedder,
    NCCEmbedder,
    SearchConfig,
    SSIMEmbedder,
    TiledL2Embedder,
    TorchEmbedder,
    TrainingBank,
    calibrate_threshold,
    copy_rate,
    detect_copies,
    match_generations,
    mean_pairwise,
    nearest,
    pixels,
    prompt_diversity,
    search,
    similarity_matrix,
)
from hf_datasets.errors import ChexmemError
from tests.conftest import OPEN_CXR, needs


def blobs(count: int, size: int = 72, seed: int = 0) -> list[Image.Image]:
    """Grayscale images of a few random smooth Gaussian blobs."""
    rng = np.random.default_rng(seed)
    grid = np.mgrid[0:size, 0:size] / size
    images = []
    for _ in range(count):
        canvas = np.full((size, size), 0.1)
        for _ in range(6):
            centre = rng.uniform(0.1, 0.9, size=(2, 1, 1))
            width = rng.uniform(0.05, 0.2)
            canvas += rng.uniform(0.2, 0.8) * np.exp(-((grid - centre) ** 2).sum(0) / width**2)
        canvas = canvas / canvas.max()
        images.append(Image.fromarray(np.round(canvas * 255).astype(np.uint8), mode="L"))
    return images


def perturbed(image: Image.Image, shift: int, noise: float, seed: int = 0) -> Image.Image:
    """The image shifted right and down by `shift` px, plus Gaussian noise (in 0..255 units)."""
    moved = image.transform(
        image.size, Image.Transform.AFFINE, (1, 0, -shift, 0, 1, -shift), Image.Resampling.BILINEAR
    )
    array = np.asarray(moved, dtype=np.float64)
    array = array + np.random.default_rng(seed).normal(0, noise, array.shape)
    return Image.fromarray(np.clip(np.round(array), 0, 255).astype(np.uint8), mode="L")


@pytest.fixture(scope="module")
def cxr() -> tuple[list[Image.Image], list[str]]:
    """Up to two real chest X-rays of each of the first 12 patients, with their patient keys."""
    meta = pd.read_csv(OPEN_CXR / "metadata.csv")
    meta = meta[meta["patient_key"].isin(meta["patient_key"].unique()[:12])]
    meta = meta.groupby("patient_key", sort=False).head(2)
    images = []
    for name in meta["file_name"]:
        with Image.open(OPEN_CXR / "images" / name) as image:
            images.append(image.copy())
    return images, list(meta["patient_key"])


def random_net() -> TorchEmbedder:
    """A small fixed random conv net as an encoder."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 5, stride=2, padding=2),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(4),
        torch.nn.Flatten(),
    )
    return TorchEmbedder(net, size=64, batch_size=7, mean=0.5, std=0.25)


EMBEDDERS = {
    "ncc": NCCEmbedder,
    "ssim": SSIMEmbedder,
    "ms-ssim": MSSSIMEmbedder,
    "tiled-l2": TiledL2Embedder,
    "torch": random_net,
}
IDENTICAL = {"tiled-l2": 0.0}  # the similarity of an image to itself; 1 for the others


def check_finds_sources(kind: str, images: list[Image.Image], shift: int, noise: float) -> None:
    """Each image, and a shifted and noised copy of it, finds itself in a bank of all."""
    embedder = EMBEDDERS[kind]()
    bank = embedder.embed(images)
    config = SearchConfig(query_chunk=4, bank_chunk=5)
    itself = search(bank, bank, embedder, config=config)
    np.testing.assert_array_equal(itself.index, np.arange(len(images)))
    np.testing.assert_allclose(itself.similarity, IDENTICAL.get(kind, 1.0), atol=1e-5)
    copies = embedder.embed(perturbed(image, shift, noise, i) for i, image in enumerate(images))
    found = search(copies, bank, embedder)
    np.testing.assert_array_equal(found.index, np.arange(len(images)))
    assert (found.similarity < IDENTICAL.get(kind, 1.0) - 1e-4).all()  # the copies are altered


@pytest.mark.parametrize("kind", EMBEDDERS)
def test_blobs_and_their_noised_shifted_copies_find_themselves(kind: str) -> None:
    check_finds_sources(kind, blobs(12), shift=1, noise=4.0)


@needs(OPEN_CXR)
@pytest.mark.parametrize("kind", EMBEDDERS)
def test_chest_xrays_and_their_noised_shifted_copies_find_themselves(kind: str, cxr) -> None:
    check_finds_sources(kind, cxr[0], shift=2, noise=4.0)


def test_ssim_and_ms_ssim_equal_torchmetrics_pair_by_pair() -> None:
    images = [*blobs(4, size=64, seed=1), perturbed(blobs(1, size=64, seed=1)[0], 2, 10.0)]
    for embedder in (SSIMEmbedder(), MSSSIMEmbedder()):
        x = torch.from_numpy(embedder.embed(images))
        matrix = embedder.similarity(x, x)
        a = x.view(-1, 1, 64, 64).repeat_interleave(len(images), 0)
        b = x.view(-1, 1, 64, 64).repeat(len(images), 1, 1, 1)
        if embedder.scales == (1.0,):
            expected = structural_similarity_index_measure(a, b, data_range=1.0, reduction="none")
        else:
            expected = multiscale_structural_similarity_index_measure(
                a, b, data_range=1.0, reduction="none", betas=embedder.betas
            )
        torch.testing.assert_close(matrix.flatten(), expected, atol=1e-4, rtol=0)
    # 64 px holds three of Wang et al.'s five scales (the smallest must be wider than 10 px)
    assert len(MSSSIMEmbedder(size=64).scales) == 3
    assert len(MSSSIMEmbedder(size=176).scales) == 5
    assert sum(MSSSIMEmbedder().scales) == pytest.approx(1.0)


def test_tiled_l2_is_the_worst_tile_rms_distance() -> None:
    images = blobs(3, size=64, seed=2)
    embedder = TiledL2Embedder()
    x = torch.from_numpy(embedder.embed(images))
    got = embedder.similarity(x, x).numpy()
    p = pixels(images, 64)
    tiles = [
        (slice(r, r + 16), slice(c, c + 16)) for r in range(0, 64, 16) for c in range(0, 64, 16)
    ]
    for i in range(3):
        for j in range(3):
            rms = [np.sqrt(((p[i][t] - p[j][t]) ** 2).mean()) for t in tiles]
            assert got[i, j] == pytest.approx(-max(rms), abs=1e-6)
    # one tile changed: the distance is that tile's alone, however good the rest is
    altered = p[0].copy()
    altered[:16, :16] = 0.0
    one = Image.fromarray(np.round(altered * 255).astype(np.uint8), mode="L")
    changed = embedder.similarity(torch.from_numpy(embedder.embed([one])), x[:1]).item()
    assert changed == pytest.approx(-np.sqrt((p[0][:16, :16] ** 2).mean()), abs=2e-3)


@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize(
    "config",
    [
        SearchConfig(query_chunk=5, bank_chunk=7),
        SearchConfig(query_chunk=1, bank_chunk=100),
        SearchConfig(query_chunk=37, bank_chunk=101),
        SearchConfig(max_memory_mb=0.002),
    ],
)
def test_chunked_search_equals_brute_force(config: SearchConfig, k: int) -> None:
    rng = np.random.default_rng(3)
    queries = rng.normal(size=(37, 24)).astype(np.float32)
    bank = rng.normal(size=(101, 24)).astype(np.float32)
    scores = queries @ bank.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    found = search(queries, bank, k=k, config=config)
    np.testing.assert_array_equal(found.top_index, order)
    np.testing.assert_allclose(
        found.top_similarity, np.take_along_axis(scores, order, 1), rtol=1e-5
    )
    np.testing.assert_array_equal(found.index, order[:, 0])


def test_chunked_pairwise_measures_equal_their_full_matrix() -> None:
    images = blobs(11, size=64, seed=4)
    for embedder in (SSIMEmbedder(), TiledL2Embedder()):
        rows = embedder.embed(images)
        full = similarity_matrix(rows[:5], rows, embedder)
        order = np.argsort(-full, axis=1, kind="stable")[:, :3]
        found = search(
            rows[:5], rows, embedder, k=3, config=SearchConfig(query_chunk=2, bank_chunk=4)
        )
        np.testing.assert_array_equal(found.top_index, order)
        np.testing.assert_allclose(
            found.top_similarity, np.take_along_axis(full, order, 1), atol=1e-5
        )


def test_ties_go_to_the_lower_bank_row_and_the_old_nearest_still_works(tmp_path) -> None:
    bank = np.eye(4, dtype=np.float32)[[0, 1, 0, 2, 1]]
    queries = np.eye(4, dtype=np.float32)[[1, 0, 3]]
    found = search(queries, bank, k=2, config=SearchConfig(query_chunk=2, bank_chunk=2))
    np.testing.assert_array_equal(found.top_index, [[1, 4], [0, 2], [0, 1]])
    old = nearest(queries, bank, chunk=3)
    np.testing.assert_array_equal(old.index, [1, 0, 0])
    np.testing.assert_array_equal(old.similarity, [1, 1, 0])
    # a memory-mapped bank is read chunk by chunk
    mapped = np.memmap(tmp_path / "bank.f32", np.float32, "w+", shape=bank.shape)
    mapped[:] = bank
    np.testing.assert_array_equal(search(queries, mapped, k=2).top_index, found.top_index)


def test_chunks_keep_a_large_search_within_the_budget() -> None:
    config = SearchConfig(max_memory_mb=512)
    n_queries, n_bank, dim, pair_bytes = 5000, 200_000, 1024, 12
    q, b = config.chunks(n_queries, n_bank, dim, pair_bytes, query_bytes=12)
    used = q * (4 * dim + 12) + b * 4 * dim + q * b * pair_bytes
    assert used <= 512 * 2**20
    assert q * b >= 2**24  # big enough steps to be efficient
    assert SearchConfig(query_chunk=3, bank_chunk=7).chunks(10, 5, 8, 4) == (3, 5)


def test_patients_by_best_and_by_mean_image() -> None:
    # one query; bank rows of patients a, a, b, b score 0.9, 0.2, 0.8, 0.7 against it
    scores = np.array([0.9, 0.2, 0.8, 0.7])
    bank = np.stack([scores, np.sqrt(1 - scores**2)], axis=1).astype(np.float32)
    query = np.array([[1.0, 0.0]], dtype=np.float32)
    train = TrainingBank(bank, patient_ids=["a", "a", "b", "b"], image_ids=list("wxyz"))
    best = match_generations(query, train, [0], own_index=[1])
    row = best.iloc[0]
    assert (row.nearest_index, row.nearest_image_id, row.nearest_patient) == (0, "w", "a")
    assert row.patient_similarity == pytest.approx(0.9)
    assert row.own_similarity == pytest.approx(0.2)
    assert row.own_patient_similarity == pytest.approx(0.9)
    assert not row.same_image and row.same_patient
    mean = match_generations(query, train, [0], own_index=[1], patient_reduce="mean").iloc[0]
    assert (mean.nearest_index, mean.nearest_patient) == (0, "b")
    assert mean.patient_similarity == pytest.approx(0.75)
    assert mean.own_patient_similarity == pytest.approx(0.55)
    assert not mean.same_patient


@needs(OPEN_CXR)
def test_a_copy_of_one_study_matches_its_patient_not_its_other_study(cxr) -> None:
    images, patients = cxr
    embedder = NCCEmbedder()
    bank = TrainingBank.from_images(images, embedder, patients, study_ids=range(len(images)))
    # a patient with two studies in the bank; the generation copies the second study, while
    # its prompt came from the first
    first = next(i for i in range(len(patients) - 1) if patients[i] == patients[i + 1])
    copy = perturbed(images[first + 1], 3, 4.0)
    table = match_generations([copy], bank, [7], embedder=embedder, own_index=[first])
    row = table.iloc[0]
    assert row.nearest_index == first + 1 and row.nearest_study_id == first + 1
    assert row.nearest_patient == patients[first]
    assert row.patient_similarity == pytest.approx(row.nearest_similarity)
    own = embedder.embed([copy]) @ bank.features[first]
    assert row.own_similarity == pytest.approx(float(own[0]), abs=1e-5)
    assert row.own_similarity < row.nearest_similarity
    assert not row.same_image and row.same_patient
    assert pd.isna(row.is_copy)  # no threshold given
    unknown = match_generations([copy], bank, [7], embedder=embedder, own_index=[None]).iloc[0]
    assert np.isnan(unknown.own_similarity) and pd.isna(unknown.same_image)


def test_threshold_is_the_percentile_of_heldout_nearest_similarity() -> None:
    # held-out query j has similarity c_j to the one bank row: 0.1, 0.2, ..., 1.0
    c = np.linspace(0.1, 1.0, 10)
    heldout = np.stack([c, np.sqrt(1 - c**2)], axis=1).astype(np.float32)
    bank = np.array([[1.0, 0.0]], dtype=np.float32)
    # position 0.95 * 9 = 8.55 between 0.9 and 1.0
    assert calibrate_threshold(heldout, bank).value == pytest.approx(0.955, abs=1e-6)
    assert calibrate_threshold(heldout, bank, percentile=50).value == pytest.approx(0.55, abs=1e-6)
    assert calibrate_threshold(heldout, bank, percentile=100).value == pytest.approx(1.0, abs=1e-6)


def test_threshold_from_heldout_images() -> None:
    embedder = SSIMEmbedder()
    train, heldout = blobs(9, seed=5), blobs(7, seed=6)
    bank = TrainingBank.from_images(train, embedder)
    full = similarity_matrix(embedder.embed(heldout), bank.features, embedder)
    expected = np.percentile(full.max(axis=1).astype(np.float64), 90)
    got = calibrate_threshold(heldout, bank, embedder, percentile=90).value
    assert got == pytest.approx(expected, abs=1e-6)


def test_copy_rate_and_diversity_on_a_constructed_case() -> None:
    eye = np.eye(6)
    unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
    generated = np.stack(
        [
            eye[0],  # prompt 3: two exact copies and a near copy of bank row 0
            eye[0],
            unit(eye[0] + 0.1 * eye[5]),
            unit(0.3 * eye[1] + eye[4]),  # prompt 8: far from every bank row
            unit(0.3 * eye[2] + eye[5]),
            unit(0.2 * eye[3] + eye[4]),
        ]
    ).astype(np.float32)
    bank = TrainingBank(np.eye(4, 6, dtype=np.float32), patient_ids=["p", "q", "r", "s"])
    report = detect_copies(generated, bank, [3, 3, 3, 8, 8, 8], threshold=0.5)
    table = report.table
    assert list(table["generation"]) == [0, 1, 2, 0, 1, 2]
    assert list(table["is_copy"]) == [True, True, True, False, False, False]
    assert list(table["nearest_patient"])[:3] == ["p"] * 3
    assert report.copy_rate == 0.5
    summary = report.summary
    assert summary.loc[3, "copy_rate"] == 1.0 and summary.loc[8, "copy_rate"] == 0.0
    assert summary.loc[3, "max_similarity"] == pytest.approx(1.0)
    assert summary.loc[8, "mean_similarity"] == pytest.approx(
        (0.3 / np.sqrt(1.09) * 2 + 0.2 / np.sqrt(1.04)) / 3, rel=1e-5
    )
    near = 1 / np.sqrt(1.01)
    assert summary.loc[3, "diversity"] == pytest.approx((1 + 2 * near) / 3, rel=1e-5)
    far = 1 / np.sqrt(1.09 * 1.04)  # only generations 0 and 2 of prompt 8 share a direction
    assert summary.loc[8, "diversity"] == pytest.approx(far / 3, rel=1e-5)
    assert summary.loc[8, "diversity"] == pytest.approx(mean_pairwise(list(generated[3:])))
    assert copy_rate(table[table["prompt_id"] == 8]) == 0.0


def test_ssim_diversity_of_identical_and_of_different_images() -> None:
    same = blobs(1, seed=7) * 3
    different = blobs(3, seed=8)
    diversity = prompt_diversity(same + different, [0, 0, 0, 1, 1, 1], SSIMEmbedder())
    assert diversity[0] == pytest.approx(1.0, abs=1e-5)
    assert diversity[1] < 0.8
    assert np.isnan(prompt_diversity(different[:1], [4], SSIMEmbedder())[4])


def test_torch_embedder_features_do_not_depend_on_batching() -> None:
    images = blobs(5, seed=9)
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten())
    one = TorchEmbedder(net, size=32, batch_size=2, channels=3, mean=(0.4, 0.5, 0.6), std=0.2)
    two = TorchEmbedder(net, size=32, batch_size=5, channels=3, mean=(0.4, 0.5, 0.6), std=0.2)
    a, b = one.embed(images), two.embed(images)
    assert a.shape == (5, 4 * 30 * 30) and a.dtype == np.float32
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    picked = TorchEmbedder(net, size=32, channels=3, features=lambda out: out[:, :50]).embed(images)
    assert picked.shape == (5, 50)


def one_error(call) -> str:
    """The message of the one ChexmemError the call raises."""
    with pytest.raises(ChexmemError) as error:
        call()
    assert "\n" not in str(error.value)
    return str(error.value)


def test_bad_input_is_one_clear_error() -> None:
    rows = np.ones((3, 4), dtype=np.float32)
    assert "empty" in one_error(lambda: search(rows, np.zeros((0, 4), np.float32)))
    assert "empty" in one_error(lambda: TrainingBank(np.zeros((0, 4), np.float32)))
    assert "same embedder" in one_error(lambda: search(rows, np.ones((2, 5), np.float32)))
    assert "2-D" in one_error(lambda: search(rows[0], rows))
    for bad in (-1, 120):
        assert "between 0 and 100" in one_error(
            lambda bad=bad: calibrate_threshold(rows, rows, percentile=bad)
        )
    assert "patient_ids has 2" in one_error(lambda: TrainingBank(rows, patient_ids=["a", "b"]))
    assert "missing" in one_error(lambda: TrainingBank(rows, patient_ids=["a", None, "b"]))
    bank = TrainingBank(rows, patient_ids=["a", "b", "b"], embedder="ncc-64")
    assert "bank rows 0..2" in one_error(
        lambda: match_generations(rows, bank, [0, 0, 0], own_index=[0, 3, None])
    )
    assert "prompt_ids has 2" in one_error(lambda: match_generations(rows, bank, [0, 0]))
    assert "'max' or 'mean'" in one_error(
        lambda: match_generations(rows, bank, [0, 0, 0], patient_reduce="median")
    )
    assert "embedded with ncc-64" in one_error(
        lambda: match_generations(rows, bank, [0, 0, 0], embedder=SSIMEmbedder())
    )
    assert "pass an embedder" in one_error(lambda: match_generations(blobs(3), bank, [0, 0, 0]))
    assert "divisible" in one_error(lambda: TiledL2Embedder(size=65))
    assert "size >= 176" in one_error(lambda: MSSSIMEmbedder(size=64, betas=MS_SSIM_BETAS))
    small = SSIMEmbedder(size=32).embed(blobs(2))
    assert "embed the images with this embedder" in one_error(
        lambda: search(small, small, SSIMEmbedder(size=64))
    )
    assert "max_memory_mb" in one_error(lambda: SearchConfig(max_memory_mb=0))
    assert "no copy flags" in one_error(lambda: copy_rate(match_generations(rows, bank, [0, 0, 0])))
