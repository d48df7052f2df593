"""Unified concept editing of memorized prompts, on the real tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from detect.magnitude import MagnitudeConfig, encode_prompts
from hf_datasets.errors import ChexmemError
from hf_datasets.storage import load_dataset_dir
from mitigate.base import StudySetup, generate
from mitigate.registry import make_mitigation
from mitigate.uce import (
    ConceptEdit,
    cross_attention_projections,
    edited_weight,
    final_token_embeddings,
)

CONFIG = MagnitudeConfig(num_inference_steps=3, num_generations=2, progress=False)


@pytest.fixture(scope="module")
def pipe(tiny_model: Path) -> StableDiffusionPipeline:
    """The tiny model as plain diffusers loads it."""
    return StableDiffusionPipeline.from_pretrained(tiny_model, local_files_only=True)


@pytest.fixture(scope="module")
def prompts(phantom_data: Path) -> list[str]:
    """Distinct training prompts of the phantom data."""
    return list(dict.fromkeys(load_dataset_dir(phantom_data)["train"]["prompt"]))


def test_the_closed_form_is_the_least_squares_solution_it_claims() -> None:
    torch.manual_seed(0)
    w = torch.randn(6, 4)
    erase = [(torch.randn(3, 4), torch.randn(3, 4)), (torch.randn(2, 4), torch.randn(2, 4))]
    preserve = [torch.randn(5, 4)]
    lamb, e, p = 0.1, 1.0, 0.1
    new = edited_weight(w, erase, preserve, lamb, e, p)

    def objective(m: torch.Tensor) -> torch.Tensor:
        """UCE's loss: erased tokens to their targets, preserved ones and W itself kept."""
        loss = lamb * ((m - w) ** 2).sum()
        for c, t in erase:
            loss = loss + e * ((c @ m.T - t @ w.T) ** 2).sum()
        for c in preserve:
            loss = loss + p * ((c @ m.T - c @ w.T) ** 2).sum()
        return loss

    m = new.clone().requires_grad_(True)
    objective(m).backward()
    assert m.grad.abs().max() < 1e-4  # the stationary point of a convex quadratic: its minimum
    assert objective(new) < objective(w)
    # a heavy erase weight sends each erased token to its target's projection
    strong = edited_weight(w, erase[:1], [], 1e-6, 1.0, 0.0)
    assert torch.allclose(erase[0][0] @ strong.T, erase[0][1] @ w.T, atol=1e-3)


def test_the_edit_maps_erased_prompts_to_the_empty_prompt_and_keeps_the_others(
    pipe: StableDiffusionPipeline, prompts: list[str]
) -> None:
    erased, kept = prompts[:2], prompts[2:12]
    method = ConceptEdit(prompts=tuple(erased), preserve_prompts=tuple(kept))
    edited = method.edited_weights(pipe)
    layers = cross_attention_projections(pipe.unet)
    assert set(edited) == set(layers) and len(layers) >= 2
    (target,) = final_token_embeddings(pipe, [""])
    tokens = final_token_embeddings(pipe, erased)
    whole, others = encode_prompts(pipe, erased).float(), encode_prompts(pipe, kept).float()
    for name, layer in layers.items():
        w = layer.weight.detach()
        for c in tokens:
            c, t = c[: len(target)], target[: len(c)]
            before = (c @ w.T - t @ w.T).norm()
            after = (c @ edited[name].T - t @ w.T).norm()
            assert after < 0.5 * before  # the flagged prompt now looks like the empty one

        def moved(x: torch.Tensor) -> torch.Tensor:
            """How far the edit moves these prompts' projections, relative to their size."""
            return (x @ edited[name].T - x @ w.T).norm() / (x @ w.T).norm()  # noqa: B023

        assert moved(others) < 0.8 * moved(whole)  # the preserved prompts move less


def test_active_restores_the_weights_and_apply_generates_what_active_does(
    pipe: StableDiffusionPipeline, prompts: list[str], tiny_model: Path
) -> None:
    method = make_mitigation(
        "uce", prompts=tuple(prompts[:2]), preserve_prompts=tuple(prompts[2:8])
    )
    before = {
        n: m.weight.detach().clone() for n, m in cross_attention_projections(pipe.unet).items()
    }
    ids = [0, 1, 2]
    batch = prompts[:2] + prompts[9:10]
    mitigated = generate(pipe, batch, CONFIG, method, ids)
    for name, layer in cross_attention_projections(pipe.unet).items():
        assert torch.equal(layer.weight, before[name])
    plain = generate(pipe, batch, CONFIG, make_mitigation("none"), ids)
    assert not torch.allclose(mitigated.result.final_latents, plain.result.final_latents)
    edited = method.apply(
        StableDiffusionPipeline.from_pretrained(tiny_model, local_files_only=True)
    )
    permanent = generate(edited, batch, CONFIG, make_mitigation("none"), ids)
    assert torch.allclose(permanent.result.final_latents, mitigated.result.final_latents, atol=1e-5)
    assert method.describe() == {
        "method": "uce", "prompts": 2, "target_prompt": "", "preserve_prompts": 6, "lamb": 0.1,
        "erase_scale": 1.0, "preserve_scale": 0.1, "edit_keys": True, "erase_tokens": "final",
    }  # fmt: skip


def test_the_study_erases_its_flagged_prompts_and_preserves_none_it_scores() -> None:
    captions = ("a", "b", "c", "d", "d", "e")
    setup = StudySetup(3, 0, 1.0, 0.5, captions=captions, flagged_prompts=("a",),
                       evaluated_prompts=("a", "b"))  # fmt: skip
    (method,) = ConceptEdit.study_variants(setup).values()
    assert method.prompts == ("a",) and method.preserve_prompts == ("c", "d", "e")
    assert ConceptEdit.study_variants(StudySetup(3, 0, 1.0, 0.5, captions=captions)) == {}


def test_bad_settings_say_what_to_fix() -> None:
    with pytest.raises(ChexmemError, match="prompts to erase"):
        make_mitigation("uce")
    with pytest.raises(ChexmemError, match=">= 0"):
        ConceptEdit(prompts=("a",), lamb=-1.0)
    with pytest.raises(ChexmemError, match="final or all"):
        ConceptEdit(prompts=("a",), erase_tokens="first")


def test_erasing_all_tokens_moves_every_token_after_bos_towards_the_target(
    pipe: StableDiffusionPipeline, prompts: list[str]
) -> None:
    method = ConceptEdit(prompts=(prompts[0],), target_prompt="Frontal chest radiograph.",
                         erase_tokens="all")  # fmt: skip
    edited = method.edited_weights(pipe)
    erased, target = encode_prompts(pipe, [prompts[0], method.target_prompt]).float()[:, 1:]
    for name, layer in cross_attention_projections(pipe.unet).items():
        w = layer.weight.detach()
        before = (erased @ w.T - target @ w.T).norm()
        assert (erased @ edited[name].T - target @ w.T).norm() < 0.5 * before
