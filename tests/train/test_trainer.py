"""The fine-tuning loop on the real tiny model and phantom data: modes, CFG, resume, failures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from hf_datasets.errors import ChexmemError
from hf_datasets.storage import load_dataset_dir
from tests.helpers import assert_one_line_error, run_chexmem
from train.checkpoint import list_checkpoints, save_checkpoint
from train.cli import main as train_main
from train.config import TrainConfig
from train.lora import LORA_WEIGHTS
from train.subset import DELTA_FILE, MASK_FILE, load_subset
from train.tracking import read_metrics
from train.trainer import StepInputs, train


def cfg(base: dict, **overrides: object) -> TrainConfig:
    """A TrainConfig from the fixture's options with some replaced."""
    return TrainConfig(**{**base, **overrides})


def _unet_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


def _generate(
    pipe: StableDiffusionPipeline, prompt: str = "Frontal PA chest radiograph"
) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    image = pipe(prompt, num_inference_steps=2, generator=generator, output_type="pt").images
    return image


def test_full_fine_tune_writes_a_standard_pipeline(base_args: dict) -> None:
    result = train(cfg(base_args, max_train_steps=12))
    out = result.output_dir
    assert result.global_step == 12
    assert {"model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(
        result.files
    )
    losses = [m["loss"] for m in read_metrics(out / "logs")]
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) < sum(losses[:3])  # learning happens (deterministic on CPU)
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert _generate(pipe).shape == (1, 3, 64, 64)
    run = json.loads((out / "chexmem_train.json").read_text())
    assert run["trainable_params"] == sum(p.numel() for p in pipe.unet.parameters())
    assert [p.name for p in list_checkpoints(out)] == [
        "checkpoint-3",
        "checkpoint-6",
        "checkpoint-9",
        "checkpoint-12",
    ]


def test_conditioning_dropout_is_the_only_difference_between_cfg_and_no_cfg(
    base_args: dict,
) -> None:
    seen: dict[float, list[float]] = {}

    def record(p: float):
        def weighter(step: StepInputs) -> torch.Tensor:
            empty = step.empty_hidden_states.expand_as(step.encoder_hidden_states)
            dropped = (step.encoder_hidden_states - empty).abs().amax(dim=(1, 2)) == 0
            seen.setdefault(p, []).extend(dropped.float().tolist())
            return torch.ones(len(dropped))

        return weighter

    for p in (0.0, 0.5):
        args = {
            **base_args,
            "output_dir": f"{base_args['output_dir']}-{p}",
            "conditioning_dropout_prob": p,
        }
        train(cfg(args, max_train_steps=10), sample_weighter=record(p))
    assert sum(seen[0.0]) == 0
    assert 0.3 < sum(seen[0.5]) / len(seen[0.5]) < 0.7


def test_sample_weighter_drops_samples_from_the_loss(base_args: dict) -> None:
    losses: list[tuple[float, float]] = []

    def keep_first(step: StepInputs) -> torch.Tensor:
        weights = torch.zeros(len(step.per_sample_loss))
        weights[0] = 1
        losses.append((float(step.per_sample_loss[0]), 0.0))
        return weights

    result = train(cfg(base_args), sample_weighter=keep_first)
    metrics = read_metrics(result.output_dir / "logs")
    assert all(m["samples_dropped"] == 3 for m in metrics)
    assert [m["samples_dropped_total"] for m in metrics] == [3 * (i + 1) for i in range(6)]
    assert [round(m["loss"], 5) for m in metrics] == [round(a, 5) for a, _ in losses]


