"""Anti-memorization guidance on the real tiny model, against a step-by-step recomputation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from detect.magnitude import GuidanceState, MagnitudeConfig, encode_prompts
from detect.similarity import NCCEmbedder, TrainingBank, ncc_features
from hf_datasets.errors import ChexmemError
from hf_datasets.storage import load_dataset_dir
from mitigate.amg import AntiMemorizationGuidance
from mitigate.base import StudySetup, generate
from mitigate.registry import make_mitigation, with_settings

CONFIG = MagnitudeConfig(num_inference_steps=4, num_generations=2, progress=False)


@pytest.fixture(scope="module")
def pipe(tiny_model: Path) -> StableDiffusionPipeline:
    """The tiny model as plain diffusers loads it."""
    return StableDiffusionPipeline.from_pretrained(tiny_model, local_files_only=True)


@pytest.fixture(scope="module")
def data(phantom_data: Path):  # type: ignore[no-untyped-def]
    """The phantom dataset's splits."""
    return load_dataset_dir(phantom_data)


def amg_of(data, **settings) -> AntiMemorizationGuidance:  # type: ignore[no-untyped-def]
    """AMG against the phantom training split, held-out: its validation split."""
    train = data["train"]
    return AntiMemorizationGuidance.from_images(
        list(train["image"]), list(train["prompt"]), list(data["validation"]["image"]), **settings
    )


def heading_for(pipe, image, scale: float, t: int, seed: int = 0) -> GuidanceState:  # type: ignore[no-untyped-def]
    """A step whose classifier-free x0 is exactly the training image's latent."""
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    a = float(scheduler.alphas_cumprod[t])
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1)
    with torch.no_grad():
        z0 = pipe.vae.encode(pixels.permute(2, 0, 1)[None]).latent_dist.mean
    z0 = z0 * pipe.vae.config.scaling_factor
    g = torch.Generator().manual_seed(seed)
    eps_u = torch.randn(z0.shape, generator=g)
    eps_c = eps_u + 0.1 * torch.randn(z0.shape, generator=g)
    guided = eps_u + scale * (eps_c - eps_u)
    x_t = math.sqrt(a) * z0 + math.sqrt(1 - a) * guided
    return GuidanceState(0, torch.tensor(t), x_t, eps_u, eps_c, scale, a, slice(0, 1), 1)


def test_one_step_equals_the_papers_terms_recomputed(pipe, data) -> None:  # type: ignore[no-untyped-def]
    train = data["train"]
    captions = ["a duplicated caption"] * len(train)  # every neighbour's caption is duplicated
    amg = amg_of(data, c1=2.0, c2=13.0, c3=5.0, lambda_start=-1e6, lambda_end=-1e6)
    amg.captions, amg._duplicated = captions, [True] * len(train)
    state = heading_for(pipe, train["image"][0], scale=7.5, t=501)
    out = amg.guide(pipe, state)
    a, s0 = state.alpha_bar, state.guidance_scale
    # x0 is the training image's latent; its NCC features as the copy detector computes them
    eps = state.classifier_free()
    x0 = (state.latents - math.sqrt(1 - a) * eps) / math.sqrt(a)
    with torch.no_grad():
        decoded = pipe.vae.decode(x0 / pipe.vae.config.scaling_factor, return_dict=False)[0]
    image = pipe.image_processor.postprocess(decoded, output_type="pil")
    expected_rows = ncc_features(image, 64)
    with torch.no_grad():
        rows = amg.features(pipe, x0).numpy()
    np.testing.assert_allclose(rows, expected_rows, atol=5e-3)  # PIL rounds to 8 bits
    bank = amg.bank.numpy()
    nearest = int(np.argmax(expected_rows @ bank.T))
    ncc = float(rows[0] @ bank[nearest])
    sigma = (ncc - amg.reference) / (1 - amg.reference)
    s1 = min(max(2.0 * sigma, 0.0), s0 - 1)
    s2 = min(max(13.0 * sigma, 0.0), s0 - s1 - 1)
    assert s1 > 0 and s2 > 0  # both terms act here
    with torch.no_grad():
        y_n = encode_prompts(pipe, [captions[nearest]])
        eps_dup = pipe.unet(state.latents, state.timestep, y_n, return_dict=False)[0]

    def similarity(x_t: torch.Tensor) -> float:
        x0 = (x_t - math.sqrt(1 - a) * eps) / math.sqrt(a)
        with torch.no_grad():
            found = float(amg.features(pipe, x0)[0] @ amg.bank[nearest])
        return (found - amg.reference) / (1 - amg.reference)

    # the dissimilarity term's gradient, along a random direction, by central differences
    direction = torch.randn(state.latents.shape, generator=torch.Generator().manual_seed(1))
    h = 1e-2
    slope = similarity(state.latents + h * direction) - similarity(state.latents - h * direction)
    slope /= 2 * h
    rest = eps - s1 * (state.eps_c - state.eps_u) - s2 * (eps_dup - state.eps_u)
    g_sim = out - rest  # what the step added beyond the two scale terms
    grad = g_sim / (5.0 * math.sqrt(1 - a))
    assert float((grad * direction).sum()) == pytest.approx(slope, rel=0.05, abs=1e-4)
    assert float(grad.norm()) > 0
    assert amg.prompt_facts() == {"guided_share": [1.0]}


