"""MemControl (Dutt et al., WACV 2025): search which UNet parameters to fine-tune.

A bi-level search. The inner loop is a short `train.trainer.train` run on the data with
injected duplicates, training only the parameters of one family inside the transformer
blocks a binary mask selects, at a sampled learning rate. The outer loop is an Optuna
multi-objective study (NSGA-II by default, random search as the baseline) that minimises,
raw, both
- memorization: Wen et al.'s magnitude ``||eps(x_t, t, e_p) - eps(x_t, t, e_0)||`` at random
  training timesteps on the duplicated rows, the max per batch, averaged over batches;
- quality: FID of generations for held-out prompts against held-out real images, with a
  named feature extractor (our findings classifier, trained once per study).

Studies live in Optuna storage (an SQLite file in the output folder by default, or any RDB
URL), so a killed search resumes where it stopped and several workers can share one
study. Every trial's whole configuration (family, mask, learning rate, base model,
trainable share) is stored with it; the Pareto front is written as a table, a plot and one
JSON file per configuration together with the command that trains it in stage 2.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from detect.classifier import ClassifierConfig, FindingsClassifier, train_classifier
from detect.magnitude import MagnitudeConfig, decode_latents, encode_prompts, noise_magnitudes
from detect.models import load_pipeline
from detect.plots import scatter_plot
from detect.quality import ClassifierFeatures, quality
from hf_datasets.errors import ChexmemError
from hf_datasets.storage import load_dataset_dir
from train.config import TrainConfig
from train.subset import FAMILIES, transformer_blocks
from train.trainer import train

logger = logging.getLogger(__name__)
SAMPLERS = ("nsga2", "random")
OBJECTIVES = ("memorization", "fid")


@dataclass
class SearchConfig:
    """One MemControl study: data, base model, search space, budget and objectives."""

    pretrained_model_name_or_path: str
    train_data_dir: str  # a saved dataset with duplicates injected (`copies` > 1)
    output_dir: str = "chexmem-search"
    families: list[str] = field(default_factory=lambda: ["attention", "cross_attention"])
    lr_min: float = 1e-5
    lr_max: float = 1e-3
    n_trials: int = 12
    sampler: str = "nsga2"
    # NSGA-II's generation size: its first generation is random sampling, so with Optuna's
    # default of 50 a 12-trial study would never evolve (4: three generations in 12 trials)
    population_size: int = 4
    storage: str | None = None  # default: sqlite:///OUTPUT_DIR/study.db
    study_name: str = "memcontrol"
    seed: int = 0
    # inner loop
    max_train_steps: int = 200
    train_batch_size: int = 8
    conditioning_dropout_prob: float = 0.1
    # objectives
    memorization_batches: int = 4  # batches of duplicated rows, each at random timesteps
    quality_split: str = "test"
    quality_generations: int = 64
    num_inference_steps: int = 25
    guidance_scale: float = 7.5

    def __post_init__(self) -> None:
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown or not self.families:
            raise ChexmemError(f"families must be among {', '.join(FAMILIES)}, got {unknown}")
        if self.sampler not in SAMPLERS:
            raise ChexmemError(f"sampler must be one of {', '.join(SAMPLERS)}")
        if not 0 < self.lr_min <= self.lr_max:
            raise ChexmemError("need 0 < lr_min <= lr_max")
        if self.n_trials < 1 or self.max_train_steps < 1 or self.population_size < 2:
            raise ChexmemError("n_trials and max_train_steps >= 1 and population_size >= 2")

    @property
    def storage_url(self) -> str:
        """Where the study lives."""
        return self.storage or f"sqlite:///{Path(self.output_dir).resolve() / 'study.db'}"


@dataclass
class TrialConfig:
    """What one trial trains: saved whole, so stage 2 can train it again anywhere."""

    family: str
    block_mask: list[int]
    learning_rate: float
    base_model: str
    blocks: list[str]

    def mask_spec(self) -> dict[str, Any]:
        """The `--trainable_mask` JSON of `chexmem train`."""
        return {"family": self.family, "block_mask": self.block_mask}


def sample_trial(trial: Any, config: SearchConfig, blocks: list[str]) -> TrialConfig:
    """Family, one bit per transformer block and a log-uniform learning rate."""
    family = trial.suggest_categorical("family", config.families)
    mask = [int(trial.suggest_categorical(f"block_{i}", [0, 1])) for i in range(len(blocks))]
    lr = trial.suggest_float("learning_rate", config.lr_min, config.lr_max, log=True)
    return TrialConfig(family, mask, lr, config.pretrained_model_name_or_path, blocks)


@dataclass
class DuplicatedInputs:
    """The duplicated rows as the UNet sees them: latents and prompt embeddings.

    The trials train UNet parameters only, so the VAE and text encoder stay the base
    model's and these are computed once per study."""

    latents: torch.Tensor
    cond: torch.Tensor
    empty: torch.Tensor


