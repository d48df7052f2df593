"""Neuron deactivation on the real tiny model: hooks that never leak, per-prompt blocking, JSON,
a pruned model that generates what the hook generates, and robustness to embedding noise."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from detect.magnitude import MagnitudeConfig, decode_latents, encode_prompts
from detect.models import RUN_FILE, load_pipeline
from detect.neurons import NemoReport, NeuronResult, neuron_frequencies, value_layers, zero_neurons
from detect.similarity import NCCEmbedder, TrainingBank, match_generations
from hf_datasets.errors import ChexmemError
from mitigate.base import generate
from mitigate.neurons import (
    PRUNED_FILE,
    NeuronDeactivation,
    PerturbedEmbedding,
    perturb_embeddings,
    perturbation_robustness,
    prune_model,
)
from mitigate.registry import make_mitigation
from tests.helpers import load_plain

LAYERS = [
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_v",
]
NEURONS = {LAYERS[0]: [1, 7], LAYERS[2]: [0, 63]}
PROMPTS = [
    "Frontal PA chest radiograph of a 52-year-old woman. Cardiomegaly.",
    "Frontal AP chest radiograph of a 71-year-old man. Pleural effusion.",
]
FAST = MagnitudeConfig(num_inference_steps=4, num_generations=2, progress=False)


@pytest.fixture(scope="module")
def pipe(tiny_model: Path) -> StableDiffusionPipeline:
    return load_plain(tiny_model)


def run(pipe, prompts, mitigation=None, ids=None, config=FAST):
    """Magnitudes and final latents of a generation."""
    result = generate(pipe, prompts, config, mitigation, ids).result
    return torch.tensor(result.table["magnitude"].to_numpy()), result.final_latents


def hooks_left(unet: torch.nn.Module) -> int:
    """Forward (pre-)hooks on any module of the UNet."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in unet.modules())


def assert_same(a: tuple, b: tuple, atol: float = 1e-5) -> None:
    """Two generations agree: magnitudes and final latents."""
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=atol, check_dtype=False)


def test_blocking_changes_only_the_chosen_channels_and_never_leaks(pipe) -> None:
    unet = pipe.unet
    weights = {k: v.clone() for k, v in unet.state_dict().items()}
    embedding = encode_prompts(pipe, PROMPTS[:1])
    plain = {name: unet.get_submodule(name)(embedding) for name in value_layers(unet, True)}
    mitigation = make_mitigation("neurons", neurons={LAYERS[0]: [7, 1, 1]})
    assert mitigation.neurons == {LAYERS[0]: [1, 7]}
    with torch.no_grad(), mitigation.active(pipe):
        inside = {name: unet.get_submodule(name)(embedding) for name in plain}
    for name, value in inside.items():
        if name == LAYERS[0]:
            assert torch.equal(value[..., [1, 7]], torch.zeros_like(value[..., [1, 7]]))
            others = [c for c in range(value.shape[-1]) if c not in (1, 7)]
            assert torch.equal(value[..., others], plain[name][..., others])
        else:
            assert torch.equal(value, plain[name])  # every other layer untouched
    before = run(pipe, PROMPTS)
    hooked = run(pipe, PROMPTS, mitigation)
    assert not torch.allclose(hooked[1], before[1])
    with pytest.raises(RuntimeError, match="interrupted"), mitigation.active(pipe):
        raise RuntimeError("interrupted")
    assert hooks_left(unet) == 0
    assert all(torch.equal(v, weights[k]) for k, v in unet.state_dict().items())
    assert_same(run(pipe, PROMPTS), before, atol=0)
    assert mitigation.describe() == {
        "method": "neurons",
        "mode": "union",
        "num_neurons": 2,
        "num_layers": 1,
        "num_prompts": 0,
    }
    with pytest.raises(ChexmemError, match="not a cross-attention value projection"):
        NeuronDeactivation({"conv_in": [0]}).active(pipe).__enter__()
    with pytest.raises(ChexmemError, match="mode must be one of"):
        NeuronDeactivation(mode="each")
    with pytest.raises(ChexmemError, match="must be integers"):
        NeuronDeactivation({LAYERS[0]: [1.5]})


def report_of(results: list[NeuronResult]) -> NemoReport:
    """A NEMO report of hand-written results, its tables made as `localize_prompts` makes them."""
    frequency, per_layer = neuron_frequencies(results, {name: 64 for name in LAYERS})
    return NemoReport(results, pd.DataFrame(), frequency, per_layer)


def result(prompt: str, prompt_id: int, neurons: dict, memorized: bool = True) -> NeuronResult:
    """One prompt's NEMO outcome."""
    return NeuronResult(
        prompt, prompt_id, neurons, memorized, memorized, 0.9, 0.1, 0.1, 0.1, 5, 1, 5.0, 0
    )


