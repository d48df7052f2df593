"""Prompts for chest radiographs built from labels: report-style sentences or a short label list.

Report style (default)::

    Frontal PA chest radiograph of a 68-year-old woman. Cardiomegaly and pleural effusion.
    Possible edema. No pneumothorax. Support devices present.

Labels style::

    chest x-ray, cardiomegaly, pleural effusion

Where a template slot has several alternatives, the one used for a row is drawn from a
generator seeded by ``(seed, row key)``: the same seed always gives the same prompt for the
same row, whatever the order rows are processed in.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from hf_datasets.errors import ChexmemError
from hf_datasets.labels import NEGATIVE, OBSERVATIONS, POSITIVE, UNCERTAIN

PHRASES: dict[str, str] = {name: name.lower() for name in OBSERVATIONS} | {
    "Pleural Other": "other pleural abnormality",
    "Support Devices": "support devices",
}
FINDINGS: tuple[str, ...] = tuple(
    o for o in OBSERVATIONS if o not in ("No Finding", "Support Devices")
)


@dataclass
class PromptTemplates:
    """Sentence templates; each slot lists alternatives, one is chosen per row by seed."""

    header: list[str] = field(
        default_factory=lambda: ["{projection} chest radiograph of {subject}."]
    )
    positive: list[str] = field(default_factory=lambda: ["{Findings}."])
    uncertain: list[str] = field(default_factory=lambda: ["Possible {findings}."])
    negative: list[str] = field(default_factory=lambda: ["No {findings_or}."])
    no_finding: list[str] = field(default_factory=lambda: ["No acute cardiopulmonary abnormality."])
    devices_positive: list[str] = field(default_factory=lambda: ["Support devices present."])
    devices_uncertain: list[str] = field(default_factory=lambda: ["Possible support devices."])
    devices_negative: list[str] = field(default_factory=lambda: ["No support devices."])
    labels_prefix: str = "chest x-ray"


@dataclass
class PromptConfig:
    """How prompts are written; maps one to one onto the `prompts:` section of a YAML config."""

    style: str = "report"  # "report" or "labels"
    include_view: bool = True
    include_sex: bool = True
    include_age: bool = True
    include_negatives: bool = True
    include_uncertain: bool = True
    seed: int = 0
    templates: PromptTemplates = field(default_factory=PromptTemplates)

    def __post_init__(self) -> None:
        if self.style not in ("report", "labels"):
            raise ChexmemError(f"prompt style must be 'report' or 'labels', not {self.style!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PromptConfig:
        """Build from a plain mapping (a YAML section); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ChexmemError(f"unknown prompt option(s): {', '.join(sorted(unknown))}")
        data = dict(data)
        templates = data.pop("templates", {}) or {}
        unknown = set(templates) - {f.name for f in fields(PromptTemplates)}
        if unknown:
            raise ChexmemError(f"unknown prompt template(s): {', '.join(sorted(unknown))}")
        return cls(**data, templates=PromptTemplates(**templates))

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping, the inverse of `from_dict`."""
        return asdict(self)


def join_phrases(phrases: list[str], conjunction: str = "and") -> str:
    """'a', 'a and b', 'a, b and c'."""
    if len(phrases) <= 1:
        return "".join(phrases)
    return f"{', '.join(phrases[:-1])} {conjunction} {phrases[-1]}"


def subject_phrase(sex: str | None, age: int | None, config: PromptConfig) -> str:
    """'a 68-year-old woman', 'an 81-year-old man', 'a man', 'a patient'."""
    noun = {"F": "woman", "M": "man"}.get(sex or "", "patient") if config.include_sex else "patient"
    if config.include_age and age is not None and age > 0:
        article = "an" if str(age).startswith("8") or age in (11, 18) else "a"
        return f"{article} {age}-year-old {noun}"
    return f"a {noun}"


def projection_phrase(view: str | None) -> str:
    """'Frontal PA', 'Frontal AP', 'Lateral' or 'Frontal' when unknown."""
    if not view:
        return "Frontal"
    if view.lower().startswith("lat"):
        return "Lateral"
    return f"Frontal {view}"


def _pick(options: list[str], rng: random.Random) -> str:
    """One template among the alternatives."""
    return options[0] if len(options) == 1 else rng.choice(options)


def build_prompt(
    labels: Mapping[str, float | None],
    *,
    view: str | None = None,
    sex: str | None = None,
    age: int | None = None,
    key: str = "",
    config: PromptConfig | None = None,
) -> str:
    """The prompt for one image from its labels and metadata; `key` seeds template choices."""
    config = config or PromptConfig()
    rng = random.Random(f"{config.seed}:{key}")
    by_value: dict[float, list[str]] = {POSITIVE: [], UNCERTAIN: [], NEGATIVE: []}
    for name in FINDINGS:
        value = labels.get(name)
        if value in by_value:
            by_value[value].append(PHRASES[name])
    if config.style == "labels":
        return _labels_prompt(labels, by_value, config)

    t = config.templates
    header = projection_phrase(view if config.include_view else None)
    sentences = [
        _pick(t.header, rng).format(projection=header, subject=subject_phrase(sex, age, config))
    ]
    if by_value[POSITIVE]:
        text = join_phrases(by_value[POSITIVE])
        sentences.append(_pick(t.positive, rng).format(Findings=text[0].upper() + text[1:]))
    elif labels.get("No Finding") == POSITIVE:
        sentences.append(_pick(t.no_finding, rng))
    if by_value[UNCERTAIN] and config.include_uncertain:
        sentences.append(_pick(t.uncertain, rng).format(findings=join_phrases(by_value[UNCERTAIN])))
    if by_value[NEGATIVE] and config.include_negatives:
        text = join_phrases(by_value[NEGATIVE], "or")
        sentences.append(_pick(t.negative, rng).format(findings_or=text))
    devices = labels.get("Support Devices")
    if devices == POSITIVE:
        sentences.append(_pick(t.devices_positive, rng))
    elif devices == UNCERTAIN and config.include_uncertain:
        sentences.append(_pick(t.devices_uncertain, rng))
    elif devices == NEGATIVE and config.include_negatives:
        sentences.append(_pick(t.devices_negative, rng))
    return " ".join(sentences)


def _labels_prompt(
    labels: Mapping[str, float | None], by_value: dict[float, list[str]], config: PromptConfig
) -> str:
    """'chest x-ray, cardiomegaly, pleural effusion, possible edema, support devices'."""
    parts = [config.templates.labels_prefix, *by_value[POSITIVE]]
    if config.include_uncertain:
        parts += [f"possible {p}" for p in by_value[UNCERTAIN]]
    if labels.get("Support Devices") == POSITIVE:
        parts.append(PHRASES["Support Devices"])
    if len(parts) == 1 and labels.get("No Finding") == POSITIVE:
        parts.append("no finding")
    return ", ".join(parts)
