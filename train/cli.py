"""`chexmem train` (same flags as `accelerate launch -m train`) and `chexmem model tiny`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from hf_datasets.cliutils import add_config_flag, run_command, setup_logging
from train.config import add_train_flags, config_from_args


def cmd_train(args: argparse.Namespace) -> None:
    """Run one fine-tune and say where it went."""
    from train.hub import push_output
    from train.model_card import write_model_card
    from train.trainer import train

    config = config_from_args(args)
    result = train(config)
    if result.files:
        card = write_model_card(result.output_dir)
        print(
            f"trained {result.global_step} steps in {result.seconds:.0f} s; "
            f"final loss {result.final_loss:.4f}; trained {result.trainable_share:.3%} of the "
            "parameters"
        )
        if result.samples_seen:
            print(
                f"memorization filter: dropped {result.samples_dropped} of "
                f"{result.samples_seen} samples"
            )
        print(f"saved to {result.output_dir}: {', '.join(result.files)}, {card.name}")
        if config.push_to_hub:
            print(
                "pushed to",
                push_output(result.output_dir, config.hub_model_id, private=config.hub_private),
            )


def cmd_model_tiny(args: argparse.Namespace) -> None:
    """Build the tiny offline base model."""
    import json

    from train.tiny_model import TinyModelConfig, build_tiny_pipeline

    given = {"resolution": args.resolution, "seed": args.seed}
    if args.vae_train_steps is not None:
        given["vae_train_steps"] = args.vae_train_steps
    if args.unet_channels is not None:
        given["unet_channels"] = tuple(args.unet_channels)
    config = TinyModelConfig(**given)
    out = build_tiny_pipeline(args.out, config, overwrite=args.overwrite)
    info = json.loads((out / "chexmem_tiny.json").read_text())
    psnr = {k: v for k, v in info.items() if "psnr" in k}
    print(f"built {out} ({', '.join(f'{k} {v}' for k, v in psnr.items())})")
    print(f"load it with StableDiffusionPipeline.from_pretrained({str(out)!r})")


def cmd_model_random(args: argparse.Namespace) -> None:
    """Build a random-weight pipeline at a published architecture's size."""
    import json

    from train.random_model import INFO_FILE, build_random_pipeline

    out = build_random_pipeline(
        args.out, args.configs, args.seed, args.resolution, overwrite=args.overwrite
    )
    info = json.loads((out / INFO_FILE).read_text())
    counts = ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in info["parameters"].items())
    print(f"built {out} ({counts} parameters, random weights, {info['resolution']} px)")


def add_model_command(subparsers: argparse._SubParsersAction) -> None:
    """Register `chexmem model tiny` and `chexmem model random`."""
    model = subparsers.add_parser("model", help="base models for fine-tuning")
    sub = model.add_subparsers(dest="model_command", required=True, metavar="{tiny,random}")
    p = sub.add_parser(
        "tiny", help="build the tiny offline Stable Diffusion model (the embedded default)"
    )
    p.add_argument("--out", required=True, help="output pipeline folder")
    p.add_argument(
        "--resolution",
        type=int,
        default=64,
        help="image side in pixels the model generates (default: %(default)s)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the weights and VAE training (default: %(default)s)",
    )
    p.add_argument(
        "--vae_train_steps",
        type=int,
        help="optimizer steps that train the tiny VAE on phantom crops (default: 300, "
        "TinyModelConfig's)",
    )
    p.add_argument(
        "--unet_channels",
        type=int,
        nargs="+",
        metavar="C",
        help="UNet channels per level, each a multiple of 8; they are also the width of every "
        "cross-attention value layer NEMO searches (default: 32 64 64)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_config_flag(p)
    p.set_defaults(func=cmd_model_tiny, _parser=p)

    p = sub.add_parser(
        "random",
        help="Stable Diffusion v1.5's architecture with random weights (speed and memory checks)",
        description="Build SD v1.5's UNet, VAE and CLIP text encoder from the configs in "
        "train/configs/sd15 with seeded random weights, so that training, detection and "
        "scripts/gpu_check.py run at the real size without downloading anything.",
    )
    p.add_argument("--out", required=True, help="output pipeline folder")
    p.add_argument(
        "--configs",
        default="sd15",
        help="a config folder (unet/, vae/, text_encoder/, scheduler/) or a name under "
        "train/configs (default: %(default)s)",
    )
    p.add_argument("--resolution", type=int, help="image side in pixels (default: the config's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights (default: 0)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_config_flag(p)
    p.set_defaults(func=cmd_model_random, _parser=p)


def add_train_command(subparsers: argparse._SubParsersAction) -> None:
    """Register `chexmem train`."""
    p = subparsers.add_parser(
        "train",
        help="fine-tune Stable Diffusion (full, LoRA or a parameter subset)",
        description="Fine-tune Stable Diffusion on chest X-rays. "
        "Multi-GPU: `accelerate launch -m train` with the same flags.",
    )
    add_train_flags(p)
    add_config_flag(p)
    p.set_defaults(func=cmd_train, _parser=p)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m train` / `accelerate launch -m train`: the train command alone."""
    parser = argparse.ArgumentParser(prog="accelerate launch -m train", description=__doc__)
    subparsers = parser.add_subparsers(dest="command")
    add_train_command(subparsers)
    subparsers.choices["train"].prog = parser.prog  # help reads as the command users type
    argv = ["train", *(sys.argv[1:] if argv is None else argv)]
    args = parser.parse_args(argv)
    setup_logging()
    return run_command(parser, args, argv)