def test_union_of_a_report_and_per_prompt_blocking(pipe) -> None:
    third = "Frontal PA chest radiograph of a 30-year-old man. No finding."
    report = report_of(
        [
            result(PROMPTS[0], 0, {LAYERS[0]: [1, 3], LAYERS[2]: [5]}),
            result(PROMPTS[1], 1, {LAYERS[0]: [3], LAYERS[1]: [2]}),
            result(third, 2, {}, memorized=False),
        ]
    )
    union = NeuronDeactivation.from_report(report)
    assert union.union() == {LAYERS[0]: [1, 3], LAYERS[2]: [5], LAYERS[1]: [2]}
    assert set(union.per_prompt) == set(PROMPTS) and union.for_prompt(third) == union.union()
    assert NeuronDeactivation.from_report(report, min_frequency=2).union() == {LAYERS[0]: [3]}
    assert NeuronDeactivation.from_report(report, min_frequency=3).union() == {}
    with pytest.raises(ChexmemError, match="min_frequency"):
        NeuronDeactivation.from_report(report, min_frequency=0)
    # union mode: one set for everyone, as the hook on a deployed model
    assert_same(run(pipe, PROMPTS, union), run(pipe, PROMPTS, NeuronDeactivation(union.union())))
    # per-prompt mode: each prompt's own set, even in one batch with the other prompt
    own = NeuronDeactivation.from_report(report, mode="per_prompt")
    batched = run(pipe, [*PROMPTS, third], own)
    alone = [
        run(pipe, [p], NeuronDeactivation(own.for_prompt(p)), [i])
        for i, p in enumerate([*PROMPTS, third])
    ]
    assert own.for_prompt(third) == {}
    for k, (magnitudes, latents) in enumerate(alone):
        rows = slice(k * 2 * FAST.num_inference_steps, (k + 1) * 2 * FAST.num_inference_steps)
        assert_same((batched[0][rows], batched[1][2 * k : 2 * k + 2]), (magnitudes, latents))
    assert not torch.allclose(alone[0][1], run(pipe, PROMPTS[:1], union)[1])  # own set != union
    assert not torch.allclose(alone[2][1], run(pipe, [third], union, [2])[1])
    # diffusers' own call (conditioning passed by name, its own guided batch) is recognised too
    stock = {}
    for name, mitigation in (
        ("own", own),
        ("alone", NeuronDeactivation(own.for_prompt(PROMPTS[1]))),
    ):
        with mitigation.active(pipe):
            stock[name] = pipe(
                PROMPTS[1], num_inference_steps=3, output_type="latent",
                generator=torch.Generator().manual_seed(0),
            ).images  # fmt: skip
    torch.testing.assert_close(stock["own"], stock["alone"], rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match="interrupted"), own.active(pipe):
        raise RuntimeError("interrupted")
    wrong = NeuronDeactivation(NEURONS, {PROMPTS[0]: {LAYERS[0]: [99]}}, mode="per_prompt")
    with pytest.raises(ChexmemError, match=r"must lie in 0\.\.31"), wrong.active(pipe):
        pass
    assert hooks_left(pipe.unet) == 0


def test_json_round_trip_and_the_files_chexmem_writes(tmp_path) -> None:
    mitigation = NeuronDeactivation(NEURONS, {PROMPTS[0]: {LAYERS[1]: [4]}})
    path = mitigation.to_json(tmp_path / "sets" / "neurons-union.json")
    assert json.loads(path.read_text()) == {**NEURONS, LAYERS[1]: [4]}
    assert NeuronDeactivation.from_json(path).neurons == mitigation.union()
    # `chexmem neurons` writes one set per prompt id under "neurons", next to its settings
    cli = {"tau_mem": 0.4, "neurons": {"0": {LAYERS[0]: [1]}, "5": {}, "7": NEURONS}}
    (tmp_path / "neurons.json").write_text(json.dumps(cli))
    assert NeuronDeactivation.from_json(tmp_path / "neurons.json").neurons == NEURONS
    assert NeuronDeactivation.from_json(tmp_path).neurons == NEURONS  # its output folder
    # only the neurons found in at least 2 prompts
    assert NeuronDeactivation.from_json(tmp_path, min_frequency=2).neurons == {LAYERS[0]: [1]}
    with pytest.raises(ChexmemError, match="one per prompt"):
        NeuronDeactivation.from_json(path, min_frequency=2)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ChexmemError, match="cannot read neurons"):
        NeuronDeactivation.from_json(tmp_path / "bad.json")
    (tmp_path / "odd.json").write_text(json.dumps({LAYERS[0]: "1, 2"}))
    with pytest.raises(ChexmemError, match="list of channels"):
        NeuronDeactivation.from_json(tmp_path / "odd.json")
    with pytest.raises(ChexmemError, match="no neuron file"):
        NeuronDeactivation.from_json(tmp_path / "missing.json")


