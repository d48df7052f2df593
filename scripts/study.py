"""`chexmem study --config configs/NAME.yaml` (and `chexmem demo`): the whole study, one command.

data -> fine-tunes (with and without CFG; with and without the training-time filter;
full / LoRA / subset) -> detection -> validation against copy similarity -> mitigation ->
validation again -> report (`metrics.json`, `report.md`, `report.html`).

The study is a graph of jobs. Each job's key hashes the settings it reads and the keys of the
jobs it needs, and a finished job leaves `.study/NAME.json` with that key: a killed study run
again skips every finished job whose key still matches, and `--force NAME` reruns a job and
everything after it. Fine-tunes and detection runs are `python -m train` / `python -m detect`
processes (or `accelerate launch -m ...` with `launcher: accelerate`), run side by side up to
`max_parallel`; the small steps run in this process. `--dry_run` builds and checks every job's
plan (the trainer's and detector's own option checks included) without running anything, so a
GPU config can be validated on a laptop.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hf_datasets.errors import ChexmemError

DATA_SOURCES = ("phantom", "chexpert", "folder")
LAUNCHERS = ("python", "accelerate")
STUDY_METHODS = ("embedding", "neurons", "trigger_tokens", "random_tokens", "attention_scaling")


@dataclass
class StudyConfig:
    """What a study runs; each field is a flag of `chexmem study` / `chexmem demo` and a key of
    its YAML config. The defaults are the embedded default (phantom data, tiny model, CPU)."""

    name: str = "demo"
    output_dir: str = "chexmem-demo"
    seed: int = 0
    # data: the phantom generator, a CheXpert folder, or an image folder with metadata.csv;
    # duplicates are injected in every case (the detector's ground truth)
    data_source: str = "phantom"
    data_root: str | None = None
    max_rows: int | None = None  # CheXpert / folder: use only this many rows
    frontal_only: bool = True  # CheXpert
    # 150 patients (~220 distinct training images) with 10 images x 15 copies: duplicates fill
    # 41% of training rows. With 60 patients (72%) the unconditional branch learned the
    # duplicates too and the magnitude could no longer tell them apart (docs/benchmarks.md)
    num_patients: int = 150
    max_studies_per_patient: int = 3
    resolution: int = 64
    duplicated_rows: int = 10
    copies: int = 15
    # base model: "tiny" (built offline) or a diffusers pipeline (Hub id or folder)
    base_model: str = "tiny"
    vae_train_steps: int = 300
    # fine-tuning
    max_train_steps: int = 1600
    train_batch_size: int = 8
    learning_rate: float = 2e-3
    lr_scheduler: str = "cosine"  # annealed to 0: sharper copies than a constant rate
    lr_warmup_steps: int = 50
    train_text_encoder: bool = True  # the tiny model's starts untrained
    mixed_precision: str = "no"
    train_flags: list[str] = field(default_factory=list)  # more `chexmem train` flags
    # training-time filter (Wen et al.): drop the top fraction of each batch by m_t relative
    # to its timestep's running mean (raw m_t mostly ranks timesteps: docs/benchmarks.md)
    filter_top_fraction: float = 0.25
    # capacity control needs a trained base (LoRA on a random UNet learns nothing): the tiny
    # model is first trained on other phantom patients (no duplicates), standing in for SD's
    # pretraining; full / LoRA / subset fine-tunes then start from it, text encoder frozen.
    # pretrain_steps 0: they start from base_model itself (SD is pretrained already)
    pretrain_patients: int = 300
    pretrain_steps: int = 400
    capacity_steps: int = 400
    lora_preset: str = "lora_r4"
    subset_preset: str = "attention"
    # detection
    # 20 + 20 (not 30 + 30) keeps the demo within 20 minutes on 2 cores; 80 generations of
    # ordinary prompts still give FID full-rank covariances of the 64-d features
    ordinary_prompts: int = 20  # non-duplicated training prompts scored by the detector
    held_out_prompts: int = 20  # validation and test prompts scored (at most)
    generations_per_prompt: int = 4
    inference_steps: int = 20
    detect_batch_size: int = 16
    inference_dtype: str = "float32"  # float16 / bfloat16 on GPUs
    heatmap_prompts: int = 5  # top-scoring prompts whose trigger tokens the report shows
    # mitigation: the inference-time methods compared with none (attention_scaling changed
    # nothing on the tiny model at any c tried, so the demo leaves it out: docs/benchmarks.md)
    methods: list[str] = field(
        default_factory=lambda: ["embedding", "neurons", "trigger_tokens", "random_tokens"]
    )
    random_tokens: list[int] = field(default_factory=lambda: [4])  # tokens added per variant
    robustness_sigmas: list[float] = field(default_factory=lambda: [0.0, 0.1])
    # how jobs run
    launcher: str = "python"  # python -m ..., or accelerate launch -m ...
    accelerate_config: str | None = None
    max_parallel: int = 0  # processes at once; 0: one per CPU core
    # publishing
    push_to_hub: bool = False
    hub_model_id: str | None = None  # a prefix: models go to PREFIX-finetune-cfg, ...
    hub_private: bool = True
    # what to run (overwrite: rerun every job, as --force all)
    overwrite: bool = False
    skip_training: bool = False
    skip_mitigation: bool = False

    def __post_init__(self) -> None:
        if self.data_source not in DATA_SOURCES:
            raise ChexmemError(f"data_source must be one of {', '.join(DATA_SOURCES)}")
        if self.data_source != "phantom" and not self.data_root:
            raise ChexmemError(f"data_source {self.data_source} needs data_root")
        if self.launcher not in LAUNCHERS:
            raise ChexmemError(f"launcher must be one of {', '.join(LAUNCHERS)}")
        if self.push_to_hub and not self.hub_model_id:
            raise ChexmemError("push_to_hub needs hub_model_id (a prefix, e.g. you/chexmem-study)")
        if self.inference_dtype not in ("float32", "float16", "bfloat16"):
            raise ChexmemError("inference_dtype must be float32, float16 or bfloat16")
        unknown = sorted(set(self.methods) - set(STUDY_METHODS))
        if unknown:
            raise ChexmemError(f"unknown methods {unknown}; choose from {', '.join(STUDY_METHODS)}")
        if self.max_parallel < 0:
            raise ChexmemError("max_parallel must be >= 0 (0: one process per CPU core)")

    @property
    def out(self) -> Path:
        """The study's folder."""
        return Path(self.output_dir)

    def load(self, model: str | Path) -> Any:
        """A model of the study, ready for inference (on the GPU when there is one)."""
        import torch

        from detect.cli import DTYPES
        from detect.models import load_pipeline

        device = "cuda" if torch.cuda.is_available() else "cpu"
        return load_pipeline(model, device=device, dtype=DTYPES[self.inference_dtype])

    @property
    def parallel(self) -> int:
        """How many job processes run at once."""
        return self.max_parallel or max(1, os.cpu_count() or 1)


