"""The findings CNN on phantom (and real) chest X-rays: AUCs, save/load, conditioning."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from datasets import DatasetDict
from PIL import Image

from detect.classifier import (
    ClassifierConfig,
    FindingsClassifier,
    calibrate_thresholds,
    conditioning_fidelity,
    evaluate,
    label_matrix,
    load_split,
    train_classifier,
)
from hf_datasets.errors import ChexmemError
from hf_datasets.labels import OBSERVATIONS
from hf_datasets.phantom import PhantomConfig, generate_phantom
from hf_datasets.storage import load_dataset_dir
from tests.conftest import OPEN_CXR, needs

# findings the phantom draws strongly enough for a small CNN at 64 px to learn from ~110 rows
VISIBLE = ("No Finding", "Edema", "Pleural Effusion", "Support Devices")
HELDOUT = ["validation", "test"]


@pytest.fixture(scope="module")
def phantom80() -> DatasetDict:
    """80 phantom patients at 64 px: 111 training rows, 32 held-out rows (15 + 17)."""
    return generate_phantom(PhantomConfig(num_patients=80, resolution=64, seed=1))


@pytest.fixture(scope="module")
def trained(phantom80: DatasetDict) -> FindingsClassifier:
    """The classifier after 10 epochs on the 80-patient training split."""
    return train_classifier(phantom80, ClassifierConfig(epochs=10, progress=False))


def test_beats_chance_on_held_out_patients(
    trained: FindingsClassifier, phantom80: DatasetDict
) -> None:
    table = evaluate(trained, phantom80, split=HELDOUT)
    assert list(table.index) == list(OBSERVATIONS)
    assert {"auc", "positives", "negatives", "train_positives", "status"} <= set(table.columns)
    for finding in VISIBLE:
        assert table.loc[finding, "status"] == "ok"
        assert table.loc[finding, "auc"] > 0.7, (finding, table.loc[finding, "auc"])
    scored = table[table["status"] == "ok"]
    assert scored["auc"].mean() > 0.6
    # no held-out positives: reported, not a crash
    assert table.loc["Enlarged Cardiomediastinum", "status"] == "no positives in evaluation data"
    assert np.isnan(table.loc["Enlarged Cardiomediastinum", "auc"])
    assert trained.info["train_rows"] == 111
    assert trained.name == "chexmem-findings-cnn (trained on in-memory dataset/train)"


def test_findings_without_training_positives_are_reported(phantom_data: Path) -> None:
    # phantom_data's training split has no Lung Lesion, Pneumonia or Pleural Other positives
    model = train_classifier(phantom_data, ClassifierConfig(epochs=1, progress=False))
    untrained = {"Lung Lesion", "Pneumonia", "Pleural Other"}
    assert {f for f, t in zip(OBSERVATIONS, model.trained.tolist(), strict=True) if not t} == (
        untrained
    )
    images = list(load_dataset_dir(phantom_data)["test"]["image"])
    probs = model.predict(images)
    assert probs.shape == (len(images), 14)
    for j, finding in enumerate(OBSERVATIONS):
        assert np.isnan(probs[:, j]).all() == (finding in untrained)
    table = evaluate(model, phantom_data, split="test")
    assert table.loc["Pleural Other", "status"] == "not trained: no positives in training data"
    assert model.name == "chexmem-findings-cnn (trained on phantom/train)"


def test_training_is_seeded_and_deterministic(phantom_data: Path) -> None:
    config = ClassifierConfig(epochs=2, batch_size=8, progress=False)
    first = train_classifier(phantom_data, config)
    second = train_classifier(phantom_data, config)
    other = train_classifier(phantom_data, ClassifierConfig(epochs=2, batch_size=8, seed=1))
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key
    assert not torch.equal(first.head.weight, other.head.weight)
    assert first.info["epoch_losses"] == second.info["epoch_losses"]


def test_save_load_round_trip(trained: FindingsClassifier, phantom80: DatasetDict, tmp_path):
    images = list(phantom80["test"]["image"])
    out = trained.save(tmp_path / "cnn")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert not list(tmp_path.glob(".cnn.tmp-*"))
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == "chexmem-findings-cnn" and config["findings"] == list(OBSERVATIONS)
    assert config["info"]["config"]["uncertain"] == "ignore"
    loaded = FindingsClassifier.load(out)
    np.testing.assert_array_equal(loaded.predict(images), trained.predict(images))
    np.testing.assert_array_equal(loaded.embed(images), trained.embed(images))
    assert loaded.name == trained.name and loaded.info == trained.info
    with pytest.raises(ChexmemError, match="already exists"):
        trained.save(out)
    trained.save(out, overwrite=True)
    with pytest.raises(ChexmemError, match="not a saved findings classifier"):
        FindingsClassifier.load(tmp_path)
    (out / "config.json").write_text(json.dumps({**config, "feature_dim": 64}))
    with pytest.raises(ChexmemError, match="does not match"):
        FindingsClassifier.load(out)


def test_a_plain_module_that_takes_uint8_rgb_and_other_sizes(
    trained: FindingsClassifier, phantom80: DatasetDict
) -> None:
    images = list(phantom80["test"]["image"])[:4]
    gray = torch.from_numpy(np.stack([np.asarray(im) for im in images]))[:, None]
    assert isinstance(trained, torch.nn.Module)
    with torch.no_grad():
        features = trained.features(gray)
        rgb = trained.features(gray.repeat(1, 3, 1, 1))
        logits = trained(gray)
    assert features.shape == (4, 128) and logits.shape == (4, 14)
    torch.testing.assert_close(rgb, features)
    np.testing.assert_allclose(trained.embed(images), features.numpy(), atol=1e-5)
    module = trained.feature_module()
    assert module.num_features == 128
    module.train()
    assert not module.training and not trained.training
    big = [im.resize((128, 128), Image.Resampling.BILINEAR) for im in images]
    assert trained.predict(big).shape == (4, 14)  # predict resizes PIL images itself


def test_label_policies(phantom_data: Path) -> None:
    train = load_split(phantom_data, "train", "train")
    raw = np.array(
        [[np.nan if v is None else v for v in train[name]] for name in OBSERVATIONS], dtype=float
    ).T
    ignore = label_matrix(train)
    ones = label_matrix(train, uncertain="ones")
    zeros = label_matrix(train, uncertain="zeros", missing="ignore")
    uncertain, missing = raw == -1, np.isnan(raw)
    assert uncertain.any() and missing.any()
    assert np.isnan(ignore[uncertain]).all() and (ignore[missing] == 0).all()
    assert (ones[uncertain] == 1).all() and (zeros[uncertain] == 0).all()
    assert np.isnan(zeros[missing]).all()
    known = ~uncertain & ~missing
    np.testing.assert_array_equal(ignore[known], raw[known])
    with pytest.raises(ChexmemError, match="'ignore', 'ones' or 'zeros'"):
        ClassifierConfig(uncertain="keep")
    with pytest.raises(ChexmemError, match="no split holdout"):
        load_split(phantom_data, "holdout", "train")
    with pytest.raises(ChexmemError, match="lacks label column"):
        label_matrix(train.remove_columns(["Edema"]))


def test_conditioning_fidelity_on_real_images_with_their_own_labels(
    trained: FindingsClassifier, phantom80: DatasetDict
) -> None:
    held = load_split(phantom80, HELDOUT, "test")
    images = list(held["image"])
    # the prompts' labels: stated present (1), stated absent (0), not stated (NaN)
    stated = label_matrix(held, missing="ignore")
    result = conditioning_fidelity(trained, images, stated)
    table = result.table
    assert {"stated_present", "stated_absent", "rate_when_present", "rate_when_absent"} <= set(
        table.columns
    )
    assert table.loc["Support Devices", "stated_present"] == 17
    for finding in ("Edema", "Pleural Effusion"):
        assert table.loc[finding, "status"] == "ok"
        assert table.loc[finding, "auc"] > 0.5, (finding, table.loc[finding, "auc"])
        assert table.loc[finding, "rate_when_present"] > table.loc[finding, "rate_when_absent"]
    assert result.findings_scored == table.index[table["status"] == "ok"].tolist()
    assert result.mean_auc == pytest.approx(table.loc[result.findings_scored, "auc"].mean())
    assert table.loc["Pleural Other", "status"] != "ok"
    assert result.classifier == trained.name
    json.dumps(result.to_dict())
    # thresholds calibrated on these real images reproduce each finding's prevalence there
    own = label_matrix(held)
    thresholds = calibrate_thresholds(trained, images, own)
    calibrated = conditioning_fidelity(trained, images, own, thresholds=thresholds).table
    for finding in VISIBLE:
        j = OBSERVATIONS.index(finding)
        prevalence = np.nanmean(own[:, j])
        predicted = (calibrated.loc[finding, "rate_when_present"] * np.nansum(own[:, j] == 1)) + (
            calibrated.loc[finding, "rate_when_absent"] * np.nansum(own[:, j] == 0)
        )
        assert predicted / len(images) == pytest.approx(prevalence, abs=0.1)
    as_frame = pd.DataFrame(stated, columns=list(OBSERVATIONS))
    same = conditioning_fidelity(trained, images, as_frame).table
    pd.testing.assert_frame_equal(same, table)
    with pytest.raises(ChexmemError, match="labels must have shape"):
        conditioning_fidelity(trained, images, stated[:3])


@needs(OPEN_CXR)
def test_predicts_on_real_chest_x_rays(trained: FindingsClassifier) -> None:
    meta = pd.read_csv(OPEN_CXR / "metadata.csv").head(8)
    images = []
    for name in meta["file_name"]:
        with Image.open(OPEN_CXR / "images" / name) as image:
            images.append(image.copy())
    probs = trained.predict(images)  # 256 px real radiographs, resized to 64
    trained_columns = trained.trained.numpy()
    assert probs.shape == (8, 14)
    assert ((probs[:, trained_columns] >= 0) & (probs[:, trained_columns] <= 1)).all()
    assert trained.embed(images).shape == (8, 128)