def test_chexmem_mitigate_prune(tiny_model, tmp_path) -> None:
    from scripts.cli import main

    (tmp_path / "n.json").write_text(json.dumps(NEURONS))
    out = tmp_path / "pruned"
    args = ["mitigate", "prune", "--model", str(tiny_model), "--neurons", str(tmp_path / "n.json")]
    assert main([*args, "--output_dir", str(out)]) == 0
    assert json.loads((out / PRUNED_FILE).read_text())["count"] == 4
    assert main([*args, "--output_dir", str(out)]) == 2  # refuses to overwrite
    assert main([*args, "--output_dir", str(out), "--overwrite"]) == 0


def test_pruned_model_loads_with_diffusers_and_equals_the_hook(pipe, tiny_model, tmp_path) -> None:
    out = prune_model(tiny_model, NEURONS, tmp_path / "pruned")
    record = json.loads((out / PRUNED_FILE).read_text())
    assert record["neurons"] == NEURONS and record["count"] == 4
    assert record["source"] == str(tiny_model) and not record["bias_zeroed"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]  # no temporary folder left
    pruned = load_plain(out)
    weight = pruned.unet.get_submodule(LAYERS[0]).weight
    assert weight[[1, 7]].abs().sum() == 0 and weight[0].abs().sum() > 0
    assert_same(run(pruned, PROMPTS), run(pipe, PROMPTS, NeuronDeactivation(NEURONS)))
    assert NeuronDeactivation.from_json(out / PRUNED_FILE).neurons == NEURONS
    with pytest.raises(ChexmemError, match="not empty; pass overwrite=True"):
        prune_model(tiny_model, {LAYERS[1]: [0]}, out)
    prune_model(tiny_model, {LAYERS[1]: [0]}, out, overwrite=True)
    assert json.loads((out / PRUNED_FILE).read_text())["neurons"] == {LAYERS[1]: [0]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]


def test_with_a_bias_the_permanent_edit_still_equals_the_hook(tiny_model) -> None:
    """zero_neurons zeroes the bias entries too; zeroing the W_v rows alone would not do."""
    biased = load_plain(tiny_model)
    attention = biased.unet.get_submodule(LAYERS[0].rsplit(".", 1)[0])
    old = attention.to_v
    attention.to_v = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        attention.to_v.weight.copy_(old.weight)
        attention.to_v.bias.copy_(torch.linspace(-2, 2, old.out_features))
    neurons = {LAYERS[0]: [1, 7]}
    hooked = run(biased, PROMPTS, NeuronDeactivation(neurons))
    edited, original = zero_neurons(biased.unet, neurons)
    assert set(original) == {f"{LAYERS[0]}.weight", f"{LAYERS[0]}.bias"}
    assert_same(
        run(StableDiffusionPipeline(**{**biased.components, "unet": edited}), PROMPTS), hooked
    )
    with torch.no_grad():
        attention.to_v.weight[[1, 7]] = 0  # rows only: the bias still flows through
    assert not torch.allclose(run(biased, PROMPTS)[1], hooked[1], atol=1e-3)


def test_pruning_a_lora_fuses_it_first(pipe, tiny_model, tmp_path) -> None:
    from peft import LoraConfig

    from train.lora import save_lora

    tuned = load_plain(tiny_model)
    tuned.unet.add_adapter(LoraConfig(r=2, target_modules=["to_v", "to_q"]))
    with torch.no_grad():
        for name, parameter in tuned.unet.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.5 * torch.randn_like(parameter))
    lora = tmp_path / "lora"
    save_lora(tuned.unet, None, lora)
    config = {"config": {"pretrained_model_name_or_path": str(tiny_model)}}
    (lora / RUN_FILE).write_text(json.dumps(config))
    out = prune_model(lora, NEURONS, tmp_path / "pruned")
    assert json.loads((out / PRUNED_FILE).read_text())["lora_fused"]
    reference = load_pipeline(lora)
    reference.fuse_lora()
    reference.unload_lora_weights()
    expected = run(reference, PROMPTS, NeuronDeactivation(NEURONS))
    assert_same(run(load_plain(out), PROMPTS), expected)
    assert not torch.allclose(expected[1], run(pipe, PROMPTS, NeuronDeactivation(NEURONS))[1])
    with pytest.raises(ChexmemError, match="carries a LoRA adapter; fuse it first"):
        NeuronDeactivation(NEURONS).active(load_pipeline(lora))


