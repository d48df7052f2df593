"""NEMO on the real tiny model: layers, activations, blocking, cache, threshold, and a planted
memorization neuron that the search must find on its own."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from torchmetrics.functional.image import structural_similarity_index_measure

from detect.magnitude import encode_prompts, seed_of
from detect.neurons import (
    NemoConfig,
    ReferenceStats,
    blocked,
    calibrate_threshold,
    localize_neurons,
    localize_prompts,
    max_pairwise_similarities,
    neuron_activations,
    reference_statistics,
    value_layers,
    zero_neurons,
)
from hf_datasets.errors import ChexmemError
from tests.helpers import load_plain

FINDINGS = [
    "No acute cardiopulmonary abnormality.",
    "Cardiomegaly.",
    "Pleural effusion.",
    "Lung opacity.",
    "Edema.",
    "Atelectasis. Support devices present.",
    "Pneumonia.",
]


def report_prompts(ages: list[int]) -> list[str]:
    """Ordinary report-style prompts: both views and sexes at each age, findings cycled."""
    combos = itertools.product(ages, ("PA", "AP"), ("woman", "man"))
    return [
        f"Frontal {view} chest radiograph of a {age}-year-old {sex}. {finding}"
        for (age, view, sex), finding in zip(combos, itertools.cycle(FINDINGS), strict=False)
    ]


REFERENCE = report_prompts([23, 47, 61, 88])  # 16 non-memorized prompts: statistics, tau_mem
PLANT_PROMPTS = report_prompts([35, 52, 74])  # others, used only to build the planted neuron
HELD_OUT = "Frontal PA chest radiograph of a 66-year-old woman. Lung opacity and edema."
TRIGGER = " ".join(["fracture"] * 40)  # an odd caption, repeated as memorized ones are
TINY_LAYERS = [
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_v",
]
PLANT_LAYER, PLANT_CHANNEL = TINY_LAYERS[0], 3
FAST = NemoConfig(num_seeds=6, num_inference_steps=10, progress=False)


@pytest.fixture(scope="module")
def pipe(tiny_model: Path) -> StableDiffusionPipeline:
    return load_plain(tiny_model)


@torch.no_grad()
def plant_memorization_neuron(
    pipe: StableDiffusionPipeline, trigger: str, ordinary: list[str], layer: str, channel: int
) -> None:
    """Make `channel` of `layer` fire for `trigger` only and then fix the noise prediction.

    * W_v row `channel` becomes the trigger's mean token embedding whitened by the ordinary
      prompts' token second moments: the trigger drives it ~50x harder than they do.
    * The matching input column of the attention's to_out is scaled up, so when the channel
      fires its signal swamps the hidden state and the prediction no longer depends on x_T:
      the same for every seed, memorization's hallmark.
    * conv_out is scaled up for every prompt: the untrained UNet predicts eps of norm ~1 with
      no relation to x_T, so delta = eps - x_T would be mostly -x_T, different for every seed
      whatever the UNet computes; in a trained model eps ~ x_T cancels it instead.
    """
    tokens = encode_prompts(pipe, ordinary).flatten(0, 1)
    second_moment = tokens.T @ tokens / len(tokens)
    mean_trigger = encode_prompts(pipe, [trigger])[0].mean(dim=0)
    eye = torch.eye(len(mean_trigger))
    direction = torch.linalg.solve(second_moment + 1e-5 * eye, mean_trigger)
    pipe.unet.get_submodule(layer).weight[channel] = 30.0 * direction / direction.norm()
    attention = pipe.unet.get_submodule(layer.rsplit(".", 1)[0])
    attention.to_out[0].weight[:, channel] *= 50.0
    pipe.unet.conv_out.weight *= 300.0
    pipe.unet.conv_out.bias *= 300.0


@pytest.fixture(scope="module")
def planted(tiny_model: Path) -> tuple[StableDiffusionPipeline, ReferenceStats, float, np.ndarray]:
    """The planted model, its reference statistics, tau_mem and the references' similarities."""
    pipe = load_plain(tiny_model)
    plant_memorization_neuron(pipe, TRIGGER, PLANT_PROMPTS, PLANT_LAYER, PLANT_CHANNEL)
    reference = reference_statistics(pipe, REFERENCE, FAST)
    similarities = max_pairwise_similarities(pipe, REFERENCE, FAST)
    tau = float(similarities.mean() + similarities.std(ddof=1))
    return pipe, reference, tau, similarities