@torch.no_grad()
def duplicated_inputs(pipe: Any, dataset: Any) -> DuplicatedInputs:
    """VAE latents (posterior means) and text embeddings of each duplicated image once."""
    rows = [i for i, c in enumerate(dataset["copies"]) if c > 1]
    if not rows:
        raise ChexmemError("the training data has no duplicated rows (copies > 1) to score")
    rows = sorted({dataset[i]["prompt"]: i for i in rows}.values())  # one row per image
    images = pipe.image_processor.preprocess([dataset[i]["image"].convert("RGB") for i in rows])
    latents = pipe.vae.encode(images.to(pipe.vae.device, pipe.vae.dtype)).latent_dist.mean
    return DuplicatedInputs(
        latents * pipe.vae.config.scaling_factor,
        encode_prompts(pipe, [dataset[i]["prompt"] for i in rows]),
        encode_prompts(pipe, [""]),
    )


@torch.no_grad()
def memorization_score(
    pipe: Any, inputs: DuplicatedInputs, batches: int, batch_size: int, seed: int
) -> float:
    """Wen et al.'s magnitude at random timesteps on the duplicated rows: the max of each
    batch, averaged over `batches` batches (MemControl's memorization reward)."""
    latents, cond, empty = inputs.latents, inputs.cond, inputs.empty
    generator = torch.Generator().manual_seed(seed)
    steps = pipe.scheduler.config.num_train_timesteps
    maxima = []
    for _ in range(batches):
        pick = torch.randint(0, len(latents), (min(batch_size, len(latents)),), generator=generator)
        t = torch.randint(0, steps, (len(pick),), generator=generator)
        noise = torch.randn(latents[pick].shape, generator=generator)
        noisy = pipe.scheduler.add_noise(latents[pick], noise.to(latents), t.to(latents.device))
        t = t.to(latents.device)
        eps_c = pipe.unet(noisy, t, cond[pick], return_dict=False)[0]
        eps_u = pipe.unet(noisy, t, empty.expand(len(pick), -1, -1), return_dict=False)[0]
        maxima.append(float((eps_c - eps_u).float().flatten(1).norm(dim=1).max()))
    return float(np.mean(maxima))


def quality_score(
    pipe: Any, prompts: list[str], real: np.ndarray, extractor: Any, config: SearchConfig
) -> float:
    """FID of generations for held-out prompts against the held-out real images."""
    n = max(1, math.ceil(config.quality_generations / len(prompts)))
    magnitude = MagnitudeConfig(
        num_inference_steps=config.num_inference_steps,
        guidance_scale=config.guidance_scale,
        num_generations=n,
        seed=config.seed,
        progress=False,
    )
    latents = noise_magnitudes(pipe, prompts, magnitude, keep_final=True).final_latents
    images = decode_latents(pipe, latents[: config.quality_generations])
    return quality(real, extractor.features(images), extractor).fid