@dataclass
class Job:
    """One step of the study: a `python -m` command, or a function run in this process."""

    name: str
    needs: list[str]
    inputs: dict[str, Any]  # everything the job's result depends on, besides `needs`
    command: list[str] | None = None  # module and arguments (after `python -m`)
    run: Callable[[], Any] | None = None
    log: Path | None = None
    describe: str = ""
    accelerate: bool = False  # launched with `accelerate launch` when the study says so
    key: str = ""

    def argv(self, config: StudyConfig) -> list[str]:
        """The full command line of a command job."""
        assert self.command is not None
        if self.accelerate and config.launcher == "accelerate":
            launch = [sys.executable, "-m", "accelerate.commands.launch"]
            if config.accelerate_config:
                launch += ["--config_file", config.accelerate_config]
            return [*launch, "-m", *self.command]
        return [sys.executable, "-m", *self.command]


def job_key(job: Job, keys: dict[str, str]) -> str:
    """A content address: the job's name, inputs and the keys of the jobs it needs."""
    payload = {"job": job.name, "inputs": job.inputs, "needs": {n: keys[n] for n in job.needs}}
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def assign_keys(jobs: list[Job]) -> None:
    """Give every job its key (jobs are listed after the jobs they need)."""
    keys: dict[str, str] = {}
    for job in jobs:
        unknown = [n for n in job.needs if n not in keys]
        if unknown:
            raise ChexmemError(f"job {job.name} needs {unknown}, which come later or not at all")
        job.key = keys[job.name] = job_key(job, keys)


def marker(config: StudyConfig, name: str) -> Path:
    """Where a finished job records its key."""
    return config.out / ".study" / f"{name}.json"


