"""The study's jobs, in order: what each runs, what it needs, and what its result depends on."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from scripts.study import stages
from scripts.study.config import StudyConfig
from scripts.study.report import push_study, write_study_report
from scripts.study.runner import Job

DATA_FIELDS = (
    "data_source",
    "data_root",
    "max_rows",
    "frontal_only",
    "num_patients",
    "max_studies_per_patient",
    "resolution",
    "duplicated_rows",
    "copies",
    "seed",
)
DETECT_FIELDS = (
    "ordinary_prompts",
    "held_out_prompts",
    "generations_per_prompt",
    "inference_steps",
    "seed",
    "heatmap_prompts",
)
MITIGATION_FIELDS = (
    "methods",
    "mitigation_prompts",
    "method_settings",
    "generations_per_prompt",
    "inference_steps",
    "seed",
    "random_tokens",
    "robustness_sigmas",
)


def pick(config: StudyConfig, names: tuple[str, ...]) -> dict[str, Any]:
    """The named settings of the config."""
    return {n: getattr(config, n) for n in names}


def train_job(config: StudyConfig, name: str, run: Any, needs: list[str], text: str) -> Job:
    """A `python -m train` job (accelerate launch with `launcher: accelerate`)."""
    flags = stages.train_flags(config, run, config.out / name)
    return Job(
        name,
        needs,
        {"flags": flags},
        ["train", *flags],
        log=config.out / name / "train.log",
        describe=text,
        accelerate=True,
    )


def plan(config: StudyConfig) -> list[Job]:
    """Every job of the study, each after the jobs it needs."""
    out, data = config.out, config.out / "data"
    jobs = [
        Job(
            "data",
            [],
            pick(config, DATA_FIELDS),
            run=partial(stages.run_data_stage, config),
            describe=f"{config.data_source} data, {config.duplicates} injected",
        )
    ]
    if config.skip_training:
        return jobs
    base, base_needs = Path(config.base_model), []
    if config.base_model == "tiny":
        model = [
            "scripts.cli", "model", "tiny", "--out", str(out / "tiny-sd"), "--overwrite",
            "--resolution", str(config.resolution),
            "--seed", str(config.seed),
            "--vae_train_steps", str(config.vae_train_steps),
        ]  # fmt: skip
        jobs.append(
            Job(
                "model",
                [],
                {"command": model},
                model,
                log=out / "model.log",
                describe="the tiny Stable Diffusion model, built offline",
            )
        )
        base, base_needs = out / "tiny-sd", ["model"]
    pretrain = None
    from_pretrained = config.finetune_from == "pretrained"
    if (from_pretrained or not config.skip_mitigation) and config.pretrain_steps > 0:
        pretrain = out / "pretrain-data"
        # patients disjoint from the study's (another seed), without duplicates
        command = [
            "scripts.cli", "data", "phantom", "--out", str(pretrain), "--overwrite",
            "--num_patients", str(config.pretrain_patients),
            "--max_studies_per_patient", str(config.max_studies_per_patient),
            "--resolution", str(config.resolution),
            "--seed", str(config.seed + 1),
        ]  # fmt: skip
        jobs.append(
            Job(
                "pretrain-data",
                [],
                {"command": command},
                command,
                log=out / "pretrain-data.log",
                describe=f"{config.pretrain_patients} other phantom patients",
            )
        )
    first = stages.first_round(config, base, data, pretrain)
    trains = {}
    for name, run in first.items():
        needs = [*base_needs, "pretrain-data" if name == "pretrained" else "data"]
        if from_pretrained and name != "pretrained":
            needs.append("pretrained")
        steps = run.steps or config.max_train_steps
        text = f"{steps} steps, conditioning dropout {run.dropout} {' '.join(run.extra)}"
        trains[name] = train_job(config, name, run, needs, text.strip())
    detect = detection_jobs(config, base_needs)
    later = {}
    if not config.skip_mitigation:
        later = mitigation_jobs(config, base, base_needs, pretrain, first["finetune-cfg"])
    # the order is the priority when processes are scarce: the longest jobs first. On the
    # demo's 2 cores this ends within 5% of (total work / cores) in a simulation of the
    # measured job times; putting the CFG model's chain first ended ~20% later
    order = ["finetune-cfg", "finetune-nocfg", "finetune-cfg-filter", "pretrained",
             "detect-prompts", "detect-cfg", "detect-eval-cfg", "detect-nocfg",
             "detect-eval-nocfg", "capacity-full", "capacity-lora", "capacity-subset",
             "mitigate-methods", "detection", "mitigate-models"]  # fmt: skip
    if from_pretrained:  # the fine-tunes start from it
        order.insert(0, order.pop(order.index("pretrained")))
    everything = {**trains, **detect, **later}
    jobs += [everything[n] for n in order if n in everything]
    names = [j.name for j in jobs]
    jobs.append(
        Job(
            "report",
            names,
            {"version": 1},
            run=partial(write_study_report, config),
            describe="metrics.json, report.md, report.html",
        )
    )
    if config.push_to_hub:
        hub = ("hub_model_id", "hub_private")
        jobs.append(
            Job(
                "hub",
                ["report"],
                pick(config, hub),
                run=partial(push_study, config),
                describe=f"models, dataset and report to {config.hub_model_id}-*",
            )
        )
    return jobs


def detection_jobs(config: StudyConfig, base_needs: list[str]) -> dict[str, Job]:
    """The prompts, both models' `python -m detect` runs, their evaluation and its merge."""
    out, data = config.out, config.out / "data"
    jobs = {
        "detect-prompts": Job(
            "detect-prompts",
            ["data"],
            pick(config, DETECT_FIELDS),
            run=partial(_write_detect_prompts, config),
            describe="duplicated, ordinary and held-out prompts to score",
        )
    }
    guided = {"cfg": ("finetune-cfg", 7.5), "nocfg": ("finetune-nocfg", 1.0)}
    for name, (model_name, guidance) in guided.items():
        flags = stages.detect_flags(
            config, out / model_name, out / "detect_prompts.csv", guidance, out / f"detect-{name}"
        )
        jobs[f"detect-{name}"] = Job(
            f"detect-{name}",
            [model_name, "detect-prompts"],
            {"flags": flags},
            ["detect", *flags],
            log=out / f"detect-{name}.log",
            accelerate=True,
            describe=f"noise magnitudes of {model_name}, guidance {guidance}",
        )
        evaluate = partial(
            stages.evaluate_detect_runs,
            config,
            data,
            {name: (out / model_name, guidance)},
            out / f"detection_{name}.json",
        )
        jobs[f"detect-eval-{name}"] = Job(
            f"detect-eval-{name}",
            [f"detect-{name}"],
            pick(config, DETECT_FIELDS),
            run=evaluate,
            describe=f"{model_name}: copy similarity, AUC, correlations, figures",
        )
    jobs["detection"] = Job(
        "detection",
        ["detect-eval-cfg", "detect-eval-nocfg"],
        {},
        run=partial(stages.merge_detection, config, list(guided)),
        describe="detection.json",
    )
    return jobs