class Objective:
    """One trial: a short fine-tune of the sampled subset, then both scores."""

    def __init__(self, config: SearchConfig) -> None:
        self.config = config
        self.out = Path(config.output_dir)
        self.dataset = load_dataset_dir(config.train_data_dir)
        base = load_pipeline(config.pretrained_model_name_or_path)
        self.blocks = transformer_blocks(base.unet)
        if not self.blocks:
            raise ChexmemError("the UNet has no transformer blocks to mask")
        self.duplicated = duplicated_inputs(base, self.dataset["train"])
        self.classifier = self._classifier()
        self.extractor = ClassifierFeatures(self.classifier)
        held_out = self.dataset[config.quality_split]
        self.prompts = list(held_out["prompt"])
        self.real = self.extractor.features(list(held_out["image"]))

    def _classifier(self) -> FindingsClassifier:
        """The study's feature extractor, trained once and reused on resume."""
        folder = self.out / "classifier"
        if (folder / "config.json").is_file():
            return FindingsClassifier.load(folder)
        classifier = train_classifier(
            self.dataset, ClassifierConfig(seed=self.config.seed, feature_dim=64, progress=False)
        )
        classifier.save(folder, overwrite=True)
        return classifier

    def train_config(self, trial: TrialConfig, run_dir: Path) -> TrainConfig:
        """The inner loop's `chexmem train` settings."""
        mask_file = run_dir / "mask.json"
        run_dir.mkdir(parents=True, exist_ok=True)
        mask_file.write_text(json.dumps(trial.mask_spec()))
        return TrainConfig(
            pretrained_model_name_or_path=trial.base_model,
            train_data_dir=self.config.train_data_dir,
            output_dir=str(run_dir),
            overwrite_output_dir=True,
            mode="subset",
            trainable_mask=str(mask_file),
            learning_rate=trial.learning_rate,
            lr_scheduler="constant",
            max_train_steps=self.config.max_train_steps,
            train_batch_size=self.config.train_batch_size,
            conditioning_dropout_prob=self.config.conditioning_dropout_prob,
            checkpointing_steps=self.config.max_train_steps + 1,
            max_grad_norm=1.0,
            seed=self.config.seed,
            cache_latents=True,
            report_to="jsonl",
        )

    def __call__(self, trial: Any) -> tuple[float, float]:
        """Train, score, and record the whole configuration on the trial."""
        chosen = sample_trial(trial, self.config, self.blocks)
        trial.set_user_attr("config", asdict(chosen))
        if not any(chosen.block_mask):
            raise ChexmemError("empty block mask: nothing would train")
        start = time.perf_counter()
        run_dir = self.out / "trials" / f"trial_{trial.number:04d}"
        result = train(self.train_config(chosen, run_dir))
        trial.set_user_attr("trainable_share", result.trainable_params / result.total_params)
        pipe = load_pipeline(run_dir)
        memorization = memorization_score(
            pipe,
            self.duplicated,
            self.config.memorization_batches,
            self.config.train_batch_size,
            self.config.seed,
        )
        fid = quality_score(pipe, self.prompts, self.real, self.extractor, self.config)
        trial.set_user_attr("seconds", time.perf_counter() - start)
        if not (math.isfinite(memorization) and math.isfinite(fid)):
            raise ChexmemError(f"non-finite objectives: memorization {memorization}, FID {fid}")
        return memorization, fid


def make_study(config: SearchConfig) -> Any:
    """Create or resume the study (same name and storage: the trials so far are kept)."""
    import optuna

    sampler = (
        optuna.samplers.NSGAIISampler(population_size=config.population_size, seed=config.seed)
        if config.sampler == "nsga2"
        else optuna.samplers.RandomSampler(seed=config.seed)
    )
    Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    return optuna.create_study(
        study_name=config.study_name,
        storage=config.storage_url,
        sampler=sampler,
        directions=["minimize", "minimize"],
        load_if_exists=True,
    )


def run_search(config: SearchConfig) -> pd.DataFrame:
    """Run trials until the study holds `n_trials` finished or failed ones; write the front."""
    import optuna

    study = make_study(config)
    done = sum(t.state.is_finished() for t in study.trials)
    remaining = max(0, config.n_trials - done)
    if remaining:
        objective = Objective(config)
        # a failed trial (NaN, OOM, empty mask) is recorded as FAIL and the study goes on;
        # with several workers on one storage, each stops once the study holds n_trials
        stop = optuna.study.MaxTrialsCallback(config.n_trials, states=None)
        study.optimize(objective, n_trials=remaining, catch=(Exception,), callbacks=[stop])
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    return write_outputs(config, study, complete)


