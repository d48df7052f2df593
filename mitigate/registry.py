"""Inference-time mitigations by name, so configs and the command line can choose them."""

from __future__ import annotations

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
