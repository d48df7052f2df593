"""Memorization detectors by name: the one list `chexmem detect`, the study and the report read.

Adding a detector is one file (a `detect.base.Detector` subclass) and one line here.
"""

from __future__ import annotations

from detect.base import Detector
from hf_datasets.registry import registered_class

# name -> "module:Class"; imported on first use
DETECTORS = {
    "magnitude": "detect.magnitude:NoiseMagnitude",
    "sharpness": "detect.sharpness:Sharpness",
    "anisotropy": "detect.anisotropy:Anisotropy",
    "seed_consistency": "detect.seed_consistency:SeedConsistency",
}


def detector_class(name: str) -> type[Detector]:
    """The class registered under `name`."""
    return registered_class(DETECTORS, name, "detector")


def make_detectors(names: list[str]) -> list[Detector]:
    """One detector per name, in order, each once."""
    return [detector_class(name)() for name in dict.fromkeys(names)]
