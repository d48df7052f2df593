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

Modules, each importing only those above it:

- `config`: `StudyConfig`, the study's settings (each a flag and a YAML key);
- `runner`: jobs, their keys and markers, the scheduler and the dry run;
- `stages`: the bodies of the data, fine-tune and detection stages;
- `mitigation`: the mitigation stage (`python -m scripts.study.mitigation`);
- `report`: `metrics.json`, `report.md`, `report.html`, and the Hub upload;
- `plan`: the jobs of a study, in order;
- `cli`: `chexmem study` and `chexmem demo`.
"""
