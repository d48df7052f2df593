"""Training-time mitigation in real tiny fine-tunes: the magnitude filter, caption augmentation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from hf_datasets.errors import ChexmemError
from mitigate.training import (
    CAPTION_AUGMENTATIONS,
    CaptionAugment,
    DropCounts,
    MagnitudeFilter,
    vocabulary_words,
)
from train.config import CAPTION_AUGMENTATIONS as CONFIG_AUGMENTATIONS
from train.config import TrainConfig
from train.tracking import read_metrics
from train.trainer import StepInputs, train

UNET_FILE = Path("unet") / "diffusion_pytorch_model.safetensors"


@pytest.fixture()
def base_args(base_args: dict) -> dict:
    """The shared fast-run options, 3 steps (the phantom train split has 33 rows)."""
    return {**base_args, "max_train_steps": 3}


def cfg(base: dict, **overrides: object) -> TrainConfig:
    return TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(tiny_model / "tokenizer")


def test_filter_settings_are_checked() -> None:
    for bad in ({}, {"threshold": 1.0, "top_fraction": 0.1}):
        with pytest.raises(ChexmemError, match="exactly one of a threshold"):
            MagnitudeFilter(**bad)
    with pytest.raises(ChexmemError, match=r"top fraction must be in \(0, 1\)"):
        MagnitudeFilter(top_fraction=1.0)
    with pytest.raises(ChexmemError, match="not both"):
        TrainConfig(memorization_filter_threshold=1.0, memorization_filter_top_fraction=0.1)
    assert set(CONFIG_AUGMENTATIONS) == set(CAPTION_AUGMENTATIONS)


def test_top_fraction_drops_floor_qb_of_the_highest_conditioned() -> None:
    magnitudes = torch.tensor([5.0, 0.0, 3.0, 9.0, 1.0, 7.0, 2.0, 8.0, 4.0, 6.0])
    conditioned = torch.ones(10, dtype=torch.bool)
    conditioned[3] = False  # CFG-dropped: never dropped, whatever its value
    drop = MagnitudeFilter(top_fraction=0.3).drop_mask(magnitudes, conditioned)
    assert drop.nonzero().flatten().tolist() == [5, 7, 9]  # floor(0.3 * 10) = 3: 8, 7, 6
    assert MagnitudeFilter(top_fraction=0.29).drop_mask(magnitudes, conditioned).sum() == 2
    assert not MagnitudeFilter(top_fraction=0.05).drop_mask(magnitudes, conditioned).any()
    few = torch.zeros(10, dtype=torch.bool)
    few[0] = True
    assert MagnitudeFilter(top_fraction=0.5).drop_mask(magnitudes, few).tolist() == [
        True,
        *[False] * 9,
    ]
    threshold = MagnitudeFilter(threshold=6.0).drop_mask(magnitudes, conditioned)
    assert threshold.nonzero().flatten().tolist() == [5, 7, 9]


def test_magnitude_equals_a_hand_recomputation_with_the_unet(base_args: dict) -> None:
    """m_t = ||eps(x_t, t, e_p) - eps(x_t, t, e_0)|| per sample, 0 where CFG dropped e_p."""
    magnitude_filter = MagnitudeFilter(threshold=math.inf)
    pairs: list[tuple[float, float]] = []

    def checked(step: StepInputs) -> torch.Tensor:
        weights = magnitude_filter(step)
        with torch.no_grad():
            for i in range(len(weights)):
                x, t = step.noisy_latents[i : i + 1], step.timesteps[i : i + 1]
                conditional = step.unet(x, t, step.encoder_hidden_states[i : i + 1]).sample
                empty = step.unet(x, t, step.empty_hidden_states).sample
                expected = (
                    0.0 if step.conditioning_dropped[i] else float((conditional - empty).norm())
                )
                pairs.append((magnitude_filter.last_magnitudes[i], expected))
        return weights

    train(cfg(base_args, max_train_steps=2, conditioning_dropout_prob=0.5), sample_weighter=checked)
    assert len(pairs) == 8
    assert any(e == 0 for _, e in pairs) and any(e > 0 for _, e in pairs)
    assert all(a == pytest.approx(e, rel=1e-4, abs=1e-6) for a, e in pairs)
    assert (magnitude_filter.seen, magnitude_filter.dropped, magnitude_filter.steps) == (8, 0, 2)


def test_threshold_zero_drops_every_conditioned_sample_and_changes_nothing(
    base_args: dict, tiny_model: Path
) -> None:
    """All dropped: loss 0 and no optimizer step; drop counts survive a resume."""
    args = {**base_args, "memorization_filter_threshold": 0.0, "conditioning_dropout_prob": 0.0}
    first = train(cfg(args))
    resumed = train(cfg(args, max_train_steps=5, resume_from_checkpoint="latest"))
    out = resumed.output_dir
    metrics = read_metrics(out / "logs")
    assert [m["loss"] for m in metrics] == [0.0] * 5
    assert [m["samples_dropped"] for m in metrics] == [4] * 5
    assert [m["samples_dropped_total"] for m in metrics] == [4, 8, 12, 16, 20]
    assert all(m["memorization_magnitude_max"] > 0 for m in metrics)
    base, trained = load_file(str(tiny_model / UNET_FILE)), load_file(str(out / UNET_FILE))
    assert all(torch.equal(base[k], trained[k]) for k in base)  # no decay, no momentum
    assert (first.samples_dropped, resumed.samples_dropped, resumed.samples_seen) == (12, 20, 20)
    run = json.loads((out / "chexmem_train.json").read_text())
    weighting = run["sample_weighting"]
    assert weighting["weighter"] == {
        "method": "magnitude_filter",
        "threshold": 0.0,
        "top_fraction": None,
        "per_timestep": False,
    }
    assert (weighting["samples_seen"], weighting["samples_dropped"]) == (20, 20)
    assert weighting["steps_all_dropped"] == 5 and weighting["drop_rate"] == 1.0
    by_copies = weighting["by_copies"]
    assert set(by_copies) <= {"1", "4"} and sum(v["seen"] for v in by_copies.values()) == 20
    per_image = json.loads((out / weighting["per_sample_file"]).read_text())
    assert sum(seen for seen, _ in per_image.values()) == 20
    assert all(seen == dropped for seen, dropped in per_image.values())


def test_infinite_threshold_is_exactly_the_unfiltered_run(base_args: dict, tmp_path: Path) -> None:
    plain = train(cfg(base_args, output_dir=str(tmp_path / "plain")))
    kept = train(
        cfg(base_args, output_dir=str(tmp_path / "inf"), memorization_filter_threshold=math.inf)
    )
    losses = [[m["loss"] for m in read_metrics(r.output_dir / "logs")] for r in (plain, kept)]
    assert losses[0] == losses[1]
    assert all(m["samples_dropped"] == 0 for m in read_metrics(kept.output_dir / "logs"))
    a, b = (load_file(str(r.output_dir / UNET_FILE)) for r in (plain, kept))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "sample_weighting" not in json.loads(
        (plain.output_dir / "chexmem_train.json").read_text()
    )


def test_top_fraction_drops_floor_qb_per_step(base_args: dict) -> None:
    config = cfg(base_args, memorization_filter_top_fraction=0.3, conditioning_dropout_prob=0.0)
    result = train(config)
    metrics = read_metrics(result.output_dir / "logs")
    assert [m["samples_dropped"] for m in metrics] == [1, 1, 1]  # floor(0.3 * 4)
    assert all(m["loss"] > 0 for m in metrics)
    assert (result.samples_seen, result.samples_dropped) == (12, 3)


def test_a_weighter_and_the_filter_flags_together_are_refused(base_args: dict) -> None:
    with pytest.raises(ChexmemError, match="not both"):
        train(
            cfg(base_args, memorization_filter_top_fraction=0.1),
            sample_weighter=lambda step: torch.ones(len(step.per_sample_loss)),
        )


def test_drop_counts_merge_and_round_trip() -> None:
    a, b = DropCounts(), DropCounts()
    a.update([True, False], ["x", "y"], [4, 1])
    b.update([True], ["x"], [4])
    merged = DropCounts.from_state(json.loads(json.dumps(a.merge(b).to_state())))
    assert (merged.seen, merged.dropped) == (3, 2)
    assert merged.by_sample == {"x": [2, 2], "y": [1, 0]}
    assert merged.summary()["by_copies"]["4"] == {"seen": 2, "dropped": 2, "drop_rate": 1.0}


def test_vocabulary_words_are_plain_words(tokenizer: CLIPTokenizer) -> None:
    words = vocabulary_words(tokenizer)
    assert len(words) > 20 and "cardiomegaly" in words
    assert all(w.isascii() and w.isalpha() and len(w) >= 2 for w in words)
    assert not any("startoftext" in w or "endoftext" in w for w in words)


def test_caption_augmentation_is_deterministic_and_does_what_it_says(
    tokenizer: CLIPTokenizer,
) -> None:
    words = vocabulary_words(tokenizer)
    caption = "Frontal PA chest radiograph of a 52-year-old woman. Cardiomegaly."
    replace = CaptionAugment("random_caption", words, prob=1.0, seed=3)
    out = replace(caption, row=7, epoch=0)
    assert out == replace(caption, row=7, epoch=0)  # pure in (seed, epoch, row)
    assert out != caption and len(out.split()) == len(caption.split())
    assert all(w in words for w in out.split())
    assert len({replace(caption, row=7, epoch=e) for e in range(5)}) == 5  # fresh per epoch
    assert replace(caption, 7, 0) != CaptionAugment("random_caption", words, 1.0, seed=4)(
        caption, 7, 0
    )
    add = CaptionAugment("random_word_addition", words, prob=1.0, num_words=3)
    added = add(caption, row=1, epoch=2).split()
    assert len(added) == len(caption.split()) + 3
    rest = iter(added)
    assert all(w in rest for w in caption.split())  # the original words, in order
    assert CaptionAugment("random_word_addition", words, prob=0.0)(caption, 1, 2) == caption
    half = CaptionAugment("random_word_addition", words, prob=0.5)
    changed = sum(half(caption, row, 0) != caption for row in range(400))
    assert 150 < changed < 250
    with pytest.raises(ChexmemError, match="must be one of random_caption"):
        CaptionAugment("shuffle", words)


def test_training_sees_augmented_captions_fresh_each_epoch_with_cached_latents(
    base_args: dict, tokenizer: CLIPTokenizer
) -> None:
    seen: list[tuple[int, int, str]] = []

    def record(step: StepInputs) -> torch.Tensor:
        epoch = step.global_step // 2  # 8 rows, batch 4: two steps per epoch
        for row, caption in zip(
            step.batch["row_index"].tolist(), step.batch["caption"], strict=True
        ):
            seen.append((epoch, row, caption))
        return torch.ones(len(step.per_sample_loss))

    config = cfg(
        base_args,
        max_train_steps=4,
        max_train_samples=8,
        cache_latents=True,
        caption_augmentation="random_caption",
        caption_augmentation_prob=1.0,
        seed=5,
    )
    train(config, sample_weighter=record)
    augment = CaptionAugment("random_caption", vocabulary_words(tokenizer), prob=1.0, seed=5)
    from train.data import load_train_dataset

    originals = load_train_dataset(config)["prompt"]
    assert sorted((e, r) for e, r, _ in seen) == [(e, r) for e in (0, 1) for r in range(8)]
    assert all(c == augment(originals[r], r, e) for e, r, c in seen)
    assert all(c != originals[r] for _, r, c in seen)
    by_epoch = {(e, r): c for e, r, c in seen}
    assert sum(by_epoch[0, r] != by_epoch[1, r] for r in range(8)) >= 7


def test_per_timestep_ranking_picks_the_outlier_not_the_noisy_timestep() -> None:
    import torch

    from mitigate.training import MagnitudeFilter

    flt = MagnitudeFilter(top_fraction=0.25, per_timestep=True, momentum=0.5)
    timesteps = torch.tensor([50, 50, 950, 950])
    for _ in range(5):  # warm up: m_t is ~4 at t = 50 and ~1 at t = 950
        flt.relative(torch.tensor([4.0, 4.0, 1.0, 1.0]), timesteps)
    # raw m_t would drop a t = 50 sample; relative to its timestep, the t = 950 one stands out
    magnitudes = torch.tensor([4.1, 3.9, 1.0, 2.0])
    ratios = flt.relative(magnitudes, timesteps)
    assert ratios[3] == pytest.approx(2.0) and ratios[0] == pytest.approx(4.1 / 4.0)
    drop = flt.drop_mask(ratios, torch.ones(4, dtype=torch.bool))
    assert drop.tolist() == [False, False, False, True]
    assert MagnitudeFilter(top_fraction=0.25).drop_mask(magnitudes, drop | True).tolist() == [
        True, False, False, False,
    ]  # fmt: skip
    assert flt.describe()["per_timestep"] is True