def test_resume_is_bit_identical_to_an_uninterrupted_run(base_args: dict, tmp_path: Path) -> None:
    args = {**base_args, "use_ema": True, "ema_decay": 0.9, "max_train_steps": 14}
    straight = train(TrainConfig(**{**args, "output_dir": str(tmp_path / "straight")}))
    interrupted = {**args, "output_dir": str(tmp_path / "resumed")}
    train(TrainConfig(**{**interrupted, "max_train_steps": 9}))  # stops after checkpoint-9
    resumed = train(cfg(interrupted, resume_from_checkpoint="latest"))
    assert resumed.global_step == 14
    a, b = _unet_weights(straight.output_dir), _unet_weights(resumed.output_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoints_total_limit_keeps_the_newest(base_args: dict) -> None:
    result = train(
        TrainConfig(**{**base_args, "max_train_steps": 12, "checkpoints_total_limit": 2})
    )
    assert [p.name for p in list_checkpoints(result.output_dir)] == [
        "checkpoint-9",
        "checkpoint-12",
    ]


def test_lora_on_unet_and_text_encoder_loads_with_diffusers(
    base_args: dict, tiny_model: Path
) -> None:
    result = train(cfg(base_args, mode="lora", rank=4, train_text_encoder=True))
    assert LORA_WEIGHTS in result.files
    keys = load_file(str(result.output_dir / LORA_WEIGHTS)).keys()
    assert any(k.startswith("unet.") for k in keys) and any(
        k.startswith("text_encoder.") for k in keys
    )
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    before = _generate(pipe)
    pipe.load_lora_weights(result.output_dir, adapter_name="cxr")
    assert not torch.allclose(before, _generate(pipe))
    pipe.set_adapters(["cxr"], adapter_weights=[0.0])
    assert torch.allclose(before, _generate(pipe), atol=1e-6)
    assert result.trainable_params < 0.2 * result.total_params


def test_subset_by_pattern_trains_exactly_those_and_saves_only_them(
    base_args: dict, tiny_model: Path
) -> None:
    result = train(cfg(base_args, mode="subset", trainable_params=[r"attn2\.to_[kv]\."]))
    delta = load_file(str(result.output_dir / DELTA_FILE))
    assert delta and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in delta)
    base = StableDiffusionPipeline.from_pretrained(tiny_model).unet
    assert sum(v.numel() for v in delta.values()) == result.trainable_params
    assert any(not torch.equal(v, base.state_dict()[k]) for k, v in delta.items())
    metadata = load_subset(base, result.output_dir)
    assert metadata["base_model"] == str(tiny_model)
    assert all(torch.equal(base.state_dict()[k], v) for k, v in delta.items())


def test_subset_with_text_encoder_saves_and_loads_the_trained_encoder(
    base_args: dict, tiny_model: Path
) -> None:
    from detect.models import SUBSET_TEXT_ENCODER_FILE, load_pipeline

    result = train(cfg(base_args, trainable_preset="cross_attention", train_text_encoder=True))
    trained = load_file(str(result.output_dir / SUBSET_TEXT_ENCODER_FILE))
    base = StableDiffusionPipeline.from_pretrained(tiny_model).text_encoder.state_dict()
    assert any(not torch.equal(v, base[k]) for k, v in trained.items())
    pipe = load_pipeline(result.output_dir)
    loaded = pipe.text_encoder.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in trained.items())


def test_element_mask_keeps_frozen_elements_bit_identical_under_weight_decay(
    base_args: dict, tiny_model: Path, tmp_path: Path
) -> None:
    from safetensors.torch import save_file

    unet = StableDiffusionPipeline.from_pretrained(tiny_model).unet
    name = next(n for n, _ in unet.named_parameters() if n.endswith("attn2.to_v.weight"))
    weight = unet.state_dict()[name]
    mask = torch.zeros_like(weight, dtype=torch.uint8)
    mask[:3] = 1  # three value-projection neurons (output channels)
    save_file({name: mask}, str(tmp_path / "mask.safetensors"))
    result = train(
        TrainConfig(
            **base_args,
            mode="subset",
            trainable_mask=str(tmp_path / "mask.safetensors"),
            adam_weight_decay=0.1,
        )
    )
    trained = load_file(str(result.output_dir / DELTA_FILE))[name]
    assert torch.equal(trained[3:], weight[3:])
    assert not torch.equal(trained[:3], weight[:3])
    assert torch.equal(load_file(str(result.output_dir / MASK_FILE))[name], mask)


