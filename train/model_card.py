"""The model card (README.md) of a fine-tuned model: data, mode, trainable share, metrics."""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from train.trainer import RUN_FILE

TEMPLATE = """---
{card_data}
---

# {title}

Stable Diffusion fine-tuned on chest radiographs with [chexmem](https://github.com/) ({mode}).

| | |
|---|---|
| base model | `{base}` |
| training data | `{data}` |
| what was trained | {mode_detail} |
| trainable parameters | {trainable:,} of {total:,} ({share:.3%}) |
| classifier-free guidance | conditioning dropout {dropout} ({cfg}) |
| training-time mitigation | {mitigation} |
| steps / batch / learning rate | {steps} / {batch} x {accum} x {procs} processes / {lr} |
| resolution / mixed precision | {resolution} px / {precision} |
| final training loss | {loss:.4f} |
| wall time | {seconds:.0f} s |

## Memorization

Models trained on patient images can reproduce them. Before sharing generations or this
model, run chexmem's detection (`chexmem detect`) and copy checks against the training set,
and keep the training data's licence and consent terms in mind.

## Use

{usage}
"""


def _usage(mode: str, base: str) -> str:
    """How to load the result."""
    lines = ["```python", "from diffusers import StableDiffusionPipeline"]
    if mode == "lora":
        lines += [
            f"pipe = StableDiffusionPipeline.from_pretrained({base!r})",
            'pipe.load_lora_weights("<this folder or repo>")',
        ]
    elif mode == "subset":
        lines += [
            "from train.subset import load_subset",
            f"pipe = StableDiffusionPipeline.from_pretrained({base!r})",
            'load_subset(pipe.unet, "<this folder>")',
        ]
    else:
        lines.append('pipe = StableDiffusionPipeline.from_pretrained("<this folder or repo>")')
    return "\n".join([*lines, "```"])


def _mitigation(run: dict) -> str:
    """The memorization filter and caption augmentation of a run, with the filter's counts."""
    config = run["config"]
    parts = []
    weighting = run.get("sample_weighting")
    if weighting:
        weighter = weighting["weighter"]
        if weighter.get("method") == "magnitude_filter":
            rule = (
                f"m_t >= {weighter['threshold']}"
                if weighter.get("threshold") is not None
                else f"top {weighter['top_fraction']:.0%} of each batch"
            )
            name = f"noise-magnitude filter (drop {rule})"
        else:
            name = f"sample weighter {weighter.get('method')}"
        parts.append(
            f"{name}: {weighting['samples_dropped']:,} of {weighting['samples_seen']:,} "
            f"samples dropped ({weighting['drop_rate']:.1%})"
        )
    if config.get("caption_augmentation"):
        words = (
            f", {config['caption_augmentation_words']} word(s)"
            if config["caption_augmentation"] == "random_word_addition"
            else ""
        )
        parts.append(
            f"caption augmentation {config['caption_augmentation']} "
            f"(p {config['caption_augmentation_prob']}{words})"
        )
    return "; ".join(parts) or "none"


def study_section(metrics: dict[str, float]) -> str:
    """The memorization figures a chexmem study measured on this model, as a table."""
    rows = "\n".join(f"| {name} | {value:.4g} |" for name, value in metrics.items())
    return (
        "\n## Memorization measured by the chexmem study\n\n| measure | value |\n|---|---|\n"
        f"{rows}\n\nThe study's report (`report.html`) has the figures behind these numbers.\n"
    )


def write_model_card(output_dir: str | Path, study_metrics: dict[str, float] | None = None) -> Path:
    """Write README.md (with the study's memorization figures, when given); returns its path."""
    output_dir = Path(output_dir)
    run = json.loads((output_dir / RUN_FILE).read_text())
    config = run["config"]
    mode = config["mode"]
    base = config["pretrained_model_name_or_path"]
    data = config["train_data_dir"] or config["dataset_name"]
    detail = {
        "full": "the whole UNet"
        + (" and the text encoder" if config["train_text_encoder"] else ""),
        "lora": f"LoRA rank {config['rank']} on {', '.join(config['lora_target_modules'])}"
        + (" (+ text encoder)" if config["train_text_encoder"] else ""),
        "subset": "UNet parameters matching "
        + " ".join(str(x) for x in (config["trainable_params"], config["trainable_mask"]) if x),
    }[mode]
    if config.get("trainable_preset"):
        detail = f"preset `{config['trainable_preset']}`: {detail}"
    card_data = ModelCardData(
        library_name="diffusers",
        base_model=base if base and not Path(base).exists() else None,
        pipeline_tag="text-to-image",
        tags=["stable-diffusion", "chest-x-ray", "medical-imaging", "chexmem", mode],
        datasets=[data] if config["dataset_name"] else None,
    )
    dropout = config["conditioning_dropout_prob"]
    text = TEMPLATE.format(
        card_data=card_data.to_yaml(),
        title=f"chexmem {mode} fine-tune of {Path(base).name if base else 'Stable Diffusion'}",
        mode=mode,
        base=base,
        data=data,
        mode_detail=detail,
        trainable=run["trainable_params"],
        total=run["total_params"],
        share=run["trainable_params"] / max(1, run["total_params"]),
        dropout=dropout,
        cfg="with CFG" if dropout > 0 else "without CFG: sample with guidance_scale=1",
        steps=run["global_step"],
        batch=config["train_batch_size"],
        accum=config["gradient_accumulation_steps"],
        procs=run["num_processes"],
        lr=config["learning_rate"],
        resolution=run["resolution"],
        precision=run["mixed_precision"],
        loss=run["final_loss"],
        mitigation=_mitigation(run),
        seconds=run["seconds"],
        usage=_usage(mode, base),
    )
    if study_metrics:
        text = text.replace("\n## Use\n", study_section(study_metrics) + "\n## Use\n")
    path = output_dir / "README.md"
    ModelCard(text).save(path)
    return path