def write_outputs(config: SearchConfig, study: Any, complete: list[Any]) -> pd.DataFrame:
    """All trials, the Pareto front (table, plot, one JSON per configuration)."""
    out = Path(config.output_dir)
    table = pd.DataFrame(
        [
            {
                "trial": t.number,
                "state": t.state.name,
                "memorization": t.values[0] if t.values else np.nan,
                "fid": t.values[1] if t.values else np.nan,
                "trainable_share": t.user_attrs.get("trainable_share", np.nan),
                "seconds": t.user_attrs.get("seconds", np.nan),
                "family": t.user_attrs.get("config", {}).get("family"),
                "block_mask": t.user_attrs.get("config", {}).get("block_mask"),
                "learning_rate": t.params.get("learning_rate"),
            }
            for t in study.trials
        ]
    )
    front_ids = {t.number for t in study.best_trials} if complete else set()
    table["pareto"] = table["trial"].isin(front_ids)
    table.to_csv(out / "trials.csv", index=False)
    front_dir = out / "front"
    front_dir.mkdir(exist_ok=True)
    for t in study.trials:
        if t.number not in front_ids:
            continue
        saved = {
            **t.user_attrs["config"],
            "trainable_share": t.user_attrs.get("trainable_share"),
            "memorization": t.values[0],
            "fid": t.values[1],
            "features": "chexmem-findings-cnn (this study's classifier)",
            "trial": t.number,
        }
        path = front_dir / f"trial_{t.number:04d}.json"
        path.write_text(json.dumps(saved, indent=1))
        (front_dir / f"trial_{t.number:04d}.mask.json").write_text(
            json.dumps({"family": saved["family"], "block_mask": saved["block_mask"]})
        )
        saved["command"] = stage_two_command(config, t.number, saved["learning_rate"])
        path.write_text(json.dumps(saved, indent=1))
    if len(complete) >= 1:
        scatter_plot(
            table.loc[table["state"] == "COMPLETE", "memorization"],
            table.loc[table["state"] == "COMPLETE", "fid"],
            table.loc[table["state"] == "COMPLETE", "pareto"].map({True: "front", False: "other"}),
            out / "pareto.png",
            f"MemControl ({config.sampler}): {len(complete)} trials",
            "memorization (Wen magnitude, max per batch)",
            "FID (findings-CNN features)",
        )
    return table


def stage_two_command(config: SearchConfig, trial: int, learning_rate: float) -> str:
    """`chexmem train` with a front configuration (swap --train_data_dir to transfer it)."""
    mask = Path(config.output_dir).resolve() / "front" / f"trial_{trial:04d}.mask.json"
    return (
        f"chexmem train --pretrained_model_name_or_path {config.pretrained_model_name_or_path} "
        f"--train_data_dir {config.train_data_dir} --mode subset --trainable_mask {mask} "
        f"--learning_rate {learning_rate:.3g} --output_dir stage2-trial{trial}"
    )


def cmd_search(args: Any) -> None:
    """`chexmem search`: run (or resume) a study and write its front."""
    fields = SearchConfig.__dataclass_fields__
    config = SearchConfig(**{k: getattr(args, k) for k in fields if hasattr(args, k)})
    table = run_search(config)
    front = table[table["pareto"]]
    print(table.drop(columns=["block_mask"]).round(4).to_string(index=False))
    print(f"{len(front)} configurations on the front: {config.output_dir}/front/; study: "
          f"{config.storage_url} (run again to resume or add trials)")  # fmt: skip


def add_search_command(subparsers: Any) -> None:
    """Register `chexmem search` (flags: the fields of SearchConfig)."""
    from hf_datasets.cliutils import add_config_flag

    p = subparsers.add_parser("search", help="MemControl: search which parameters to fine-tune")
    for name, spec in SearchConfig.__dataclass_fields__.items():
        default = spec.default
        if name in ("pretrained_model_name_or_path", "train_data_dir"):
            p.add_argument(f"--{name}", required=True)
        elif name == "families":
            p.add_argument("--families", nargs="+", default=["attention", "cross_attention"],
                           choices=sorted(FAMILIES))  # fmt: skip
        elif name == "sampler":
            p.add_argument("--sampler", choices=SAMPLERS, default="nsga2")
        elif name == "storage":
            p.add_argument("--storage", help="Optuna storage URL (default: OUT/study.db)")
        else:
            p.add_argument(f"--{name}", type=type(default), default=default)
    add_config_flag(p)
    p.set_defaults(func=cmd_search, _parser=p)