def is_done(config: StudyConfig, job: Job) -> bool:
    """Whether the job finished before with the same key."""
    path = marker(config, job.name)
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("key") == job.key
    except json.JSONDecodeError:
        return False


def mark_done(config: StudyConfig, job: Job, seconds: float) -> None:
    """Record a finished job (written under a temporary name, then renamed)."""
    path = marker(config, job.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    record = {"key": job.key, "seconds": round(seconds, 1), "finished": time.time()}
    partial.write_text(json.dumps(record))
    partial.replace(path)


def downstream(jobs: list[Job], names: set[str]) -> set[str]:
    """The named jobs and every job that needs one of them, directly or not."""
    chosen = set(names)
    for job in jobs:
        if chosen & set(job.needs):
            chosen.add(job.name)
    return chosen


class Running:
    """A started job: a process writing its log, or a function in this process's one worker
    thread (the small steps; the scheduler keeps polling the processes meanwhile)."""

    def __init__(self, config: StudyConfig, job: Job, env: dict[str, str], pool: Any) -> None:
        self.job, self.start = job, time.perf_counter()
        self.process: subprocess.Popen | None = None
        self.future: Any = None
        label = f"== {job.name}: {job.describe}" if job.describe else f"== {job.name}"
        if job.run is not None:
            print(label)
            self.future = pool.submit(job.run)
            return
        assert job.log is not None
        print(f"{label} (log: {job.log})")
        job.log.parent.mkdir(parents=True, exist_ok=True)
        self.log = job.log.open("w")
        self.process = subprocess.Popen(job.argv(config), stdout=self.log,
                                        stderr=subprocess.STDOUT, env=env,
                                        preexec_fn=die_with_parent)  # fmt: skip

    def finished(self) -> bool:
        """Whether it ended; raises the job's failure as one clear error."""
        if self.future is not None:
            if not self.future.done():
                return False
            self.future.result()  # re-raises the job's own error
            return True
        assert self.process is not None
        code = self.process.poll()
        if code is None:
            return False
        self.log.close()
        if code != 0:
            log = self.job.log
            tail = log.read_text()[-2000:] if log else ""
            raise ChexmemError(f"job {self.job.name} failed (exit {code}); see {log}:\n{tail}")
        return True

    def stop(self) -> None:
        """End a job process that is still running (a thread finishes its step)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait()
            self.log.close()


def die_with_parent() -> None:
    """In a job process: end when the study process ends, even when it is killed outright, so
    a restarted study never finds an orphan still writing the job's folder (Linux)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def run_jobs(config: StudyConfig, jobs: list[Job], force: set[str]) -> dict[str, float]:
    """Run what is not cached, up to `config.parallel` jobs at once (at most one of them in
    this process), in the order listed; returns the seconds of each job (0: cached)."""
    from concurrent.futures import ThreadPoolExecutor

    unknown = force - {j.name for j in jobs} - {"all"}
    if unknown:
        names = ", ".join(j.name for j in jobs)
        raise ChexmemError(f"--force {', '.join(sorted(unknown))}: no such job; jobs: {names}")
    rerun = {j.name for j in jobs} if "all" in force else downstream(jobs, force)
    pending = {j.name: j for j in jobs}
    done: dict[str, float] = {}
    running: dict[str, Running] = {}
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with ThreadPoolExecutor(max_workers=1) as pool:
        try:
            while pending or running:
                for job in [j for j in pending.values() if all(n in done for n in j.needs)]:
                    if job.name not in rerun and is_done(config, job):
                        print(f"-- {job.name}: cached ({job.key})")
                        done[job.name] = 0.0
                    elif len(running) < config.parallel and not (
                        job.run and any(r.future for r in running.values())
                    ):
                        running[job.name] = Running(config, job, env, pool)
                    else:
                        continue
                    del pending[job.name]
                for name, job in list(running.items()):
                    if job.finished():
                        del running[name]
                        done[name] = time.perf_counter() - job.start
                        mark_done(config, job.job, done[name])
                        print(f"-- {name}: finished in {done[name]:.0f} s")
                if running:
                    time.sleep(0.2)
                elif pending and not any(all(n in done for n in j.needs) for j in pending.values()):
                    raise ChexmemError(f"jobs {', '.join(pending)} wait on jobs that never ran")
        finally:  # a failure or Ctrl-C leaves no job process behind (they rerun next time)
            for job in running.values():
                job.stop()
    return done


def dry_run(config: StudyConfig, jobs: list[Job]) -> None:
    """Print every job's plan and check each command's options as the tool itself would."""
    from detect.cli import add_detect_flags
    from train.config import add_train_flags, config_from_args

    parsers = {
        m: argparse.ArgumentParser(prog=f"python -m {m}", exit_on_error=False)
        for m in ("train", "detect")
    }
    add_train_flags(parsers["train"])
    add_detect_flags(parsers["detect"])
    for job in jobs:
        state = "cached" if is_done(config, job) else "to run"
        print(f"[{state}] {job.name} ({job.key}) needs {', '.join(job.needs) or 'nothing'}")
        if job.describe:
            print(f"    {job.describe}")
        if job.command is None:
            continue
        print(f"    $ {shlex.join(job.argv(config))}")
        module, *args = job.command
        if module in parsers:
            try:
                parsed = parsers[module].parse_args(args)
            except (argparse.ArgumentError, SystemExit) as error:
                raise ChexmemError(f"job {job.name}: bad {module} options: {error}") from None
            if module == "train":
                config_from_args(parsed)  # the trainer's own checks of the combination
    needed = (config.data_root, config.accelerate_config)
    for path in [p for p in needed if p and not Path(p).exists()]:
        print(f"note: {path} does not exist here; the study needs it where it runs")
    print(f"{len(jobs)} jobs; all options check out")


def run_study(config: StudyConfig, force: set[str] = frozenset(), plan_only: bool = False) -> None:
    """Plan the study's jobs, then run what is not cached (or only check the plan)."""
    from scripts.study_plan import plan

    if "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(1)  # tiny models on a small CPU: more threads are much slower
    jobs = plan(config)
    assign_keys(jobs)
    if plan_only:
        dry_run(config, jobs)
        return
    config.out.mkdir(parents=True, exist_ok=True)
    settings = config.out / "study_config.json"
    settings.write_text(json.dumps(asdict(config), indent=1))
    start = time.perf_counter()
    seconds = run_jobs(config, jobs, {"all"} if config.overwrite else set(force))
    timing = config.out / ".study" / "timing.json"
    timing.write_text(json.dumps({"wall_seconds": time.perf_counter() - start, "jobs": seconds}))
    print(f"== study finished in {time.perf_counter() - start:.1f} s; outputs in {config.out}/")
    if (config.out / "report.html").is_file():
        print(f"report: {config.out / 'report.html'} (and report.md, metrics.json)")


def config_from(args: argparse.Namespace) -> StudyConfig:
    """The StudyConfig of parsed flags."""
    return StudyConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(StudyConfig)})


