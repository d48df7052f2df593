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

Any other objectives plug in by name (`OBJECTIVES`: memorization, fid, kid, copy_rate,
trainable_share; or "package.module:function" taking a `TrialContext`). Families: the
subsets of `train.subset.FAMILIES` inside the chosen blocks, LoRA adapters of a sampled
rank inside them, or DiffFit scales.

Studies live in Optuna storage (an SQLite file in the output folder by default, or any RDB
URL), so a killed search resumes where it stopped and several workers can share one
study: under `accelerate launch` / torchrun each process is an independent worker on its
own GPU. Every trial's whole configuration (family, mask, learning rate, base model,
trainable share) is stored with it; the Pareto front is written as a table, a plot and one
JSON file per configuration together with the command that trains it in stage 2.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import math
import os
import random
import socket
import time
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from filelock import FileLock

from detect.classifier import ClassifierConfig, FindingsClassifier, train_classifier
from detect.magnitude import MagnitudeConfig, decode_latents, encode_prompts, noise_magnitudes
from detect.models import load_pipeline
from detect.plots import scatter_plot
from detect.quality import ClassifierFeatures, QualityResult, quality
from detect.similarity import NCCEmbedder, calibrate_threshold, similarity_to
from hf_datasets.errors import ChexmemError
from hf_datasets.storage import load_dataset_dir
from train.config import TrainConfig
from train.subset import FAMILIES, LORA_FAMILY, transformer_blocks
from train.trainer import TrainResult, train

logger = logging.getLogger(__name__)
SAMPLERS = ("nsga2", "random")
SEARCH_FAMILIES = ("attention", "cross_attention", "lora", "bias_norm", "difffit")


@dataclass
class SearchConfig:
    """One MemControl study: data, base model, search space, budget and objectives."""

    # the "help" of each field is its flag's help in `chexmem search --help`
    pretrained_model_name_or_path: str = field(
        metadata={"help": "base model: a diffusers pipeline folder or a Hub id (required)"}
    )
    train_data_dir: str = field(
        metadata={
            "help": "a saved dataset with duplicates injected (`chexmem data duplicate`: "
            "copies > 1); its train split trains, --quality_split scores (required)"
        }
    )
    output_dir: str = field(
        default="chexmem-search",
        metadata={"help": "folder of the study, its trials, the front and the classifier"},
    )
    families: list[str] = field(
        default_factory=lambda: list(SEARCH_FAMILIES),
        metadata={
            "help": "what a trial trains inside the chosen transformer blocks: attention "
            "(attn1+attn2), cross_attention (attn2), lora (adapters, rank from --lora_ranks), "
            "bias_norm (biases and norms), difffit (DiffFit: those plus learned scales), "
            "attention_kv (attn2 to_k/to_v), all"
        },
    )
    lora_ranks: list[int] = field(
        default_factory=lambda: [1, 2, 4, 8],
        metadata={"help": "LoRA ranks the search picks from (family lora)"},
    )
    lr_min: float = field(
        default=1e-5, metadata={"help": "lowest learning rate (sampled log-uniformly)"}
    )
    lr_max: float = field(default=1e-3, metadata={"help": "highest learning rate"})
    n_trials: int = field(
        default=12, metadata={"help": "trials the study holds when done (a rerun adds the rest)"}
    )
    sampler: str = field(
        default="nsga2",
        metadata={"help": "nsga2 (Optuna's NSGA-II, multi-objective) or random (the baseline)"},
    )
    # NSGA-II's generation size: its first generation is random sampling, so with Optuna's
    # default of 50 a 12-trial study would never evolve (4: three generations in 12 trials)
    population_size: int = field(
        default=4, metadata={"help": "NSGA-II generation size; the first one is random, >= 2"}
    )
    storage: str | None = field(
        default=None,
        metadata={
            "help": "Optuna storage URL, e.g. postgresql://... shared by workers "
            "(default: sqlite:///OUTPUT_DIR/study.db)"
        },
    )
    study_name: str = field(
        default="memcontrol", metadata={"help": "study name in the storage (same name: resume)"}
    )
    seed: int = field(
        default=0, metadata={"help": "seed of the sampler (+ worker index), training and scores"}
    )
    # inner loop
    max_train_steps: int = field(
        default=200, metadata={"help": "optimizer steps of each trial's fine-tune"}
    )
    train_batch_size: int = field(
        default=8, metadata={"help": "batch size of each trial's fine-tune and its scoring"}
    )
    conditioning_dropout_prob: float = field(
        default=0.1, metadata={"help": "share of empty prompts in the trials' fine-tunes (CFG)"}
    )
    objectives: list[str] = field(
        default_factory=lambda: ["memorization", "fid"],
        metadata={"help": "objectives, all minimised"},  # add_search_command lists the names
    )
    memorization_batches: int = field(
        default=4,
        metadata={"help": "batches of duplicated rows, each at random timesteps, per score"},
    )
    quality_split: str = field(
        default="test", metadata={"help": "held-out split whose prompts and images give FID/KID"}
    )
    quality_generations: int = field(
        default=64, metadata={"help": "images generated per trial for FID/KID"}
    )
    num_inference_steps: int = field(
        default=25, metadata={"help": "denoising steps of those generations"}
    )
    guidance_scale: float = field(
        default=7.5, metadata={"help": "classifier-free guidance scale of those generations"}
    )

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
        if not self.lora_ranks or min(self.lora_ranks) < 1:
            raise ChexmemError("lora_ranks must list ranks >= 1")
        if not self.objectives or len(set(self.objectives)) != len(self.objectives):
            raise ChexmemError("objectives must name one or more distinct objectives")
        for name in self.objectives:
            objective_function(name)  # fails early on an unknown name

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
    rank: int | None = None  # family "lora" only

    def mask_spec(self) -> dict[str, Any]:
        """The `--trainable_mask` JSON of `chexmem train`."""
        spec = {"family": self.family, "block_mask": self.block_mask}
        return {**spec, "rank": self.rank} if self.family == LORA_FAMILY else spec