def test_value_layers_are_found_down_then_mid_then_up(pipe) -> None:
    assert value_layers(pipe.unet) == TINY_LAYERS
    with_up = value_layers(pipe.unet, include_up_blocks=True)
    assert with_up[:3] == TINY_LAYERS and len(with_up) == 7  # named_modules lists up before mid
    assert all(name.startswith("up_blocks.") for name in with_up[3:])
    other = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(16, 24, 32),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type=None,
        transformer_layers_per_block=(1, 1, 2),
        cross_attention_dim=24,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    layers = value_layers(other)
    assert [other.get_submodule(n).out_features for n in layers] == [24, 24] + [32] * 4
    assert layers[0] == "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v"
    assert layers[-1] == "down_blocks.2.attentions.1.transformer_blocks.1.attn2.to_v"
    assert len(value_layers(other, include_up_blocks=True)) == 6 + 9  # up: 3 per level
    wrapped = other.down_blocks[1].attentions[0].transformer_blocks[0].attn2
    wrapped.to_v = torch.nn.Sequential(wrapped.to_v)  # e.g. an adapter wrapping the layer
    with pytest.raises(ChexmemError, match="not a Linear layer"):
        value_layers(other)


def test_activations_are_mean_absolute_value_projections(pipe) -> None:
    embeddings = encode_prompts(pipe, REFERENCE[:3])
    activations = neuron_activations(pipe, embeddings, TINY_LAYERS)
    for name in TINY_LAYERS:
        weight = pipe.unet.get_submodule(name).weight
        expected = (embeddings @ weight.T).abs().mean(dim=1)  # over the 77 tokens
        assert activations[name].shape == (3, weight.shape[0])
        torch.testing.assert_close(activations[name], expected, rtol=1e-5, atol=1e-7)
    stats = reference_statistics(pipe, REFERENCE, FAST)
    stacked = neuron_activations(pipe, encode_prompts(pipe, REFERENCE), TINY_LAYERS)
    for name in TINY_LAYERS:
        torch.testing.assert_close(stats.mean[name], stacked[name].mean(dim=0))
        torch.testing.assert_close(stats.std[name], stacked[name].std(dim=0))
    z = stats.z_scores({name: values[0] for name, values in activations.items()})
    name = TINY_LAYERS[1]
    torch.testing.assert_close(z[name], (activations[name][0] - stats.mean[name]) / stats.std[name])