def test_the_dissimilarity_term_moves_x0_away_from_its_nearest_image(pipe, data) -> None:  # type: ignore[no-untyped-def]
    amg = amg_of(data, c1=0.0, c2=0.0, c3=2.0, lambda_start=-1e6, lambda_end=-1e6)
    state = heading_for(pipe, data["train"]["image"][1], scale=7.5, t=501)
    a = state.alpha_bar
    found = []
    for eps in (state.classifier_free(), amg.guide(pipe, state)):
        x0 = (state.latents - math.sqrt(1 - a) * eps) / math.sqrt(a)
        with torch.no_grad():
            found.append(float((amg.features(pipe, x0) @ amg.bank.T).max()))
    assert found[1] < found[0]  # the guided x0 is less like its nearest training image


def test_a_closed_gate_is_classifier_free_guidance(pipe, data) -> None:  # type: ignore[no-untyped-def]
    prompts = list(data["train"]["prompt"][:2])
    amg = amg_of(data, lambda_start=10.0, lambda_end=10.0)  # sigma never exceeds 10
    plain = generate(pipe, prompts, CONFIG).result
    guided = generate(pipe, prompts, CONFIG, amg).result
    torch.testing.assert_close(guided.final_latents, plain.final_latents)
    assert amg.prompt_facts() == {"guided_share": [0.0, 0.0]}


def test_an_open_gate_changes_the_generation_and_counts_its_steps(pipe, data) -> None:  # type: ignore[no-untyped-def]
    prompts = list(data["train"]["prompt"][:3])
    amg = amg_of(data, lambda_start=-1e6, lambda_end=-1e6)
    plain = generate(pipe, prompts, CONFIG).result
    guided = generate(pipe, prompts, CONFIG, amg)
    assert not torch.allclose(guided.result.final_latents, plain.final_latents)
    assert amg.prompt_facts() == {"guided_share": [1.0, 1.0, 1.0]}
    # the detection score is still the unguided ||eps_c - eps_u|| of the first step
    np.testing.assert_allclose(guided.result.scores(1), plain.scores(1), rtol=1e-5)
    assert guided.mitigation["method"] == "amg" and guided.mitigation["bank_rows"] > 0


def test_without_captions_there_is_no_caption_term(pipe, data) -> None:  # type: ignore[no-untyped-def]
    amg = amg_of(data, lambda_start=-1e6, lambda_end=-1e6)
    plain = AntiMemorizationGuidance(bank=amg.bank, reference=amg.reference, c2=0.0,
                                     lambda_start=-1e6, lambda_end=-1e6)  # fmt: skip
    bare = AntiMemorizationGuidance(bank=amg.bank, reference=amg.reference,
                                    lambda_start=-1e6, lambda_end=-1e6)  # fmt: skip
    state = heading_for(pipe, data["train"]["image"][0], scale=7.5, t=501)
    torch.testing.assert_close(bare.guide(pipe, state), plain.guide(pipe, state))


def test_the_threshold_rises_towards_the_end_of_sampling(data) -> None:  # type: ignore[no-untyped-def]
    amg = amg_of(data)
    assert amg.threshold(999) == pytest.approx(0.3, abs=0.01)
    assert amg.threshold(0) == pytest.approx(0.4)
    assert amg.threshold(999) < amg.threshold(500) < amg.threshold(0)


def test_the_reference_is_the_held_out_median_nearest_similarity(data) -> None:  # type: ignore[no-untyped-def]
    embedder = NCCEmbedder()
    bank = TrainingBank.from_images(data["train"]["image"], embedder)
    held = embedder.embed(data["validation"]["image"])
    expected = float(np.median((held @ bank.features.T).max(axis=1)))
    assert amg_of(data).reference == pytest.approx(expected)


def test_a_study_without_training_images_has_no_amg_and_one_with_them_does(data) -> None:  # type: ignore[no-untyped-def]
    setup = StudySetup(inference_steps=4, seed=0, detection_flag=1.0, embedding_target=0.5)
    assert AntiMemorizationGuidance.study_variants(setup) == {}
    embedder = NCCEmbedder()
    setup.bank = TrainingBank.from_images(data["train"]["image"], embedder)
    setup.captions, setup.held_out_similarity = tuple(data["train"]["prompt"]), 0.7
    (method,) = AntiMemorizationGuidance.study_variants(setup).values()
    assert method.reference == 0.7 and method.size == 64 and len(method.bank) == len(data["train"])
    # a study's method_settings replace the study's setting and keep the rest
    stronger = with_settings(method, "amg", {"c3": 300.0})
    assert stronger.c3 == 300.0 and method.c3 == 200.0 and stronger.reference == 0.7
    assert with_settings(method, "amg", {}) is method
    with pytest.raises(ChexmemError, match=r"'amg' has no setting gain; it has .*c3"):
        with_settings(method, "amg", {"gain": 1.0})
    with pytest.raises(ChexmemError, match="c1, c2, c3 at least 0"):  # its own checks run again
        with_settings(method, "amg", {"c3": -1.0})


def test_amg_without_a_bank_names_what_to_give() -> None:
    with pytest.raises(ChexmemError, match="training images' NCC features"):
        make_mitigation("amg")
    with pytest.raises(ChexmemError, match="NCC features of size 32"):
        AntiMemorizationGuidance(bank=np.zeros((3, 64 * 64)), size=32)
