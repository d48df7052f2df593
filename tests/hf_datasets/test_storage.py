"""save_to_disk round trip, atomic replacement, self-contained parquet, and the Hub push."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest
from datasets import load_dataset

from hf_datasets.errors import ChexmemError
from hf_datasets.storage import export_parquet, load_dataset_dir, push_dataset, save_dataset


def test_round_trip_embeds_images(small_dataset, tmp_path: Path) -> None:
    out = save_dataset(small_dataset, tmp_path / "saved")
    shutil.rmtree(
        tmp_path / "folder"
    )  # the source images are gone: the saved copy must stand alone
    loaded = load_dataset_dir(out)
    assert list(loaded) == list(small_dataset)
    assert loaded["train"]["prompt"] == small_dataset["train"]["prompt"]
    assert loaded["train"][0]["image"].size == (40, 48)
    assert loaded["train"].info.description == small_dataset["train"].info.description


def test_existing_output_is_never_lost(small_dataset, tmp_path: Path) -> None:
    out = tmp_path / "saved"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(ChexmemError, match="already exists; pass --overwrite"):
        save_dataset(small_dataset, out)
    assert (out / "precious.txt").read_text() == "keep me"
    save_dataset(small_dataset, out, overwrite=True)
    assert not (out / "precious.txt").exists() and (out / "dataset_dict.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["folder", "saved"]  # no temp leftovers


def test_parquet_is_self_contained(small_dataset, tmp_path: Path) -> None:
    files = export_parquet(small_dataset, tmp_path / "parquet")
    assert [f.name for f in files] == ["test.parquet", "train.parquet", "validation.parquet"]
    shutil.rmtree(tmp_path / "folder")
    reloaded = load_dataset("parquet", data_files={"train": str(files[1])})["train"]
    assert reloaded.features["image"].__class__.__name__ == "Image"
    assert reloaded[0]["image"].size == (40, 48)
    assert reloaded["prompt"] == small_dataset["train"]["prompt"]


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ChexmemError, match="does not exist"):
        load_dataset_dir(tmp_path / "missing")
    with pytest.raises(ChexmemError, match="is not a saved dataset"):
        load_dataset_dir(tmp_path)


def test_push_needs_a_token(small_dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN_PATH", "/nonexistent/token")
    with pytest.raises(ChexmemError, match="needs a token"):
        push_dataset(small_dataset, "someone/chexmem-test")


@pytest.mark.skipif(
    not os.environ.get("HF_TOKEN"), reason="the real Hub upload runs only with HF_TOKEN"
)
def test_real_push(small_dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import HfApi

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    api = HfApi()
    repo_id = f"{api.whoami()['name']}/chexmem-test-{uuid.uuid4().hex[:8]}"
    try:
        push_dataset(small_dataset, repo_id, private=True)
        assert any(
            f.endswith(".parquet") for f in api.list_repo_files(repo_id, repo_type="dataset")
        )
    finally:
        api.delete_repo(repo_id, repo_type="dataset", missing_ok=True)