def mitigation_jobs(
    config: StudyConfig,
    base: Path,
    base_needs: list[str],
    pretrain: Path | None,
    plain: stages.FineTune,
) -> dict[str, Job]:
    """The capacity fine-tunes and both parts of the mitigation stage."""
    out, data = config.out, config.out / "data"
    jobs = {}
    start = out / "pretrained" if pretrain else base
    start_needs = ["pretrained"] if pretrain else base_needs
    for name, run in stages.capacity_round(config, start, data).items():
        text = f"{config.capacity_steps} steps from {start.name} {' '.join(run.extra)}"
        if stages.same_run(config, run, plain):  # finetune_from pretrained, the same steps
            link = partial(stages.link_run, out / "finetune-cfg", out / name)
            same = f"{text.strip()}: the same run as finetune-cfg, linked"
            jobs[name] = Job(name, ["finetune-cfg"], {"same_as": "finetune-cfg"}, run=link,
                             describe=same)  # fmt: skip
            continue
        jobs[name] = train_job(config, name, run, [*start_needs, "data"], text.strip())
    study_file = str(out / "study_config.json")
    inputs = pick(config, MITIGATION_FIELDS)
    methods_needs = ["detect-eval-cfg", "finetune-cfg"]
    models_needs = [*methods_needs, "finetune-cfg-filter", *jobs]  # jobs: the capacity runs
    for part, needs in (("methods", methods_needs), ("models", models_needs)):
        jobs[f"mitigate-{part}"] = Job(
            f"mitigate-{part}",
            needs,
            inputs,
            ["scripts.study.mitigation", "--study", study_file, "--part", part],
            log=out / f"mitigate-{part}.log",
            describe=f"mitigation: {part} against none",
        )
    return jobs


def _write_detect_prompts(config: StudyConfig) -> None:
    """The prompts to validate the detector on, as OUT/detect_prompts.csv."""
    frame = stages.detection_prompts(config.out / "data", config)
    frame.to_csv(config.out / "detect_prompts.csv", index=False)
