"""Inference-time mitigations by name, so configs and the command line can choose them."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from hf_datasets.errors import ChexmemError
from hf_datasets.registry import registered_class
from mitigate.base import Mitigation

# name -> "module:Class"; imported on first use
MITIGATIONS = {
    "none": "mitigate.base:Mitigation",
    "embedding": "mitigate.embedding:EmbeddingAdjustment",
    "neurons": "mitigate.neurons:NeuronDeactivation",
    "trigger_tokens": "mitigate.tokens:TriggerTokenEdit",
    "random_tokens": "mitigate.tokens:RandomTokenAddition",
    "attention_scaling": "mitigate.attention:AttentionScaling",
    "amg": "mitigate.amg:AntiMemorizationGuidance",
    "uce": "mitigate.uce:ConceptEdit",
}


def mitigation_class(name: str) -> type[Mitigation]:
    """The class registered under `name`."""
    return registered_class(MITIGATIONS, name, "mitigation")


def make_mitigation(name: str, **settings: Any) -> Mitigation:
    """A mitigation by name with its settings (the class's defaults for the rest)."""
    cls = mitigation_class(name)
    try:
        return cls(**settings)
    except TypeError as error:
        raise ChexmemError(f"bad settings for mitigation {name!r}: {error}") from None


def parse_method(spec: str) -> tuple[str, str, dict[str, Any]]:
    """``label=name:key=value,...`` -> (label, name, settings); values are read as JSON."""
    head, _, options = spec.partition(":")
    label, _, name = head.rpartition("=")
    settings: dict[str, Any] = {}
    for item in filter(None, options.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ChexmemError(f"method option {item!r} in {spec!r} must be key=value")
        try:
            settings[key] = json.loads(value)
        except json.JSONDecodeError:
            settings[key] = value
    return label or _default_label(name, settings), name, settings


def _default_label(name: str, settings: dict[str, Any]) -> str:
    """A readable row name: the method and its settings."""
    return name + "".join(f"_{k}{v}" for k, v in settings.items() if k != "target")


def check_settings(name: str, settings: dict[str, Any]) -> None:
    """One clear error when mitigation `name` has no parameter of one of these settings."""
    cls = mitigation_class(name)
    fields = dataclasses.fields(cls) if dataclasses.is_dataclass(cls) else ()
    known = sorted(f.name for f in fields if f.init)
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise ChexmemError(
            f"mitigation {name!r} has no setting {', '.join(unknown)}; "
            f"it has {', '.join(known) or 'none'}"
        )


def with_settings(method: Mitigation, name: str, settings: dict[str, Any]) -> Mitigation:
    """`method` with these of its settings replaced (its own checks run again)."""
    if not settings:
        return method
    check_settings(name, settings)
    return dataclasses.replace(method, **settings)