def sample_trial(trial: Any, config: SearchConfig, blocks: list[str]) -> TrialConfig:
    """Family (and LoRA rank), one bit per transformer block and a log-uniform learning rate."""
    family = trial.suggest_categorical("family", config.families)
    rank = None
    if family == LORA_FAMILY:
        rank = int(trial.suggest_categorical("lora_rank", config.lora_ranks))
    mask = [int(trial.suggest_categorical(f"block_{i}", [0, 1])) for i in range(len(blocks))]
    lr = trial.suggest_float("learning_rate", config.lr_min, config.lr_max, log=True)
    return TrialConfig(family, mask, lr, config.pretrained_model_name_or_path, blocks, rank)


@dataclass
class DuplicatedInputs:
    """The duplicated rows as the UNet sees them: latents and prompt embeddings.

    The trials train UNet parameters only, so the VAE and text encoder stay the base
    model's and these are computed once per study."""

    latents: torch.Tensor
    cond: torch.Tensor
    empty: torch.Tensor
    prompts: list[str]
    images: list[Any]  # the training images themselves, for the copy_rate objective


@torch.no_grad()
def duplicated_inputs(pipe: Any, dataset: Any) -> DuplicatedInputs:
    """VAE latents (posterior means) and text embeddings of each duplicated image once."""
    rows = [i for i, c in enumerate(dataset["copies"]) if c > 1]
    if not rows:
        raise ChexmemError("the training data has no duplicated rows (copies > 1) to score")
    rows = sorted({dataset[i]["prompt"]: i for i in rows}.values())  # one row per image
    originals = [dataset[i]["image"].convert("RGB") for i in rows]
    prompts = [dataset[i]["prompt"] for i in rows]
    images = pipe.image_processor.preprocess(originals)
    latents = pipe.vae.encode(images.to(pipe.vae.device, pipe.vae.dtype)).latent_dist.mean
    return DuplicatedInputs(
        latents * pipe.vae.config.scaling_factor,
        encode_prompts(pipe, prompts),
        encode_prompts(pipe, [""]),
        prompts,
        originals,
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


def generate(pipe: Any, prompts: list[str], count: int, config: SearchConfig) -> list[Any]:
    """`count` images for the prompts (cycled), on the study's seeds."""
    n = max(1, math.ceil(count / len(prompts)))
    magnitude = MagnitudeConfig(
        num_inference_steps=config.num_inference_steps,
        guidance_scale=config.guidance_scale,
        num_generations=n,
        seed=config.seed,
        progress=False,
    )
    latents = noise_magnitudes(pipe, prompts, magnitude, keep_final=True).final_latents
    return decode_latents(pipe, latents[:count])


def held_out_quality(pipe: Any, study: Objective) -> QualityResult:
    """FID and KID of generations for the held-out prompts against their real images."""
    images = generate(pipe, study.prompts, study.config.quality_generations, study.config)
    return quality(study.real, study.extractor.features(images), study.extractor)


@dataclass
class TrialContext:
    """What an objective sees: the trial's trained model and result, and the study's fixed
    inputs (`study`: duplicated rows, held-out prompts and real features, the extractor)."""

    pipe: Any
    result: TrainResult
    study: Objective
    _quality: QualityResult | None = None

    @property
    def config(self) -> SearchConfig:
        """The study's settings."""
        return self.study.config

    def quality(self) -> QualityResult:
        """FID and KID of held-out generations (computed once, shared by both objectives)."""
        if self._quality is None:
            self._quality = held_out_quality(self.pipe, self.study)
        return self._quality


ObjectiveFunction = Callable[[TrialContext], float]
OBJECTIVES: dict[str, ObjectiveFunction] = {}


def register_objective(name: str) -> Callable[[ObjectiveFunction], ObjectiveFunction]:
    """Make an objective (a function of a TrialContext, minimised) available by name."""

    def add(function: ObjectiveFunction) -> ObjectiveFunction:
        OBJECTIVES[name] = function
        return function

    return add


@register_objective("memorization")
def memorization_objective(context: TrialContext) -> float:
    """Wen et al.'s magnitude on the duplicated rows at random training timesteps."""
    c = context.config
    return memorization_score(context.pipe, context.study.duplicated, c.memorization_batches,
                              c.train_batch_size, c.seed)  # fmt: skip


@register_objective("fid")
def fid_objective(context: TrialContext) -> float:
    """FID on held-out prompts (the study's feature extractor)."""
    return context.quality().fid


@register_objective("kid")
def kid_objective(context: TrialContext) -> float:
    """KID on held-out prompts (less biased than FID at small sample sizes)."""
    return context.quality().kid_mean


@register_objective("copy_rate")
def copy_rate_objective(context: TrialContext) -> float:
    """Share of generations for the duplicated prompts whose pixel NCC to their own
    training image passes the copy threshold (95th percentile of held-out real images)."""
    dup, embedder = context.study.duplicated, NCCEmbedder()
    images = generate(context.pipe, dup.prompts, 2 * len(dup.prompts), context.config)
    own = embedder.embed(dup.images)[np.repeat(np.arange(len(dup.prompts)), 2)]  # prompt-major
    similarity = similarity_to(embedder.embed(images), own)
    return float(np.mean(similarity >= context.study.copy_threshold))


@register_objective("trainable_share")
def trainable_share_objective(context: TrialContext) -> float:
    """Share of parameters trained (MemControl's capacity, as an objective)."""
    return context.result.trainable_share


def objective_function(name: str) -> ObjectiveFunction:
    """A registered objective, or "package.module:function" imported by name."""
    if name in OBJECTIVES:
        return OBJECTIVES[name]
    module, _, attribute = name.partition(":")
    if not attribute:
        raise ChexmemError(
            f"unknown objective {name!r}: use one of {', '.join(OBJECTIVES)} or "
            "'package.module:function'"
        )
    try:
        return getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as error:
        raise ChexmemError(f"cannot load objective {name!r}: {error}") from None


class Objective:
    """One trial: a short fine-tune of the sampled configuration, then the objectives."""

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
        self.functions = [objective_function(name) for name in config.objectives]

    def _classifier(self) -> FindingsClassifier:
        """The study's feature extractor, trained once (by the first worker) and reused."""
        folder = self.out / "classifier"
        self.out.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.out / "classifier.lock")):
            if (folder / "config.json").is_file():
                return FindingsClassifier.load(folder)
            settings = ClassifierConfig(seed=self.config.seed, feature_dim=64, progress=False)
            classifier = train_classifier(self.dataset, settings)
            classifier.save(folder, overwrite=True)
        return classifier

    @functools.cached_property
    def copy_threshold(self) -> float:
        """Pixel-NCC copy threshold: 95th percentile of held-out real images' nearest
        training similarity (computed once, when an objective first needs it)."""
        embedder = NCCEmbedder()
        bank = embedder.embed(list(self.dataset["train"]["image"]))
        held_out = list(self.dataset[self.config.quality_split]["image"])
        return calibrate_threshold(embedder.embed(held_out), bank).value

    def train_config(self, trial: TrialConfig, run_dir: Path) -> TrainConfig:
        """The inner loop's `chexmem train` settings."""
        mask_file = run_dir / "mask.json"
        run_dir.mkdir(parents=True, exist_ok=True)
        mask_file.write_text(json.dumps(trial.mask_spec()))
        return TrainConfig(  # the mask file implies --mode subset, or --mode lora with its rank
            pretrained_model_name_or_path=trial.base_model,
            train_data_dir=self.config.train_data_dir,
            output_dir=str(run_dir),
            overwrite_output_dir=True,
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

    def __call__(self, trial: Any) -> tuple[float, ...]:
        """Train, score, and record the whole configuration on the trial."""
        chosen = sample_trial(trial, self.config, self.blocks)
        trial.set_user_attr("config", asdict(chosen))
        twin = same_trial(trial)
        if twin is not None:  # NSGA-II may propose a configuration again: reuse its scores
            for key in ("trainable_share", "trainable_params"):
                trial.set_user_attr(key, twin.user_attrs.get(key))
            trial.set_user_attr("duplicate_of", twin.number)
            trial.set_user_attr("seconds", 0.0)
            return tuple(twin.values)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        if not any(chosen.block_mask):
            raise ChexmemError("empty block mask: nothing would train")
        start = time.perf_counter()
        run_dir = self.out / "trials" / f"trial_{trial.number:04d}"
        result = train(self.train_config(chosen, run_dir))
        trial.set_user_attr("trainable_share", result.trainable_share)
        trial.set_user_attr("trainable_params", result.trainable_params)
        context = TrialContext(load_pipeline(run_dir), result, self)
        values = tuple(float(function(context)) for function in self.functions)
        trial.set_user_attr("seconds", time.perf_counter() - start)
        if not all(math.isfinite(v) for v in values):
            named = ", ".join(
                f"{n} {v}" for n, v in zip(self.config.objectives, values, strict=True)
            )
            raise ChexmemError(f"non-finite objectives: {named}")
        return values


def same_trial(trial: Any) -> Any:
    """A finished trial of the study with exactly this trial's parameters, if any."""
    import optuna

    done = trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return next((t for t in done if t.params == trial.params), None)


DISTRIBUTED_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                   "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                   "TORCHELASTIC_RUN_ID")  # fmt: skip


def become_worker() -> int:
    """Under `accelerate launch` / torchrun, make this process an independent study worker
    pinned to its own GPU (trials are whole fine-tunes, not data-parallel shards); returns
    its global rank, 0 when run alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = visible.split(",") if visible else [str(i) for i in range(local + 1)]
    os.environ["CUDA_VISIBLE_DEVICES"] = devices[local % len(devices)]
    for name in DISTRIBUTED_ENV:  # the inner trainer's Accelerator must not join a group
        os.environ.pop(name, None)
    return rank


def open_study(config: SearchConfig, sampler: Any, attempts: int = 5) -> Any:
    """`optuna.create_study(load_if_exists=True)`, tried again while another worker is
    creating the same storage's tables."""
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    def create() -> Any:
        return optuna.create_study(
            study_name=config.study_name,
            storage=config.storage_url,
            sampler=sampler,
            directions=["minimize"] * len(config.objectives),
            load_if_exists=True,
        )

    for _ in range(attempts - 1):
        try:
            return create()
        except SQLAlchemyError:
            time.sleep(0.5 + random.random())  # jittered: the racers must not meet again
    return create()


def make_study(config: SearchConfig, worker: int = 0) -> Any:
    """Create or resume the study (same name and storage: the trials so far are kept)."""
    import optuna

    seed = config.seed + worker  # workers sharing a study must not propose the same trials
    sampler = (
        optuna.samplers.NSGAIISampler(population_size=config.population_size, seed=seed)
        if config.sampler == "nsga2"
        else optuna.samplers.RandomSampler(seed=seed)
    )
    Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    # workers starting together race to create the storage's tables and the study (UNIQUE
    # constraint on alembic_version, "table studies already exists"): those sharing the
    # output folder take turns; those on other machines (a shared RDB) retry
    with FileLock(str(Path(config.output_dir) / "study.lock")):
        study = open_study(config, sampler)
        saved = study.user_attrs.get("objectives")
        if saved is None:
            study.set_user_attr("objectives", list(config.objectives))
    if saved is not None and saved != list(config.objectives):
        raise ChexmemError(
            f"study {config.study_name!r} in {config.storage_url} optimises {saved}, not "
            f"{list(config.objectives)}: pass --objectives {' '.join(saved)} or a new --study_name"
        )
    return study


def run_search(config: SearchConfig, worker: int = 0) -> pd.DataFrame:
    """Run trials until the study holds `n_trials` finished or failed ones; write the front."""
    import optuna

    study = make_study(config, worker)
    done = sum(t.state.is_finished() for t in study.trials)
    remaining = max(0, config.n_trials - done)
    if remaining:
        objective = Objective(config)
        # a failed trial (NaN, OOM, empty mask) is recorded as FAIL and the study goes on;
        # with several workers on one storage, each stops once the study holds n_trials
        # started ones (enqueued trials still WAITING are not counted)
        state = optuna.trial.TrialState
        started = (state.COMPLETE, state.FAIL, state.PRUNED, state.RUNNING)
        stop = optuna.study.MaxTrialsCallback(config.n_trials, states=started)
        study.optimize(objective, n_trials=remaining, catch=(Exception,), callbacks=[stop])
    return write_outputs(config, study)


def hypervolume(points: np.ndarray, reference: np.ndarray) -> float:
    """Area dominated by a set of 2-objective points (minimised) up to `reference`."""
    inside = points[(points < reference).all(axis=1)]
    if len(inside) == 0:
        return 0.0
    inside = inside[np.argsort(inside[:, 0])]
    area, best_y = 0.0, float(reference[1])
    for x, y in inside:
        if y < best_y:
            area += (reference[0] - x) * (best_y - y)
            best_y = y
    return float(area)


def trials_table(config: SearchConfig, study: Any) -> pd.DataFrame:
    """One row per trial: state, objective values, the configuration and its cost."""
    rows = []
    for t in study.trials:
        chosen = t.user_attrs.get("config", {})
        values = t.values or [np.nan] * len(config.objectives)
        rows.append(
            {
                "trial": t.number,
                "state": t.state.name,
                **dict(zip(config.objectives, values, strict=True)),
                "trainable_share": t.user_attrs.get("trainable_share", np.nan),
                "seconds": t.user_attrs.get("seconds", np.nan),
                "family": chosen.get("family"),
                "lora_rank": chosen.get("rank"),
                "block_mask": chosen.get("block_mask"),
                "learning_rate": t.params.get("learning_rate"),
            }
        )
    table = pd.DataFrame(rows, columns=[*TABLE_COLUMNS[:2], *config.objectives,
                                          *TABLE_COLUMNS[2:]])  # fmt: skip
    complete = any(t.state.name == "COMPLETE" for t in study.trials)
    front = {t.number for t in study.best_trials} if complete else set()
    table["pareto"] = table["trial"].isin(front)
    return table


TABLE_COLUMNS = ["trial", "state", "trainable_share", "seconds", "family", "lora_rank",
                 "block_mask", "learning_rate"]  # fmt: skip


def write_outputs(config: SearchConfig, study: Any) -> pd.DataFrame:
    """All trials, the Pareto front (table, plot, one JSON per configuration), a summary."""
    from detect.cli import write_json

    out = Path(config.output_dir)
    table = trials_table(config, study)
    partial = out / f".trials.csv.{os.getpid()}.partial"
    table.to_csv(partial, index=False)
    partial.replace(out / "trials.csv")
    front_dir = out / "front"
    front_dir.mkdir(exist_ok=True)
    for t in study.trials:
        if not table.loc[table["trial"] == t.number, "pareto"].any():
            continue
        saved = {
            **t.user_attrs["config"],
            "trainable_share": t.user_attrs.get("trainable_share"),
            "trainable_params": t.user_attrs.get("trainable_params"),
            **dict(zip(config.objectives, t.values, strict=True)),
            "features": "chexmem-findings-cnn (this study's classifier)",
            "trial": t.number,
        }
        path = front_dir / f"trial_{t.number:04d}.json"
        saved["command"] = stage_two_command(config, path)
        write_json(saved, path)
    done = table[table["state"] == "COMPLETE"]
    summary = {
        "objectives": config.objectives,
        "sampler": config.sampler,
        "trials": len(table),
        "complete": len(done),
        "failed": int((table["state"] == "FAIL").sum()),
        "front": done.loc[done["pareto"], "trial"].tolist(),
        "storage": config.storage_url,
    }
    if len(config.objectives) == 2 and len(done):
        values = done[config.objectives].to_numpy(float)
        reference = values.max(axis=0) * 1.1  # this study's own; compare studies on a shared one
        summary["hypervolume"] = hypervolume(values, reference)
        summary["hypervolume_reference"] = reference.tolist()
        x, y = config.objectives
        scatter_plot(
            done[x],
            done[y],
            done["pareto"].map({True: "front", False: "other"}),
            out / "pareto.png",
            f"MemControl ({config.sampler}): {len(done)} trials",
            OBJECTIVE_LABELS.get(x, x),
            OBJECTIVE_LABELS.get(y, y),
        )
    write_json(summary, out / "summary.json")
    return table


OBJECTIVE_LABELS = {
    "memorization": "memorization (Wen magnitude, max per batch)",
    "fid": "FID (findings-CNN features)",
    "kid": "KID (findings-CNN features)",
    "copy_rate": "copy rate (pixel NCC, duplicated prompts)",
    "trainable_share": "trainable share",
}


def stage_two_command(config: SearchConfig, saved: Path) -> str:
    """`chexmem train` with a front configuration (another --train_data_dir transfers it)."""
    return (
        f"chexmem train --from_search {saved.resolve()} --train_data_dir {config.train_data_dir} "
        f"--output_dir stage2-{saved.stem}"
    )


def cmd_search(args: Any) -> None:
    """`chexmem search`: run (or resume) a study and write its front."""
    worker = become_worker()
    fields = SearchConfig.__dataclass_fields__
    config = SearchConfig(**{k: getattr(args, k) for k in fields if hasattr(args, k)})
    table = run_search(config, worker)
    front = table[table["pareto"]]
    if worker:
        return
    print(table.drop(columns=["block_mask"]).round(4).to_string(index=False))
    print(f"{len(front)} configurations on the front: {config.output_dir}/front/; study: "
          f"{config.storage_url} (run again to resume or add trials)")  # fmt: skip


def add_search_command(subparsers: Any) -> None:
    """Register `chexmem search` (flags: the fields of SearchConfig)."""
    from hf_datasets.cliutils import add_config_flag
    from train.config import field_help

    p = subparsers.add_parser("search", help="MemControl: search which parameters to fine-tune")
    for name, spec in SearchConfig.__dataclass_fields__.items():
        default = spec.default
        if spec.default_factory is not MISSING:
            default = spec.default_factory()
        text = field_help(spec, default)
        if name in ("pretrained_model_name_or_path", "train_data_dir"):
            p.add_argument(f"--{name}", required=True, help=text)
        elif name == "families":
            p.add_argument("--families", nargs="+", default=default, choices=sorted(FAMILIES),
                           metavar="FAMILY", help=text)  # fmt: skip
        elif name == "lora_ranks":
            p.add_argument("--lora_ranks", nargs="+", type=int, default=default, help=text)
        elif name == "objectives":
            text = (f"{spec.metadata['help']}: {', '.join(OBJECTIVES)} or package.module:function "
                    f"(default: {' '.join(default)})")  # fmt: skip
            p.add_argument("--objectives", nargs="+", default=default, help=text)
        elif name == "sampler":
            p.add_argument("--sampler", choices=SAMPLERS, default=default, help=text)
        elif name == "storage":
            p.add_argument("--storage", help=text)
        else:
            p.add_argument(f"--{name}", type=type(default), default=default, help=text)
    add_config_flag(p)
    p.set_defaults(func=cmd_search, _parser=p)


def main(argv: list[str] | None = None) -> int:
    """`python -m train.search` / `accelerate launch -m train.search`: the search alone."""
    import argparse
    import sys

    from hf_datasets.cliutils import run_command, setup_logging

    parser = argparse.ArgumentParser(prog="accelerate launch -m train.search")
    subparsers = parser.add_subparsers(dest="command")
    add_search_command(subparsers)
    subparsers.choices["search"].prog = parser.prog  # help reads as the command users type
    argv = ["search", *(sys.argv[1:] if argv is None else argv)]
    args = parser.parse_args(argv)
    setup_logging()
    return run_command(parser, args, argv)


if __name__ == "__main__":
    raise SystemExit(main())