def test_blocking_zeroes_channels_only_inside_and_matches_the_permanent_edit(pipe) -> None:
    unet = pipe.unet
    neurons = {TINY_LAYERS[0]: [1, 7], TINY_LAYERS[2]: [0, 63]}
    embedding = encode_prompts(pipe, REFERENCE[:1])
    layer = unet.get_submodule(TINY_LAYERS[0])
    x = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = layer(embedding)
        before = unet(x, 500, embedding.expand(2, -1, -1)).sample
        with blocked(unet, neurons):
            inside = layer(embedding)
            hooked = unet(x, 500, embedding.expand(2, -1, -1)).sample
        after = unet(x, 500, embedding.expand(2, -1, -1)).sample
    assert torch.equal(inside[..., [1, 7]], torch.zeros_like(inside[..., [1, 7]]))
    others = [c for c in range(32) if c not in (1, 7)]
    assert torch.equal(inside[..., others], plain[..., others])
    assert not torch.allclose(hooked, before)
    assert torch.equal(after, before)  # no hook leaks out of the context
    with pytest.raises(RuntimeError), blocked(unet, neurons):
        raise RuntimeError("interrupted")
    assert all(not unet.get_submodule(n)._forward_hooks for n in TINY_LAYERS)
    edited, original = zero_neurons(unet, neurons)
    assert edited is not unet and unet.get_submodule(TINY_LAYERS[0]).weight[1].abs().sum() > 0
    assert set(original) == {f"{TINY_LAYERS[0]}.weight", f"{TINY_LAYERS[2]}.weight"}
    torch.testing.assert_close(original[f"{TINY_LAYERS[0]}.weight"], layer.weight[[1, 7]])
    with torch.no_grad():
        permanent = edited(x, 500, embedding.expand(2, -1, -1)).sample
    torch.testing.assert_close(permanent, hooked, rtol=0, atol=1e-6)
    with pytest.raises(ChexmemError, match="not a cross-attention value projection"):
        zero_neurons(unet, {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v": [0]})
    outside = {TINY_LAYERS[0]: [32]}
    with pytest.raises(ChexmemError, match=r"must lie in 0\.\.31"), blocked(unet, outside):
        pass


def test_reference_statistics_are_cached_per_model_and_prompts(tiny_model, tmp_path) -> None:
    pipe = load_plain(tiny_model)
    first = reference_statistics(pipe, REFERENCE, FAST, cache_dir=tmp_path)
    assert not first.from_cache
    assert (tmp_path / "nemo_reference.safetensors").exists()
    assert (tmp_path / "nemo_reference.json").exists()
    second = reference_statistics(pipe, REFERENCE, FAST, cache_dir=tmp_path)
    assert second.from_cache and second.num_prompts == len(REFERENCE)
    assert second.layers == first.layers and second.model_id == first.model_id
    for name in first.layers:
        assert torch.equal(first.mean[name], second.mean[name])
        assert torch.equal(first.std[name], second.std[name])
    assert not reference_statistics(pipe, REFERENCE[:-1], FAST, cache_dir=tmp_path).from_cache
    zero_neurons(pipe.unet, {TINY_LAYERS[1]: [5]}, inplace=True)  # a different model
    third = reference_statistics(pipe, REFERENCE, FAST, cache_dir=tmp_path)
    assert not third.from_cache and third.model_id != first.model_id
    assert float(third.mean[TINY_LAYERS[1]][5]) == 0.0
    assert reference_statistics(pipe, REFERENCE, FAST, cache_dir=tmp_path).from_cache


def test_threshold_is_mean_plus_std_of_max_pairwise_ssim(pipe) -> None:
    """Recomputed by hand: our own latents, UNet calls, normalisation and torchmetrics' SSIM."""
    config = NemoConfig(
        num_seeds=3, num_inference_steps=10, ssim_window=11, ssim_sigma=1.5, progress=False
    )  # torchmetrics' window for sigma 1.5 is 11
    prompts = REFERENCE[:3]
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(10)
    t = scheduler.timesteps[0]
    expected = []
    for i, prompt in enumerate(prompts):
        x = torch.cat(
            [
                torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(seed_of(i, j)))
                for j in range(3)
            ]
        )
        with torch.no_grad():
            eps = pipe.unet(x, t, encode_prompts(pipe, [prompt]).expand(3, -1, -1)).sample
        delta = eps - x
        low, high = delta.amin(dim=(2, 3), keepdim=True), delta.amax(dim=(2, 3), keepdim=True)
        delta = (delta - low) / (high - low)
        pairs = [(0, 1), (0, 2), (1, 2)]
        values = structural_similarity_index_measure(
            delta[[a for a, _ in pairs]],
            delta[[b for _, b in pairs]],
            data_range=1.0,
            sigma=1.5,
            reduction="none",
        )
        expected.append(float(values.max()))
    got = max_pairwise_similarities(pipe, prompts, config)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    tau = calibrate_threshold(pipe, prompts, config).value
    assert tau == pytest.approx(np.mean(expected) + np.std(expected, ddof=1), rel=1e-4)
    later = dataclasses.replace(config, noise_step_index=1)  # the public code's timestep
    assert calibrate_threshold(pipe, prompts, later).value != pytest.approx(tau, rel=1e-3)


def test_planted_neuron_is_found_by_selection_and_refinement(planted) -> None:
    pipe, reference, tau, similarities = planted
    z = reference.z_scores(neuron_activations(pipe, encode_prompts(pipe, [TRIGGER]), [PLANT_LAYER]))
    assert int(z[PLANT_LAYER].abs().argmax()) == PLANT_CHANNEL  # the plant works ...
    trigger_similarity = max_pairwise_similarities(pipe, [TRIGGER], FAST)[0]
    assert trigger_similarity > similarities.max() + 0.2  # ... and only for the trigger
    result = localize_neurons(pipe, TRIGGER, reference, tau, FAST)
    assert result.memorized and result.removed
    assert result.similarity == pytest.approx(trigger_similarity)
    assert len(result.kept_seeds) >= 2
    assert PLANT_CHANNEL in result.neurons.get(PLANT_LAYER, [])
    # the initial selection takes every OOD neuron of the odd prompt; refinement prunes them
    assert result.initial_neurons > 5 and result.num_neurons <= 2
    assert result.score_final <= tau < result.similarity
    assert result.similarity_after < tau  # with the neuron blocked the seeds differ again
    # blocking the whole search space meets the rule too (where not, the rule is out of reach)
    assert result.score_all_blocked <= tau
    assert -1.0 <= result.score_all_blocked <= 1.0
    ordinary = localize_neurons(pipe, HELD_OUT, reference, tau, FAST, prompt_id=1)
    assert not ordinary.memorized and ordinary.neurons == {}
    assert np.isnan(ordinary.score_all_blocked)  # nothing memorized, nothing measured


def test_top_k_rounds_find_a_neuron_that_is_not_out_of_distribution(planted) -> None:
    """With the reference spread inflated no z-score passes theta: only the top-k term can."""
    pipe, reference, tau, _ = planted
    wide = dataclasses.replace(reference, std={n: s * 1e4 for n, s in reference.std.items()})
    result = localize_neurons(pipe, TRIGGER, wide, tau, FAST)
    assert result.iterations >= 2 and result.top_k >= 1 and result.theta < FAST.theta_start
    assert result.removed and result.neurons == {PLANT_LAYER: [PLANT_CHANNEL]}


def test_report_counts_neurons_across_prompts(planted) -> None:
    pipe, reference, tau, _ = planted
    report = localize_prompts(pipe, [TRIGGER, HELD_OUT], reference, tau, FAST)
    assert list(report.summary["memorized"]) == [True, False]
    top = report.frequency.iloc[0]
    assert (top["layer"], top["neuron"], top["count"], top["fraction"]) == (
        PLANT_LAYER,
        PLANT_CHANNEL,
        1,
        0.5,
    )
    per_layer = report.per_layer.set_index("layer")
    assert list(per_layer.index) == TINY_LAYERS
    assert list(per_layer["neurons"]) == [32, 64, 64]
    assert per_layer["occurrences"].sum() == report.results[0].num_neurons
    assert per_layer.loc[PLANT_LAYER, "distinct"] >= 1


def test_bad_settings_are_one_clear_error(pipe) -> None:
    with pytest.raises(ChexmemError, match="num_seeds must be at least 2"):
        NemoConfig(num_seeds=1)
    with pytest.raises(ChexmemError, match="noise_step_index must be between"):
        NemoConfig(num_inference_steps=5, noise_step_index=5)
    with pytest.raises(ChexmemError, match="odd number"):
        NemoConfig(ssim_window=6)
    with pytest.raises(ChexmemError, match="at least 2 non-memorized"):
        reference_statistics(pipe, REFERENCE[:1], FAST)
    with pytest.raises(ChexmemError, match="at least 2 non-memorized"):
        calibrate_threshold(pipe, REFERENCE[:1], FAST)