def test_a_failed_prune_leaves_no_folder(tiny_model, tmp_path, monkeypatch) -> None:
    out = tmp_path / "models" / "pruned"
    with pytest.raises(ChexmemError, match="not a cross-attention value projection"):
        prune_model(tiny_model, {"down_blocks.0.attentions.0.proj_in": [0]}, out)
    with pytest.raises(ChexmemError, match=r"must lie in 0\.\.31"):
        prune_model(tiny_model, {LAYERS[0]: [32]}, out)
    with pytest.raises(ChexmemError, match="neuron set is empty"):
        prune_model(tiny_model, {LAYERS[0]: []}, out)
    assert not out.exists()

    def disk_full(self, folder, **kwargs):
        Path(folder, "unet").mkdir(parents=True)
        Path(folder, "unet", "half.safetensors").write_bytes(b"\0" * 10)
        raise OSError("No space left on device")

    monkeypatch.setattr(StableDiffusionPipeline, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space"):
        prune_model(tiny_model, NEURONS, out)
    assert list(out.parent.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(ChexmemError, match="is a file"):
        prune_model(tiny_model, NEURONS, tmp_path / "file")


def test_embedding_noise_is_relative_seeded_and_spares_bos(pipe) -> None:
    embedding = encode_prompts(pipe, PROMPTS)
    noisy = perturb_embeddings(embedding, 0.1, [0, 1], seed=3)
    assert torch.equal(noisy[:, 0], embedding[:, 0])
    ratio = (noisy - embedding)[:, 1:].norm(dim=-1) / embedding[:, 1:].norm(dim=-1)
    assert float(ratio.mean()) == pytest.approx(0.1, rel=0.05)
    assert torch.equal(perturb_embeddings(embedding[1:], 0.1, [1], seed=3), noisy[1:])
    twice = perturb_embeddings(embedding, 0.2, [0, 1], seed=3) - embedding
    torch.testing.assert_close(twice, 2 * (noisy - embedding))  # one direction, scaled
    assert not torch.equal(perturb_embeddings(embedding, 0.1, [0, 1], seed=4), noisy)
    assert torch.equal(perturb_embeddings(embedding, 0.0, [0, 1]), embedding)


def test_robustness_rows_and_sigma_zero_is_plain_blocking(pipe) -> None:
    table = perturbation_robustness(pipe, PROMPTS, NEURONS, sigmas=(0.0, 0.1), config=FAST)
    assert len(table) == 2 * 2 * 2
    assert list(table[["prompt_id", "sigma", "pruned"]].itertuples(index=False, name=None)) == [
        (i, s, p) for i in (0, 1) for s in (0.0, 0.1) for p in (False, True)
    ]
    assert table["nearest_similarity"].isna().all()
    blocked = generate(pipe, PROMPTS, FAST, NeuronDeactivation(NEURONS)).result.scores()
    plain = generate(pipe, PROMPTS, FAST).result.scores()
    zero = table[table["sigma"] == 0].set_index(["prompt_id", "pruned"])["score"]
    np.testing.assert_allclose([zero[(i, True)] for i in (0, 1)], blocked.to_numpy(), rtol=1e-6)
    np.testing.assert_allclose([zero[(i, False)] for i in (0, 1)], plain.to_numpy(), rtol=1e-6)
    noisy = table[table["sigma"] == 0.1].set_index(["prompt_id", "pruned"])["score"]
    assert not np.allclose(noisy.to_numpy(), zero.to_numpy())
    assert hooks_left(pipe.unet) == 0


def test_robustness_with_a_training_bank_matches_the_generations(pipe) -> None:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)) for _ in range(3)]
    bank = TrainingBank.from_images(images, NCCEmbedder(), patient_ids=["a", "b", "c"])
    table = perturbation_robustness(
        pipe, PROMPTS, NEURONS, sigmas=(0.0,), config=FAST, bank=bank, own_index=[0, 2]
    )
    assert len(table) == 4 and table[["nearest_similarity", "own_similarity"]].notna().all().all()
    assert (table["own_similarity"] <= table["nearest_similarity"] + 1e-6).all()
    mitigation = PerturbedEmbedding(0.0, 0, NeuronDeactivation(NEURONS))
    latents = generate(pipe, PROMPTS, FAST, mitigation).result.final_latents
    matches = match_generations(
        decode_latents(pipe, latents), bank, [0, 0, 1, 1], embedder=NCCEmbedder()
    )
    expected = matches.groupby("prompt_id")["nearest_similarity"].max().to_numpy()
    got = table[table["pruned"]]["nearest_similarity"].to_numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert mitigation.describe()["hooks"]["num_neurons"] == 4
    with pytest.raises(ChexmemError, match="own_index has 1 entries"):
        perturbation_robustness(pipe, PROMPTS, NEURONS, config=FAST, bank=bank, own_index=[0])