def test_block_mask_file_selects_transformer_blocks(
    base_args: dict, tmp_path: Path, tiny_model: Path
) -> None:
    from train.subset import transformer_blocks

    blocks = transformer_blocks(StableDiffusionPipeline.from_pretrained(tiny_model).unet)
    spec = {"family": "attention", "block_mask": [1] + [0] * (len(blocks) - 1)}
    (tmp_path / "mask.json").write_text(json.dumps(spec))
    result = train(cfg(base_args, mode="subset", trainable_mask=str(tmp_path / "mask.json")))
    names = load_file(str(result.output_dir / DELTA_FILE)).keys()
    assert names and all(n.startswith(blocks[0] + ".") and ".attn" in n for n in names)


def test_gradient_clipping_really_clips(base_args: dict, tmp_path: Path) -> None:
    from train.models import load_components
    from train.trainer import setup_trainable

    config = cfg(base_args)
    parts = load_components(config.pretrained_model_name_or_path)
    trainable = setup_trainable(parts, config)
    latents = torch.randn(2, 4, 16, 16)
    states = parts.text_encoder(torch.zeros(2, 77, dtype=torch.long))[0]
    loss = parts.unet(latents, torch.tensor([10, 500]), states).sample.pow(2).mean() * 1e4
    loss.backward()
    accelerator = Accelerator()
    before = accelerator.clip_grad_norm_(trainable.params, 0.5)
    after = torch.norm(torch.stack([p.grad.norm() for p in trainable.params]))
    assert before > 0.5 and after == pytest.approx(0.5, rel=1e-3)
    again = accelerator.clip_grad_norm_(trainable.params, 0.5)  # the list is not exhausted
    assert again == pytest.approx(0.5, rel=1e-3)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(base_args: dict) -> None:
    def nan_after_step_4(step: StepInputs) -> torch.Tensor:
        value = float("nan") if step.global_step >= 4 else 1.0
        return torch.full((len(step.per_sample_loss),), value)

    with pytest.raises(
        ChexmemError,
        match=r"the loss became nan at step 5; the last good checkpoint is .*checkpoint-3",
    ):
        train(TrainConfig(**{**base_args, "max_train_steps": 10}), sample_weighter=nan_after_step_4)
    checkpoints = list_checkpoints(base_args["output_dir"])
    assert [c.name for c in checkpoints] == ["checkpoint-3"]
    resumed = train(
        TrainConfig(**{**base_args, "max_train_steps": 5, "resume_from_checkpoint": "latest"})
    )
    assert resumed.global_step == 5


def test_failed_checkpoint_write_leaves_no_half_checkpoint(
    base_args: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = train(cfg(base_args))
    accelerator = Accelerator()
    real_save = accelerator.save_state

    def disk_full(output_dir: str, **kwargs):
        real_save(output_dir, **kwargs)  # writes files, then the disk "fills up"
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(accelerator, "save_state", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(accelerator, result.output_dir, 99, {"global_step": 99}, None)
    names = sorted(p.name for p in result.output_dir.iterdir() if "checkpoint" in p.name)
    assert names == ["checkpoint-3", "checkpoint-6"]
    resumed = train(
        TrainConfig(**{**base_args, "max_train_steps": 8, "resume_from_checkpoint": "latest"})
    )
    assert resumed.global_step == 8


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            {"pretrained_model_name_or_path": "/nonexistent/model"},
            "model path /nonexistent/model does not exist",
        ),
        ({"train_data_dir": "/nonexistent/data"}, "does not exist"),
        ({"caption_column": "report"}, "lacks column\\(s\\) report"),
        ({"resolution": 50}, "must be a positive multiple"),
    ],
)
def test_bad_input_is_one_clear_error(base_args: dict, override: dict, message: str) -> None:
    with pytest.raises(ChexmemError, match=message):
        train(TrainConfig(**{**base_args, **override}))


