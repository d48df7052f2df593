"""Report-style and labels-style prompts for known label rows."""

from __future__ import annotations

import pytest

from hf_datasets.errors import ChexmemError
from hf_datasets.prompts import PromptConfig, PromptTemplates, build_prompt

ISSUE_EXAMPLE = {
    "Cardiomegaly": 1.0,
    "Pleural Effusion": 1.0,
    "Edema": -1.0,
    "Pneumothorax": 0.0,
    "Support Devices": 1.0,
}


def test_report_style_matches_the_documented_example() -> None:
    prompt = build_prompt(ISSUE_EXAMPLE, view="PA", sex="F", age=68)
    assert prompt == (
        "Frontal PA chest radiograph of a 68-year-old woman. Cardiomegaly and pleural effusion. "
        "Possible edema. No pneumothorax. Support devices present."
    )


def test_labels_style() -> None:
    config = PromptConfig(style="labels")
    labels = {"Cardiomegaly": 1.0, "Pleural Effusion": 1.0, "Pneumothorax": 0.0}
    assert build_prompt(labels, view="PA", sex="F", age=68, config=config) == (
        "chest x-ray, cardiomegaly, pleural effusion"
    )
    assert build_prompt(ISSUE_EXAMPLE, config=config) == (
        "chest x-ray, cardiomegaly, pleural effusion, possible edema, support devices"
    )
    assert build_prompt({"No Finding": 1.0}, config=config) == "chest x-ray, no finding"


@pytest.mark.parametrize(
    ("sex", "age", "start"),
    [
        ("M", 81, "Frontal AP chest radiograph of an 81-year-old man."),
        ("M", 18, "Frontal AP chest radiograph of an 18-year-old man."),
        ("F", None, "Frontal AP chest radiograph of a woman."),
        (None, 45, "Frontal AP chest radiograph of a 45-year-old patient."),
        (None, None, "Frontal AP chest radiograph of a patient."),
    ],
)
def test_demographics_are_optional(sex: str | None, age: int | None, start: str) -> None:
    assert build_prompt({"No Finding": 1.0}, view="AP", sex=sex, age=age).startswith(start)


def test_demographics_and_negatives_can_be_left_out() -> None:
    config = PromptConfig(
        include_sex=False, include_age=False, include_view=False, include_negatives=False
    )
    assert build_prompt(ISSUE_EXAMPLE, view="PA", sex="F", age=68, config=config) == (
        "Frontal chest radiograph of a patient. Cardiomegaly and pleural effusion. "
        "Possible edema. Support devices present."
    )


def test_negatives_join_with_or_and_other_pleural_is_readable() -> None:
    labels = {"Pneumothorax": 0.0, "Pleural Effusion": 0.0, "Pleural Other": 1.0, "Fracture": -1.0}
    assert build_prompt(labels, view="PA") == (
        "Frontal PA chest radiograph of a patient. Other pleural abnormality. Possible fracture. "
        "No pneumothorax or pleural effusion."
    )


def test_template_alternatives_are_deterministic_per_seed_and_row() -> None:
    templates = PromptTemplates(
        uncertain=["Possible {findings}.", "Cannot exclude {findings}.", "Probable {findings}."]
    )
    prompts = {
        seed: [
            build_prompt(
                {"Edema": -1.0}, key=f"row{i}", config=PromptConfig(seed=seed, templates=templates)
            )
            for i in range(30)
        ]
        for seed in (0, 1)
    }
    again = [
        build_prompt(
            {"Edema": -1.0}, key=f"row{i}", config=PromptConfig(seed=0, templates=templates)
        )
        for i in range(30)
    ]
    assert prompts[0] == again
    assert prompts[0] != prompts[1]
    assert {p.split(". ")[1].split(" ")[0] for p in prompts[0]} == {
        "Possible",
        "Cannot",
        "Probable",
    }


def test_config_from_yaml_mapping() -> None:
    config = PromptConfig.from_dict(
        {"style": "report", "seed": 3, "templates": {"no_finding": ["Normal chest."]}}
    )
    assert build_prompt({"No Finding": 1.0}, config=config).endswith("Normal chest.")
    assert PromptConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ChexmemError, match="unknown prompt option"):
        PromptConfig.from_dict({"colour": "red"})
    with pytest.raises(ChexmemError, match="unknown prompt template"):
        PromptConfig.from_dict({"templates": {"footer": ["x"]}})
    with pytest.raises(ChexmemError, match="style"):
        PromptConfig(style="poem")
