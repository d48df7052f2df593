"""The study's job runner: content-addressed jobs, their markers, the scheduler, the dry run.

Each job's key hashes the settings it reads and the keys of the jobs it needs, and a finished
job leaves `.study/NAME.json` with that key: a killed study run again skips every finished job
whose key still matches, and `--force NAME` reruns a job and everything after it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_datasets.errors import ChexmemError
from scripts.study.config import StudyConfig


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