def _flags(options: dict) -> list[str]:
    """TrainConfig options as `chexmem train` flags."""
    return [part for key, value in options.items() for part in (f"--{key}", str(value))]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max_train_steps", "0"], "--max_train_steps must be >= 1 (or left out"),
        (["--max_train_steps", "-5"], "--max_train_steps must be >= 1 (or left out"),
        (["--num_train_epochs", "0"], "--num_train_epochs must be >= 1, not 0"),
        (["--resolution", "50"], "--resolution 50 must be a positive multiple of 16"),
        (["--pretrained_model_name_or_path", "./nope"], "model path ./nope does not exist"),
    ],
)
def test_impossible_training_flags_stop_before_anything_is_written(
    base_args: dict, flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert train_main([*_flags(base_args), *flags]) == 2
    err = capsys.readouterr().err.strip()  # after any progress bar of the model loading
    assert [line for line in err.splitlines() if "error" in line] == [err.splitlines()[-1]]
    assert err.splitlines()[-1].startswith("chexmem: error: ") and message in err
    assert not Path(base_args["output_dir"]).exists()


def test_a_batch_larger_than_the_data_is_one_line_from_the_command_line(
    base_args: dict, phantom_data: Path
) -> None:
    rows = len(load_dataset_dir(phantom_data)["train"])
    options = {**base_args, "train_batch_size": 500, "max_train_steps": 1}
    result = run_chexmem("train", *_flags(options))
    assert_one_line_error(result, f"--train_batch_size 500 is larger than the {rows} training rows")
    assert not Path(base_args["output_dir"]).exists()


def test_not_a_pipeline_folder(base_args: dict, tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    with pytest.raises(ChexmemError, match="not a diffusers pipeline folder"):
        train(
            TrainConfig(**{**base_args, "pretrained_model_name_or_path": str(tmp_path / "model")})
        )
    (tmp_path / "model" / "model_index.json").write_text(
        '{"_class_name": "FluxPipeline", "transformer": ["diffusers", "X"]}'
    )
    with pytest.raises(ChexmemError, match=r"trains Stable Diffusion 1\.x / 2\.x"):
        train(
            TrainConfig(**{**base_args, "pretrained_model_name_or_path": str(tmp_path / "model")})
        )


def test_existing_run_is_not_overwritten_silently(base_args: dict) -> None:
    train(cfg(base_args))
    with pytest.raises(ChexmemError, match="already holds a training run"):
        train(cfg(base_args))
    assert train(cfg(base_args, overwrite_output_dir=True)).global_step == 6


def test_cached_latents_train_the_same_model_as_encoding_every_step(
    base_args: dict, tmp_path: Path
) -> None:
    """--cache_latents draws the same latents from the same posterior: the same run.

    Only float rounding differs (images are encoded in other batches), so losses agree to
    1e-5 and weights to less than one Adam step (lr) per element.
    """
    encoded = train(cfg(base_args, output_dir=str(tmp_path / "encoded"), center_crop=True))
    cached = train(cfg(base_args, output_dir=str(tmp_path / "cached"), cache_latents=True))
    losses = [
        torch.tensor([m["loss"] for m in read_metrics(r.output_dir / "logs")])
        for r in (encoded, cached)
    ]
    assert torch.allclose(losses[0], losses[1], rtol=1e-5)
    a, b = _unet_weights(encoded.output_dir), _unet_weights(cached.output_dir)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < base_args["learning_rate"]
    with pytest.raises(ChexmemError, match="cannot be combined with --random_flip"):
        cfg(base_args, cache_latents=True, random_flip=True)


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


@pytest.mark.skipif(_importable("bitsandbytes"), reason="bitsandbytes is installed here")
def test_8bit_adam_without_bitsandbytes_says_what_to_install(base_args: dict) -> None:
    with pytest.raises(ChexmemError, match=r"--use_8bit_adam needs bitsandbytes: pip install"):
        train(cfg(base_args, use_8bit_adam=True))


@pytest.mark.skipif(
    _importable("xformers") and torch.cuda.is_available(), reason="xformers can run here"
)
def test_xformers_where_it_cannot_run_is_one_clear_error(base_args: dict) -> None:
    with pytest.raises(ChexmemError, match="xformers is not usable here") as error:
        train(cfg(base_args, enable_xformers_memory_efficient_attention=True))
    assert "\n" not in str(error.value)