def add_study_flags(p: argparse.ArgumentParser) -> None:
    """One flag per StudyConfig field, plus --force and --dry_run."""
    from hf_datasets.cliutils import add_config_flag

    for f in dataclasses.fields(StudyConfig):
        value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if isinstance(value, bool):
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=value)
        elif isinstance(value, list):
            kind = type(value[0]) if value else str
            p.add_argument(f"--{f.name}", nargs="*", type=kind, default=value)
        elif value is None:
            kind = int if f.name == "max_rows" else str
            p.add_argument(f"--{f.name}", type=kind, default=None)
        else:
            kind = type(value)
            p.add_argument(f"--{f.name}", type=kind, default=value, help=f"(default: {value})")
    p.add_argument("--force", nargs="+", default=[], metavar="JOB",
                   help="rerun these jobs and all after them ('all': everything)")  # fmt: skip
    p.add_argument("--dry_run", action="store_true", help="check every job's plan; run nothing")
    add_config_flag(p)


def add_study_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `chexmem study` and `chexmem demo` (the study on the embedded default)."""

    def run(args: argparse.Namespace) -> None:
        if args.command == "study" and not args.config:
            raise ChexmemError("chexmem study needs --config FILE (e.g. configs/demo.yaml)")
        run_study(config_from(args), set(args.force), args.dry_run)

    for name, text in (
        ("study", "run a whole study from a YAML config (configs/*.yaml)"),
        ("demo", "run the study on the embedded default (CPU, offline)"),
    ):
        p = subparsers.add_parser(name, help=text, description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
        add_study_flags(p)
        p.set_defaults(func=run, _parser=p)
