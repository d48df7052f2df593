"""Tests for the tiny offline Stable Diffusion (the embedded default's base model)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
from PIL import Image
from transformers import CLIPTokenizer

from hf_datasets.errors import ChexmemError
from train.tiny_model import INFO_FILE, TinyModelConfig, build_tiny_pipeline, vae_psnr
from train.tokenizer import build_tokenizer, prompt_corpus

OPEN_CXR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "open-cxr"
QUICK = {"vae_train_steps": 3, "vae_num_phantoms": 8}  # fast builds, where quality is not tested


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default tiny model, built once per test session."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "model", progress=False)


@pytest.fixture(scope="session")
def pipeline(tiny_dir: Path) -> StableDiffusionPipeline:
    """The tiny model loaded by plain diffusers, no chexmem code involved."""
    return StableDiffusionPipeline.from_pretrained(tiny_dir, local_files_only=True)


def _generate(pipe: StableDiffusionPipeline, prompt: str) -> np.ndarray:
    """One 64 x 64 image from 2 DDIM steps with classifier-free guidance."""
    return pipe(
        prompt,
        num_inference_steps=2,
        guidance_scale=7.5,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images


def test_folder_is_a_standard_sd_pipeline(tiny_dir: Path, pipeline: StableDiffusionPipeline):
    """Plain from_pretrained loads every SD 1.x part; the info file records the build."""
    assert {p.name for p in tiny_dir.iterdir()} >= {
        "model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler", INFO_FILE
    }  # fmt: skip
    assert pipeline.safety_checker is None and pipeline.feature_extractor is None
    assert isinstance(pipeline.scheduler, DDIMScheduler)
    assert pipeline.scheduler.config.beta_schedule == "scaled_linear"
    assert pipeline.scheduler.config.steps_offset == 1
    processors = pipeline.unet.attn_processors
    assert any(name.endswith("attn1.processor") for name in processors)
    assert any(name.endswith("attn2.processor") for name in processors)
    assert pipeline.unet.config.cross_attention_dim == pipeline.text_encoder.config.hidden_size
    assert pipeline.text_encoder.config.vocab_size == len(pipeline.tokenizer)
    assert 2 ** (len(pipeline.vae.config.block_out_channels) - 1) == 4
    info = json.loads((tiny_dir / INFO_FILE).read_text())
    assert info["config"] == json.loads(json.dumps(TinyModelConfig().__dict__))
    assert pipeline.vae.config.scaling_factor == pytest.approx(1 / info["latent_std"], rel=1e-3)
    assert info["scaling_factor"] != 0.18215  # measured, not SD's
    assert info["vae_psnr_phantom_held_out_db"] >= 25.0


def test_generates_a_64px_image_fast(pipeline: StableDiffusionPipeline):
    """Two CFG steps give a finite 64 x 64 RGB image, repeatably, in well under seconds."""
    prompt = "Frontal PA chest radiograph of a 68-year-old woman. Cardiomegaly."
    first = _generate(pipeline, prompt)
    start = time.perf_counter()
    second = _generate(pipeline, prompt)
    elapsed = time.perf_counter() - start
    assert first.shape == (1, 64, 64, 3)
    assert np.isfinite(first).all() and 0.0 <= first.min() <= first.max() <= 1.0
    np.testing.assert_array_equal(first, second)
    assert elapsed < 3.0  # about 0.1 s on one CPU thread; generous for loaded machines


def test_tokenizer_keeps_prompt_words_whole(tiny_dir: Path):
    """Each word of report- and labels-style prompts is one token of the saved tokenizer."""
    tokenizer = CLIPTokenizer.from_pretrained(tiny_dir / "tokenizer")
    corpus = prompt_corpus(n=300, seed=7)
    words = {w for prompt in corpus for w in re.findall(r"[a-z]+", prompt.lower())}
    expected = {"frontal", "radiograph", "cardiomegaly", "pleural", "effusion", "possible"}
    assert expected | {"cardiomediastinum", "pneumothorax", "atelectasis", "devices"} <= words
    split = {w for w in words if len(tokenizer(w, add_special_tokens=False).input_ids) != 1}
    assert not split
    ids = tokenizer(corpus[0]).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id


def test_tokenizer_handles_arbitrary_text(tiny_dir: Path):
    """Unseen words, digits and non-ASCII letters tokenise without unknowns and decode back."""
    tokenizer = CLIPTokenizer.from_pretrained(tiny_dir / "tokenizer")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1)
    assert len(tokenizer) <= 1000 and tokenizer.model_max_length == 77
    for text in ("xyz Pneumomediastinum 123 ñ", "Größe: 5 mm — 肺", "a\tb\n{c}"):
        ids = tokenizer(text).input_ids
        assert tokenizer.eos_token_id not in ids[1:-1], tokenizer.convert_ids_to_tokens(ids)
    ids = tokenizer("xyz Pneumomediastinum 123 ñ").input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "xyz pneumomediastinum 1 2 3 ñ"
    padded = tokenizer("chest x-ray", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77


def test_tokenizer_vocabulary_is_capped():
    """A corpus richer than the vocabulary fills it exactly; byte symbols are always kept."""
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    corpus = [" ".join("".join(rng.choice(letters, 6)) for _ in range(20)) for _ in range(300)]
    tokenizer = build_tokenizer(corpus, vocab_size=600)
    assert len(tokenizer) == 600
    assert tokenizer.unk_token_id not in tokenizer("ñ ü 9 ~", add_special_tokens=False).input_ids


def test_build_is_deterministic(tmp_path: Path):
    """Two builds with the same config give bit-identical weights; another seed does not."""
    config = TinyModelConfig(**QUICK)
    first = build_tiny_pipeline(tmp_path / "a", config, progress=False)
    second = build_tiny_pipeline(tmp_path / "b", config, progress=False)
    other = build_tiny_pipeline(tmp_path / "c", TinyModelConfig(**QUICK, seed=1), progress=False)
    files = sorted(p.relative_to(first) for p in first.rglob("*.safetensors"))
    assert len(files) == 3
    for name in files:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
        assert (first / name).read_bytes() != (other / name).read_bytes(), name
    for name in ("tokenizer/tokenizer.json", INFO_FILE):
        assert (first / name).read_text() == (second / name).read_text()


@pytest.mark.skipif(not OPEN_CXR.is_dir(), reason=f"{OPEN_CXR} is not present")
def test_vae_reconstructs_real_chest_xrays(tiny_dir: Path):
    """The autoencoder, trained on phantoms only, reconstructs real radiographs at >= 25 dB."""
    paths = sorted((OPEN_CXR / "images").glob("*.png"))
    assert len(paths) >= 100
    vae = AutoencoderKL.from_pretrained(tiny_dir, subfolder="vae")
    psnr = vae_psnr(vae, [Image.open(p) for p in paths], resolution=64)
    assert psnr >= 25.0


def test_vae_psnr_measures_reconstruction(pipeline: StableDiffusionPipeline):
    """PSNR is high for a smooth image the VAE can represent and low for pure noise."""
    ramp = Image.fromarray(np.tile(np.linspace(40, 200, 64), (64, 1)).astype(np.uint8))
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8))
    assert vae_psnr(pipeline.vae, [ramp], 64) > 30.0
    assert vae_psnr(pipeline.vae, [noise], 64) < 15.0


def test_refuses_to_overwrite(tmp_path: Path):
    """An existing folder is kept unless overwrite=True, which replaces it whole."""
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ChexmemError, match="already exists"):
        build_tiny_pipeline(out, TinyModelConfig(**QUICK), progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    build_tiny_pipeline(out, TinyModelConfig(**QUICK), progress=False, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model_index.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging folders left


def test_zero_vae_steps_keep_the_resampler_start_and_negative_is_one_line(tmp_path: Path):
    out = tmp_path / "untrained"
    build_tiny_pipeline(out, TinyModelConfig(vae_train_steps=0, vae_num_phantoms=8), False)
    assert (out / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    from tests.helpers import assert_one_line_error, run_chexmem

    bad = tmp_path / "bad"
    result = run_chexmem("model", "tiny", "--out", str(bad), "--vae_train_steps", "-1")
    assert_one_line_error(result, "vae_train_steps must be >= 0")
    assert not bad.exists()
